"""EfficientNet-Lite0 on CPU: two layout choices of the LoRAX network, each timed in one run.

1. **Centre tap on 1 x 1 maps.** At 32 px inputs the last MBConv blocks of EfficientNet-Lite0 see
   1 x 1 feature maps, where CPU convolution kernels are slow for depthwise convolutions.
   :class:`lorax_cil.models.effnet.DepthwiseConv2d` computes a 1 x 1 map exactly by the
   kernel's centre tap. Timed from the cached trunk (as training with ``train.cache_trunk``
   runs), with the centre-tap path and with every ``DepthwiseConv2d`` turned back into a plain
   ``nn.Conv2d``.
2. **Channels-last** (``model.channels_last``): the backbone's convolution weights, and so its
   activations, in NHWC instead of NCHW. Timed from images (trunk included), one network of
   each layout built from the same seed.

Both at each ``--sizes`` input, ``--tasks`` extractors on the last ``--adapt-blocks`` blocks:
an inference pass and a training step, milliseconds per call, the ratio of the two, and the
largest difference between the two networks' logits.

Example (the numbers in docs/backbones.md)::

    OMP_NUM_THREADS=2 python benchmarks/cnn_layouts.py --sizes 32 64 224 --tasks 12
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from lorax_cil.models.backbones import create_backbone
from lorax_cil.models.effnet import DepthwiseConv2d
from lorax_cil.models.expandable import ExpandableNet
from lorax_cil.models.lora import LoraSpec


def plain_copy(conv: DepthwiseConv2d) -> nn.Conv2d:
    """The same convolution as a plain ``nn.Conv2d`` (shared parameters)."""
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, groups=conv.groups, bias=conv.bias is not None)
    plain.weight = conv.weight
    if conv.bias is not None:
        plain.bias = conv.bias
    return plain


def set_centre_tap(model: nn.Module, on: bool, saved: dict[str, nn.Module]) -> None:
    """Swap every ``DepthwiseConv2d`` of ``model`` for a plain copy (``on=False``) or back."""
    if not on:
        saved.update({n: m for n, m in model.named_modules() if isinstance(m, DepthwiseConv2d)})
    for name, module in saved.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, module if on else plain_copy(module))


def timed(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(2):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def build(tasks: int, adapt_blocks: int, *, channels_last: bool = False) -> ExpandableNet:
    """The LoRAX network on pretrained EfficientNet-Lite0 (seed 0), optionally channels-last."""
    torch.manual_seed(0)
    backbone = create_backbone("efficientnet-lite0", pretrained=True)
    if channels_last:
        backbone.to_channels_last()
    net = ExpandableNet(backbone=backbone, adapt_blocks=adapt_blocks,
                        lora=LoraSpec(r=16, alpha=16.0, targets="pointwise"))
    for _ in range(tasks):
        net.add_task(2)
    return net


def passes(net: ExpandableNet, x: torch.Tensor, *, from_trunk: bool
           ) -> tuple[Callable[[], torch.Tensor], Callable[[], None]]:
    """An inference pass (returns the logits) and a training step of ``net`` on ``x``."""

    def forward() -> torch.Tensor:
        net.eval()
        with torch.no_grad():
            return net.forward_all(x, from_trunk=from_trunk).logits

    def step() -> None:
        net.train()
        net.zero_grad()
        net.forward_all(x, from_trunk=from_trunk).logits.logsumexp(1).mean().backward()

    return forward, step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 224])
    p.add_argument("--tasks", type=int, default=12)
    p.add_argument("--adapt-blocks", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if min(args.sizes) < 1 or args.tasks < 1 or args.batch < 1 or args.repeats < 1:
        p.error("--sizes, --tasks, --batch and --repeats must be positive")

    print(f"EfficientNet-Lite0, {args.tasks} LoRA extractors on the last {args.adapt_blocks} "
          f"blocks, batch {args.batch}, {torch.get_num_threads()} torch threads; ms per call\n")
    net = build(args.tasks, args.adapt_blocks)
    print("Centre tap on 1 x 1 maps (from the cached trunk):\n")
    print("| input | trunk output | pass | plain conv ms | centre tap ms | plain / centre tap | max abs diff |")
    print("|---:|---|---|---:|---:|---:|---:|")
    saved: dict[str, nn.Module] = {}
    for size in args.sizes:
        h = net.trunk(torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(size)))
        forward, step = passes(net, h, from_trunk=True)
        for name, fn in (("inference", forward), ("training step", step)):
            set_centre_tap(net.backbone.model, False, saved)
            plain_ms = timed(fn, args.repeats)
            ref = forward()
            set_centre_tap(net.backbone.model, True, saved)
            fast_ms = timed(fn, args.repeats)
            diff = (forward() - ref).abs().max().item()
            print(f"| {size} px | {'x'.join(map(str, h.shape[1:]))} | {name} | {plain_ms:.1f} | "
                  f"{fast_ms:.1f} | {plain_ms / fast_ms:.2f} | {diff:.1e} |")

    nhwc = build(args.tasks, args.adapt_blocks, channels_last=True)
    print("\nChannels-last against NCHW (from images, trunk included):\n")
    print("| input | pass | NCHW ms | channels-last ms | NCHW / channels-last | max abs diff |")
    print("|---:|---|---:|---:|---:|---:|")
    for size in args.sizes:
        x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(size))
        plain, fast = passes(net, x, from_trunk=False), passes(nhwc, x, from_trunk=False)
        diff = (plain[0]() - fast[0]()).abs().max().item()
        for i, name in enumerate(("inference", "training step")):
            plain_ms, fast_ms = timed(plain[i], args.repeats), timed(fast[i], args.repeats)
            print(f"| {size} px | {name} | {plain_ms:.1f} | {fast_ms:.1f} | "
                  f"{plain_ms / fast_ms:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
