"""A griffe extension for the API reference: read ``Example:`` as an examples section.

tnkd's docstrings follow the Google style, which names the section ``Example:`` or
``Examples:``; griffe knows only the plural (the singular becomes an admonition whose ``>>>``
lines are read as Markdown). This renames the section before griffe parses the docstring, so
every doctest renders as code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SINGULAR = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class GoogleExamples(griffe.Extension):
    """Rename ``Example:`` to ``Examples:`` in every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite the section title of ``obj``'s docstring, if it has one."""
        if obj.docstring is not None:
            obj.docstring.value = _SINGULAR.sub(r"\1Examples:", obj.docstring.value)
