"""`lorax-cil merge`: merge specialist detectors into one detector, without training.

    lorax-cil merge --specialists A B C --method r2m --alpha 0.6 --out merged/
    lorax-cil merge --add D --from merged/ --out merged+D/     # one more specialist

The output is a detector folder (``detect eval``, ``predict`` and ``lorax_cil.load`` read it)
with one backbone pass per image; see ``docs/merging.md`` and
:mod:`lorax_cil.merging.detectors`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["register", "method_options_from_args", "OPTION_FLAGS"]

METHODS = ("average", "task-arithmetic", "ties", "dare", "r2m")

#: flag dest -> (option name of the merge function, methods it applies to)
OPTION_FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "lam": ("lam", ("task_arithmetic", "ties", "dare")),
    "top_k": ("top_k", ("ties",)),
    "p": ("p", ("dare",)),
    "dare_seed": ("seed", ("dare",)),
    "base_method": ("base_method", ("dare",)),
    "k": ("k", ("r2m",)),
    "center": ("center", ("r2m",)),
    "residual": ("residual", ("r2m",)),
    "rho": ("rho", ("r2m",)),
    "norm_match": ("norm_match", ("r2m",)),
    "eta_mode": ("eta_mode", ("r2m",)),
    "alpha": ("alpha", ("r2m",)),
    "exclude_biases": ("exclude_biases", ("r2m",)),
}


def _rho(text: str) -> float | None:
    if text.lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rho expects a number in (0, 1] or 'none', got {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    from lorax_cil.commands.train import add_plugin_flag

    p = sub.add_parser(
        "merge", help="merge specialist detectors into one detector (R2M, TIES, DARE, ...)",
        description="Merge detectors trained from the same backbone weights ('detect train' with "
                    "--adapter lora or full) into one detector folder: theta_0 + merged delta "
                    "folded into the backbone, averaged head, one backbone pass per image.")
    p.add_argument("--specialists", nargs="+", default=None, metavar="DIR",
                   help="specialist detector folders")
    p.add_argument("--add", nargs="+", default=None, metavar="DIR",
                   help="specialists to add to the merged detector given with --from")
    p.add_argument("--from", dest="from_dir", default=None, metavar="MERGED_DIR",
                   help="a merged detector: re-merge its sources plus --add (R2M reuses its Gram cache)")
    p.add_argument("--method", default=None,
                   help=f"merge method: {', '.join(METHODS)} or one registered by a --plugin "
                        "(default r2m; with --from: the recorded one)")
    p.add_argument("--out", required=True, help="merged detector folder")
    p.add_argument("--overwrite", action="store_true", help="replace a detector already in --out")
    add_plugin_flag(p)
    g = p.add_argument_group("method options (defaults: docs/merging.md; with --from: the recorded ones)")
    g.add_argument("--lam", type=float, default=None,
                   help="task-arithmetic / dare: scale of the summed task vectors; ties: scale of the merge")
    g.add_argument("--top-k", type=float, default=None, help="ties: kept fraction of magnitudes")
    g.add_argument("--p", type=float, default=None, help="dare: drop probability")
    g.add_argument("--dare-seed", type=int, default=None, help="dare: seed of the drop masks")
    g.add_argument("--base-method", default=None, choices=("task_arithmetic", "average"),
                   help="dare: merge of the dropped task vectors")
    g.add_argument("--k", type=int, default=None, help="r2m: dimension of the Real subspace")
    g.add_argument("--center", action=argparse.BooleanOptionalAction, default=None,
                   help="r2m: centre the task matrix before the SVD")
    g.add_argument("--residual", default=None, choices=("subtract", "project"),
                   help="r2m: tau_i - tau_core (subtract) or (I - Pi) tau_i (project)")
    g.add_argument("--rho", type=_rho, default=argparse.SUPPRESS,
                   help="r2m: rank-truncation ratio of attention/MLP matrices, or 'none'")
    g.add_argument("--norm-match", action=argparse.BooleanOptionalAction, default=None,
                   help="r2m: rescale residuals to the mean residual norm")
    g.add_argument("--eta-mode", default=None, choices=("norm_ratio", "fixed"),
                   help="r2m: eta = alpha |core| / |r_bar| (norm_ratio) or alpha (fixed)")
    g.add_argument("--alpha", type=float, default=None, help="r2m: residual strength")
    g.add_argument("--exclude-biases", action=argparse.BooleanOptionalAction, default=None,
                   help="r2m: leave every bias out of the Real estimate (plain mean)")
    t = p.add_argument_group("threshold")
    t.add_argument("--threshold", default="mean", metavar="mean|VALUE",
                   help="'mean' of the specialists' calibrated thresholds (default) or a number in [0, 1]")
    t.add_argument("--calibrate", default=None, metavar="DIR",
                   help="choose the threshold on these images instead (any 'detect eval' layout)")
    t.add_argument("--calibrate-split", default="val", help="split folder of CDDB / GenImage layouts")
    t.add_argument("--threshold-rule", default="balanced-accuracy", choices=("balanced-accuracy", "accuracy"),
                   help="rule used with --calibrate")
    t.add_argument("--batch-size", type=int, default=64, help="images per pass when calibrating")
    p.set_defaults(func=cmd_merge)


def method_options_from_args(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The options given on the command line, checked against ``method`` (``_`` spelling)."""
    given = {dest: getattr(args, dest) for dest in OPTION_FLAGS
             if hasattr(args, dest) and getattr(args, dest) is not None}
    if hasattr(args, "rho") and "rho" not in given:
        given["rho"] = None  # --rho none
    out: dict[str, Any] = {}
    for dest, value in given.items():
        name, methods = OPTION_FLAGS[dest]
        if method not in methods:
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"{flag} is an option of {', '.join(m.replace('_', '-') for m in methods)}, "
                             f"not of method {method.replace('_', '-')!r}")
        out[name] = value
    return out


