"""Accuracy trade-off of the class-attention extractor (``lorax-ca``) against full-depth LoRAX and
``lorax-deep`` k = 1/2/3 on a pretrained ViT (docs/performance.md, docs/lorax.md).

    python benchmarks/class_attention_accuracy.py                      # synth-long, DINOv2 ViT-S/14, 56 px
    python benchmarks/class_attention_accuracy.py --seeds 0 1 2 --methods lorax-ca-k4 lorax-deep-k3
    python benchmarks/class_attention_accuracy.py --render-only        # the table from the CSV
    python benchmarks/class_attention_accuracy.py --render-only --rescore ncm-frozen

Every (method, seed) is one run of the public training loop (``Run``) on the same generated
data and order; its final multi-real AA and BWT are appended to ``<out>/accuracy.csv`` as soon as
it finishes, and rows already there are skipped, so the script can be stopped and rerun. The
table (mean and std over seeds, and each method's gap to full depth) goes to ``<out>/accuracy.md``.

``--rescore ncm-frozen`` (or ``head``) reads every finished run of the table again with that
read-out (:func:`lorax_cil.training.evaluate.readout_matrices`: exact, no training) and writes
``<out>/accuracy-<readout>.md`` (and its CSV), so the same training is compared under both
read-outs.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorax_cil.training.config import READOUTS, RESCORE_READOUTS  # noqa: E402  (torch-free)

#: method name -> (strategy, adapt_blocks[, model overrides[, train overrides]]); ``None`` =
#: every block (for ``lorax``, which has no ``adapt_blocks`` default; ``lorax-ca`` would replace
#: ``None`` by its default of 4); ``lorax-side`` takes ``model.lora_r`` as its side width; ``lorax-distill``
#: trains ``model.lora_r`` LoRA teachers and keeps ``model.side_width`` students
METHODS: dict[str, tuple] = {
    "lorax": ("lorax", None),
    "lorax-deep-k1": ("lorax-deep", 1),
    "lorax-deep-k2": ("lorax-deep", 2),
    "lorax-deep-k3": ("lorax-deep", 3),
    "lorax-ca-k4": ("lorax-ca", 4),
    "lorax-ca-k12": ("lorax-ca", 12),  # every block of a 12-block ViT (None would take the preset's 4)
    "lorax-side-w32": ("lorax-side", None, {"lora_r": 32, "lora_alpha": 32.0}),
    "lorax-side-w64": ("lorax-side", None, {"lora_r": 64, "lora_alpha": 64.0}),
    "lorax-side-w128": ("lorax-side", None, {"lora_r": 128, "lora_alpha": 128.0}),
    # full-depth LoRA (the ``lorax`` row's adapters) distilled into width-64 side networks,
    # 30 epochs of distillation (the default) or 10
    "lorax-distill": ("lorax-distill", None, {"side_width": 64}),
    "lorax-distill-e10": ("lorax-distill", None, {"side_width": 64}, {"distill_epochs": 10}),
}
FIELDS = ("scenario", "backbone", "size", "per_class", "epochs", "method", "strategy", "k", "seed",
          "aa", "bwt", "train_seconds")


def run_one(args: argparse.Namespace, data: Path, method: str, seed: int) -> dict:
    from lorax_cil.benchmarks.scenarios import resolve_scenario
    from lorax_cil.training.config import RunConfig, merge_config
    from lorax_cil.training.runner import Run

    strategy, k, *extra = METHODS[method]
    extra_train = extra[1] if len(extra) > 1 else {}
    model = {"backbone": args.backbone, "pretrained": True, "img_size": args.size,
             "lora_r": args.rank, "lora_alpha": float(args.rank), "lora_dropout": 0.0,
             "adapt_blocks": k, **(extra[0] if extra else {})}
    cfg = merge_config(RunConfig(), {
        "data": {"scenario": args.scenario, "data_path": str(data), "crop": args.size},
        "model": model,
        "train": {"strategy": strategy, "epochs": args.epochs, "batch_size": 32,
                  "eval_batch_size": 64, "lr_first": args.lr, "lr": args.lr, "warmup_epochs": 0,
                  "min_lr": args.lr / 100, "memory_size": args.memory, "seed": seed,
                  "device": "cpu", "checkpoint_every_task": False, "min_steps_per_task": 0,
                  # pinned: 0 is the official head (the lorax default on a ViT is 100 since)
                  "readout": args.readout, "head_balanced_steps": args.balanced_steps,
                  **extra_train},
    }, source="class-attention accuracy benchmark")
    out = Path(args.out) / "runs" / f"{method}-s{seed}"
    run = Run(cfg, run_dir=out, progress=lambda msg: print(f"[{method} seed {seed}] {msg}", flush=True))
    run.setup(resolve_scenario(args.scenario, data_path=data))
    s = run.train()
    return {"scenario": args.scenario, "backbone": args.backbone, "size": args.size,
            "per_class": args.per_class, "epochs": args.epochs, "method": method,
            "strategy": strategy, "k": "all" if k is None else k, "seed": seed,
            "aa": round(100 * s["multi_real_aa"], 3), "bwt": round(100 * s["multi_real_bwt"], 3),
            "train_seconds": round(s["train_seconds"], 1)}


def data_folder(out: Path, scenario: str, size: object, per_class: object) -> Path:
    """Where the runs' data is synthesized under ``out``."""
    return out / f"{scenario}-{size}px-{per_class}"


