"""`lorax-cil compare`: several strategies x seeds under one protocol, one table, two figures.

Every run goes to ``<out>/<strategy>/seed<k>/`` (finished runs are reused, partial ones
resumed); the table (CSV + Markdown), the per-run rows and the figures go to ``<out>/``.
Configuration: flags > ``--config`` > strategy presets > defaults. The flags and the config file
set the *shared* protocol; a strategy whose preset fixes a shared key to another value (no memory
for ``finetune``) runs with its own value, and the command prints one line per such key.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register", "parse_seeds"]

#: `train` flags that `compare` replaces with --strategies / --seeds.
_REPLACED = ("strategy", "seed")


def register(sub: argparse._SubParsersAction) -> None:
    from lorax_cil.commands.train import add_run_flags

    p = sub.add_parser(
        "compare", help="run several strategies and seeds under one protocol; one table",
        description="Run each strategy for each seed (same data, order, backbone, memory "
                    "budget, transforms), reuse finished runs, and write a mean ± std table "
                    "(CSV, Markdown) and figures. Strategies: see docs/baselines.md.")
    p.add_argument("--strategies", required=True,
                   help="comma-separated registry names, e.g. lorax,finetune,replay,joint")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    p.add_argument("--out", default=None,
                   help="output folder (default: runs/compare-<scenario>)")
    p.add_argument("--timing-images", type=int, default=128,
                   help="evaluation images timed per final model (default: 128)")
    add_run_flags(p, exclude=_REPLACED)
    p.set_defaults(func=cmd_compare)


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; a clear error for anything else."""
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError as exc:
        raise ValueError(f"--seeds expects comma-separated integers, got {text!r}") from exc
    if not seeds:
        raise ValueError("--seeds needs at least one seed")
    return seeds


def cmd_compare(args: argparse.Namespace) -> int:
    """Under torchrun every process trains each run together; rank 0 writes and prints."""
    from lorax_cil.commands.train import (
        check_loggers,
        config_from_args,
        progress_display,
        run_device,
    )
    from lorax_cil.distributed import distributed_session, is_main
    from lorax_cil.training.compare import run_comparison

    cfg = config_from_args(args)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    seeds = parse_seeds(args.seeds)
    out = args.out or f"runs/compare-{cfg.data.scenario}"
    _check_out(out, cfg)
    with distributed_session(run_device(args)):
        if is_main():
            print(f"[compare] {len(strategies)} strategies x {len(seeds)} seeds -> {out}",
                  flush=True)
        result = run_comparison(cfg, strategies=strategies, seeds=seeds, out=out,
                                progress=_progress, timing_images=args.timing_images,
                                display=progress_display(args), loggers=check_loggers(args))
        if is_main():
            _print_result(result)
    return 0


def _check_out(out: str, cfg: Any) -> None:
    """--out: a writable folder outside the data (refused before any run starts)."""
    from lorax_cil.benchmarks.scenarios import resolve_scenario
    from lorax_cil.training.integrity import check_out_dir

    d = cfg.data
    scenario = resolve_scenario(d.scenario, data_path=d.data_path, tasks=d.tasks)
    check_out_dir(out, data_paths=[d.data_path, *(t.path for t in scenario.tasks)])


def _progress(msg: str) -> None:
    print(f"[compare] {msg}", flush=True)


def _print_result(result: Any) -> None:
    statuses = ", ".join(f"{r.strategy}/seed{r.seed}: {r.status}"
                         for r in result.rows.itertuples())
    print(f"\n{result.caption}\n")
    print(result.table_markdown)
    print(f"runs: {statuses}")
    for name, path in result.paths.items():
        print(f"{name}: {path}")
