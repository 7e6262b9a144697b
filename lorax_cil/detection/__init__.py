"""Transferable binary real/fake detectors (MoLE, LoRA, linear probe) and their protocol.

- :mod:`lorax_cil.detection.model`: :class:`Detector`, :func:`save_detector`,
  :func:`load_detector`.
- :mod:`lorax_cil.detection.train`: :func:`train_detector` and its typed configuration.
- :mod:`lorax_cil.detection.protocol`: cross-generator evaluation (UnivFD / CNNDetection,
  GenImage and CDDB layouts), threshold calibration and robustness sweeps.

Importing this package is cheap; the names below are loaded (with torch) on first use.
"""

from __future__ import annotations

from lorax_cil.lazy import lazy_exports

__all__ = [
    "AdapterConfig",
    "BackboneRecipe",
    "DetectConfig",
    "Detector",
    "choose_threshold",
    "detection_metrics",
    "evaluate_detector",
    "load_detector",
    "save_detector",
    "train_detector",
]

_WHERE = {
    "AdapterConfig": "model",
    "BackboneRecipe": "model",
    "Detector": "model",
    "load_detector": "model",
    "save_detector": "model",
    "DetectConfig": "train",
    "train_detector": "train",
    "choose_threshold": "protocol",
    "detection_metrics": "protocol",
    "evaluate_detector": "protocol",
}


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())
