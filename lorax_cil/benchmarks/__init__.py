"""Data side: folder scanning, named scenarios, transforms, Avalanche streams, synthetic data.

Names are resolved lazily, so ``import lorax_cil.benchmarks`` stays cheap.
"""

from __future__ import annotations

from lorax_cil.lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
