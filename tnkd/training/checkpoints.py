"""Self-describing checkpoints: a run's checkpoint rebuilds its trained networks on its own.

Every checkpoint a :class:`~tnkd.training.modules.DistillationModule` or
:class:`~tnkd.training.modules.TeacherModule` writes holds, beside Lightning's hyperparameters,
a description of its networks under the key ``"tnkd"``: for each network its class path and
constructor arguments, in plain Python types (so the file loads with ``torch.load(...,
weights_only=True)``, which runs no code from it). With it,

* ``DistillationModule.load_from_checkpoint(path)`` needs no other argument (Lightning's idiom:
  the student, and the teacher's architecture, are rebuilt from the description and the trained
  weights loaded into them; no teacher file is read);
* :func:`load_student` returns the trained student alone, in eval mode, ready to predict or
  to export (``tnkd export``).

A description is what the network recorded when it was built (students record their
arguments, see :class:`~tnkd.students.base.Student`; tnkd's teachers keep ``init_args``);
``torch.nn`` layers are described from their attributes, ``nn.Sequential`` layer by layer, a
drawn :class:`~tnkd.tn.graph.TNGraph` by its nodes and edges (:meth:`TNGraph.to_dict`), a
teacher ensemble member by member. A student whose constructor reads a file (``TTMLPFromTeacher``,
``TruncatedMPS``) describes itself as the plain class it becomes (its ``checkpoint_spec``), so
loading never needs that file again.

Checkpoints written before tnkd described its networks have no ``"tnkd"`` entry: loading them
without a student fails with one line that says to pass the student (``student=...``, built with
the run's arguments) or to add the entry once with :func:`describe_checkpoint`.

Example:
    >>> import tempfile, torch
    >>> from tnkd.students import MPSClassifier
    >>> from tnkd.training import DistillationModule
    >>> module = DistillationModule(MPSClassifier(16, 3, bond_dim=4), beta=0.0)
    >>> path = tempfile.mkdtemp() + "/run.ckpt"
    >>> torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
    ...             KEY: describe_module(module)}, path)
    >>> student = load_student(path)
    >>> x = torch.rand(2, 16)
    >>> bool(torch.equal(student(x), module.eval().student(x)))
    True
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnkd.registry import RecordsInitArgs, class_path, import_path
from tnkd.students.truncation import student_state

#: the checkpoint key of the description, and its format number
KEY = "tnkd"
FORMAT = 1
_GRAPH = "tnkd_graph"


class CannotDescribe(ValueError):
    """A network (or one of its arguments) cannot be written as plain data."""


def _layer_args(module: nn.Module) -> dict[str, Any] | None:
    """Constructor arguments of a ``torch.nn`` layer, read from its attributes of the same names."""
    if not type(module).__module__.startswith("torch.nn"):
        return None
    args: dict[str, Any] = {}
    for name, param in inspect.signature(type(module).__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name == "bias" and param.default is True:
            args[name] = getattr(module, "bias", None) is not None
        elif hasattr(module, name) and name not in ("device", "dtype"):
            args[name] = getattr(module, name)
        elif param.default is inspect.Parameter.empty:
            return None
    return args


def describe(obj: Any) -> Any:
    """``obj`` as plain data that :func:`build` turns back into an equal object (without weights).

    Raises:
        CannotDescribe: for an object that records no constructor arguments.
    """
    from tnkd.teachers import TeacherEnsemble
    from tnkd.tn.graph import TNGraph

    if obj is None or isinstance(obj, bool | int | float | str | torch.Tensor):
        return obj
    if isinstance(obj, list | tuple):
        return [describe(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): describe(v) for k, v in obj.items()}
    if isinstance(obj, TNGraph):
        return {_GRAPH: obj.to_dict()}
    if isinstance(obj, TeacherEnsemble):
        return {"ensemble": [describe(m) for m in obj.members]}
    if isinstance(obj, nn.Module):
        spec = getattr(obj, "checkpoint_spec", None)
        if callable(spec):  # its own {"class_path", "init_args"}, values described here
            return describe(spec())
        args = getattr(obj, "init_args", None)
        if args is None and isinstance(obj, nn.Sequential | nn.ModuleList):
            return {"class_path": class_path(obj), "modules": [describe(m) for m in obj]}
        args = _layer_args(obj) if args is None else args
        if args is None:
            raise CannotDescribe(
                f"{type(obj).__name__} records no constructor arguments: give it an `init_args` "
                "dict (as tnkd's teachers do) or a `checkpoint_spec()` method"
            )
        return {"class_path": class_path(obj), "init_args": describe(dict(args))}
    if isinstance(obj, RecordsInitArgs):  # a data module, say
        return {"class_path": class_path(obj), "init_args": describe(obj.init_args)}
    if inspect.isfunction(obj) or inspect.isclass(obj):
        return f"{obj.__module__}.{obj.__qualname__}"
    raise CannotDescribe(f"{type(obj).__name__} value {obj!r} is not plain data")


def build(spec: Any) -> Any:
    """The object :func:`describe` described (networks without their trained weights)."""
    from tnkd.tn.graph import TNGraph

    if isinstance(spec, list):
        return [build(v) for v in spec]
    if not isinstance(spec, Mapping):
        return spec
    if _GRAPH in spec:
        return TNGraph.from_dict(spec[_GRAPH])
    if "ensemble" in spec:
        return [build(m) for m in spec["ensemble"]]
    if "class_path" in spec and ("init_args" in spec or "modules" in spec):
        cls = import_path(spec["class_path"], "the class named in the checkpoint")
        if not (inspect.isclass(cls) and issubclass(cls, nn.Module | RecordsInitArgs)):
            raise ValueError(
                f"{spec['class_path']} named in the checkpoint is not a torch module or a tnkd class"
            )
        if "modules" in spec:
            return cls(*[build(m) for m in spec["modules"]])
        return cls(**{k: build(v) for k, v in current_args(cls, spec["init_args"]).items()})
    return {k: build(v) for k, v in spec.items()}


def current_args(cls: Any, args: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments an older tnkd recorded for ``cls``, as ``cls`` takes them today.

    A graph student's ``contraction`` (``"plain"``: the reference engine) and ``compile=True``
    (the stable engine through ``torch.compile``) are now names of its ``method``; an MPS's
    kernels ``"tree"`` and ``"sweep"`` are now ``"log_depth"`` and ``"scan"``. So a checkpoint
    written before still loads (:func:`build`).

    Example:
        >>> from tnkd.students import TreeClassifier
        >>> current_args(TreeClassifier, {"bond_dim": 4, "contraction": "plain", "compile": False})
        {'bond_dim': 4, 'method': 'reference'}
    """
    from tnkd.students import GraphStudent, MPSClassifier, StackedMPS
    from tnkd.students.mps import RENAMED_METHODS

    args = dict(args)
    if not (inspect.isclass(cls) and issubclass(cls, GraphStudent | StackedMPS)):
        return args
    contraction, compiled = args.pop("contraction", None), args.pop("compile", False)
    if contraction is not None:
        args["method"] = {"plain": "reference"}.get(contraction, contraction)
    if compiled:
        args["method"] = "compiled"
    if issubclass(cls, MPSClassifier | StackedMPS) and args.get("method") in RENAMED_METHODS:
        args["method"] = RENAMED_METHODS[args["method"]]
    return args


