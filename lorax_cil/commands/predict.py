"""`lorax-cil predict`: attribute image files, folders and glob patterns with a trained model.

One row per input (CSV by default, to stdout or ``--out``; ``--format json`` / ``jsonl``): the
attributed generator or "real", the fake score, the top-k classes with probabilities and the
model's identity. Unreadable files get an ``error`` and never stop the run (exit status 0).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lorax_cil.training.config import READOUTS

__all__ = ["register", "cmd_predict"]


def register(sub: argparse._SubParsersAction) -> None:
    from lorax_cil.commands.train import add_plugin_flag

    p = sub.add_parser(
        "predict", help="attribute images with a trained run or detector",
        description="Attribute images with a trained run (LoRAX or a baseline) or a binary "
                    "detector. PATHs are image files, folders (searched recursively; non-image "
                    "files are skipped) or glob patterns (quote them; ** matches any depth).")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image file, folder or glob pattern")
    p.add_argument("--model", required=True, metavar="RUN_OR_DETECTOR",
                   help="run directory, checkpoint folder or detector folder")
    p.add_argument("--out", default=None, metavar="FILE", help="output file (default: stdout)")
    p.add_argument("--format", default="csv", choices=("csv", "json", "jsonl"),
                   help="output format (default: csv)")
    p.add_argument("--top-k", type=int, default=3, help="classes listed per image (default: 3)")
    p.add_argument("--threshold", type=float, default=None,
                   help="decision threshold on the fake score (default: a detector's calibrated "
                        "threshold; 0.5 for runs, where it matches the argmax class)")
    p.add_argument("--readout", default=None, choices=READOUTS,
                   help="a run's read-out (default: the one it trained with); head reads the "
                        "linear head of a run trained with class means")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--workers", type=int, default=2,
                   help="threads reading images ahead of the model (0: none; default: 2)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_plugin_flag(p)
    p.set_defaults(func=cmd_predict)


def _check(args: argparse.Namespace) -> None:
    if args.top_k < 1 or args.batch_size < 1 or args.workers < 0:
        raise ValueError("--top-k and --batch-size must be >= 1 and --workers >= 0")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")


def _check_out(out: str, items: list, model: str) -> None:
    """Refuse an ``--out`` that would overwrite an input image, a model file or a folder."""
    import os
    from pathlib import Path

    target = Path(out).expanduser().resolve()
    if target.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name")
    for item in items:
        if item.error is None and Path(item.path).resolve() == target:
            raise ValueError(f"--out {out} is one of the input images ({item.path}); writing the "
                             "results there would destroy it: choose another file")
    model_dir = Path(model).expanduser().resolve()
    if target == model_dir or model_dir in target.parents:
        raise ValueError(f"--out {out} is inside the model folder {model}; choose a file "
                         "outside it")
    parent = target.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"--out {out}: cannot write in {parent} (missing folder or no "
                         "permission)")


def cmd_predict(args: argparse.Namespace) -> int:
    from lorax_cil.commands.train import load_cli_plugins
    from lorax_cil.inference.inputs import iter_input_paths
    from lorax_cil.inference.loading import load
    from lorax_cil.inference.writers import open_row_writer

    _check(args)
    items = list(iter_input_paths(args.paths))  # paths only: nothing is decoded yet
    if args.out:
        _check_out(args.out, items, args.model)
    load_cli_plugins(args)
    predictor = load(args.model, device=args.device)
    if args.readout is not None:
        select = getattr(predictor, "select_readout", None)
        if select is None:
            raise ValueError(f"--readout {args.readout}: {args.model} is not a class-incremental "
                             "run (a detector has one output)")
        select(args.readout)
    header = predictor.describe()
    if args.threshold is not None:
        header.update(threshold=args.threshold, threshold_source="--threshold")
    # file names that are not UTF-8 are written as \xNN escapes instead of stopping the output
    out = (open(args.out, "w", encoding="utf-8", errors="backslashreplace", newline="")
           if args.out else sys.stdout)
    errors = 0
    try:
        writer = open_row_writer(out, args.format, predictor.columns(args.top_k), header)
        rows = predictor.iter_predict(items, top_k=args.top_k, threshold=args.threshold,
                                      batch_size=args.batch_size, workers=args.workers)
        try:
            for row in _progress(rows, len(items), args):
                writer.write(row)
                errors += row["error"] is not None
            writer.close()
        except OSError as exc:  # a full disk: name the output (the rows before stay in it)
            if exc.filename is None and args.out:
                raise OSError(exc.errno, exc.strerror or str(exc), args.out) from exc
            raise
    finally:
        if out is not sys.stdout:
            out.close()
    if getattr(args, "quiet", False):
        return 0
    where = f" to {args.out}" if args.out else ""
    print(f"[predict] {len(items)} input(s), {len(items) - errors} predicted, {errors} with an "
          f"error{where}; model {header['model_id']} (threshold {header['threshold']:g}: "
          f"{header['threshold_source']})", file=sys.stderr)
    return 0


def _progress(rows: Any, total: int, args: argparse.Namespace) -> Any:
    """A tqdm bar on stderr when the input spans more than one batch."""
    if args.no_progress or total <= args.batch_size:
        return rows
    from tqdm import tqdm

    return tqdm(rows, total=total, unit="img", file=sys.stderr, dynamic_ncols=True)
