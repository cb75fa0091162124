"""The bad-input table (README, "Bad input") through the real ``tnkd`` command.

Every row runs ``tnkd`` in a subprocess (tests/cli_runner.py) and must end with a non-zero exit
status, exactly one line on stderr, naming the setting or file, and nothing on disk
changed. A few rows also run through the plain console script to show that the fast runner
behaves like it.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import digits_run

from tnkd.data.idx import write_idx
from tnkd.teachers import CNN, save_teacher

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
MPS = str(REPO / "configs" / "digits" / "mps_from_cnn.yaml")
TEACHER = str(REPO / "configs" / "digits" / "teacher_cnn.yaml")
MAIN = str(REPO / "configs" / "digits" / "main.yaml")
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
MNIST = [
    "--data",
    "tnkd.data.MNISTDataModule",
    "--data.init_args.root",
    "mnist",
    "--model.init_args.student.init_args.num_sites",
    "784",
]
CNN_DIGITS = "{class_path: tnkd.teachers.CNN, init_args: {input_shape: [1, 8, 8]}}"


def _fill_mnist(root: Path, corrupt: bool = False) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        if "images" in name:
            array = rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
        else:
            array = (np.arange(20) % 10).astype(np.uint8)
        write_idx(raw / f"{name}.gz", array)
    if corrupt:
        path = raw / "train-images-idx3-ubyte.gz"
        path.write_bytes(gzip.compress(path.read_bytes()[:100]))  # a gz of a truncated file


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with a digits teacher file, a trained run's checkpoint and some broken files."""
    root = tmp_path_factory.mktemp("cli-errors")
    torch.manual_seed(0)
    save_teacher(CNN(input_shape=(1, 8, 8), num_classes=10), root / "runs/teachers/digits_cnn.pt")
    (root / "bad.ckpt").write_bytes(b"not a checkpoint")
    (root / "bad_teacher.pt").write_bytes(b"\x00not a torch file")
    (root / "afile").write_text("a file, not a folder\n")
    (root / "grids").mkdir()
    (root / "grids" / "grid_broken.yaml").write_text("student: [unclosed\n")
    (root / "mnist_empty").mkdir()
    _fill_mnist(root / "mnist_corrupt", corrupt=True)
    return root


