"""`lorax-cil export-adapter`: a task's LoRA extractor as a peft adapter folder.

The reverse direction, a peft adapter as the extractor of a new task, is
``lorax-cil train --resume RUN --add-task NAME=PATH --adapter DIR``.
"""

from __future__ import annotations

import argparse
import json

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    from lorax_cil.commands.train import add_plugin_flag

    p = sub.add_parser(
        "export-adapter", help="write a task's LoRA extractor as a peft adapter folder",
        description="Write the LoRA extractor of one task of a run as a peft adapter folder "
                    "(adapter_config.json + adapter_model.safetensors) that "
                    "peft.PeftModel.from_pretrained(<the run's backbone model>, DIR) loads. "
                    "MoLE, full-copy and fine-tuned extractors have no peft form and are "
                    "refused.")
    p.add_argument("run", metavar="RUN", help="run directory (or one checkpoint folder)")
    p.add_argument("--task", required=True, metavar="NAME",
                   help="task name (as in the run's scenario) or its index")
    p.add_argument("--out", required=True, metavar="DIR", help="adapter folder to write")
    add_plugin_flag(p)
    p.set_defaults(func=cmd_export_adapter)


def cmd_export_adapter(args: argparse.Namespace) -> int:
    from lorax_cil.commands.train import load_cli_plugins
    from lorax_cil.models.peft_adapter import export_peft_adapter, peft_unsupported_reason
    from lorax_cil.training.evaluate import load_trained

    load_cli_plugins(args)
    net, cfg, scenario, _ = load_trained(args.run)
    names = list(scenario.task_names[: net.num_tasks])
    if args.task in names:
        task = names.index(args.task)
    elif args.task.isdigit() and int(args.task) < len(names):
        task = int(args.task)
    else:
        raise ValueError(f"--task {args.task!r}: the run has trained tasks {names}")
    reason = peft_unsupported_reason(getattr(net, "extractor", "?"))
    if reason:
        raise ValueError(f"cannot export task {names[task]!r} of strategy "
                         f"{cfg.train.strategy!r} as a peft adapter: {reason}")
    m = cfg.model
    recipe = {"backbone": m.backbone, "pretrained": m.pretrained, "weights": m.weights,
              "img_size": m.img_size, "seed": cfg.train.seed}
    notes = ("## Backbone\n\nThe adapter belongs to the lorax-cil backbone "
             f"`{m.backbone}` ({json.dumps(recipe)}). Build the same model with\n\n"
             "```python\nfrom lorax_cil.training.config import RunConfig\n"
             "from lorax_cil.training.runner import build_backbone\n"
             f"cfg = RunConfig.from_dict({{'model': {{'backbone': {m.backbone!r}, "
             f"'pretrained': {m.pretrained!r}, 'weights': {m.weights!r}, "
             f"'img_size': {m.img_size!r}}}, 'train': {{'seed': {cfg.train.seed}}}}})\n"
             "base_model = build_backbone(cfg).model\n```\n\n"
             "Features as the toolkit computes them: `forward_head(forward_features(x), "
             "pre_logits=True)` for timm ViTs.\n")
    out = export_peft_adapter(net, task, args.out, base_model=m.backbone, notes=notes)
    print(f"task {names[task]!r} of {args.run}: peft LoRA adapter (r={net.lora_spec.r}, "
          f"{len(net.lora_targets)} modules) written to {out}")
    return 0
