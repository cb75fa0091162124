"""Stops a scheduler can read: SIGTERM and Ctrl-C end a run with a status, a checkpoint and a hint.

A cluster scheduler preempts a job with SIGTERM. During training, :class:`RunCheckpoint`
(with Lightning's own handler) stops after the current batch and writes ``last.ckpt``; the
``tnkd`` command then exits with status **143** (128 + SIGTERM, what a shell reports for a job
ended by SIGTERM, and what schedulers treat as a preempted, requeueable job) or **130** after a
Ctrl-C, and prints the command that resumes the run. Before training starts (parsing, data
loading, teacher logits), :func:`install` makes SIGTERM end the command at once with the same
status and hint; nothing is lost then, and the resume command also works when no checkpoint
exists yet (``--ckpt_path last`` starts a named run from the beginning).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

#: exit statuses: 128 + the signal number, as a shell reports a job ended by that signal
EXIT_STATUS = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}


class Preempted(BaseException):  # a stop, not an error (like SystemExit)
    """Raised by the start-up SIGTERM handler: the command was stopped before training began."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum} before training started")
        self.signum = signum


_state: dict[str, Any] = {"training": False, "signal": None, "previous": None, "resume": {}}


def _handler(signum: int, frame: Any) -> None:
    _state["signal"] = signum
    if not _state["training"]:
        raise Preempted(signum)
    # during training Lightning's own handler (composed with this one) stops after the batch


def install() -> None:
    """Handle SIGTERM from now on (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return
    _state.update(
        training=False, signal=None, previous=signal.getsignal(signal.SIGTERM), resume={}
    )
    signal.signal(signal.SIGTERM, _handler)


def uninstall() -> None:
    """Restore the SIGTERM handler that :func:`install` replaced."""
    previous = _state.get("previous")
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)
    _state["previous"] = None


def training_started(started: bool = True) -> None:
    """From now on SIGTERM stops training after the current batch (Lightning's handler)."""
    _state["training"] = started


def record_stop(signum: int) -> None:
    """Note the signal that stopped training (Ctrl-C is turned into Lightning's SIGTERM stop)."""
    _state["signal"] = signum


def stop_signal() -> int:
    """The signal that stopped the run: SIGINT after a Ctrl-C, else SIGTERM."""
    return _state["signal"] or signal.SIGTERM


def resume_with(flags: dict[str, str]) -> None:
    """Flags the resume command must carry (``tnkd compare``: its results file and W&B group)."""
    _state["resume"] = dict(flags)


def resume_flags() -> dict[str, str]:
    """The flags set by :func:`resume_with` since :func:`install` (none: rerun as it was)."""
    return dict(_state.get("resume") or {})
