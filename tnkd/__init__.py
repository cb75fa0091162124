"""tnkd: knowledge distillation into tensor networks.

Everything a user needs is importable from here::

    from tnkd import DistillationModule, MPSClassifier, build_divergence

The names load on first use (PEP 562), so ``import tnkd`` stays light and does not import
Lightning until a training class is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    # students: tensor-network graphs and the families built on them
    "Student": "tnkd.students",
    "GraphStudent": "tnkd.students",
    "MPSClassifier": "tnkd.students",
    "StackedMPS": "tnkd.students",
    "TreeClassifier": "tnkd.students",
    "PEPSClassifier": "tnkd.students",
    "TTNetwork": "tnkd.students",
    "TTLinear": "tnkd.students",
    "TTMLP": "tnkd.students",
    "TTMLPFromTeacher": "tnkd.students",
    "TruncatedMPS": "tnkd.students",
    # drawing graphs, and the planner that picks their contraction engine
    "TNGraph": "tnkd.tn.graph",
    "make_node": "tnkd.tn.graph",
    "connect": "tnkd.tn.graph",
    "plan": "tnkd.tn.planner",
    "Plan": "tnkd.tn.planner",
    "ENGINES": "tnkd.tn.planner",
    # distillation losses
    "DIVERGENCES": "tnkd.divergences",
    "Divergence": "tnkd.divergences",
    "build_divergence": "tnkd.divergences",
    "kl_divergence": "tnkd.divergences",
    "renyi_divergence": "tnkd.divergences",
    # feature maps
    "FeatureMap": "tnkd.feature_maps",
    "build_feature_map": "tnkd.feature_maps",
    # training
    "DistillationModule": "tnkd.training",
    "TeacherModule": "tnkd.training",
    "RunCheckpoint": "tnkd.training",
    "load_student": "tnkd.training.checkpoints",
    # shipping a trained student
    "export_program": "tnkd.export",
    "portable": "tnkd.export",
    # teachers
    "CNN": "tnkd.teachers",
    "MLP": "tnkd.teachers",
    "TeacherEnsemble": "tnkd.teachers",
    "load_teacher": "tnkd.teachers",
    "save_teacher": "tnkd.teachers",
    # data
    "ClassificationDataModule": "tnkd.data",
    "DigitsDataModule": "tnkd.data",
    "MNISTDataModule": "tnkd.data",
    "FashionMNISTDataModule": "tnkd.data",
    "CIFAR10DataModule": "tnkd.data",
    "ArrayDataModule": "tnkd.data",
    "HuggingFaceDataModule": "tnkd.data",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tnkd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
