"""One-line messages for the errors a user's input, files or disk cause.

The ``tnkd`` commands print these instead of a traceback (``TNKD_DEBUG=1`` shows it); an error
of any other type is a bug and keeps its traceback.
"""

from __future__ import annotations

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
