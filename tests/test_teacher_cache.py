import lightning as L
import pytest
import torch

import tnkd.training.teacher_cache as tc
from tnkd.data import DigitsDataModule
from tnkd.students import MPSClassifier
from tnkd.teachers import CNN, MLP
from tnkd.training.modules import DistillationModule


def test_computed_once_then_loaded(tmp_path, monkeypatch):
    torch.manual_seed(0)
    teacher = MLP(16, 3, hidden=(8,))
    x = torch.rand(50, 16)
    first = tc.cached_teacher_logits(teacher, x, tmp_path)
    assert torch.allclose(first, teacher.eval()(x))
    assert len(list(tmp_path.glob("teacher-logits-*.pt"))) == 1

    def boom(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(tc, "compute_logits", boom)
    assert torch.equal(tc.cached_teacher_logits(teacher, x, tmp_path), first)


def test_teachers_with_scalar_buffers(tmp_path):
    # BatchNorm keeps a 0-dim num_batches_tracked buffer
    teacher = CNN((1, 8, 8), 10, channels=(4,), hidden=8)
    x = torch.rand(6, 1, 8, 8)
    assert torch.allclose(tc.cached_teacher_logits(teacher, x, tmp_path), teacher.eval()(x))


def test_key_changes_with_teacher_and_data(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(20, 16)
    a, b = MLP(16, 3, hidden=(8,)), MLP(16, 3, hidden=(8,))
    tc.cached_teacher_logits(a, x, tmp_path)
    tc.cached_teacher_logits(b, x, tmp_path)
    tc.cached_teacher_logits(a, x[:10], tmp_path)
    assert len(list(tmp_path.glob("teacher-logits-*.pt"))) == 3


def test_corrupt_or_mismatched_cache_is_detected(tmp_path):
    teacher, x = MLP(16, 3, hidden=(8,)), torch.rand(20, 16)
    tc.cached_teacher_logits(teacher, x, tmp_path)
    path = next(tmp_path.glob("teacher-logits-*.pt"))
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="is corrupt"):
        tc.cached_teacher_logits(teacher, x, tmp_path)
    torch.save({"format": tc.CACHE_FORMAT, "key": "other", "logits": torch.zeros(20, 3)}, path)
    with pytest.raises(ValueError, match="does not match"):
        tc.cached_teacher_logits(teacher, x, tmp_path)


def test_distillation_uses_cached_logits(tmp_path):
    torch.manual_seed(0)
    teacher = MLP(64, 10, hidden=(16,))
    module = DistillationModule(
        MPSClassifier(64, 10, bond_dim=3), teacher=teacher, teacher_cache=str(tmp_path)
    )
    data = DigitsDataModule(batch_size=32)
    L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=2,
        limit_val_batches=1,
    ).fit(module, datamodule=data)
    for split in ("train", "val"):
        x, _, logits = data.dataset(split).tensors
        assert torch.allclose(logits, teacher.eval()(x), atol=1e-6)
    assert len(list(tmp_path.glob("teacher-logits-*.pt"))) == 2


def test_cached_validation_logits_give_the_live_teachers_metrics(tmp_path):
    torch.manual_seed(0)
    teacher = MLP(64, 10, hidden=(16,))

    def validate(cache):
        torch.manual_seed(1)
        module = DistillationModule(
            MPSClassifier(64, 10, bond_dim=3), teacher=teacher, teacher_cache=cache
        )
        trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
        return trainer.validate(module, datamodule=DigitsDataModule(batch_size=32), verbose=False)

    live, cached = validate(None), validate(str(tmp_path))
    assert len(list(tmp_path.glob("teacher-logits-*.pt"))) == 1
    assert live[0].keys() == cached[0].keys()
    assert "val/teacher_acc" in live[0]
    for key, value in live[0].items():
        assert cached[0][key] == pytest.approx(value, abs=1e-6), key
