"""Small shared helpers: seeding, devices, atomic file writes, hashing, flat dictionaries."""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Mapping

__all__ = ["seed_everything", "resolve_device", "resolve_amp", "atomic_write_bytes",
           "atomic_write_text", "write_json", "sha256_file", "strict_from_dict", "flatten_dict"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and (when installed) torch from one integer."""
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover - numpy is a hard dependency
        pass
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass


def resolve_device(name: str) -> Any:
    """A ``torch.device``: ``auto`` picks CUDA when available; ``cuda`` without a GPU is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import re

    if not isinstance(name, str) or not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        raise ValueError(f"unknown device {name!r} (--device / train.device): use auto, cpu, "
                         "cuda, cuda:N or mps")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but no CUDA device is available")
    return dev


def resolve_amp(amp: Any, device: Any) -> bool:
    """Whether to run bfloat16 autocast: only on CUDA; ``auto`` when the GPU supports bf16,
    else the flag (``true``/``false``, ``1``/``0``, ``yes``/``no`` or a bool)."""
    import torch

    text = str(amp).strip().lower()
    if text not in ("auto", "true", "1", "yes", "false", "0", "no"):
        raise ValueError(f"amp must be auto, true or false, got {amp!r}")
    if torch.device(device).type != "cuda" or text in ("false", "0", "no"):
        return False
    return torch.cuda.is_bf16_supported() if text == "auto" else True


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    An interrupted write never leaves a truncated file at ``path``: readers see either the old
    content or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            # name the file that could not be written (a full disk: ENOSPC); the previous
            # content of ``path`` is untouched
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write UTF-8 text (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented, key-sorted JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def flatten_dict(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys (``{"train": {"lr": 1}}`` gives
    ``{"train.lr": 1}``), in order of appearance; tuples become lists, so that a value read
    back from YAML or JSON compares equal to the one written."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_dict(value, f"{name}."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def strict_from_dict(cls: Any, d: Any, *, ignore: tuple[str, ...] = (), **convert: Any) -> Any:
    """``cls(**d)`` for a dataclass ``cls`` that refuses unknown keys.

    Args:
        ignore: keys that records carry but the constructor does not take (derived values).
        convert: ``key=function`` applied to that key's value when present (JSON lists back
            to tuples, nested records to their dataclass).

    Raises:
        ValueError: ``"<Class>: unknown keys [...]; valid: [...]"``.
    """
    valid = sorted(cls.__dataclass_fields__)
    d = {k: v for k, v in dict(d).items() if k not in ignore}
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; valid: {valid}")
    for key, fn in convert.items():
        if key in d:
            d[key] = fn(d[key])
    return cls(**d)
