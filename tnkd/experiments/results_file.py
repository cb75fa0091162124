"""A comparison's results file, written after every run: a stopped grid resumes where it was.

``tnkd compare`` rewrites its results file (``results:``, JSON) as soon as each run ends,
finished or failed, with ``"complete": false`` until the last one. Started again with the same
settings and the same ``--results`` file (the command it prints when stopped), it keeps the
runs the file holds and trains only the missing ones; a file whose runs were made with other
settings is refused in one line. A complete file is never overwritten: a new run of the grid
writes a numbered name beside it (:func:`results_target`).

Each write goes to a temporary file that is then renamed over the results file, so a stop or a
full disk never leaves a half-written file; the file is locked
(:class:`~tnkd.training.outputs.RunLock`) while a comparison writes it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tnkd.errors import writing
from tnkd.experiments.files import unique_path
from tnkd.training.outputs import RunLock


def read_payload(path: str | Path) -> dict[str, Any] | None:
    """The JSON object of a results file, or ``None`` if it is not one (or cannot be read)."""
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) and "runs" in payload else None


def is_incomplete(path: str | Path) -> bool:
    """Whether ``path`` is the results file of a comparison that was stopped before its end."""
    payload = read_payload(path) if Path(path).is_file() else None
    return payload is not None and payload.get("complete") is False


def results_target(path: str | Path) -> Path:
    """Where a comparison asked to write ``path`` writes.

    ``path`` itself if it does not exist or holds a stopped comparison (which is then resumed),
    else the first free numbered name beside it.
    """
    return Path(path) if is_incomplete(path) else unique_path(path)


def _plain(value: Any) -> Any:
    """``value`` as JSON would give it back (NaN as null, tuples as lists, objects as text)."""
    return json.loads(json.dumps(value, default=str, allow_nan=True).replace("NaN", "null"))


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    return value


class ResultsFile:
    """The results file of one comparison, rewritten after each run.

    Args:
        path: the file (:func:`results_target` of the ``results`` setting).
        settings: what the runs depend on (student, data, schedule, variants, seeds...); a
            stopped file made with other settings is refused.
    """

    def __init__(self, path: str | Path, settings: dict[str, Any]) -> None:
        self.path = Path(path)
        self.settings = _plain(settings)
        self.runs: list[dict[str, Any]] = []
        self.teacher: dict[str, Any] = {}
        self.lock = RunLock(
            self.path.parent,
            "results file",
            "give this comparison another --results file",
            name=f".{self.path.name}.lock",
        )
        payload = read_payload(self.path) if self.path.exists() else None
        if payload is not None and payload.get("complete") is False:
            self._check_same(payload.get("settings") or {})
            self.runs = list(payload["runs"])
            self.teacher = dict(payload.get("teacher") or {})

    def _check_same(self, saved: dict[str, Any]) -> None:
        keys = sorted(set(saved) | set(self.settings))
        changed = [k for k in keys if saved.get(k) != self.settings.get(k)]
        if changed:
            listed = "; ".join(
                f"{k}: {_short(saved.get(k))} there, {_short(self.settings.get(k))} here"
                for k in changed
            )
            raise ValueError(
                f"results file {self.path} holds a stopped comparison made with other settings "
                f"({listed}); resume it with its own settings, or give this comparison another "
                "--results file"
            )

    def done(self) -> set[tuple[str, int]]:
        """``(variant name, seed)`` of the runs the file holds (finished or failed)."""
        return {(r["name"], int(r["seed"])) for r in self.runs}

    def add(self, run: Any, teacher: dict[str, Any]) -> None:
        """Record one ended run (a :class:`~tnkd.experiments.compare.RunResult`) and rewrite."""
        self.runs.append(_json_value(asdict(run)))
        self.teacher = {**self.teacher, **{k: v for k, v in teacher.items() if v is not None}}
        self.write(complete=False)

    def write(self, complete: bool, runs: list[dict[str, Any]] | None = None) -> Path:
        """Rewrite the file atomically (temporary file, then rename); ``runs`` reorders them."""
        if runs is not None:
            self.runs = runs
        payload = {
            "teacher": _json_value(self.teacher),
            "runs": self.runs,
            "complete": complete,
            "settings": self.settings,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with writing(self.path):
                tmp.write_text(json.dumps(payload, indent=2))
                os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self.path


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
