"""Safe checkpoints: checksum, format version, truncation, and no unpickling anywhere."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lorax_cil.training.checkpoint import (
    CHECKPOINT_VERSION,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ckpt(tmp_path):
    tensors = {"a.weight": torch.randn(3, 4), "b": torch.arange(5)}
    return save_checkpoint(tmp_path / "ck", tensors, {"completed_tasks": 2}), tensors


def test_round_trip(ckpt):
    folder, tensors = ckpt
    loaded, meta = load_checkpoint(folder)
    assert meta["completed_tasks"] == 2 and meta["format_version"] == CHECKPOINT_VERSION
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_tampered_tensor_file_is_refused(ckpt):
    folder, _ = ckpt
    data = bytearray((folder / "tensors.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "tensors.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(folder)


def test_truncated_tensor_file_is_refused(ckpt):
    folder, _ = ckpt
    data = (folder / "tensors.safetensors").read_bytes()
    (folder / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or was modified"):
        load_checkpoint(folder)


def test_newer_format_version_is_refused(ckpt):
    folder, _ = ckpt
    meta = json.loads((folder / "meta.json").read_text())
    meta["format_version"] = CHECKPOINT_VERSION + 1
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="upgrade lorax-cil"):
        load_checkpoint(folder)


def test_missing_or_foreign_metadata_is_refused(tmp_path, ckpt):
    folder, _ = ckpt
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path)
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt checkpoint metadata"):
        load_checkpoint(folder)
    (folder / "meta.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="is not a lorax-cil-checkpoint"):
        load_checkpoint(folder)


def test_interrupted_save_keeps_the_previous_checkpoint(ckpt, monkeypatch):
    folder, tensors = ckpt
    import lorax_cil.training.checkpoint as ck

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(ck, "write_json", boom)  # dies after the tensors, before the metadata
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(folder, {"a.weight": torch.zeros(3, 4)}, {"completed_tasks": 3})
    monkeypatch.undo()
    # The half-written save is detected: the old metadata no longer matches the new tensors.
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(folder)
    assert not list(folder.glob("*.tmp"))


UNPICKLING = [
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\bdill\.loads?\("), "dill.load"),
    (re.compile(r"\bmaybe_load_checkpoint\("), "avalanche's pickling checkpoints"),
]


def _torch_load_without_weights_only(text: str) -> list[int]:
    """Lines of ``torch.load(`` calls whose argument list lacks ``weights_only=True``."""
    bad = []
    for m in re.finditer(r"torch\.load\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        if not re.search(r"weights_only\s*=\s*True", text[m.end():i]):
            bad.append(text.count("\n", 0, m.start()) + 1)
    return bad


def test_no_code_path_unpickles_model_files():
    offenders = []
    for path in sorted((ROOT / "lorax_cil").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT)
        offenders += [f"{rel}:{n}: torch.load without weights_only=True"
                      for n in _torch_load_without_weights_only(text)]
        for pattern, what in UNPICKLING:
            for m in pattern.finditer(text):
                offenders.append(f"{rel}:{text.count(chr(10), 0, m.start()) + 1}: {what}")
    assert not offenders, "\n".join(offenders)


def test_the_scan_itself_catches_unsafe_calls():
    assert _torch_load_without_weights_only("x = torch.load(str(p), map_location='cpu')") == [1]
    assert _torch_load_without_weights_only("torch.load(f(p), weights_only=True)") == []
