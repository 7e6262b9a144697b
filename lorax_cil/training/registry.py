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
from typing import Any, Callable, Mapping

from lorax_cil.models.families import BACKBONE_FAMILIES
from lorax_cil.training.config import ModelConfig, RunConfig

__all__ = ["StrategyPreset", "PresetConflictError", "ByBackbone", "register_strategy",
           "get_strategy", "list_strategies", "apply_preset", "backbone_default_notes",
           "kind_defaults", "preset_table"]


class ByBackbone:
    """A preset default that depends on the family of ``model.backbone`` (``vit`` or ``cnn``,
    as the backbone was registered: :func:`lorax_cil.models.backbones.backbone_family`).

    ``ByBackbone("ncm-frozen", vit="head")`` is ``head`` on a ViT and ``ncm-frozen`` on any
    other backbone (a CNN, or one registered without a family). With ``only_with`` (keys of
    the same section and values), the family's value applies only where those keys hold
    those values once resolved (``ByBackbone(0, vit=100, only_with={"readout": "head"})``: 100
    on a ViT that reads with its head, 0 otherwise); preset defaults resolve in their order.
    :func:`apply_preset` writes the resolved value into the configuration, so ``config.yaml``
    records what ran.
    """

    __slots__ = ("default", "families", "only_with")

    def __init__(self, default: Any, *, only_with: Mapping[str, Any] | None = None,
                 **families: Any) -> None:
        unknown = sorted(set(families) - set(BACKBONE_FAMILIES))
        if unknown:
            raise ValueError(f"ByBackbone: unknown backbone families {unknown}; known: "
                             f"{list(BACKBONE_FAMILIES)}")
        self.default = default
        self.families = dict(families)
        self.only_with = dict(only_with or {})

    def resolve(self, family: str, section: Any = None) -> Any:
        """The value for a backbone of ``family`` (``""``: unknown); ``section`` (the resolved
        model or train configuration) is checked against ``only_with``."""
        if any(getattr(section, k, None) != v for k, v in self.only_with.items()):
            return self.default
        return self.families.get(family, self.default)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ByBackbone) and self.default == other.default
                and self.families == other.families and self.only_with == other.only_with)

    def __hash__(self) -> int:
        return hash((repr(self.default), tuple(sorted(self.families.items())),
                     tuple(sorted(self.only_with.items()))))

    def __repr__(self) -> str:
        when = "".join(f" with {k}={v!r}" for k, v in self.only_with.items())
        by = "".join(f", {v!r} on {k} backbones{when}" for k, v in self.families.items())
        return f"{self.default!r}{by}"


@dataclass(frozen=True)
class StrategyPreset:
    """A named strategy.

    Attributes:
        name: registry name.
        description: one line for ``--help`` and tables.
        model: ModelConfig fields this strategy forces.
        train: TrainConfig fields this strategy forces.
        defaults: ModelConfig or TrainConfig fields set only when the user left them at
            ``None``.
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
        raise ValueError(f"unknown strategy {name!r}; valid strategies: "
                         f"{', '.join(sorted(_REGISTRY))} (a strategy registered in your own "
                         "module needs --plugin MODULE or the config key plugins:)")
    return _REGISTRY[name]


class PresetConflictError(ValueError):
    """An explicitly set configuration key contradicts a value the strategy's preset fixes."""


def preset_table() -> list[tuple[str, str, str, Any, bool]]:
    """Every preset entry as ``(strategy, section, key, value, fixed)``: ``fixed`` entries
    (``model`` / ``train``) define the strategy; the others are ``defaults``."""
    _ensure_builtin()
    rows = []
    for name, p in _REGISTRY.items():
        rows += [(name, "model", k, v, True) for k, v in p.model.items()]
        rows += [(name, "train", k, v, True) for k, v in p.train.items()]
        rows += [(name, _default_section(k), k, v, False) for k, v in p.defaults.items()]
    return rows


def apply_preset(cfg: RunConfig, explicit: Mapping[str, str] | None = None) -> RunConfig:
    """``cfg`` with its strategy preset applied (a new object).

    Precedence: explicitly set keys > strategy preset > dataclass defaults. ``explicit`` maps the
    ``section.key`` names the user set (command line or config file) to how they were set (e.g.
    ``"--memory-size 40"``); ``None`` (the Python API, and runs rebuilt from a saved
    configuration) treats no key as explicit, so the preset's values apply.

    * A ``defaults`` key (e.g. ``adapt_blocks`` of ``lorax-deep``) keeps an explicit value, ``None``
      included; otherwise it is set only when it is ``None``. A :class:`ByBackbone` default is
      resolved for the family of ``model.backbone``.
    * A fixed ``model`` / ``train`` key defines the strategy (``finetune`` has no memory by
      definition). An explicit value equal to the preset's is fine; a different one raises
      :class:`PresetConflictError` naming the setting, the strategy and the registered
      strategies that accept the value.
    """
    explicit = dict(explicit or {})
    name = cfg.train.strategy
    preset = get_strategy(name)
    for section, forced in (("model", preset.model), ("train", preset.train)):
        for key, value in forced.items():
            where = f"{section}.{key}"
            have = getattr(getattr(cfg, section), key)
            if where in explicit and have != value:
                wanted = {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1])
                          for k in explicit if k.split(".")[0] in ("model", "train")}
                raise PresetConflictError(_conflict_message(name, where, value, explicit[where],
                                                            wanted))
    model = dataclasses.replace(cfg.model, **preset.model)
    train = dataclasses.replace(cfg.train, **preset.train)
    for key, value in preset.defaults.items():
        section = _default_section(key)
        obj = model if section == "model" else train
        if f"{section}.{key}" not in explicit and getattr(obj, key) is None:
            if isinstance(value, ByBackbone):
                value = value.resolve(_family(model.backbone), obj)
            setattr(obj, key, value)
    return dataclasses.replace(cfg, model=kind_defaults(model), train=train)


