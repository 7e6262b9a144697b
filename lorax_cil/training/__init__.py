"""Training: run configuration, runs, the LoRAX strategy, the strategy registry and baselines.

    from lorax_cil.training import LoRAX, Run, register_strategy

Importing this package is cheap; the names below are loaded (with torch and avalanche where
needed) on first use.
"""

from __future__ import annotations

from lorax_cil.lazy import lazy_exports

_EXPORTS = {
    "LoRAX": "strategy",
    "Run": "runner",
    "resume_run": "runner",
    "RunConfig": "config",
    "merge_config": "config",
    "load_config": "config",
    "register_strategy": "registry",
    "get_strategy": "registry",
    "list_strategies": "registry",
    "latest_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "write_model_card": "model_card",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
