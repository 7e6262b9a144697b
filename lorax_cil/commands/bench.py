"""`lorax-cil bench speed`: cost of T task adapters against one plain pass (docs/performance.md)."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks of the toolkit itself")
    which = p.add_subparsers(dest="bench", metavar="BENCHMARK")
    which.required = True
    s = which.add_parser("speed", help="inference / training cost and memory vs number of tasks")
    from lorax_cil.bench.speed import add_arguments

    add_arguments(s)
    s.set_defaults(func=cmd_speed)


def cmd_speed(args: argparse.Namespace) -> int:
    from lorax_cil.bench.speed import run

    return run(args, echo=lambda msg: print(msg, flush=True))
