"""``load(path)``: any saved model folder -> a :class:`~lorax_cil.inference.predictor.Predictor`.

Dispatch is on the ``kind`` recorded in the checkpoint's ``meta.json`` (after its format name and
version are checked; tensors are checksum-verified by the loader):

- `lorax-cil/run`: a run directory (its latest checkpoint) or one `checkpoints/exp_NNN`
  folder; run checkpoints carry no `kind` and are recognised by their `scenario` and
  `architecture` keys.
- `lorax-cil/detector`: a detector folder written by `lorax-cil detect train`.
- `lorax-cil/merge-result` (a saved merge: task vector and head, no backbone) is refused with a
  message saying so.

A new model kind plugs in by registering a loader, ``fn(folder, meta, *, device) -> Predictor``,
for the ``kind`` its ``meta.json`` records::

    from lorax_cil.inference import register_model_kind

    @register_model_kind("my-org/my-model")
    def load_mine(folder, meta, *, device="cpu"):
        ...

and, so that ``load`` finds it without the caller importing it first, by adding the module to
:data:`BUILTIN_KIND_MODULES`. Merged detectors (``lorax-cil merge``) are written in the detector
format (``kind`` ``lorax-cil/detector``, adapter ``merged``) and need nothing at all.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["RUN_KIND", "BUILTIN_KIND_MODULES", "register_model_kind", "model_kind_names",
           "model_kind_of", "resolve_model_folder", "load"]

#: the kind of class-incremental run checkpoints (LoRAX and baselines).
RUN_KIND = "lorax-cil/run"

#: modules imported before dispatch; each registers its kinds at import time.
BUILTIN_KIND_MODULES: tuple[str, ...] = ("lorax_cil.inference.builtin_kinds",)

_LOADERS: dict[str, Callable[..., Any]] = {}

#: kinds that are model files but not predictors, with what to do instead.
_NOT_PREDICTORS = {
    "lorax-cil/merge-result": "it is a merged task vector (deltas + head) without a backbone; "
                              "predict with the merged detector built from it",
}


def register_model_kind(kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``fn(folder, meta, *, device) -> Predictor`` loads folders of ``kind``."""
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if kind in _LOADERS and _LOADERS[kind] is not fn:
            raise ValueError(f"model kind {kind!r} is already registered")
        _LOADERS[kind] = fn
        return fn
    return deco


def _load_builtins() -> None:
    for module in BUILTIN_KIND_MODULES:
        importlib.import_module(module)


def model_kind_names() -> list[str]:
    """Every model kind :func:`load` understands."""
    _load_builtins()
    return sorted(_LOADERS)


def resolve_model_folder(path: str | os.PathLike) -> Path:
    """The checkpoint folder behind ``path``: itself when it holds ``meta.json``, else the
    latest checkpoint of a run directory.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is neither a model folder nor a run directory.
    """
    from lorax_cil.training.checkpoint import latest_checkpoint

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such model: {p}")
    if (p / "meta.json").is_file():
        return p
    if (p / "checkpoints").is_dir():
        return latest_checkpoint(p)
    raise ValueError(f"{p} is not a model: expected a run directory (with checkpoints/) or a "
                     "model folder (with meta.json and tensors.safetensors)")


def model_kind_of(meta: Mapping[str, Any]) -> str | None:
    """The ``kind`` of a checkpoint's metadata (run checkpoints are recognised by their keys)."""
    kind = meta.get("kind")
    if kind is None and any(k in meta for k in ("scenario", "architecture", "completed_tasks")):
        return RUN_KIND  # a run checkpoint (its loader names the keys it lacks, if any)
    return kind


def load(path: str | os.PathLike, *, device: str = "auto") -> Any:
    """Load a trained model for prediction.

    Args:
        path: a run directory, one of its checkpoint folders, or a detector folder.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        A :class:`~lorax_cil.inference.predictor.Predictor`; call ``predict(images)``.

    Raises:
        lorax_cil.training.checkpoint.CheckpointError: a truncated or tampered tensor file, a
            corrupt ``meta.json``, or a file from a newer format version.
        ValueError: not a model folder, or a kind no loader is registered for.
    """
    from lorax_cil.training.checkpoint import read_checkpoint_meta
    from lorax_cil.training.runner import resolve_device

    folder = resolve_model_folder(path)
    meta = read_checkpoint_meta(folder)
    kind = model_kind_of(meta)
    _load_builtins()
    if kind in _NOT_PREDICTORS:
        raise ValueError(f"{folder} cannot predict: {_NOT_PREDICTORS[kind]}")
    if kind not in _LOADERS:
        raise ValueError(f"{folder} holds a model of kind {kind!r}, which no loader handles; "
                         f"known kinds: {sorted(_LOADERS)}")
    dev = str(resolve_device(device))
    return _LOADERS[kind](folder, meta, device=dev)
