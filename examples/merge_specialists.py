"""Merge per-family specialist detectors into one detector, then add a new family.

Runs offline on CPU in well under a minute: it generates a tiny synthetic dataset (CDDB layout),
trains one small LoRA specialist per family from the same randomly initialised ViT, merges them
with R2M (``lorax-cil merge``), evaluates the merged detector per family, and re-merges with one
more specialist with ``--add``, reusing the cached Gram entries. The merged detector is an
ordinary detector folder: one backbone pass per image, loadable with ``lorax_cil.load``.

The numbers are near chance on a random backbone after 2 epochs; this script shows the workflow.
Results on a pretrained backbone: docs/results-merging.md.

    python examples/merge_specialists.py [--out OUT_DIR] [--families A B C] [--add D]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from lorax_cil.benchmarks.synth import synthesize
from lorax_cil.cli import main as cli
from lorax_cil.detection.protocol import evaluate_detector
from lorax_cil.inference.loading import load


def train(data: Path, family: str, out: Path) -> Path:
    """One specialist: ``lorax-cil detect train`` with a LoRA adapter (same backbone seed for all)."""
    assert cli(["-q", "detect", "train", "--source", f"{family}={data / family}", "--backbone", "vit-test",
                "--no-pretrained", "--img-size", "64", "--crop", "64", "--adapter", "lora",
                "--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--calib-fraction", "0.2",
                "--device", "cpu", "--out", str(out)]) == 0
    return out


def main(out: str | None, families: list[str], add: str) -> None:
    out_dir = Path(out or Path(tempfile.gettempdir()) / "lorax-cil-merge-example")
    data = synthesize(out_dir / "data", scenario="synth-hard", per_class=24, val_per_class=12,
                      size=64, seed=0, workers=1)
    specs = [train(data, f, out_dir / "specialists" / f) for f in families]
    merged = out_dir / "merged-r2m"
    assert cli(["-q", "merge", "--specialists", *map(str, specs), "--method", "r2m", "--alpha", "0.6",
                "--out", str(merged), "--overwrite"]) == 0
    res = evaluate_detector(load(merged, device="cpu").model, data, split="val", out=out_dir / "eval")
    for r in res["per_generator"]:
        tag = "seen" if r["generator"] in families else "held out"
        print(f"{r['generator']:<20} ({tag:<8}) AUC {r['auc']:.3f}  AP {r['ap']:.3f}")
    new = train(data, add, out_dir / "specialists" / add)
    assert cli(["-q", "merge", "--add", str(new), "--from", str(merged),
                "--out", str(out_dir / "merged-r2m+add"), "--overwrite"]) == 0
    predictor = load(out_dir / "merged-r2m+add", device="cpu")
    print(f"merged {len(families)} specialists, then added {add!r}: "
          f"{predictor.describe()['merged_from']} (threshold {predictor.threshold:.3f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="merge specialist detectors on tiny synthetic data")
    parser.add_argument("--out", default=None, help="output folder (default: a folder in the temp dir)")
    parser.add_argument("--families", nargs="+", default=["nn-upsample", "spectral-peaks"])
    parser.add_argument("--add", default="jpeg-blocks", help="the family added afterwards")
    a = parser.parse_args()
    main(a.out, a.families, a.add)
