"""Tensor-network students."""

from tnkd.students.base import Student
from tnkd.students.mps import MPSClassifier
from tnkd.students.stacked import StackedMPS
from tnkd.students.tt_linear import TTMLP, TTLinear, TTMLPFromTeacher
from tnkd.students.tt_network import TTNetwork

__all__ = [
    "TTMLP",
    "MPSClassifier",
    "StackedMPS",
    "Student",
    "TTLinear",
    "TTMLPFromTeacher",
    "TTNetwork",
]