def append_row(path: Path, row: dict) -> None:
    """Append ``row`` to the CSV ``path`` (header written with the first row)."""
    fresh = not path.is_file()
    with open(path, "a", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(FIELDS))
        if fresh:
            w.writeheader()
        w.writerow(row)


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def table(rows: list[dict]) -> str:
    """Mean ± std over seeds per method, and the gap of the mean AA to full-depth ``lorax``."""
    lines = ["| method | k | seeds | final AA (%) | AA - full depth | BWT (%) | train s (mean) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    by = {m: [r for r in rows if r["method"] == m] for m in dict.fromkeys(r["method"] for r in rows)}
    full = statistics.mean(float(r["aa"]) for r in by["lorax"]) if "lorax" in by else None

    def ms(v: list[float]) -> str:
        return f"{statistics.mean(v):.1f}" + (f" ± {statistics.stdev(v):.1f}" if len(v) > 1 else "")

    for m in [m for m in METHODS if m in by] + [m for m in by if m not in METHODS]:
        sel = by[m]
        aa = [float(r["aa"]) for r in sel]
        gap = "-" if full is None or m == "lorax" else f"{statistics.mean(aa) - full:+.1f}"
        lines.append(f"| {m} | {sel[0]['k']} | {len(sel)} | {ms(aa)} | {gap} "
                     f"| {ms([float(r['bwt']) for r in sel])} "
                     f"| {statistics.mean(float(r['train_seconds']) for r in sel):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/class_attention_accuracy.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="synth-long", choices=["synth-long", "synth-easy", "synth-hard"])
    p.add_argument("--backbone", default="dinov2-vits14", help="a pretrained timm ViT (default dinov2-vits14)")
    p.add_argument("--size", type=int, default=56, help="image and input size in pixels")
    p.add_argument("--per-class", type=int, default=8, help="training images per class and task")
    p.add_argument("--epochs", type=int, default=3, help="epochs per task")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--memory", type=int, default=48, help="exemplar budget")
    p.add_argument("--readout", default="head", choices=READOUTS,
                   help="train.readout of every method (pinned, as --balanced-steps is: the "
                        "LoRAX family's defaults depend on the backbone, lorax-ca's do not)")
    p.add_argument("--balanced-steps", type=int, default=0,
                   help="train.head_balanced_steps of every method (default 0: the official "
                        "head; 100 with --readout head is the LoRAX default on a ViT)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "class_attention"))
    p.add_argument("--render-only", action="store_true", help="only rewrite accuracy.md from the CSV")
    p.add_argument("--rescore", choices=list(RESCORE_READOUTS), default=None,
                   help="also read every finished run with this read-out (from its last "
                        "checkpoint, no training) into accuracy-<readout>.md")
    args = p.parse_args(argv)
    import torch

    from lorax_cil.benchmarks.synth import synthesize

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "accuracy.csv"
    command = "python benchmarks/class_attention_accuracy.py " + " ".join(sys.argv[1:])
    setting = {"scenario": args.scenario, "backbone": args.backbone, "size": str(args.size),
               "per_class": str(args.per_class), "epochs": str(args.epochs)}
    if args.balanced_steps < 0:
        p.error("--balanced-steps must be >= 0")
    if not args.render_only:
        check_training_setting(out, args)
        data = data_folder(out, args.scenario, args.size, args.per_class)
        synthesize(data, scenario=args.scenario, per_class=args.per_class, size=args.size, seed=0)
        for seed in args.seeds:
            for method in args.methods:
                done = read_rows(csv_path)
                if any(r["method"] == method and int(r["seed"]) == seed
                       and all(r[k] == v for k, v in setting.items()) for r in done):
                    continue
                row = run_one(args, data, method, seed)
                append_row(csv_path, row)
                print(f"[done] {method} seed {seed}: AA {row['aa']:.1f} BWT {row['bwt']:.1f} "
                      f"({row['train_seconds']:.0f} s)", flush=True)
        (out / "accuracy.json").write_text(json.dumps({
            "command": command, "date": time.strftime("%Y-%m-%d"), "lr": args.lr, "rank": args.rank,
            "memory": args.memory, "threads": args.threads, "readout": args.readout,
            "balanced_steps": args.balanced_steps}, indent=2))
    rows = [r for r in read_rows(csv_path) if all(r[k] == v for k, v in setting.items())]
    if not rows:
        print(f"no results for {setting} in {csv_path}", file=sys.stderr)
        return 2
    md = table(rows)
    (out / "accuracy.md").write_text(md + "\n")
    print(md)
    if args.rescore:
        md = table(rescore(out, rows, args.rescore))
        (out / f"accuracy-{args.rescore}.md").write_text(md + "\n")
        print(f"\nread with {args.rescore}:\n{md}")
    return 0


def check_training_setting(out: Path, args: argparse.Namespace) -> None:
    """Stop when ``out`` holds runs trained with another read-out or balanced stage than the
    command gives (rows are reused by scenario, size, images and epochs, which would put them
    in the table under the wrong setting). A folder written before the script recorded them
    (no ``readout`` in its ``accuracy.json``) is not checked."""
    meta_path = out / "accuracy.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if "readout" not in meta:
        return
    before = {"readout": meta["readout"], "balanced_steps": meta.get("balanced_steps", 0)}
    now = {"readout": args.readout, "balanced_steps": args.balanced_steps}
    if before != now:
        raise SystemExit(f"{out} holds runs trained with --readout {before['readout']} "
                         f"--balanced-steps {before['balanced_steps']}; this command asks for "
                         f"--readout {now['readout']} --balanced-steps {now['balanced_steps']}: "
                         "give another --out")


def rescore(out: Path, rows: list[dict], readout: str) -> list[dict]:
    """``rows`` with AA and BWT read with ``readout`` from each run's last checkpoint (cached in
    ``<out>/accuracy-<readout>.csv``); a run folder whose recorded AA is not its row's (another
    setting's run) is refused."""
    from lorax_cil.training.evaluate import readout_matrices

    cache_path = out / f"accuracy-{readout}.csv"
    key = ("scenario", "backbone", "size", "per_class", "epochs", "method", "seed")
    cached = {tuple(r[k] for k in key): r for r in read_rows(cache_path)}
    new_rows = []
    for row in rows:
        if tuple(row[k] for k in key) in cached:
            new_rows.append(cached[tuple(row[k] for k in key)])
            continue
        run_dir = out / "runs" / f"{row['method']}-s{row['seed']}"
        summary = json.loads((run_dir / "summary.json").read_text())
        if abs(100 * summary["multi_real_aa"] - float(row["aa"])) > 1e-3:
            raise SystemExit(f"{run_dir}: its AA {100 * summary['multi_real_aa']:.3f} is not the "
                             f"CSV row's {row['aa']} (a run of another setting)")
        data = data_folder(out, row["scenario"], row["size"], row["per_class"])
        got = readout_matrices(run_dir, readout, data_path=data)["summary"]["multi_real"]
        new = {**row, "aa": round(100 * got["aa"], 3), "bwt": round(100 * got["bwt"], 3)}
        new_rows.append(new)
        append_row(cache_path, new)
        print(f"[{readout}] {row['method']} seed {row['seed']}: AA {new['aa']:.1f} "
              f"(as trained {float(row['aa']):.1f}) BWT {new['bwt']:.1f}", flush=True)
    return new_rows


if __name__ == "__main__":
    raise SystemExit(main())
