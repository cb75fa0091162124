import pytest
import torch
from tn_reference import dense_coefficients, evaluate_dense

import tnkd.tn.fused as fused
from tnkd.students import TreeClassifier
from tnkd.tn.fused import pair_step
from tnkd.tn.stable import StableNetwork, log_abs


def _value(out, log, renorm):
    return out * log.exp().unsqueeze(1) if renorm else out


@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("chunk", [1, 2, None])
def test_pair_step_equals_einsum_and_its_gradients_match_finite_differences(renorm, chunk):
    torch.manual_seed(0)
    kw = {"dtype": torch.float64, "requires_grad": True}
    left, right = torch.randn(3, 2, 5, **kw), torch.randn(3, 3, 5, **kw)
    weight = torch.randn(3, 2, 3, 4, **kw)
    out, log, peak = pair_step(left, right, weight, renorm, chunk)
    ref = torch.einsum("gabp,gan,gbn->gpn", weight, left, right)
    assert torch.allclose(_value(out, log, renorm), ref, rtol=1e-12, atol=1e-12)
    if renorm:  # max-abs 1 per (node, sample); the peak is the divisor
        assert torch.allclose(out.abs().amax(1), torch.ones(3, 5, dtype=torch.float64))
        assert torch.allclose(peak.squeeze(1), ref.abs().amax(1))

    def f(left, right, weight):
        return _value(*pair_step(left, right, weight, renorm, chunk)[:2], renorm)

    assert torch.autograd.gradcheck(f, (left, right, weight))


@pytest.mark.parametrize("chunk", [1, 2, None])
def test_interleaved_children_equal_the_separate_form(chunk):
    torch.manual_seed(1)
    children = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    out, _, _ = pair_step(children, None, weight, chunk=chunk)
    ref = torch.einsum("gabp,gan,gbn->gpn", weight, children[0::2], children[1::2])
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda c, w: _value(*pair_step(c, None, w, True, chunk)[:2], True), (children, weight)
    )


def test_pair_step_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="children"):
        pair_step(torch.rand(3, 2, 5), torch.rand(3, 4, 5), torch.rand(3, 2, 3, 4))


def _tree_function(tree, x):
    """f(blocks) -> exact values, for gradcheck over the parameter blocks."""

    def f(*blocks):
        inputs = iter(
            b for b, k in zip(tree.operand_blocks(x), tree._block_kinds, strict=True) if k
        )
        params = iter(blocks)
        ops = [next(inputs) if k else next(params) for k in tree._block_kinds]
        values, log_scale = tree.network.contract(ops)
        return values * log_scale.exp().unsqueeze(1)

    return f


@pytest.mark.parametrize("chunk_elements", [fused.CHUNK_ELEMENTS, 1])  # one chunk; one node each
@pytest.mark.parametrize("input_shape", [(16,), (1, 5, 3)])  # balanced; odd sites passed up
def test_the_one_node_tree_path_equals_dense_einsum_and_finite_differences(
    input_shape, chunk_elements, monkeypatch
):
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(fused, "ONE_CHUNK_ELEMENTS", min(chunk_elements, fused.ONE_CHUNK_ELEMENTS))
    torch.manual_seed(2)
    tree = TreeClassifier(input_shape, num_classes=3, bond_dim=3, output="raw", init_std=0.5)
    tree = tree.double()
    assert tree.network.chosen == "stable" and tree.network.stable.all_pairs
    x = torch.rand(4, *input_shape, dtype=torch.float64)
    ref = evaluate_dense(dense_coefficients(tree.to_graph()), list(tree.features(x).unbind(1)))
    assert torch.allclose(tree(x), ref, rtol=1e-10, atol=1e-12)
    leaves = [p.detach().clone().requires_grad_() for p in tree.blocks]
    assert torch.autograd.gradcheck(_tree_function(tree, x), leaves)


