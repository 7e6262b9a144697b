"""Strategy registry: names usable from the CLI and from Python.

A registered strategy is a *preset* (values it forces on the model and training configuration)
plus a builder that turns the run's network into an Avalanche strategy. LoRAX and the
fine-tuning baselines share one strategy class and differ only in their presets. A strategy whose
model is not the expandable network names a ``network`` factory; what the run needs from that
network and from the strategy is written down in :mod:`lorax_cil.training.run_protocol`.

Built-in strategies live in :mod:`~lorax_cil.training.builtin_strategies` (LoRAX family) and
:mod:`~lorax_cil.training.baselines` (the baseline zoo); both register on first use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from lorax_cil.training.config import RunConfig

__all__ = ["StrategyPreset", "register_strategy", "get_strategy", "list_strategies", "apply_preset"]


@dataclass(frozen=True)
class StrategyPreset:
    """A named strategy.

    Attributes:
        name: registry name.
        description: one line for ``--help`` and tables.
        model: ModelConfig fields this strategy forces.
        train: TrainConfig fields this strategy forces.
        defaults: ModelConfig fields set only when the user left them at ``None``.
        builder: ``builder(cfg, net, device, evaluator, plugins) -> strategy``.
        network: ``network(cfg, backbone) -> model`` when the strategy does not train the
            expandable network (``None``: :func:`~lorax_cil.training.runner.build_network`).
        resumable: a run can continue from its checkpoints (``False``: the strategy keeps state
            the checkpoint does not hold, and resuming raises a clear error).
    """

    name: str
    description: str
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    builder: Callable[..., Any] | None = None
    network: Callable[..., Any] | None = None
    resumable: bool = True


_REGISTRY: dict[str, StrategyPreset] = {}
_BUILTIN_MODULES = ("lorax_cil.training.builtin_strategies", "lorax_cil.training.baselines")
_builtins_loaded = False


def register_strategy(
    name: str,
    *,
    description: str,
    model: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
    network: Callable[..., Any] | None = None,
    resumable: bool = True,
):
    """Decorator registering ``builder(cfg, net, device, evaluator, plugins)`` under ``name``.

    ``network(cfg, backbone)`` (optional) builds the model the builder receives as ``net``.
    """

    def deco(builder: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"strategy {name!r} is already registered")
        _REGISTRY[name] = StrategyPreset(
            name, description, dict(model or {}), dict(train or {}), dict(defaults or {}), builder,
            network, bool(resumable),
        )
        return builder

    return deco


def list_strategies() -> list[str]:
    _ensure_builtin()
    return sorted(_REGISTRY)


def get_strategy(name: str) -> StrategyPreset:
    """The preset registered as ``name``; unknown names list the valid ones."""
    _ensure_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; valid strategies: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def apply_preset(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the forced values of its strategy applied (a new object)."""
    preset = get_strategy(cfg.train.strategy)
    model = dataclasses.replace(cfg.model, **preset.model)
    for key, value in preset.defaults.items():
        if getattr(model, key) is None:
            setattr(model, key, value)
    train = dataclasses.replace(cfg.train, **preset.train)
    return dataclasses.replace(cfg, model=model, train=train)


def _ensure_builtin() -> None:
    """Import the built-in strategy modules once (they register on import).

    A flag, not ``if not _REGISTRY``: a user strategy registered first must not hide the
    built-in ones.
    """
    global _builtins_loaded
    if _builtins_loaded:
        return
    import importlib

    _builtins_loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
