"""Teacher logits computed once per data set and teacher, cached on disk.

Distillation runs the frozen teacher on every training batch of every epoch; on a CPU that can
cost more than training the student. With a cache the teacher runs once over each split it is
needed for (``DistillationModule`` asks for training and validation when fitting, test when
testing: one file per split); a file is keyed by a SHA-256 of the teacher's weights *and* of the
split's inputs, so a different teacher, split or preprocessing can never pick up stale logits.
Files are written atomically (temporary file, then rename) and checked (key, shape, finiteness)
when read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from tnkd.teachers import atomic_save

CACHE_FORMAT = "tnkd-teacher-logits"


def tensor_digest(*tensors: torch.Tensor, h: hashlib._Hash | None = None) -> str:
    """SHA-256 over the bytes (and shapes, dtypes) of tensors."""
    h = h or hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def module_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state (parameter and buffer names and values)."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        tensor_digest(value, h=h)
    return h.hexdigest()


def compute_logits(teacher: nn.Module, inputs: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Teacher logits for all ``inputs`` (eval mode, no grad), as float32 on the CPU."""
    was_training = teacher.training
    teacher.eval()
    device = next(teacher.parameters(), torch.empty(0)).device
    with torch.no_grad():
        out = torch.cat(
            [
                teacher(inputs[i : i + batch_size].to(device)).float().cpu()
                for i in range(0, len(inputs), batch_size)
            ]
        )
    teacher.train(was_training)
    return out


def cached_teacher_logits(
    teacher: nn.Module, inputs: torch.Tensor, cache_dir: str | Path
) -> torch.Tensor:
    """Load the teacher's logits on ``inputs`` from ``cache_dir``, computing and saving them once.

    Raises:
        ValueError: a cache file exists under the right key but is corrupt or does not match.
    """
    key = hashlib.sha256((module_digest(teacher) + tensor_digest(inputs)).encode()).hexdigest()
    path = Path(cache_dir) / f"teacher-logits-{key[:32]}.pt"
    if path.exists():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"teacher cache {path} is corrupt ({type(err).__name__}); delete it to recompute"
            ) from err
        logits = payload.get("logits") if isinstance(payload, dict) else None
        if (
            not isinstance(payload, dict)
            or payload.get("format") != CACHE_FORMAT
            or payload.get("key") != key
            or not isinstance(logits, torch.Tensor)
            or logits.ndim != 2
            or logits.shape[0] != len(inputs)
            or not torch.isfinite(logits).all()
        ):
            raise ValueError(
                f"teacher cache {path} does not match this teacher and data (wrong key, shape or values); "
                "delete it to recompute"
            )
        return logits
    logits = compute_logits(teacher, inputs)
    atomic_save({"format": CACHE_FORMAT, "key": key, "logits": logits}, path, overwrite=True)
    return logits
