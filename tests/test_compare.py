"""tnkd.experiments.compare.compare: the side-by-side runner (the CLI wrapper is tested in test_cli)."""

from __future__ import annotations

import re
from functools import partial

from tnkd.data import DigitsDataModule
from tnkd.experiments.compare import Variant, compare
from tnkd.students import MPSClassifier
from tnkd.teachers import MLP

TEACHER = partial(MLP, 64, 10, hidden=[32])


def _compare(tmp_path, teacher=TEACHER, **kwargs):
    return compare(
        DigitsDataModule(batch_size=64),
        student=partial(MPSClassifier, 64, 10, bond_dim=3),
        teacher=teacher,
        teacher_checkpoint=kwargs.pop("teacher_checkpoint", str(tmp_path / "teacher.pt")),
        teacher_epochs=2,
        variants=kwargs.pop(
            "variants", [Variant("labels only", beta=0.0), Variant("KL", divergence="kl")]
        ),
        lr=3e-3,
        logger="none",
        trainer={"enable_progress_bar": False, "enable_model_summary": False},
        **{"epochs": 1, **kwargs},
    )


def test_teacher_cache_gives_the_same_runs_as_the_live_teacher(tmp_path):
    cache = tmp_path / "cache"
    cached = _compare(tmp_path, teacher_cache=str(cache), scheduler="none")
    cached_again = _compare(tmp_path, teacher_cache=str(cache), scheduler="none")
    # One cache file per split (train, val, test): the teacher and inputs did not change, so
    # the second call reused them.
    assert len(list(cache.iterdir())) == 3
    # The seed fixes initialisation and batch order, so cached and live teachers agree exactly.
    assert [r.student_acc for r in cached] == [r.student_acc for r in cached_again]
    live_const = _compare(tmp_path, scheduler="none")
    assert [r.student_acc for r in cached] == [r.student_acc for r in live_const]
    assert [r.name for r in cached] == ["labels only", "KL"]


def test_progress_prints_one_line_per_epoch_of_each_run(tmp_path, capsys):
    results = _compare(tmp_path, progress=True, epochs=2)
    out = capsys.readouterr().out.splitlines()
    # the teacher, trained on first use, always shows its epochs and the time left
    teacher = [ln for ln in out if ln.startswith("[teacher] epoch ")]
    assert [ln.split(":")[0] for ln in teacher] == ["[teacher] epoch 1/2", "[teacher] epoch 2/2"]
    assert all(re.search(r"about \d+ (s|min) left\)$", ln) for ln in teacher), teacher
    assert [ln for ln in out if ln.startswith("tnkd compare: run ")] == [
        "tnkd compare: run 1/2: labels only seed 0",
        "tnkd compare: run 2/2: KL seed 0",
    ]
    lines = [ln for ln in out if " epoch " in ln and not ln.startswith("[teacher]")]
    assert [ln.split(":")[0] for ln in lines] == [
        "[labels only seed 0] epoch 1/2",
        "[labels only seed 0] epoch 2/2",
        "[KL seed 0] epoch 1/2",
        "[KL seed 0] epoch 2/2",
    ]
    assert all("train/loss" in ln and "val/student_acc" in ln for ln in lines)
    # the printed last validation accuracy is a real one, in [0, 1]
    accs = [float(re.search(r"val/student_acc ([0-9.]+)", ln).group(1)) for ln in lines]
    assert all(0.0 <= a <= 1.0 for a in accs)
    assert len(results) == 2


def test_progress_is_off_by_default(tmp_path, capsys):
    _compare(tmp_path)
    out = capsys.readouterr().out.splitlines()
    assert not [ln for ln in out if " epoch " in ln and not ln.startswith("[teacher]")]
    assert "tnkd compare: run 2/2: KL seed 0" in out


def test_a_transfer_set_needs_an_existing_teacher_and_ensembles_run(tmp_path):
    import json

    import pytest
    import torch

    from tnkd.teachers import save_teacher

    with pytest.raises(FileNotFoundError, match="a transfer set's teacher must exist"):
        compare(
            DigitsDataModule(labeled_per_class=3),
            student=partial(MPSClassifier, 64, 10, bond_dim=3),
            teacher=partial(MLP, 64, 10, hidden=[32]),
            teacher_checkpoint=str(tmp_path / "missing.pt"),
            logger="none",
        )
    with pytest.raises(FileNotFoundError, match=r"a\.pt, .*b\.pt do not exist\): train them"):
        compare(
            DigitsDataModule(),
            student=partial(MPSClassifier, 64, 10, bond_dim=3),
            teacher=partial(MLP, 64, 10, hidden=[32]),
            teacher_checkpoint=[str(tmp_path / "a.pt"), str(tmp_path / "b.pt")],
            logger="none",
        )
    torch.manual_seed(0)
    files = [str(save_teacher(MLP(64, 10, hidden=[8]), tmp_path / f"t{i}.pt")) for i in range(2)]
    (run,) = _compare(
        tmp_path,
        teacher=partial(MLP, 64, 10, hidden=[8]),
        teacher_checkpoint=files,
        variants=[Variant("KL", divergence="kl", temperature=2.0)],
        results=str(tmp_path / "r.json"),
    )
    payload = json.loads((tmp_path / "r.json").read_text())
    assert payload["teacher"]["class_path"].startswith("tnkd.teachers.TeacherEnsemble[")
    assert run.compression_ratio == pytest.approx(payload["teacher"]["params"] / run.student_params)


def test_evaluate_val_screens_on_the_validation_split_without_testing(
    tmp_path, capsys, monkeypatch
):
    import tnkd.experiments.compare as compare_module

    def no_test(*args, **kwargs):
        raise AssertionError("a student was tested")

    monkeypatch.setattr(compare_module, "test_metrics", no_test)
    (run,) = _compare(tmp_path, evaluate="val", variants=[Variant("KL", divergence="kl")])
    out = capsys.readouterr().out
    assert "VALIDATION split, teacher accuracy" in out and "| val acc |" in out
    assert 0.0 <= run.student_acc <= 1.0 and run.extra["split"] == "val"
