"""One structured description of a run, the same from every entry point.

``tnkd fit``, ``tnkd compare``, ``tnkd grid``, a W&B sweep agent and plain Python all build a
LightningModule; at the start of fitting (or testing) :func:`run_config` describes it, and the
module logs the description as the run's config. In the W&B UI runs can then be grouped by
``divergence`` and filtered by ``alpha``, ``temperature``, ``beta`` or ``bond_dim``, whichever
command made them. The keys:

* ``role`` (``student`` or ``teacher``), ``tnkd_version`` and, from a git checkout, ``git_commit``;
* ``student``: ``{class, <its constructor arguments>, engine}`` (``engine``: the planner's
  choice, :meth:`~tnkd.students.graph.GraphStudent.plan`, for students that have one), and its
  main settings repeated at the top level: ``bond_dim``, ``num_sites``, ``rank``, ``ranks``,
  ``feature_map``, ``engine``;
* ``divergence`` (``none`` for a labels-only run), its parameters at the top level (``alpha``
  for Renyi, ``skew`` for skew KL, ``target_weight`` / ``nontarget_weight`` for DKD,
  ``standardize`` when set) and in ``divergence_params``; ``temperature``, ``beta``;
* ``lr``, ``weight_decay``, ``scheduler``, ``epochs``, ``seed``;
* ``data``: ``{class, <its arguments>}`` (``root`` only when relative: absolute paths are
  machine-specific);
* ``teacher``: ``{class, file, test_acc, <its constructor arguments>}``;
* ``student_params``, ``teacher_params``, ``compression_ratio``.

The short names (``divergence``, ``alpha``, ``temperature``, ``beta``, ``bond_dim``, ``lr``,
``seed``, ``epochs``) are also what ``tnkd compare`` variants, the sweep files and the CLI's
short flags (``tnkd fit --alpha 0.5``) use.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import subprocess
from pathlib import Path
from typing import Any

from torch import nn

import tnkd

#: student arguments repeated at the top level of the config (for W&B filters and columns)
TOP_LEVEL_STUDENT_KEYS = ("bond_dim", "num_sites", "rank", "ranks", "feature_map", "engine")
#: divergence parameters repeated at the top level
TOP_LEVEL_DIVERGENCE_KEYS = ("alpha", "skew", "target_weight", "nontarget_weight", "standardize")


def plain(value: Any) -> Any:
    """A JSON-friendly copy: numbers, strings, lists and dicts as they are, objects by class name."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if hasattr(value, "items") and hasattr(value, "keys"):  # jsonargparse Namespace
        return {str(k): plain(v) for k, v in value.items()}
    name = getattr(value, "name", None)
    return name if isinstance(name, str) and name else type(value).__name__


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout tnkd is imported from, or ``None`` (an installed package)."""
    root = Path(tnkd.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def describe_student(student: nn.Module) -> dict[str, Any]:
    """``{class, <constructor arguments>, engine}`` of a student (``engine`` where it plans one)."""
    args = getattr(student, "init_args", None)
    out = {"class": type(student).__name__, **plain(args if isinstance(args, dict) else {})}
    if isinstance(getattr(student, "engine", None), str):  # the planner's choice
        out["engine"] = student.engine
    return out


def describe_data(datamodule: Any) -> dict[str, Any]:
    """``{class, <constructor arguments read back from the module>}``; absolute roots left out."""
    out: dict[str, Any] = {"class": type(datamodule).__name__}
    try:
        parameters = inspect.signature(type(datamodule).__init__).parameters
    except (TypeError, ValueError):
        return out
    for name in parameters:
        if name == "self" or not hasattr(datamodule, name):
            continue
        value = getattr(datamodule, name)
        if name == "root" and Path(value).is_absolute():
            continue
        if (
            isinstance(value, bool | int | float | str | Path | list | tuple | dict)
            or value is None
        ):
            out[name] = plain(value)
    return out


def describe_teacher(teacher: nn.Module, file: str | list[str] | None = None) -> dict[str, Any]:
    """``{class, file, test_acc, <constructor arguments>}`` (``test_acc`` from a tnkd teacher file)."""
    out: dict[str, Any] = {"class": type(teacher).__name__}
    if isinstance(file, list | tuple):  # an ensemble: its files and their test accuracies
        out["file"] = [_relative(f) for f in file]
        out["test_acc"] = [teacher_test_accuracy(f) for f in file]
    elif file:
        out["file"] = _relative(file)
        accuracy = teacher_test_accuracy(file)
        if accuracy is not None:
            out["test_acc"] = accuracy
    args = getattr(teacher, "init_args", None)
    if isinstance(args, dict):
        out.update(plain(args))
    return out


def teacher_test_accuracy(file: str | os.PathLike) -> float | None:
    """The test accuracy recorded in a tnkd teacher file, if any."""
    import torch

    from tnkd.teachers import TEACHER_FORMAT

    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if not isinstance(payload, dict) or payload.get("format") != TEACHER_FORMAT:
        return None
    value = payload.get("metrics", {}).get("test/teacher_acc")
    return float(value) if value is not None else None


def _relative(path: str | os.PathLike) -> str:
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve())) if p.is_absolute() else str(p)
    except ValueError:
        return str(p)


def run_config(module: Any, datamodule: Any = None, trainer: Any = None) -> dict[str, Any]:
    """The structured config of a run (see the module docstring)."""
    config: dict[str, Any] = {"tnkd_version": tnkd.__version__}
    commit = git_commit()
    if commit:
        config["git_commit"] = commit
    hp = dict(getattr(module, "hparams", {}))
    if hasattr(module, "student") and hasattr(module, "divergence"):  # DistillationModule
        config["role"] = "student"
        student = describe_student(module.student)
        config["student"] = student
        config.update({k: student[k] for k in TOP_LEVEL_STUDENT_KEYS if k in student})
        distilled = module.beta > 0
        divergence = module.divergence
        params = {
            k: plain(getattr(divergence, k))
            for k in (*TOP_LEVEL_DIVERGENCE_KEYS, "fixed_scale")
            if getattr(divergence, k, None) not in (None, False)  # standardize only when set
        }
        config["divergence"] = divergence.name if distilled else "none"
        if distilled:
            config["divergence_params"] = params
            config.update({k: params[k] for k in TOP_LEVEL_DIVERGENCE_KEYS if k in params})
        config["temperature"] = module.temperature
        config["beta"] = module.beta
        config["mixup"] = getattr(module, "mixup", 0.0)
        if module.teacher is not None:
            config["teacher"] = describe_teacher(module.teacher, hp.get("teacher_checkpoint"))
        config.update(module.size_summary())
    elif hasattr(module, "net"):  # TeacherModule
        config["role"] = "teacher"
        config["teacher"] = describe_teacher(module.net, hp.get("export_path"))
        config["teacher_params"] = sum(p.numel() for p in module.net.parameters())
    for key in ("lr", "weight_decay", "scheduler"):
        if key in hp:
            config[key] = plain(hp[key])
    if trainer is not None:
        config["epochs"] = trainer.max_epochs
    seed = os.environ.get("PL_GLOBAL_SEED")
    if seed is not None:
        config["seed"] = int(seed)
    if datamodule is not None:
        config["data"] = describe_data(datamodule)
    return config
