"""`lorax-cil backbones`: the registered backbones, where their weights come from, their presets."""

from __future__ import annotations

import argparse

__all__ = ["register", "preset_report"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backbones", help="list backbones, their weight sources and LoRA presets")
    p.add_argument("name", nargs="?", default=None,
                   help="a backbone name: print its LoRA presets with module and parameter counts "
                        "(built with random weights; nothing is downloaded)")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank for the parameter counts "
                   "(default: 64, the LoRAX paper's)")
    p.add_argument("--img-size", type=int, default=None, help="input size to build the backbone at")
    p.set_defaults(func=cmd_backbones)


def preset_report(name: str, *, rank: int, img_size: int | None = None) -> list[dict]:
    """Per preset of backbone ``name``: regex, selected modules and LoRA parameters at ``rank``.

    A LoRA on a layer with ``n_in`` inputs and ``n_out`` outputs has ``rank * (n_in + n_out)``
    parameters (A: ``rank x n_in``, B: ``n_out x rank``; a convolution's A has ``n_in * k * k``
    inputs).
    """
    from torch import nn

    from lorax_cil.models.backbones import create_backbone, lora_target_presets, match_lora_targets

    backbone = create_backbone(name, pretrained=False, img_size=img_size)
    modules = dict(backbone.model.named_modules())
    rows = []
    for preset, regex in sorted(lora_target_presets(backbone).items()):
        try:
            names = match_lora_targets(backbone, preset)
        except ValueError:
            names = []
        params = 0
        for n in names:
            m = modules[n]
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1]
                params += rank * (m.in_channels // m.groups * k + m.out_channels)
            else:
                params += rank * (m.in_features + m.out_features)
        per_block = {}
        for n in names:
            for i, b in enumerate(backbone.spec.block_names):
                if n.startswith(b + "."):
                    per_block[i] = per_block.get(i, 0) + 1
        rows.append({"preset": preset, "regex": regex, "modules": len(names), "params": params,
                     "blocks": len(per_block), "num_blocks": backbone.num_blocks})
    return rows


def cmd_backbones(args: argparse.Namespace) -> int:
    from lorax_cil.models.backbones import backbone_weight_source, list_backbones

    if args.name is None:
        names = list_backbones()
        width = max(len(n) for n in names)
        print(f"{'name':<{width}}  pretrained weights (pretrained=True unless stated)")
        for n in names:
            print(f"{n:<{width}}  {backbone_weight_source(n) or '-'}")
        print("\nAny backbone also takes a local file: --weights FILE (safetensors, or a .pth "
              "that torch.load(weights_only=True) accepts).")
        return 0
    if args.rank < 1:
        raise ValueError(f"--rank must be a positive integer, got {args.rank}")
    rows = preset_report(args.name, rank=args.rank, img_size=args.img_size)
    print(f"{args.name}: weights {backbone_weight_source(args.name) or '-'}")
    if not rows:
        print("no LoRA presets (give --set model.lora_targets=REGEX)")
        return 0
    print(f"{'preset':<16} {'modules':>7} {'blocks':>7} {'params at r=' + str(args.rank):>18}  regex")
    for r in rows:
        blocks = f"{r['blocks']}/{r['num_blocks']}"
        print(f"{r['preset']:<16} {r['modules']:>7} {blocks:>7} {r['params']:>18,}  {r['regex']}")
    print("Counts cover every block; with adapt_blocks=k only the last k blocks' share is trained.")
    return 0
