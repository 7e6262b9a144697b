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


# --- detector files ---------------------------------------------------------------------------
@pytest.fixture
def detector_folder(tmp_path):
    from lorax_cil.detection.model import AdapterConfig, BackboneRecipe, Detector, save_detector

    det = Detector.from_recipe(BackboneRecipe(name="vit-test", seed=0), AdapterConfig(kind="lora"))
    return save_detector(det, tmp_path / "det")


def test_detector_files_are_safetensors_and_json_with_version_and_checksums(detector_folder):
    from safetensors import safe_open

    from lorax_cil.detection.model import DETECTOR_KIND, DETECTOR_VERSION, load_detector
    from lorax_cil.utils import sha256_file

    assert sorted(p.name for p in detector_folder.iterdir()) == ["meta.json", "tensors.safetensors"]
    meta = json.loads((detector_folder / "meta.json").read_text())
    assert meta["format"] == "lorax-cil-checkpoint" and meta["format_version"] == CHECKPOINT_VERSION
    assert meta["kind"] == DETECTOR_KIND and meta["detector_version"] == DETECTOR_VERSION
    assert meta["tensors_sha256"] == sha256_file(detector_folder / "tensors.safetensors")
    assert len(meta["meta_sha256"]) == 64 and len(meta["backbone"]["fingerprint_sha256"]) == 64
    with safe_open(str(detector_folder / "tensors.safetensors"), framework="pt") as fh:
        assert "head.weight" in set(fh.keys()) and len(fh.keys()) == meta["num_tensors"]
    load_detector(detector_folder)


@pytest.mark.parametrize("damage, message", [
    ("flip", "checksum mismatch"),
    ("truncate", "truncated or was modified"),
    ("threshold", "metadata was modified"),
    ("detector_version", "newer than this lorax-cil reads"),
    ("format_version", "upgrade lorax-cil"),
    ("kind", "not a detector"),
])
def test_damaged_detector_files_are_refused(detector_folder, damage, message):
    from lorax_cil.detection.model import load_detector

    tensors, meta_path = detector_folder / "tensors.safetensors", detector_folder / "meta.json"
    meta = json.loads(meta_path.read_text())
    data = tensors.read_bytes()
    if damage == "flip":
        tensors.write_bytes(data[:-1] + bytes([data[-1] ^ 0x01]))
    elif damage == "truncate":
        tensors.write_bytes(data[: len(data) // 3])
    elif damage == "threshold":
        meta["threshold"] = 0.01  # hand-edited: refused by the metadata checksum
    elif damage == "kind":
        meta["kind"] = "lorax-cil/other"
    else:
        meta[damage] += 1
    if damage not in ("flip", "truncate"):
        if damage in ("detector_version", "kind"):
            from lorax_cil.training.checkpoint import _meta_digest

            meta["meta_sha256"] = _meta_digest(meta)  # resealed: reach the checks behind it
        meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message):
        load_detector(detector_folder)


def test_detector_with_a_different_backbone_is_refused(detector_folder):
    from lorax_cil.detection.model import load_detector
    from lorax_cil.models.backbones import create_backbone

    torch.manual_seed(123)
    with pytest.raises(CheckpointError, match="fingerprint mismatch"):
        load_detector(detector_folder, backbone=create_backbone("vit-test", pretrained=False))


# --- kill during save -------------------------------------------------------------------------
KILL_CHILD = r"""
import os, sys, time
import torch
import lorax_cil.training.checkpoint as ck
import lorax_cil.utils as utils

folder, stage = sys.argv[1], sys.argv[2]

def pause(what):
    print(what, flush=True)
    time.sleep(600)  # the parent kills us here

if stage == "tensors-written":      # new tensor file in its temporary name, not yet renamed
    real_replace = os.replace
    utils.os.replace = lambda a, b: (pause("paused"), real_replace(a, b))
elif stage == "before-metadata":    # new tensors in place, old meta.json still there
    ck.write_json = lambda *a, **k: pause("paused")
big = {f"w{i}": torch.full((1024, 1024), float(i)) for i in range(48)}  # 192 MiB
print("saving", flush=True)
ck.save_checkpoint(folder, big, {"completed_tasks": 2})
print("done", flush=True)
"""


def _old_or_refused(folder, old):
    """After a killed save: the old checkpoint loads intact, the new one loads complete, or
    the folder is refused with a clear message. Never a silent mixture."""
    try:
        tensors, meta = load_checkpoint(folder)
    except CheckpointError as exc:
        assert "checksum mismatch" in str(exc) and "interrupted" in str(exc)
        return "refused"
    if meta["completed_tasks"] == 1:
        assert set(tensors) == set(old) and all(torch.equal(tensors[k], v) for k, v in old.items())
        return "old"
    assert meta["completed_tasks"] == 2 and len(tensors) == 48
    assert all(torch.equal(tensors[f"w{i}"], torch.full((1024, 1024), float(i))) for i in (0, 47))
    return "new"


@pytest.mark.parametrize("stage", ["tensors-written", "before-metadata", "timed"])
def test_sigkill_during_save_never_gives_a_silent_corrupt_load(tmp_path, stage):
    import os
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "ck"
    old = {"a.weight": torch.randn(3, 4), "b": torch.arange(5)}
    save_checkpoint(folder, old, {"completed_tasks": 1})
    script = tmp_path / "child.py"
    script.write_text(KILL_CHILD)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, str(script), str(folder), stage],
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "saving"
        if stage == "timed":
            # Kill as soon as the temporary tensor file appears: mid-write of 192 MiB.
            deadline = time.monotonic() + 60
            while not list(folder.glob(".tensors.safetensors.*.tmp")) and child.poll() is None:
                assert time.monotonic() < deadline, "the child never started writing"
                time.sleep(0.001)
        else:
            assert child.stdout.readline().strip() == "paused"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=60)
    outcome = _old_or_refused(folder, old)
    expected = {"tensors-written": {"old"}, "before-metadata": {"refused"},
                "timed": {"old", "new", "refused"}}[stage]
    assert outcome in expected, outcome
    save_checkpoint(folder, old, {"completed_tasks": 1})  # the next save cleans up
    assert not list(folder.glob(".*.tmp")) and _old_or_refused(folder, old) == "old"
