"""Augmentation: exact shifts and rotations, seeded draws, training batches only, exact resumes."""

import math

import lightning as L
import pytest
import torch

from tnkd.data import DigitsDataModule
from tnkd.data.augment import Augment, affine_augment
from tnkd.students import MPSClassifier
from tnkd.training.modules import DistillationModule


def _shifted(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Reference: content moved dx right, dy down, zeros coming in (by slicing)."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    src = x[..., max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
    out[..., max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)] = src
    return out


@pytest.mark.parametrize(("dx", "dy"), [(0, 0), (1, 0), (0, -2), (2, 1), (-3, 3)])
def test_integer_shifts_move_pixels_exactly(dx, dy):
    x = torch.rand(2, 3, 7, 9)
    params = torch.tensor([[dx, dy, 0.0]] * 2)
    assert torch.allclose(affine_augment(x, params), _shifted(x, dx, dy), atol=1e-5)


@pytest.mark.parametrize("size", [5, 6])
def test_quarter_turns_and_half_turns_are_exact(size):
    x = torch.rand(1, 1, size, size)
    quarter = affine_augment(x, torch.tensor([[0.0, 0.0, 90.0]]))
    assert torch.allclose(quarter, torch.rot90(x, -1, (2, 3)), atol=1e-5)  # clockwise
    y = torch.rand(1, 2, 4, 7)  # not square: a half turn flips both axes
    half = affine_augment(y, torch.tensor([[0.0, 0.0, 180.0]]))
    assert torch.allclose(half, y.flip(-1, -2), atol=1e-5)


def test_small_rotation_turns_about_the_centre_per_sample():
    x = torch.zeros(2, 1, 9, 9)
    x[:, :, 4, 8] = 1.0  # 4 pixels right of the centre
    out = affine_augment(x, torch.tensor([[0.0, 0.0, 10.0], [0.0, 0.0, 0.0]]))
    rows, cols = torch.meshgrid(torch.arange(9.0), torch.arange(9.0), indexing="ij")
    mass = out[0, 0] / out[0, 0].sum()
    angle = math.radians(10)  # clockwise on screen (rows grow downwards)
    assert (mass * rows).sum().item() == pytest.approx(4 + 4 * math.sin(angle), abs=0.1)
    assert (mass * cols).sum().item() == pytest.approx(4 + 4 * math.cos(angle), abs=0.1)
    assert torch.allclose(out[1], x[1], atol=1e-6)  # the second image is not turned


def test_draws_are_seeded_in_range_and_change_with_the_epoch():
    aug = Augment(shift=2, rotate=10, views=4)
    a, b = aug.epoch_params(0, 3, 500), aug.epoch_params(0, 3, 500)
    assert torch.equal(a, b)
    assert not torch.equal(a, aug.epoch_params(0, 4, 500))
    assert not torch.equal(a, aug.epoch_params(1, 3, 500))
    shifts, angles = a[:, :2], a[:, 2]
    assert torch.equal(shifts, shifts.round()) and shifts.abs().max() == 2
    assert set(shifts.unique().tolist()) == {-2.0, -1.0, 0.0, 1.0, 2.0}
    assert angles.abs().max() <= 10 and angles.std() > 3
    views = aug.view_params(0, 50)
    assert views.shape == (4, 50, 3) and torch.equal(views[0], torch.zeros(50, 3))
    choice = aug.view_choice(0, 0, 1000)
    assert set(choice.unique().tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"shift": -1}, "augment shift must be an integer >= 0"),
        ({"shift": 1.5}, "augment shift must be an integer >= 0"),
        ({"rotate": 200}, r"augment rotate must be a number of degrees in \[0, 180\]"),
        ({"views": -2}, "augment views must be an integer >= 0"),
        ({"shfit": 2}, r"unknown augment key\(s\) \['shfit'\]"),
        ("yes", "augment must be a mapping"),
    ],
)
def test_bad_augment_settings_raise_one_line_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(augment=spec)


class _Record(L.Callback):
    """What the student sees on every training step (after the data module's hooks)."""

    def __init__(self):
        self.train, self.val = {}, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        position = trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1
        self.train[(trainer.current_epoch, position)] = batch[0].clone()

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self.val.append(batch[0].clone())


def _module():
    torch.manual_seed(0)
    return DistillationModule(MPSClassifier(64, 10, bond_dim=2), beta=0.0, lr=1e-3)


def _trainer(tmp_path, epochs, callbacks, **kwargs):
    return L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        **kwargs,
    )


def test_only_training_batches_are_augmented():
    dm = DigitsDataModule(batch_size=64, augment={"shift": 1, "rotate": 10})
    rec = _Record()
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=3,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        callbacks=[rec],
    )
    trainer.fit(_module(), datamodule=dm)
    x_train = dm.dataset("train").tensors[0]
    order = trainer.train_dataloader.sampler.order(0)
    for (_, position), seen in rec.train.items():
        raw = x_train[order[position * 64 : (position + 1) * 64]]
        params = dm.augmentation.epoch_params(dm.seed, 0, len(x_train))[
            order[position * 64 : (position + 1) * 64]
        ]
        assert not torch.allclose(seen, raw)
        assert torch.allclose(seen, affine_augment(raw, params), atol=1e-6)
    x_val = dm.dataset("val").tensors[0]
    assert torch.equal(torch.cat(rec.val), x_val[: len(torch.cat(rec.val))])


class _SaveBefore(L.Callback):
    """Checkpoint the run before training step ``step`` (mid-epoch), as a preempted run would."""

    def __init__(self, step: int, path):
        self.step, self.path = step, path

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("views", [0, 3])
def test_a_run_resumed_mid_epoch_sees_the_same_views(tmp_path, views):
    aug = {"shift": 1, "rotate": 15, "views": views}
    full = _Record()
    ckpt = tmp_path / "step5.ckpt"  # 11 steps an epoch: step 5 is mid-epoch 0
    _trainer(tmp_path, 2, [full, _SaveBefore(5, ckpt)], enable_checkpointing=False).fit(
        _module(), datamodule=DigitsDataModule(batch_size=128, augment=aug)
    )
    rest = _Record()
    _trainer(tmp_path, 2, [rest], enable_checkpointing=False).fit(
        _module(), datamodule=DigitsDataModule(batch_size=128, augment=aug), ckpt_path=ckpt
    )
    assert min(rest.train) == (0, 5) and max(rest.train) == max(full.train) == (1, 10)
    assert set(rest.train) == {k for k in full.train if k >= (0, 5)}
    for key, seen in rest.train.items():
        assert torch.equal(seen, full.train[key]), key
