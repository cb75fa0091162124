import lightning as L
import pytest
import torch
import torch.nn.functional as F

from tnkd.data import DigitsDataModule
from tnkd.students import MPSClassifier
from tnkd.teachers import MLP, save_teacher
from tnkd.training.modules import DistillationModule, TeacherModule


def manual_kl(teacher_logits, student_logits, t):
    p = torch.softmax(teacher_logits.double() / t, -1)
    q = torch.softmax(student_logits.double() / t, -1)
    return (p * (p.log() - q.log())).sum(-1).mean()


def make_module(**kwargs):
    torch.manual_seed(0)
    return DistillationModule(
        MPSClassifier(64, 10, bond_dim=4), teacher=MLP(64, 10, hidden=(16,)), **kwargs
    )


def test_loss_is_weighted_ce_plus_scaled_divergence():
    module = make_module(temperature=3.0, beta=0.7)
    z, v = torch.randn(6, 10), torch.randn(6, 10) * 3
    y = torch.randint(0, 10, (6,))
    terms = module.loss_terms(z, v, y)
    ce = F.cross_entropy(z.double(), y)
    kd = manual_kl(v, z, 3.0)
    assert torch.allclose(terms["ce"].double(), ce, rtol=1e-5)
    assert torch.allclose(terms["kd"].double(), kd, rtol=1e-4)
    assert torch.allclose(terms["loss"].double(), 0.3 * ce + 0.7 * 9.0 * kd, rtol=1e-4)


def test_beta_zero_is_plain_cross_entropy_without_teacher():
    module = DistillationModule(MPSClassifier(64, 10, bond_dim=4), beta=0.0)
    z, y = torch.randn(4, 10), torch.randint(0, 10, (4,))
    terms = module.loss_terms(z, None, y)
    assert set(terms) == {"ce", "loss"}
    assert torch.equal(terms["loss"], F.cross_entropy(z, y))


def test_renyi_scale_is_t_squared_over_alpha():
    module = make_module(divergence={"name": "renyi", "alpha": 2.0}, temperature=4.0)
    assert module.divergence.scale(4.0) == pytest.approx(8.0)
    assert make_module(divergence="kl").divergence.scale(4.0) == pytest.approx(16.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 1.5}, r"beta must be in \[0, 1\], but got 1.5"),
        ({"beta": -0.1}, r"beta must be in \[0, 1\], but got -0.1"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0, but got 0.0"),
        ({"temperature": -2}, "temperature must be a finite number > 0, but got -2"),
        ({"temperature": float("inf")}, "temperature must be a finite number > 0, but got inf"),
        ({"lr": 0}, "lr must be a finite number > 0"),
        ({"scheduler": "step"}, "scheduler must be one of"),
        ({"divergence": "kl-div"}, "unknown divergence 'kl-div'; expected one of"),
    ],
)
def test_bad_settings_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_module(**kwargs)


def test_teacher_needed_for_distillation_and_class_counts_must_match():
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillationModule(MPSClassifier(64, 10, bond_dim=2), beta=0.5)
    with pytest.raises(ValueError, match="the teacher has 5 classes but the student has 10"):
        DistillationModule(MPSClassifier(64, 10, bond_dim=2), teacher=MLP(64, 5, hidden=(8,)))


def test_teacher_frozen_and_always_in_eval_mode(tmp_path):
    teacher = MLP(64, 10, hidden=(16,), dropout=0.5)
    path = save_teacher(teacher, tmp_path / "t.pt")
    module = DistillationModule(MPSClassifier(64, 10, bond_dim=4), teacher_checkpoint=str(path))
    module.train()
    assert module.student.training and not module.teacher.training
    assert not any(p.requires_grad for p in module.teacher.parameters())
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    with torch.no_grad():
        v = module.teacher(x)
    module.loss_terms(module.student(x), v, y)["loss"].backward()
    assert module.student.cores.grad is not None
    assert all(p.grad is None for p in module.teacher.parameters())
    assert torch.equal(module.teacher(x), v)  # dropout off: deterministic


def _fit(module, datamodule=None, **trainer_kwargs):
    settings = {"limit_train_batches": 2, "limit_val_batches": 1} | trainer_kwargs
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **settings,
    )
    trainer.fit(module, datamodule=datamodule or DigitsDataModule(batch_size=32))
    return trainer


