"""Ship a trained student: a program of tensor operations, as ``.pt2`` or ``.onnx``.

A student trained by tnkd runs fast engines (C++ kernels, plans per batch size, range checks)
that ``torch.export`` and the ONNX exporter cannot capture. :func:`portable` returns a copy of
the student that contracts with the portable engine (:mod:`tnkd.tn.portable`: tensor operations
only; the same logits to rounding); :func:`export_program` captures it with a dynamic batch
dimension, and :func:`save` writes it as

* ``.pt2``: ``torch.export.save`` (load with ``torch.export.load(path).module()``), or
* ``.onnx``: ``torch.onnx.export(..., dynamo=True)`` (run it in ONNX Runtime, no tnkd needed;
  needs the ``export`` extra: ``pip install "tnkd[export]"``).

The program takes the images as the data module yields them: the pooling, patches and feature
map are inside it. ``metadata`` (class names, the run's config...) is stored in the file: in
the ONNX model's ``metadata_props``, in the ``.pt2`` archive's extra files.

The command ``tnkd export CKPT OUT`` does all this for a run's checkpoint and reports the
agreement with the PyTorch student on the test split; see the deployment guide.

Example:
    >>> import torch
    >>> from tnkd.students import MPSClassifier
    >>> student = MPSClassifier(16, 3, bond_dim=4).eval()
    >>> program = export_program(student, torch.rand(2, 16))
    >>> x = torch.rand(5, 16)
    >>> bool(torch.allclose(program.module()(x), student(x), rtol=1e-4, atol=1e-6))
    True
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMATS = (".pt2", ".onnx")


def portable(student: nn.Module) -> nn.Module:
    """A copy of ``student`` in eval mode whose every contraction uses the portable engine."""
    copied = copy.deepcopy(student).eval()
    for module in copied.modules():
        if hasattr(type(module), "portable") or hasattr(module, "_pairwise"):
            module.portable = True
    return copied


def export_program(student: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of the portable student, the batch dimension dynamic (1 and up).

    Args:
        student: a trained student (any family; it is copied, not changed).
        example: one input batch as the data module yields it (any batch size).
    """
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    planned = torch.backends.opt_einsum.enabled
    torch.backends.opt_einsum.enabled = False  # (it plans with int(batch): a fixed batch)
    try:
        with torch.no_grad():
            return torch.export.export(
                portable(student), (example,), dynamic_shapes=({0: batch},), strict=False
            )
    finally:
        torch.backends.opt_einsum.enabled = planned


def _check_output(path: Path, overwrite: bool) -> None:
    if path.suffix not in FORMATS:
        raise ValueError(
            f"cannot export to {path.name}: the file name must end in one of {', '.join(FORMATS)}"
        )
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or delete it first")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} does not exist; create it first")


def save(
    student: nn.Module,
    path: str | os.PathLike,
    example: torch.Tensor,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Export ``student`` to ``path`` (``.pt2`` or ``.onnx``); ``metadata`` goes into the file.

    The file is written beside its final name and renamed when complete, so a failed export
    leaves nothing behind. Values of ``metadata`` that are not strings are stored as JSON.
    """
    out = Path(path)
    _check_output(out, overwrite)
    program = export_program(student, example)
    meta = {
        str(k): v if isinstance(v, str) else json.dumps(v, default=str)
        for k, v in (metadata or {}).items()
    }
    partial = out.with_name(f".{out.name}.partial")
    try:
        if out.suffix == ".pt2":
            torch.export.save(program, partial, extra_files=meta)
        else:
            _save_onnx(program, partial, meta)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def _save_onnx(program: torch.export.ExportedProgram, path: Path, meta: dict[str, str]) -> None:
    try:
        import onnx
    except ImportError as err:
        raise ImportError(
            "ONNX export needs the export extra: pip install 'tnkd[export]' (onnx, onnxscript, "
            "onnxruntime)"
        ) from err
    exported = torch.onnx.export(program, dynamo=True, verbose=False)
    model = exported.model_proto
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata :func:`save` stored in an exported file."""
    file = Path(path)
    if file.suffix == ".onnx":
        import onnx

        model = onnx.load(str(file), load_external_data=False)
        return {p.key: p.value for p in model.metadata_props}
    extra: dict[str, Any] = {}
    import zipfile

    with zipfile.ZipFile(file) as archive:
        for name in archive.namelist():
            if "/extra/" in name:
                extra[name.rsplit("/extra/", 1)[1]] = archive.read(name).decode()
    return extra
