"""Ship a trained student: a program of tensor operations, as ``.pt2`` or ``.onnx``.

A student trained by tnkd runs fast engines (C++ kernels, plans per batch size, range checks)
that ``torch.export`` and the ONNX exporter cannot capture (a Python branch on a tensor's
value, a call into C++). :func:`portable` returns a copy of the student that contracts with the
**portable engine** (:mod:`tnkd.tn.portable`, registered in the planner; the same logits to
rounding): tensor operations in shape-static loops only,

* a chain: two boundary vectors swept in from the ends, one batched matrix product per site,
  rescaled on a fixed schedule (:func:`tnkd.tn.portable.chain_log_contract`);
* any other graph: the stable engine's grouped steps, rescaled at every step, no range check;
  both in float64 (so the export is the exact value, not a second float32 rounding; the
  program still takes and returns float32);
* a TT layer: :func:`~tnkd.tn.tt_matrix.tt_matvec`, one einsum per core, no plan per batch.

:func:`export_program` captures it with a dynamic batch dimension, and :func:`save` writes it as

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
        if hasattr(module, "portable"):
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
            # a copy: the program keeps its example, and a slice would keep its whole batch
            return torch.export.export(
                portable(student), (example.clone(),), dynamic_shapes=({0: batch},), strict=False
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
    student: nn.Module | torch.export.ExportedProgram,
    path: str | os.PathLike,
    example: torch.Tensor | None = None,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Export ``student`` to ``path`` (``.pt2`` or ``.onnx``); ``metadata`` goes into the file.

    ``student`` is a student (captured here from ``example``) or a program
    :func:`export_program` already captured. The file is written beside its final name and
    renamed when complete, so a failed export leaves nothing behind. Values of ``metadata``
    that are not strings are stored as JSON.
    """
    out = Path(path)
    _check_output(out, overwrite)
    if isinstance(student, torch.export.ExportedProgram):
        program = student
    elif example is None:
        raise ValueError("save needs an example batch to capture the student from")
    else:
        program = export_program(student, example)
    meta = {
        str(k): v if isinstance(v, str) else json.dumps(v, default=str)
        for k, v in (metadata or {}).items()
    }
    # (torch.export.save warns unless the name ends in .pt2)
    partial = out.with_name(f".{out.stem}.partial{out.suffix}")
    try:
        if out.suffix == ".pt2":
            torch.export.save(program, partial, extra_files=meta)
            _deflate_json(partial)
        else:
            _save_onnx(program, partial, meta)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def _deflate_json(path: Path) -> None:
    """Compress the ``.json`` entries of a ``.pt2`` archive (torch stores them uncompressed).

    The program's graph is a JSON text of a few hundred KiB to MiB that deflates about 10x;
    the weights stay stored as they are (``torch.export.load`` reads both kinds of entry).
    """
    import zipfile

    packed = path.with_name(path.name + ".zip")
    try:
        with zipfile.ZipFile(path) as source, zipfile.ZipFile(packed, "w") as target:
            for info in source.infolist():
                deflate = info.filename.endswith(".json")
                target.writestr(
                    info, source.read(info),
                    compress_type=zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED,
                )
        os.replace(packed, path)
    finally:
        packed.unlink(missing_ok=True)


def _save_onnx(program: torch.export.ExportedProgram, path: Path, meta: dict[str, str]) -> None:
    try:
        import onnx
    except ImportError as err:
        raise ImportError(
            "ONNX export needs the export extra: pip install 'tnkd[export]' (onnx, onnxscript, "
            "onnxruntime)"
        ) from err
    import logging

    # the exporter's registry warns, on stderr, that torchvision's operators are not there
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
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


# ---- tnkd export ------------------------------------------------------------------------------


def _data_module(checkpoint: Mapping[str, Any], path: Any, root: str | None) -> Any:
    """The run's data module, rebuilt from the checkpoint (``root`` replaces its data folder)."""
    from tnkd.training.checkpoints import KEY, build

    entry = (checkpoint.get(KEY) or {}).get("data")
    if not entry or "spec" not in entry:
        raise ValueError(
            f"checkpoint {path} does not describe its data, so the export cannot be checked on "
            "the test split; add --check none to export without the check"
        )
    spec = copy.deepcopy(entry["spec"])
    if root is not None:
        spec["init_args"]["root"] = root
    data = build(spec)
    data.setup("test")
    return data


