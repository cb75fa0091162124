"""The planner: a graph's shape and the device choose the contraction engine, in one place.

A student is its tensor-network graph (:class:`~tnkd.tn.graph.TNGraph`). Which engine contracts
it is decided here, from what the graph *is*, not from how it was built: a chain drawn by hand
(its label anywhere) is recognised as a chain, a balanced binary tree however drawn as a tree.
The engines live in one registry, :data:`ENGINES`, in the order ``"auto"`` tries them:

========== ============================================ ==========================================
engine     accepts                                      runs
========== ============================================ ==========================================
chain      a path of tensors, one label, at most one    :func:`~tnkd.tn.chain.contract_chain`:
           input per tensor (:func:`recognise_chain`)   native scan on CPU, log-depth products on
                                                        accelerators (:func:`chain_kernel`),
                                                        tracked log-scale
tree       a binary tree: every step joins a node with  :class:`~tnkd.tn.fused.FastTree`: native
           its two children (:func:`examine_tree`)      level loop on CPU, tracked log-scale
tt_matrix  a TT-matrix (MPO) against one input: a       :func:`~tnkd.tn.tt_matrix.tt_linear`:
           path of cores, each with an input leg and    merged neighbouring cores, the order
           an output leg (a TT layer)                   planned per batch size by counted MACs
stable     any graph with an input                      :class:`~tnkd.tn.stable.StableNetwork`:
                                                        the planned pairwise path, log-scale
reference  any graph                                    one ``opt_einsum`` expression
                                                        (:class:`~tnkd.tn.contraction.CompiledNetwork`),
                                                        rescaled per sample after it
========== ============================================ ==========================================

``auto`` takes the first engine that accepts the graph, with one rule between ``stable`` and
``reference``: a shallow graph that grouping does not help (a contraction tree of at most
:data:`PLAIN_MAX_DEPTH` levels whose groups save fewer than half the steps, such as a 4x4 PEPS)
runs as one einsum, and a batch whose values then leave the float range (not finite, or all
zero in a sample) is contracted again by the stable engine (:func:`reference_values`).

Every student takes one vocabulary, ``method=``: ``"auto"``, an engine's name, or the name of
one of an engine's kernels (:data:`KERNELS`), which runs that engine with that kernel: the
chain's ``"native"``, ``"scan"`` and ``"log_depth"`` (otherwise :func:`chain_kernel` picks one
for the device), and ``"compiled"``, the stable engine traced by ``torch.compile``.
:func:`plan` returns a :class:`Plan` that says which engine runs, on which device, why, and why
each engine tried before it refused (the way PyTorch's ``scaled_dot_product_attention`` explains
its kernel choice).

Example:
    >>> from tnkd.students import MPSClassifier
    >>> graph = MPSClassifier(num_sites=8, num_classes=3, bond_dim=4).to_graph()
    >>> recognise_chain(graph.spec())[0].label_position  # after the left boundary and 4 sites
    5
    >>> plan(graph.spec(), "auto").engine
    'chain'
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tnkd.registry import Registry
from tnkd.tn import native
from tnkd.tn.fused import TreePlan, tree_plan
from tnkd.tn.graph import NetworkSpec, index_ends
from tnkd.tn.stable import StableNetwork, rescaled


@dataclass(frozen=True)
class ChainNode:
    """One tensor of a chain and the roles of its axes (axis numbers of the graph node)."""

    index: int  # the node's position in the spec
    left: int | None  # the bond towards the chain's start
    right: int | None  # the bond towards the chain's end
    phys: int | None = None  # the axis joined to an input node
    label: int | None = None  # the dangling label axis
    input_node: int | None = None  # spec index of the input node on ``phys``

    def canonical(self) -> tuple[int, ...]:
        """The node's axes in the chain engine's order: left, phys, label, right (those present)."""
        return tuple(a for a in (self.left, self.phys, self.label, self.right) if a is not None)


@dataclass(frozen=True)
class ChainLayout:
    """A graph recognised as a chain (matrix product state), start to end.

    Attributes:
        nodes: the parameter tensors along the chain, with their axes' roles.
        label_position: index in ``nodes`` of the tensor that carries the label.
        bond_dim: the largest bond dimension (smaller bonds are zero-padded to it).
        site_dim: the feature size of the inputs.
    """

    nodes: tuple[ChainNode, ...]
    label_position: int
    bond_dim: int
    site_dim: int

    @functools.cached_property
    def sites(self) -> tuple[ChainNode, ...]:
        """The tensors that read an input, other than the label tensor, in chain order."""
        return tuple(
            n for k, n in enumerate(self.nodes) if n.phys is not None and k != self.label_position
        )

    @property
    def label_node(self) -> ChainNode:
        """The tensor that carries the label."""
        return self.nodes[self.label_position]

    @functools.cached_property
    def sites_before_label(self) -> int:
        """Number of input-reading tensors before the label tensor."""
        return sum(n.phys is not None for n in self.nodes[: self.label_position])


def recognise_chain(spec: NetworkSpec) -> tuple[ChainLayout | None, str]:
    """The chain layout of ``spec`` and ``""``, or None and why it is not a chain.

    A chain is a path of tensors (each joined to the next by one bond) with one dangling label
    edge on any tensor, every tensor reading at most one input; a tensor that reads no input may
    stand only at an end (a boundary vector) or carry the label. Bond dimensions may differ.
    """
    inputs = {k for k, n in enumerate(spec.node_names) if n in spec.input_nodes}
    params = [k for k in range(len(spec.node_names)) if k not in inputs]
    if len(spec.output_indices) != 1:
        return None, f"it has {len(spec.output_indices)} dangling edges, a chain has one label"
    names, ends = spec.node_names, index_ends(spec.node_indices)
    bonds: dict[int, dict[int, int]] = {k: {} for k in params}  # node -> {neighbour: axis}
    roles: dict[int, dict[str, int]] = {k: {} for k in params}  # ChainNode's phys, label, ...
    for k in params:
        for axis, name in enumerate(spec.node_indices[k]):
            if name == spec.output_indices[0]:
                roles[k]["label"] = axis
                continue
            ((other, _),) = [e for e in ends[name] if e != (k, axis)]
            if other in inputs and "phys" in roles[k]:
                return None, f"tensor {names[k]!r} reads two inputs"
            if other in inputs:
                roles[k].update(phys=axis, input_node=other)
            elif other in bonds[k]:
                return None, f"tensors {names[k]!r} and {names[other]!r} share two edges"
            else:
                bonds[k][other] = axis
    for node, b in bonds.items():
        if len(b) > 2:
            return None, f"tensor {names[node]!r} has {len(b)} bonds (a chain: 2)"
    ends_of_path = [k for k in params if len(bonds[k]) <= 1]
    order = (ends_of_path or params)[:1]
    for _ in params[1:]:  # walk from one end: on to the neighbour it did not come from
        order += [k for k in bonds[order[-1]] if k not in order[-2:-1]][:1]
    if len(ends_of_path) != 2 or len(set(order)) != len(params):
        return None, "its tensors do not form one open path"
    nodes = []
    for pos, k in enumerate(order):
        if not roles[k] and 0 < pos < len(order) - 1:
            return None, (
                f"tensor {names[k]!r} inside the chain reads no input and carries no label "
                "(a bond matrix)"
            )
        prev = order[pos - 1] if pos else None
        nxt = order[pos + 1] if pos + 1 < len(order) else None
        nodes.append(ChainNode(k, bonds[k].get(prev), bonds[k].get(nxt), **roles[k]))
    label_positions = [p for p, n in enumerate(nodes) if n.label is not None]
    if len(label_positions) != 1:
        return None, "no tensor carries the label"
    sizes = [spec.node_shapes[n.index][n.phys] for n in nodes if n.phys is not None]
    if not sizes or len(set(sizes)) != 1:
        return None, "its inputs differ in size"
    bond = max(
        spec.node_shapes[n.index][a] for n in nodes for a in (n.left, n.right) if a is not None
    )
    return ChainLayout(tuple(nodes), label_positions[0], bond, sizes[0]), ""


def recognise_tt_matrix(spec: NetworkSpec) -> tuple[bool, str]:
    """Whether ``spec`` is a TT-matrix against one input node, and if not, why.

    A TT-matrix (matrix product operator) is a path of cores, each with one leg on the single
    input node (a factor of the input) and one dangling leg (a factor of the output).
    """
    inputs = [k for k, n in enumerate(spec.node_names) if n in spec.input_nodes]
    if len(inputs) != 1:
        return False, f"it has {len(inputs)} input nodes, a TT-matrix has one"
    inputs_indices = set(spec.node_indices[inputs[0]])
    outputs = set(spec.output_indices)
    cores = [k for k in range(len(spec.node_names)) if k != inputs[0]]
    links = 0
    for k in cores:
        name, indices = spec.node_names[k], spec.node_indices[k]
        if [sum(i in legs for i in indices) for legs in (inputs_indices, outputs)] != [1, 1]:
            return False, f"tensor {name!r} does not take one input and give one output leg"
        bonds = [i for i in indices if i not in inputs_indices and i not in outputs]
        if len(bonds) > 2:
            return False, f"tensor {name!r} has {len(bonds)} bonds (a TT-matrix: 2)"
        links += len(bonds)
    if links != 2 * (len(cores) - 1):
        return False, "its cores do not form one open path"
    return True, ""


@dataclass
class GraphShape:
    """What the planner knows about a graph: its spec, and its shape as a chain or a tree."""

    spec: NetworkSpec
    chain: ChainLayout | None
    why_not_chain: str
    why_not_tt_matrix: str  # "": a TT-matrix against one input (a TT layer)
    shallow: bool = False  # one einsum beats the grouped steps (see examine_tree)
    why_not_tree: str = "not examined"  # "": a binary tree of pair steps (see examine_tree)


def examine(spec: NetworkSpec, student: bool = False) -> GraphShape:
    """A chain, a TT-matrix (a student's never runs so) as the spec tells; a tree: examine_tree."""
    why_not_tt = recognise_tt_matrix(spec)[1]
    why_not_tt = "a student runs a TT-matrix pairwise" if student and not why_not_tt else why_not_tt
    return GraphShape(spec, *recognise_chain(spec), why_not_tt)


def examine_tree(shape: GraphShape, optimize="auto") -> tuple[StableNetwork, TreePlan | None]:
    """The graph's pairwise schedule, and the tree engine's plan when it is a binary tree.

    A binary tree is a schedule whose every step joins a node with its two children
    (:func:`~tnkd.tn.fused.tree_plan`), however the graph was drawn. Sets ``shape.why_not_tree``
    and ``shape.shallow`` (the rule in the module docstring; one einsum is faster there, as
    measured by ``benchmarks/plain_vs_stable.py``).
    """
    network = StableNetwork(shape.spec, optimize=optimize)
    tree, shape.why_not_tree = tree_plan(network)
    shape.shallow = network.depth <= PLAIN_MAX_DEPTH and 2 * network.kernels > len(network.path)
    return network, tree


def reference_values(
    values: torch.Tensor, rerun: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference engine's ``(values, log_scale)``: one einsum's values rescaled per sample.

    With ``rerun`` (the stable engine, where ``auto`` chose the reference for a shallow graph),
    a batch whose values are not finite or all zero in a sample is ``rerun()`` instead.
    """
    scaled, log, peak = rescaled(values, range(1, values.ndim))
    if rerun is not None and not bool((torch.isfinite(peak) & (peak > 0)).all()):
        return rerun()
    return scaled, log.reshape(-1)


@dataclass(frozen=True)
class Engine:
    """One contraction engine: its name, which graphs it takes, and what it says about itself.

    ``refuse(shape, device)`` returns None when the engine accepts the graph, else the reason;
    ``kernel(shape, device, asked)`` names what runs inside it, the kernel ``method=`` asked for
    or its own choice for ``asked="auto"`` (the table in :mod:`tnkd.tn.planner`), and why ("").
    """

    name: str
    refuse: Callable[[GraphShape, torch.device], str | None]
    reason: str  # why ``auto`` chose it
    kernel: Callable[[GraphShape, torch.device, str], tuple[str, str]]


#: contraction-tree depth up to which ``auto`` may prefer one einsum (see :func:`examine_tree`)
PLAIN_MAX_DEPTH = 12
#: every contraction engine, in the order ``method="auto"`` tries them
ENGINES: Registry[Engine] = Registry("contraction engine")
AUTO_ORDER = ("chain", "tree", "tt_matrix", "stable", "reference")


#: the chain engine's kernels (:func:`tnkd.tn.chain.contract_chain`), what each is
CHAIN_KERNELS = {
    "native": "native scan (C++)",
    "scan": "scan (torch steps, autograd)",
    "log_depth": "log-depth products",
}
#: the largest bond dimension the log-depth products run at on accelerators (D^3 per site)
TREE_MAX_BOND_DIM = 64
#: the largest bond dimension at which the scans merge two sites into one step
SCAN_MAX_MERGED_BOND_DIM = 32


def chain_kernel(
    kernel: str, bond_dim: int, device=None, dtype: torch.dtype | None = None
) -> tuple[str, str]:
    """The chain engine's kernel for this device, bond dimension and dtype, and why.

    ``"auto"``: on a CPU the native scan, or the Python scan where the native kernels cannot be
    compiled (:func:`tnkd.tn.native.kernels`), while ``torch.compile`` traces (it cannot trace
    into native functions), and for dtypes other than float32 and float64; on accelerators the
    log-depth products for D <= ``TREE_MAX_BOND_DIM`` and the Python scan above (the products'
    D^3 work and memory per site outgrow the scan's D^2). A kernel named here is taken as asked,
    except that ``"native"`` runs the Python scan where the native kernels do not (another
    device or dtype, no compiler).

    Example:
        >>> chain_kernel("auto", 10, torch.device("cuda"))
        ('log_depth', 'an accelerator at D <= 64: log-depth products')
    """
    if kernel not in ("auto", *CHAIN_KERNELS):
        raise ValueError(
            f"chain kernel must be one of {('auto', *CHAIN_KERNELS)}, but got {kernel!r}"
        )
    device = torch.device("cpu" if device is None else device)
    if kernel == "log_depth" or kernel == "scan":
        return kernel, "asked for by name"
    if kernel == "auto" and device.type != "cpu":
        if bond_dim <= TREE_MAX_BOND_DIM:
            return "log_depth", f"an accelerator at D <= {TREE_MAX_BOND_DIM}: log-depth products"
        return "scan", f"an accelerator at D > {TREE_MAX_BOND_DIM}: the scan"
    if device.type != "cpu" or dtype not in (None, torch.float32, torch.float64):
        return "scan", "the native scan runs float32 and float64 on a CPU only"
    if torch.compiler.is_compiling():
        return "scan", "torch.compile cannot trace into the native scan"
    if native.kernels() is None:
        return "scan", "the native scan could not be compiled here"
    return "native", "a CPU: the native scan"


def _chain_kernel_named(shape: GraphShape, device: torch.device, asked: str) -> tuple[str, str]:
    name, why = chain_kernel(asked, shape.chain.bond_dim, device)
    return CHAIN_KERNELS[name], why


for _engine in (
    Engine(
        "chain", lambda s, d: s.why_not_chain or None, "the graph is a chain", _chain_kernel_named
    ),
    Engine(
        "tree",
        lambda s, d: s.why_not_tree or None,
        "the graph is a binary tree",
        lambda s, d, k: (
            "native level loop (C++)"
            if d.type == "cpu" and native.kernels("tree_levels") is not None
            else "the stable engine's grouped einsum steps",
            "",
        ),
    ),
    Engine(
        "tt_matrix",
        lambda s, d: s.why_not_tt_matrix or None,
        "the graph is a TT-matrix against one input",
        lambda s, d, k: ("merged-core sweep (hand-written backward)", ""),
    ),
    Engine(
        "stable",
        lambda s, d: None if s.spec.input_nodes else "the graph has no input node",
        "a graph of another shape: pairwise steps with a log-scale",
        lambda s, d, k: (
            "grouped einsum steps" + " compiled by torch.compile (inductor)" * (k == "compiled"),
            "",
        ),
    ),
    Engine(
        "reference",
        lambda s, d: None,
        "a shallow graph: one einsum (a batch out of range: the stable engine)",
        lambda s, d, k: ("opt_einsum expression", ""),
    ),
    Engine(  # not tried by "auto": tnkd.export.portable switches a student to it (torch.export)
        "portable",
        lambda s, d: None,
        "asked for by name only",
        lambda s, d, k: (
            "boundary sweeps in tensor ops" if s.chain else "rescaled einsum steps",
            "",
        ),
    ),
):
    ENGINES.add(_engine.name, _engine)

#: the kernels ``method=`` may name, and the engine each runs in
KERNELS = {**dict.fromkeys(CHAIN_KERNELS, "chain"), "compiled": "stable"}
#: every name ``method=`` takes: ``"auto"``, an engine's, or a kernel's (its engine, that kernel)
METHODS = ("auto", *AUTO_ORDER, *KERNELS)


def engine_and_kernel(method: str) -> tuple[str, str]:
    """``(engine or "auto", kernel or "auto")`` that a ``method=`` name asks for.

    Example:
        >>> engine_and_kernel("native"), engine_and_kernel("stable")
        (('chain', 'native'), ('stable', 'auto'))
    """
    if method not in METHODS and method != "portable":
        raise ValueError(
            f"unknown contraction method {method!r}; expected one of: {', '.join(METHODS)}"
        )
    return KERNELS.get(method, method), method if method in KERNELS else "auto"


@dataclass(frozen=True)
class Plan:
    """Which engine contracts a graph, on which device, and why.

    Attributes:
        engine: the engine's name in :data:`ENGINES`.
        kernel: what runs inside it on this device (e.g. ``"native scan (C++)"``).
        device: the device type.
        reason: why this engine.
        refused: ``(engine, why not)`` for each engine tried before it.
    """

    engine: str
    kernel: str
    device: str
    reason: str
    refused: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        lines = [f"{self.engine} engine ({self.kernel}) on {self.device}: {self.reason}"]
        lines += [f"  not {name}: {why}" for name, why in self.refused]
        return "\n".join(lines)


def choose(
    shape: GraphShape, method: str = "auto", device=None
) -> tuple[Engine, str, tuple[tuple[str, str], ...]]:
    """The engine for a graph, why, and why each engine tried before it refused (see :func:`plan`)."""
    device = torch.device("cpu" if device is None else device)
    name = engine_and_kernel(method)[0]
    if name != "auto":
        engine = ENGINES.get(name)
        why = engine.refuse(shape, device)
        if why is not None:
            raise ValueError(f"method={method!r} cannot contract this graph: {why}; use 'auto'")
        return engine, "asked for by name", ()
    refused = []
    for name in AUTO_ORDER:
        engine = ENGINES.get(name)
        why = engine.refuse(shape, device)
        if why is None and name == "stable" and shape.shallow:
            why = "the graph is shallow and grouping saves few kernels: one einsum is faster"
        if why is None:
            return engine, engine.reason, tuple(refused)
        refused.append((name, why))
    raise AssertionError("the reference engine accepts every graph")  # pragma: no cover


def plan(shape: GraphShape | NetworkSpec, method: str = "auto", device=None) -> Plan:
    """Choose the engine for a graph: ``method`` names one, or ``"auto"`` tries them in order.

    Args:
        shape: the graph's :class:`GraphShape` (or its spec, examined for a chain only).
        method: ``"auto"``, an engine's name, or a kernel's (:data:`KERNELS`: that kernel of its
            engine; the chain engine's kernel is otherwise :func:`chain_kernel`'s choice, whose
            reason the plan's joins).
        device: where the contraction runs (default CPU).

    Returns:
        The :class:`Plan`: the engine, the kernel it runs on this device, and the reasons.

    Raises:
        ValueError: an unknown name (the error lists the valid ones), or an engine that does not
            accept this graph (the error says why).
    """
    shape = shape if isinstance(shape, GraphShape) else examine(shape)
    device = torch.device("cpu" if device is None else device)
    engine, reason, refused = choose(shape, method, device)
    kernel, why = engine.kernel(shape, device, engine_and_kernel(method)[1])
    reason = reason if why in ("", reason) else f"{reason}; {why}"
    return Plan(engine.name, kernel, device.type, reason, refused)
