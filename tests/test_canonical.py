import math

import pytest
import torch
from tn_reference import dense_coefficients

from tnkd.students import MPSClassifier, PEPSClassifier, TreeClassifier, TruncatedMPS, TTNetwork
from tnkd.students.truncation import (
    bond_spectra,
    chain_bond_spectra,
    entanglement_entropies,
    truncate_student,
)
from tnkd.tn.canonical import (
    canonicalize,
    entanglement_entropy,
    left_canonicalize,
    network_of,
    right_canonicalize,
    truncate,
)
from tnkd.tn.decompositions import tt_to_full


def random_chain(n=6, bond=5, phys=2, label=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    dims = [1] + [min(bond, phys ** min(k, n - k)) for k in range(1, n)] + [1]
    cores = [
        torch.randn(dims[k], phys, dims[k + 1], generator=g, dtype=torch.float64)
        for k in range(n - 1)
    ]
    cores.append(torch.randn(dims[n - 1], label, 1, generator=g, dtype=torch.float64))
    indices = [(f"b{k}", f"s{k}", f"b{k + 1}") for k in range(n)]
    return cores, indices


def test_left_and_right_canonical_cores_are_orthonormal_and_the_chain_unchanged():
    cores, _ = random_chain()
    full = tt_to_full(cores)
    left, log_left = left_canonicalize(cores)
    for core in left[:-1]:
        m = core.reshape(-1, core.shape[-1])
        assert torch.allclose(m.T @ m, torch.eye(m.shape[1], dtype=m.dtype), atol=1e-12)
    right, log_right = right_canonicalize(cores)
    for core in right[1:]:
        m = core.reshape(core.shape[0], -1)
        assert torch.allclose(m @ m.T, torch.eye(m.shape[0], dtype=m.dtype), atol=1e-12)
    assert torch.allclose(tt_to_full(left) * math.exp(log_left), full, rtol=1e-10)
    assert torch.allclose(tt_to_full(right) * math.exp(log_right), full, rtol=1e-10)
    assert math.isclose(log_left, math.log(float(full.norm())), rel_tol=1e-12)


def test_canonical_tree_nodes_are_isometries_towards_the_root():
    tree = TreeClassifier((1, 4, 4), num_classes=3, bond_dim=4, init_std=0.7).double()
    tensors, indices, names = network_of(tree.to_graph())
    root = names.index("root")
    canon, _log_norm = canonicalize(tensors, indices, root)
    for name, t in zip(names, canon, strict=False):
        if name == "root":
            assert math.isclose(float(t.norm()), 1.0, rel_tol=1e-12)
            continue
        m = t.reshape(-1, t.shape[-1])  # tree nodes: (child, child, parent)
        assert torch.allclose(m.T @ m, torch.eye(m.shape[1], dtype=m.dtype), atol=1e-12)


@pytest.mark.parametrize("center", [0, 2, 5])
def test_truncation_is_exact_at_full_rank_and_within_the_discarded_bound(center):
    cores, indices = random_chain(n=6, bond=8)
    full = tt_to_full(cores)
    errors = []
    for rank in (8, 5, 3, 2, 1):
        cut = truncate(cores, indices, center, rank=rank)
        approx = tt_to_full(cut.tensors) * math.exp(cut.log_norm)
        error = float((full - approx).norm() / full.norm())
        assert cut.chain  # the chain's bound: sqrt of the summed discarded weights
        assert error <= cut.error_bound * (1 + 1e-9) + 1e-12
        assert all(r <= rank for r in cut.ranks.values())
        errors.append(error)
    assert errors[0] < 1e-12  # rank 8 is the chain's full rank: exact
    assert errors[1] < errors[2] < errors[3] < errors[4]  # the error grows as the rank drops


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tree_truncation_within_the_discarded_bound(seed):
    torch.manual_seed(seed)
    tree = TreeClassifier((8,), num_classes=3, bond_dim=8, init_std=0.8, output="raw").double()
    graph = tree.to_graph()
    full = dense_coefficients(graph)
    tensors, indices, names = network_of(graph)
    root = names.index("root")
    previous = 0.0
    for rank in (8, 3, 2, 1):
        cut = truncate(tensors, indices, root, rank=rank)
        for name, t in zip(names, cut.tensors, strict=False):
            graph.node(name).tensor = t
        approx = dense_coefficients(graph) * math.exp(cut.log_norm)
        error = float((full - approx).norm() / full.norm())
        assert not cut.chain  # a tree's bound: the sum of the discarded norms
        assert error <= cut.error_bound * (1 + 1e-9) + 1e-12
        assert error >= previous - 1e-12
        previous = error
    assert truncate(tensors, indices, root, rank=8).error_bound < 1e-12


def test_tolerance_cuts_each_bond_within_its_share():
    cores, indices = random_chain(n=8, bond=16)
    cut = truncate(cores, indices, 7, tolerance=0.1)
    for label, s in cut.spectra.items():
        assert cut.discarded[label] <= 0.01 * float((s**2).sum()) + 1e-15


def test_mps_classifier_truncated_at_full_rank_computes_the_same_function():
    torch.manual_seed(0)
    mps = MPSClassifier(8, 3, bond_dim=6, init_std=0.5, output="raw").double()
    x = torch.rand(5, 8, dtype=torch.float64)
    small, report = truncate_student(mps, bond_dim=6)
    assert type(small) is MPSClassifier and small.bond_dim == 6
    assert torch.allclose(small(x), mps(x), rtol=1e-9, atol=1e-12)
    assert report.error_bound < 1e-9


def test_mps_classifier_truncation_keeps_label_core_scale_and_error_bound():
    torch.manual_seed(1)
    mps = MPSClassifier(7, 3, bond_dim=8, init_std=0.6).double()
    with torch.no_grad():
        mps.log_logit_scale.fill_(1.7)
    small, report = truncate_student(mps, bond_dim=3)
    assert type(small) is MPSClassifier and small.bond_dim == 3
    assert small.parameter_count() < mps.parameter_count() == report.params_before
    assert small.label_position == mps.label_position
    assert float(small.log_logit_scale.detach()) == pytest.approx(1.7)
    full = dense_coefficients(mps.to_graph())
    approx = dense_coefficients(small.to_graph())
    error = float((full - approx).norm() / full.norm())
    assert 0 < error <= report.error_bound * (1 + 1e-9)


def test_tt_network_and_tree_truncate_exactly_at_full_rank():
    torch.manual_seed(2)
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    tt = TTNetwork((1, 8, 8), 10, patch_size=4, rank=5, init_std=0.4, output="raw").double()
    small, _ = truncate_student(tt, bond_dim=5)
    assert type(small) is TTNetwork and torch.allclose(small(x), tt(x), rtol=1e-9)
    tree = TreeClassifier((1, 8, 8), 10, bond_dim=6, init_std=0.4, output="raw").double()
    small, report = truncate_student(tree, bond_dim=6)
    assert type(small) is TreeClassifier and torch.allclose(small(x), tree(x), rtol=1e-9)
    smaller, report = truncate_student(tree, bond_dim=2)
    assert smaller.parameter_count() < tree.parameter_count() and report.error_bound > 0


def test_a_truncated_student_trains_on():
    torch.manual_seed(3)
    mps = MPSClassifier(16, 2, bond_dim=8, init_std=0.3)
    small, _ = truncate_student(mps, bond_dim=3)
    x = torch.rand(32, 16)
    y = (x[:, :8].mean(1) > x[:, 8:].mean(1)).long()
    opt = torch.optim.Adam(small.parameters(), lr=0.03)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(small(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_truncated_mps_loads_a_lightning_checkpoint_or_a_state_dict(tmp_path):
    torch.manual_seed(4)
    wide = MPSClassifier(10, 3, bond_dim=6, init_std=0.4)
    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"student.{k}": v for k, v in wide.state_dict().items()}}, ckpt)
    plain = tmp_path / "mps.pt"
    torch.save(wide.state_dict(), plain)
    expected, _ = truncate_student(wide, bond_dim=3)
    x = torch.rand(4, 10)
    for path in (ckpt, plain):
        small = TruncatedMPS(str(path), bond_dim=3, num_sites=10, num_classes=3)
        assert isinstance(small, MPSClassifier) and small.bond_dim == 3
        assert torch.allclose(small(x), expected(x), atol=1e-5)
        assert small.truncation.params_after == small.parameter_count()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TruncatedMPS(str(tmp_path / "missing.ckpt"), bond_dim=3, num_sites=10, num_classes=3)