def load_program(path: Path) -> Any:
    """A function running the exported file on a numpy/torch batch (logits as a torch tensor)."""
    if path.suffix == ".pt2":
        module = torch.export.load(path).module()
        return lambda x: module(x)
    import onnxruntime

    options = onnxruntime.SessionOptions()
    session = onnxruntime.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def agreement(student: nn.Module, exported: Any, batches: Any) -> tuple[int, int, float]:
    """``(same top-1, images, largest relative logit difference)`` of a student and its export.

    The relative difference of an image is ``max |a - b| / max |a|`` over its logits.
    """
    same = total = 0
    worst = 0.0
    with torch.no_grad():
        for batch in batches:
            x = batch[0]
            a, b = student(x).float(), exported(x).float()
            same += int((a.argmax(1) == b.argmax(1)).sum())
            total += x.shape[0]
            scale = a.abs().amax(1).clamp_min(torch.finfo(a.dtype).tiny)
            worst = max(worst, float(((a - b).abs().amax(1) / scale).max()))
    return same, total, worst


def accuracy(exported: Any, batches: Any) -> tuple[int, int]:
    """``(images whose top-1 class is the label, images)`` for the exported program."""
    correct = total = 0
    with torch.no_grad():
        for x, y, *_ in batches:
            correct += int((exported(x).argmax(1) == y).sum())
            total += x.shape[0]
    return correct, total


def _teacher_parameters(checkpoint: Mapping[str, Any], path: Any) -> int | None:
    """The parameter count of the checkpoint's teacher (its described architecture), if any."""
    from tnkd.training.checkpoints import KEY, rebuilt

    entry = (checkpoint.get(KEY) or {}).get("teacher") or {}
    if not entry.get("spec"):
        return None
    teacher = rebuilt(checkpoint, "teacher", path)
    members = teacher if isinstance(teacher, list | tuple) else [teacher]
    return sum(p.numel() for m in members for p in m.parameters())


def log_artifact(
    path: Path, metadata: Mapping[str, Any], config: Mapping[str, Any], project: str, save_dir: str
) -> Path:
    """Log the exported file as a W&B model artifact, in a run of its own; the run's folder.

    The run is offline unless ``WANDB_MODE`` says otherwise (``wandb sync FOLDER`` uploads it
    and its artifact later). The artifact is named after the file (``student.onnx``:
    ``student-onnx``); ``metadata`` is the artifact's, ``config`` the run's.
    """
    import re

    import wandb

    Path(save_dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=project,
        dir=save_dir,
        job_type="export",
        mode=os.environ.get("WANDB_MODE", "offline"),
        config=dict(config),
        reinit="create_new",
    )
    try:
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{path.stem}-{path.suffix[1:]}")
        artifact = wandb.Artifact(name, type="model", metadata=dict(metadata))
        artifact.add_file(str(path), name=path.name)
        run.log_artifact(artifact, aliases=["latest"])
        run.summary.update({k: v for k, v in metadata.items() if isinstance(v, int | float)})
        folder = Path(run.dir).parent
    finally:
        run.finish()
    return folder


def run_checkpoint(name: str, runs: str | os.PathLike = "runs") -> str:
    """``name`` if it is a file or a ``.ckpt`` path, else the named run's ``last.ckpt`` if any.

    ``tnkd fit --trainer.logger.init_args.name NAME`` keeps its checkpoints in
    ``runs/checkpoints/NAME/``, so ``tnkd export NAME OUT`` exports its newest weights.
    """
    from tnkd.training.callbacks import checkpoint_folder

    last = checkpoint_folder(name, runs, runs) / "last.ckpt"
    if Path(name).is_file() or Path(name).suffix == ".ckpt":
        return name
    if not last.is_file():
        raise FileNotFoundError(
            f"checkpoint {name} does not exist, nor a run of that name ({last}); give a run's "
            "checkpoint file or the name of a run under runs/checkpoints/"
        )
    return str(last)


