"""EfficientNet-Lite0 on small inputs: the centre-tap depthwise path against plain convolution.

At 32 px inputs the last MBConv blocks of EfficientNet-Lite0 see 1 x 1 feature maps, where CPU
convolution kernels are slow for depthwise convolutions. :class:`lorax_cil.models.effnet.
DepthwiseConv2d` computes a 1 x 1 map exactly by the kernel's centre tap. This script times, in
one run and on the same inputs, the LoRAX network's forward (frozen trunk once, then ``--tasks``
extractors on the last ``--adapt-blocks`` blocks, as in training from a cached trunk) and a
training step, with the centre-tap path and with every ``DepthwiseConv2d`` turned back into a
plain ``nn.Conv2d``, at each ``--sizes`` input; it prints the milliseconds, the ratio plain /
centre-tap, and the largest output difference between the two.

Example (the numbers in docs/performance.md)::

    OMP_NUM_THREADS=2 python benchmarks/depthwise_small_maps.py --sizes 32 64 --tasks 12
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--tasks", type=int, default=12)
    p.add_argument("--adapt-blocks", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if min(args.sizes) < 1 or args.tasks < 1 or args.batch < 1 or args.repeats < 1:
        p.error("--sizes, --tasks, --batch and --repeats must be positive")

    torch.manual_seed(0)
    backbone = create_backbone("efficientnet-lite0", pretrained=True)
    net = ExpandableNet(backbone=backbone, adapt_blocks=args.adapt_blocks,
                        lora=LoraSpec(r=16, alpha=16.0, targets="pointwise"))
    for _ in range(args.tasks):
        net.add_task(2)
    print(f"EfficientNet-Lite0, {args.tasks} LoRA extractors on the last {args.adapt_blocks} "
          f"blocks, batch {args.batch}, {torch.get_num_threads()} torch threads; ms per call")
    print("| input | trunk output | pass | plain conv ms | centre tap ms | plain / centre tap | max abs diff |")
    print("|---:|---|---|---:|---:|---:|---:|")
    saved: dict[str, nn.Module] = {}
    for size in args.sizes:
        x = torch.randn(args.batch, 3, size, size)
        h = net.trunk(x)

        def forward() -> torch.Tensor:
            net.eval()
            with torch.no_grad():
                return net.forward_all(h, from_trunk=True).logits

        def step() -> None:
            net.train()
            net.zero_grad()
            net.forward_all(h, from_trunk=True).logits.logsumexp(1).mean().backward()

        for name, fn in (("inference", forward), ("training step", step)):
            set_centre_tap(net.backbone.model, False, saved)
            plain_ms = timed(fn, args.repeats)
            ref = forward()
            set_centre_tap(net.backbone.model, True, saved)
            fast_ms = timed(fn, args.repeats)
            diff = (forward() - ref).abs().max().item()
            print(f"| {size} px | {'x'.join(map(str, h.shape[1:]))} | {name} | {plain_ms:.1f} | "
                  f"{fast_ms:.1f} | {plain_ms / fast_ms:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
