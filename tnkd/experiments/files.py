"""File helpers shared by the commands: nothing a user wrote is ever overwritten."""

from __future__ import annotations

from pathlib import Path


def unique_path(path: str | Path) -> Path:
    """``path``, or ``stem.1.suffix``, ``stem.2.suffix`` ... : the first that does not exist."""
    target, k = Path(path), 1
    while target.exists():
        target = Path(path).with_name(f"{Path(path).stem}.{k}{Path(path).suffix}")
        k += 1
    return target