def backbone_default_notes(cfg: RunConfig, explicit: Mapping[str, str] | None = None, *,
                           resolved: RunConfig | None = None) -> list[str]:
    """One line per :class:`ByBackbone` default that :func:`apply_preset` resolves for ``cfg``
    (a key left unset), naming the value, the backbone's family and how to override it: a
    default that depends on the backbone is said, not applied silently. ``resolved``: the
    result of ``apply_preset(cfg, explicit)`` when the caller has it."""
    explicit = dict(explicit or {})
    preset = get_strategy(cfg.train.strategy)
    resolved = resolved or apply_preset(cfg, explicit)
    notes = []
    for key, value in preset.defaults.items():
        section = _default_section(key)
        if not isinstance(value, ByBackbone) or f"{section}.{key}" in explicit or \
                getattr(getattr(cfg, section), key) is not None:
            continue
        family = _family(cfg.model.backbone)
        got = getattr(getattr(resolved, section), key)
        notes.append(f"{section}.{key}={got!r}: {cfg.train.strategy}'s default "
                     f"on {'a ' + family if family else 'this'} backbone "
                     f"({cfg.model.backbone}; {value!r}); --set {section}.{key}=... overrides it")
    return notes


def kind_defaults(model: ModelConfig) -> ModelConfig:
    """``model`` with ``lora_alpha`` / ``lora_dropout`` left at ``None`` set to the defaults of
    its extractor kind (``Extractor.config_defaults``: LoRA's 16 / 0.1, a side network's width /
    0). Set values are kept; an unknown kind is left for the network build to name."""
    if model.lora_alpha is not None and model.lora_dropout is not None:
        return model
    # the extractor registry imports torch; this module stays importable without it
    from lorax_cil.models.extractors import get_extractor, list_extractors

    if model.extractor not in list_extractors():
        return model
    values = get_extractor(model.extractor).config_defaults(model.lora_r)
    return dataclasses.replace(model, **{k: v for k, v in values.items()
                                         if getattr(model, k) is None})


def _family(backbone: str) -> str:
    """The registered family of ``backbone`` (``""`` if unknown); the backbone registry imports
    torch, so it is imported only when a default depends on it."""
    from lorax_cil.models.backbones import backbone_family

    return backbone_family(backbone)


def _default_section(key: str) -> str:
    """``model`` or ``train``: the section of a preset ``defaults`` key."""
    return "model" if key in {f.name for f in dataclasses.fields(ModelConfig)} else "train"


def _forced(p: StrategyPreset) -> dict[str, Any]:
    return {**{f"model.{k}": v for k, v in p.model.items()},
            **{f"train.{k}": v for k, v in p.train.items()}}


def _conflict_message(name: str, where: str, value: Any, how: str,
                      wanted: Mapping[str, Any]) -> str:
    """The error for ``how`` (setting ``where``) against ``name``'s fixed ``value``, naming the
    strategies that accept every explicit setting in ``wanted``, closest to ``name`` first."""
    preset = get_strategy(name)
    mine = _forced(preset)
    ranked = []
    for order, (other, p) in enumerate(_REGISTRY.items()):
        forced = _forced(p)
        if other == name or any(forced.get(k, v) != v for k, v in wanted.items()):
            continue
        same = sum(1 for k, v in mine.items() if k != where and k in forced and forced[k] == v)
        ranked.append((-same, order, other))
    alternatives = [n for _, _, n in sorted(ranked)[:3]]
    instead = (f"use --strategy {' or '.join(alternatives)} instead"
               if alternatives else "no registered strategy accepts it")
    return (f"{how} conflicts with strategy {name!r} ({preset.description}), which fixes "
            f"{where}={value!r}; {instead}, or drop the setting")


def _ensure_builtin() -> None:
    """Import the built-in strategy modules once (they register on import).

    A flag, not ``if not _REGISTRY``: a user strategy registered first must not hide the
    built-in ones.
    """
    global _builtins_loaded
    if _builtins_loaded:
        return
    import importlib

    from lorax_cil.plugins import load_entry_point_plugins

    _builtins_loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    load_entry_point_plugins()
