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
    for e in chain:  # a full disk, whatever wrapped it
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(
            e
        ):
            return disk_full_message(getattr(e, "filename", None))
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
    return f"{'.'.join(keys)}: {text}" if keys else text


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
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"  # pragma: no cover


def disk_full_message(path: str | os.PathLike | None) -> str:
    """One line for a full disk: which file, how much space is left where, what to do.

    Args:
        path: the file that could not be written (``None``: the last file named by
            :class:`writing`, or the working folder).
    """
    import shutil

    path = path or _writing["path"]
    target = Path(path) if path else Path.cwd()
    probe = target if target.is_dir() else target.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = _human(shutil.disk_usage(probe).free)
    except OSError:
        free = "unknown space"
    what = f"writing {target}" if path else "writing the run's files"
    return (
        f"no space left on device {what} ({free} free in {probe}); nothing partial was kept: "
        "free space there, or point the output at another disk (tnkd fit: "
        "--trainer.default_root_dir and --trainer.logger.init_args.save_dir; tnkd compare: "
        "--save_dir and --results)"
    )
