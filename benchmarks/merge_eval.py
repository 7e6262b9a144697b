"""Merging specialist detectors on the synthetic data: every method against joint training.

One specialist per *seen* family is trained with ``detect train`` (EfficientNet-Lite0 with its
offline ImageNet weights, full fine-tuning of the last blocks, by default); they are merged with
every method of ``lorax-cil merge`` (default options); every detector is evaluated on the val
split of every family: the seen families (in-distribution) and the held-out ones (never trained
on by any detector). References: joint training on the union of the seen families and each single
specialist. Then the composable step: one more family's specialist is added with ``--add``
(R2M reuses the Gram cache) and compared with joint training on the enlarged set; the R2M merge
with ``--add`` is checked against merging all specialists from scratch. Finally the one-pass cost:
the merged detector's time per image against running all N specialists, measured in the same run.

Writes a Markdown page (default ``docs/results-merging.md``) naming the command, machine, thread
count and seeds, and a CSV of every row. Default size: a few minutes on 2 CPU cores::

    python benchmarks/merge_eval.py
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from lorax_cil.bench.provenance import cpu_name, git_commit

METHODS = ("average", "task_arithmetic", "ties", "dare", "r2m")
SEEN = ("nn-upsample", "spectral-peaks", "jpeg-blocks", "blend-seam")
ADD = "noise-residual"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/tmp/merge-synth", help="synthetic data folder (generated, cached)")
    p.add_argument("--scenario", default="synth-long")
    p.add_argument("--per-class", type=int, default=160)
    p.add_argument("--val-per-class", type=int, default=80)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--seen", nargs="+", default=list(SEEN), help="families with a specialist")
    p.add_argument("--add-family", default=ADD, help="the family added in the composable step")
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--no-pretrained", action="store_true", help="random backbone weights")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--adapter", default="full", choices=("full", "lora"))
    p.add_argument("--blocks", type=int, default=2, help="fine-tuned last blocks")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="training seed of every detector")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timing-repeats", type=int, default=25)
    p.add_argument("--timing-batch", type=int, default=64)
    p.add_argument("--work", default="/tmp/merge-eval", help="detectors and evaluation outputs")
    p.add_argument("--report", default="docs/results-merging.md")
    p.add_argument("--csv", default="docs/results-merging.csv")
    return p.parse_args(argv)


def _weights_phrase(args) -> str:
    """Where the backbone's weights come from, for the report (from the backbone registry)."""
    if args.no_pretrained:
        return "random weights"
    from lorax_cil.models.backbones import backbone_weight_source

    return "pretrained; " + (backbone_weight_source(args.backbone) or "weights as registered")


