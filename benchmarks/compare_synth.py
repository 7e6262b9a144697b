"""Every registered strategy on a synthetic scenario; writes the baseline results page.

Runs ``lorax-cil compare``'s library call on the embedded synthetic data (synthesized here,
cached) and writes ``docs/results-baselines.md`` with the exact command, the sizes, the
environment and the table, so every number in the docs comes from this script's output:

    OMP_NUM_THREADS=1 python benchmarks/compare_synth.py                 # defaults below
    python benchmarks/compare_synth.py --scenario synth-hard --seeds 0 --epochs 1 --doc ''

Defaults are sized for 2 CPU cores (smaller than the demo's data: 32 training images per class
at 48 px, 6 epochs per task); the page states the sizes used. Finished runs are reused, so an
interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Row order of the table: bounds first, then the baselines, then LoRAX.
TABLE_ORDER = ("joint", "finetune", "finetune-replay", "replay", "icarl", "lwf", "ewc", "l2p",
               "der-expandable", "memo", "simplecil", "lorax", "lorax-deep")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", default="synth-easy")
    p.add_argument("--per-class", type=int, default=32, help="train images per class")
    p.add_argument("--val-per-class", type=int, default=16)
    p.add_argument("--size", type=int, default=48, help="image size (px) and crop")
    p.add_argument("--backbone", default="efficientnet-lite0",
                   help="pretrained when its weights install offline (efficientnet-lite0, "
                        "dinov2-vits14), else random")
    p.add_argument("--img-size", type=int, default=None,
                   help="ViT input size (default: --size for ViTs; CNNs keep their own build size)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--memory-size", type=int, default=140)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--joint-epochs", type=int, default=None,
                   help="epochs of joint training on all tasks (default: 3 x --epochs)")
    p.add_argument("--strategies", default="all",
                   help="comma-separated names, or 'all' (every registered strategy that can "
                        "run on the backbone)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--data", default=None, help="data folder (default: data/<scenario>-...)")
    p.add_argument("--out", default=None, help="runs folder (default: runs/bench-<scenario>)")
    p.add_argument("--doc", default=str(ROOT / "docs" / "results-baselines.md"),
                   help="results page to write ('' to skip)")
    return p.parse_args(argv)


def joint_epochs(args: argparse.Namespace) -> int:
    return args.joint_epochs or 3 * args.epochs


def strategies_for(args: argparse.Namespace, cfg) -> list[str]:
    from lorax_cil.training.baselines import check_compatible
    from lorax_cil.training.config import merge_config
    from lorax_cil.training.registry import apply_preset, list_strategies
    from lorax_cil.training.runner import build_backbone

    if args.strategies != "all":
        return [s.strip() for s in args.strategies.split(",") if s.strip()]
    backbone, names = build_backbone(cfg), []
    ordered = [s for s in TABLE_ORDER if s in list_strategies()]
    for name in ordered + [s for s in list_strategies() if s not in ordered]:
        try:
            check_compatible(apply_preset(merge_config(cfg, {"train": {"strategy": name}},
                                                       source="bench")), backbone)
            names.append(name)
        except ValueError as exc:
            print(f"[bench] skipping {name}: {exc}", flush=True)
    return names


def main(argv=None) -> None:
    from lorax_cil.benchmarks.synth import synthesize
    from lorax_cil.models.offline import OFFLINE_PRETRAINED
    from lorax_cil.training.compare import run_comparison
    from lorax_cil.training.config import RunConfig, merge_config

    args = parse_args(argv)
    tag = f"{args.scenario}-{args.size}px-{args.per_class}-{args.val_per_class}"
    data = Path(args.data or ROOT / "data" / tag)
    synthesize(data, scenario=args.scenario, per_class=args.per_class,
               val_per_class=args.val_per_class, size=args.size, seed=0)
    cfg = merge_config(RunConfig(), {
        "data": {"scenario": args.scenario, "data_path": str(data), "crop": args.size},
        "model": {"backbone": args.backbone, "pretrained": args.backbone in OFFLINE_PRETRAINED,
                  "img_size": args.img_size or (None if args.backbone.startswith("efficientnet")
                                                else args.size),
                  "lora_r": 16, "lora_alpha": 16.0, "lora_dropout": 0.0},
        "train": {"epochs": args.epochs, "batch_size": 32, "eval_batch_size": 128,
                  "lr_first": args.lr, "lr": args.lr, "warmup_epochs": 0, "min_lr": 1e-5,
                  "memory_size": args.memory_size, "min_steps_per_task": 0,
                  "readout": "head", "head_balanced_steps": 0},  # the official LoRAX head
        "baselines": {"joint_epochs": joint_epochs(args)},
    }, source="benchmark")
    strategies = strategies_for(args, cfg)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out or ROOT / "runs" / f"bench-{tag}-{args.backbone}-{args.epochs}ep")
    t0 = time.perf_counter()
    result = run_comparison(cfg, strategies=strategies, seeds=seeds, out=out, timing_images=128,
                            progress=lambda m: print(f"[bench] {m}", flush=True))
    minutes = (time.perf_counter() - t0) / 60
    print(f"\n{result.caption}\n\n{result.table_markdown}\n[bench] {minutes:.1f} min; {out}")
    if args.doc:
        write_page(Path(args.doc), args, result, minutes, out)


def write_page(path: Path, args: argparse.Namespace, result, minutes: float, out: Path) -> None:
    import torch

    from lorax_cil.utils import atomic_write_text

    threads = os.environ.get("OMP_NUM_THREADS")
    command = " ".join([f"OMP_NUM_THREADS={threads}"] if threads else [])
    command += " python benchmarks/compare_synth.py "
    command += " ".join(shlex.quote(a) for a in sys.argv[1:])
    cpu = f"{platform.machine()} CPU ({os.cpu_count()} cores, shared with other work)"
    statuses = sorted(set(result.rows["status"]))
    train_min = float(result.rows["train_s"].sum()) / 60
    page = f"""# Baseline results on synthetic data

Produced by `benchmarks/compare_synth.py` (nothing on this page is typed by hand):

```bash
{command.strip()}
```

Sizes: {args.per_class} training and {args.val_per_class} validation images per class and task,
{args.size} px, {args.epochs} epoch(s) per task, learning rate {args.lr:g}, memory budget
{args.memory_size} exemplars. `joint` trains once on the union of all tasks for {joint_epochs(args)}
epochs (`--joint-epochs`, default three times the per-task epochs): as the upper bound of the
comparison it has to be trained to convergence, and with only the per-task epoch count on seven
times the data it stays below the best incremental strategies (check with `--strategies joint
--joint-epochs {args.epochs} --doc ''`). This is smaller than the demo's data (200 images per class
at 96 px) so that every strategy and seed fits a 2-core CPU; the numbers show the protocol at work,
not the methods' paper-scale accuracy. Environment: Python {platform.python_version()}, torch
{torch.__version__}, {cpu}, {torch.get_num_threads()} torch thread(s). Training time summed
over all {len(result.rows)} runs: {train_min:.1f} min; the last call took {minutes:.1f} min
(run statuses: {", ".join(statuses)}; `reused` runs were trained by an earlier call with the
same command).

{result.caption}; cells: mean ± std over seeds.

{result.table_markdown}
Column definitions: [baselines.md](baselines.md#the-table). The figures are written next to
the runs, in `runs/{out.name}/`: `average_accuracy.png` (seed-mean curves) and `matrices.png`
(seed-mean final matrices).
"""
    atomic_write_text(path, page)
    print(f"[bench] wrote {path}")


if __name__ == "__main__":
    main()
