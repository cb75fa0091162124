"""Stacked MPS: an MPS layer with k outputs, feature-mapped again and fed to a second MPS.

With the ``[1, x]`` map one MPS is multilinear in its inputs: it cannot represent x_1^2 at any
bond dimension. Stacking lifts the degree: if the first layer outputs z copies of each of the d
inputs (k = z d outputs, a linear map an MPS represents exactly) and the second layer is a
multilinear MPS of those k values, the stack represents every polynomial of degree <= z in each
variable (x_1^2 = y_1 y_2 where y_1 = y_2 = x_1). Diagram::

    x_1 .. x_N -> [MPS, output leg k] -> h_1 .. h_k -> phi(h_j) -> [MPS, label leg C] -> logits
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tnkd.feature_maps import FeatureMap
from tnkd.students.base import Student, check_pair, check_positive_int
from tnkd.students.mps import MPSClassifier
from tnkd.tn.graph import TNGraph


class StackedMPS(Student):
    """Two MPS layers with a local feature map between them.

    Args:
        num_sites: scalar inputs per sample (chain length of the first layer).
        num_classes: size of the final label index.
        hidden: k, the size of the first layer's output leg (and the second layer's length).
        bond_dim: bond dimension of both layers, or a pair (first, second).
        feature_map: local map of the inputs (first layer).
        hidden_feature_map: local map of the hidden values (second layer).
        hidden_output: output mode of the first layer: ``"normalized"`` (default; hidden values
            of bounded size, which keeps training stable) or ``"raw"`` (exact multilinear values;
            what the expressivity construction uses).
        output: output mode of the second layer (see :class:`MPSClassifier`).
        hidden_scale: initial scale s of the normalized hidden values.
        init_std: relative noise of the near-identity initialisation.
        method: chain contraction method of both layers.

    Example:
        >>> net = StackedMPS(num_sites=64, num_classes=10, hidden=8, bond_dim=6)
        >>> x = torch.rand(3, 64)
        >>> net.hidden_values(x).shape, net(x).shape
        (torch.Size([3, 8]), torch.Size([3, 10]))
    """

    def __init__(
        self,
        num_sites: int,
        num_classes: int,
        hidden: int = 8,
        bond_dim: int | Sequence[int] = 10,
        feature_map: str | dict | FeatureMap = "linear",
        hidden_feature_map: str | dict | FeatureMap = "linear",
        hidden_output: str = "normalized",
        output: str = "normalized",
        hidden_scale: float = 1.0,
        init_std: float = 1e-2,
        method: str = "auto",
    ) -> None:
        super().__init__()
        self.num_inputs = check_positive_int("StackedMPS num_sites", num_sites)
        self.num_classes = check_positive_int("StackedMPS num_classes", num_classes)
        self.hidden = check_positive_int("StackedMPS hidden", hidden)
        bonds = check_pair("StackedMPS bond_dim", bond_dim)
        both = {"init_std": init_std, "method": method}
        self.first = MPSClassifier(
            num_sites,
            hidden,
            bonds[0],
            feature_map,
            output=hidden_output,
            logit_scale=hidden_scale,
            **both,
        )
        self.second = MPSClassifier(
            hidden, num_classes, bonds[1], hidden_feature_map, output=output, **both
        )

    @classmethod
    def from_layers(cls, first: MPSClassifier, second: MPSClassifier) -> StackedMPS:
        """Stack two existing MPS layers (``first.num_classes`` must equal ``second.num_sites``)."""
        if first.num_classes != second.num_sites:
            raise ValueError(
                f"the first layer has {first.num_classes} outputs but the second layer has "
                f"{second.num_sites} sites; they must be equal"
            )
        net = cls.__new__(cls)
        Student.__init__(net)
        net.num_inputs, net.hidden = first.num_sites, first.num_classes
        net.num_classes = second.num_classes
        net.first, net.second = first, second
        return net

    def hidden_values(self, x: torch.Tensor) -> torch.Tensor:
        """The first layer's outputs h, shape (batch, k)."""
        return self.first(self.flatten_input(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape (batch, C)."""
        return self.second(self.hidden_values(x))

    def raw_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The second layer's exact value on the first layer's outputs."""
        return self.second.raw_forward(self.hidden_values(x))

    def generic_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Both layers through the generic compiled contraction (raw values, no normalisation)."""
        return self.second.generic_forward(self.first.generic_forward(self.flatten_input(x)))

    def to_graphs(self) -> list[TNGraph]:
        """The two layers' diagrams; the feature map between them is not a tensor network."""
        return [self.first.to_graph(), self.second.to_graph()]

    def to_graph(self) -> TNGraph:
        """The first layer's diagram (the second one is ``to_graphs()[1]``)."""
        return self.first.to_graph()

    def draw(self, ax=None, **kwargs):  # noqa: D102
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(2, 1, figsize=(10, 5))
        for a, graph in zip(ax, self.to_graphs(), strict=True):
            graph.draw(ax=a, **kwargs)
        return ax
