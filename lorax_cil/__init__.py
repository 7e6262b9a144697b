"""lorax-cil: continual synthetic-image attribution.

Importing the package is cheap: torch, timm, open_clip, peft and avalanche are imported only
inside the functions and submodules that need them.

``lorax_cil.load(path)`` (a lazy attribute: :func:`lorax_cil.inference.loading.load`) loads a
trained run or detector for prediction::

    import lorax_cil
    predictor = lorax_cil.load("runs/lorax-synth")
    rows = predictor.predict(["a.png", "b.jpg"])    # or as_frame=True for a DataFrame
"""

from __future__ import annotations

from lorax_cil.lazy import lazy_exports

__version__ = "0.1.0"

__all__ = ["__version__", "load"]

__getattr__, __dir__ = lazy_exports(__name__, {"load": "inference.loading"}, globals())
