"""Safe checkpoints: safetensors for tensors, JSON for everything else, nothing pickled.

A checkpoint is a folder with ``tensors.safetensors`` and ``meta.json``. ``meta.json`` records
the format name and version, the SHA-256 of the tensor file and the SHA-256 of its own canonical
JSON (``meta_sha256``, mandatory: an edited threshold or configuration, or a metadata file with
the checksum removed, is refused too); it is written last, atomically, so it acts as the
commit marker: an interrupted save leaves the previous checkpoint intact and a half-written one
is detected (missing or mismatching checksum) with a clear message.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

from lorax_cil.utils import atomic_write_bytes, sha256_file, write_json

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint_meta",
    "latest_checkpoint",
    "read_latest_pointer",
]

CHECKPOINT_FORMAT = "lorax-cil-checkpoint"
CHECKPOINT_VERSION = 1
TENSORS = "tensors.safetensors"
_CHECKPOINT_NAME = re.compile(r"exp_\d{3,6}")  # checkpoint folders of a run: checkpoints/exp_NNN
META = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, tampered with, or from a newer format version."""


def save_checkpoint(
    folder: str | os.PathLike, tensors: Mapping[str, Any], meta: Mapping[str, Any]
) -> Path:
    """Write ``tensors`` (name -> torch.Tensor) and JSON-serialisable ``meta`` to ``folder``.

    Temporary files left in ``folder`` by an earlier save that was killed are removed first.
    """
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob(f".{TENSORS}.*.tmp"), *folder.glob(f".{META}.*.tmp")]:
        stale.unlink(missing_ok=True)  # left by a save that was killed
    payload = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(folder / TENSORS, save(payload))
    record = dict(meta)
    record.update(
        format=CHECKPOINT_FORMAT,
        format_version=CHECKPOINT_VERSION,
        tensors_sha256=sha256_file(folder / TENSORS),
        num_tensors=len(payload),
    )
    record["meta_sha256"] = _meta_digest(record)
    write_json(folder / META, record)
    return folder


def _meta_digest(record: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``record`` without its ``meta_sha256`` key."""
    body = json.loads(json.dumps({k: v for k, v in record.items() if k != "meta_sha256"},
                                 default=str))
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_checkpoint_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``meta.json`` (format name and version) without loading tensors."""
    folder = Path(folder)
    meta_path = folder / META
    if not meta_path.is_file():
        raise CheckpointError(f"not a checkpoint (no {META}): {folder}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"corrupt checkpoint metadata {meta_path}: "
                              f"{exc if not isinstance(exc, RecursionError) else 'nested too deeply'}") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{meta_path} is not a {CHECKPOINT_FORMAT} file")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{meta_path} has format version {version!r}; this lorax-cil reads versions up to "
            f"{CHECKPOINT_VERSION}: upgrade lorax-cil"
        )
    if "meta_sha256" not in meta:
        raise CheckpointError(
            f"{meta_path} has no meta_sha256 checksum, so edits to it (task names, threshold, "
            "configuration) could not be detected; refused. Use the checkpoint as it was saved"
        )
    if meta["meta_sha256"] != _meta_digest(meta):
        raise CheckpointError(
            f"checksum mismatch for {meta_path}: the metadata was modified after saving"
        )
    return meta


def load_checkpoint(folder: str | os.PathLike, *, device: str = "cpu") -> tuple[dict, dict]:
    """Load ``(tensors, meta)`` after checking the format version and the tensor checksum."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_checkpoint_meta(folder)
    tpath = folder / TENSORS
    if not tpath.is_file():
        raise CheckpointError(f"checkpoint {folder} is missing {TENSORS}")
    digest = sha256_file(tpath)
    if digest != meta.get("tensors_sha256"):
        raise CheckpointError(
            f"checksum mismatch for {tpath}: the file is truncated or was modified after saving "
            "(or its save was interrupted)"
        )
    try:
        tensors = load_file(str(tpath), device=device)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {tpath}: {exc}") from exc
    return tensors, meta


def read_latest_pointer(checkpoints: Path) -> Path | None:
    """The folder named by ``checkpoints/latest.json``, or ``None`` when there is no pointer.

    Raises:
        CheckpointError: the pointer is malformed, names anything but an ``exp_NNN`` folder of
            this run, or names a checkpoint whose ``meta.json`` is missing.
    """
    pointer = checkpoints / "latest.json"
    if not pointer.is_file():
        return None
    try:
        data = json.loads(pointer.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt {pointer}: {exc}; delete it to use the newest complete "
                              "checkpoint folder") from None
    name = data.get("folder") if isinstance(data, dict) else None
    if not isinstance(name, str) or not _CHECKPOINT_NAME.fullmatch(name):
        raise CheckpointError(f"{pointer} must name a checkpoint folder exp_NNN of this run, got "
                              f"{name!r}; delete it to use the newest complete checkpoint folder")
    folder = checkpoints / name
    if folder.is_symlink() or not folder.resolve().is_relative_to(checkpoints.resolve()):
        raise CheckpointError(f"{pointer} names {name}, which leads outside {checkpoints}; "
                              "refused")
    if not (folder / "meta.json").is_file():
        raise CheckpointError(
            f"the latest checkpoint {folder} (named by {pointer}) has no meta.json: it was "
            "removed or damaged after it was written. Pass an earlier checkpoint folder "
            "explicitly, or delete latest.json to use the newest complete one")
    return folder


def latest_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The newest complete checkpoint folder of a run directory (``checkpoints/latest.json``,
    else the last ``checkpoints/exp_*`` holding a ``meta.json``)."""
    ck = Path(run_dir) / "checkpoints"
    folder = read_latest_pointer(ck)  # refuses a malformed pointer or one leading elsewhere
    if folder is not None:
        return folder
    found = sorted(p for p in ck.glob("exp_*") if (p / "meta.json").is_file()) if ck.is_dir() else []
    if not found:
        raise CheckpointError(f"no checkpoint in {ck}: nothing to resume")
    return found[-1]
