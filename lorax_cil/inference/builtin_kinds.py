"""Registers the built-in model kinds with :func:`~lorax_cil.inference.loading.load`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from lorax_cil.inference.kinds import DetectorPredictor, RunPredictor
from lorax_cil.inference.loading import RUN_KIND, register_model_kind

__all__ = ["load_run", "load_detector_predictor"]


@register_model_kind(RUN_KIND)
def load_run(folder: Path, meta: Mapping[str, Any], *, device: str = "cpu") -> RunPredictor:
    """A LoRAX or baseline run checkpoint."""
    return RunPredictor.from_checkpoint(folder, meta, device=device)


@register_model_kind("lorax-cil/detector")
def load_detector_predictor(folder: Path, meta: Mapping[str, Any], *,
                            device: str = "cpu") -> DetectorPredictor:
    """A binary detector folder."""
    return DetectorPredictor.from_checkpoint(folder, meta, device=device)
