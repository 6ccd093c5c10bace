"""A user's Python factory named in a job file as "package.module:factory", imported and called where it is used.

`FactorySpec` is what travels to Ray workers and actors: the name and the keyword arguments, never the built object,
so each process imports the module and builds the object itself, once (`FactorySpec.build` caches it; the cache is
not pickled). Every failure, on the driver or on a worker, is a `FactoryError` with one line naming the job key and
the factory: the module does not import, it has no such attribute, or the factory raised.

Pure: importlib only; it imports nothing of the project.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

NAME = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


class FactoryError(RuntimeError):
    """A factory that cannot be imported or built; the message is one line naming the job key and the factory."""


def _first_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_name(name: str) -> str:
    """`name` when it reads "package.module:attribute", else a ValueError saying what is expected."""
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"{name!r} is not of the form 'package.module:factory'")
    return name


@dataclass
class FactorySpec:
    """`factory(**kwargs)` of the module:attribute `name`, for the job key `key` (e.g. problem.forward)."""

    name: str
    kwargs: dict = field(default_factory=dict)
    key: str = "factory"
    path: tuple[str, ...] = ()  # directories put on sys.path before the import (absolute: made so on the driver)
    _built: Any = field(default=None, repr=False, compare=False)
    _error: FactoryError | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {"name": self.name, "kwargs": self.kwargs, "key": self.key, "path": self.path}  # built anew there

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _built=None, _error=None)

    def resolve(self):
        """The factory itself (the module imported)."""
        module, _, attr = check_name(self.name).partition(":")
        for directory in reversed(self.path):
            if directory not in sys.path:
                sys.path.insert(0, directory)
        try:
            obj = importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - a user's module may raise anything while it imports
            raise FactoryError(f"{self.key}: cannot import {module!r} for {self.name!r} ({_first_line(e)}); is it "
                               "on PYTHONPATH here (on Ray: in the job's runtime_env working_dir or py_modules)?") \
                from None
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise FactoryError(f"{self.key}: module {module!r} has no {attr!r} (from {self.name!r})") from None
        if not callable(obj):
            raise FactoryError(f"{self.key}: {self.name!r} is not callable (a {type(obj).__name__})")
        return obj

    def accepts(self, parameter: str) -> bool:
        """Whether the factory takes a keyword `parameter` (by name, or through **kwargs)."""
        try:
            params = inspect.signature(self.resolve()).parameters.values()
        except (TypeError, ValueError):
            return False
        return any(p.name == parameter or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)

    def build(self, **extra):
        """factory(**kwargs, **extra), built once per process (later calls return the same object; a failure is
        remembered and raised again, not retried per member)."""
        if self._built is not None:
            return self._built
        if self._error is not None:
            raise self._error
        try:
            factory = self.resolve()
            try:
                self._built = factory(**self.kwargs, **extra)
            except Exception as e:  # noqa: BLE001 - the user's code: any exception is reported in one line
                raise FactoryError(f"{self.key}: the factory {self.name!r} raised {_first_line(e)}") from None
            if self._built is None:
                raise FactoryError(f"{self.key}: the factory {self.name!r} returned None")
        except FactoryError as e:
            self._error = e
            raise
        return self._built

    def fresh(self) -> FactorySpec:
        """The same factory, not built (to be built elsewhere, e.g. on another device)."""
        return FactorySpec(self.name, dict(self.kwargs), self.key, self.path)


def absolute(paths) -> tuple[str, ...]:
    """Directories as absolute paths (a Ray worker's working directory is not the driver's)."""
    return tuple(os.path.abspath(os.path.expanduser(p)) for p in paths)


@dataclass
class ObjectSpec(FactorySpec):
    """A Python object given to the library API (`enkg_dist.api.run(forward=G, denoiser=D)`) in place of a factory:
    `build` returns the object itself, nothing is imported. It travels to Ray workers and actors pickled with it
    (Ray uses cloudpickle), not by name; `name` is a label for messages (the object's module and qualified name)."""

    obj: Any = None

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "obj": self.obj}

    def resolve(self):
        return self.build

    def accepts(self, parameter: str) -> bool:
        return False  # already built: nothing is passed to it

    def build(self, **extra):
        return self.obj

    def fresh(self) -> ObjectSpec:
        return ObjectSpec(self.name, {}, self.key, (), obj=self.obj)


def label(obj) -> str:
    """A readable name of a Python object: module.qualname of a function or class, of its type for an instance."""
    target = obj if hasattr(obj, "__qualname__") else type(obj)
    name = f"{getattr(target, '__module__', None) or '?'}.{getattr(target, '__qualname__', type(obj).__name__)}"
    return name if target is obj else f"{name} instance"
