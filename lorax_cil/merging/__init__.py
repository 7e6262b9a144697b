"""Training-free merging of specialists: task vectors, averaging, Task Arithmetic, TIES, DARE, R2M.

Importing this package is cheap: the names below are loaded from their submodules (which import
torch) on first access.

    >>> from lorax_cil.merging import r2m, task_vectors_from_lorax_run  # doctest: +SKIP
"""

from __future__ import annotations

from lorax_cil.lazy import lazy_exports

_EXPORTS = {
    "TaskVector": "task_vectors",
    "task_vector_from_state_dicts": "task_vectors",
    "task_vector_from_lora_state_dict": "lora_vectors",
    "task_vectors_from_expandable": "lora_vectors",
    "task_vectors_from_lorax_run": "lora_vectors",
    "average_heads": "task_vectors",
    "apply_task_vector": "task_vectors",
    "GramCache": "gram",
    "real_projection": "gram",
    "MergeResult": "result",
    "merge": "result",
    "merge_method_names": "result",
    "get_merge_method": "result",
    "register_merge_method": "result",
    "save_merge_result": "result",
    "load_merge_result": "result",
    "weight_average": "methods",
    "task_arithmetic": "methods",
    "ties": "methods",
    "dare": "methods",
    "dare_drop": "methods",
    "ties_trim": "methods",
    "r2m": "r2m_merge",
    "Specialist": "detectors",
    "load_specialist": "detectors",
    "merge_specialists": "detectors",
    "build_merged_detector": "detectors",
    "merge_detector_folders": "detectors",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
