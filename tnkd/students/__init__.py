"""Tensor-network students."""

from tnkd.students.base import Student
from tnkd.students.mps import MPSClassifier
from tnkd.students.tt_linear import TTMLP, TTLinear

__all__ = ["TTMLP", "MPSClassifier", "Student", "TTLinear"]
