"""Per-epoch progress: bar on a terminal, one line per epoch otherwise, -q silences, records."""

from __future__ import annotations

import io
import json

import pytest
import torch

from conftest import make_cddb_tree
from lorax_cil.cli import main
from lorax_cil.training.progress import EpochProgress, resolve_display


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_cddb_tree(tmp_path_factory.mktemp("data"), tasks=("a", "b"), n=4, size=(32, 32),
                          subclass_tasks=())


def test_display_resolution():
    assert resolve_display("auto", Tty()) == "bar"
    assert resolve_display("auto", io.StringIO()) == "lines"
    assert resolve_display("off", Tty()) == "off"
    with pytest.raises(ValueError, match="progress display must be one of"):
        resolve_display("fancy")


def test_lines_mode_one_line_per_epoch_and_records():
    lines: list[str] = []
    meter = EpochProgress(display="lines", say=lines.append, stream=io.StringIO())
    meter.start_task("task 1/2")
    for epoch in range(3):
        meter.start_epoch(epoch, 3, steps=2, lr=1e-3)
        meter.update(4, torch.tensor(1.0))
        meter.update(2, 4.0)
        meter.end_epoch()
    assert len(lines) == 3
    assert lines[0].startswith("task 1/2 epoch 1/3: loss 2.0000, lr 0.001, ")
    assert "img/s" in lines[0] and "left" in lines[0]
    recs = meter.take_records()
    assert [r["epoch"] for r in recs] == [0, 1, 2]
    assert all(r["loss"] == pytest.approx(2.0) and r["images"] == 6 for r in recs)
    assert meter.take_records() == []


def test_bar_mode_writes_a_tqdm_bar_with_loss_lr_speed_and_time_left():
    stream, lines = Tty(), []
    meter = EpochProgress(display="auto", say=lines.append, stream=stream)
    assert meter.display == "bar"
    meter.start_epoch(0, 2, steps=5, lr=5e-4)
    for _ in range(5):
        meter.update(8, 0.5)
    meter.end_epoch()
    out = stream.getvalue()
    assert "epoch 1/2" in out and "loss=0.5000" in out and "lr=0.0005" in out
    assert "img/s" in out and "task left" in out
    assert lines == []


def _train_args(data_root, out, *extra):
    return ["train", "--scenario", "custom", "--data-path", str(data_root), "--tasks", "a", "b",
            "--backbone", "vit-test", "--no-pretrained", "--epochs", "2", "--batch-size", "8",
            "--memory-size", "4", "--set", "train.warmup_epochs=0", "--set",
            "model.lora_r=2", "--out", str(out), *extra]


def test_train_cli_prints_one_line_per_epoch_and_records_epochs(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(data_root, out)) == 0
    text = capsys.readouterr().out
    epoch_lines = [ln for ln in text.splitlines() if " epoch " in ln and "img/s" in ln]
    steps = [json.loads(ln) for ln in (out / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 2
    for j, s in enumerate(steps):
        n = len(s["epochs"])  # --epochs, or more when a tiny task is lengthened to a step floor
        assert n >= 2 and [e["epoch"] for e in s["epochs"]] == list(range(n))
        assert all(e["loss"] > 0 and e["seconds"] > 0 and e["images"] > 0 for e in s["epochs"])
        mine = [ln for ln in epoch_lines if f"task {j + 1}/2 epoch " in ln]
        assert len(mine) == n and f"task {j + 1}/2 epoch {n}/{n}: loss " in mine[-1]
    assert len(epoch_lines) == sum(len(s["epochs"]) for s in steps)


def test_quiet_silences_progress_but_keeps_records(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(data_root, out, "-q", "--stop-after", "1")) == 0
    text = capsys.readouterr().out
    assert "img/s" not in text
    step = json.loads((out / "steps.jsonl").read_text().splitlines()[0])
    assert len(step["epochs"]) >= 2


def test_progress_plugin_works_with_an_avalanche_baseline(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(data_root, out, "--strategy", "replay", "--stop-after", "1")) == 0
    text = capsys.readouterr().out
    assert "task 1/2 epoch 2/" in text and "loss " in text


def test_detect_train_prints_epoch_lines_and_logs_speed(data_root, tmp_path, capsys):
    out = tmp_path / "det"
    assert main(["detect", "train", "--source", f"a={data_root / 'a'}", "--backbone", "clip-test",
                 "--no-pretrained", "--epochs", "2", "--batch-size", "4", "--calib-fraction",
                 "0.3", "--device", "cpu", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "epoch 2/2: loss " in text and "img/s" in text and "BCE " in text
    log = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(r["images_per_s"] > 0 and r["lr"] > 0 for r in log)
    assert main(["detect", "train", "-q", "--source", f"a={data_root / 'a'}", "--backbone",
                 "clip-test", "--no-pretrained", "--epochs", "1", "--batch-size", "4",
                 "--calib-fraction", "0.3", "--device", "cpu", "--out", str(tmp_path / "d2")]) == 0
    assert "img/s" not in capsys.readouterr().out
