"""Bad input, interruption and tampering: one test per attack of docs/reliability.md.

Every refusal must be one line ``lorax-cil <command>: error: ...`` naming the file, flag or key,
exit status 2, and nothing written or overwritten. Runs are tiny (vit-test, 32 px, 3 images per
class) and trained in-process; the data are written by the tests.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import make_cddb_tree, write_image
from lorax_cil.cli import main

TRAIN = ["--scenario", "custom", "--tasks", "a", "b", "--backbone", "vit-test", "--no-pretrained",
         "--epochs", "1", "--batch-size", "4", "--memory-size", "4", "--crop", "32",
         "--set", "train.warmup_epochs=0", "--set", "model.lora_r=2",
         "--set", "train.min_steps_per_task=0", "--set", "train.eval_batch_size=16",
         "--device", "cpu"]


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run the command line in-process; return (status, stdout, stderr)."""
    capsys.readouterr()
    rc = main(["-q", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def refused(capsys, *args, needle: str | tuple[str, ...] = ()) -> str:
    """Assert the command is refused with one line and exit status 2; return that line."""
    rc, _, err = cli(capsys, *args)
    lines = [ln for ln in err.splitlines() if ln.startswith("lorax-cil ")]
    assert rc == 2, err
    assert "Traceback" not in err and len(lines) == 1 and ": error: " in lines[0], err
    for n in (needle,) if isinstance(needle, str) else needle:
        assert n in lines[0], lines[0]
    return lines[0]


def train(capsys, data: Path, out: Path, *extra) -> str:
    rc, stdout, err = cli(capsys, "train", "--data-path", data, *TRAIN, "--out", out, *extra)
    assert rc == 0, err
    return stdout


def png_bomb(path: Path, side: int = 20000) -> Path:
    """A small PNG whose header announces ``side`` x ``side`` pixels (a decompression bomb)."""
    write_image(path, size=(8, 8))
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", side, side)
    crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


def truncated_png(path: Path, seed: int) -> Path:
    """A PNG whose header reads but whose pixels do not decode (substituted at load time)."""
    write_image(path, size=(32, 32), seed=seed)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


NON_UTF8 = os.fsdecode(b"caf\xe9.png")  # a Latin-1 file name, not valid UTF-8


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return make_cddb_tree(tmp_path_factory.mktemp("clean"), tasks=("a", "b"), n=3, size=(32, 32),
                          subclass_tasks=())


@pytest.fixture(scope="module")
def dirty(tmp_path_factory) -> Path:
    """Task a's real training images plus every kind of bad entry the attacks used."""
    root = make_cddb_tree(tmp_path_factory.mktemp("dirty"), tasks=("a", "b"), n=3, size=(32, 32),
                          subclass_tasks=())
    real = root / "a" / "train" / "0_real"
    png_bomb(real / "bomb.png")
    os.symlink("loop.png", real / "loop.png")
    os.symlink("missing-target.png", real / "dangling.png")
    os.mkfifo(real / "fifo.png")
    write_image(real / NON_UTF8, size=(32, 32), seed=77)
    truncated_png(real / "truncated.png", seed=78)
    truncated_png(root / "a" / "val" / "1_fake" / "truncated.png", seed=79)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, clean):
    """A finished run, a partial one (``--stop-after 1``) and a run on the dirty data."""
    base = tmp_path_factory.mktemp("runs")
    out = {"full": base / "full", "partial": base / "partial"}
    assert main(["-q", "train", "--data-path", str(clean), *TRAIN, "--out", str(out["full"])]) == 0
    assert main(["-q", "train", "--data-path", str(clean), *TRAIN, "--out", str(out["partial"]),
                 "--stop-after", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def dirty_run(tmp_path_factory, dirty):
    out = tmp_path_factory.mktemp("dirtyrun") / "run"
    assert main(["-q", "train", "--data-path", str(dirty), *TRAIN, "--out", str(out)]) == 0
    return out


def copy_run(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


# --- data ------------------------------------------------------------------------------------
def test_01_decompression_bomb_is_skipped_by_name(capsys, dirty, dirty_run):
    rc, out, _ = cli(capsys, "data", "verify", "--data-path", dirty, "--manifest",
                     dirty.parent / "m.json")
    assert rc == 0 and "bomb.png" in out and "decompression bomb" in out
    issues = json.loads((dirty_run / "data_manifest.json").read_text())["data_issues"]
    assert any(p.endswith("bomb.png") for p in issues["unreadable_files"])
    rc, out, _ = cli(capsys, "eval", "--run", dirty_run, "--data-path", dirty)
    assert rc == 0 and "mean multi-real accuracy" in out


def test_02_symlink_loops_dangling_links_and_fifos_are_counted_and_named(capsys, dirty, dirty_run):
    rc, out, _ = cli(capsys, "data", "verify", "--data-path", dirty, "--manifest",
                     dirty.parent / "m.json")
    assert rc == 0
    for name in ("loop.png", "dangling.png", "fifo.png"):
        assert name in out
    manifest = json.loads((dirty.parent / "m.json").read_text())
    # 3 good images + bomb, loop, dangling, fifo, non-UTF-8 name, truncated: all counted
    assert manifest["tasks"]["a"]["train"]["real"] == 9
    issues = json.loads((dirty_run / "data_manifest.json").read_text())["data_issues"]
    named = " ".join(issues["unreadable_files"])
    assert all(n in named for n in ("loop.png", "dangling.png", "fifo.png"))


def test_03_permission_denied_file_and_folder(capsys, clean, monkeypatch):
    # The tests may run as root, for whom chmod 000 blocks nothing: the refusals of the
    # operating system are simulated where lorax-cil meets them (open and scandir).
    secret = clean / "a" / "train" / "0_real" / "000.png"
    locked = clean / "b" / "train" / "1_fake"
    real_open, real_scandir = builtins.open, os.scandir

    def fake_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.fspath(file) == str(secret):
            raise PermissionError(errno.EACCES, "Permission denied", str(secret))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    rc, out, _ = cli(capsys, "data", "verify", "--data-path", clean, "--manifest",
                     clean.parent / "p.json")
    assert rc == 0 and f"{secret}: Permission denied" in out

    def fake_scandir(path="."):
        if os.fspath(path) == str(locked):
            raise PermissionError(errno.EACCES, "Permission denied", str(locked))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", fake_scandir)
    refused(capsys, "data", "verify", "--data-path", clean, needle=(str(locked), "permission"))
    refused(capsys, "train", "--data-path", clean, *TRAIN, "--out", clean.parent / "never",
            needle="permission denied")
    assert not (clean.parent / "never").exists()


def test_04_non_utf8_file_names(capsys, dirty, dirty_run, runs):
    rc, out, _ = cli(capsys, "data", "verify", "--data-path", dirty, "--manifest",
                     dirty.parent / "m.json")
    assert rc == 0
    issues = json.loads((dirty_run / "data_manifest.json").read_text())["data_issues"]
    assert not any("caf" in p for p in issues["unreadable_files"])  # read like any image
    folder = dirty / "a" / "train" / "0_real"
    rc, out, err = cli(capsys, "predict", folder, "--model", runs["full"], "--device", "cpu",
                       "--no-progress")
    assert rc == 0, err
    rows = out.strip().splitlines()[1:]
    assert len(rows) == 9 and any("caf\\xe9.png" in r for r in rows)  # shown escaped, in full


def test_05_substituted_images_are_counted_and_named(capsys, dirty, dirty_run, runs):
    manifest = json.loads((dirty_run / "data_manifest.json").read_text())
    subst = manifest["data_issues"]["substituted_files"]
    assert any(p.endswith("train/0_real/truncated.png") for p in subst)
    assert any(p.endswith("val/1_fake/truncated.png") for p in subst)
    card = (dirty_run / "MODEL_CARD.md").read_text()
    assert "failed to decode at load time" in card and "truncated.png" in card
    summary = json.loads((dirty_run / "summary.json").read_text())
    assert summary["data_issues"]["substituted_at_load"] >= 2
    # the evaluation leaves the substituted image out of n and names it in its JSON
    out_json = dirty.parent / "eval.json"
    rc, out, err = cli(capsys, "eval", "--run", dirty_run, "--out", out_json)
    assert rc == 0, err
    assert "1 that failed to decode left out of n" in out and "val/1_fake/truncated.png" in out
    result = json.loads(out_json.read_text())
    assert result["per_task"]["a"]["n"] == 6  # 3 real + 4 fake - 1 truncated
    assert any(p.endswith("val/1_fake/truncated.png")
               for p in result["data_issues"]["substituted_files"])
    rc, out, _ = cli(capsys, "predict", dirty / "a" / "val" / "1_fake" / "truncated.png",
                     "--model", runs["full"], "--device", "cpu")
    assert rc == 0 and "truncated" in out.splitlines()[1] and "cannot read image" in out


def test_06_strict_data_stops_with_one_line(capsys, dirty, tmp_path):
    refused(capsys, "train", "--data-path", dirty, *TRAIN, "--out", tmp_path / "r",
            "--strict-data", needle=("unreadable image", "--strict-data"))
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_07_synth_into_a_non_empty_folder(capsys, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    refused(capsys, "data", "synth", "--out", tmp_path, "--per-class", "1", "--size", "32",
            needle="--overwrite")
    assert (tmp_path / "mine.txt").read_text() == "keep me"


# --- commands and configuration ----------------------------------------------------------------
def test_08_eval_data_path_without_scenario_reads_that_folder(capsys, runs, tmp_path, clean):
    other = tmp_path / "other"
    shutil.copytree(clean, other)
    for extra in range(2):  # the other copy has two more fake images in task b's val split
        write_image(other / "b" / "val" / "1_fake" / f"x{extra}.png", size=(32, 32), seed=90 + extra)
    out_json = tmp_path / "e.json"
    rc, _, err = cli(capsys, "eval", "--run", runs["full"], "--data-path", other, "--out", out_json)
    assert rc == 0, err
    result = json.loads(out_json.read_text())
    assert result["per_task"]["b"]["n"] == 8 and result["per_task"]["a"]["n"] == 6
    assert result["data_path"] == str(other)


def test_09_eval_of_a_partial_run(capsys, runs, tmp_path):
    out_json = tmp_path / "e.json"
    rc, _, err = cli(capsys, "eval", "--run", runs["partial"], "--out", out_json)
    assert rc == 0, err
    result = json.loads(out_json.read_text())
    assert result["completed_tasks"] == 1
    assert np.isnan(result["per_task"]["b"]["multi_real"]) and 0 <= result["per_task"]["b"]["binary"] <= 1


@pytest.mark.parametrize("flags, needle", [
    (["--set", "train.epochs=1.5"], "train.epochs must be an integer"),
    (["--set", "train.seed=0.5"], "train.seed must be an integer"),
    (["--set", "train.batch_size=2.5"], "train.batch_size must be an integer"),
    (["--set", "train.memory_size=10.5"], "train.memory_size must be an integer"),
    (["--crop", "0"], "data.crop must be between 1 and 8192"),
    (["--device", "tpu"], "train.device (--device)"),
    (["--set", "data.blur_prob=2"], "data.blur_prob must be between 0 and 1"),
])
def test_10_invalid_numbers_and_device_name_the_key(capsys, clean, tmp_path, flags, needle):
    refused(capsys, "train", "--data-path", clean, *TRAIN, "--out", tmp_path / "r", *flags,
            needle=needle)
    assert not (tmp_path / "r").exists()


def test_10_non_utf8_yaml_names_the_file(capsys, clean, tmp_path):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("train:\n  epochs: 1  # r\xe9sum\xe9\n".encode("latin-1"))
    refused(capsys, "train", "--data-path", clean, *TRAIN, "--out", tmp_path / "r", "--config",
            cfg, needle=(str(cfg), "not UTF-8"))


def test_11_out_is_a_file_unwritable_or_the_data(capsys, clean, tmp_path, monkeypatch):
    before = sorted(p.name for p in clean.iterdir())
    a_file = tmp_path / "file"
    a_file.write_text("x")
    refused(capsys, "train", "--data-path", clean, *TRAIN, "--out", a_file, needle="is a file")
    refused(capsys, "train", "--data-path", clean, *TRAIN, "--out", a_file / "sub",
            needle="is a file")
    refused(capsys, "train", "--data-path", clean, *TRAIN, "--out", clean,
            needle="inside the data folder")
    refused(capsys, "train", "--data-path", clean, *TRAIN, "--out", clean / "a" / "runs",
            needle="inside the data folder")
    assert sorted(p.name for p in clean.iterdir()) == before and not (clean / "a" / "runs").exists()
    # the other commands that write next to data refuse the same way, before any work
    refused(capsys, "compare", "--strategies", "lorax", "--data-path", clean, *TRAIN, "--out",
            clean / "cmp", needle=("--out", "inside the data folder"))
    refused(capsys, "detect", "train", "--source", f"a={clean / 'a'}", "--backbone", "vit-test",
            "--no-pretrained", "--out", clean / "a" / "det", needle="inside the data folder")
    refused(capsys, "detect", "eval", "--detector", tmp_path / "none", "--data", clean,
            "--out", clean / "ev", needle="inside the data folder")
    image = clean / "a" / "val" / "0_real" / "000.png"
    refused(capsys, "data", "sheet", "--data-path", clean, "--out", image,
            needle="inside the task folder")
    assert sorted(p.name for p in clean.iterdir()) == before and image.stat().st_size > 100
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # root may write anywhere
    refused(capsys, "train", "--data-path", clean, *TRAIN, "--out", tmp_path / "ro" / "r",
            needle="permission denied")


@pytest.mark.parametrize("flags, key", [
    (["--seed", "5"], "train.seed 0 -> 5"),
    (["--backbone", "deit-test"], "model.backbone 'vit-test' -> 'deit-test'"),
    (["--memory-size", "8"], "train.memory_size 4 -> 8"),
    (["--crop", "48"], "data.crop 32 -> 48"),
])
def test_12_resume_refuses_protocol_changes(capsys, runs, tmp_path, flags, key):
    run = copy_run(runs["partial"], tmp_path)
    before = (run / "checkpoints" / "exp_000" / "meta.json").read_bytes()
    refused(capsys, "train", "--resume", run, *flags, needle=(key, "--allow-protocol-change"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["exp_000", "latest.json"]
    assert (run / "checkpoints" / "exp_000" / "meta.json").read_bytes() == before


def test_12_allow_protocol_change_records_it(capsys, runs, tmp_path):
    run = copy_run(runs["partial"], tmp_path)
    rc, _, err = cli(capsys, "train", "--resume", run, "--memory-size", "6",
                     "--allow-protocol-change")
    assert rc == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed_tasks"] == 2
    assert summary["protocol_changes"] == [{"after_task": 1,
                                            "changes": {"train.memory_size": [4, 6]}}]
    meta = json.loads((run / "checkpoints" / "exp_001" / "meta.json").read_text())
    assert meta["protocol_changes"] == summary["protocol_changes"]


def test_13_data_change_on_resume_refused_or_recorded(capsys, clean, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(clean, data)
    run = tmp_path / "run"
    train(capsys, data, run, "--stop-after", "1")
    trained_with = json.loads((run / "data_manifest.json").read_text())["trained_data_sha256"]["a"]
    write_image(data / "a" / "train" / "1_fake" / "new.png", size=(32, 32), seed=123)
    refused(capsys, "train", "--resume", run, needle=("task(s) a changed", "--allow-protocol-change"))
    rc, _, err = cli(capsys, "train", "--resume", run, "--allow-protocol-change")
    assert rc == 0, err
    manifest = json.loads((run / "data_manifest.json").read_text())
    change = manifest["data_changes"][0]
    assert change["task"] == "a" and change["trained_with_sha256"] == trained_with
    assert change["now_sha256"] == manifest["task_listing_sha256"]["a"] != trained_with
    assert manifest["trained_data_sha256"]["a"] == trained_with  # what task a was trained on
    # compare refuses to reuse a finished run whose data changed after it was trained
    compare_out = tmp_path / "cmp"
    args = ["compare", "--strategies", "lorax", "--data-path", data, *TRAIN, "--out", compare_out]
    rc, _, err = cli(capsys, *args)
    assert rc == 0, err
    write_image(data / "b" / "val" / "0_real" / "new.png", size=(32, 32), seed=124)
    refused(capsys, *args, needle=("trained on other data", "task(s) b differ"))


def test_14_run_directory_lock(capsys, clean, tmp_path):
    from lorax_cil.training.lock import LOCK_NAME, RunLock

    out = tmp_path / "busy"
    with RunLock(out):
        refused(capsys, "train", "--data-path", clean, *TRAIN, "--out", out,
                needle=("is in use by process", str(os.getpid())))
    assert not (out / LOCK_NAME).exists() and not (out / "checkpoints").exists()
    # a holder killed with SIGKILL leaves its lock behind; the next run recovers it
    stale = tmp_path / "stale"
    code = ("import os, signal, sys; from lorax_cil.training.lock import RunLock; "
            "RunLock(sys.argv[1]).acquire(); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code, str(stale)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    owner = json.loads((stale / LOCK_NAME).read_text())
    assert owner["pid"] != os.getpid() and owner["hostname"] == socket.gethostname()
    with RunLock(stale) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (stale / LOCK_NAME).exists()
    # killed between creating the lock file and writing it: empty, recovered once it is old
    (stale / LOCK_NAME).write_text("")
    with pytest.raises(Exception, match="unreadable lock file"):
        RunLock(stale).acquire()
    os.utime(stale / LOCK_NAME, (0, 0))
    with RunLock(stale):
        pass


def test_15_merge_out_is_an_input_or_bad_threshold(capsys, tmp_path):
    spec = tmp_path / "spec"
    spec.mkdir()
    (spec / "meta.json").write_text("{}")
    refused(capsys, "merge", "--specialists", spec, tmp_path / "other", "--out", spec,
            "--overwrite", needle=("--out", "--specialists", "overwrite its own input"))
    assert (spec / "meta.json").read_text() == "{}"
    refused(capsys, "merge", "--specialists", spec, tmp_path / "other", "--out", tmp_path / "m",
            "--threshold", "abc", needle="--threshold expects 'mean' or a number in [0, 1]")
    refused(capsys, "merge", "--specialists", spec, tmp_path / "other", "--out", tmp_path / "m",
            "--method", "ties", "--top-k", "0", needle="--top-k")


# --- model files -------------------------------------------------------------------------------
def _reseal(meta_path: Path, edit) -> None:
    from lorax_cil.training.checkpoint import _meta_digest

    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta["meta_sha256"] = _meta_digest(meta)
    meta_path.write_text(json.dumps(meta))


def test_16_latest_checkpoint_without_meta_is_refused(capsys, runs, tmp_path):
    run = copy_run(runs["full"], tmp_path)
    (run / "checkpoints" / "exp_001" / "meta.json").unlink()
    refused(capsys, "predict", runs["full"] / "MODEL_CARD.md", "--model", run, "--device", "cpu",
            needle=("exp_001", "has no meta.json"))
    refused(capsys, "eval", "--run", run, needle="has no meta.json")


def test_17_metadata_without_checksum_is_refused(capsys, runs, tmp_path):
    run = copy_run(runs["full"], tmp_path)
    meta_path = run / "checkpoints" / "exp_001" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("meta_sha256")
    meta["scenario"]["tasks"][0]["name"] = "renamed"
    meta_path.write_text(json.dumps(meta))
    refused(capsys, "predict", run / "summary.json", "--model", run, "--device", "cpu",
            needle="no meta_sha256 checksum")


@pytest.mark.parametrize("pointer, needle", [
    ('{"folder": "../../../elsewhere"}', "must name a checkpoint folder exp_NNN"),
    ('{"folder": "exp_000/../../x"}', "must name a checkpoint folder exp_NNN"),
    ("{not json", "corrupt"),
    ('["exp_000"]', "must name a checkpoint folder"),
])
def test_18_latest_json_confined_to_the_run(capsys, runs, tmp_path, pointer, needle):
    run = copy_run(runs["full"], tmp_path)
    (run / "checkpoints" / "latest.json").write_text(pointer)
    refused(capsys, "predict", run / "summary.json", "--model", run, "--device", "cpu",
            needle=needle)


def test_18_latest_json_symlinked_outside_is_refused(capsys, runs, tmp_path):
    run = copy_run(runs["full"], tmp_path)
    outside = copy_run(runs["partial"], tmp_path / "x") / "checkpoints" / "exp_000"
    os.symlink(outside, run / "checkpoints" / "exp_009")
    (run / "checkpoints" / "latest.json").write_text('{"folder": "exp_009"}')
    refused(capsys, "predict", run / "summary.json", "--model", run, "--device", "cpu",
            needle="leads outside")


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.pop("architecture"), "lacks the key(s) architecture"),
    (lambda m: m.pop("config"), "lacks the key(s) config"),
    (lambda m: m["architecture"].update(task_classes=[10**9, 2]), "task_classes"),
    (lambda m: m["architecture"].update(task_classes=[2] * 50), "does not fit"),
    (lambda m: m["config"]["model"].update(lora_r=10**9), "model.lora_r must be between 1 and 4096"),
    (lambda m: m["scenario"].update(tasks=[1, 2]), "scenario.tasks must list tasks"),
    (lambda m: m.update(steps=[]), "0 step records for 2 completed tasks"),
])
def test_19_resealed_metadata_with_missing_keys_or_huge_class_counts(capsys, runs, tmp_path,
                                                                      edit, needle):
    run = copy_run(runs["full"], tmp_path)
    _reseal(run / "checkpoints" / "exp_001" / "meta.json", edit)
    refused(capsys, "predict", run / "summary.json", "--model", run, "--device", "cpu",
            needle=needle)
    refused(capsys, "train", "--resume", run, needle=needle)


def test_19_deeply_nested_metadata_is_refused(capsys, runs, tmp_path):
    run = copy_run(runs["full"], tmp_path)
    depth = 200_000
    (run / "checkpoints" / "exp_001" / "meta.json").write_text("[" * depth + "]" * depth)
    refused(capsys, "predict", run / "summary.json", "--model", run, "--device", "cpu",
            needle=("corrupt checkpoint metadata", "nested too deeply"))


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.pop("targets"), "lacks the key(s) targets"),
    (lambda m: m["backbone"].pop("recipe"), "backbone.recipe"),
    (lambda m: m.update(threshold=float("nan")), "threshold must be a number in [0, 1]"),
    (lambda m: m["adapter"].update(lora_rank=10**9), "adapter.lora_rank=1000000000"),
    (lambda m: m["backbone"]["recipe"].update(pretrained="/tmp/evil.pt"), "never loads pickled"),
])
def test_19_resealed_detector_metadata(capsys, tmp_path, clean, edit, needle):
    from lorax_cil.detection.model import AdapterConfig, BackboneRecipe, Detector, save_detector

    det = Detector.from_recipe(BackboneRecipe(name="vit-test", seed=0), AdapterConfig(kind="lora"))
    folder = save_detector(det, tmp_path / "det")
    _reseal(folder / "meta.json", edit)
    refused(capsys, "predict", clean / "a" / "val", "--model", folder, "--device", "cpu",
            needle=needle)


def test_20_pretrained_path_to_a_pickle_is_refused_unopened(capsys, clean, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    evil.write_bytes(pickle.dumps(Payload()))
    refused(capsys, "train", "--data-path", clean, *TRAIN, "--out", tmp_path / "r",
            "--set", f"model.pretrained={evil}", needle=("model.pretrained", "never loads pickled"))
    assert not marker.exists()


# --- predict and the Python API ----------------------------------------------------------------
def test_21_predict_out_equal_to_an_input(capsys, runs, clean):
    image = clean / "a" / "val" / "0_real" / "000.png"
    before = image.read_bytes()
    refused(capsys, "predict", image, "--model", runs["full"], "--out", image, "--device", "cpu",
            needle=("--out", "one of the input images"))
    refused(capsys, "predict", clean / "a" / "val", "--model", runs["full"], "--out", image,
            "--device", "cpu", needle="one of the input images")
    assert image.read_bytes() == before


def test_22_fifo_and_directory_symlink_loops_in_predict(capsys, runs, tmp_path):
    folder = tmp_path / "imgs"
    for i in range(3):
        write_image(folder / f"{i}.png", size=(32, 32), seed=i)
    os.mkfifo(folder / "pipe.png")
    os.symlink(folder, folder / "self")  # one link back to itself
    os.makedirs(folder / "x")
    os.symlink(folder / "x", folder / "y")  # two links into each other
    os.symlink(folder / "y", folder / "x" / "back")
    signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError("predict hung")))
    signal.alarm(60)
    try:
        rc, out, err = cli(capsys, "predict", folder, folder / "pipe.png", "--model", runs["full"],
                           "--device", "cpu", "--format", "jsonl")
    finally:
        signal.alarm(0)
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    ok = [r for r in rows if r["error"] is None]
    assert sorted(Path(r["path"]).name for r in ok) == ["0.png", "1.png", "2.png"]
    pipes = [r for r in rows if r["path"].endswith("pipe.png")]
    assert len(pipes) == 2 and all("FIFO" in r["error"] for r in pipes)


def test_23_api_refuses_nan_out_of_range_and_empty_arrays(runs):
    from lorax_cil.inference import load

    predictor = load(runs["full"], device="cpu")
    good = np.full((32, 32, 3), 0.5, dtype=np.float32)
    nan = good.copy()
    nan[0, 0, 0] = np.nan
    cases = {"NaN": nan, "[0, 1]": good * 3, "[0, 255]": np.full((8, 8), 300, dtype=np.int32),
             "empty": np.zeros((0, 0, 3), dtype=np.uint8)}
    rows = predictor.predict([good, *cases.values()])
    assert rows[0]["error"] is None
    for row, needle in zip(rows[1:], cases):
        assert row["error"].startswith("ValueError") and needle in row["error"], row["error"]
        assert row["prediction"] is None
    for array in cases.values():
        with pytest.raises(ValueError):
            predictor.predict_proba([array])


# --- disk --------------------------------------------------------------------------------------
def test_24_enospc_during_a_checkpoint_and_the_predict_output(capsys, clean, tmp_path, monkeypatch,
                                                              runs):
    from lorax_cil.training.checkpoint import load_checkpoint

    real_fsync = os.fsync

    def full_disk(fd):
        if "exp_001" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    run = tmp_path / "run"
    refused(capsys, "train", "--data-path", clean, *TRAIN, "--out", run,
            needle=("no space left on device", "exp_001"))
    monkeypatch.undo()
    _, meta = load_checkpoint(run / "checkpoints" / "exp_000")  # the earlier checkpoint is intact
    assert meta["completed_tasks"] == 1
    assert json.loads((run / "checkpoints" / "latest.json").read_text()) == {"folder": "exp_000"}
    assert not list((run / "checkpoints").rglob("*.tmp")) and not (run / ".lock").exists()

    from lorax_cil.inference.writers import RowWriter

    def no_space(self, row):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(RowWriter, "write", no_space)
    refused(capsys, "predict", clean / "a" / "val", "--model", runs["full"], "--device", "cpu",
            "--out", tmp_path / "p.csv", needle=("no space left on device", "p.csv"))


# --- the guard itself --------------------------------------------------------------------------
def test_guard_debug_shows_the_traceback_and_defects_exit_1(capsys, monkeypatch, tmp_path):
    with pytest.raises(ValueError):
        main(["--debug", "train", "--add-task", "x=/tmp/x"])
    import lorax_cil.commands.data as data_cmd

    def defect(args):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(data_cmd, "cmd_verify", defect)
    capsys.readouterr()
    rc = main(["data", "verify", "--data-path", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and "internal error: TypeError" in err and "--debug" in err
    assert "Traceback" not in err

    def too_big(args):
        raise MemoryError()

    monkeypatch.setattr(data_cmd, "cmd_verify", too_big)
    refused(capsys, "data", "verify", "--data-path", tmp_path, needle="out of memory")
