"""Students defined by their graph: draw a tensor network with nodes and edges, train it.

A :class:`GraphStudent` is built from a :class:`~tnkd.tn.graph.TNGraph` drawn with
:func:`~tnkd.tn.graph.make_node` and :func:`~tnkd.tn.graph.connect` (``tensornetwork`` nodes with
named axes): **parameter nodes** (every node that is not an input; trained), **input nodes** (one
small node per site, a pixel or a patch, whose one axis of the site's feature size connects to a
parameter node; the feature map fills them per sample) and **one dangling edge**, the label.

The student is f_c(x) = the contraction of the graph with phi(x_site) on every input node; with
``output="normalized"`` its logits are s * f(x) / ||f(x)|| with a learned scale s, as
:class:`~tnkd.students.mps.MPSClassifier`'s. The planner picks the engine from the graph's shape
(a chain, a binary tree, any graph: the table in :mod:`tnkd.tn.planner`), and
:meth:`GraphStudent.plan` says which and why. Results equal the dense contraction's (tested in
float64).

**Initialisation.** A node made from a shape (all zeros) is initialised by tnkd; a node made
from a tensor keeps it. The initial tensor generalises the near-identity cores of an MPS: a
*copy tensor* over the node's bond axes (1 where all bond indices are equal), times the feature
map's ``neutral`` vector w on every input axis (w . phi(x) ~= 1), times ones on the label axis,
plus Gaussian noise of standard deviation ``init_std / sqrt(prod(bond dims) / max(bond dims))``.
A graph of copy tensors contracts to (number of channels) x prod_sites w . phi(x_site) whatever
its shape (chain, tree, loops): every class starts level near the bond dimension, and the noise
makes each parameter see its inputs (an MPS drawn this way starts as :class:`MPSClassifier`).

**Sites** are numbered row-major. A ``patch`` site takes a scalar map on each of its p pixels
multiplied together (the product map, size d^p: exactly as expressive as a node per pixel), or a
map that takes p values (``{name: learnable, in_features: p}``).

Examples:
    A 4-site MPS drawn by hand:
    >>> from tnkd.tn.graph import NetworkSpec, TNGraph, connect, make_node
    >>> cores = [make_node((2, 3), "A0", ["phys", "r"])]
    >>> cores += [make_node((3, 2, 3), f"A{i}", ["l", "phys", "r"]) for i in (1, 2)]
    >>> cores += [make_node((3, 2, 5), "A3", ["l", "phys", "label"])]
    >>> for a, b in zip(cores, cores[1:]):
    ...     _ = connect(a, "r", b, "l")
    >>> xs = [make_node((2,), f"x{i}", ["phys"]) for i in range(4)]
    >>> for c, x in zip(cores, xs):
    ...     _ = connect(c, "phys", x, "phys")
    >>> graph = TNGraph(cores + xs, [x.name for x in xs], [cores[-1]["label"]])
    >>> student = GraphStudent(graph, feature_map="linear")
    >>> student(torch.rand(7, 4)).shape, student.num_classes
    (torch.Size([7, 5]), 5)

In YAML, name a function that returns the graph (``graph: mypackage.graphs.my_tree``, with its
keyword arguments in ``graph_args``), or a family such as
:class:`~tnkd.students.tree.TreeClassifier` by ``class_path``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tnkd.feature_maps import FeatureMap, LinearFeatureMap, build_feature_map
from tnkd.registry import import_path
from tnkd.students.base import (
    Student,
    check_choice,
    check_init_std,
    check_positive_int,
    count_parameters,
    scaled_values,
    site_values,
)
from tnkd.tn.chain import contract_chain
from tnkd.tn.contraction import CompiledNetwork
from tnkd.tn.graph import NetworkSpec, TNGraph, index_ends
from tnkd.tn.planner import (
    METHODS,
    ChainNode,
    Plan,
    choose,
    engine_and_kernel,
    examine,
    examine_tree,
    plan,
    reference_values,
)
from tnkd.tn.portable import chain_log_contract
from tnkd.tn.stable import StableNetwork, as_slice, direction_logits, widened

OUTPUT_MODES = ("normalized", "raw")
#: what every family (a graph plus conveniences) passes on to GraphStudent as it is
FAMILY_ARGS = ("output", "logit_scale", "init_std", "method")


def image_shape(input_shape: Sequence[int], what: str) -> tuple[int, int, int]:
    """``(channels, height, width)`` of an image shape (a missing channel axis is 1), checked."""
    shape = tuple(input_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3:
        raise ValueError(
            f"{what} input_shape must be (channels, height, width) or (height, width) to pool "
            f"or cut patches, but got {input_shape!r}"
        )
    return tuple(check_positive_int(f"{what} input_shape", s) for s in shape)  # type: ignore[return-value]


def site_layout(
    input_shape: Sequence[int] | None,
    pool: int,
    patch: int,
    feature_map: FeatureMap,
    what: str = "GraphStudent",
) -> tuple[tuple[int, ...], int, int]:
    """Where the sites are and how large their feature vectors are.

    Args:
        input_shape: one sample's shape, or None (then the sites are not known here).
        pool: average-pool factor (images only).
        patch: patch side (images only).
        feature_map: the site map.
        what: the student's name, for errors.

    Returns:
        The site grid ``(rows, cols)`` for images (``(n,)`` for flat inputs, ``()`` when
        ``input_shape`` is None), the feature size per site, and the scalar inputs per sample.
    """
    check_positive_int(f"{what} pool", pool)
    check_positive_int(f"{what} patch", patch)
    in_features = getattr(feature_map, "in_features", 1)
    if pool > 1 and patch > 1:
        raise ValueError(f"{what} pool={pool} and patch={patch} cannot be combined: choose one")
    if input_shape is None:
        if pool > 1 or patch > 1:
            raise ValueError(
                f"{what} needs input_shape (channels, height, width) to pool or cut patches"
            )
        return (), feature_map.dim, 0
    if pool == 1 and patch == 1 and len(tuple(input_shape)) == 1:
        n = check_positive_int(f"{what} input_shape", next(iter(input_shape)))
        return (n,), feature_map.dim, n
    c, h, w = image_shape(input_shape, what)
    block = max(pool, patch)
    if h % block or w % block:
        raise ValueError(
            f"{what} pool/patch {block} must divide the image size {h}x{w}; choose a factor "
            f"of both sides"
        )
    grid = (h // block, w // block)
    if patch == 1:
        if in_features != 1:
            raise ValueError(
                f"{what} feature map {type(feature_map).__name__} takes {in_features} values per "
                "site, but sites are single pixels (patch=1); use a scalar map or set patch"
            )
        if c > 1:
            grid = (c, *grid)
        return grid, feature_map.dim, c * h * w
    values = c * patch * patch
    if in_features == values:
        return grid, feature_map.dim, c * h * w
    if in_features != 1:
        raise ValueError(
            f"{what} feature map {type(feature_map).__name__} takes {in_features} values per "
            f"site but a {c}x{patch}x{patch} patch has {values}; use a scalar map (product "
            f"features) or {{name: learnable, in_features: {values}}}"
        )
    dim = feature_map.dim**values
    if dim > 4096:
        raise ValueError(
            f"{what}: the product map of a {values}-pixel patch has {feature_map.dim}^{values} "
            f"= {dim} entries per site (at most 4096 allowed); use smaller patches, pool first, "
            "or a learnable map"
        )
    return grid, dim, c * h * w


def copy_tensor(
    shape: Sequence[int], kinds: Sequence[str], neutral: torch.Tensor, init_std: float
) -> torch.Tensor:
    """The copy-tensor initialisation of one node (see the module docstring).

    Args:
        shape: the node's shape.
        kinds: per axis ``"bond"`` (to another parameter node), ``"input"`` (to an input node)
            or ``"label"`` (the dangling output).
        neutral: the input axes' weight vector w (w . phi(x) ~= 1).
        init_std: relative noise.

    Returns:
        The tensor: copy over bond axes x w on input axes x ones on the label axis, plus noise.
    """
    bonds = [i for i, k in enumerate(kinds) if k == "bond"]
    diagonal = torch.arange(min((shape[i] for i in bonds), default=1))
    value = torch.zeros([shape[i] if k == "bond" else 1 for i, k in enumerate(kinds)])
    value[tuple(diagonal if k == "bond" else 0 for k in kinds)] = 1.0
    for i, kind in enumerate(kinds):  # the other axes' factors, broadcast along their axis
        if kind != "bond":
            factor = neutral if kind == "input" else torch.ones(shape[i])
            if factor.numel() != shape[i]:
                raise ValueError(
                    f"axis {i} has size {shape[i]} but its input features have {factor.numel()}"
                )
            value = value * factor.view([-1 if j == i else 1 for j in range(len(shape))])
    fan = math.prod(shape[i] for i in bonds) / max((shape[i] for i in bonds), default=1)
    noise = torch.randn(tuple(shape)) * (init_std / math.sqrt(fan))
    return value + noise


def _padded(tensor: torch.Tensor, node: ChainNode, bond: int) -> torch.Tensor:
    """A chain tensor stored as (left?, phys?, label?, right?) -> (D, ..., D), zero-padded."""
    if node.left is None:
        tensor = tensor.unsqueeze(0)
    if node.right is None:
        tensor = tensor.unsqueeze(-1)
    pad_left, pad_right = bond - tensor.shape[0], bond - tensor.shape[-1]
    if pad_left or pad_right:  # F.pad's pairs run from the last dimension to the first
        tensor = torch.nn.functional.pad(
            tensor, [0, pad_right] + [0, 0] * (tensor.ndim - 2) + [0, pad_left]
        )
    return tensor


def _resolve_graph(graph: Any, graph_args: Mapping[str, Any] | None) -> TNGraph:
    if isinstance(graph, str):
        graph = import_path(graph, "graph function (module.function)")
    if callable(graph) and not isinstance(graph, TNGraph):
        graph = graph(**dict(graph_args or {}))
    elif graph_args:
        raise ValueError(
            "graph_args are for a graph given as a function; the graph is already built"
        )
    if not isinstance(graph, TNGraph):
        raise ValueError(
            f"graph must be a TNGraph or a function returning one, but got {type(graph).__name__}"
        )
    return graph


def tree_positions(spec: NetworkSpec) -> dict[str, tuple[float, float]]:
    """A drawing layout for a graph without loops: hung from its label node, leaves at the bottom.

    Leaves (input nodes) are spread left to right in depth-first order; each other node sits
    above the middle of its children. Returns ``{}`` for graphs with loops (drawn in a line).
    """
    names, ends = spec.node_names, index_ends(spec.node_indices)
    neighbours: dict[str, list[str]] = {n: [] for n in names}
    for (a, _), *other in ends.values():
        for b, _ in other:
            neighbours[names[a]].append(names[b])
            neighbours[names[b]].append(names[a])
    if sum(len(v) for v in neighbours.values()) // 2 != len(names) - 1:
        return {}
    root = names[ends[spec.output_indices[0]][0][0]] if spec.output_indices else names[0]
    order, stack = [], [root]
    parent: dict[str, str | None] = {root: None}
    while stack:  # depth first, children in order
        node = stack.pop()
        order.append(node)
        kids = [u for u in neighbours[node] if u != parent[node]]
        parent.update((u, node) for u in kids)
        stack.extend(reversed(kids))
    leaves = [n for n in order if all(u == parent[n] for u in neighbours[n])]
    pos = {n: (float(k), 0.0) for k, n in enumerate(leaves)}
    for node in reversed(order):  # children before their parent
        below = [pos[u] for u in neighbours[node] if u != parent[node]]
        if below:
            pos[node] = (sum(x for x, _ in below) / len(below), 1.0 + max(y for _, y in below))
    return pos


class GraphStudent(Student):
    """A student whose definition is a tensor-network graph drawn by the user.

    Args:
        graph: a :class:`~tnkd.tn.graph.TNGraph`, a function returning one, or the dotted
            import path of such a function (YAML: ``graph: mypackage.graphs.my_tree``; typed
            ``Any`` so that the YAML string reaches the constructor as it is).
        graph_args: keyword arguments of the graph function.
        feature_map: the site map (name, mapping or :class:`~tnkd.feature_maps.FeatureMap`).
        input_shape: one sample's shape: needed for ``pool`` and ``patch``; without it the
            sites are the flattened sample's values.
        pool: average-pool images by this factor first (a site per pooled pixel).
        patch: give each site a ``patch x patch`` block of the image.
        input_positions: the site of each input node: a list in the graph's input-node order or
            a ``{node name: site}`` mapping; default: input node k reads site k.
        output: ``"normalized"`` (logits s * f / ||f||, learned s; finite for any graph) or
            ``"raw"`` (the exact value f, which can overflow where f does).
        logit_scale: the initial s.
        init_std: relative noise of the copy-tensor initialisation.
        method: ``"auto"`` (the planner chooses from the graph's shape and the device), an
            engine's name or a kernel's (:mod:`tnkd.tn.planner`; ``"compiled"`` fuses the stable
            engine's steps by ``torch.compile``: the first call compiles, minutes on a CPU).
            :meth:`plan` says which runs and why; setting ``student.method`` switches it (not to
            ``"chain"`` or ``"tree"`` unless the tensors are stored for it).
        optimize: the ``opt_einsum`` path optimizer.
        tie_sites: the sites of a chain share one tensor (a translation-invariant MPS; the first
            site's tensor is used), so it trains as one parameter; sites named in
            ``parameter_names`` keep their own.
        parameter_names: names for the chain engine's parameters, registered in this order:
            ``"sites"`` (the stacked sites) and node names (each stored alone) -> attribute
            names (default: the ``blocks`` list).
    """

    def __init__(
        self,
        graph: Any,
        graph_args: dict[str, Any] | None = None,
        feature_map: str | dict | FeatureMap = "linear",
        input_shape: Sequence[int] | None = None,
        pool: int = 1,
        patch: int = 1,
        input_positions: Sequence[int] | Mapping[str, int] | None = None,
        output: str = "normalized",
        logit_scale: float = 5.0,
        init_std: float = 0.3,
        method: str = "auto",
        optimize: str = "auto",
        tie_sites: bool = False,
        parameter_names: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        what = type(self).__name__
        check_choice(f"{what} output", output, OUTPUT_MODES)
        check_choice(f"{what} method", method, METHODS)
        check_init_std(f"{what} init_std", init_std)
        self.feature_map = build_feature_map(feature_map)
        self.input_shape = None if input_shape is None else tuple(input_shape)
        self.pool, self.patch = pool, patch
        self.grid, self.site_dim, num_inputs = site_layout(
            input_shape, pool, patch, self.feature_map, what
        )
        self.output = output
        graph = _resolve_graph(graph, graph_args)
        spec = graph.spec()
        if len(graph.output_edges) != 1:
            raise ValueError(
                f"{what} needs exactly one dangling edge (the label), but the graph has "
                f"{len(graph.output_edges)}: {list(spec.output_indices)}"
            )
        self.num_classes = int(graph.output_edges[0].dimension)
        inputs = list(graph.input_nodes)
        if not inputs:
            raise ValueError(f"{what}: the graph has no input nodes; list them in input_nodes")
        self.num_sites = num_sites = math.prod(self.grid) if self.grid else len(inputs)
        self.num_inputs = num_inputs or num_sites
        sites = self._positions(inputs, input_positions, num_sites)
        neutral = self._neutral()
        initial: dict[str, torch.Tensor] = {}
        for node in graph.nodes:
            if node.name in inputs:
                self._check_input_node(node, inputs)
                continue
            ends = [e.node2 if e.node1 is node else e.node1 for e in node.edges]  # None: the label
            kinds = [
                "label" if e is None else "input" if e.name in inputs else "bond" for e in ends
            ]
            value = node.tensor.detach().to(torch.get_default_dtype())
            if not bool(value.any()):
                value = copy_tensor(tuple(value.shape), kinds, neutral, init_std)
            initial[node.name] = value
        self._spec = spec
        #: the drawing as plain data (:meth:`TNGraph.to_dict`), for :meth:`to_graph`
        self._diagram = {**graph.to_dict(), "positions": graph.positions or tree_positions(spec)}
        self.input_nodes = inputs
        self._site_of = sites  # input node name -> its site
        #: contract with the portable engine (tensor operations only; see tnkd.export.portable)
        self.portable = False
        self.optimize = optimize
        # the sites are the sample's scalars in order (a grid of one axis: no pooling or patches)
        self._flat_sites = len(self.grid) <= 1 and getattr(self.feature_map, "in_features", 1) == 1
        self.node_names = [n for n in spec.node_names if n not in set(inputs)]
        self._compiled: CompiledNetwork | None = None  # the reference engine, made on first use
        self._shape = examine(spec, student=True)
        #: the tree engine's plan (:class:`~tnkd.tn.fused.TreePlan`) when the graph is a tree
        self._network, self.tree_plan = None, None
        if self._shape.chain is None or engine_and_kernel(method)[0] not in ("auto", "chain"):
            # the pairwise schedule, and whether it is a binary tree (the tree engine's plan)
            self._network, self.tree_plan = examine_tree(self._shape, optimize)
        # stored in the chain engine's layout (which every engine reads): a chain on the chain
        # engine, a family's named chain, tied sites
        engine = choose(self._shape, method)[0].name
        self._chained = self._shape.chain is not None and (
            engine == "chain" or bool(parameter_names) or tie_sites
        )
        if tie_sites and not self._chained:
            raise ValueError(f"{what} tie_sites=True needs a chain (a path of tensors)")
        self.method, self._linear_leaves = method, False  # the engine (see the setter)
        self.blocks = nn.ParameterList()
        #: node name -> (block: an index of ``blocks`` or a parameter's name, index of the node's
        #: entries in it, permutation to the node's axis order or None): see :meth:`node_tensors`
        self._block_of: dict[str, tuple[int | str, tuple, tuple[int, ...] | None]] = {}
        self._padding = 0  # stored entries that belong to no node (open ends' padding)
        if self._chained:
            self._store_chain(initial, bool(tie_sites), dict(parameter_names or {}))
        else:
            self._store_blocks(initial, sites, num_sites)
        if output == "normalized":
            self.log_logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale)))

    def _init_family(
        self, args: Mapping[str, Any], graph: TNGraph, feature_map: FeatureMap, **options: Any
    ) -> None:
        """Initialise a family (a graph plus conveniences) as the :class:`GraphStudent` of ``graph``.

        ``args`` are the family's constructor arguments (its ``locals()``); those named in
        :data:`FAMILY_ARGS` reach :class:`GraphStudent` as they are, with ``options``.
        """
        passed = {name: args[name] for name in FAMILY_ARGS}
        GraphStudent.__init__(self, graph, feature_map=feature_map, **passed, **options)

    def _init_on_sites(self, args: Mapping[str, Any], draw: Callable[..., TNGraph]) -> None:
        """Initialise a family drawn on the sites, as ``draw(grid, site_dim, bond_dim, classes)``.

        ``args`` are the family's constructor arguments (its ``locals()``): ``feature_map``,
        ``bond_dim``, ``num_classes``, and those passed on as they are: :data:`FAMILY_ARGS`, the
        sites' and the engine's.
        """
        fmap = build_feature_map(args["feature_map"])
        what = type(self).__name__
        grid, dim, _ = site_layout(args["input_shape"], args["pool"], args["patch"], fmap, what)
        graph = draw(grid, dim, args["bond_dim"], args["num_classes"])
        passed = ("input_shape", "pool", "patch")
        self._init_family(args, graph, fmap, **{name: args[name] for name in passed})
        self.bond_dim = args["bond_dim"]

    @property
    def method(self) -> str:
        """The ``method`` this student runs (see the class docstring); set it to switch.

        A switch lasts while the student lives: its ``init_args`` (and so a checkpoint) keep the
        method it was built with, which decides how its tensors are stored.
        """
        return self._method

    @method.setter
    def method(self, method: str) -> None:
        check_choice(f"{type(self).__name__} method", method, METHODS)
        if engine_and_kernel(method)[0] == "tree" and self.tree_plan is None:  # examined here
            self._network, self.tree_plan = examine_tree(self._shape, self.optimize)
        engine = choose(self._shape, method)[0].name
        if engine in ("chain", "tree") and (engine == "chain") != self._chained:
            raise ValueError(
                f"the tensors are stored as the {'chain' if self._chained else 'pairwise'} "
                f"engines read them, not the {engine} engine; build the student with {method=}"
            )
        #: the engine chosen from the graph's shape (``plan()`` adds the device's kernel)
        self.engine, self._method, self._contract_fn = engine, method, None

    @property
    def fast_path(self) -> bool:
        """The logits come from the tree engine's autograd node (:class:`~tnkd.tn.fused.FastTree`)."""
        return self.engine == "tree"

    @property
    def network(self) -> StableNetwork:
        """The graph's pairwise schedule (:class:`~tnkd.tn.stable.StableNetwork`), made on first use."""
        if self._network is None:
            self._network = StableNetwork(self._spec, optimize=self.optimize)
        return self._network

    def plan(self, device: torch.device | str | None = None) -> Plan:
        """Which engine contracts this student on ``device`` (default: its parameters'), and why.

        Example:
            >>> from tnkd.students import MPSClassifier
            >>> GraphStudent(MPSClassifier(16, 3, bond_dim=4).to_graph()).plan().engine
            'chain'
        """
        if device is None:
            device = self._first_parameter().device
        method = "portable" if self.portable else self._method
        return plan(self._shape, method, device)

    def _store_blocks(
        self, initial: dict[str, torch.Tensor], sites: dict[str, int], num_sites: int
    ) -> None:
        """Parameters stacked as the pairwise network consumes them.

        One tensor per block (e.g. all leaves of a tree level), so that a level is one kernel with
        no copy; :meth:`node_tensors` names them.
        """
        spec, stable = self._spec, self.network
        self._input_blocks: list[list[int] | slice] = []  # the sites of each input block
        for block, is_input in zip(stable.blocks, stable.block_is_input, strict=True):
            names = [spec.node_names[i] for i in block]
            if is_input:
                where = [sites[n] for n in names]
                self._input_blocks.append(as_slice(where) or where)
                continue
            for g, name in enumerate(names):
                self._block_of[name] = (len(self.blocks), (g,), None)
            self.blocks.append(nn.Parameter(torch.stack([initial[n] for n in names])))
        self._block_kinds = list(stable.block_is_input)
        # [1, x] on flat sites, leaves joining sites 2g and 2g + 1 (the first two blocks, the only
        # input blocks): the tree engine fuses the map with the leaves (see tnkd.tn.fused.FastTree)
        if self.tree_plan and type(self.feature_map) is LinearFeatureMap and self._flat_sites:
            _, left, right, *_ = self.tree_plan.levels[0]
            self._linear_leaves = (
                self._block_kinds[:2] == [True, True]
                and self._input_blocks == [slice(0, num_sites - 1, 2), slice(1, num_sites, 2)]
                and (left.source, right.source, left.whole, right.whole) == (0, 1, True, True)
            )

    def _store_chain(
        self, initial: dict[str, torch.Tensor], tie: bool, names_of: dict[str, str]
    ) -> None:
        """Parameters in the chain engine's layout: the sites stacked as (N, D, d, D), in order.

        Every tensor is stored with its axes as the chain engine reads them (towards the start,
        input, label, towards the end). The sites whose bonds are all of size D form one stacked
        block, so the chain reaches :func:`~tnkd.tn.chain.contract_chain` without a copy; an
        open end's site, (d, D) or (D, d), is stored there as the slice 0 of a (D, d, D) core
        whose other entries stay zero (the open end's boundary is e_0, so they get no gradient:
        :meth:`parameter_count` counts the graph's entries, not the padding). Other tensors
        (smaller bonds, boundary vectors, the label tensor) are stored on their own and
        zero-padded to D when the chain is assembled. ``tie``: one (1, D, d, D) tensor for all.
        """
        layout = self._shape.chain
        names, bond, d = self._spec.node_names, layout.bond_dim, layout.site_dim

        named: dict[str, torch.Tensor] = {}  # registered at the end, in ``names_of``'s order

        def add(key: str, tensor: torch.Tensor) -> int | str:
            if key in names_of:
                named[key] = tensor
                return names_of[key]
            self.blocks.append(nn.Parameter(tensor))
            return len(self.blocks) - 1

        def store(node: ChainNode, block: int | str, index: tuple = ()) -> None:
            axes = node.canonical()  # node_tensors permutes them back
            back = None if axes == tuple(sorted(axes)) else tuple(map(axes.index, sorted(axes)))
            self._block_of[names[node.index]] = (block, index, back)

        full, alone = [], []
        for node in layout.sites:
            core = initial[names[node.index]].permute(*node.canonical())
            fits = core.shape in ((bond, d, bond), (1, d, bond), (bond, d, 1), (d, bond), (bond, d))
            if fits and names[node.index] not in names_of:  # a named tensor is stored alone
                full.append((node, _padded(core, node, bond)))
                self._padding += bond * d * bond - core.numel()
            else:
                alone.append(node)
        if tie and (any(names[n.index] not in names_of for n in alone) or self._padding):
            raise ValueError("tie_sites=True needs every site of one shape (D, d, D)")
        block = None
        if full or "sites" in names_of:
            cores = [core for _, core in (full[:1] if tie else full)]  # tied: no padding (checked)
            empty = initial[self.node_names[0]].new_zeros(0, bond, d, bond)
            block = add("sites", torch.stack(cores) if cores else empty)
            for g, (node, _) in enumerate(full):  # an open end's site is slice 0 of that axis
                first, last = [0] * (node.left is None), [..., 0] * (node.right is None)
                store(node, block, (0 if tie else g, *first, *last))
        for node in [n for n in layout.nodes if names[n.index] not in self._block_of]:
            name = names[node.index]
            store(node, add(name, initial[name].permute(*node.canonical())))
        for key in names_of:
            if key in named:
                self.register_parameter(names_of[key], nn.Parameter(named[key]))

        # the chain's sites as runs (block, first row, count, node): rows of the stacked block
        # (node None; tied, its one row count times) or a tensor stored alone (count 1)
        where = {n.index: self._block_of[names[n.index]] for n in layout.sites}
        self._chain_runs: list[tuple] = []
        for alone, run in itertools.groupby(layout.sites, lambda n: not where[n.index][1]):
            run = list(run)
            if alone:
                self._chain_runs += [(where[n.index][0], 0, 1, n) for n in run]
            else:
                self._chain_runs.append((block, where[run[0].index][1][0], len(run), None))
        site = self._site_of
        order = [site[names[n.input_node]] for n in layout.sites]
        self._chain_sites = (as_slice(order) or order) if order else []
        label = layout.label_node
        self._label_site = None if label.phys is None else site[names[label.input_node]]

    def _stored(self, block: int | str) -> torch.Tensor:
        """A stored parameter: an index of ``blocks`` or the name it was registered under."""
        return self.blocks[block] if isinstance(block, int) else getattr(self, block)

    def parameter_count(self) -> int:
        """Number of trainable scalars of the graph's tensors (tied sites once, no padding)."""
        return count_parameters(self) - self._padding

    # ---- construction helpers -------------------------------------------------------------
    def _positions(
        self, inputs: list[str], positions: Sequence[int] | Mapping[str, int] | None, num_sites: int
    ) -> dict[str, int]:
        what = type(self).__name__
        if positions is None:
            if len(inputs) != num_sites:
                raise ValueError(
                    f"{what}: the graph has {len(inputs)} input nodes but the data gives "
                    f"{num_sites} sites; pass input_positions (the site of each input node)"
                )
            positions = range(num_sites)
        if isinstance(positions, Mapping):
            missing = [n for n in inputs if n not in positions]
            if missing:
                raise ValueError(f"{what} input_positions has no site for input nodes {missing}")
            positions = [positions[n] for n in inputs]
        values = list(positions)
        if len(values) != len(inputs):
            raise ValueError(
                f"{what} input_positions has {len(values)} sites but the graph has "
                f"{len(inputs)} input nodes"
            )
        out = dict(zip(inputs, values, strict=True))
        bad = {
            n: s
            for n, s in out.items()
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < num_sites
        }
        if bad:
            raise ValueError(
                f"{what} input_positions must be sites in [0, {num_sites}), but got {bad}"
            )
        return out

    def _check_input_node(self, node: Any, inputs: list[str]) -> None:
        what = type(self).__name__
        if len(node.edges) != 1 or node.edges[0].is_dangling():
            raise ValueError(
                f"{what}: input node {node.name!r} must have exactly one axis, connected to a "
                f"parameter node, but it has {len(node.edges)}"
            )
        edge = node.edges[0]
        other = edge.node2 if edge.node1 is node else edge.node1
        if other.name in inputs:
            raise ValueError(
                f"{what}: input nodes {node.name!r} and {other.name!r} are connected to each other"
            )
        if edge.dimension != self.site_dim:
            raise ValueError(
                f"{what}: input node {node.name!r} has size {edge.dimension} but the feature map "
                f"gives {self.site_dim} features per site"
            )

    def _neutral(self) -> torch.Tensor:
        w = out = self.feature_map.neutral()
        while out.numel() < self.site_dim:  # the product map: w (x) w (x) .., one w per pixel
            out = torch.kron(out, w)
        return out

    # ---- evaluation ------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, sites, site_dim)`` feature vectors."""
        u = self.flatten_input(x)  # (batch, sites): the flat sample's values, or for an image
        if len(self.grid) > 1:  # (batch, sites) pooled pixels or (batch, sites, values) patches
            c, h, w = image_shape(self.input_shape, type(self).__name__)
            u = site_values(u.view(u.shape[0], c, h, w), self.pool, self.patch)
        phi = self.feature_map(u)
        if u.ndim == 3 and getattr(self.feature_map, "in_features", 1) == 1:
            product = phi[:, :, 0]  # phi is (batch, sites, values, d): the product map
            for k in range(1, phi.shape[2]):
                product = (product.unsqueeze(-1) * phi[:, :, k].unsqueeze(-2)).flatten(-2)
            phi = product
        return phi.to(self._dtype())

    def _site_features_t(self, x: torch.Tensor) -> torch.Tensor:
        """``(sites, site_dim, batch)`` feature vectors, contiguous (the blocks' layout).

        A block's samples are then contiguous (not a row of sites apart: a gather in every
        kernel of the first tree level); the [1, x] map is written so directly (one ``stack``).
        """
        if type(self.feature_map) is LinearFeatureMap and self._flat_sites:
            u = self.flatten_input(x).T.to(self._dtype())
            return torch.stack([torch.ones_like(u), u], 1)
        return self.features(x).permute(1, 2, 0).contiguous()

    def _first_parameter(self) -> torch.Tensor:
        """The first node's stored tensor: the student's dtype and device."""
        return self._stored(self._block_of[self.node_names[0]][0])

    def _dtype(self) -> torch.dtype:
        return self._first_parameter().dtype

    def operand_blocks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The contraction's operands, one stacked tensor per block (see :class:`StableNetwork`)."""
        if self._chained:
            return self.network.to_blocks(self.graph_operands(x))
        phi = self._site_features_t(x)
        params = iter(self.blocks._parameters.values())
        inputs = iter(self._input_blocks)
        # an input block is (G, site_dim, batch)
        return [phi[next(inputs)] if is_input else next(params) for is_input in self._block_kinds]

    def graph_operands(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One tensor per graph node, in node order (input nodes batched)."""
        if not self._chained:  # the stacked blocks, unstacked as views
            return self.network.from_blocks(self.operand_blocks(x))
        phi, params, site = self.features(x), self.node_tensors(), self._site_of
        return [
            phi[:, site[name]] if name in site else params[name] for name in self._spec.node_names
        ]

    def _chain_arguments(self, phi: torch.Tensor) -> tuple[Any, ...]:
        """The arguments of :func:`~tnkd.tn.chain.contract_chain` for the features ``phi``.

        Open ends and smaller bonds are zero-padded to D (their outer bond is index 0 of a unit
        boundary vector), which leaves the contraction's value unchanged.
        """
        layout = self._shape.chain
        bond, names = layout.bond_dim, self._spec.node_names
        pieces = []
        for block, start, count, node in self._chain_runs:
            stored = self._stored(block)
            if node is not None:  # a tensor stored alone
                pieces.append(_padded(stored, node, bond).unsqueeze(0))
            elif start == 0 and count == stored.shape[0]:  # no slice for autograd to undo
                pieces.append(stored)
            elif stored.shape[0] == 1:  # tied sites: the one core, count times
                pieces.append(stored.expand(count, -1, -1, -1))
            else:
                pieces.append(stored[start : start + count])
        if not pieces:
            cores = self._first_parameter().new_zeros(0, bond, layout.site_dim, bond)
        else:
            cores = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        ends = []
        for node in (layout.nodes[0], layout.nodes[-1]):
            if node.phys is None and node.label is None:  # a boundary vector
                vector = self._stored(self._block_of[names[node.index]][0])
                if vector.shape[0] < bond:
                    vector = torch.nn.functional.pad(vector, (0, bond - vector.shape[0]))
                ends.append(vector)
            else:  # an open end: its outer bond is index 0 of the boundary e_0
                ends.append(cores.new_zeros(bond))
                ends[-1][0] = 1.0
        label = layout.label_node
        output_core = _padded(self._stored(self._block_of[names[label.index]][0]), label, bond)
        where = self._chain_sites
        whole = isinstance(where, slice) and where == slice(0, phi.shape[1], 1)
        feats = phi if whole else phi[:, where]
        at_label = None if self._label_site is None else phi[:, self._label_site]
        return ends[0], cores, ends[1], feats, output_core, layout.sites_before_label, at_label

    def _portable_log_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The portable engine (:mod:`tnkd.tn.portable`): tensor operations only, for export.

        A chain runs the portable sweep, any other graph the stable engine rescaled at every
        step; both in float64 at least, returned in the student's dtype.
        """
        dtype = self._dtype()
        wide = functools.partial(widened, dtype=torch.promote_types(dtype, torch.float64))
        if self._chained:
            values, log_scale = chain_log_contract(*wide(self._chain_arguments(self.features(x))))
        else:
            values, log_scale = self.network.contract(wide(self.operand_blocks(x)), every=True)
        return values.to(dtype), log_scale.to(dtype)

    def log_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, log_scale)`` with f(x) = values * exp(log_scale), shape (batch, C), (batch,)."""
        if self.portable:
            return self._portable_log_forward(x)
        if self.engine == "chain":
            *operands, label = self._chain_arguments(self.features(x))
            return contract_chain(*operands, engine_and_kernel(self._method)[1], label)
        if self.engine == "tree":
            return self.tree_plan.contract(self.operand_blocks(x))
        if self.engine == "reference":
            blocks = functools.partial(self.operand_blocks, x)
            rerun = None if self._method != "auto" else lambda: self.network.contract(blocks())
            return reference_values(self.generic_forward(x), rerun)
        if self._contract_fn is None and self._method == "compiled":  # compiled on first use
            self._contract_fn = torch.compile(functools.partial(self.network.contract, every=True))
        return (self._contract_fn or self.network.contract)(self.operand_blocks(x))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_contract_fn"] = None  # a compiled function is rebuilt, not pickled
        return state

    def raw_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The exact value f(x), shape (batch, C)."""
        return scaled_values(*self.log_forward(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape (batch, C): see ``output``."""
        if self.output == "raw":
            return self.raw_forward(x)
        if self.fast_path and not self.portable:
            tree = self.tree_plan
            if self._linear_leaves and not x.requires_grad:  # (the raw pairs get no gradient)
                u = self.flatten_input(x).T.to(self._dtype())
                pairs = u.view(u.shape[0] // 2, 2, u.shape[1])  # (leaves, [x_l, x_r], batch)
                blocks = [pairs, pairs, *self.blocks._parameters.values()]
                return tree.normalized_logits(blocks, self.log_logit_scale, linear_leaves=True)
            return tree.normalized_logits(self.operand_blocks(x), self.log_logit_scale)
        values, _ = self.log_forward(x)
        return direction_logits(values, self.log_logit_scale)

    def generic_forward(self, x: torch.Tensor) -> torch.Tensor:
        """f(x) through one plain ``opt_einsum`` expression (the reference engine; no rescaling)."""
        if self._compiled is None:
            # the pairwise schedule's path where one was planned (a chain plans none)
            path = self.optimize if self._network is None else self._network.path
            self._compiled = CompiledNetwork(self._spec, optimize=path)
        return self._compiled(self.graph_operands(x))

    # ---- the graph --------------------------------------------------------------------------
    def node_tensors(self) -> dict[str, torch.Tensor]:
        """``{node name: tensor}`` of the parameter nodes, in graph order (views of ``blocks``)."""
        out = {}
        for name in self.node_names:
            block, index, axes = self._block_of[name]
            tensor = self._stored(block)[index]
            out[name] = tensor if axes is None else tensor.permute(*axes)
        return out

    def to_graph(self) -> TNGraph:
        """The graph with the current tensors (input nodes hold zeros)."""
        graph = TNGraph.from_dict(self._diagram)
        for name, tensor in self.node_tensors().items():
            graph.node(name).tensor = tensor.detach()
        return graph

    def load_node_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy tensors into the parameter nodes (by node name; shapes must match)."""
        own_tensors = self.node_tensors()
        with torch.no_grad():
            for name, value in tensors.items():
                if name not in self._block_of:
                    raise ValueError(f"no parameter node {name!r}; nodes are {self.node_names}")
                own = own_tensors[name]
                if tuple(value.shape) != tuple(own.shape):
                    raise ValueError(
                        f"node {name!r} has shape {tuple(own.shape)}, but got {tuple(value.shape)}"
                    )
                own.copy_(value)
