"""The `lorax-cil` command: one entry point, subcommands registered by `lorax_cil.commands`.

Only argparse runs at import: `lorax-cil --help` never imports torch or avalanche.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from lorax_cil import __version__
from lorax_cil.errors import USER_ERROR_TYPES, is_user_error, one_line

__all__ = ["main", "build_parser"]

#: Modules under ``lorax_cil.commands`` that each define ``register(subparsers)``.
COMMAND_MODULES = (
    "data", "train", "demo", "detect", "merge", "compare", "predict", "bench", "backbones",
    "adapter",
)

#: exceptions reported as one line with exit status 2 (see :mod:`lorax_cil.errors`).
USER_ERRORS: tuple[type[BaseException], ...] = USER_ERROR_TYPES


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
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line")
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
    for stream in (sys.stdout, sys.stderr):
        # File names that are not UTF-8 print as \xNN escapes instead of stopping the output.
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # pragma: no cover - a stream that cannot change
                pass
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`lorax-cil backbones | head`): stop quietly, as Unix tools do.
        # Point stdout at devnull so the interpreter's final flush does not fail again.
        import os

        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # pragma: no cover - stdout without a file descriptor
            pass
        return 141
    except Exception as exc:  # noqa: BLE001 - every error ends as one line (traceback: --debug)
        if args.debug:
            raise
        if is_user_error(exc):
            print(f"lorax-cil {args.command}: error: {one_line(exc)}", file=sys.stderr)
            return 2
        print(f"lorax-cil {args.command}: internal error: {type(exc).__name__}: {one_line(exc)} "
              "(this is a defect of lorax-cil, not of your input: rerun with --debug for the "
              "traceback and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