def _safe(network: Any) -> Any:
    try:
        return {"spec": describe(network)}
    except CannotDescribe as err:
        return {"error": str(err)}


def describe_module(module: nn.Module) -> dict[str, Any]:
    """The ``"tnkd"`` entry of a run module's checkpoint: its networks' descriptions."""
    names = ("student", "teacher") if hasattr(module, "student") else ("net",)
    trainer = getattr(module, "_trainer", None)
    data = getattr(trainer, "datamodule", None) if trainer is not None else None
    return {
        "format": FORMAT,
        "module": class_path(module),
        **{name: _safe(getattr(module, name, None)) for name in names},
        **({"data": _safe(data)} if data is not None else {}),
    }


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint file's dict, read with ``weights_only=True``; one-line errors."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"checkpoint {file} does not exist; give a run's checkpoint, e.g. "
            "runs/checkpoints/NAME/last.ckpt"
        )
    try:
        data = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(
            f"checkpoint {file} could not be read: it is not a checkpoint tnkd or Lightning "
            f"wrote, or it is damaged ({type(err).__name__})"
        ) from err
    if not isinstance(data, dict) or "state_dict" not in data:
        raise ValueError(f"{file} is not a Lightning checkpoint (no state_dict)")
    return data


def rebuilt(checkpoint: Mapping[str, Any], name: str, path: Any) -> Any:
    """Network ``name`` (``student``, ``teacher`` or ``net``) rebuilt from the description."""
    entry = (checkpoint.get(KEY) or {}).get(name)
    if entry is None:
        raise ValueError(
            f"checkpoint {path} does not describe its {name} (written before tnkd saved its "
            f"networks): pass it, e.g. load_from_checkpoint(path, {name}=...) built with the run's "
            "arguments, or add the description once with "
            "tnkd.training.checkpoints.describe_checkpoint"
        )
    if "error" in entry:
        raise ValueError(f"checkpoint {path} could not describe its {name}: {entry['error']}")
    return build(entry["spec"])


