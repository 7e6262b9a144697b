"""Attribute every image in a folder with a trained run or detector; write a CSV and a summary.

Trains nothing: point it at a run directory (``lorax-cil train``) or a detector folder
(``lorax-cil detect train``). ``--make-demo-run`` first trains a tiny ``vit-test`` run on a few
synthetic images (seconds on a CPU; this is what CI runs):

    python examples/predict_folder.py --model runs/lorax-synth --images my_images/
    python examples/predict_folder.py --make-demo-run --model runs/predict-demo
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import lorax_cil
from lorax_cil.inference import RowWriter, iter_input_paths


def make_demo_run(run_dir: Path, data_dir: Path) -> Path:
    """A 2-task LoRAX run with a random ``vit-test`` backbone on tiny synthetic data."""
    from lorax_cil.benchmarks.scenarios import resolve_scenario
    from lorax_cil.benchmarks.synth import synthesize
    from lorax_cil.training.config import RunConfig, merge_config
    from lorax_cil.training.runner import Run

    synthesize(data_dir, scenario="synth-hard", per_class=8, val_per_class=4, size=32, workers=1)
    scenario = resolve_scenario("synth-hard", data_path=data_dir).prefix(2)
    cfg = merge_config(RunConfig(), {
        "model": {"backbone": "vit-test", "pretrained": False, "lora_r": 4, "lora_alpha": 8},
        "data": {"scenario": "synth-hard", "data_path": str(data_dir)},
        "train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0, "memory_size": 8,
                  "device": "cpu"},
    }, source="predict_folder.py")
    run = Run(cfg, run_dir=run_dir)
    run.setup(scenario)
    run.train()
    return data_dir / scenario.task_names[0] / "val"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="run directory or detector folder")
    p.add_argument("--images", help="folder of images (searched recursively)")
    p.add_argument("--make-demo-run", action="store_true",
                   help="first train a tiny demo run at --model (default images: its val split)")
    p.add_argument("--data", default="data/predict-demo", help="where the demo data goes")
    p.add_argument("--out", default="predictions.csv", help="CSV output")
    p.add_argument("--top-k", type=int, default=3)
    args = p.parse_args()

    images = args.images
    if args.make_demo_run:
        default_images = make_demo_run(Path(args.model), Path(args.data))
        images = images or str(default_images)
    if not images:
        p.error("--images is required without --make-demo-run")

    # 1. Load: a run directory, a checkpoint folder or a detector folder (checksums verified).
    predictor = lorax_cil.load(args.model, device="auto")
    print(f"model {predictor.identity.model_id}: classes {predictor.classes}, threshold "
          f"{predictor.threshold} ({predictor.threshold_source})")

    # 2. Stream the folder: paths are listed first, images are read batch by batch.
    counts: Counter[str] = Counter()
    with open(args.out, "w", encoding="utf-8", newline="") as fh:
        writer = RowWriter(stream=fh, fmt="csv", columns=predictor.columns(args.top_k))
        for row in predictor.iter_predict(iter_input_paths([images]), top_k=args.top_k,
                                          batch_size=16, workers=2):
            writer.write(row)
            counts["error" if row["error"] else row["prediction"]] += 1
        writer.close()

    # 3. In-memory images work too (PIL images, tensors in [0, 1], arrays).
    from PIL import Image

    first = next(iter(iter_input_paths([images]))).path
    with Image.open(first) as img:
        row = predictor.predict(img.convert("RGB"))[0]
    print(f"{first}: {row['prediction']} ({predictor.score_name} "
          f"{row[predictor.score_name]:.3f}, top class {row['top1']})")
    total = sum(counts.values())
    print(f"predicted {total} image(s) -> {args.out}: {dict(sorted(counts.items()))}")


if __name__ == "__main__":
    main()