def test_the_tree_path_passes_gradients_to_learned_features():
    torch.manual_seed(3)
    tree = TreeClassifier((8,), num_classes=2, bond_dim=3, output="raw", feature_map="learnable")
    tree = tree.double()
    x = torch.rand(3, 8, dtype=torch.float64)
    blocks = [b.detach().clone().requires_grad_() for b in tree.operand_blocks(x)]

    def f(*ops):
        values, log_scale = tree.network.contract(list(ops))
        return values * log_scale.exp().unsqueeze(1)

    assert torch.autograd.gradcheck(f, blocks)


def test_the_tree_path_reruns_renormalising_every_level_when_values_leave_the_range():
    torch.manual_seed(4)
    tree = TreeClassifier((64,), num_classes=3, bond_dim=4, output="raw")
    with torch.no_grad():
        for block in tree.blocks:
            block.mul_(1e5)  # 1e35 after the 7 nodes below a renormalisation: digits lost
    x = torch.rand(5, 64)
    blocks = tree.operand_blocks(x)
    net = tree.network.stable
    assert net._pair_forward([b.detach() for b in blocks], every=False) is None  # rerun needed
    values, log_scale = net.contract(blocks)
    ref_values, ref_log = net.contract(blocks, fused=False)
    assert torch.isfinite(values).all() and torch.isfinite(log_scale).all()
    assert torch.allclose(log_abs(values, log_scale), log_abs(ref_values, ref_log), atol=1e-3)


def test_1024_site_trig_tree_is_finite_and_equals_the_unfused_stable_path():
    torch.manual_seed(5)
    tree = TreeClassifier((1024,), num_classes=4, bond_dim=4, feature_map="trig", output="raw")
    x = torch.rand(3, 1024)
    blocks = tree.operand_blocks(x)
    values, log_scale = tree.network.contract(blocks)
    ref_values, ref_log = tree.network.stable.contract(blocks, fused=False)
    fast, ref = log_abs(values, log_scale), log_abs(ref_values, ref_log)
    assert torch.isfinite(fast).all() and (values.abs().amax(1) > 0).all()
    assert (fast.abs() > 100).all()  # |log f| > 88: the exact value is outside float32 range
    assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-3)
    # gradients through the one-node path match the unfused autograd path (float32 sums of
    # entries up to ~400: rounding of a few 1e-6 of a block's largest entry)
    g_fast = torch.autograd.grad(values.sum(), list(tree.blocks))
    g_ref = torch.autograd.grad(ref_values.sum(), list(tree.blocks))
    for a, b in zip(g_fast, g_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5 * b.abs().amax().item())


def test_graphs_with_other_steps_keep_the_general_path():
    from test_contraction import peps_2x2

    graph, _ = peps_2x2()
    assert not StableNetwork(graph).all_pairs


# ---- the lean path of balanced trees (FastTree: workspaces, fused [1, x] leaves, the head) ----


def _dense_logits(tree, x):
    """s f / ||f|| from the dense coefficient tensor (independent of tnkd's engines)."""
    f = evaluate_dense(dense_coefficients(tree.to_graph()), list(tree.features(x).unbind(1)))
    return tree.log_logit_scale.exp() * f / f.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("feature_map", ["linear", "trig"])  # fused [1, x] leaves; general map