def main(args: list[str] | None = None) -> Path:
    """``tnkd export CHECKPOINT OUT.{onnx,pt2}``: write the trained student as a program."""
    import argparse

    from tnkd import __version__
    from tnkd.training.checkpoints import KEY, read_checkpoint, student_of

    parser = argparse.ArgumentParser(prog="tnkd export", description=main.__doc__)
    parser.add_argument("checkpoint", help="a run's checkpoint, e.g. runs/checkpoints/NAME/last.ckpt, "
                        "or a run's name NAME (its runs/checkpoints/NAME/last.ckpt)")
    parser.add_argument("output", help="the file to write: NAME.onnx or NAME.pt2 (never overwritten)")
    parser.add_argument("--check", choices=("test", "val", "none"), default="test",
                        help="the split the export is checked on against the PyTorch student")
    parser.add_argument("--data_root", help="where the data lives here, if not where it was")
    parser.add_argument("--wandb", type=str.lower, choices=("true", "false"), default="false",
                        help="log the file as a W&B model artifact (offline unless WANDB_MODE "
                        "says otherwise), with the run's config, the check's accuracy and sizes")
    parser.add_argument("--project", default="tnkd", help="the W&B project (with --wandb true)")
    parser.add_argument("--save_dir", default="runs",
                        help="where the W&B run is kept: SAVE_DIR/wandb/ (with --wandb true)")
    ns = parser.parse_args(args)
    out = Path(ns.output)
    _check_output(out, overwrite=False)
    ns.wandb = ns.wandb == "true"
    if ns.wandb:
        from tnkd.training.outputs import check_writable

        check_writable(ns.save_dir, "--save_dir")
    ns.checkpoint = run_checkpoint(ns.checkpoint)
    checkpoint = read_checkpoint(ns.checkpoint)
    student = student_of(checkpoint, ns.checkpoint)
    saved = checkpoint.get(KEY) or {}
    data = None if ns.check == "none" else _data_module(checkpoint, ns.checkpoint, ns.data_root)
    if data is not None:
        batches = data.test_dataloader() if ns.check == "test" else data.val_dataloader()
        example = next(iter(batches))[0][:2]
        shape = tuple(example.shape[1:])
    else:
        shape = tuple(getattr(student, "input_shape", None) or (student.num_inputs,))
        example = torch.rand(2, *shape)
    metadata = {
        "producer": f"tnkd {__version__}",
        "input_shape": list(shape),
        "class_names": list(getattr(data, "class_names", ()) or range(student.num_classes)),
        "student": saved.get("student", {}).get("spec"),
        "data": (saved.get("data") or {}).get("spec"),
        "hyper_parameters": {
            k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if k[:1] != "_"
        },
    }
    save(student, out, example, metadata)
    size = out.stat().st_size
    line = f"{out}: {size / 1024:.1f} KiB, {student.parameter_count():,} parameters"
    record: dict[str, Any] = {"format": out.suffix[1:], "file_bytes": size}
    if data is not None:
        runner = load_program(out)
        same, total, worst = agreement(student, runner, batches)
        line += (
            f"; {ns.check} split: the same top-1 class on {same}/{total} images, largest "
            f"relative logit difference {worst:.1e}"
        )
        if ns.wandb:
            correct, _ = accuracy(runner, batches)
            record |= {
                f"{ns.check}_agreement": same / total,
                f"{ns.check}_accuracy": correct / total,
                f"{ns.check}_max_relative_logit_difference": worst,
                f"{ns.check}_images": total,
            }
    print(line)
    if ns.wandb:
        params = student.parameter_count()
        teacher = _teacher_parameters(checkpoint, ns.checkpoint)
        record["student_params"] = params
        if teacher is not None:
            record |= {"teacher_params": teacher, "compression_ratio": teacher / params}
        config = {**metadata["hyper_parameters"], "student": metadata["student"],
                  "data": metadata["data"], "checkpoint": str(ns.checkpoint)}
        record |= {"config": config, "class_names": metadata["class_names"],
                   "input_shape": metadata["input_shape"], "producer": metadata["producer"]}
        folder = log_artifact(out, record, config, ns.project, ns.save_dir)
        print(f"tnkd export: logged {out.name} as a W&B model artifact in {folder} "
              f"(upload it with: wandb sync {folder})")
    return out
