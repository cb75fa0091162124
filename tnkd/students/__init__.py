"""Tensor-network students."""

from tnkd.students.base import Student
from tnkd.students.mps import MPSClassifier

__all__ = ["MPSClassifier", "Student"]
