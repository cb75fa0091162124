"""The planner: graphs recognised by their shape, engines chosen in one place, and the chain
engine on hand-drawn chains held against a dense contraction (float64) and finite differences."""

import itertools
import random

import pytest
import torch
from tn_reference import dense_coefficients, evaluate_dense

from tnkd.students import GraphStudent, MPSClassifier, PEPSClassifier, TreeClassifier, TTNetwork
from tnkd.tn.graph import TNGraph, connect, make_node
from tnkd.tn.planner import CHAIN_KERNELS, ENGINES, KERNELS, METHODS, plan, recognise_chain


def chain_graph(
    num_sites: int,
    bonds: list[int] | int,
    label: int | str = "middle",
    label_reads: bool = False,
    boundaries: bool = False,
    classes: int = 3,
    d: int = 2,
    shuffle: int | None = None,
    axis_order: str = "lpr",
) -> TNGraph:
    """A chain drawn by hand: ``label`` is the index of the label tensor among the chain's
    tensors (or "middle"/"end"/"start"); ``label_reads``: the label tensor also reads an input
    (then it replaces a site); ``bonds``: the bond sizes along the chain; ``shuffle``: the node
    list in a random order; ``axis_order``: the order of (left, phys, right) axes of the sites."""
    n = num_sites
    slots = n + (0 if label_reads else 1)
    if label == "middle":
        label = n // 2
    elif label == "end":
        label = slots - 1
    elif label == "start":
        label = 0
    length = slots + 2 * boundaries
    sizes = [bonds] * (length - 1) if isinstance(bonds, int) else list(bonds)
    assert len(sizes) == length - 1
    nodes, inputs = [], []
    position = 0
    for k in range(length):
        left = sizes[k - 1] if k > 0 else None
        right = sizes[k] if k < length - 1 else None
        is_boundary = boundaries and k in (0, length - 1)
        is_label = k - boundaries == label
        axes = {}
        if left is not None:
            axes["l"] = left
        if not is_boundary and (not is_label or label_reads):
            axes["p"] = d
        if is_label:
            axes["c"] = classes
        if right is not None:
            axes["r"] = right
        names = sorted(axes, key=lambda a: (axis_order + "c").index(a))
        node = make_node(tuple(axes[a] for a in names), f"T{k}", names)
        nodes.append(node)
        if "p" in axes:
            x = make_node((d,), f"x{position}", ["p"])
            connect(node, "p", x, "p")
            inputs.append(x)
            position += 1
    for a, b in itertools.pairwise(nodes):
        connect(a, "r", b, "l")
    label_node = nodes[label + boundaries]
    everything = nodes + inputs
    if shuffle is not None:
        random.Random(shuffle).shuffle(everything)
    return TNGraph(everything, [x.name for x in inputs], [label_node["c"]])


CHAINS = {
    "label in the middle": dict(num_sites=7, bonds=4),
    "label at the end": dict(num_sites=7, bonds=4, label="end"),
    "label at the start": dict(num_sites=7, bonds=4, label="start"),
    "label tensor reads an input": dict(num_sites=7, bonds=4, label=3, label_reads=True),
    "label tensor reads an input, at the end": dict(
        num_sites=6, bonds=3, label="end", label_reads=True
    ),
    "boundary vectors": dict(num_sites=6, bonds=3, boundaries=True),
    "bonds of different sizes": dict(num_sites=6, bonds=[2, 4, 3, 5, 4, 2]),
    "node list shuffled, axes phys first": dict(
        num_sites=8, bonds=3, label=2, shuffle=5, axis_order="plr"
    ),
    "axes reversed": dict(num_sites=5, bonds=4, label="end", axis_order="rpl"),
}


