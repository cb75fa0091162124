"""One-line messages for the errors a user's input, files or disk cause.

The ``tnkd`` commands print these instead of a traceback (``TNKD_DEBUG=1`` shows it); an error
of any other type is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

#: exception types that mean "the user's input, files or disk" (config parsing errors too)
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def debug_enabled() -> bool:
    """Whether ``TNKD_DEBUG`` asks for full tracebacks."""
    return os.environ.get("TNKD_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def user_error_message(error: BaseException) -> str | None:
    """The one-line message of a user error, or ``None`` for a bug (which keeps its traceback).

    Follows the chain of causes (jsonargparse wraps the error a class raised while it was being
    built) to the innermost error of a user-error type. tnkd's own messages are kept as they
    are; a type or key error found by the config parser is prefixed with the setting's keys.
    """
    from argparse import ArgumentError

    from lightning.fabric.utilities.exceptions import MisconfigurationException

    kinds = (*USER_ERRORS, ArgumentError, MisconfigurationException)
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not e for e in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    if is_disk_full(error):  # whatever wrapped it
        names = [
            n for e in chain for n in (getattr(e, "filename", None), getattr(e, "filename2", None))
        ]
        return disk_full_message(*names)
    found = [e for e in chain if isinstance(e, kinds)]
    if not found:
        return None
    innermost = found[-1]
    text = " ".join(str(innermost).split()) or type(innermost).__name__
    if _raised_by_tnkd(innermost):
        return text
    keys: list[str] = []
    for e in chain:
        keys += [k for k in re.findall(r'Parser key "([^"]+)"', str(e)) if k not in keys]
    text = re.sub(r'Parser key "[^"]+":\s*', "", text).strip()
    renamed = re.search(r"Option '(\w+)' is not accepted", text)
    if renamed and renamed.group(1) in RENAMED_OPTIONS and "student" in ".".join(keys):
        text += f"; {RENAMED_OPTIONS[renamed.group(1)]}"
    return f"{'.'.join(keys)}: {text}" if keys else text


#: a student's arguments since renamed, and what a config says instead (checkpoints translate
#: them themselves: tnkd.training.checkpoints.current_args)
RENAMED_OPTIONS = {
    "contraction": "it is now `method` (auto, stable, or reference for plain)",
    "compile": "`compile: true` is now `method: compiled` (drop `compile: false`)",
}


def _raised_by_tnkd(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    package = Path(__file__).resolve().parent
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(package)


#: the file being written when the disk filled up (set around writes that name no file)
_writing: dict[str, str | None] = {"path": None}
#: the folders the command writes to (the one with the least space left is named on a full disk)
_outputs: list[str] = []


def note_output(path: str | os.PathLike) -> None:
    """Record a folder (or file) the command writes to, for :func:`disk_full_message`."""
    if str(path) not in _outputs:
        _outputs.append(str(path))


class writing:
    """Context: errors inside it are about writing ``path`` (for :func:`disk_full_message`)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)

    def __enter__(self) -> None:
        self.previous = _writing["path"]
        _writing["path"] = self.path

    def __exit__(self, kind: type | None, *exc: object) -> None:
        if kind is None:  # an error keeps the name for the message
            _writing["path"] = self.previous


def _human(size: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def _existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _free(path: str) -> tuple[int, Path]:
    import shutil

    probe = _existing(Path(path))
    try:
        return shutil.disk_usage(probe).free, probe
    except OSError:
        return 1 << 62, probe


def disk_full_message(*paths: str | os.PathLike | None) -> str:
    """One line for a full disk: which file, how much space is left where, what to do.

    Of the files named by the error (``paths``), the file being written (:class:`writing`) and
    the command's output folders (:func:`note_output`), the one on the fullest disk is named:
    the file an error names may be the source of a copy (W&B moves its media files from /tmp).
    """
    candidates = [str(p) for p in paths if p] + [p for p in (_writing["path"],) if p] + _outputs
    if not candidates:
        candidates = [os.getcwd()]
    free, where, chosen = min(((*_free(c), c) for c in candidates), key=lambda t: t[0])
    if chosen.endswith(".tmp") and not Path(chosen).exists():  # the removed partial file
        chosen = chosen.removesuffix(".tmp")
    what = f"writing {chosen}" if not Path(chosen).is_dir() else f"writing under {chosen}"
    return (
        f"no space left on device {what} ({_human(free)} free in {where}); nothing partial was "
        "kept: free space there, or point the output at another disk (tnkd fit: "
        "--trainer.default_root_dir and --trainer.logger.init_args.save_dir; tnkd compare: "
        "--save_dir and --results)"
    )


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or an error in its chain of causes) is a full disk."""
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not e for e in seen):
        seen.append(current)
        if (isinstance(current, OSError) and current.errno == errno.ENOSPC) or (
            "No space left on device" in str(current)
        ):
            return True
        current = current.__cause__ or current.__context__
    return False
