"""Epoch metrics from sums (tnkd.training.metrics) against torchmetrics and plain arithmetic."""

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from tnkd.training.metrics import (
    ECE_BINS,
    BatchMean,
    ClassifierStats,
    calibration_bins,
    calibration_error,
)


def test_calibration_sums_give_torchmetrics_calibration_error():
    torch.manual_seed(0)
    logits = 3 * torch.randn(2, 500, 10)
    labels = torch.randint(0, 10, (500,))
    labeled = torch.rand(500) < 0.7
    probs = logits.softmax(-1)
    conf, pred = probs.max(-1)
    correct = (pred == labels).float() * labeled
    bins = calibration_bins(conf[:, :250], correct[:, :250], labeled[:250].float())
    bins += calibration_bins(conf[:, 250:], correct[:, 250:], labeled[250:].float())
    for k in range(2):
        reference = MulticlassCalibrationError(10, n_bins=ECE_BINS)(
            probs[k][labeled], labels[labeled]
        )
        ece = calibration_error(bins[k], float(labeled.sum()))
        assert float(ece) == pytest.approx(float(reference), abs=1e-6)


def test_calibration_error_of_no_samples_is_zero():
    assert float(calibration_error(torch.zeros(ECE_BINS + 1, 3), 0.0)) == 0.0


@pytest.mark.parametrize("members", [1, 3])
def test_classifier_stats_equal_torchmetrics_over_batches_with_unlabeled_samples(members):
    torch.manual_seed(1)
    batches = [(4 * torch.randn(members, 64, 10), torch.randint(-1, 10, (64,))) for _ in range(5)]
    stats = ClassifierStats(10, members=members)
    for logits, labels in batches:
        stats.update(logits[0] if members == 1 else logits, labels)
    values = stats.compute()
    for k in range(members):
        acc = MulticlassAccuracy(10, average="micro")
        ece = MulticlassCalibrationError(10, n_bins=15)
        for logits, labels in batches:
            keep = labels >= 0
            acc.update(logits[k][keep], labels[keep])
            ece.update(logits[k][keep].softmax(-1), labels[keep])
        got_acc = values["acc"] if members == 1 else values["acc"][k]
        got_ece = values["ece"] if members == 1 else values["ece"][k]
        assert float(got_acc) == pytest.approx(float(acc.compute()), abs=1e-7)
        assert float(got_ece) == pytest.approx(float(ece.compute()), abs=1e-6)


def test_classifier_stats_refuse_logits_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"expected logits of shape \(2, batch, 10\)"):
        ClassifierStats(10, members=2).update(torch.zeros(4, 10), torch.zeros(4, dtype=torch.long))


def test_batch_mean_weighs_batches_by_their_size_and_resets():
    mean = BatchMean()
    values = [(0.5, 100), (2.0, 28), (1.0, 100)]
    for value, n in values:
        mean.update(torch.tensor(value), n)
    expected = sum(v * n for v, n in values) / sum(n for _, n in values)
    assert float(mean.compute()) == pytest.approx(expected, rel=1e-7)
    mean.reset()
    mean.update(torch.tensor(3.0), 1)
    assert float(mean.compute()) == 3.0


def test_buffered_updates_fold_to_the_same_sums_as_one_by_one(monkeypatch):
    torch.manual_seed(2)
    batches = [(torch.randn(2, 37, 10), torch.randint(-1, 10, (37,))) for _ in range(9)]
    reference = [torch.randint(0, 10, (37,)) for _ in range(9)]
    results = []
    for fold_every in (1, 100, 10**9):
        monkeypatch.setattr(ClassifierStats, "fold_every", fold_every)
        stats = ClassifierStats(10, members=2)
        for (logits, labels), ref in zip(batches, reference, strict=True):
            stats.update(logits, labels, ref)
        results.append(stats.compute())
    for other in results[1:]:
        for key in ("acc", "ece", "agreement"):
            assert torch.allclose(other[key], results[0][key], atol=1e-7)
    agreement = torch.stack(
        [
            (logits.argmax(-1) == ref).float().sum(-1)
            for (logits, _), ref in zip(batches, reference, strict=True)
        ]
    ).sum(0) / (9 * 37)
    assert torch.allclose(results[0]["agreement"], agreement)


def test_batch_mean_of_several_values_with_their_own_weights_and_pending_reset():
    mean = BatchMean(3)
    mean.update((torch.tensor(1.0), torch.tensor(2.0), torch.tensor(0.0)), (10, torch.tensor(4), 0))
    mean.update(torch.tensor([3.0, 4.0, 0.0]), 10)
    assert mean.compute().tolist() == pytest.approx([2.0, (8 + 40) / 14, 0.0])
    mean.reset()
    mean.update(torch.tensor([5.0, 5.0, 5.0]), 2)
    assert mean.compute().tolist() == [5.0, 5.0, 5.0]


def test_add_is_update_without_the_wrapper():
    a, b = ClassifierStats(10, members=2), ClassifierStats(10, members=2)
    torch.manual_seed(3)
    for _ in range(3):
        z, y = torch.randn(2, 20, 10), torch.randint(0, 10, (20,))
        a.update(z, y, 1)
        b.add([z[0], z[1]], y, 1)
        assert a.compute()["agreement"].tolist() == b.compute()["agreement"].tolist()  # no stale cache
    assert a.update_count == b.update_count == 3
    for key in ("acc", "ece"):
        assert torch.equal(a.compute()[key], b.compute()[key])
