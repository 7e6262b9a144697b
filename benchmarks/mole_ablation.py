"""MoLE ablations on the synthetic data: train on one generator family, evaluate on the rest.

Variants (after the CLIPMoLE paper's ablations): MoLE (shared + separate experts on the MLP of the last 3 blocks),
shared only, separate only, last 1 / 2 / all blocks, attention instead of MLP, attention + MLP,
a plain LoRA, and the UnivFD baseline (linear probe on frozen features). Every variant uses the
same backbone, data, seed, epochs and learning rate; the threshold of each is calibrated on a
split carved from the source family's *training* images.

The script writes a Markdown report (default ``docs/mole-ablation.md``) holding the command
that produced it, the table, per-family AP of MoLE and the linear probe, and the robustness of
the variants listed in ``--robustness-variants`` (PNG curves next to the report).

Example (the numbers in docs/mole-ablation.md; about 15 minutes on 2 CPU cores)::

    python benchmarks/mole_ablation.py --data /tmp/synth64 --generate
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from lorax_cil.bench.provenance import git_commit

VARIANTS: dict[str, tuple[str, dict]] = {
    "mole": ("MoLE: shared r=8 + experts 4/8/16, MLP, last 3 blocks", {}),
    "shared-only": ("shared LoRA only (no experts, no router)", {"expert_ranks": []}),
    "separate-only": ("routed experts only (no shared LoRA)", {"shared_rank": 0}),
    "last-1": ("MoLE on the last block only", {"blocks": 1}),
    "last-2": ("MoLE on the last 2 blocks", {"blocks": 2}),
    "all-blocks": ("MoLE on every block", {"blocks": None}),
    "attn": ("MoLE on attention (qkv, proj) instead of the MLP", {"targets": "attn"}),
    "attn+mlp": ("MoLE on attention and MLP", {"targets": "attn+mlp"}),
    "lora": ("plain LoRA r=8 on the same layers", {"adapter": "lora"}),
    "linear-probe": ("UnivFD baseline: linear probe on frozen features", {"adapter": "linear-probe"}),
}

#: Artifact groups of the synthetic generator families (lorax_cil.benchmarks.synth_families).
SYNTH_GROUPS = {
    "nn-upsample": "upsampling", "bilinear-upsample": "upsampling", "tconv-checker": "upsampling",
    "aliasing": "upsampling",
    "spectral-peaks": "frequency", "hf-suppress": "frequency", "sr-ringing": "frequency",
    "noise-residual": "frequency",
    "jpeg-blocks": "compression", "chroma-subsample": "compression",
    "blend-seam": "editing", "colour-shift": "editing", "warp-stretch": "editing",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/tmp/synth64", help="synthetic data folder (CDDB layout)")
    p.add_argument("--generate", action="store_true", help="generate the data first (cached)")
    p.add_argument("--scenario", default="synth-long")
    p.add_argument("--per-class", type=int, default=160)
    p.add_argument("--val-per-class", type=int, default=80)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--source", default="nn-upsample", help="the source family (the others are unseen)")
    p.add_argument("--backbone", default="vit-test")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--pretrained", action="store_true",
                   help="the backbone's pretrained weights (e.g. dinov2-vits14, offline); "
                        "default: random weights")
    p.add_argument("--backbone-option", action="append", default=None, metavar="KEY=VALUE",
                   help="backbone factory option (default: global_pool=avg)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--robustness-variants", nargs="*", default=["mole", "linear-probe"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", default="/tmp/mole-ablation", help="detectors and evaluation outputs")
    p.add_argument("--report", default="docs/mole-ablation.md")
    p.add_argument("--note", action="append", default=[], help="a paragraph added to the report")
    p.add_argument("--from-rows", action="store_true",
                   help="only rewrite the report from <work>/rows.json of an earlier run")
    return p.parse_args(argv)


def _options(items) -> dict:
    import yaml

    out = {}
    for item in items if items is not None else ["global_pool=avg"]:
        key, _, value = item.partition("=")
        out[key] = yaml.safe_load(value)
    return out


def run_variant(args, name: str, seed: int) -> dict:
    from lorax_cil.detection.protocol import evaluate_detector, summary_rows
    from lorax_cil.detection.train import DetectConfig, merge_detect_config, train_detector

    changes = dict(VARIANTS[name][1])
    model = {"backbone": args.backbone, "pretrained": bool(args.pretrained), "img_size": args.img_size,
             "backbone_options": _options(args.backbone_option), **changes}
    out = Path(args.work) / f"{name}-s{seed}"
    cfg = merge_detect_config(DetectConfig(), {
        "data": {"sources": [f"{args.source}={Path(args.data) / args.source}"], "crop": args.img_size},
        "model": model,
        "train": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "seed": seed,
                  "device": args.device},
        "out": str(out)}, source=f"variant {name}")
    t0 = time.perf_counter()
    det, summary = train_detector(cfg)
    train_s = time.perf_counter() - t0
    res = evaluate_detector(det, args.data, split="val", groups=SYNTH_GROUPS, device=args.device,
                            robustness=name in args.robustness_variants, out=out / "eval")
    unseen = [r for r in res["per_generator"] if r["generator"] != args.source]
    src = [r for r in res["per_generator"] if r["generator"] == args.source][0]
    gen_mean, group_mean = summary_rows(unseen)
    row = {"variant": name, "seed": seed, "trainable": summary["parameters"]["trainable"],
           "source_ap": src["ap"], "unseen_ap": gen_mean["ap"], "unseen_group_ap": group_mean["ap"],
           "unseen_acc@0.5": gen_mean["acc@0.5"], "unseen_acc@thr": gen_mean["acc@thr"],
           "threshold": det.threshold, "train_seconds": round(train_s, 1),
           "per_family_ap": {r["generator"]: r["ap"] for r in res["per_generator"]}}
    if res["robustness"]:
        row["robustness"] = [
            {"condition": c, "level": lv, "unseen_ap": summary_rows(
                [r for r in res["robustness"] if r["condition"] == c and r["level"] == lv
                 and not r["generator"].startswith("mean") and r["generator"] != args.source])[0]["ap"]}
            for c, lv in dict.fromkeys((r["condition"], r["level"]) for r in res["robustness"])]
    print(f"{name} seed {seed}: source AP {row['source_ap']:.3f}, unseen AP {row['unseen_ap']:.3f}, "
          f"acc@thr {row['unseen_acc@thr']:.3f} ({train_s:.0f} s)", flush=True)
    return row


def _fmt(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f}" if v.size == 1 else f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


def write_report(args, rows: list[dict], argv: list[str], seconds: float) -> Path:
    report = Path(args.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/mole_ablation.py " + " ".join(shlex.quote(a) for a in argv)
    lines = [
        "# MoLE ablations on the synthetic data", "",
        f"Generated by `benchmarks/mole_ablation.py` at commit {git_commit()} (do not edit by hand). "
        "Command:", "",
        f"    {cmd}", "",
        f"Setup: source family `{args.source}` (train split; 10 % of it carved out for the threshold), "
        f"evaluated on the val split of the {len(rows[0]['per_family_ap']) - 1} other families of `{args.scenario}` "
        f"(unseen) and on the source's val split. Data: {args.per_class} train / {args.val_per_class} val "
        f"images per class and family, {args.size} px, data seed {args.data_seed}. Backbone "
        f"`{args.backbone}` with **{'pretrained' if args.pretrained else 'random'} weights** "
        f"(img {args.img_size}, options "
        f"{_options(args.backbone_option)}), {args.epochs} epochs, AdamW lr {args.lr}, batch "
        f"{args.batch_size}, blur/JPEG augmentation p = 0.1, balance weight 0.01, seeds {args.seeds}. "
        "Every image evaluated. Total time "
        + (f"{seconds / 60:.1f} min" if seconds == seconds else "not recorded") + " on CPU (2 shared cores).",
        "",
        ("These numbers check the implementation and the relative behaviour of the variants on a "
         + ("pretrained ViT at a CPU-sized input" if args.pretrained else "tiny random-weight ViT")
         + "; they are not the paper's CLIP ViT-L/14 results. `shared-only` and "
         "`lora` are the same function with the same initialisation (a rank-8 LoRA, scaling 1), so "
         "their rows agree."), "", *[n for note in args.note for n in (note, "")],
        "| variant | what | trainable params | source AP | unseen mean AP | unseen group-mean AP | "
        "unseen acc@0.5 | unseen acc@thr |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in args.variants:
        rs = [r for r in rows if r["variant"] == name]
        lines.append(f"| {name} | {VARIANTS[name][0]} | {rs[0]['trainable']:,} | "
                     + " | ".join(_fmt([r[k] for r in rs]) for k in
                                  ("source_ap", "unseen_ap", "unseen_group_ap", "unseen_acc@0.5",
                                   "unseen_acc@thr")) + " |")
    shown = [v for v in ("mole", "linear-probe") if v in args.variants]
    fams = sorted(rows[0]["per_family_ap"])
    lines += ["", "Per-family AP (mean over seeds); groups: artifact type of the family.", "",
              "| family | group | " + " | ".join(shown) + " |", "|---|---|" + "---:|" * len(shown)]
    for f in fams:
        vals = [_fmt([r["per_family_ap"][f] for r in rows if r["variant"] == v]) for v in shown]
        tag = " (source)" if f == args.source else ""
        lines.append(f"| {f}{tag} | {SYNTH_GROUPS.get(f, f)} | " + " | ".join(vals) + " |")
    robust = [r for r in rows if "robustness" in r and r["seed"] == args.seeds[0]]
    if robust:
        conds = [(c["condition"], c["level"]) for c in robust[0]["robustness"]]
        lines += ["", "Robustness: mean AP over the unseen families under Gaussian blur and JPEG "
                  f"(seed {args.seeds[0]}; curves: `detect eval --robustness` PNGs).", "",
                  "| condition | " + " | ".join(r["variant"] for r in robust) + " |",
                  "|---|" + "---:|" * len(robust)]
        for i, (c, lv) in enumerate(conds):
            label = "clean" if c == "clean" else f"{c} {lv:g}"
            lines.append(f"| {label} | " + " | ".join(f"{r['robustness'][i]['unseen_ap']:.3f}" for r in robust) + " |")
        img = report.parent / "img"
        img.mkdir(exist_ok=True)
        for kind in ("blur", "jpeg"):
            src = Path(args.work) / f"mole-s{args.seeds[0]}" / "eval" / f"robustness_{kind}.png"
            if src.is_file():
                # one image name per report, so a second report does not overwrite the first's
                stem = "mole" if report.stem == "mole-ablation" else report.stem
                shutil.copyfile(src, img / f"{stem}-robustness-{kind}.png")
                lines += ["", f"![MoLE under {kind}](img/{stem}-robustness-{kind}.png)"]
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (Path(args.work) / "rows.json").write_text(json.dumps({"rows": rows, "seconds": seconds}, indent=1))
    return report


def _strip_report_only(argv: list[str]) -> list[str]:
    """The command line without the report-only options (``--from-rows``, ``--note TEXT``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--note":
            skip = True
        elif a != "--from-rows" and not a.startswith("--note="):
            out.append(a)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    if args.from_rows:
        saved = json.loads((Path(args.work) / "rows.json").read_text())
        rows, seconds = (saved["rows"], saved["seconds"]) if isinstance(saved, dict) else (saved, float("nan"))
        argv = _strip_report_only(argv)
        print(f"report: {write_report(args, rows, argv, seconds)}")
        return 0
    t0 = time.perf_counter()
    if args.generate:
        from lorax_cil.benchmarks.synth import synthesize

        synthesize(args.data, scenario=args.scenario, per_class=args.per_class,
                   val_per_class=args.val_per_class, size=args.size, seed=args.data_seed, workers=1)
    rows = [run_variant(args, name, seed) for name in args.variants for seed in args.seeds]
    print(f"report: {write_report(args, rows, argv, time.perf_counter() - t0)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
