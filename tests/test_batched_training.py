"""tnkd.training.batched: M distillation runs as one model equal M separate runs.

Independent truth: each member is also trained as its own ``DistillationModule`` run (the
ordinary path, tested elsewhere) from the same seed and data; in float64 over a few steps the
batched members' parameters and logged metrics equal the separate runs'. (Over many float32
epochs the two drift apart by rounding: early training is chaotic, a 1e-15 difference grew to
1e-6 in 21 Adam steps on digits, measured; so long runs agree in accuracy, not bitwise.)
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from tnkd.data import DigitsDataModule
from tnkd.students import MPSClassifier
from tnkd.teachers import MLP
from tnkd.training.batched import BatchedDistillation
from tnkd.training.modules import DistillationModule

RUNS = [
    (0, {"beta": 0.0}),
    (1, {"divergence": "kl"}),
    (0, {"divergence": {"name": "renyi", "alpha": 0.5}, "temperature": 2.0, "beta": 0.5}),
    (2, {"divergence": {"name": "dkd", "target_weight": 1.0, "nontarget_weight": 2.0}}),
]


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(5)
    return MLP(64, 10, hidden=[16]).eval()


def _member(teacher, seed, kwargs, **extra):
    L.seed_everything(seed, verbose=False)  # as compare builds a run: seed, then the student
    student = MPSClassifier(64, 10, bond_dim=4).double()
    return DistillationModule(student, teacher=teacher, **{"lr": 1e-2, **kwargs, **extra})


def _trainer():
    return L.Trainer(
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_members_follow_their_separate_runs(teacher):
    data = DigitsDataModule(batch_size=32)
    separate, logged = [], []
    for seed, kwargs in RUNS:
        module = _member(teacher, seed, kwargs)
        trainer = _trainer()
        trainer.fit(module, datamodule=data)
        separate.append(module)
        logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})
    model = BatchedDistillation([_member(teacher, s, kw) for s, kw in RUNS])
    _trainer().fit(model, datamodule=data)
    (epoch, values) = model.history["val"][-1]
    assert epoch == 1 and len(values) == len(RUNS)
    for k, module in enumerate(separate):
        trained = model.student.member(k)
        for (name, p), q in zip(
            trained.named_parameters(), module.student.parameters(), strict=True
        ):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11, msg=name)
        # the validation means a separate run logs, member by member (torchmetrics in float32)
        for key, value in values[k].items():
            assert key in logged[k], key
            assert value == pytest.approx(logged[k][key], rel=1e-5, abs=1e-6), key
        assert set(values[k]) == {key for key in logged[k] if key.startswith("val/")}


def test_test_metrics_and_confusion_matrices_match_separate_tests(teacher):
    data = DigitsDataModule(batch_size=64)
    model = BatchedDistillation([_member(teacher, s, kw) for s, kw in RUNS[:2]])
    trainer = _trainer()
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, verbose=False)
    for k, row in enumerate(model.member_metrics("test")):
        alone = DistillationModule(model.student.member(k), teacher=teacher, **RUNS[k][1])
        (metrics,) = _trainer().test(alone, datamodule=data, verbose=False)
        for key in ("test/student_acc", "test/agreement", "test/student_ece", "test/teacher_acc"):
            assert row[key] == pytest.approx(metrics[key], abs=1e-6), key
        assert torch.equal(model.test_confusion[k].long(), alone.test_confusion.long())


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ({"lr": 3e-3}, "batched runs must share lr .* run 0 has 0.01 and run 1 0.003"),
        ({"weight_decay": 0.1}, "batched runs must share weight_decay"),
        ({"scheduler": "none"}, "batched runs must share scheduler"),
    ],
)
def test_runs_that_need_another_optimiser_are_refused_in_one_line(teacher, second, message):
    runs = [_member(teacher, 0, {}), _member(teacher, 1, {}, **second)]
    with pytest.raises(ValueError, match=message) as err:
        BatchedDistillation(runs)
    assert "\n" not in str(err.value)


def test_runs_of_different_student_shapes_are_refused_in_one_line(teacher):
    wide = DistillationModule(MPSClassifier(64, 10, bond_dim=5), teacher=teacher, lr=1e-2)
    with pytest.raises(ValueError, match=r"same student arguments.*bond_dim: 4 vs 5") as err:
        BatchedDistillation([_member(teacher, 0, {}), wide])
    assert "\n" not in str(err.value)


def test_a_transfer_set_cannot_mix_labels_only_and_distilled_runs(teacher):
    data = DigitsDataModule(batch_size=64, labeled_per_class=5)
    model = BatchedDistillation([_member(teacher, 0, {"beta": 0.0}), _member(teacher, 0, {})])
    with pytest.raises(ValueError, match="cannot mix labels-only runs"):
        _trainer().fit(model, datamodule=data)


def test_loss_terms_equal_each_runs_own_with_ensembles_and_unlabeled_samples():
    torch.manual_seed(1)
    ensemble = [MLP(64, 10, hidden=[8]).eval(), MLP(64, 10, hidden=[8]).eval()]
    runs = [
        ({"beta": 0.0}, 4.0),
        ({"divergence": "kl"}, 4.0),
        ({"divergence": {"name": "renyi", "alpha": 2.0}}, 4.0),
        ({"divergence": "js", "beta": 0.3}, 2.0),  # the ensemble at another temperature
        ({"divergence": {"name": "dkd"}}, 4.0),
    ]
    members = [
        DistillationModule(MPSClassifier(64, 10, bond_dim=3), teacher=ensemble, temperature=t, **kw)
        for kw, t in runs
    ]
    model = BatchedDistillation(members)
    assert len(model.teachers) == 2  # one ensemble per temperature, shared by its runs
    x = torch.rand(12, 64)
    y = torch.tensor([3, -1, 0, 9, -1, -1, 2, 5, 1, -1, 7, 4])  # -1: unlabeled (transfer set)
    z = torch.randn(len(runs), 12, 10, dtype=torch.float64, requires_grad=True)
    teachers = model.teacher_logits(x, [], "train")
    terms = model.loss_terms(z, teachers, y)
    grads = torch.autograd.grad(terms["loss"].sum(), z)[0]
    for k, member in enumerate(members):
        zk = z[k].detach().requires_grad_(True)
        v = member.teacher(x).float() if member.beta > 0 else None
        own = member.loss_terms(zk, v, y)
        assert float(terms["loss"][k].detach()) == pytest.approx(
            float(own["loss"].detach()), rel=1e-12
        )
        assert float(terms["ce"][k].detach()) == pytest.approx(float(own["ce"].detach()), rel=1e-12)
        if "kd" in own:
            assert float(terms["kd"][k]) == pytest.approx(float(own["kd"]), rel=1e-12)
        (own_grad,) = torch.autograd.grad(own["loss"], zk)
        torch.testing.assert_close(grads[k], own_grad, rtol=1e-10, atol=1e-14)