def module_arguments(
    cls: type, checkpoint: Mapping[str, Any], path: Any, given: Mapping[str, Any]
) -> dict[str, Any]:
    """The constructor arguments of a run module: saved hyperparameters, rebuilt networks, ``given``.

    The teacher is rebuilt as an architecture (its weights come with the state dict), so
    ``teacher_checkpoint`` is dropped: loading reads no teacher file.
    """
    saved = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if k[:1] != "_"}
    params = inspect.signature(cls.__init__).parameters
    args = {k: v for k, v in saved.items() if k in params}
    for name in ("student", "net"):
        if name in params and name not in given:
            args[name] = rebuilt(checkpoint, name, path)
    teacher = (checkpoint.get(KEY) or {}).get("teacher")
    if "teacher" in params and "teacher" not in given and teacher is not None:
        # an older checkpoint (no entry) keeps its teacher_checkpoint: the file is read
        args["teacher"] = rebuilt(checkpoint, "teacher", path) if teacher.get("spec") or "error" in teacher else None
        args["teacher_checkpoint"] = None
    args.update(given)
    return args


def load_student(
    path: str | os.PathLike, student: nn.Module | None = None, map_location: Any = "cpu"
) -> nn.Module:
    """The trained student of a distillation checkpoint, in eval mode.

    Args:
        path: a checkpoint written by ``tnkd fit`` or ``tnkd compare`` (``last.ckpt``...).
        student: the student to load the weights into (for a checkpoint written before tnkd
            described its networks); by default it is rebuilt from the checkpoint.
        map_location: as in ``torch.load``.
    """
    return student_of(read_checkpoint(path, map_location), path, student)


def student_of(
    checkpoint: Mapping[str, Any], path: Any, student: nn.Module | None = None
) -> nn.Module:
    """:func:`load_student` for a checkpoint already read (``path`` names it in errors)."""
    net = student if student is not None else rebuilt(checkpoint, "student", path)
    state = checkpoint["state_dict"]
    if not any(k.startswith("student.") for k in state):
        raise ValueError(f"checkpoint {path} holds no student weights (no 'student.' keys)")
    state = student_state(state)
    net.load_state_dict(state)
    return net.eval()


def describe_checkpoint(
    path: str | os.PathLike, out: str | os.PathLike, student: nn.Module, teacher: Any = None
) -> Path:
    """Write a copy of an older checkpoint with its networks' description added (never in place).

    ``student`` (and ``teacher``, the architecture or the list of an ensemble's members) must be
    built with the run's arguments; their weights are checked against the checkpoint's.
    """
    from tnkd.teachers import atomic_save

    checkpoint = read_checkpoint(path)
    state = checkpoint["state_dict"]
    for name, net in (("student", student), ("teacher", teacher)):
        if isinstance(net, nn.Module):
            own = {f"{name}.{k}": v.shape for k, v in net.state_dict().items()}
            wrong = [k for k, shape in own.items() if k not in state or state[k].shape != shape]
            if wrong:
                raise ValueError(f"the {name} given does not fit {path}: {wrong[:3]} differ")
    checkpoint[KEY] = {
        "format": FORMAT,
        "module": "tnkd.training.modules.DistillationModule",
        "student": _safe(student),
        "teacher": _safe(teacher) if teacher is not None else {"spec": None},
    }
    return atomic_save(checkpoint, out)
