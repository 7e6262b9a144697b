"""timm Vision Transformers (ViT, DeiT incl. distilled, ConViT) as block backbones.

Decomposition (``model`` is the timm model, created with ``num_classes=0``):

- ``stem``: ``patch_embed`` -> position embedding with the prefix tokens (class token, DeiT's
  distillation token, register tokens) -> ``patch_drop`` -> ``norm_pre``. ConViT's stem has no
  class token: ConViT inserts it right before block ``local_up_to_layer`` (done in ``run_block``).
- ``blocks``: ``blocks.0`` ... ``blocks.{L-1}``.
- ``neck``: final ``norm`` then the model's own ``forward_head(pre_logits=True)`` (class-token,
  average or attention pooling; DeiT-distilled averages its class and distillation tokens).

timm is imported inside functions only.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from .base import BackboneSpec, BlockBackbone, _check_names
from .weights import check_weights_path, file_sha256, load_state_dict_file, load_weights_into

__all__ = ["TimmConViTBackbone", "TimmViTBackbone", "create_timm_vit", "wrap_timm_vit"]

logger = logging.getLogger(__name__)

_ATTN = r"attn\.(qkv|qk|v|proj)"
_MLP = r"mlp\.(fc1|fc2)"
# Keys of a classifier head that a local weights file may carry; the backbone has no head.
_HEAD_PREFIXES = ("head.", "head_dist.")


class TimmViTBackbone(BlockBackbone):
    """A timm ``VisionTransformer`` (ViT, DeiT, DeiT-distilled, ...) as a block backbone."""

    @classmethod
    def lora_target_presets(cls) -> dict[str, str]:
        """Preset name -> regex (``re.search``) over module names relative to ``self.model``.

        ``attn`` adapts the attention input and output projections of every block (``qkv``;
        ConViT GPSA blocks have ``qk`` and ``v`` instead) and never ``patch_embed.proj``.
        ConViT's ``attn.pos_proj`` (a Linear(3, heads) over relative positions) is left out: it
        is not a token projection, and a rank above 3 cannot add anything to it.
        """
        return {
            "attn": rf"blocks\.\d+\.{_ATTN}$",
            "mlp": rf"blocks\.\d+\.{_MLP}$",
            "attn+mlp": rf"blocks\.\d+\.({_ATTN}|{_MLP})$",
        }

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.patch_embed(x)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def neck(self, h: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.forward_head(m.norm(h), pre_logits=True)


class TimmConViTBackbone(TimmViTBackbone):
    """timm ``ConVit``: the class token joins the sequence before block ``local_up_to_layer``."""

    @classmethod
    def lora_target_presets(cls) -> dict[str, str]:
        """ViT presets plus ``lorax-paper``.

        ``lorax-paper`` reproduces the official LoRAX configuration: ``attn.qk`` and ``attn.v`` of
        the GPSA blocks only (blocks ``< local_up_to_layer``; only GPSA blocks have ``qk`` / ``v``
        modules, the later MHSA blocks have ``qkv``): 20 modules on ConViT-base.
        """
        presets = super().lora_target_presets()
        presets["lorax-paper"] = r"blocks\.\d+\.attn\.(qk|v)$"
        return presets

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.patch_embed(x)
        if m.use_pos_embed:
            x = x + m.pos_embed
        return m.pos_drop(x)

    def run_block(self, index: int, h: torch.Tensor) -> torch.Tensor:
        m = self.model
        if index == m.local_up_to_layer and m.cls_token is not None:
            h = torch.cat((m.cls_token.expand(h.shape[0], -1, -1), h), dim=1)
        return self.block(index)(h)


def _backbone_class(model: nn.Module) -> type[TimmViTBackbone]:
    """The wrapper class for a timm model, or a ValueError if the model is not supported."""
    from timm.models.convit import ConVit
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, ConVit):
        return TimmConViTBackbone
    if (
        isinstance(model, VisionTransformer)
        and type(model).forward_features is VisionTransformer.forward_features
    ):
        return TimmViTBackbone
    raise ValueError(
        f"timm model class {type(model).__name__} is not supported by the block backbone "
        "registry: supported are timm VisionTransformer (vit_*, deit_*, incl. distilled) and "
        "ConVit (convit_*)"
    )


def _spec_from_model(
    model: nn.Module, *, name: str, weights: str, block_names: tuple[str, ...]
) -> BackboneSpec:
    from timm.data import DEFAULT_CROP_PCT

    cfg: dict[str, Any] = dict(getattr(model, "pretrained_cfg", None) or {})
    img = model.patch_embed.img_size
    size = (img, img) if isinstance(img, int) else tuple(img)
    if size[0] != size[1]:
        logger.warning("%s: non-square input %s; spec.input_size uses the height", name, size)
    return BackboneSpec(
        name=name,
        family="timm",
        feature_dim=int(model.num_features),
        input_size=int(size[0]),
        mean=tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        crop_pct=float(cfg.get("crop_pct", DEFAULT_CROP_PCT)),
        weights=weights,
        block_names=block_names,
    )


def wrap_timm_vit(
    model: nn.Module,
    *,
    name: str,
    weights: str = "random",
    backbone_cls: type[TimmViTBackbone] | None = None,
) -> TimmViTBackbone:
    """Wrap an already built timm ViT-family model (its head is ignored).

    ``backbone_cls`` picks a subclass of the detected wrapper (e.g. one with extra LoRA presets).
    """
    cls = _backbone_class(model)
    if backbone_cls is not None:
        if not issubclass(backbone_cls, cls):
            raise TypeError(f"{backbone_cls.__name__} is not a {cls.__name__}")
        cls = backbone_cls
    block_names = tuple(f"blocks.{i}" for i in range(len(model.blocks)))
    _check_names(block_names, model)
    spec = _spec_from_model(model, name=name, weights=weights, block_names=block_names)
    return cls(model=model, spec=spec)


def _filter_checkpoint(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Drop head keys and adapt ViT checkpoints (pos-embed resampling) with timm's own filter."""
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
    if isinstance(model, VisionTransformer):
        try:
            state = checkpoint_filter_fn(state, model)
        except Exception as exc:  # noqa: BLE001 - fall back to the raw keys; the check explains
            logger.debug("timm checkpoint_filter_fn failed (%s); using raw keys", exc)
        state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
    return state


