"""Batches cut a batch at a time (tnkd.data.loader.TensorBatches) and data kept on the device."""

from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader, default_collate

from tnkd.data import DigitsDataModule
from tnkd.data.loader import TensorBatches, collate_batch


def test_batches_equal_per_sample_indexing_and_stacking():
    gen = torch.Generator().manual_seed(0)
    x, y, v = torch.rand(53, 1, 4, 4, generator=gen), torch.arange(53), torch.randn(53, 3, 10)
    order = torch.randperm(53, generator=gen)[:40].repeat(2)
    for kwargs in ({}, {"order": order}, {"order": order, "with_position": True}):
        data = TensorBatches((x, y, v), **kwargs)
        fast = DataLoader(data, batch_size=16, collate_fn=collate_batch)
        slow = DataLoader(
            [data[j] for j in range(len(data))], batch_size=16, collate_fn=default_collate
        )
        pairs = list(zip(fast, slow, strict=True))
        assert len(pairs) == -(-len(data) // 16)
        for a, b in pairs:
            assert len(a) == len(b)
            for s, t in zip(a, b, strict=True):
                assert s.dtype == t.dtype and torch.equal(s, t)


def _on(device):
    strategy = SimpleNamespace(root_device=torch.device(device))
    return SimpleNamespace(world_size=1, strategy=strategy, training=False)


def test_splits_stay_on_an_accelerator_and_are_copied_once():
    dm = DigitsDataModule(batch_size=32)
    dm.setup()
    dm.trainer = _on("meta")  # a device without memory: shapes only, but a real .to()
    assert dm.resident_device() == torch.device("meta")
    x, y = next(iter(dm.val_dataloader()))
    assert x.device.type == "meta" and y.device.type == "meta" and x.shape[0] == 32
    kept = dm._resident["val"][1][0]
    next(iter(dm.val_dataloader()))
    assert dm._resident["val"][1][0] is kept  # not copied again
    dm.attach_teacher_logits("val", torch.zeros(len(dm.dataset("val")), 10))
    assert len(next(iter(dm.val_dataloader()))) == 3  # new tensors: copied anew


def test_data_stays_in_ram_on_cpu_with_workers_or_several_processes():
    dm = DigitsDataModule(batch_size=32)
    dm.setup()
    assert dm.resident_device() is None  # no trainer
    dm.trainer = _on("cpu")
    assert dm.resident_device() is None
    dm.trainer = SimpleNamespace(world_size=2, strategy=_on("meta").strategy)
    assert dm.resident_device() is None
    dm.trainer, dm.num_workers = _on("meta"), 2
    assert dm.resident_device() is None

