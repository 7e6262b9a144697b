"""Using a trained model: load any saved model folder and attribute images.

- :func:`load` (also ``lorax_cil.load``): a run directory, checkpoint or detector folder ->
  a :class:`~lorax_cil.inference.predictor.Predictor` with ``predict(images)``.
- :mod:`lorax_cil.inference.predictor`: the result rows, batching and error handling.
- :mod:`lorax_cil.inference.kinds`: runs (LoRAX, baselines) and binary detectors, and their
  fake scores.
- :mod:`lorax_cil.inference.loading`: dispatch on the model's ``kind``; new kinds plug in with
  :func:`register_model_kind`.
- :mod:`lorax_cil.inference.inputs`: files, folders and glob patterns as a stream of paths.
- :mod:`lorax_cil.inference.writers`: CSV / JSON / JSON Lines output.

Importing this package is cheap; the names below are loaded (with torch where needed) on use.
"""

from __future__ import annotations

from lorax_cil.lazy import lazy_exports

_EXPORTS = {
    "load": "loading",
    "register_model_kind": "loading",
    "model_kind_names": "loading",
    "Predictor": "predictor",
    "ModelIdentity": "predictor",
    "RunPredictor": "kinds",
    "DetectorPredictor": "kinds",
    "InputItem": "inputs",
    "iter_input_paths": "inputs",
    "RowWriter": "writers",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
