"""User plugin modules: strategies, backbones, scenarios and merge methods from your own code.

A plugin is an ordinary Python module that registers things when it is imported::

    # my_plugin.py
    from lorax_cil.training.registry import register_strategy
    from lorax_cil.benchmarks.scenarios import register_scenario

    register_scenario("my-order", ("gaugan", "biggan", "wild"))

    @register_strategy("my-method", description="...", model={"extractor": "finetune"})
    def build(cfg, net, device, evaluator, plugins): ...

It is loaded

* by ``--plugin MODULE`` on ``lorax-cil train``, ``compare``, ``eval``, ``predict`` and
  ``export-adapter`` (repeatable; ``MODULE`` is a dotted module name importable from the current
  folder or the environment, or the path of a ``.py`` file), or by the config key
  ``plugins: [...]``;
* automatically, when an installed package declares it in the entry-point group
  ``lorax_cil.plugins`` (``[project.entry-points."lorax_cil.plugins"] mine = "my_pkg.plugin"``).

A run records the plugins it was given in ``config.yaml`` (files by absolute path). ``--resume``,
``eval``, ``predict``, ``compare`` and ``merge`` load them again before they look anything up;
a plugin that cannot be loaded stops the command with a message naming it.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterable

__all__ = ["ENTRY_POINT_GROUP", "PluginError", "load_plugin", "load_plugins",
           "load_entry_point_plugins", "loaded_plugins"]

logger = logging.getLogger(__name__)

#: The entry-point group whose modules are imported automatically.
ENTRY_POINT_GROUP = "lorax_cil.plugins"

_LOADED: dict[str, ModuleType] = {}
_ENTRY_POINTS_LOADED = False


class PluginError(ValueError):
    """A plugin module cannot be found or fails on import."""


def _is_path(spec: str) -> bool:
    return spec.endswith(".py") or os.sep in spec or (os.altsep is not None and os.altsep in spec)


def canonical(spec: str) -> str:
    """The form a run records: the absolute path of a file, else the module name."""
    spec = str(spec).strip()
    return str(Path(spec).expanduser().resolve()) if _is_path(spec) else spec


def load_plugin(spec: str, *, needed_by: str | None = None) -> ModuleType:
    """Import one plugin (a module name or a ``.py`` path) once; returns the module.

    Raises:
        PluginError: the module or file is missing, or importing it raised; the message names
            the plugin (and ``needed_by``, e.g. the run that recorded it).
    """
    key = canonical(spec)
    if key in _LOADED:
        return _LOADED[key]
    why = f" (recorded by {needed_by})" if needed_by else ""
    try:
        if _is_path(key):
            path = Path(key)
            moved = [k for k in _LOADED if _is_path(k) and Path(k).name == path.name]
            if not path.is_file() and moved:  # the same file given again from its new place
                _LOADED[key] = _LOADED[moved[0]]
                return _LOADED[key]
            if not path.is_file():
                raise PluginError(f"plugin file {key} does not exist{why}; pass --plugin with "
                                  "its current path")
            main = sys.modules.get("__main__")
            main_file = getattr(main, "__file__", None)
            if main_file and Path(main_file).resolve() == path:  # a script naming itself
                _LOADED[key] = main
                return main
            name = f"lorax_cil_plugin_{path.stem}_{abs(hash(key)) % 10**8}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
        else:
            cwd = os.getcwd()
            added = cwd not in sys.path
            if added:
                sys.path.insert(0, cwd)
            try:
                module = importlib.import_module(key)
            finally:
                if added and cwd in sys.path:
                    sys.path.remove(cwd)
    except PluginError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name and key.split(".")[0] == exc.name.split(".")[0]:
            raise PluginError(f"plugin module {key!r} not found{why}: install it, or pass "
                              "--plugin with a module name importable from the current folder "
                              "or the path of its .py file") from None
        raise PluginError(f"plugin {key!r} failed to import{why}: {exc}") from exc
    except Exception as exc:
        raise PluginError(f"plugin {key!r} failed to import{why}: "
                          f"{type(exc).__name__}: {exc}") from exc
    _LOADED[key] = module
    logger.debug("plugin %s loaded", key)
    return module


def load_plugins(specs: Iterable[str] | None, *, needed_by: str | None = None) -> list[str]:
    """Load the entry-point plugins and every plugin of ``specs``; returns their canonical forms
    (what a run records)."""
    load_entry_point_plugins()
    out = []
    for spec in specs or ():
        load_plugin(spec, needed_by=needed_by)
        if canonical(spec) not in out:
            out.append(canonical(spec))
    return out


def load_entry_point_plugins() -> list[str]:
    """Import the modules of the ``lorax_cil.plugins`` entry-point group (once per process)."""
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return []
    _ENTRY_POINTS_LOADED = True
    from importlib.metadata import entry_points

    names = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:
            raise PluginError(f"plugin {ep.name!r} (entry point {ep.value} of the installed "
                              f"group {ENTRY_POINT_GROUP}) failed to load: "
                              f"{type(exc).__name__}: {exc}") from exc
        names.append(ep.name)
    return names


def loaded_plugins() -> list[str]:
    """The plugins loaded so far in this process (canonical forms)."""
    return list(_LOADED)
