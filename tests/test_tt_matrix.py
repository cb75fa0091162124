import itertools
import math

import pytest
import torch

from tnkd.tn.tt_matrix import build_plan, merge_cores, plan_tt_matvec, tt_linear


def random_cores(m, n, ranks, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    full = [1, *ranks, 1]
    return [
        torch.randn(full[k], m[k], n[k], full[k + 1], dtype=dtype, requires_grad=True)
        for k in range(len(m))
    ]


def dense_reference(cores):
    """W (out, in) from one einsum with hand-built letters: independent of tt_matrix."""
    d = len(cores)
    rank = "abcdefgh"[: d + 1]
    ins, outs = "ijklmn"[:d], "pqrstu"[:d]
    terms = ",".join(rank[k] + ins[k] + outs[k] + rank[k + 1] for k in range(d))
    w = torch.einsum(f"{terms}->{rank[0]}{outs}{ins}{rank[d]}", *cores)
    out_features = math.prod(c.shape[2] for c in cores)
    return w.reshape(out_features, -1)


def groupings(d):
    for cuts in range(2 ** (d - 1)):
        bounds = [0, *(k + 1 for k in range(d - 1) if cuts >> k & 1), d]
        yield tuple(itertools.pairwise(bounds))


SHAPES = [
    ((3, 4, 5), (2, 3, 4), (3, 5)),
    ((8, 8, 8, 8), (2, 2, 2, 2), (8, 8, 8)),
    ((7, 7, 4, 4), (5, 5, 6, 8), (4, 3, 2)),
    ((6,), (5,), ()),
    ((2, 3), (4, 1), (1,)),
]


@pytest.mark.parametrize(("m", "n", "ranks"), SHAPES)
def test_every_grouping_and_direction_equals_the_dense_product(m, n, ranks):
    cores = random_cores(m, n, ranks)
    w = dense_reference(cores)
    bias = torch.randn(w.shape[0], dtype=torch.float64)
    x = torch.randn(7, w.shape[1], dtype=torch.float64)
    expected = x @ w.T + bias
    for groups in groupings(len(m)):
        for reverse in (False, True):
            for chunk_floats in (None, 60):  # the whole batch, or chunks of a few samples
                plan = build_plan(m, n, ranks, groups, reverse, 7, chunk_floats=chunk_floats)
                assert torch.allclose(tt_linear(x, cores, bias, plan), expected, atol=1e-10)
                assert torch.allclose(tt_linear(x, cores, None, plan), x @ w.T, atol=1e-10)


@pytest.mark.parametrize(
    ("groups", "reverse"),
    [(((0, 1), (1, 2), (2, 3)), False), (((0, 1), (1, 3)), True), (((0, 3),), False)],
)
def test_gradcheck_in_chunks(groups, reverse):
    m, n, ranks = (2, 3, 2), (3, 1, 2), (2, 3)
    cores = random_cores(m, n, ranks, seed=1)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    plan = build_plan(m, n, ranks, groups, reverse, 5, chunk_floats=16)
    assert plan.chunk < 5 or len(groups) == 1  # several chunks, so recomputation is exercised
    assert torch.autograd.gradcheck(
        lambda x, b, *c: tt_linear(x, c, b, plan), (x, bias, *cores), atol=1e-8
    )


def test_gradients_equal_the_dense_products_gradients():
    m, n, ranks = (8, 8, 8, 8), (2, 2, 2, 2), (3, 4, 3)
    cores = random_cores(m, n, ranks, seed=2)
    x = torch.randn(9, 4096, dtype=torch.float64, requires_grad=True)
    g = torch.randn(9, 16, dtype=torch.float64)
    for groups, reverse in [(((0, 2), (2, 4)), False), (((0, 1), (1, 4)), True)]:
        plan = build_plan(m, n, ranks, groups, reverse, 9, chunk_floats=3000)
        got = torch.autograd.grad(tt_linear(x, cores, None, plan), [x, *cores], g)
        want = torch.autograd.grad(x @ dense_reference(cores).T, [x, *cores], g)
        for a, b in zip(got, want, strict=True):
            assert torch.allclose(a, b, atol=1e-9)


def test_the_plan_counts_multiply_adds_and_merges_neighbours():
    for r in (8, 16):
        plan = plan_tt_matvec((8,) * 4, (8,) * 4, (r,) * 3, batch=256)
        # cores (1, 2) and (3, 4) merged: two steps of 64·64·64·r multiply-adds per sample
        assert plan.groups == ((0, 2), (2, 4))
        assert [s.macs for s in plan.steps] == [64 * 64 * 64 * r] * 2
        core_by_core = build_plan(
            (8,) * 4, (8,) * 4, (r,) * 3, [(k, k + 1) for k in range(4)], False, 256
        )
        assert sum(s.macs for s in core_by_core.steps) == 2 * 8**5 * r + 2 * 8**5 * r * r
        assert plan.cost < core_by_core.cost
    # 4096 -> 16: all four cores merged into the dense matrix is cheapest for a large batch
    big = plan_tt_matvec((8,) * 4, (2,) * 4, (8,) * 3, batch=256)
    assert big.groups == ((0, 4),) and big.steps[0].macs == 4096 * 16
    # for one sample the batch-independent merge into 65,536 numbers is not worth it
    assert plan_tt_matvec((8,) * 4, (2,) * 4, (8,) * 3, batch=1).groups != ((0, 4),)


def test_plans_are_cached_and_chunks_bounded():
    args = ((7, 7, 4, 4), (5, 5, 6, 8), (16, 16, 16), 256)
    assert plan_tt_matvec(*args) is plan_tt_matvec(*args)
    plan = plan_tt_matvec(*args, chunk_floats=1 << 19)
    largest = max(s.out_size for s in plan.steps[:-1])
    assert 1 <= plan.chunk < 256 and plan.chunk * largest <= (1 << 19) + largest
    assert plan_tt_matvec(*args, chunk_floats=None).chunk == 256


@pytest.mark.parametrize("out_first", [False, True])
def test_merged_cores_are_the_contracted_cores(out_first):
    cores = random_cores((2, 3, 2), (3, 1, 2), (2, 3), seed=3)
    merged = merge_cores(cores, out_first)
    full = torch.einsum("aimb,bjnc,ckpd->aijkmnpd", *cores).reshape(1, 12, 6, 1)
    expected = full.transpose(1, 2) if out_first else full
    assert torch.allclose(merged, expected, atol=1e-12)


def test_inference_and_empty_batch():
    cores = random_cores((4, 4), (3, 2), (3,), dtype=torch.float32)
    x = torch.randn(6, 16)
    with torch.inference_mode():
        y = tt_linear(x, cores)
    assert torch.allclose(y, x @ dense_reference(cores).T, atol=1e-5)
    empty = torch.randn(0, 16, requires_grad=True)
    y = tt_linear(empty, cores)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert all(torch.equal(c.grad, torch.zeros_like(c)) for c in cores)


def test_bf16_autocast_runs_the_products_in_bf16():
    cores = random_cores((8, 8), (4, 4), (4,), dtype=torch.float32, seed=4)
    x = torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = tt_linear(x, cores)
    assert y.dtype == torch.bfloat16
    ref = x @ dense_reference(cores).T
    assert torch.allclose(y.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
    y.float().sum().backward()
    assert all(c.grad is not None and c.grad.dtype == torch.float32 for c in cores)


def test_bad_input():
    cores = random_cores((3, 4, 5), (2, 3, 4), (3, 5))
    with pytest.raises(
        ValueError, match=r"tt_linear expects a \(batch, 60\) input, but got \(7, 59\)"
    ):
        tt_linear(torch.randn(7, 59, dtype=torch.float64), cores)
    with pytest.raises(ValueError, match=r"groups must be .* covering cores 0\.\.2 in order"):
        build_plan((3, 4, 5), (2, 3, 4), (3, 5), [(0, 2)], False, 7)
    with pytest.raises(ValueError, match="d out factors and d - 1 ranks, but got 3, 2 and 2"):
        plan_tt_matvec((3, 4, 5), (2, 3), (3, 5), 7)
    with pytest.raises(ValueError, match="must be positive integers, but got"):
        plan_tt_matvec((3, 4), (2, 3), (0,), 7)
