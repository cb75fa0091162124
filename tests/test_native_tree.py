"""The tree engine's native level loop (csrc/tree_levels.cpp) against the stable engine and dense truth."""

import warnings

import pytest
import torch
from tn_reference import dense_coefficients, evaluate_dense

import tnkd.tn.fused as fused
from tnkd.students import TreeClassifier
from tnkd.tn import native
from tnkd.tn.stable import log_abs


@pytest.fixture(scope="module")
def ext(tree_kernels):
    """The compiled kernels (skipped where they cannot be built: see conftest)."""
    return tree_kernels


@pytest.fixture
def calls(monkeypatch):
    """Counts the native forward and backward passes (to know which path ran)."""
    count = {"forward": 0, "backward": 0}
    forward, backward = fused.native_tree_forward, fused.native_tree_backward

    def counted_forward(*args, **kwargs):
        count["forward"] += 1
        return forward(*args, **kwargs)

    def counted_backward(*args, **kwargs):
        count["backward"] += 1
        return backward(*args, **kwargs)

    monkeypatch.setattr(fused, "native_tree_forward", counted_forward)
    monkeypatch.setattr(fused, "native_tree_backward", counted_backward)
    return count


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _outputs_and_grads(tree, x, use_native, every=False):
    """The tree's output (logits, or raw values with ``every``) and every parameter's gradient."""
    tree.tree_plan.native = use_native
    if every:
        values, log_scale = tree.tree_plan.contract(tree.operand_blocks(x), every=True)
        out = values * log_scale.exp().unsqueeze(1)
    else:
        out = tree(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    grads = torch.autograd.grad((out * weights).sum(), list(tree.parameters()))
    return out.detach(), grads


def _dense(tree, x):
    f = evaluate_dense(dense_coefficients(tree.to_graph()), list(tree.features(x).unbind(1)))
    if tree.output == "raw":
        return f
    return tree.log_logit_scale.exp() * f / f.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("batch", [1, 17, 33])  # 17, 33: not whole SIMD registers
@pytest.mark.parametrize(
    ("feature_map", "output", "every"),
    [
        ("linear", "normalized", False),  # [1, x] fused with the leaves, the head
        ("trig", "normalized", False),  # feature blocks, the head
        ("linear", "raw", False),  # no head: the root renormalised
        ("trig", "raw", True),  # every level renormalised
    ],
)
def test_native_levels_equal_the_stable_engine_and_a_dense_reference(
    ext, calls, two_threads, feature_map, output, every, batch
):
    torch.manual_seed(batch)
    tree = TreeClassifier(
        (16,), num_classes=3, bond_dim=3, feature_map=feature_map, output=output, init_std=0.5
    ).double()
    assert tree.fast_path
    x = torch.rand(batch, 16, dtype=torch.float64)
    got, g_got = _outputs_and_grads(tree, x, True, every)
    assert calls == {"forward": 1, "backward": 1}
    want, g_want = _outputs_and_grads(tree, x, False, every)
    assert calls == {"forward": 1, "backward": 1}  # the stable engine: no native call
    assert torch.allclose(got[:5], _dense(tree, x[:5]), rtol=1e-10, atol=1e-12)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    for a, b in zip(g_got, g_want, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("input_shape", [(1, 5, 3), (1, 3, 6)])  # odd sites passed up
def test_native_levels_of_unbalanced_trees_equal_the_stable_engine_and_a_dense_reference(
    ext, calls, two_threads, input_shape
):
    torch.manual_seed(13)
    tree = TreeClassifier(input_shape, num_classes=3, bond_dim=3, output="raw", init_std=0.5)
    tree = tree.double()
    assert tree.plan().engine == "tree"
    x = torch.rand(9, *input_shape, dtype=torch.float64)
    got, g_got = _outputs_and_grads(tree, x, True)
    want, g_want = _outputs_and_grads(tree, x, False)
    assert calls == {"forward": 1, "backward": 1}
    assert torch.allclose(got, _dense(tree, x), rtol=1e-10, atol=1e-12)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    for a, b in zip(g_got, g_want, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("threads", [1, 8])
def test_the_split_by_columns_equals_the_stable_engine(ext, calls, threads):
    # an 8-site tree has 4 leaves: fewer than 8 threads, so each thread takes columns of the
    # batch (its own weight-gradient buffer, summed); 40 float64 columns: 5 registers, 5 tasks
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(12)
        tree = TreeClassifier((8,), num_classes=3, bond_dim=3, init_std=0.5).double()
        x = torch.rand(40, 8, dtype=torch.float64)
        got, g_got = _outputs_and_grads(tree, x, True)
        want, g_want = _outputs_and_grads(tree, x, False)
    finally:
        torch.set_num_threads(before)
    assert calls == {"forward": 1, "backward": 1}
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    for a, b in zip(g_got, g_want, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("linear", [False, True])
def test_native_levels_gradients_match_finite_differences(ext, calls, two_threads, linear):
    torch.manual_seed(2)
    tree = TreeClassifier((8,), num_classes=2, bond_dim=3, init_std=0.5).double()
    x = torch.rand(9, 8, dtype=torch.float64)  # 9: 8 columns on one thread, 1 on the other
    plan = tree.tree_plan
    if linear:  # the raw [x_l, x_r] pairs (no gradient), the weights and the logit scale
        pairs = x.T.reshape(4, 2, 9)
        inputs = [pairs, pairs]
    else:  # the [1, x] features as blocks, with gradients
        inputs = [b.detach().clone().requires_grad_() for b in tree.operand_blocks(x)[:2]]
    weights = [w.detach().clone().requires_grad_() for w in tree.blocks]
    scale = tree.log_logit_scale.detach().clone().requires_grad_()
    leaves = [*([] if linear else inputs), *weights, scale]

    def f(*ps):
        feats = list(inputs) if linear else list(ps[:2])
        ws, s = list(ps[-len(weights) - 1 : -1]), ps[-1]
        return plan.normalized_logits([*feats, *ws], s, linear_leaves=linear)

    assert torch.autograd.gradcheck(f, leaves)
    assert calls["forward"] > 0 and calls["backward"] > 0

    def raw(*ps):  # the exact values without the head (every level renormalised)
        feats = list(inputs) if linear else list(ps[:2])
        if linear:
            feats = fused.linear_leaf_features(plan, [*feats, *weights])[:2]
        values, log_scale = plan.contract([*feats, *ps[-len(weights) - 1 : -1]], every=True)
        return values * log_scale.exp().unsqueeze(1)

    assert torch.autograd.gradcheck(raw, leaves, fast_mode=True)


def test_1024_site_trig_tree_is_finite_and_equals_the_stable_engine(ext, calls):
    torch.manual_seed(5)
    tree = TreeClassifier((1024,), num_classes=4, bond_dim=4, feature_map="trig", output="raw")
    x = torch.rand(3, 1024)
    blocks = tree.operand_blocks(x)
    plan = tree.tree_plan
    runs = {}
    for use_native in (True, False):
        plan.native = use_native
        values, log_scale = plan.contract(blocks)
        runs[use_native] = (values, log_scale, torch.autograd.grad(values.sum(), list(tree.blocks)))
    assert calls["forward"] >= 1 and calls["backward"] == 1
    fast, ref = log_abs(*runs[True][:2]), log_abs(*runs[False][:2])
    assert torch.isfinite(fast).all() and (fast.abs() > 100).all()  # beyond float32's range
    assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(runs[True][2], runs[False][2], strict=True):  # float32 sums: relative 1e-5
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().amax().item())


def test_native_levels_rerun_renormalising_every_level_when_values_leave_the_range(ext, calls):
    torch.manual_seed(10)
    tree = TreeClassifier((64,), num_classes=3, bond_dim=4, output="raw").double()
    with torch.no_grad():
        for block in tree.blocks:
            block.mul_(1e50)  # 7 weights between renormalisations: 1e350, beyond float64
    x = torch.rand(4, 64, dtype=torch.float64)
    plan = tree.tree_plan
    values, log_scale = plan.contract(tree.operand_blocks(x))
    assert calls["forward"] == 2  # the network's plan, then every level
    ref_values, ref_log = tree.network.contract(tree.operand_blocks(x))  # the stable engine
    assert torch.isfinite(values).all() and (log_scale > 700).all()
    assert torch.allclose(log_abs(values, log_scale), log_abs(ref_values, ref_log), atol=1e-9)


def test_pending_backward_passes_and_retain_graph(ext, calls):
    torch.manual_seed(8)
    tree = TreeClassifier((32,), num_classes=4, bond_dim=4, init_std=0.5).double()
    x1, x2 = torch.rand(6, 32, dtype=torch.float64), torch.rand(6, 32, dtype=torch.float64)
    params = list(tree.parameters())
    one = [torch.autograd.grad(tree(x).square().sum(), params) for x in (x1, x2)]
    l1, l2 = tree(x1).square().sum(), tree(x2).square().sum()  # both forwards first
    g2 = torch.autograd.grad(l2, params)
    g1 = torch.autograd.grad(l1, params, retain_graph=True)
    again = torch.autograd.grad(l1, params)
    for a, b, c, d, e in zip(one[0], one[1], g1, g2, again, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d) and torch.equal(a, e)
    assert calls["backward"] == 5


def test_without_the_kernels_the_stable_engine_runs(monkeypatch, calls):
    torch.manual_seed(3)
    tree = TreeClassifier((16,), num_classes=3, bond_dim=3, init_std=0.5).double()
    x = torch.rand(7, 16, dtype=torch.float64)
    monkeypatch.setattr(native, "kernels", lambda name="chain_scan": None)
    logits = tree(x)
    assert calls["forward"] == 0
    assert torch.allclose(logits, _dense(tree, x), rtol=1e-10, atol=1e-12)


def test_no_compiler_means_one_warning_and_the_stable_engine(monkeypatch, calls):
    import torch.utils.cpp_extension

    def fail(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(native, "_STATE", {})  # as if nothing had been built in this process
    monkeypatch.setattr(torch.utils.cpp_extension, "load", fail)
    torch.manual_seed(4)
    tree = TreeClassifier((16,), num_classes=3, bond_dim=3, init_std=0.5).double()
    x = torch.rand(7, 16, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="native tree levels could not be compiled.*Ninja"):
        logits = tree(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        again = tree(x)
    assert calls["forward"] == 0
    assert torch.allclose(logits, _dense(tree, x), rtol=1e-10, atol=1e-12)
    assert torch.equal(logits, again)


def test_torch_compile_traces_the_stable_engine(ext):
    # torch.compile cannot trace into the native functions: under tracing the plan's network runs
    torch.manual_seed(6)
    tree = TreeClassifier((16,), num_classes=3, bond_dim=3, output="raw", init_std=0.5)
    x = torch.rand(4, 16)
    compiled = torch.compile(tree.log_forward, backend="eager")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Dynamo does not know how to trace")
        values, log_scale = compiled(x)
    ref_values, ref_log = tree.log_forward(x)
    assert torch.allclose(values, ref_values, atol=1e-6)
    assert torch.allclose(log_scale, ref_log, atol=1e-6)


def test_the_kernels_reject_children_that_do_not_fit_the_weights(ext):
    feats, weight = torch.rand(4, 2, 5), torch.rand(4, 3, 3, 2)  # A = 3, children with 2 rows
    rows = [0, 1, 2, 3]  # node g's children: row g of block 0 and of block 1
    children = ([0] * 4, rows, [1] * 4, rows)
    with pytest.raises(RuntimeError, match=r"expects children of 3 rows, got a \(4, 2, n\)"):
        ext.tree_forward([feats, feats, weight], [[2], *children], [True], False, False, None, 0, 1)
    plan = [[2], [0] * 4, rows, [1] * 3, rows]  # three right children for four nodes
    with pytest.raises(RuntimeError, match="one entry per node"):
        ext.tree_forward([feats, feats, weight], plan, [True], False, False, None, 0, 1)