def _check_options(args: argparse.Namespace) -> None:
    """Refuse bad values with the option's name, and an --out that is one of the inputs."""
    import math

    def bad(flag: str, want: str, value: Any) -> ValueError:
        return ValueError(f"{flag} expects {want}, got {value!r}")

    thr = str(args.threshold)
    if thr != "mean":
        try:
            value = float(thr)
        except ValueError:
            raise bad("--threshold", "'mean' or a number in [0, 1]", args.threshold) from None
        if not 0.0 <= value <= 1.0:
            raise bad("--threshold", "'mean' or a number in [0, 1]", args.threshold)
    checks = {
        "lam": ("--lam", "a finite number", lambda v: math.isfinite(v)),
        "top_k": ("--top-k", "a fraction in (0, 1]", lambda v: 0.0 < v <= 1.0),
        "p": ("--p", "a drop probability in [0, 1)", lambda v: 0.0 <= v < 1.0),
        "k": ("--k", "an integer >= 1", lambda v: v >= 1),
        "alpha": ("--alpha", "a finite number", lambda v: math.isfinite(v)),
        "batch_size": ("--batch-size", "an integer >= 1", lambda v: v >= 1),
    }
    for dest, (flag, want, ok) in checks.items():
        value = getattr(args, dest, None)
        if value is not None and not ok(value):
            raise bad(flag, want, value)
    rho = getattr(args, "rho", None)
    if rho is not None and not 0.0 < rho <= 1.0:
        raise bad("--rho", "a number in (0, 1] or 'none'", rho)
    out = Path(args.out).expanduser().resolve()
    for flag, folders in (("--specialists", args.specialists), ("--add", args.add),
                          ("--from", [args.from_dir] if args.from_dir else None)):
        for folder in folders or ():
            src = Path(folder).expanduser().resolve()
            if out == src or src in out.parents:
                raise ValueError(f"--out {args.out} is {'inside ' if out != src else ''}the "
                                 f"{flag} folder {folder}: the merge would overwrite its own input "
                                 "(even with --overwrite); choose another --out")


def cmd_merge(args: argparse.Namespace) -> int:
    from lorax_cil.merging.detectors import merge_detector_folders

    if args.from_dir and args.specialists:
        raise ValueError("give either --specialists (a new merge) or --add with --from (extend a merge)")
    if bool(args.add) != bool(args.from_dir):
        raise ValueError("--add and --from go together: --add NEW --from MERGED_DIR")
    if not args.specialists and not args.add:
        raise ValueError("give --specialists DIR [DIR ...] or --add DIR --from MERGED_DIR")
    _check_options(args)
    method = args.method.replace("-", "_") if args.method else None
    if method is None and not args.from_dir:
        method = "r2m"
    if method is None:
        from lorax_cil.merging.detectors import read_folder_meta

        method = (read_folder_meta(Path(args.from_dir), "merged detector").get("merge") or {}).get("method", "r2m")
    from lorax_cil.commands.train import load_cli_plugins
    from lorax_cil.merging.result import get_merge_method

    load_cli_plugins(args)
    get_merge_method(method)  # unknown names list the valid ones
    options = method_options_from_args(args, method)
    summary = merge_detector_folders(
        args.add or args.specialists, out=args.out, method=method, options=options,
        add_from=args.from_dir, threshold=args.threshold, calibrate=args.calibrate,
        calibrate_split=args.calibrate_split, threshold_rule=args.threshold_rule,
        batch_size=args.batch_size, overwrite=args.overwrite,
        progress=None if getattr(args, "quiet", False) else lambda msg: print(f"[merge] {msg}", flush=True))
    if not getattr(args, "quiet", False):
        print(json.dumps({k: summary[k] for k in ("method", "options", "sources", "threshold", "out")},
                         sort_keys=True))
    return 0
