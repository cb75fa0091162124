"""The W&B sweep file: every command an agent would run parses and builds through the real CLI."""

import itertools
from pathlib import Path

import pytest
import yaml

from tnkd.cli import TnkdCLI
from tnkd.divergences import RenyiDivergence
from tnkd.teachers import CNN, save_teacher

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "configs" / "sweeps" / "renyi_alpha.yaml"


def _corners(spec: dict) -> list:
    """Values a sweep parameter can take: its fixed value, its list, or its range's ends."""
    if "parameters" in spec:
        keys = list(spec["parameters"])
        choices = [_corners(spec["parameters"][k]) for k in keys]
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*choices)]
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    return [spec["min"], (spec["min"] + spec["max"]) / 2, spec["max"]]


def _commands(sweep: dict) -> list[list[str]]:
    """The agent's commands, with W&B's own formatting of ``${args}``."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    names = list(sweep["parameters"])
    corners = [_corners(sweep["parameters"][n]) for n in names]
    longest = max(len(c) for c in corners)
    commands = []
    for i in range(longest):  # walk every parameter through all its corner values
        values = {n: {"value": c[i % len(c)]} for n, c in zip(names, corners, strict=True)}
        flags = create_sweep_command_args({"args": values})["args"]
        command = []
        for part in sweep["command"]:
            if part == "${program}":
                command.append(sweep["program"])
            elif part == "${args}":
                command += flags
            else:
                command.append(part)
        commands.append(command)
    return commands


def test_sweep_file_commands_parse_and_build(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    teacher = tmp_path / "teacher.pt"  # an untrained stand-in for the digits teacher file
    save_teacher(CNN(input_shape=(1, 8, 8), num_classes=10, channels=(4, 4), hidden=8), teacher)
    sweep = yaml.safe_load(SWEEP.read_text())
    assert sweep["metric"]["name"] == "val/student_acc"
    commands = _commands(sweep)
    assert len(commands) >= 3
    for command in commands:
        assert command[:2] == ["tnkd", "fit"]
        args = [a for a in command[2:] if "logger.init_args.offline" not in a]
        args.append(f"--model.init_args.teacher_checkpoint={teacher}")
        cli = TnkdCLI(args=args, run=False)  # parses, validates and instantiates
        divergence = cli.model.divergence
        assert isinstance(divergence, RenyiDivergence)
        flags = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
        assert cli.model.temperature == float(flags["temperature"])
        assert cli.model.beta == pytest.approx(float(flags["beta"]))
        assert cli.model.student.bond_dim == int(flags["bond_dim"])
        assert divergence.alpha == pytest.approx(float(flags["alpha"]))
        assert 0.0 <= divergence.alpha <= 4.0
