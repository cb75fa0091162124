"""One small student of every family on digits-sized input (1 x 8 x 8), for round-trip tests.

Shared by the checkpoint and export tests: each entry builds a fresh, seeded student whose
logits on ``(batch, 1, 8, 8)`` images are ``(batch, 10)``.
"""

from __future__ import annotations

import torch

from tnkd.students import (
    TTMLP,
    GraphStudent,
    MPSClassifier,
    PEPSClassifier,
    StackedMPS,
    TreeClassifier,
    TTLinear,
    TTNetwork,
)


def drawn_mps() -> GraphStudent:
    """An MPS drawn by hand as a graph (label at the right end), not through MPSClassifier."""
    template = MPSClassifier(64, 10, bond_dim=3, label_position=64)
    return GraphStudent(template.to_graph(), input_shape=(1, 8, 8))


def tt_mlp() -> TTMLP:
    layers = torch.nn.Sequential(
        torch.nn.Flatten(),
        TTLinear(64, 36, in_factors=(8, 8), out_factors=(6, 6), ranks=3),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(36, 10),
    )
    return TTMLP(layers, num_inputs=64, num_classes=10)


FAMILIES = {
    "mps": lambda: MPSClassifier(64, 10, bond_dim=4),
    "mps_patch_learned": lambda: MPSClassifier(
        16, 10, bond_dim=3, patch=2, feature_map={"name": "learnable", "dim": 3, "in_features": 4}
    ),
    "mps_uniform_trig": lambda: MPSClassifier(64, 10, bond_dim=3, uniform=True, feature_map="trig"),
    "stacked": lambda: StackedMPS(64, 10, hidden=3, bond_dim=3),
    "tt_network": lambda: TTNetwork(input_shape=(1, 8, 8), patch_size=4, rank=3, feature_dim=3),
    "tt_network_equal": lambda: TTNetwork(
        input_shape=(1, 8, 8), patch_size=4, rank=3, feature_dim=3, equal_cores=True
    ),
    "tree": lambda: TreeClassifier(input_shape=(1, 8, 8), bond_dim=3),
    "peps": lambda: PEPSClassifier(input_shape=(1, 8, 8), bond_dim=2, patch=2),
    "tt_mlp": tt_mlp,
    "drawn_mps": drawn_mps,
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """Family ``name``'s student, initialised from ``seed``."""
    torch.manual_seed(seed)
    return FAMILIES[name]()
