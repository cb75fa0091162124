import itertools

import pytest
import torch

from tnkd.students import MPSClassifier
from tnkd.tn.decompositions import factorize, tt_matrix_svd, tt_ranks, tt_svd, tt_to_full


def test_full_rank_tt_svd_is_exact():
    torch.manual_seed(0)
    a = torch.randn(2, 3, 4, 3, 2, dtype=torch.float64)
    assert torch.allclose(tt_to_full(tt_svd(a)), a, atol=1e-12)


def test_3x4x5x6_needs_ranks_3_12_6_and_errs_more_as_the_middle_rank_drops():
    torch.manual_seed(1)
    a = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    cores = tt_svd(a)
    assert tt_ranks(cores) == (3, 12, 6)
    assert [tuple(c.shape) for c in cores] == [(1, 3, 3), (3, 4, 12), (12, 5, 6), (6, 6, 1)]
    assert torch.allclose(tt_to_full(cores), a, atol=1e-12)
    errors = [
        (tt_to_full(tt_svd(a, ranks=[3, r, 6])) - a).norm().item() for r in (12, 10, 8, 6, 4, 2, 1)
    ]
    assert errors[0] < 1e-12
    assert all(e1 < e2 for e1, e2 in itertools.pairwise(errors))


def test_tolerance_bounds_the_relative_error():
    torch.manual_seed(2)
    a = torch.randn(4, 5, 6, 7, dtype=torch.float64)
    for tol in (0.5, 0.2, 0.05):
        err = ((tt_to_full(tt_svd(a, tolerance=tol)) - a).norm() / a.norm()).item()
        assert err <= tol + 1e-12


def test_bad_ranks_and_factors():
    a = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="tt_svd ranks must be 2 positive integers"):
        tt_svd(a, ranks=[2])
    with pytest.raises(
        ValueError, match=r"in_factors \(8, 8, 8, 8\) multiply to 4096 but the size is 4000"
    ):
        tt_matrix_svd(torch.randn(16, 4000), (8, 8, 8, 8), (2, 2, 2, 2))


def test_factorize():
    for n, parts in [(4096, 4), (784, 4), (1200, 4), (10, 2), (13, 3)]:
        f = factorize(n, parts)
        assert len(f) == parts and torch.tensor(f).prod().item() == n
    assert factorize(4096, 4) == (8, 8, 8, 8)


def test_mps_from_tt_svd_of_a_multilinear_polynomial_evaluates_it():
    # f(x) = sum_{s in {0,1}^6} c[s] prod_i x_i^{s_i}: the coefficient tensor c has shape 2^6;
    # with phi(x) = [1, x], an MPS whose cores are the TT-SVD of c evaluates f exactly.
    torch.manual_seed(3)
    c = torch.randn(*([2] * 6), dtype=torch.float64)
    cores = tt_svd(c)
    bond = max(max(k.shape[0], k.shape[-1]) for k in cores)
    mps = MPSClassifier(
        6, 1, bond_dim=bond, feature_map="linear", label_position=6, output="raw"
    ).double()
    with torch.no_grad():
        mps.cores.zero_()
        for i, core in enumerate(cores):
            mps.cores[i, : core.shape[0], :, : core.shape[2]] = core
        mps.left.zero_()
        mps.left[0] = 1.0
        mps.right.zero_()
        mps.right[0] = 1.0
        mps.output_core.copy_(torch.eye(bond, dtype=torch.float64).unsqueeze(1))
    x = torch.rand(20, 6, dtype=torch.float64)
    monomials = torch.stack(torch.meshgrid(*[torch.tensor([0, 1])] * 6, indexing="ij"), -1).reshape(
        -1, 6
    )
    expected = (x.unsqueeze(1) ** monomials.unsqueeze(0)).prod(-1) @ c.reshape(-1)
    assert torch.allclose(mps.raw_forward(x)[:, 0], expected, atol=1e-10)
