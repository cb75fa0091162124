"""Transfer sets: the stratified labeled subset, unlabeled samples in the loss, consistent views."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from tnkd.data import DigitsDataModule
from tnkd.data.augment import affine_augment
from tnkd.data.transfer import UNLABELED, stratified_subset
from tnkd.divergences import kl_divergence
from tnkd.students import MPSClassifier
from tnkd.teachers import CNN, MLP
from tnkd.training.modules import DistillationModule, TeacherModule


def test_stratified_subset_is_seeded_and_balanced():
    labels = torch.arange(10).repeat_interleave(30)[torch.randperm(300)]
    a = stratified_subset(labels, 6, seed=3)
    assert torch.equal(a, stratified_subset(labels, 6, seed=3))
    assert not torch.equal(a, stratified_subset(labels, 6, seed=4))
    assert torch.equal(labels[a].bincount(), torch.full((10,), 6))
    assert len(a.unique()) == 60
    with pytest.raises(ValueError, match="labeled_per_class is 31 but class 0 has only 30"):
        stratified_subset(labels, 31, seed=0)


def test_transfer_split_keeps_labels_of_the_subset_only():
    full = DigitsDataModule()
    dm = DigitsDataModule(labeled_per_class=5)
    x_full, y_full = full.dataset("train").tensors
    x, y = dm.dataset("train").tensors
    assert torch.equal(x, x_full)  # same images, same validation split
    labeled = y != UNLABELED
    assert int(labeled.sum()) == 50 and torch.equal(y[labeled], y_full[labeled])
    assert torch.equal(y[labeled].bincount(), torch.full((10,), 5))
    assert torch.equal(dm.dataset("val").tensors[1], full.dataset("val").tensors[1])


def test_extra_unlabeled_images_are_appended(tmp_path):
    extra = torch.randint(0, 256, (7, 1, 8, 8), dtype=torch.uint8)
    torch.save(extra, tmp_path / "extra.pt")
    dm = DigitsDataModule(extra_unlabeled=str(tmp_path / "extra.pt"))
    x, y = dm.dataset("train").tensors
    assert torch.equal(x[-7:], extra.float() / 255) and (y[-7:] == UNLABELED).all()
    assert (y[:-7] >= 0).all()
    torch.save(torch.rand(3, 1, 9, 9), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"expected an image tensor of shape \(n, 1, 8, 8\)"):
        DigitsDataModule(extra_unlabeled=str(tmp_path / "bad.pt")).setup()
    with pytest.raises(
        FileNotFoundError, match=r"extra_unlabeled file .*missing\.pt does not exist"
    ):
        DigitsDataModule(extra_unlabeled=str(tmp_path / "missing.pt")).setup()
    with pytest.raises(ValueError, match="labeled_per_class must be a positive integer or null"):
        DigitsDataModule(labeled_per_class=0)


def test_labels_only_runs_go_over_the_labeled_images_as_often_as_a_full_epoch():
    dm = DigitsDataModule(labeled_per_class=5)
    n = len(dm.dataset("train"))
    y = dm.dataset("train").tensors[1]
    assert dm.train_order() is None  # by default the whole transfer set
    dm.use_unlabeled(False)
    order = dm.train_order()
    assert (y[order] >= 0).all() and len(order) == 50 * round(n / 50)
    assert torch.equal(order.unique(), torch.nonzero(y >= 0).squeeze(1))
    batches = list(dm.train_dataloader())
    assert sum(len(b[1]) for b in batches) == len(order) and all((b[1] >= 0).all() for b in batches)


def test_loss_takes_ce_over_labeled_and_the_divergence_over_all_samples():
    torch.manual_seed(0)
    module = DistillationModule(
        MPSClassifier(64, 10, bond_dim=2),
        teacher=MLP(64, 10, hidden=(8,)),
        beta=0.7,
        temperature=2.0,
    )
    z, v = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64) * 3
    y = torch.tensor([3, -1, -1, 7, -1, 0])
    terms = module.loss_terms(z, v, y)
    ce = F.cross_entropy(z[[0, 3, 5]], y[[0, 3, 5]])
    kd = kl_divergence(v, z, 2.0)  # the mean over all six samples
    assert torch.allclose(terms["ce"], ce) and torch.allclose(terms["kd"], kd)
    assert torch.allclose(terms["loss"], 0.3 * ce + 0.7 * 4.0 * kd)
    unlabeled = module.loss_terms(z, v, torch.full((6,), -1))
    assert unlabeled["ce"].item() == 0.0
    assert torch.allclose(unlabeled["loss"], 0.7 * 4.0 * kd)


def _fit(module, dm, callbacks=(), **kwargs):
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        **kwargs,
    )
    trainer.fit(module, datamodule=dm)
    return trainer


class _Spy(L.Callback):
    """The inputs, labels and (cached) teacher logits of every training step."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batches.append([t.clone() for t in batch])