@pytest.mark.parametrize("name", list(CHAINS))
@pytest.mark.parametrize("feature_map", ["linear", "trig"])
def test_a_chain_drawn_any_way_runs_the_chain_engine_and_equals_the_dense_contraction(
    name, feature_map
):
    torch.manual_seed(0)
    graph = chain_graph(**CHAINS[name])
    student = GraphStudent(graph, feature_map=feature_map, output="raw", init_std=0.5).double()
    assert student.plan().engine == "chain"
    num = len(student.input_nodes)
    x = torch.rand(5, num, dtype=torch.float64)
    reference = evaluate_dense(
        dense_coefficients(student.to_graph()), list(student.features(x).unbind(1))
    )
    out = student(x)
    assert torch.allclose(out, reference, rtol=1e-10, atol=1e-10 * float(reference.abs().max()))
    assert student.parameter_count() == sum(
        t.tensor.numel() for t in student.to_graph().nodes if t.name not in student.input_nodes
    )


@pytest.mark.parametrize("label_reads", [False, True])
def test_the_chain_engine_gradients_match_finite_differences(label_reads):
    torch.manual_seed(1)
    graph = chain_graph(num_sites=4, bonds=2, label=2, label_reads=label_reads)
    student = GraphStudent(graph, output="raw", init_std=0.5).double()
    x = torch.rand(3, len(student.input_nodes), dtype=torch.float64)
    params = list(student.blocks)
    originals = [p.detach().clone() for p in params]

    def f(*tensors):
        with torch.no_grad():
            for p, t in zip(params, originals, strict=True):
                p.copy_(t)
        return torch.func.functional_call(
            student, {f"blocks.{k}": t for k, t in enumerate(tensors)}, (x,)
        )

    tensors = [t.clone().requires_grad_() for t in originals]
    assert torch.autograd.gradcheck(f, tensors)


def test_the_padding_of_an_open_end_gets_no_gradient_and_stays_zero():
    torch.manual_seed(2)
    student = GraphStudent(chain_graph(num_sites=6, bonds=3))  # open ends: (d, D) and (D, d)
    stacked = student.blocks[0]
    assert stacked.shape == (6, 3, 2, 3)
    opt = torch.optim.AdamW(student.parameters(), lr=0.1)
    x, y = torch.rand(16, 6), torch.randint(0, 3, (16,))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(student(x), y).backward()
        assert stacked.grad[0, 1:].abs().max() == 0 and stacked.grad[-1, ..., 1:].abs().max() == 0
        opt.step()
    assert stacked[0, 1:].abs().max() == 0 and stacked[-1, ..., 1:].abs().max() == 0


@pytest.mark.parametrize("label_position", [0, 5, 11])
def test_mps_classifier_and_its_graph_give_the_same_outputs_and_plan(label_position):
    torch.manual_seed(3)
    mps = MPSClassifier(11, 4, bond_dim=5, label_position=label_position, init_std=0.5).double()
    drawn = GraphStudent(mps.to_graph()).double()
    with torch.no_grad():
        drawn.log_logit_scale.copy_(mps.log_logit_scale)
    x = torch.rand(6, 11, dtype=torch.float64)
    assert torch.allclose(drawn(x), mps(x), rtol=1e-12, atol=1e-12)
    assert drawn.plan() == mps.plan()
    assert drawn.parameter_count() == mps.parameter_count()


@pytest.mark.parametrize(
    ("make", "options"), [(TreeClassifier, {}), (PEPSClassifier, {"patch": 2})]
)
def test_tree_and_peps_plans_survive_drawing_them_again(make, options):
    student = make(input_shape=(1, 4, 4), num_classes=3, bond_dim=2, **options)
    again = GraphStudent(student.to_graph(), input_shape=(1, 4, 4), **options)
    assert again.plan() == student.plan()
    with torch.no_grad():
        again.log_logit_scale.copy_(student.log_logit_scale)
    x = torch.rand(3, 1, 4, 4)
    assert torch.allclose(again(x), student(x), atol=1e-6)


