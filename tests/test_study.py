"""The Renyi study command: resumable runs, paired differences against KL, the heatmaps."""

import json
import math
import statistics

import pytest

import tnkd.experiments.study as study_module
from tnkd.experiments.compare import RunResult
from tnkd.experiments.study import paired_differences, paired_table, study


def _record(alpha, t, seed, acc, agreement=0.9):
    return {
        "name": "labels only" if alpha is None else f"alpha={alpha:g} T={t:g}",
        "seed": seed,
        "beta": 0.0 if alpha is None else 0.9,
        "alpha": "inf" if alpha == math.inf else alpha,
        "temperature": t,
        "student_acc": acc,
        "agreement": agreement,
    }


def test_paired_differences_and_the_noise_verdict():
    records = [_record(None, 4.0, s, 0.95) for s in range(3)]
    kl = [0.970, 0.975, 0.972]
    records += [_record(1.0, 4.0, s, a) for s, a in enumerate(kl)]
    # alpha = 2: +0.5 points in every seed, tiny spread: beyond noise
    records += [_record(2.0, 4.0, s, a + 0.005 + 0.0001 * s) for s, a in enumerate(kl)]
    # alpha = inf: +-1 point, a sign flip: noise
    records += [
        _record(math.inf, 4.0, s, a + d)
        for s, (a, d) in enumerate(zip(kl, [0.01, -0.01, 0.002], strict=True))
    ]
    diffs = paired_differences(records, 2.0, 4.0)
    assert diffs == pytest.approx([0.005, 0.0051, 0.0052])
    table = paired_table(records, [1.0, 2.0, math.inf], [4.0], "T")
    rows = {
        line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")
    }
    assert "yes, higher" in rows["2"] and rows["inf"].rstrip().endswith("| no |")
    assert "(reference)" in rows["KL (1)"]
    mean = statistics.mean([0.5, 0.51, 0.52])
    t = mean / (statistics.stdev([0.5, 0.51, 0.52]) / math.sqrt(3))
    assert f"{t:+.1f}" in rows["2"] and "4.30" in table  # t_{0.975, 2}
    assert "Labels only: 0.9500 ± 0.0000" in table


def test_a_study_skips_finished_runs_and_writes_its_figures(tmp_path, monkeypatch):
    calls = []

    def fake_compare(data, student, teacher, variants, seeds, **kwargs):
        (variant,), (seed,) = variants, seeds
        calls.append((variant.name, seed))
        acc = 0.9 + 0.01 * seed + (0.0 if variant.beta == 0 else 0.001 * variant.temperature)
        return [
            RunResult(
                variant.name,
                seed,
                "kl",
                variant.temperature,
                variant.beta,
                acc,
                acc,
                0.01,
                100,
                2.0,
                1.0,
                {"teacher_acc": 0.99},
            )
        ]

    monkeypatch.setattr(study_module, "compare", fake_compare)
    results = tmp_path / "r.jsonl"
    kwargs = dict(
        alphas=[0.5, 1.0, math.inf],
        temperatures=[2.0, 4.0],
        seeds=[0, 1],
        results=str(results),
        figures=str(tmp_path / "fig"),
    )
    first = study(None, None, None, **kwargs)
    assert len(calls) == 2 * (1 + 3 * 2) == len(first)
    assert {r["alpha"] for r in first} == {None, 0.5, 1.0, "inf"}
    assert (tmp_path / "fig.png").stat().st_size > 0 and "alpha" in (
        tmp_path / "fig.md"
    ).read_text()
    # a rerun (say after a stop) runs nothing already in the results file
    lines = results.read_text().splitlines()
    results.write_text("\n".join(lines[:-3]) + "\n")
    calls.clear()
    again = study(None, None, None, **kwargs)
    assert len(calls) == 3 and len(again) == len(first)
    assert [json.loads(line)["name"] for line in results.read_text().splitlines()][-3:] == [
        c[0] for c in calls
    ]
    with pytest.raises(ValueError, match="alphas must include 1"):
        study(None, None, None, **{**kwargs, "alphas": [0.5]})


def test_tnkd_study_runs_a_config_through_the_command(tmp_path, monkeypatch):
    """``tnkd study --config F`` builds the study from YAML (data, factories, grid) and runs it."""
    from tnkd.cli import run

    seen = []

    def fake_compare(data, student, teacher, variants, seeds, **kwargs):
        (variant,), (seed,) = variants, seeds
        seen.append((type(data).__name__, type(student()).__name__, variant.name, seed))
        return [
            RunResult(
                variant.name,
                seed,
                "kl",
                variant.temperature,
                variant.beta,
                0.9,
                0.9,
                0.01,
                100,
                2.0,
                1.0,
                {"teacher_acc": 0.99},
            )
        ]

    monkeypatch.setattr(study_module, "compare", fake_compare)
    config = tmp_path / "study.yaml"
    config.write_text(
        "data: {class_path: tnkd.data.DigitsDataModule}\n"
        "teacher: {class_path: tnkd.teachers.MLP, init_args: {num_inputs: 64, "
        "num_classes: 10, hidden: [16]}}\n"
        "student: {class_path: tnkd.students.MPSClassifier, init_args: {num_sites: 64, "
        "num_classes: 10, bond_dim: 2}}\n"
        f"alphas: [1.0, 2.0]\ntemperatures: [4.0]\nseeds: [0]\nresults: {tmp_path / 'r.jsonl'}\n"
        f"figures: {tmp_path / 'fig'}\n"
    )
    records = run(["study", "--config", str(config)])
    assert len(records) == 3  # labels only + alpha 1 (KL) + alpha 2, one seed
    assert {s[:2] for s in seen} == {("DigitsDataModule", "MPSClassifier")}
    assert sorted(s[2] for s in seen) == ["alpha=1 T=4", "alpha=2 T=4", "labels only"]