def train(args, name: str, families: list[str]) -> Path:
    from lorax_cil.detection.train import DetectConfig, merge_detect_config, train_detector

    out = Path(args.work) / name
    cfg = merge_detect_config(DetectConfig(), {
        "data": {"sources": [f"{f}={Path(args.data) / f}" for f in families], "crop": args.img_size},
        "model": {"backbone": args.backbone, "pretrained": not args.no_pretrained,
                  "img_size": args.img_size, "adapter": args.adapter, "blocks": args.blocks},
        "train": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                  "seed": args.seed, "device": "cpu"},
        "out": str(out)}, source=name)
    t0 = time.perf_counter()
    train_detector(cfg)
    print(f"trained {name} on {families} in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


_EVALUATED: dict[Path, dict[str, dict[str, float]]] = {}


def evaluate(args, folder: Path, families: list[str]) -> dict[str, dict[str, float]]:
    """Per-family metrics of the detector in ``folder`` on the val split (once per folder)."""
    from lorax_cil.detection.model import load_detector
    from lorax_cil.detection.protocol import evaluate_detector

    if folder not in _EVALUATED:
        det = load_detector(folder)
        res = evaluate_detector(det, args.data, split="val", generators=families, device="cpu",
                                out=folder / "eval")
        _EVALUATED[folder] = {r["generator"]: r for r in res["per_generator"]}
    return _EVALUATED[folder]


def _mean(per: dict, fams: list[str], key: str) -> float:
    return sum(float(per[f][key]) for f in fams) / len(fams)


def row(kind: str, name: str, per: dict, seen: list[str], held: list[str], step: int) -> dict[str, Any]:
    r = {"step": step, "kind": kind, "detector": name}
    for label, fams in (("seen", seen), ("held_out", held)):
        for key in ("auc", "ap", "acc@thr", "acc@0.5"):
            r[f"{label}_{key}"] = _mean(per, fams, key)
    r["per_family_auc"] = {f: float(per[f]["auc"]) for f in per}
    return r


def time_one_pass(args, merged: Path, specialists: list[Path]) -> dict[str, Any]:
    """Seconds per image of the merged detector and of all N specialists, alternating."""
    import torch

    from lorax_cil.detection.model import load_detector

    m = load_detector(merged).eval()
    specs = [load_detector(s).eval() for s in specialists]
    x = torch.randn(args.timing_batch, 3, args.img_size, args.img_size)
    calls = {"n": 0}

    def count(*_):
        calls["n"] += 1

    first_block = lambda d: d.backbone.model.get_submodule(d.backbone.spec.block_names[0])  # noqa: E731
    hooks = [first_block(d).register_forward_pre_hook(count) for d in [m, *specs]]
    with torch.no_grad():
        m(x)
        merged_passes = calls["n"]
        for d in specs:
            d(x)
        spec_passes = calls["n"] - merged_passes
    for h in hooks:
        h.remove()
    tm, ts = [], []
    with torch.no_grad():
        for _ in range(args.timing_repeats):
            t0 = time.perf_counter()
            m(x)
            tm.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for d in specs:
                d(x)
            ts.append(time.perf_counter() - t0)
    merged_s, spec_s = statistics.median(tm) / len(x), statistics.median(ts) / len(x)
    return {"batch": len(x), "repeats": args.timing_repeats, "merged_ms_per_image": 1e3 * merged_s,
            "specialists_ms_per_image": 1e3 * spec_s, "ratio": spec_s / merged_s,
            "ratio_of_minima": min(ts) / min(tm),
            "merged_backbone_passes": merged_passes, "specialists_backbone_passes": spec_passes,
            "n": len(specs)}


def check_add_equals_scratch(work: Path) -> float:
    """Largest absolute difference between the R2M merge made with --add and from scratch."""
    from lorax_cil.training.checkpoint import load_checkpoint

    a, _ = load_checkpoint(work / "merged-r2m+add")
    b, _ = load_checkpoint(work / "scratch-r2m")
    if sorted(a) != sorted(b):
        raise RuntimeError("--add and from-scratch merges hold different tensors")
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _machine(threads: int) -> str:
    return f"{cpu_name()}, {os.cpu_count()} logical CPUs visible, torch threads {threads}, CPU only"


def _f(v: float) -> str:
    return f"{v:.3f}"


def write_outputs(args, argv, rows, timing, add_diff, seconds, held, seen) -> Path:
    csv_path = Path(args.csv)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    cols = [c for c in rows[0] if c != "per_family_auc"]
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in rows:
            w.writerow([f"{r[c]:.4f}" if isinstance(r[c], float) else r[c] for c in cols])
    cmd = "python benchmarks/merge_eval.py" + "".join(" " + shlex.quote(a) for a in argv)
    merges = {r["detector"]: r for r in rows if r["step"] == 1 and r["kind"] == "merge"}
    r2m, avg, ta = (merges[f"merged-{m}"]["held_out_auc"] for m in ("r2m", "average", "task_arithmetic"))
    verdict = ("higher than" if r2m > max(avg, ta) else "lower than" if r2m < min(avg, ta)
               else "between")
    lines = [
        "# Merging specialists: results on synthetic data", "",
        f"Generated by `benchmarks/merge_eval.py` at commit {git_commit()} (do not edit by hand; the "
        f"same rows are in [{csv_path.name}]({csv_path.name})). Command:", "",
        f"    OMP_NUM_THREADS={args.threads} {cmd}", "",
        f"Machine: {_machine(args.threads)}; total time {seconds / 60:.1f} min (data generation, "
        f"training, merging, evaluation and timing).", "",
        "## Setup", "",
        f"- Data: `{args.scenario}` synthetic families ([synthetic-data.md](synthetic-data.md)), "
        f"{args.per_class} train / {args.val_per_class} val images per class and family, "
        f"{args.size} px, data seed {args.data_seed}. Metrics are on the **val** split; every image is "
        "scored.",
        f"- Seen families (one specialist each, step 1): {', '.join(f'`{f}`' for f in seen)}. "
        f"Added family (step 2): `{args.add_family}`. Held-out families (no detector ever trains on "
        f"them): {', '.join(f'`{f}`' for f in held)}.",
        f"- Every detector: `detect train` with backbone `{args.backbone}` "
        f"({_weights_phrase(args)}, {args.img_size} px), "
        f"adapter `{args.adapter}` on the last {args.blocks} blocks (and the neck), {args.epochs} "
        f"epochs, AdamW lr {args.lr}, batch {args.batch_size}, seed {args.seed}, blur/JPEG "
        "augmentation p = 0.1; threshold calibrated on 10 % carved from the training images. Joint "
        "training uses the same recipe on the union of the families (so it takes N times the steps).",
        "- Merges: `lorax-cil merge` with each method's default options (average; task arithmetic "
        "lam 0.3; TIES top-k 0.2, lam 1; DARE p 0.5 + task arithmetic lam 0.3, seed 0; R2M k 1, "
        "no centring, residual `subtract`, rho 0.1, norm matching, eta `norm_ratio`, alpha 0.6). "
        "Threshold of a merged detector: the mean of its specialists' calibrated thresholds "
        "(`acc@thr`); AUC and AP do not depend on it.", "",
        "These are small CPU-sized detectors on synthetic artifacts; they check the pipeline and "
        "compare methods under one protocol, they are not the paper's numbers.", "",
    ]
    if args.backbone.startswith("efficientnet"):
        lines += ["EfficientNet-Lite0 is a CNN: it has no attention/MLP matrices, so R2M's rank "
                  "truncation (rho) touches nothing here; BatchNorm affine parameters take the plain "
                  "mean and the fine-tuned BatchNorm running statistics are averaged.", ""]
    for step, title in ((1, f"Step 1: {len(seen)} specialists"),
                        (2, f"Step 2: + `{args.add_family}` (re-merged with `--add`)")):
        rs = [r for r in rows if r["step"] == step]
        lines += [f"## {title}", "",
                  "| detector | kind | seen AUC | seen AP | seen acc@thr | held-out AUC | held-out AP | "
                  "held-out acc@thr |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in rs:
            lines.append(f"| {r['detector']} | {r['kind']} | " + " | ".join(
                _f(r[k]) for k in ("seen_auc", "seen_ap", "seen_acc@thr", "held_out_auc", "held_out_ap",
                                   "held_out_acc@thr")) + " |")
        lines.append("")
    lines += [
        "## R2M against weight averaging and Task Arithmetic", "",
        f"Mean AUC over the {len(held)} held-out families, step 1: R2M {_f(r2m)}, weight averaging "
        f"{_f(avg)}, Task Arithmetic {_f(ta)}: R2M is **{verdict}** the two baselines on this data "
        "(one seed; same data, specialists and evaluation for every method).", "",
        "## Composable step", "",
        f"`merged-r2m+add` was written by `lorax-cil merge --add <{args.add_family} specialist> --from "
        "merged-r2m`: the N x N Gram entries of the first merge were loaded from `merged-r2m/gram/` and "
        "only the new row was computed. Merging all "
        f"{len(seen) + 1} specialists from scratch gives the same tensors: largest absolute "
        f"difference {add_diff:.2e}.", "",
        "## One backbone pass", "",
        f"Backbone passes per batch (counted with a hook on the first block): merged detector "
        f"{timing['merged_backbone_passes']}, the {timing['n']} specialists "
        f"{timing['specialists_backbone_passes']}. Time per image (batch {timing['batch']}, median of "
        f"{timing['repeats']} alternating repeats, same run): merged "
        f"{timing['merged_ms_per_image']:.3f} ms, all {timing['n']} specialists "
        f"{timing['specialists_ms_per_image']:.3f} ms, **ratio {timing['ratio']:.2f}x** (ratio of the "
        f"fastest repeats: {timing['ratio_of_minima']:.2f}x; the machine is shared, so single timings are "
        "noisy, the ratio within one run is what counts). The merged "
        "detector runs the plain backbone modules; each specialist also pays for running its own "
        "fine-tuned copy of the last blocks (a substituted-parameter call), so the ratio can exceed N.", "",
        "## Per-family AUC (step 1)", "",
    ]
    step1 = [r for r in rows if r["step"] == 1]
    fams = seen + held
    lines += ["| detector | " + " | ".join(f + (" (seen)" if f in seen else "") for f in fams) + " |",
              "|---|" + "---:|" * len(fams)]
    for r in step1:
        lines.append(f"| {r['detector']} | " + " | ".join(_f(r["per_family_auc"][f]) for f in fams) + " |")
    report = Path(args.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (Path(args.work) / "rows.json").write_text(json.dumps({"rows": rows, "timing": timing}, indent=1))
    return report


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from lorax_cil.benchmarks.synth import SYNTH_SCENARIOS, synthesize
    from lorax_cil.merging.detectors import merge_detector_folders

    t0 = time.perf_counter()
    families = list(SYNTH_SCENARIOS[args.scenario])
    seen = list(args.seen)
    unknown = [f for f in [*seen, args.add_family] if f not in families]
    if unknown or args.add_family in seen:
        raise SystemExit(f"families {unknown or [args.add_family]} are not valid here; {args.scenario} has {families}")
    held = [f for f in families if f not in seen and f != args.add_family]
    synthesize(args.data, scenario=args.scenario, per_class=args.per_class, val_per_class=args.val_per_class,
               size=args.size, seed=args.data_seed, workers=1)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    spec = {f: train(args, f"specialist-{f}", [f]) for f in [*seen, args.add_family]}
    joint = train(args, "joint", seen)
    joint_add = train(args, "joint+add", [*seen, args.add_family])
    quiet = lambda msg: None  # noqa: E731
    for m in METHODS:
        merge_detector_folders([spec[f] for f in seen], out=work / f"merged-{m}", method=m, progress=quiet)
        merge_detector_folders([spec[args.add_family]], out=work / f"merged-{m}+add",
                               add_from=work / f"merged-{m}", progress=quiet)
    merge_detector_folders([spec[f] for f in [*seen, args.add_family]], out=work / "scratch-r2m",
                           method="r2m", progress=quiet)
    add_diff = check_add_equals_scratch(work)
    rows = []
    seen2 = [*seen, args.add_family]
    for step, s, name_joint, jfolder in ((1, seen, "joint", joint), (2, seen2, "joint+add", joint_add)):
        rows.append(row("joint", name_joint, evaluate(args, jfolder, families), s, held, step))
        for f in s:
            rows.append(row("specialist", f"specialist-{f}", evaluate(args, spec[f], families), s, held, step))
        for m in METHODS:
            name = f"merged-{m}" + ("+add" if step == 2 else "")
            rows.append(row("merge", name, evaluate(args, work / name, families), s, held, step))
        print(f"step {step} evaluated", flush=True)
    timing = time_one_pass(args, work / "merged-r2m", [spec[f] for f in seen])
    print(json.dumps(timing), flush=True)
    report = write_outputs(args, argv, rows, timing, add_diff, time.perf_counter() - t0, held, seen)
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
