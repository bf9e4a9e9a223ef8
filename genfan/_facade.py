"""How a facade publishes its names: one list, read by type checkers and by the loader alike.

Each public package (``genfan``, ``genfan.select``, ``genfan.resilience``, ...) lists its public
names once, as ``from ._module import Name as Name`` lines under ``if TYPE_CHECKING:``, and ends
with ``__getattr__, __dir__, __all__ = lazy(__name__, __file__)``. Type checkers read those lines
(``as`` marks a re-export); `lazy` reads the same lines from the facade's source, derives
``__all__``, and imports each private module on first use, so ``import genfan`` costs almost
nothing until a name is used. A loaded class or function gets the facade's name as its
``__module__`` (httpx and anyio do the same), so reprs, pickles and the docs show the one path
users import from.
"""

from __future__ import annotations

import ast
import importlib
import sys
import types
from collections.abc import Callable
from typing import Any

__all__ = ["lazy"]


def _exports(file: str) -> dict[str, tuple[str, str]]:
    """``{public name: (relative module, name there)}`` from the facade's TYPE_CHECKING block."""
    with open(file, encoding="utf-8") as f:
        tree = ast.parse(f.read(), file)
    out: dict[str, tuple[str, str]] = {}
    for node in tree.body:
        if not (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Name)
            and node.test.id == "TYPE_CHECKING"
        ):
            continue
        for stmt in node.body:
            if isinstance(stmt, ast.ImportFrom) and stmt.level > 0:
                module = "." * stmt.level + (stmt.module or "")
                for alias in stmt.names:
                    out[alias.asname or alias.name] = (module, alias.name)
    return out


def _adopt(value: Any, package: str) -> None:
    if isinstance(value, type | types.FunctionType) and str(
        getattr(value, "__module__", "")
    ).startswith(package + "._"):
        value.__module__ = package


def lazy(
    package: str, file: str
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for the facade ``package`` whose source is ``file``."""
    exports = _exports(file)
    names = sorted(exports)

    def __getattr__(name: str) -> Any:
        try:
            module_name, _ = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        module = importlib.import_module(module_name, package)
        namespace = sys.modules[package].__dict__
        # Publish every name this facade takes from that module at once.
        for public, (source, original) in exports.items():
            if source == module_name:
                value = getattr(module, original)
                _adopt(value, package)
                namespace[public] = value
        return namespace[name]

    def __dir__() -> list[str]:
        return list(names)

    return __getattr__, __dir__, names