def test_plans_name_the_engine_and_say_why():
    tree = TreeClassifier(input_shape=(16,), num_classes=3, bond_dim=3)
    assert tree.plan().engine == "tree"
    refused = dict(tree.plan().refused)
    assert "reads two inputs" in refused["chain"]
    peps = PEPSClassifier(input_shape=(1, 4, 4), num_classes=3, bond_dim=2, patch=2)
    assert peps.plan().engine == "reference"
    assert "two children" in dict(peps.plan().refused)["tree"]
    assert "shallow" in dict(peps.plan().refused)["stable"]
    assert "open path" in dict(peps.plan().refused)["chain"]
    text = str(GraphStudent(chain_graph(num_sites=5, bonds=2)).plan())
    assert text.startswith("chain engine (") and "the graph is a chain" in text
    engines = set(METHODS) - {"auto"} - set(KERNELS)
    assert set(ENGINES.names()) == engines | {"portable"}  # portable: export only
    assert set(KERNELS.values()) <= engines


def test_asking_for_an_engine_by_name():
    graph = chain_graph(num_sites=6, bonds=3)
    x = torch.rand(4, 6, dtype=torch.float64)
    values = {}
    for method in ("auto", "chain", "stable", "reference"):
        torch.manual_seed(4)  # the same initial tensors for every engine
        student = GraphStudent(graph, method=method, output="raw").double()
        assert student.plan().engine == ("chain" if method == "auto" else method)
        values[method] = student(x)
    for method, value in values.items():
        assert torch.allclose(value, values["reference"], rtol=1e-10), method
    with pytest.raises(ValueError, match="not join a node with its two children"):
        GraphStudent(graph, method="tree")
    with pytest.raises(ValueError, match="expected one of: auto, chain, tree, tt_matrix, stable"):
        plan(graph.spec(), "fastest")
    tree = TreeClassifier(input_shape=(16,), num_classes=3, bond_dim=3)
    with pytest.raises(ValueError, match="reads two inputs"):
        GraphStudent(tree.to_graph(), method="chain")


def _inputs(nodes: list) -> list:
    xs = [make_node((2,), f"x{i}", ["p"]) for i in range(len(nodes))]
    for node, x in zip(nodes, xs, strict=True):
        connect(node, "p", x, "p")
    return xs


def test_graphs_that_are_not_chains_say_why():
    # a ring of cores with the label tensor hanging off one of them: a core with three bonds
    ring = [make_node((2, 2, 2, 2), "A0", ["l", "p", "r", "o"])]
    ring += [make_node((2, 2, 2), f"A{i}", ["l", "p", "r"]) for i in (1, 2, 3)]
    for a, b in zip(ring, ring[1:] + ring[:1], strict=True):
        connect(a, "r", b, "l")
    out = make_node((2, 3), "O", ["o", "c"])
    connect(ring[0], "o", out, "o")
    xs = _inputs(ring)
    layout, why = recognise_chain(
        TNGraph([*ring, out, *xs], [x.name for x in xs], [out["c"]]).spec()
    )
    assert layout is None and "3 bonds" in why
    # a closed ring, the label on a core: no open ends
    ring = [make_node((2, 2, 2, 3), "B0", ["l", "p", "r", "c"])]
    ring += [make_node((2, 2, 2), f"B{i}", ["l", "p", "r"]) for i in (1, 2)]
    for a, b in zip(ring, ring[1:] + ring[:1], strict=True):
        connect(a, "r", b, "l")
    xs = _inputs(ring)
    graph = TNGraph([*ring, *xs], [x.name for x in xs], [ring[0]["c"]])
    layout, why = recognise_chain(graph.spec())
    assert layout is None and "open path" in why
    # a bond matrix between two sites
    a = make_node((2, 2), "A", ["p", "r"])
    m = make_node((2, 2), "M", ["l", "r"])
    b = make_node((2, 2, 3), "B", ["l", "p", "c"])
    connect(a, "r", m, "l")
    connect(m, "r", b, "l")
    xs = _inputs([a, b])
    layout, why = recognise_chain(TNGraph([a, m, b, *xs], [x.name for x in xs], [b["c"]]).spec())
    assert layout is None and "bond matrix" in why
    # the stable engine still contracts what the chain engine refuses
    student = GraphStudent(TNGraph([a, m, b, *xs], [x.name for x in xs], [b["c"]]))
    assert student.plan().engine in ("stable", "reference")