@pytest.fixture(scope="module")
def trained(workdir, tnkd_cli):
    """A short labels-only run named `done` (its checkpoints), bond dimension 4."""
    result = tnkd_cli(digits_run("fit", "done", "--trainer.limit_train_batches", "2"), cwd=workdir)
    assert result.rc == 0, result.stderr
    return workdir / "runs" / "checkpoints" / "done" / "last.ckpt"


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# (id, tnkd arguments, regex the last stderr line must match)
ROWS = [
    # --- the README's bad-input table -----------------------------------------------------
    (
        "unknown-divergence",
        ["fit", "--config", MPS, "--model.init_args.divergence", "kullback"],
        r"unknown divergence 'kullback'; expected one of",
    ),
    (
        "renyi-alpha-negative",
        ["fit", "--config", MPS, "--model.init_args.divergence", "{name: renyi, alpha: -0.5}"],
        r"renyi alpha must be >= 0",
    ),
    (
        "renyi-alpha-nan",
        ["fit", "--config", MPS, "--model.init_args.divergence", "{name: renyi, alpha: .nan}"],
        r"renyi alpha must be >= 0 .* nan",
    ),
    (
        "temperature-zero",
        ["fit", "--config", MPS, "--model.init_args.temperature", "0"],
        r"temperature must be a finite number > 0, but got 0",
    ),
    (
        "temperature-negative",
        ["fit", "--config", MPS, "--model.init_args.temperature", "-2"],
        r"temperature must be a finite number > 0",
    ),
    (
        "temperature-not-a-number",
        ["fit", "--config", MPS, "--model.init_args.temperature", "abc"],
        r"model\.temperature: Expected a <class 'float'>",
    ),
    (
        "beta-above-1",
        ["fit", "--config", MPS, "--model.init_args.beta", "1.5"],
        r"beta must be in \[0, 1\], but got 1.5",
    ),
    (
        "beta-negative",
        ["fit", "--config", MPS, "--model.init_args.beta", "-0.1"],
        r"beta must be in \[0, 1\]",
    ),
    (
        "bond-dim-zero",
        ["fit", "--config", MPS, "--model.init_args.student.init_args.bond_dim", "0"],
        r"bond_dim must be a positive integer, but got 0",
    ),
    (
        "bond-dim-negative",
        ["fit", "--config", MPS, "--model.init_args.student.init_args.bond_dim", "-3"],
        r"bond_dim must be a positive integer",
    ),
    (
        "bond-dim-non-integer",
        ["fit", "--config", MPS, "--model.init_args.student.init_args.bond_dim", "2.5"],
        r"bond_dim: Expected a <class 'int'>. Got value: 2.5",
    ),
    (
        "tt-network-rank-zero",
        [
            "fit",
            "--config",
            MPS,
            "--model.init_args.student",
            "{class_path: tnkd.students.TTNetwork, init_args: {input_shape: "
            "[1, 8, 8], patch_size: 4, num_classes: 10, rank: 0}}",
        ],
        r"rank must be",
    ),
    (
        "class-count-mismatch",
        ["fit", "--config", MPS, "--model.init_args.student.init_args.num_classes", "5"],
        r"the teacher has 10 classes but the student has 5",
    ),
    (
        "input-size-mismatch",
        ["fit", "--config", MPS, "--model.init_args.student.init_args.num_sites", "81"],
        r"the student expects 81 inputs per sample but the data \(DigitsDataModule\) has 64",
    ),
    (
        "nan-pixels",
        ["fit", "--config", MPS, "--data", "cli_plugins.NaNDigits"],
        r"NaNDigits: the train set has 1 NaN or infinite pixel values",
    ),
    (
        "empty-data",
        ["fit", "--config", MPS, "--data", "cli_plugins.EmptyDigits"],
        r"EmptyDigits: the train set is empty",
    ),
    (
        "missing-mnist-files",
        ["fit", "--config", MPS, *MNIST[:2], "--data.init_args.root", "mnist_empty", *MNIST[4:]],
        r"MNISTDataModule: 4 of the 4 MNIST files not found .* point root",
    ),
    (
        "corrupt-data-file",
        ["fit", "--config", MPS, *MNIST[:2], "--data.init_args.root", "mnist_corrupt", *MNIST[4:]],
        r"train-images-idx3-ubyte",
    ),
    (
        "missing-checkpoint",
        ["test", "--config", MPS, "--ckpt_path", "nothere.ckpt"],
        r"checkpoint nothere.ckpt does not exist",
    ),
    (
        "corrupt-checkpoint",
        ["test", "--config", MPS, "--ckpt_path", "bad.ckpt"],
        r"checkpoint bad.ckpt is corrupt or not a checkpoint",
    ),
    (
        "unknown-config-key",
        ["fit", "--config", MPS, "--model.init_args.tempreature", "2"],
        r"Option 'tempreature' is not accepted",
    ),
    ("missing-config-file", ["fit", "--config", "nothere.yaml"], r"nothere.yaml"),
    (
        "missing-teacher-file",
        [
            "fit",
            "--config",
            MPS,
            "--model.init_args.teacher_checkpoint",
            "runs/teachers/nothere.pt",
        ],
        r"teacher file runs/teachers/nothere.pt does not exist",
    ),
    (
        "corrupt-teacher-file",
        ["fit", "--config", MPS, "--model.init_args.teacher_checkpoint", "bad_teacher.pt"],
        r"teacher file bad_teacher.pt is corrupt",
    ),
    # --- the cases of the issue "Trustworthy runs" ----------------------------------------
    (
        "teacher-without-weights",
        [
            "fit",
            "--config",
            MPS,
            "--model.init_args.teacher",
            CNN_DIGITS,
            "--model.init_args.teacher_checkpoint",
            "null",
        ],
        r"given as an architecture without weights; .*untrained_teacher true",
    ),
    (
        "save-dir-under-a-file",
        ["fit", "--config", MPS, "--trainer.logger.init_args.save_dir", "afile/runs"],
        r"save_dir afile/runs cannot be created",
    ),
    (
        "root-dir-under-a-file",
        ["fit", "--config", MPS, *QUIET, "--trainer.default_root_dir", "afile/runs"],
        r"default_root_dir afile/runs cannot be created",
    ),
    (
        "teacher-export-unwritable",
        ["fit", "--config", TEACHER, *QUIET, "--model.init_args.export_path", "afile/teacher.pt"],
        r"export_path afile/teacher.pt cannot be created",
    ),
    (
        "teacher-export-exists",
        [
            "fit",
            "--config",
            TEACHER,
            *QUIET,
            "--model.init_args.export_path",
            "runs/teachers/digits_cnn.pt",
        ],
        r"teacher export_path runs/teachers/digits_cnn.pt already exists",
    ),
    (
        "teacher-cache-unwritable",
        ["fit", "--config", MPS, *QUIET, "--model.init_args.teacher_cache", "afile/cache"],
        r"teacher_cache afile/cache cannot be created",
    ),
    (
        "predictions-unwritable",
        ["predict", "--config", MPS, *QUIET, "--predictions", "afile/p.csv"],
        r"--predictions afile/p.csv cannot be created",
    ),
    (
        "compare-empty-seeds",
        ["compare", "--config", MAIN, "--seeds", "[]"],
        r"seeds is empty: give at least one seed",
    ),
    (
        "compare-empty-variants",
        ["compare", "--config", MAIN, "--variants", "[]"],
        r"variants is empty",
    ),
    (
        "compare-results-unwritable",
        ["compare", "--config", MAIN, "--results", "afile/r.json"],
        r"--results afile/r.json cannot be created",
    ),
    ("grid-malformed-file", ["grid", "grids"], r"grid_broken.yaml"),
    (
        "compare-value-of-the-wrong-type",
        ["compare", "--config", MAIN, "--lr", "[1]"],
        r"^tnkd compare: error: lr: Expected a <class 'float'>",
    ),
    (
        "study-missing-config",
        ["study", "--config", "nope.yaml"],
        r"^tnkd study: error: config: File does not exist: .*nope\.yaml",
    ),
    (
        "study-without-kl",
        [
            "study",
            "--config",
            str(REPO / "configs" / "digits" / "renyi_study.yaml"),
            "--alphas",
            "[0.5]",
        ],
        r"alphas must include 1",
    ),
]