def _teacher():
    torch.manual_seed(1)
    return CNN((1, 8, 8), 10, channels=(4,), hidden=8).eval()


def test_cached_views_give_the_teacher_logits_of_the_view_the_student_sees(tmp_path):
    dm = DigitsDataModule(batch_size=128, augment={"shift": 1, "rotate": 10, "views": 3})
    module = DistillationModule(
        MPSClassifier(64, 10, bond_dim=2), teacher=_teacher(), teacher_cache=str(tmp_path)
    )
    spy = _Spy()
    _fit(module, dm, [spy], limit_train_batches=3, limit_val_batches=1)
    assert dm.dataset("train").tensors[2].shape == (len(dm.dataset("train")), 3, 10)
    assert len(list(tmp_path.glob("*.pt"))) == 4  # 3 views of the training set, validation
    for x, _, logits in spy.batches:
        with torch.no_grad():
            assert torch.allclose(module.teacher(x), logits, atol=1e-4)
    # about a third of the samples show view 0 (the image itself), the others a shifted view
    x = torch.cat([b[0] for b in spy.batches]).flatten(1)
    raw = dm.dataset("train").tensors[0].flatten(1)
    unchanged = (torch.cdist(x, raw).min(dim=1).values < 1e-4).float().mean().item()
    assert 0.15 < unchanged < 0.55


def test_fresh_views_run_the_teacher_on_the_augmented_batch(tmp_path):
    dm = DigitsDataModule(batch_size=128, augment={"shift": 1, "rotate": 10})
    teacher = _teacher()
    seen = []
    teacher.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    module = DistillationModule(
        MPSClassifier(64, 10, bond_dim=2), teacher=teacher, teacher_cache=str(tmp_path)
    )
    spy = _Spy()
    _fit(module, dm, [spy], limit_train_batches=2, limit_val_batches=0)
    assert len(spy.batches[0]) == 2  # no cached training logits: fresh views are never reused
    teacher_inputs = [s for s in seen if len(s) == 128][-2:]
    assert all(torch.equal(a, b[0]) for a, b in zip(teacher_inputs, spy.batches, strict=True))
    raw = dm.dataset("train").tensors[0]
    order = dm.train_dataloader().sampler.order(0)[:128]
    params = dm.augmentation.epoch_params(dm.seed, 0, len(raw))[order]
    assert torch.allclose(spy.batches[0][0], affine_augment(raw[order], params), atol=1e-6)


def test_labels_only_twin_and_teacher_train_on_the_labeled_images(tmp_path):
    dm = DigitsDataModule(batch_size=64, labeled_per_class=3)
    spy = _Spy()
    twin = DistillationModule(MPSClassifier(64, 10, bond_dim=2), teacher=_teacher(), beta=0.0)
    _fit(twin, dm, [spy], limit_train_batches=3, limit_val_batches=1)
    assert all((b[1] >= 0).all() for b in spy.batches)
    distilled = _Spy()
    _fit(
        DistillationModule(MPSClassifier(64, 10, bond_dim=2), teacher=_teacher()),
        dm,
        [distilled],
        limit_train_batches=3,
        limit_val_batches=1,
    )
    assert any((b[1] < 0).any() for b in distilled.batches)  # the unlabeled images are used
    spy = _Spy()
    _fit(
        TeacherModule(MLP(64, 10, hidden=(8,))),
        dm,
        [spy],
        limit_train_batches=2,
        limit_val_batches=1,
    )
    assert all((b[1] >= 0).all() for b in spy.batches)