@pytest.mark.parametrize("feature_map", ["linear", "trig"])
@pytest.mark.parametrize("label", ["middle", "end"])
def test_784_site_drawn_chains_stay_finite(feature_map, label):
    torch.manual_seed(5)
    student = GraphStudent(
        chain_graph(num_sites=784, bonds=10, label=label), feature_map=feature_map
    )
    x = torch.rand(8, 784)
    values, log_scale = student.log_forward(x)
    logits = student(x)
    assert torch.isfinite(values).all() and torch.isfinite(log_scale).all()
    assert torch.isfinite(logits).all() and logits.abs().amax() > 0
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters())


def test_node_tensors_round_trip_through_the_graph():
    torch.manual_seed(6)
    graph = chain_graph(num_sites=6, bonds=[2, 4, 3, 5, 4, 2], axis_order="prl", shuffle=1)
    student = GraphStudent(graph, output="raw", init_std=0.5).double()
    again = GraphStudent(student.to_graph(), output="raw").double()
    x = torch.rand(4, 6, dtype=torch.float64)
    assert torch.allclose(again(x), student(x), rtol=1e-12)
    tensors = {k: torch.rand_like(v) for k, v in student.node_tensors().items()}
    student.load_node_tensors(tensors)
    for k, v in student.node_tensors().items():
        assert torch.equal(v, tensors[k])


def test_mps_classifier_is_a_graph_student_and_keeps_its_checkpoint_format():
    """Checkpoints written before MPSClassifier became a graph student hold exactly these
    tensors (names, shapes, order); they load as they are."""
    mps = MPSClassifier(7, 3, bond_dim=4, label_position=2)
    assert isinstance(mps, GraphStudent) and mps.plan().engine == "chain"
    shapes = [(name, tuple(t.shape)) for name, t in mps.state_dict().items()]
    assert shapes == [
        ("cores", (7, 4, 2, 4)),
        ("left", (4,)),
        ("right", (4,)),
        ("output_core", (4, 3, 4)),
        ("log_logit_scale", ()),
    ]
    uniform = MPSClassifier(7, 3, bond_dim=4, uniform=True)
    assert uniform.state_dict()["cores"].shape == (1, 4, 2, 4)
    assert uniform.parameter_count() == 4 * 2 * 4 + 4 + 4 + 4 * 3 * 4 + 1
    x = torch.rand(5, 7, dtype=torch.float64)
    uniform = uniform.double()
    again = GraphStudent(uniform.to_graph()).double()  # the same graph, sites untied
    with torch.no_grad():
        again.log_logit_scale.copy_(uniform.log_logit_scale)
    assert torch.allclose(again(x), uniform(x), rtol=1e-12)
    fresh = MPSClassifier(7, 3, bond_dim=4, label_position=2)
    fresh.load_state_dict(mps.state_dict())
    assert torch.equal(fresh(x.float()), mps(x.float()))


@pytest.mark.parametrize("equal_cores", [False, True])
def test_tt_network_is_a_graph_student_on_the_chain_engine_with_its_checkpoint_format(equal_cores):
    from tnkd.students import TTNetwork

    torch.manual_seed(7)
    net = TTNetwork((1, 4, 4), 3, patch_size=2, rank=3, equal_cores=equal_cores).double()
    assert isinstance(net, GraphStudent) and net.plan().engine == "chain"
    inner = 1 if equal_cores else 2
    assert [(k, tuple(v.shape)) for k, v in net.state_dict().items()] == [
        ("first", (4, 3)),
        ("inner_cores", (inner, 3, 4, 3)),
        ("last", (3, 4, 3)),
        ("log_logit_scale", ()),
        ("feature_map.weight", (1, 4, 3)),
        ("feature_map.bias", (1, 3)),
    ]
    net.output = "raw"
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    phi = net.features(x).unbind(1)
    reference = torch.einsum("abcdk,na,nb,nc,nd->nk", net.full_tensor(), *phi)
    assert torch.allclose(net(x), reference, rtol=1e-10)


