"""Lazy package faces: a package exports names from its submodules and imports a submodule
(and torch with it) only when one of its names is first used."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str],
                 namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` that resolve ``name`` from
    ``<package>.<exports[name]>`` on first access and cache it in the package ``namespace``.

    Usage in a package's ``__init__.py``::

        __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
    """
    exports = dict(exports)

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