@pytest.mark.parametrize("chunk_elements", [fused.CHUNK_ELEMENTS, 1])  # workspace; none
def test_balanced_tree_logits_equal_dense_einsum_and_finite_differences(
    feature_map, chunk_elements, monkeypatch
):
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(fused, "ONE_CHUNK_ELEMENTS", min(chunk_elements, fused.ONE_CHUNK_ELEMENTS))
    torch.manual_seed(6)
    tree = TreeClassifier((16,), num_classes=3, bond_dim=3, feature_map=feature_map, init_std=0.5)
    tree = tree.double()
    assert tree.fast_path and tree._linear_leaves == (feature_map == "linear")
    x = torch.rand(5, 16, dtype=torch.float64)
    assert torch.allclose(tree(x), _dense_logits(tree, x), rtol=1e-10, atol=1e-12)
    params = [p.detach().clone().requires_grad_() for p in tree.parameters()]

    def f(*ps):  # the logits as a function of the weights and the logit scale
        scale = next(q for q in ps if q.ndim == 0)
        weights = [q for q in ps if q.ndim == 4]
        inputs = [b for b, k in zip(tree.operand_blocks(x), tree._block_kinds, strict=True) if k]
        return tree.network.stable.normalized_logits([*inputs, *weights], scale)

    assert torch.autograd.gradcheck(f, params)
    # the whole forward (fused leaves, workspaces) against autograd through the general path
    logits = tree(x)
    grads = torch.autograd.grad(logits.sin().sum(), list(tree.parameters()))
    tree.fast_path = False
    ref = torch.autograd.grad(tree(x).sin().sum(), list(tree.parameters()))
    for a, b in zip(grads, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_normalized_logits_gradients_match_finite_differences():
    torch.manual_seed(7)
    values = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    out = fused.normalized_logits(values, scale)
    assert torch.allclose(out, scale.exp() * values / values.norm(dim=1, keepdim=True))
    assert torch.autograd.gradcheck(fused.normalized_logits, (values, scale))


def test_workspaces_are_not_shared_by_pending_backward_passes():
    torch.manual_seed(8)
    tree = TreeClassifier((32,), num_classes=4, bond_dim=4, init_std=0.5).double()
    tree.network.stable.fast_plan.native = False  # the Python loop's workspaces (native: none)
    x1, x2 = torch.rand(6, 32, dtype=torch.float64), torch.rand(6, 32, dtype=torch.float64)
    params = list(tree.parameters())
    one = [torch.autograd.grad(tree(x).square().sum(), params) for x in (x1, x2)]
    # two forward passes before either backward: the second may not write the first's buffers
    l1, l2 = tree(x1).square().sum(), tree(x2).square().sum()
    g2 = torch.autograd.grad(l2, params)
    g1 = torch.autograd.grad(l1, params, retain_graph=True)
    again = torch.autograd.grad(l1, params)  # a second backward through the same graph
    for a, b, c, d, e in zip(one[0], one[1], g1, g2, again, strict=True):
        assert torch.allclose(a, c) and torch.allclose(b, d) and torch.allclose(a, e)
    with torch.no_grad():  # a pass without gradients gives its workspace back at once
        tree(x1)
    assert sum(len(v) for v in tree.network.stable.fast_plan._free.values()) >= 1


@pytest.mark.parametrize("feature_map", ["linear", "trig"])
def test_balanced_tree_reruns_renormalising_every_level_when_values_leave_the_range(
    feature_map,
):
    torch.manual_seed(4)
    tree = TreeClassifier((64,), num_classes=3, bond_dim=4, feature_map=feature_map)
    with torch.no_grad():
        for block in tree.blocks:
            block.mul_(1e5)  # 1e35 after the 7 nodes below a renormalisation: digits lost
    x = torch.rand(5, 64)
    net = tree.network.stable
    blocks = tree.operand_blocks(x)
    plain = [b.detach() for b in blocks]
    assert fused.tree_forward(net.fast_plan.levels, plain, False, True) is None  # rerun needed
    values, log_scale = net.contract(blocks)
    ref_values, ref_log = net.contract(blocks, fused=False)
    assert torch.isfinite(values).all() and torch.isfinite(log_scale).all()
    assert torch.allclose(log_abs(values, log_scale), log_abs(ref_values, ref_log), atol=1e-3)
    logits = tree(x)  # the workspace path (fused leaves for [1, x]) reruns too
    ref = ref_values / ref_values.norm(dim=1, keepdim=True) * tree.log_logit_scale.exp()
    assert torch.isfinite(logits).all() and torch.allclose(logits, ref, atol=1e-5)


def test_1024_site_trig_tree_logits_equal_the_unfused_stable_path():
    torch.manual_seed(5)
    tree = TreeClassifier((1024,), num_classes=4, bond_dim=4, feature_map="trig")
    x = torch.rand(3, 1024)
    logits = tree(x)
    values, _ = tree.network.stable.contract(tree.operand_blocks(x), fused=False)
    ref = tree.log_logit_scale.exp() * values / values.norm(dim=1, keepdim=True)
    assert torch.isfinite(logits).all() and torch.allclose(logits, ref, rtol=1e-4, atol=1e-5)
    g_fast = torch.autograd.grad(logits.sum(), list(tree.blocks))
    g_ref = torch.autograd.grad(ref.sum(), list(tree.blocks))
    for a, b in zip(g_fast, g_ref, strict=True):  # float32 rounding: see the test above
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5 * b.abs().amax().item())


