"""LoRAX beside class-incremental baselines, one protocol, one table (tiny synthetic run).

Synthesizes a small copy of the synthetic CDDB-hard scenario (5 generator tasks, 32 px), then
compares strategies from the registry with ``run_comparison``: every run shares the data, class
order, backbone, memory budget, transforms and seeds, and goes through the same ``Run`` loop.
The table (CSV + Markdown) and the figures land in ``--out``. About a minute on 2 CPU cores:

    python examples/compare_baselines.py
    python examples/compare_baselines.py --strategies lorax,finetune,replay,joint --seeds 0,1
    python examples/compare_baselines.py --backbone efficientnet-lite0   # pretrained, offline

The same comparison from the command line:

    lorax-cil compare --scenario synth-hard --data-path data/example-synth-hard-32px \\
        --backbone vit-test --no-pretrained --crop 32 --epochs 1 --memory-size 50 \\
        --strategies joint,finetune,replay,lorax,simplecil --seeds 0 --out runs/compare-example

The tiny size (12 training images per class, 1 epoch, a random 4-block ViT) only shows the
mechanics; docs/baselines.md says how to run the paper-scale comparison.
"""

from __future__ import annotations

import argparse

from lorax_cil.benchmarks.synth import synthesize
from lorax_cil.training.compare import run_comparison
from lorax_cil.training.config import RunConfig, merge_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/example-synth-hard-32px")
    p.add_argument("--out", default="runs/compare-example")
    p.add_argument("--backbone", default="vit-test", help="vit-test or efficientnet-lite0")
    p.add_argument("--strategies", default="joint,finetune,replay,lorax,simplecil")
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args()

    # 1. Data: five generator tasks in the CDDB folder layout (cached after the first run).
    synthesize(args.data, scenario="synth-hard", per_class=12, val_per_class=6, size=32, seed=0)

    # 2. One protocol for every strategy; each strategy's preset adds only its own choices
    #    (e.g. no memory for finetune, one final matrix row for joint).
    cfg = merge_config(RunConfig(), {
        "data": {"scenario": "synth-hard", "data_path": args.data, "crop": 32},
        "model": {"backbone": args.backbone,
                  "pretrained": args.backbone == "efficientnet-lite0",
                  "lora_r": 4, "lora_alpha": 8.0, "lora_dropout": 0.0},
        # min_steps_per_task=0: train exactly --epochs (the default 200-step floor would
        # stretch this quick example's tiny tasks to about a hundred epochs each).
        "train": {"epochs": args.epochs, "batch_size": 16, "eval_batch_size": 64,
                  "lr_first": 1e-3, "lr": 1e-3, "warmup_epochs": 0, "memory_size": 50,
                  "min_steps_per_task": 0},
    }, source="example")

    # 3. Run (finished runs are reused on a second call) and write the table and figures.
    result = run_comparison(cfg, strategies=args.strategies.split(","),
                            seeds=[int(s) for s in args.seeds.split(",")], out=args.out,
                            timing_images=32, progress=lambda m: print(f"[compare] {m}"))
    print(f"\n{result.caption}\n\n{result.table_markdown}")
    print("files:", ", ".join(str(path) for path in result.paths.values()))


if __name__ == "__main__":
    main()
