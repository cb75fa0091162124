"""Tensor-network graphs (``tensornetwork`` nodes, named edges), their contraction and decompositions."""
