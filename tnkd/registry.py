"""One registry class for every extension point (divergences, feature maps, students...).

Names are lower-cased before storing and before lookup, duplicates are refused, and a miss
lists the valid names, so a typo in a YAML file gives an error that says how to fix it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object mapping with helpful errors.

    Args:
        kind: what is registered, used in error messages (e.g. ``"divergence"``).

    Example:
        >>> maps = Registry("feature map")
        >>> @maps.register("linear")
        ... class Linear: ...
        >>> maps.get("LINEAR") is Linear
        True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    @staticmethod
    def _key(name: str) -> str:
        return name.strip().lower().replace("-", "_")

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        """Decorator that registers an object under ``name`` (and optional aliases)."""

        def decorator(obj: T) -> T:
            for n in (name, *aliases):
                self.add(n, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        """Register ``obj`` under ``name``; raises ``KeyError`` if the name is taken."""
        key = self._key(name)
        if key in self._items:
            raise KeyError(f"{self.kind} {name!r} is already registered; choose another name")
        self._items[key] = obj

    def get(self, name: str) -> T:
        """Look ``name`` up; the error lists every valid name."""
        if not isinstance(name, str):
            raise TypeError(f"expected a {self.kind} name (str) but got {type(name).__name__}")
        key = self._key(name)
        if key not in self._items:
            raise ValueError(
                f"unknown {self.kind} {name!r}; expected one of: {', '.join(sorted(self._items))}"
            )
        return self._items[key]

    def names(self) -> list[str]:
        """Sorted registered names (aliases included)."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._key(name) in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def build(registry: Registry[Any], spec: Any, base: type | None = None, **defaults: Any) -> Any:
    """Build an object from a registry spec.

    ``spec`` may be an instance (returned as is), a name (``"renyi"``) or a mapping
    ``{"name": "renyi", "alpha": 0.5}``; extra keys become constructor arguments.
    """
    if base is not None and isinstance(spec, base):
        return spec
    if isinstance(spec, str):
        return registry.get(spec)(**defaults)
    if isinstance(spec, dict):
        spec = dict(spec)
        if "name" not in spec:
            raise ValueError(
                f"a {registry.kind} given as a mapping needs a 'name' key, e.g. "
                f"{{name: {registry.names()[0] if len(registry) else '...'}}}; got keys {sorted(spec)}"
            )
        name = spec.pop("name")
        return registry.get(name)(**{**defaults, **spec})
    raise TypeError(
        f"expected a {registry.kind} name, a mapping with 'name', or an instance, "
        f"but got {type(spec).__name__}"
    )


def _recording_init(init: Any) -> Any:
    """Wrap a student's ``__init__`` so that the outermost call records its arguments."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if "_init_args" not in self.__dict__:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            recorded: dict[str, Any] = {}
            for name, value in list(bound.arguments.items())[1:]:
                kind = signature.parameters[name].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    recorded.update(value)
                elif kind is not inspect.Parameter.VAR_POSITIONAL:
                    recorded[name] = value
            self.__dict__["_init_args"] = recorded
        init(self, *args, **kwargs)

    __init__._records_init_args = True  # type: ignore[attr-defined]
    return __init__


class RecordsInitArgs:
    """Mixin: a class whose instances remember the arguments they were built with.

    The outermost ``__init__`` of every subclass records its bound arguments (defaults filled
    in) in :attr:`init_args`, so that a run's config (W&B, results files) and its checkpoint
    (:mod:`tnkd.training.checkpoints`) can name and rebuild the object, whichever entry point
    built it. Students and data modules record theirs.

    Example:
        >>> class Box(RecordsInitArgs):
        ...     def __init__(self, size: int, colour: str = "red") -> None: ...
        >>> Box(3).init_args
        {'size': 3, 'colour': 'red'}
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "_records_init_args", False):
            cls.__init__ = _recording_init(init)  # type: ignore[method-assign]

    @property
    def init_args(self) -> dict[str, Any]:
        """The constructor arguments of the object's own class (defaults filled in)."""
        return dict(self.__dict__.get("_init_args", {}))


def class_path(obj: object) -> str:
    """``module.QualName`` of an object's class: what a YAML ``class_path`` names."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def import_path(path: str, what: str = "class") -> Any:
    """The object a ``module.Name`` path names (what :func:`class_path` wrote); one-line errors."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"cannot import {what} {path!r}: {err}") from err