def test_input_size_mismatch_with_data_is_caught_before_training():
    module = DistillationModule(MPSClassifier(784, 10, bond_dim=2), beta=0.0)
    with pytest.raises(
        ValueError,
        match=r"student expects 784 inputs per sample but the data \(DigitsDataModule\) has 64",
    ):
        _fit(module)


def test_class_count_mismatch_with_data_is_caught():
    module = DistillationModule(MPSClassifier(64, 3, bond_dim=2), beta=0.0)
    with pytest.raises(
        ValueError, match=r"the student has 3 classes but the data \(DigitsDataModule\) has 10"
    ):
        _fit(module)


def test_teacher_module_exports_and_never_overwrites(tmp_path):
    path = tmp_path / "teacher.pt"
    module = TeacherModule(MLP(64, 10, hidden=(16,)), export_path=str(path))
    trainer = _fit(module)
    assert path.exists()
    assert "val/teacher_acc" in trainer.callback_metrics
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        _fit(TeacherModule(MLP(64, 10, hidden=(16,)), export_path=str(path)))
    assert path.read_bytes() == before


def test_distillation_logs_loss_terms_agreement_and_sizes():
    module = make_module()
    trainer = _fit(module)
    keys = set(trainer.callback_metrics)
    assert {
        "train/ce",
        "train/kd",
        "train/loss",
        "val/student_acc",
        "val/teacher_acc",
        "val/agreement",
        "val/student_ece",
    } <= keys
    sizes = module.size_summary()
    assert sizes["compression_ratio"] == pytest.approx(
        sizes["teacher_params"] / sizes["student_params"]
    )


class _RecordModes(L.Callback):
    def __init__(self):
        self.student, self.teacher = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        net = module.student if isinstance(module, DistillationModule) else module.net
        self.student.append(all(m.training for m in net.modules()))
        if isinstance(module, DistillationModule):
            self.teacher.append(any(m.training for m in module.teacher.modules()))


def test_models_built_in_eval_mode_still_train_in_train_mode():
    # Lightning keeps each module's mode: a student copied from an eval-mode teacher (as TT-SVD
    # students are) must still train with dropout on, while the teacher stays frozen in eval mode
    teacher = MLP(64, 10, hidden=(16,), dropout=0.5).eval()
    student = MLP(64, 10, hidden=(8,), dropout=0.5).eval()
    modes = _RecordModes()
    _fit(DistillationModule(student, teacher=teacher, beta=0.5), callbacks=[modes])
    assert modes.student and all(modes.student)
    assert modes.teacher and not any(modes.teacher)
    net = MLP(64, 10, hidden=(8,), dropout=0.5).eval()
    modes = _RecordModes()
    _fit(TeacherModule(net), callbacks=[modes])
    assert modes.student and all(modes.student)


class _KeepLosses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append((float(outputs["loss"]), len(batch[1])))


def test_logged_epoch_values_equal_torchmetrics_and_the_per_batch_losses():
    from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

    module = make_module(temperature=2.0, beta=0.6)
    keep = _KeepLosses()
    dm = DigitsDataModule(batch_size=50)
    trainer = _fit(module, dm, limit_train_batches=None, limit_val_batches=None, callbacks=[keep])
    weighted = sum(v * n for v, n in keep.losses) / sum(n for _, n in keep.losses)
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(weighted, rel=1e-5)
    assert len(keep.losses) > 1 and keep.losses[-1][1] < 50  # a short last batch is weighed in
    # validation values against torchmetrics on the same batches, computed here
    metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
    acc, ece = MulticlassAccuracy(10, average="micro"), MulticlassCalibrationError(10, n_bins=15)
    t_acc, agree = MulticlassAccuracy(10, average="micro"), MulticlassAccuracy(10, average="micro")
    module.eval()
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            z, v = module.student(x), module.teacher(x)
            acc.update(z, y)
            ece.update(z.softmax(-1), y)
            t_acc.update(v, y)
            agree.update(z, v.argmax(-1))
    assert metrics["val/student_acc"] == pytest.approx(float(acc.compute()), abs=1e-6)
    assert metrics["val/student_ece"] == pytest.approx(float(ece.compute()), abs=1e-5)
    assert metrics["val/teacher_acc"] == pytest.approx(float(t_acc.compute()), abs=1e-6)
    assert metrics["val/agreement"] == pytest.approx(float(agree.compute()), abs=1e-6)
