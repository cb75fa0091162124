"""Independent references for tensor-network students: the full coefficient tensor by one einsum."""

from __future__ import annotations

import opt_einsum as oe
import torch

from tnkd.tn.graph import TNGraph


def dense_coefficients(graph: TNGraph) -> torch.Tensor:
    """W[i_1, ..., i_n, c]: every parameter node contracted, one free leg per input node (in the
    graph's input order) and the label last. Independent of tnkd's contraction engines."""
    spec = graph.spec()
    inputs = set(spec.input_nodes)
    tensors, terms = [], []
    labels: dict[str, str] = {}
    for node, idx in zip(graph.nodes, spec.node_indices, strict=True):
        for ix in idx:
            labels.setdefault(ix, oe.get_symbol(len(labels)))
        if node.name in inputs:
            continue
        tensors.append(node.tensor)
        terms.append("".join(labels[ix] for ix in idx))
    by_name = dict(zip(spec.node_names, spec.node_indices, strict=True))
    free = [by_name[name][0] for name in graph.input_nodes] + list(spec.output_indices)
    equation = ",".join(terms) + "->" + "".join(labels[ix] for ix in free)
    return torch.einsum(equation, *tensors)


def evaluate_dense(coefficients: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
    """f[b, c] = sum_i W[i_1..i_n, c] prod_k phi_k[b, i_k], one input at a time (plain loops)."""
    out = []
    for b in range(features[0].shape[0]):
        w = coefficients
        for phi in features:
            w = torch.tensordot(phi[b], w, dims=([0], [0]))
        out.append(w)
    return torch.stack(out)
