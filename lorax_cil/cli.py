"""The `lorax-cil` command: one entry point, subcommands registered by `lorax_cil.commands`.

Only argparse runs at import: `lorax-cil --help` never imports torch or avalanche.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from lorax_cil import __version__

__all__ = ["main", "build_parser"]

#: Modules under ``lorax_cil.commands`` that each define ``register(subparsers)``.
COMMAND_MODULES = ("data", "train", "demo", "detect", "merge", "compare", "predict", "bench")

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (subcommands included)."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="lorax-cil",
        description="Continual synthetic-image attribution: LoRAX, CIL baselines, MoLE, R2M.",
    )
    parser.add_argument("--version", action="version", version=f"lorax-cil {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"lorax_cil.commands.{name}").register(sub)
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose < 2:
        # Third-party chatter (PIL plugin probing, matplotlib font cache) stays quiet.
        for noisy in ("PIL", "matplotlib", "urllib3", "fsspec"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"lorax-cil {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
