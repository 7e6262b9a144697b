"""Data side: folder scanning, named scenarios, transforms, Avalanche streams, synthetic data.

Names are resolved lazily, so ``import lorax_cil.benchmarks`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "scan_task_split": "folders",
    "scan_class_folders": "folders",
    "scan_genimage": "folders",
    "DataLayoutError": "folders",
    "ImageRecord": "folders",
    "CDDB_SCENARIOS": "scenarios",
    "Scenario": "scenarios",
    "TaskSource": "scenarios",
    "resolve_scenario": "scenarios",
    "scenario_names": "scenarios",
    "Sample": "datasets",
    "ImageSampleDataset": "datasets",
    "carve_calibration": "datasets",
    "TransformConfig": "transforms",
    "build_transform": "transforms",
    "CILBenchmark": "streams",
    "build_cil_benchmark": "streams",
    "verify_data": "verify",
    "synthesize": "synth",
    "SYNTH_SCENARIOS": "synth",
    "contact_sheet": "contact_sheet",
    "load_rgb": "images",
    "DataIssues": "images",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lorax_cil.benchmarks' has no attribute {name!r}")
    module = importlib.import_module(f"lorax_cil.benchmarks.{_EXPORTS[name]}")
    return getattr(module, name)
