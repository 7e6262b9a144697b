"""`lorax-cil compare`: the table, seed aggregation, reuse and resume, both backbone families."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import make_cddb_tree
from lorax_cil.training.compare import TABLE_METRICS, config_differences, run_comparison
from lorax_cil.training.config import RunConfig, merge_config

TASKS = ("a", "b")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_cddb_tree(tmp_path_factory.mktemp("data"), tasks=TASKS, n=4, size=(36, 36),
                          subclass_tasks=())


def base_config(root, **model) -> RunConfig:
    m = {"backbone": "vit-test", "pretrained": False, "lora_r": 4, "lora_alpha": 8,
         "lora_dropout": 0.0}
    m.update(model)
    return merge_config(RunConfig(), {
        "model": m,
        "data": {"scenario": "custom", "data_path": str(root), "tasks": list(TASKS),
                 "crop": 32},
        "train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0, "memory_size": 8,
                  "min_steps_per_task": 0,
                  "eval_batch_size": 16, "lr_first": 1e-3, "lr": 1e-3},
        "baselines": {"l2p_pool_size": 4, "l2p_prompt_length": 2, "l2p_top_k": 2},
    }, source="test")


@pytest.fixture(scope="module")
def two_seeds(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    result = run_comparison(base_config(data_root), strategies=["finetune", "simplecil"],
                            seeds=[0, 1], out=out, timing_images=8)
    return out, result


def test_table_has_every_column_and_files(two_seeds):
    out, result = two_seeds
    table = pd.read_csv(out / "comparison.csv")
    expected = ["strategy", "seeds"] + [f"{k}_{s}" for k, *_ in TABLE_METRICS
                                        for s in ("mean", "std")]
    assert list(table.columns) == expected
    assert list(table["strategy"]) == ["finetune", "simplecil"] and list(table["seeds"]) == [2, 2]
    md = (out / "comparison.md").read_text()
    for _, label, *_ in TABLE_METRICS:
        assert label in md
    assert " ± " in md
    for name in ("runs.csv", "comparison.json", "average_accuracy.png", "matrices.png"):
        assert (out / name).is_file(), name
    for word in ("memory budget 8", "backbone vit-test", "order a → b", "eval split val",
                 "seeds 0, 1"):
        assert word in result.caption


def test_mean_and_std_over_two_seeds_are_right(two_seeds):
    out, _ = two_seeds
    runs = pd.read_csv(out / "runs.csv")
    table = pd.read_csv(out / "comparison.csv").set_index("strategy")
    assert len(runs) == 4 and set(runs["seed"]) == {0, 1}
    for strategy, group in runs.groupby("strategy"):
        for key, *_ in TABLE_METRICS:
            values = group[key].to_numpy(dtype=float)
            np.testing.assert_allclose(table.loc[strategy, f"{key}_mean"], values.mean())
            np.testing.assert_allclose(table.loc[strategy, f"{key}_std"],
                                       values.std(ddof=1))
    # the run's own summary is what the table reports
    summary = json.loads((out / "finetune" / "seed1" / "summary.json").read_text())
    row = runs[(runs.strategy == "finetune") & (runs.seed == 1)].iloc[0]
    assert row["aa"] == pytest.approx(summary["multi_real_aa"])
    assert row["strict"] == pytest.approx(summary["strict_aa"]) and row["strict"] <= row["aa"]
    assert row["infer_ms"] > 0 and row["exemplars"] == 0


def test_a_finished_run_is_reused_not_retrained(two_seeds, data_root, monkeypatch):
    from lorax_cil.training import runner

    out, first = two_seeds
    stamp = (out / "finetune" / "seed0" / "checkpoints" / "exp_001" / "meta.json").stat().st_mtime

    def no_training(self, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runner.Run, "train", no_training)
    again = run_comparison(base_config(data_root), strategies=["finetune", "simplecil"],
                           seeds=[0, 1], out=out, timing_images=8)
    assert set(again.rows["status"]) == {"reused"}
    assert (out / "finetune" / "seed0" / "checkpoints" / "exp_001" / "meta.json").stat(
    ).st_mtime == stamp
    np.testing.assert_array_equal(again.rows["aa"], first.rows["aa"])


def test_partial_runs_resume_or_restart(data_root, tmp_path):
    from lorax_cil.benchmarks.scenarios import resolve_scenario
    from lorax_cil.training.runner import Run

    cfg = base_config(data_root)
    for name in ("replay", "ewc"):
        run_cfg = merge_config(cfg, {"train": {"strategy": name, "seed": 0}}, source="t")
        run = Run(run_cfg, run_dir=tmp_path / name / "seed0")
        run.setup(resolve_scenario("custom", data_path=data_root, tasks=list(TASKS)))
        run.train(stop_after=1)
    result = run_comparison(cfg, strategies=["replay", "ewc"], seeds=[0], out=tmp_path,
                            timing_images=4)
    assert dict(zip(result.rows["strategy"], result.rows["status"])) == {
        "replay": "resumed", "ewc": "restarted"}
    assert not result.rows[["aa", "bwt"]].isna().any().any()


def test_a_run_made_with_another_config_is_an_error(two_seeds, data_root):
    out, _ = two_seeds
    cfg = merge_config(base_config(data_root), {"train": {"epochs": 2}}, source="t")
    with pytest.raises(ValueError, match="another configuration.*train.epochs: run has 1, "
                                         "requested 2"):
        run_comparison(cfg, strategies=["finetune"], seeds=[0], out=out)


def test_config_differences_ignore_what_a_strategy_does_not_read():
    a = merge_config(RunConfig(), {"train": {"strategy": "finetune"},
                                   "model": {"extractor": "finetune"}}, source="t")
    b = merge_config(a, {"baselines": {"ewc_lambda": 3.0}, "model": {"lora_r": 2},
                         "train": {"device": "cpu"}}, source="t")
    assert config_differences(a.to_dict(), b.to_dict()) == []
    c = merge_config(a, {"train": {"memory_size": 7}}, source="t")
    assert config_differences(a.to_dict(), c.to_dict()) == [
        "train.memory_size: run has 500, requested 7"]


def test_impossible_combination_is_refused_before_training(data_root, tmp_path):
    cfg = base_config(data_root, backbone="efficientnet-lite0")
    with pytest.raises(ValueError, match="'l2p' cannot run on backbone 'efficientnet-lite0'"):
        run_comparison(cfg, strategies=["finetune", "l2p"], seeds=[0], out=tmp_path / "x")
    assert not (tmp_path / "x" / "finetune").exists()
    with pytest.raises(ValueError, match="unknown strategy 'lorx'"):
        run_comparison(cfg, strategies=["lorx"], seeds=[0], out=tmp_path / "y")


def test_cli_compare(data_root, tmp_path, capsys):
    from lorax_cil.cli import main

    args = ["compare", "--scenario", "custom", "--data-path", str(data_root), "--tasks", *TASKS,
            "--backbone", "vit-test", "--no-pretrained", "--crop", "32", "--strategies",
            "simplecil", "--seeds", "3", "--memory-size", "8", "--eval-split", "val",
            "--timing-images", "4", "--out", str(tmp_path)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "| simplecil" in text and "simplecil/seed3: trained" in text
    assert main(args) == 0 and "simplecil/seed3: reused" in capsys.readouterr().out
    assert main([*args[:-1], str(tmp_path / "z"), "--seeds", "x"]) == 2


def test_class_mean_rows_also_report_their_linear_head(data_root, tmp_path):
    """A lorax run that reads by ncm-frozen class means (the default on a CNN, set here on the
    test ViT) carries the head's AA and BWT recorded in the same run; a run without that
    second read-out (a baseline, or lorax reading with its head, the default on a ViT) shows
    n/a."""
    cfg = base_config(data_root)
    cfg.train.readout = "ncm-frozen"
    run_comparison(cfg, strategies=["lorax"], seeds=[0], out=tmp_path / "ncm", timing_images=4)
    runs = pd.read_csv(tmp_path / "ncm" / "runs.csv").set_index("strategy")
    summary = json.loads((tmp_path / "ncm" / "lorax" / "seed0" / "summary.json").read_text())
    assert summary["readout"] == "ncm-frozen"
    assert runs.loc["lorax", "aa"] == pytest.approx(summary["multi_real_aa"])
    assert runs.loc["lorax", "head_aa"] == pytest.approx(summary["head_readout"]["multi_real_aa"])
    assert runs.loc["lorax", "head_bwt"] == pytest.approx(summary["head_readout"]["multi_real_bwt"])
    run_comparison(base_config(data_root), strategies=["finetune"], seeds=[0],
                   out=tmp_path / "ft", timing_images=4)
    runs = pd.read_csv(tmp_path / "ft" / "runs.csv").set_index("strategy")
    assert np.isnan(runs.loc["finetune", "head_aa"]) and np.isnan(runs.loc["finetune", "head_bwt"])
    finetune_row = next(line for line in (tmp_path / "ft" / "comparison.md").read_text().splitlines()
                        if line.startswith("| finetune"))
    assert "n/a" in finetune_row
