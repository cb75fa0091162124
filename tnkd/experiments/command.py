"""A function as a ``tnkd`` subcommand configured from YAML (``--config``) and flags."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def function_command(fn: Callable[..., Any], args: list[str], prog: str, description: str) -> Any:
    """Parse ``args`` into ``fn``'s keyword arguments (jsonargparse) and call it.

    Parse errors (a missing config file, a value of the wrong type) are raised, not printed
    with the usage, so that ``tnkd`` reports them as its one-line errors (exit status 2).
    """
    from jsonargparse import CLI

    return CLI(
        fn,
        args=args,
        as_positional=False,
        prog=prog,
        description=description,
        exit_on_error=False,
    )
