"""Self-describing checkpoints: a run's checkpoint rebuilds its trained networks on its own."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from student_families import FAMILIES, build

from tnkd.data import DigitsDataModule
from tnkd.students import MPSClassifier
from tnkd.teachers import MLP, TeacherEnsemble, save_teacher
from tnkd.tn.graph import TNGraph
from tnkd.training import DistillationModule, TeacherModule
from tnkd.training.checkpoints import KEY, describe, describe_checkpoint, load_student
from tnkd.training.checkpoints import build as build_spec


def _fit(module, tmp_path, steps=2):
    trainer = L.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_load_from_checkpoint_needs_no_argument(family, tmp_path):
    module = DistillationModule(build(family), teacher=MLP(64, 10, hidden=(16,)), beta=0.5, lr=0.05)
    path = _fit(module, tmp_path)
    x = torch.rand(6, 1, 8, 8)
    module.eval()
    again = DistillationModule.load_from_checkpoint(path)
    assert torch.equal(again(x), module(x))  # the trained student
    assert torch.equal(again.teacher(x), module.teacher(x))  # the teacher, without its file
    assert torch.equal(load_student(path)(x), module(x))
    assert torch.load(path, weights_only=True)[KEY]["data"]["spec"]["class_path"].endswith(
        "DigitsDataModule"
    )


def test_a_teacher_ensemble_and_a_teacher_run_load_alone(tmp_path):
    members = [MLP(64, 10, hidden=(8,)), MLP(64, 10, hidden=(12,))]
    module = DistillationModule(MPSClassifier(64, 10, bond_dim=3), teacher=members, temperature=2.0)
    path = _fit(module, tmp_path)
    again = DistillationModule.load_from_checkpoint(path)
    assert isinstance(again.teacher, TeacherEnsemble)
    x = torch.rand(4, 64)
    assert torch.equal(again.teacher(x), module.eval().teacher(x))
    teacher_run = TeacherModule(MLP(64, 10, hidden=(8,)), lr=0.01)
    path = _fit(teacher_run, tmp_path / "teacher")
    assert torch.equal(TeacherModule.load_from_checkpoint(path)(x), teacher_run.eval()(x))


def test_a_student_built_from_a_file_loads_without_that_file(tmp_path):
    from tnkd.students import TTMLPFromTeacher

    teacher_file = tmp_path / "mlp.pt"
    save_teacher(MLP(64, 10, hidden=(36,)), teacher_file)
    student = TTMLPFromTeacher(str(teacher_file), ranks=2, keep_dense_below=16)
    path = _fit(DistillationModule(student, beta=0.0), tmp_path)
    teacher_file.unlink()
    x = torch.rand(3, 64)
    assert torch.equal(load_student(path)(x), student.eval()(x))


def test_an_older_checkpoint_says_what_to_do_and_can_be_described(tmp_path):
    module = DistillationModule(MPSClassifier(64, 10, bond_dim=3), beta=0.0)
    path = _fit(module, tmp_path)
    old = torch.load(path, weights_only=True)
    del old[KEY]
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match=r"does not describe its student.*student="):
        DistillationModule.load_from_checkpoint(tmp_path / "old.ckpt")
    x = torch.rand(3, 64)
    given = DistillationModule.load_from_checkpoint(
        tmp_path / "old.ckpt", student=MPSClassifier(64, 10, bond_dim=3)
    )
    assert torch.equal(given(x), module.eval()(x))
    with pytest.raises(ValueError, match="does not fit"):
        describe_checkpoint(tmp_path / "old.ckpt", tmp_path / "x.ckpt", MPSClassifier(64, 10, bond_dim=4))
    new = describe_checkpoint(tmp_path / "old.ckpt", tmp_path / "new.ckpt", MPSClassifier(64, 10, bond_dim=3))
    assert torch.equal(load_student(new)(x), module(x))
    with pytest.raises(FileExistsError):
        describe_checkpoint(tmp_path / "old.ckpt", new, MPSClassifier(64, 10, bond_dim=3))


def test_a_drawn_graph_is_described_by_its_nodes_and_edges():
    graph = MPSClassifier(6, 3, bond_dim=2, label_position=2).to_graph()
    again = build_spec(describe(graph))
    assert isinstance(again, TNGraph)
    a, b = graph.spec(), again.spec()
    assert (a.node_names, a.node_shapes, a.node_indices, a.input_nodes, a.output_indices) == (
        b.node_names, b.node_shapes, b.node_indices, b.input_nodes, b.output_indices
    )


def test_bad_checkpoints_get_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_student(tmp_path / "none.ckpt")
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        load_student(tmp_path / "junk.ckpt")


def test_a_checkpoint_with_arguments_since_renamed_still_loads(tmp_path):
    from tnkd.students import TreeClassifier

    tree = TreeClassifier(input_shape=(1, 8, 8), num_classes=10, bond_dim=3)
    path = _fit(DistillationModule(tree, beta=0.0), tmp_path)
    data = torch.load(path, weights_only=True)
    # as an older tnkd described the student: with `contraction` and `compile`
    data[KEY]["student"]["spec"]["init_args"].update(contraction="plain", compile=False)
    torch.save(data, tmp_path / "old.ckpt")
    x = torch.rand(4, 1, 8, 8)
    for student in (
        load_student(tmp_path / "old.ckpt"),
        DistillationModule.load_from_checkpoint(tmp_path / "old.ckpt").student.eval(),
    ):
        assert student.method == "reference"  # "plain", in today's words
        assert torch.allclose(student(x), tree.eval()(x), rtol=1e-5, atol=1e-6)
