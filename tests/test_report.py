"""``tnkd report``: tables and the accuracy-vs-parameters plot from results files."""

import json

import pytest

from tnkd.cli import run
from tnkd.experiments.report import load_results, markdown


def _results(path, accs, teacher="x.CNN"):
    runs = [
        {
            "name": name,
            "seed": seed,
            "divergence": div,
            "temperature": 4.0,
            "beta": beta,
            "student_acc": acc,
            "agreement": acc,
            "student_ece": 0.01,
            "student_params": 1000,
            "compression_ratio": 10.0,
            "seconds": 1.0,
        }
        for (name, div, beta), seed, acc in accs
    ]
    path.write_text(
        json.dumps(
            {"teacher": {"class_path": teacher, "test_acc": 0.99, "params": 10000}, "runs": runs}
        )
    )
    return path


def test_report_tables_and_plot(tmp_path, capsys):
    labels, kl = ("labels only", "-", 0.0), ("KL", "kl", 0.9)
    path = _results(
        tmp_path / "grid.json",
        [(labels, 0, 0.90), (labels, 1, 0.92), (kl, 0, 0.95), (kl, 1, 0.97)],
    )
    table = markdown(path, "toy")
    # mean ± sample sd over the two seeds: 0.91 ± 0.0141, 0.96 ± 0.0141
    assert "| labels only | - | - | 0 | 0.9100 ± 0.0141 |" in table
    assert "| KL | kl | 4 | 0.9 | 0.9600 ± 0.0141 |" in table
    assert "teacher test accuracy 0.9900 (10,000 parameters" in table
    png = tmp_path / "docs" / "plot.png"
    run(["report", str(path), "--plot", str(png), "--title", "toy"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "0.9600 ± 0.0141" in capsys.readouterr().out


def test_report_rejects_a_file_that_is_not_results(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a tnkd results file"):
        load_results(bad)
    assert bad.read_text() == '{"hello": 1}'
    with pytest.raises(FileNotFoundError, match="tnkd compare"):
        load_results(tmp_path / "none.json")


def test_a_quoted_pattern_merges_the_seeds_of_one_grid(tmp_path, capsys):
    labels, kl = ("labels only", "-", 0.0), ("KL", "kl", 0.9)
    _results(tmp_path / "ttn_s0.json", [(labels, 0, 0.90), (kl, 0, 0.95)])
    _results(tmp_path / "ttn_s1.json", [(labels, 1, 0.92), (kl, 1, 0.97)])
    run(["report", str(tmp_path / "ttn_*.json"), "--title", "MNIST"])
    out = capsys.readouterr().out
    # one table for both files: the same means and sds as one file holding both seeds
    assert "## MNIST ttn: teacher test accuracy 0.9900" in out
    assert "| labels only | - | - | 0 | 0.9100 ± 0.0141 |" in out
    assert "| KL | kl | 4 | 0.9 | 0.9600 ± 0.0141 |" in out
    assert "seeds [0, 1]" in out


def test_merging_refuses_results_of_different_teachers(tmp_path):
    labels = ("labels only", "-", 0.0)
    _results(tmp_path / "a_s0.json", [(labels, 0, 0.90)])
    other = _results(tmp_path / "a_s1.json", [(labels, 1, 0.92)])
    other.write_text(other.read_text().replace('"test_acc": 0.99', '"test_acc": 0.98'))
    with pytest.raises(ValueError, match="another teacher"):
        markdown(tmp_path / "a_*.json")
    with pytest.raises(FileNotFoundError, match="no results files match"):
        markdown(tmp_path / "zzz_*.json")


def test_report_names_an_ensembles_members(tmp_path):
    path = _results(
        tmp_path / "ens.json",
        [(("labels only", "-", 0.0), 0, 0.9)],
        teacher="tnkd.teachers.TeacherEnsemble[tnkd.teachers.CNN, tnkd.teachers.MLP]",
    )
    assert "(10,000 parameters, TeacherEnsemble[CNN, MLP])" in markdown(path, "toy")


def test_report_into_a_closed_pipe_exits_quietly(tmp_path):
    """``tnkd report ... | head -n 0``: no "Broken pipe" error, the status a pipeline reports."""
    import signal
    import subprocess
    import sys

    labels = ("labels only", "-", 0.0)
    path = _results(tmp_path / "r.json", [(labels, 0, 0.9), (labels, 1, 0.92)])
    child = subprocess.Popen(
        [sys.executable, "-m", "tnkd.cli", "report", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    child.stdout.close()  # the reader is gone before the report is written (imports take seconds)
    err = child.stderr.read()
    assert child.wait(timeout=120) == 128 + signal.SIGPIPE
    assert err == ""


def test_paired_differences_with_a_t_interval():
    from tnkd.experiments.compare import RunResult
    from tnkd.experiments.report import paired_differences

    def run(name, seed, acc, status="finished"):
        return RunResult(name, seed, "kl", 4.0, 0.9, acc, 0.9, 0.01, 100, 10.0, 1.0, status=status)

    base = [0.90, 0.91, 0.92]
    runs = [run("labels", s, a) for s, a in enumerate(base)]
    # differences 1, 2, 3 points: mean 2, sd 1, t(0.975, 2) = 4.3027: 2 +- 2.484 holds 0
    runs += [
        run("noisy", s, a + d / 100) for s, (a, d) in enumerate(zip(base, (1, 2, 3), strict=True))
    ]
    # differences 2, 2.1, 1.9 points: 2 +- 0.248, above 0
    runs += [
        run("better", s, a + d / 100)
        for s, (a, d) in enumerate(zip(base, (2, 2.1, 1.9), strict=True))
    ]
    runs.append(run("better", 3, float("nan"), status="failed"))  # left out, not a NaN
    table = paired_differences(runs, "labels")
    assert "| noisy | 3 | +2.00 | 1.00 | [-0.48, +4.48] | no measurable difference |" in table
    assert "| better | 3 | +2.00 | 0.10 | [+1.75, +2.25] | higher |" in table
    with pytest.raises(ValueError, match="not a variant"):
        paired_differences(runs, "nothing")