def test_trees_with_odd_sites_keep_the_general_one_node_path():
    tree = TreeClassifier((1, 5, 3), num_classes=3, bond_dim=3)
    net = tree.network.stable
    assert net.all_pairs and net.fast_plan is None and not tree.fast_path
    with pytest.raises(ValueError, match="fast_plan"):
        net.normalized_logits(tree.operand_blocks(torch.rand(2, 15)), tree.log_logit_scale)


@pytest.mark.parametrize("every", [False, True])  # the root's norm checked; renormalised first
def test_the_head_equals_the_general_path_with_a_small_root(every):
    torch.manual_seed(9)
    tree = TreeClassifier((64,), num_classes=10, bond_dim=8).double()
    with torch.no_grad():
        tree.blocks[-1].mul_(1e-3)  # ||root|| far below 1, every other value near 1
    x = torch.rand(5, 64, dtype=torch.float64)
    pairs = x.T.reshape(32, 2, 5)
    plan = tree.network.stable.fast_plan
    args = (plan, every, True, tree.log_logit_scale, True, pairs, pairs, *tree.blocks)
    logits = fused.FastTree.apply(*args)[0]
    assert plan.lean  # no rerun: with every=False the root's squared norm was checked
    tree.fast_path = False
    ref = tree(x)
    assert torch.allclose(logits, ref, rtol=1e-10, atol=1e-12)
    params = list(tree.parameters())
    g = torch.autograd.grad(logits.sin().sum(), params)
    g_ref = torch.autograd.grad(ref.sin().sum(), params)
    for a, b in zip(g, g_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


def test_the_lean_renormalisation_plan_falls_back_for_good_when_values_leave_the_range():
    torch.manual_seed(10)
    tree = TreeClassifier((64,), num_classes=3, bond_dim=4, output="raw").double()
    plan = tree.network.stable.fast_plan
    # the lean plan renormalises only the root of a 64-site tree; the network's plan two levels
    assert [lv[4] for lv in plan.lean_levels] == [False] * 5 + [True]
    assert sum(lv[4] for lv in plan.levels) == 2
    x = torch.rand(4, 64, dtype=torch.float64)
    tree(x)
    assert plan.lean  # values near 1: no rerun
    with torch.no_grad():
        for block in tree.blocks:
            block.mul_(1e5)  # 63 nodes: 1e315, beyond float64 without renormalisation
    blocks = tree.operand_blocks(x)
    values, log_scale = tree.network.contract(blocks)
    assert not plan.lean  # one rerun, then the network's plan
    ref_values, ref_log = tree.network.stable.contract(blocks, fused=False)
    assert torch.isfinite(values).all() and (log_scale > 700).all()  # exp(700): beyond float64
    assert torch.allclose(log_abs(values, log_scale), log_abs(ref_values, ref_log), atol=1e-9)
    assert torch.allclose(values, ref_values, atol=1e-12)


def test_gradients_reach_the_inputs_when_they_need_them():
    torch.manual_seed(11)
    tree = TreeClassifier((16,), num_classes=3, bond_dim=3, init_std=0.5).double()
    x = torch.rand(4, 16, dtype=torch.float64, requires_grad=True)
    (g_x,) = torch.autograd.grad(tree(x).sin().sum(), x)  # not through the fused [1, x] leaves
    tree.fast_path = False
    (ref,) = torch.autograd.grad(tree(x).sin().sum(), x)
    assert torch.allclose(g_x, ref, rtol=1e-10, atol=1e-12) and g_x.abs().sum() > 0
    pairs = x.T.reshape(8, 2, 4)
    blocks = [pairs, pairs, *tree.blocks]
    with pytest.raises(ValueError, match="no gradient"):
        tree.network.stable.normalized_logits(blocks, tree.log_logit_scale, linear_leaves=True)
