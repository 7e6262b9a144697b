"""Speed and memory of LoRAX at T tasks against one plain frozen pass (docs/performance.md).

    python benchmarks/speed.py --write-docs                # speed tables, plot, targets
    python benchmarks/speed.py --accuracy-only --write-docs  # AA / BWT trade-off on synth-long
    python benchmarks/speed.py --device cuda --amp --write-docs
    python benchmarks/speed.py --render-only --write-docs  # the page again from --out

The measuring code is :mod:`lorax_cil.bench.speed` (also ``lorax-cil bench speed``); this
script is what writes the documentation page, and only when asked: ``--write-docs`` writes
``<--docs>/performance.md`` (default: this repository's docs/), ``--page PATH`` any path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorax_cil.bench.speed import add_arguments, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/speed.py", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--write-docs", action="store_true",
                   help="write the page to <--docs>/performance.md (its plot to <--docs>/img/)")
    p.add_argument("--docs", default=None, metavar="DIR",
                   help=f"docs folder of --write-docs and --render-only (default: {ROOT / 'docs'})")
    args = p.parse_args(argv)
    if args.page is None and (args.write_docs or args.render_only):
        args.page = str(Path(args.docs or ROOT / "docs") / "performance.md")
    elif args.docs is not None and not args.write_docs:
        p.error("--docs is the folder of --write-docs / --render-only; add one of them")
    try:
        return run(args, echo=lambda msg: print(msg, flush=True))
    except (ValueError, FileNotFoundError) as exc:
        print(f"benchmarks/speed.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