def test_bond_spectra_and_entanglement_entropy():
    assert entanglement_entropy(torch.tensor([1.0, 1.0])) == pytest.approx(math.log(2))
    assert entanglement_entropy(torch.tensor([3.0, 0.0])) == 0.0
    mps = MPSClassifier(6, 3, bond_dim=4, init_std=0.5).double()
    spectra = chain_bond_spectra(mps)
    assert len(spectra) == 8  # left | 3 sites | output | 3 sites | right
    assert all(math.isclose(float((s**2).sum()), 1.0, rel_tol=1e-9) for s in spectra)
    entropies = entanglement_entropies(spectra)
    assert entropies[0] == 0.0 and entropies[-1] == 0.0  # boundary vectors: rank 1
    assert all(0 <= e <= math.log(4) + 1e-9 for e in entropies)
    tree_spectra = bond_spectra(TreeClassifier((8,), 3, bond_dim=3, init_std=0.5))
    assert len(tree_spectra) == 6  # 7 tree nodes (4 + 2 + root), 6 bonds between them


def test_shared_cores_and_loops_cannot_be_truncated():
    with pytest.raises(ValueError, match="uniform MPS"):
        truncate_student(MPSClassifier(6, 3, bond_dim=4, uniform=True), bond_dim=2)
    with pytest.raises(ValueError, match="equal cores"):
        truncate_student(TTNetwork((1, 8, 8), 10, patch_size=4, equal_cores=True), bond_dim=2)
    with pytest.raises(ValueError, match="loops"):
        truncate_student(PEPSClassifier((1, 4, 4), patch=2, bond_dim=2), bond_dim=1)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        truncate(*random_chain(), 0, rank=0)


def test_truncated_mps_starts_from_a_real_lightning_checkpoint_and_as_a_yaml_factory(tmp_path):
    from collections.abc import Callable

    import jsonargparse
    import lightning as L
    from torch import nn

    from tnkd.data import DigitsDataModule
    from tnkd.training import DistillationModule

    L.seed_everything(0, verbose=False)
    wide = MPSClassifier(64, 10, bond_dim=4)
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(DistillationModule(wide, beta=0.0), DigitsDataModule(batch_size=32))
    path = tmp_path / "wide.ckpt"
    trainer.save_checkpoint(path)
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--student", type=Callable[[], nn.Module])  # as `tnkd compare` takes it
    cfg = parser.parse_object(
        {
            "student": {
                "class_path": "tnkd.students.TruncatedMPS",
                "init_args": {
                    "checkpoint": str(path),
                    "bond_dim": 2,
                    "num_sites": 64,
                    "num_classes": 10,
                },
            }
        }
    )
    small = parser.instantiate(cfg).student()
    expected, _ = truncate_student(wide, bond_dim=2)
    x = torch.rand(3, 1, 8, 8)
    assert isinstance(small, MPSClassifier) and small.bond_dim == 2
    assert torch.allclose(small(x), expected(x), atol=1e-5)
