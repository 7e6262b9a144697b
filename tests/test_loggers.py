"""Experiment loggers: TensorBoard event files read back, CSV files, wandb option handling."""

from __future__ import annotations

import csv
import sys

import numpy as np
import pytest

from conftest import make_cddb_tree
from lorax_cil.cli import main
from lorax_cil.training.loggers import LoggerSpec, parse_logger_spec


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_cddb_tree(tmp_path_factory.mktemp("data"), tasks=("a", "b"), n=4, size=(32, 32),
                          subclass_tasks=())


def _args(data_root, out, *extra):
    return ["train", "-q", "--scenario", "custom", "--data-path", str(data_root), "--tasks", "a",
            "b", "--backbone", "vit-test", "--no-pretrained", "--epochs", "2", "--batch-size",
            "8", "--memory-size", "4", "--set", "train.warmup_epochs=0", "--set",
            "train.min_steps_per_task=0", "--set", "model.lora_r=2", "--out", str(out), *extra]


def test_parse_logger_specs():
    assert parse_logger_spec("tensorboard") == LoggerSpec("tensorboard", None)
    assert parse_logger_spec("csv:logs/x") == LoggerSpec("csv", "logs/x")
    assert parse_logger_spec("wandb:my-project") == LoggerSpec("wandb", "my-project")
    with pytest.raises(ValueError, match="unknown logger 'mlflow'; valid: tensorboard"):
        parse_logger_spec("mlflow")
    with pytest.raises(ValueError, match="nothing after ':'"):
        parse_logger_spec("csv:")


def test_bad_logger_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as err:
        main(["train", "--logger", "mlflow"])
    assert err.value.code == 2
    assert "unknown logger 'mlflow'" in capsys.readouterr().err


def test_missing_wandb_package_is_named(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    assert main(["train", "--logger", "wandb:proj", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--logger wandb needs the 'wandb' package" in err and "pip install wandb" in err
    assert not (tmp_path / "r").exists()


def test_tensorboard_events_and_csv_read_back(data_root, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, csv_dir = tmp_path / "run", tmp_path / "csvlogs"
    # class means (the LoRAX default on a CNN; set here on the test ViT) log the head beside them
    assert main(_args(data_root, out, "--logger", "tensorboard", "--logger", f"csv:{csv_dir}",
                      "--set", "train.readout=ncm-frozen", "--stop-after", "1")) == 0
    assert main(["train", "-q", "--resume", str(out), "--logger", "tensorboard", "--logger",
                 f"csv:{csv_dir}"]) == 0

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    # the run's accuracy matrix, one scalar per task and step, equals accuracy_multi_real.csv
    R = np.genfromtxt(out / "accuracy_multi_real.csv", delimiter=",", skip_header=1)[:, 1:]
    for i, task in enumerate(("a", "b")):
        events = acc.Scalars(f"AccuracyMatrix/multi_real/{task}")
        assert [e.step for e in events] == list(range(i, 2))
        np.testing.assert_allclose([e.value for e in events], R[i:, i], rtol=1e-6)
    assert [e.step for e in acc.Scalars("AA/multi_real")] == [0, 1]
    # the run reads by ncm-frozen class means: the linear head's matrix is logged beside it
    H = np.genfromtxt(out / "accuracy_multi_real-head.csv", delimiter=",", skip_header=1)[:, 1:]
    for i, task in enumerate(("a", "b")):
        events = acc.Scalars(f"AccuracyMatrix/multi_real-head/{task}")
        np.testing.assert_allclose([e.value for e in events], H[i:, i], rtol=1e-6)
    assert [e.step for e in acc.Scalars("AA/multi_real-head")] == [0, 1]
    assert {"AccuracyMatrix/binary/a", "AccuracyMatrix/strict/b"} <= tags
    # Avalanche's epoch metrics (through the evaluation plugin) and the epoch records
    loss_tags = [t for t in tags if t.startswith("Loss_Epoch/train_phase/train_stream")]
    acc_tags = [t for t in tags if t.startswith("Top1_Acc_Epoch/train_phase/train_stream")]
    assert loss_tags and acc_tags
    assert sum(len(acc.Scalars(t)) for t in loss_tags) == 4  # 2 tasks x 2 epochs
    assert [e.step for e in acc.Scalars("Epoch/lr")] == [0, 1, 2, 3]

    with open(csv_dir / "training_results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["training_exp"], r["epoch"]) for r in rows] == [("0", "0"), ("0", "1"),
                                                               ("1", "0"), ("1", "1")]
    assert all(float(r["training_loss"]) > 0 for r in rows)
