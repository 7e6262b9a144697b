"""`lorax-cil demo`: the main job on the embedded synthetic data.

Synthesizes synth-easy (cached), verifies it, writes a contact sheet of real/fake pairs per task.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

__all__ = ["register", "prepare_demo_data"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the demo on the embedded synthetic dataset")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--data-dir", default=None, help="synthetic data folder (default: data/...)")
    p.add_argument("--scenario", default="synth-easy", help="synth-easy, synth-hard, synth-long")
    p.add_argument("--per-class", type=int, default=200, help="train images per class")
    p.add_argument("--val-per-class", type=int, default=100, help="val images per class")
    p.add_argument("--size", type=int, default=96, help="synthetic image size in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)


def prepare_demo_data(args: argparse.Namespace) -> Path:
    """Synthesize (or reuse) the demo dataset and return its folder."""
    from lorax_cil.benchmarks.synth import synthesize

    data_dir = Path(
        args.data_dir
        or f"data/{args.scenario}-{args.size}px-{args.per_class}-{args.val_per_class}-s{args.seed}"
    )
    t0 = time.perf_counter()
    synthesize(
        data_dir,
        scenario=args.scenario,
        per_class=args.per_class,
        val_per_class=args.val_per_class,
        size=args.size,
        seed=args.seed,
    )
    print(f"[demo] data: {data_dir} ({time.perf_counter() - t0:.1f} s, cached after the first run)")
    return data_dir


def cmd_demo(args: argparse.Namespace) -> int:
    from lorax_cil.benchmarks.contact_sheet import contact_sheet
    from lorax_cil.benchmarks.scenarios import resolve_scenario
    from lorax_cil.benchmarks.verify import verify_data
    from lorax_cil.commands.data import format_verify
    from lorax_cil.utils import write_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_demo_data(args)
    scenario = resolve_scenario(args.scenario, data_path=data_dir)
    report = verify_data(scenario=scenario, crop_size=args.size)
    print(format_verify(report))
    write_json(out / "data_manifest.json", report.manifest)
    sheet = contact_sheet(scenario, out / "contact_sheet.png", pairs=3)
    print(f"[demo] manifest: {out / 'data_manifest.json'}")
    print(f"[demo] contact sheet: {sheet}")
    return 0 if report.ok else 1
