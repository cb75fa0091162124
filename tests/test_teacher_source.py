"""tnkd.training.teacher_source: one object resolves a teacher from files or networks."""

import pytest
import torch

from tnkd.teachers import MLP, TeacherEnsemble, save_teacher
from tnkd.training.teacher_source import TeacherSource


def test_files_of_an_ensemble_load_into_fresh_copies_of_the_architecture(tmp_path):
    torch.manual_seed(0)
    nets = [MLP(6, 3, hidden=(4,)).eval() for _ in range(2)]
    files = [str(save_teacher(n, tmp_path / f"{k}.pt")) for k, n in enumerate(nets)]
    shape = MLP(6, 3, hidden=(4,))
    source = TeacherSource(files, shape)
    teacher = source.load(temperature=2.0)
    x = torch.rand(5, 6)
    torch.testing.assert_close(teacher(x), TeacherEnsemble(nets, 2.0)(x))  # the files' weights
    assert teacher.members[0] is not shape and teacher.members[1] is not shape
    assert source.class_path() == "tnkd.teachers.TeacherEnsemble[tnkd.teachers.MLP, tnkd.teachers.MLP]"
    assert source.missing() == [] and TeacherSource([*files, "gone.pt"]).missing() == ["gone.pt"]
    # one file: the given architecture itself receives the weights
    assert TeacherSource(files[0], shape).load() is shape
    torch.testing.assert_close(shape(x), nets[0](x))


def test_networks_given_as_they_are_and_both_forms_refused():
    net = MLP(6, 3)
    assert TeacherSource(architecture=net).load() is net
    assert TeacherSource().load() is None
    with pytest.raises(ValueError, match="as files or as networks, not both"):
        TeacherSource(["a.pt", "b.pt"], [net, net]).load()
