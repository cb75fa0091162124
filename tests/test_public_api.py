import subprocess
import sys

import pytest

import tnkd


def test_every_public_name_resolves_to_the_object_of_its_module():
    import importlib

    for name, module in tnkd._EXPORTS.items():
        assert getattr(tnkd, name) is getattr(importlib.import_module(module), name), name
    assert set(tnkd.__all__) == {"__version__", *tnkd._EXPORTS}
    assert sorted(dir(tnkd)) == sorted(tnkd.__all__)


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        _ = tnkd.NoSuchThing


def test_import_tnkd_is_light_and_star_import_works():
    code = (
        "import sys, tnkd; assert 'lightning' not in sys.modules, 'lightning imported';"
        "from tnkd import *; assert DistillationModule.__name__ == 'DistillationModule'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compression_ratio_counts_a_frozen_teacher():
    import torch

    student = tnkd.MPSClassifier(16, 3, bond_dim=2)
    teacher = torch.nn.Linear(16, 3)  # 51 parameters
    teacher.requires_grad_(False)
    assert student.compression_ratio(teacher) == 51 / student.parameter_count()