def test_a_tt_layer_is_a_tt_matrix_graph_for_the_planner():
    from tnkd.students import TTLinear
    from tnkd.tn.contraction import CompiledNetwork
    from tnkd.tn.planner import recognise_tt_matrix

    torch.manual_seed(8)
    layer = TTLinear(24, 12, in_factors=(2, 3, 4), out_factors=(3, 2, 2), ranks=3).double()
    chosen = layer.plan()
    assert chosen.engine == "tt_matrix" and dict(chosen.refused)["chain"].startswith("it has 3")
    # the graph the planner read is the layer: its dense contraction is x @ W.T
    graph = layer.to_graph()
    x = torch.rand(5, 24, dtype=torch.float64)
    operands = [node.tensor for node in graph.nodes if node.name != "x"]
    dense = CompiledNetwork(graph)([*operands, x.view(5, 2, 3, 4)]).reshape(5, 12)
    assert torch.allclose(layer(x) - layer.bias, dense, rtol=1e-10)
    # a chain is not a TT-matrix, and says why
    ok, why = recognise_tt_matrix(chain_graph(num_sites=4, bonds=2).spec())
    assert not ok and "input nodes" in why


@pytest.mark.parametrize(
    ("inner", "root"),
    [
        (["up", "in0", "in1"], ["label", "a", "b"]),  # the parent's axis first
        (["in1", "up", "in0"], ["b", "a", "label"]),  # children the other way round
    ],
)
def test_a_binary_tree_drawn_with_any_axis_order_runs_the_tree_engine(inner, root):
    torch.manual_seed(12)
    xs = [make_node((2,), f"x{k}", ["phys"]) for k in range(4)]
    sizes = {"up": 3, "in0": 2, "in1": 2, "label": 4, "a": 3, "b": 3}
    pair = [make_node(tuple(sizes[n] for n in inner), f"t{k}", inner) for k in range(2)]
    top = make_node(tuple(sizes[n] for n in root), "root", root)
    for k, node in enumerate(pair):
        connect(node, "in0", xs[2 * k], "phys")
        connect(node, "in1", xs[2 * k + 1], "phys")
        connect(node, "up", top, "ab"[k])
    graph = TNGraph([*pair, top, *xs], [x.name for x in xs], [top["label"]])
    student = GraphStudent(graph, output="raw", init_std=0.5).double()
    assert student.plan().engine == "tree"
    x = torch.rand(5, 4, dtype=torch.float64)
    ref = evaluate_dense(
        dense_coefficients(student.to_graph()), list(student.features(x).unbind(1))
    )
    assert torch.allclose(student(x), ref, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(student(x).sin().sum(), [student.blocks[0]])
    student.tree_plan.native = False  # the stable engine reads the weights the same way
    (again,) = torch.autograd.grad(student(x).sin().sum(), [student.blocks[0]])
    assert torch.allclose(grad, again, rtol=1e-10, atol=1e-12)


FAMILIES = {
    "mps": lambda m: MPSClassifier(6, 3, bond_dim=3, output="raw", init_std=0.5, method=m),
    "uniform mps": lambda m: MPSClassifier(
        5, 2, bond_dim=3, uniform=True, output="raw", init_std=0.5, method=m
    ),
    "tt network": lambda m: TTNetwork(
        (1, 4, 4), 3, patch_size=2, rank=3, output="raw", init_std=0.5, method=m
    ),
    "tree": lambda m: TreeClassifier((8,), 3, bond_dim=3, output="raw", init_std=0.5, method=m),
    "peps": lambda m: PEPSClassifier(
        (1, 4, 4), 3, bond_dim=2, patch=2, output="raw", init_std=0.5, method=m
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_student_takes_every_engine_that_accepts_its_graph(family):
    # one vocabulary: an engine's name (or a kernel's) works on every family whose graph it
    # accepts, with the same parameters, and the values equal the dense contraction (float64)
    torch.manual_seed(3)
    auto = FAMILIES[family]("auto").double()
    state = auto.state_dict()
    x = torch.rand(4, *(auto.input_shape or (auto.num_inputs,)), dtype=torch.float64)
    graph = auto.to_graph()
    phi = auto.features(x)
    ref = evaluate_dense(dense_coefficients(graph), list(phi.unbind(1)))
    methods = ["auto", "stable", "reference"]
    methods += ["native", "scan", "log_depth"] if auto.engine == "chain" else []
    methods += ["tree"] if auto.engine == "tree" else []
    for method in methods:
        torch.manual_seed(3)
        student = FAMILIES[family](method).double()
        student.load_state_dict(state)  # the same parameters whichever engine runs
        name = {"auto": auto.engine}.get(method, KERNELS.get(method, method))
        assert student.plan().engine == name, method
        assert student.method == method
        assert torch.allclose(student(x), ref, rtol=1e-10, atol=1e-12), method
        if method in ("scan", "log_depth"):  # the plan names the kernel asked for
            assert student.plan().kernel == CHAIN_KERNELS[method], method


def test_switching_the_method_of_a_built_student():
    torch.manual_seed(5)
    mps = MPSClassifier(6, 3, bond_dim=3, output="raw", init_std=0.5).double()
    x = torch.rand(4, 6, dtype=torch.float64)
    before = mps(x)
    for method in ("scan", "log_depth", "stable", "reference", "chain"):
        mps.method = method
        assert mps.plan().engine == KERNELS.get(method, method)
        assert torch.allclose(mps(x), before, rtol=1e-10), method
    assert "log-depth" in str(MPSClassifier(6, 3, method="log_depth").plan())
    with pytest.raises(ValueError, match="does not join a node with its two children"):
        mps.method = "tree"  # examined on the way: a chain with inputs is no binary tree
    tree = TreeClassifier((8,), 3, bond_dim=3)
    tree.method = "stable"
    assert tree.plan().engine == "stable" and not tree.fast_path
    tree.method = "tree"
    with pytest.raises(ValueError, match="stored as the pairwise engines read them, not the chain"):
        GraphStudent(chain_graph(num_sites=5, bonds=2), method="stable").method = "chain"
    with pytest.raises(ValueError, match="method must be one of"):
        tree.method = "fastest"


def test_compiled_runs_the_stable_engine_through_torch_compile(monkeypatch):
    traced = []

    def compile_eagerly(fn, **kwargs):  # the eager backend: traced by dynamo, not built by inductor
        traced.append(fn)
        return torch._dynamo.optimize("eager")(fn)

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    torch.manual_seed(2)
    tree = TreeClassifier((8,), 3, bond_dim=3, output="raw", init_std=0.5, method="compiled")
    tree = tree.double()
    plan = tree.plan()
    assert (plan.engine, plan.kernel) == (
        "stable",
        "grouped einsum steps compiled by torch.compile (inductor)",
    )
    x = torch.rand(4, 8, dtype=torch.float64)
    ref = evaluate_dense(dense_coefficients(tree.to_graph()), list(tree.features(x).unbind(1)))
    assert torch.allclose(tree(x), ref, rtol=1e-10, atol=1e-12)
    assert len(traced) == 1


def test_a_student_never_plans_an_engine_it_does_not_run():
    # one matrix against one input is a TT-matrix of one core: TTLinear's engine, not a student's
    torch.manual_seed(1)
    w = make_node((2, 3), "W", ["phys", "label"])
    x = make_node((2,), "x0", ["phys"])
    connect(w, "phys", x, "phys")
    student = GraphStudent(TNGraph([w, x], ["x0"], [w["label"]]), output="raw").double()
    plan = student.plan()
    assert plan.engine in ("stable", "reference")
    assert "TT-matrix" in dict(plan.refused)["tt_matrix"]
    u = torch.rand(4, 1, dtype=torch.float64)
    weights = student.node_tensors()["W"]
    assert torch.allclose(student(u), student.features(u)[:, 0] @ weights, rtol=1e-12)
