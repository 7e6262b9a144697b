"""Safe loading of local weight files into backbones.

Only two formats are read: safetensors files and PyTorch ``.pth`` / ``.pt`` / ``.bin`` files that
``torch.load(weights_only=True)`` accepts (tensors, plain containers, numbers, strings). Nothing is
ever fully unpickled: a file that needs arbitrary Python objects is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

__all__ = [
    "SAFETENSORS_SUFFIXES",
    "TORCH_SUFFIXES",
    "check_weights_path",
    "file_sha256",
    "load_state_dict_file",
    "load_weights_into",
    "strip_prefixes",
]

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
# Common wrappers of a state dict inside a training checkpoint, tried in this order.
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict", "net")
_MAX_LISTED = 8


def check_weights_path(path: str | os.PathLike) -> Path:
    """Return ``path`` as a :class:`Path`, raising ``FileNotFoundError`` if it is not a file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {str(p)!r}")
    return p


def file_sha256(path: str | os.PathLike, *, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 digest of a file (read in chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a loaded checkpoint object."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {str(k): v for k, v in obj.items()}
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner:
                return _unwrap(inner, path)
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            skipped = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
            logger.info("%s: ignoring non-tensor entries %s", path, skipped[:_MAX_LISTED])
            return tensors
    raise ValueError(
        f"{str(path)!r} does not hold a state dict (a mapping of names to tensors, optionally "
        f"under one of the keys {list(_WRAPPER_KEYS)}); got {type(obj).__name__}"
    )


def _strip_ddp(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _loader_reason(exc: Exception) -> str:
    """The informative line of a torch.load failure (e.g. "Unsupported global: GLOBAL exec")."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in lines:
        if "WeightsUnpickler error" in line or "Unsupported global" in line:
            return line.split(". Please use")[0]
    return lines[0] if lines else type(exc).__name__


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict from a local file without unpickling arbitrary objects.

    ``.safetensors`` files are read with safetensors; ``.pth``, ``.pt`` and ``.bin`` files with
    ``torch.load(weights_only=True)`` only. A checkpoint that wraps its state dict under a key such
    as ``"state_dict"`` or ``"model"`` is unwrapped, and a DDP ``module.`` prefix is removed.

    Args:
        path: the weights file.

    Returns:
        A new dict mapping parameter / buffer names to CPU tensors.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the suffix is not supported, or the file cannot be loaded safely.
    """
    p = check_weights_path(path)
    suffix = p.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        try:
            return _strip_ddp(dict(load_file(str(p), device="cpu")))
        except Exception as exc:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"cannot read safetensors file {str(p)!r}: {exc}") from exc
    if suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError (TorchScript)
            raise ValueError(
                f"refusing to load {str(p)!r}: torch.load(weights_only=True) rejected it, so it "
                "holds pickled Python objects (or is a TorchScript archive such as OpenAI's "
                "original CLIP .pt). lorax-cil never unpickles arbitrary objects. Re-save the "
                "weights as a plain state dict (torch.save(model.state_dict(), ...)) or as "
                f"safetensors. Loader said: {_loader_reason(exc)}"
            ) from exc
        return _strip_ddp(_unwrap(obj, p))
    raise ValueError(
        f"unsupported weights file {str(p)!r}: expected one of "
        f"{list(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}"
    )


def strip_prefixes(
    state: Mapping[str, torch.Tensor], prefixes: Iterable[str]
) -> dict[str, torch.Tensor]:
    """A copy of ``state`` without the keys that start with any of ``prefixes``."""
    prefixes = tuple(prefixes)
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}


def load_weights_into(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str,
    ignore_missing: Iterable[str] = (),
) -> None:
    """Load ``state`` into ``model``, raising a clear error when the keys do not match.

    Args:
        model: module to load into.
        state: state dict to load.
        source: what the state dict came from (named in errors).
        ignore_missing: key prefixes of the model that may be absent from ``state``.

    Raises:
        ValueError: keys missing from ``state``, unexpected keys or mismatched shapes.
    """
    own = model.state_dict()
    ignore = tuple(ignore_missing)
    missing = sorted(k for k in own if k not in state and not k.startswith(ignore))
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        parts = [f"weights from {source} do not match {type(model).__name__}"]
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[:_MAX_LISTED]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:_MAX_LISTED]}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches, e.g. {shapes[:_MAX_LISTED]}")
        raise ValueError("; ".join(parts))
    model.load_state_dict(dict(state), strict=False)
