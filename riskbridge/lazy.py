"""Lazy public names for a package's ``__init__`` (PEP 562): a name is imported from its module on first use.

The connectors, harmonize and model packages name their public API in ``__all__`` without importing it, so that
importing one module never pulls in another's heavy libraries (pynetdicom, spaCy, torch). Each ``__init__`` lists
which submodule defines each name and installs the two module hooks :func:`lazy_exports` returns::

    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, submodules=_SUBMODULES)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, str], submodules: Iterable[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``: ``exports`` maps a public name to the submodule defining
    it (the name is imported from there on first use and kept in the package's namespace); names in ``submodules``
    resolve to the submodule itself."""
    modules = frozenset(submodules)

    def __getattr__(name: str) -> Any:
        if name in modules:
            return importlib.import_module(f"{package}.{name}")
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports, *modules})

    return __getattr__, __dir__
