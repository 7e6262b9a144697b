"""open_clip visual towers (CLIP ViT-B/32, ViT-B/16, ViT-L/14, ...) as block backbones.

Decomposition of ``open_clip.transformer.VisionTransformer`` (``model`` is the visual tower):

- ``stem``: ``conv1`` -> flatten to tokens -> prepend ``class_embedding`` -> add
  ``positional_embedding`` -> ``patch_dropout`` -> ``ln_pre``. Hidden states are always batch-first
  ``(B, 1 + N, D)`` between blocks.
- ``blocks``: ``transformer.resblocks.{i}``. When the tower's transformer is sequence-first
  (``batch_first=False``, older open_clip), ``run_block`` transposes around the block.
- ``neck``: ``ln_post`` + pooling (class token by default) as the tower's own ``_pool`` does, then
  the ``proj`` matrix. ``feature_dim`` is the CLIP embedding size (512 for B/32 and B/16, 768 for
  L/14).

open_clip is imported inside functions only.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from .base import BackboneSpec, BlockBackbone, _check_names
from .weights import check_weights_path, file_sha256, load_state_dict_file, load_weights_into

__all__ = [
    "OpenCLIPViTBackbone",
    "create_open_clip_vit",
    "load_clip_visual_weights",
    "wrap_open_clip_visual",
]

logger = logging.getLogger(__name__)

_MLP = r"mlp\.(c_fc|c_proj)"
_ATTN = r"attn\.out_proj"


class OpenCLIPViTBackbone(BlockBackbone):
    """An open_clip ``VisionTransformer`` visual tower as a block backbone."""

    @classmethod
    def lora_target_presets(cls) -> dict[str, str]:
        """Preset name -> regex (``re.search``) over module names relative to ``self.model``.

        ``attn`` targets only ``attn.out_proj``: open_clip uses ``nn.MultiheadAttention``, whose
        q/k/v projection ``in_proj_weight`` is a parameter, not a module, so module-replacing LoRA
        cannot target it. Beware that ``nn.MultiheadAttention.forward`` reads
        ``out_proj.weight`` / ``out_proj.bias`` directly and never calls ``out_proj(x)``: a LoRA on
        ``out_proj`` must act on the weight (parametrisation or merge), not wrap the forward.
        ``mlp`` (``mlp.c_fc`` / ``mlp.c_proj``) is MoLE's choice.
        """
        return {
            "mlp": rf"transformer\.resblocks\.\d+\.{_MLP}$",
            "attn": rf"transformer\.resblocks\.\d+\.{_ATTN}$",
            "attn+mlp": rf"transformer\.resblocks\.\d+\.({_ATTN}|{_MLP})$",
        }

    @property
    def batch_first(self) -> bool:
        return bool(getattr(self.model.transformer, "batch_first", True))

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        v = self.model
        x = v.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        x = x + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)
        return v.ln_pre(x)

    def run_block(self, index: int, h: torch.Tensor) -> torch.Tensor:
        block = self.block(index)
        if self.batch_first:
            return block(h)
        return block(h.transpose(0, 1)).transpose(0, 1)

    def neck(self, h: torch.Tensor) -> torch.Tensor:
        v = self.model
        if hasattr(v, "_pool"):
            pooled, _ = v._pool(h)
        else:  # older open_clip: ln_post then _global_pool
            pooled, _ = v._global_pool(v.ln_post(h))
        if v.proj is not None:
            pooled = pooled @ v.proj
        return pooled


def _spec_from_visual(
    visual: nn.Module, *, name: str, weights: str, blocks: tuple[str, ...]
) -> BackboneSpec:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg: dict[str, Any] = dict(getattr(visual, "preprocess_cfg", None) or {})
    size = visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    proj = visual.proj
    dim = int(proj.shape[1]) if proj is not None else int(visual.transformer.width)
    return BackboneSpec(
        name=name,
        family="open_clip",
        feature_dim=dim,
        input_size=int(size[0]),
        mean=tuple(float(v) for v in cfg.get("mean", OPENAI_DATASET_MEAN)),
        std=tuple(float(v) for v in cfg.get("std", OPENAI_DATASET_STD)),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        crop_pct=1.0,  # CLIP resizes the short side to the input size, then centre-crops
        weights=weights,
        block_names=blocks,
    )


def wrap_open_clip_visual(
    visual: nn.Module, *, name: str, weights: str = "random"
) -> OpenCLIPViTBackbone:
    """Wrap an open_clip ``VisionTransformer`` (e.g. ``clip_model.visual``)."""
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise ValueError(
            f"{name}: the visual tower is a {type(visual).__name__}; only open_clip "
            "VisionTransformer towers are supported"
        )
    blocks = tuple(f"transformer.resblocks.{i}" for i in range(len(visual.transformer.resblocks)))
    _check_names(blocks, visual)
    spec = _spec_from_visual(visual, name=name, weights=weights, blocks=blocks)
    return OpenCLIPViTBackbone(model=visual, spec=spec)


def load_clip_visual_weights(visual: nn.Module, path: str | os.PathLike) -> None:
    """Load a full CLIP state dict (``visual.`` keys) or a visual-only one into ``visual``.

    A positional embedding of another grid size is resampled with open_clip's own helper.
    """
    state = load_state_dict_file(path)
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    pos = state.get("positional_embedding")
    if pos is not None and pos.shape != visual.positional_embedding.shape:
        from open_clip.model import resize_pos_embed

        holder = nn.Module()
        holder.visual = visual
        wrapped = {"visual.positional_embedding": pos}
        resize_pos_embed(wrapped, holder)
        state["positional_embedding"] = wrapped["visual.positional_embedding"]
    load_weights_into(visual, state, source=str(path))


def _resolve_tag(model_name: str, pretrained: bool | str) -> str | None:
    import open_clip

    if pretrained is False or pretrained is None:
        return None
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained is True:
        if not tags:
            raise ValueError(f"open_clip has no pretrained weights for {model_name!r}")
        return "openai" if "openai" in tags else tags[0]
    return str(pretrained)


def create_open_clip_vit(
    model_name: str,
    *,
    name: str | None = None,
    pretrained: bool | str = False,
    weights: str | os.PathLike | None = None,
    img_size: int | None = None,
    quick_gelu: bool | None = None,
    **kwargs: Any,
) -> OpenCLIPViTBackbone:
    """Create an open_clip CLIP model and wrap its visual tower.

    Args:
        model_name: open_clip architecture name (``"ViT-B-32"``, ``"ViT-L-14"``, ...).
        name: registry name recorded in the spec (defaults to ``model_name``).
        pretrained: ``True`` for OpenAI's weights (tag ``"openai"``), or any open_clip tag.
        weights: local file: a full CLIP state dict (``visual.`` keys) or a visual-only one.
        img_size: input resolution override (``force_image_size``).
        quick_gelu: force QuickGELU; defaults to what the pretrained tag was trained with
            (OpenAI's weights need it). Set it for local OpenAI-derived weights.
        **kwargs: passed on to ``open_clip.create_model``.
    """
    import open_clip

    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
    path = check_weights_path(weights) if weights is not None else None
    tag = _resolve_tag(model_name, pretrained)
    if quick_gelu is None:
        tag_cfg = open_clip.get_pretrained_cfg(model_name, tag) if tag else {}
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    extra = dict(kwargs)
    if img_size is not None:
        extra["force_image_size"] = int(img_size)
    model = open_clip.create_model(model_name, pretrained=tag, force_quick_gelu=quick_gelu, **extra)
    visual = model.visual
    desc = f"open_clip:{model_name}:{tag}" if tag else "random"
    if path is not None:
        load_clip_visual_weights(visual, path)
        desc = f"{path} (sha256 {file_sha256(path)})"
    return wrap_open_clip_visual(visual, name=name or model_name, weights=desc)
