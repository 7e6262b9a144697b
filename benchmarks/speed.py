"""Speed and memory of LoRAX at T tasks against one plain frozen pass (docs/performance.md).

    python benchmarks/speed.py --write-docs                # speed tables, plot, targets
    python benchmarks/speed.py --accuracy-only --write-docs  # AA / BWT trade-off on synth-long
    python benchmarks/speed.py --device cuda --amp --write-docs

The same as ``lorax-cil bench speed``; see :mod:`lorax_cil.evaluation.speed`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorax_cil.evaluation.speed import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(echo=lambda msg: print(msg, flush=True)))
