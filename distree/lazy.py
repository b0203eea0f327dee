"""Packages that re-export their modules' names without importing those modules up front.

A device serving a bundle imports the runtime, which reaches the compiler's manifest, which reaches the solver's
``Plan``: with eager package ``__init__`` files that chain pulled in the MILP solver, SciPy and ONNX too (3 s of
imports on the build VM, and packages a device does not otherwise need). Each package lists where its names live;
a name's module is imported on first use.
"""

from __future__ import annotations

import sys
import types
from importlib import import_module
from importlib.util import find_spec


class _LazyPackage(types.ModuleType):
    def __getattr__(self, name: str) -> object:
        where = self.__dict__["_exports"]
        if name not in where:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = self.__dict__[name] = getattr(import_module(f".{where[name]}", self.__name__), name)
        return value

    def __dir__(self) -> list[str]:
        return sorted(set(self.__dict__) | set(self.__dict__["_exports"]))

    def __setattr__(self, name: str, value: object) -> None:
        # Importing a submodule binds it to its package. Where an exported name is also a submodule's (the function
        # distree.exits.calibrate, from the module of that name), the name stays the export, as an eager
        # ``from .calibrate import calibrate`` in the package would have left it.
        if name in self.__dict__.get("_exports", ()) and isinstance(value, types.ModuleType) \
                and value.__name__ == f"{self.__name__}.{name}":
            return
        super().__setattr__(name, value)


def lazy_exports(package: str, where: dict[str, str]) -> list[str]:
    """Make ``package`` export each name N from the module ``where[N]``, relative to the package (``"plan"``: its
    submodule; ``"..runtime.executor"``: a sibling package's), imported when N is first used; returns
    ``__all__``."""
    module = sys.modules[package]
    module.__dict__["_exports"] = dict(where)
    module.__class__ = _LazyPackage
    return sorted(where)


def require_installed(*packages: str) -> None:
    """Raise ModuleNotFoundError for the first of ``packages`` that is not installed, without importing any: a
    command module that imports its heavy dependencies when it runs still fails to load where they are missing,
    so the command listing says what to install (importing the solver's numba to find out took 0.4 s a listing)."""
    for package in packages:
        if find_spec(package) is None:
            raise ModuleNotFoundError(f"No module named {package!r}", name=package)
