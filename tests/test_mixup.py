"""Mixup (tnkd.data.mixup) and its use by DistillationModule."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from tnkd.data import DigitsDataModule
from tnkd.data.mixup import mixup, mixup_draw
from tnkd.students import MPSClassifier
from tnkd.teachers import MLP
from tnkd.training.modules import DistillationModule


def test_draws_are_a_function_of_seed_and_step_and_beta_distributed():
    a, b = mixup_draw(64, 0.4, seed=3, step=7), mixup_draw(64, 0.4, seed=3, step=7)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert sorted(a[0].tolist()) == list(range(64))
    assert mixup_draw(64, 0.4, seed=3, step=8)[1] != a[1]
    lams = torch.tensor([mixup_draw(2, 0.4, seed=0, step=s)[1] for s in range(4000)])
    # Beta(0.4, 0.4): mean 1/2, variance ab / ((a + b)^2 (a + b + 1)) = 0.25 / 1.8
    assert float(lams.mean()) == pytest.approx(0.5, abs=0.02)
    assert float(lams.var()) == pytest.approx(0.25 / 1.8, rel=0.05)


def test_mixed_images_are_the_convex_combination():
    x = torch.rand(10, 1, 8, 8)
    mixed, perm, lam = mixup(x, 1.0, seed=0, step=5)
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm])


def _module(beta, mixup_alpha):
    torch.manual_seed(0)
    teacher = MLP(64, 10, hidden=(16,))
    return DistillationModule(
        MPSClassifier(64, 10, bond_dim=4), teacher=teacher, beta=beta, mixup=mixup_alpha
    )


def test_mixup_loss_mixes_the_labels_and_the_teacher_sees_the_mixed_images():
    module = _module(beta=0.5, mixup_alpha=0.3)
    module.mixup_seed = 11
    x, y = torch.rand(16, 64), torch.randint(0, 10, (16,))
    stale = torch.randn(16, 10)  # cached logits of unmixed images: must not be used
    captured = {}
    module._record = lambda stage, terms, models, labels, agreement=False: captured.update(
        terms=terms
    )
    loss = module._shared_step((x, y, stale), "train")
    mixed, perm, lam = mixup(x, 0.3, seed=11, step=0)
    with torch.no_grad():
        z, v = module.student(mixed), module.teacher(mixed)
    ce = lam * F.cross_entropy(z, y) + (1 - lam) * F.cross_entropy(z, y[perm])
    expected = 0.5 * ce + 0.5 * module.divergence.loss(v, z, module.temperature)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(captured["terms"]["ce"][0]) == pytest.approx(float(ce), rel=1e-5)


def test_validation_batches_are_not_mixed():
    module = _module(beta=0.0, mixup_alpha=1.0)
    x, y = torch.rand(8, 64), torch.randint(0, 10, (8,))
    module._record = lambda *args, **kwargs: None
    loss = module._shared_step((x, y), "val")
    assert float(loss) == pytest.approx(float(F.cross_entropy(module.student(x), y)), rel=1e-6)


def test_a_mixup_run_trains_and_is_reproducible():
    results = []
    for _ in range(2):
        L.seed_everything(0, verbose=False)
        module = _module(beta=0.9, mixup_alpha=0.2)
        trainer = L.Trainer(
            max_epochs=1,
            limit_train_batches=3,
            limit_val_batches=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
        results.append(torch.cat([p.detach().flatten() for p in module.student.parameters()]))
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("bad", [-0.1, True, "0.2", float("nan")])
def test_bad_mixup_is_refused_in_one_line(bad):
    with pytest.raises(ValueError, match=r"mixup must be a number >= 0 \(0: off\)"):
        _module(beta=0.0, mixup_alpha=bad)


def test_compare_refuses_batched_mixup_before_training(tmp_path):
    from tnkd.experiments.compare import compare

    with pytest.raises(ValueError, match="mixup runs cannot be batched yet"):
        compare(
            DigitsDataModule(),
            lambda: MPSClassifier(64, 10, bond_dim=4),
            lambda: MLP(64, 10),
            teacher_checkpoint=str(tmp_path / "t.pt"),
            batched=True,
            mixup=0.2,
            logger="none",
        )
    assert list(tmp_path.iterdir()) == []