def _resolve_timm_name(model_name: str, pretrained: bool | str) -> tuple[str, bool]:
    import timm

    base, _, tag = model_name.partition(".")
    if isinstance(pretrained, str):
        if tag and tag != pretrained:
            raise ValueError(
                f"timm name {model_name!r} already carries the tag {tag!r}; "
                f"pretrained={pretrained!r}"
            )
        model_name, pretrained = f"{base}.{pretrained}", True
    if not timm.is_model(base):
        raise ValueError(
            f"unknown timm model {base!r}; see timm.list_models('vit_*'), "
            "timm.list_models('deit_*') and timm.list_models('convit_*')"
        )
    return model_name, bool(pretrained)


def create_timm_vit(
    model_name: str,
    *,
    name: str | None = None,
    pretrained: bool | str = False,
    weights: str | os.PathLike | None = None,
    img_size: int | None = None,
    **kwargs: Any,
) -> TimmViTBackbone:
    """Create a timm ViT-family backbone.

    Args:
        model_name: timm model name, optionally with a pretrained tag
            (``"vit_base_patch16_224.augreg_in21k"``).
        name: registry name recorded in the spec (defaults to ``model_name``).
        pretrained: ``True`` for timm's default weights, or a tag string (``name.tag`` form).
        weights: local weights file (safetensors or a weights-only ``.pth``); head keys are dropped.
        img_size: input resolution override (timm's ``img_size=``).
        **kwargs: passed on to ``timm.create_model`` (e.g. ``drop_path_rate``).
    """
    import timm

    model_name, use_pretrained = _resolve_timm_name(model_name, pretrained)
    path = check_weights_path(weights) if weights is not None else None
    extra = dict(kwargs)
    if img_size is not None:
        extra["img_size"] = int(img_size)
    model = timm.create_model(model_name, pretrained=use_pretrained, num_classes=0, **extra)
    _backbone_class(model)  # fail early on unsupported classes
    desc = "random"
    if use_pretrained:  # record the resolved tag, e.g. "timm:convit_tiny.fb_in1k"
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        arch, tag = cfg.get("architecture"), cfg.get("tag")
        desc = f"timm:{arch}.{tag}" if arch and tag else f"timm:{model_name}"
    if path is not None:
        state = _filter_checkpoint(load_state_dict_file(path), model)
        load_weights_into(model, state, source=str(path))
        desc = f"{path} (sha256 {file_sha256(path)})"
    return wrap_timm_vit(model, name=name or model_name, weights=desc)