@pytest.mark.parametrize(("args", "pattern"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_ends_in_one_line(workdir, tnkd_cli, args, pattern):
    before = _snapshot(workdir)
    result = tnkd_cli(args, cwd=workdir, path=[str(TESTS)])
    assert result.rc != 0
    lines = result.stderr_lines
    assert len(lines) == 1, result.stderr  # the error alone: no notice before it
    assert re.search(pattern, lines[-1]), lines[-1]
    assert "Traceback" not in result.stderr
    assert _snapshot(workdir) == before


def test_checkpoint_of_another_student_shape(workdir, tnkd_cli, trained):
    before = _snapshot(workdir)
    result = tnkd_cli(
        [
            "test",
            "--config",
            MPS,
            *QUIET,
            "--model.init_args.beta",
            "0",
            "--model.init_args.teacher_checkpoint",
            "null",
            "--ckpt_path",
            str(trained),
        ],
        cwd=workdir,
    )
    assert result.rc != 0 and len(result.stderr_lines) == 1, result.stderr
    assert re.search(r"saved from another model shape: student\.cores", result.stderr_lines[-1])
    assert _snapshot(workdir) == before


def test_existing_checkpoint_folder(workdir, tnkd_cli, trained):
    before = _snapshot(workdir)
    result = tnkd_cli(
        [
            "fit",
            "--config",
            MPS,
            "--trainer.logger",
            "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.init_args.save_dir",
            "runs",
            "--trainer.logger.init_args.name",
            "done",
        ],
        cwd=workdir,
    )
    assert result.rc != 0 and len(result.stderr_lines) == 1, result.stderr
    assert re.search(
        r"already holds 2 checkpoint\(s\) .* --ckpt_path last", result.stderr_lines[-1]
    )
    assert _snapshot(workdir) == before


def test_debug_shows_the_traceback(workdir, tnkd_cli):
    result = tnkd_cli(
        ["fit", "--config", MPS, "--model.init_args.beta", "1.5"],
        cwd=workdir,
        env={"TNKD_DEBUG": "1"},
    )
    assert result.rc != 0
    assert "Traceback" in result.stderr and "beta must be in [0, 1]" in result.stderr


@pytest.mark.parametrize("row", ["unknown-divergence", "corrupt-checkpoint"])
def test_the_console_script_itself_gives_the_same_line(workdir, tnkd_cli, row):
    args, _ = next(r[1:] for r in ROWS if r[0] == row)
    script = shutil.which("tnkd")
    assert script is not None
    real = subprocess.run(
        [script, *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    fast = tnkd_cli(args, cwd=workdir)
    assert real.returncode == fast.rc != 0
    assert real.stderr.strip().splitlines()[-1] == fast.stderr_lines[-1]
