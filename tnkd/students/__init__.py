"""Tensor-network students."""

from tnkd.students.base import Student
from tnkd.students.graph import GraphStudent
from tnkd.students.mps import MPSClassifier
from tnkd.students.peps import PEPSClassifier
from tnkd.students.stacked import StackedMPS
from tnkd.students.tree import TreeClassifier
from tnkd.students.truncation import TruncatedMPS
from tnkd.students.tt_linear import TTMLP, TTLinear, TTMLPFromTeacher
from tnkd.students.tt_network import TTNetwork

__all__ = [
    "TTMLP",
    "GraphStudent",
    "MPSClassifier",
    "PEPSClassifier",
    "StackedMPS",
    "Student",
    "TTLinear",
    "TTMLPFromTeacher",
    "TTNetwork",
    "TreeClassifier",
    "TruncatedMPS",
]
