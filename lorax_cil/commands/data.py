"""`lorax-cil data synth | verify | sheet`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="synthesize, verify and inspect datasets")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True

    s = dsub.add_parser("synth", help="write the synthetic embedded dataset (CDDB layout)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--scenario", default="synth-easy",
                   help="synth-easy, synth-hard, synth-long or their -fewshot variants")
    s.add_argument("--per-class", type=int, default=None,
                   help="train images per class (default 200; 14 for the -fewshot scenarios, "
                        "which take 10 to 30)")
    s.add_argument("--val-per-class", type=int, default=None, help="val images per class")
    s.add_argument("--size", type=int, default=96, help="image size in pixels")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=None, help="processes (default: up to 2)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output")
    s.set_defaults(func=cmd_synth)

    v = dsub.add_parser("verify", help="count, check and hash a dataset; write its manifest")
    add_scenario_args(v, required_data=True)
    v.add_argument("--splits", nargs="+", default=None, help="splits (default: all found)")
    v.add_argument("--crop-size", type=int, default=224, help="report images smaller than this")
    v.add_argument("--quick", action="store_true", help="read headers only (no full decode)")
    v.add_argument("--no-content-hash", action="store_true", help="skip hashing file bytes")
    v.add_argument("--manifest", default=None, help="where to write the manifest JSON")
    v.add_argument("--strict-data", action="store_true", help="exit 1 on unreadable files")
    v.set_defaults(func=cmd_verify)

    c = dsub.add_parser("sheet", help="contact sheet PNG of real/fake pairs per task")
    add_scenario_args(c, required_data=True)
    c.add_argument("--split", default="train")
    c.add_argument("--pairs", type=int, default=3)
    c.add_argument("--out", required=True, help="PNG path")
    c.set_defaults(func=cmd_sheet)


def add_scenario_args(p: argparse.ArgumentParser, *, required_data: bool = False) -> None:
    """--data-path, --scenario and --tasks, shared by every command that reads folders."""
    p.add_argument("--data-path", required=required_data, help="folder holding the task folders")
    p.add_argument(
        "--scenario",
        default=None,
        help="cddb-easy, cddb-hard, cddb-long, synth-easy, synth-hard, synth-long or custom "
        "(default for data commands: every task folder under --data-path)",
    )
    p.add_argument(
        "--tasks", nargs="+", default=None, help="for --scenario custom: names or name=path pairs"
    )


def resolve_from_args(args: argparse.Namespace):
    """The scenario named by --scenario/--tasks/--data-path (all tasks found if unnamed)."""
    from lorax_cil.benchmarks.scenarios import resolve_scenario
    from lorax_cil.benchmarks.verify import discover_scenario

    if args.scenario is None and not args.tasks:
        return discover_scenario(args.data_path)
    return resolve_scenario(args.scenario or "custom", data_path=args.data_path, tasks=args.tasks)


def cmd_synth(args: argparse.Namespace) -> int:
    from lorax_cil.benchmarks.synth import synthesize

    t0 = time.perf_counter()
    out = synthesize(
        args.out,
        scenario=args.scenario,
        per_class=args.per_class,
        val_per_class=args.val_per_class,
        size=args.size,
        seed=args.seed,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    print(f"wrote {args.scenario} to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from lorax_cil.benchmarks.verify import verify_data
    from lorax_cil.utils import write_json

    scenario = resolve_from_args(args)
    report = verify_data(
        scenario=scenario,
        splits=args.splits,
        crop_size=args.crop_size,
        decode=not args.quick,
        hash_content=not args.no_content_hash,
    )
    print(format_verify(report))
    manifest = Path(args.manifest) if args.manifest else Path(args.data_path) / "manifest.json"
    try:
        write_json(manifest, report.manifest)
        print(f"manifest: {manifest}")
    except OSError as exc:
        print(f"could not write manifest {manifest}: {exc}; printing it instead")
        print(json.dumps(report.manifest, indent=2))
    if report.unreadable and args.strict_data:
        return 1
    return 0


def format_verify(report) -> str:
    """Human-readable verify report: a count table, problems and warnings."""
    rows = report.rows()
    lines = [f"{'task':<22}{'split':<8}{'subclass':<12}{'real':>8}{'fake':>8}"]
    merged: dict[tuple, dict] = {}
    for r in rows:
        merged.setdefault((r["task"], r["split"], r["subclass"]), {})[r["class"]] = r["images"]
    for (task, split, sub), c in merged.items():
        lines.append(f"{task:<22}{split:<8}{sub:<12}{c['real']:>8}{c['fake']:>8}")
    m = report.manifest
    lines.append(f"unreadable files: {len(report.unreadable)}")
    for path, why in report.unreadable[:20]:
        lines.append(f"  {path}: {why}")
    lines.append(f"images smaller than the {m['crop_size']} px crop: {len(report.small)}")
    for path, w, h in report.small[:5]:
        lines.append(f"  {path}: {w}x{h}")
    for w in report.warnings:
        lines.append(f"warning: {w}")
    lines.append(f"listing sha256: {m['listing_sha256']}")
    if m.get("content_sha256"):
        lines.append(f"content sha256: {m['content_sha256']}")
    return "\n".join(lines)


def cmd_sheet(args: argparse.Namespace) -> int:
    from lorax_cil.benchmarks.contact_sheet import contact_sheet

    scenario = resolve_from_args(args)
    target = Path(args.out).expanduser().resolve()
    for task in scenario.tasks:
        root = Path(task.path).resolve()
        if target == root or root in target.parents:
            raise ValueError(f"--out {args.out} is inside the task folder {task.path}: the sheet "
                             "would be read as an image of that task (or replace one); write it "
                             "outside the data")
    out = contact_sheet(scenario, args.out, split=args.split, pairs=args.pairs)
    print(f"contact sheet: {out}")
    return 0
