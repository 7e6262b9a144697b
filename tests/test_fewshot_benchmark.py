"""benchmarks/fewshot.py end to end on a tiny configuration: variants, table and csv."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("fewshot_bench", ROOT / "benchmarks" / "fewshot.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_variant_names_map_to_head_options():
    mod = _module()
    args = mod.parse_args(["--balanced-steps", "7"])
    assert mod.variant_config("lorax", args) == ("lorax", {})
    strategy, train = mod.variant_config("lorax+bal+ncm", args)
    assert strategy == "lorax" and train["head_balanced_steps"] == 7 and train["readout"] == "ncm"
    assert train["head_init"] == "random" and train["head_wa"] is False
    assert mod.variant_config("lorax+official", args)[1]["readout"] == "head"
    assert mod.variant_config("lorax+epochs", args)[1]["min_steps_per_task"] == 0
    assert mod.variant_config("lorax+ncmf", args)[1]["readout"] == "ncm-frozen"
    assert mod.variant_config("lorax+ncmr", args)[1]["readout"] == "ncm-relative"
    assert mod.variant_config("lorax+ncmf+cbl", args)[1]["head_balanced_loss"] is True
    assert mod.variant_blocks("icarl@k3") == ("icarl", 3) and mod.variant_blocks("icarl") == ("icarl", None)
    assert mod.variant_config("icarl@k3", args) == ("icarl", {})
    for bad in ("lorax@k3", "icarl@k0", "icarl@kx", "simplecil@k2"):
        with pytest.raises(SystemExit, match="'@kN' takes a positive block count"):
            mod.variant_blocks(bad)
    with pytest.raises(SystemExit, match="variant 'memo'"):
        mod.variant_blocks("der-expandable@k3")


def test_tiny_ablation_writes_table_and_csv(tmp_path):
    mod = _module()
    out = tmp_path / "out"
    argv = ["--backbone", "vit-test", "--no-pretrained", "--size", "32", "--per-class", "10",
            "--val-per-class", "2", "--tasks", "2", "--epochs", "1", "--adapt-blocks", "1",
            "--lora-r", "2", "--set", "train.min_steps_per_task=2", "--seeds", "0",
            "--variants", "lorax+ncmf,simplecil,icarl,icarl@k1", "--data", str(tmp_path / "data"),
            "--out", str(out)]
    rescore = ["--rescore", "ncm-frozen,head"]
    assert mod.main(argv + rescore) == 0
    rows = list(csv.DictReader(open(out / "fewshot.csv")))
    # the run's own read-out (ncm-frozen) adds no row; baselines are not rescored
    assert [(r["per_class"], r["variant"]) for r in rows] == [
        ("10", "lorax+ncmf"), ("10", "lorax+ncmf:head"), ("10", "simplecil"), ("10", "icarl"),
        ("10", "icarl@k1")]
    run = out / "runs" / "10" / "lorax+ncmf" / "seed0"
    summary = json.loads((run / "summary.json").read_text())
    head = {r["variant"]: r for r in rows}["lorax+ncmf:head"]
    # the head's row is the head the run recorded while training, exactly
    assert float(head["aa_mean"]) == pytest.approx(100 * summary["head_readout"]["multi_real_aa"], abs=1e-3)
    assert float(head["bwt_mean"]) == pytest.approx(100 * summary["head_readout"]["multi_real_bwt"], abs=1e-3)
    assert float(head["train_s_mean"]) == pytest.approx(summary["train_seconds"], abs=1e-3)
    assert (run / "rescore-head.json").is_file()
    with pytest.raises(SystemExit, match="unknown read-out.*'ncm-relatve'"):
        mod.main(argv + ["--rescore", "ncm-relatve", "--table-only"])
    assert all(0.0 <= float(r["aa_mean"]) <= 100.0 for r in rows)
    text = (out / "fewshot.md").read_text()
    assert "| 10 | lorax+ncmf | 0 |" in text and "--variants lorax+ncmf,simplecil,icarl" in text
    configs = {v: (out / "runs" / "10" / v / "seed0" / "config.yaml").read_text()
               for v in ("icarl", "icarl@k1")}
    assert "adapt_blocks: null" in configs["icarl"] and "adapt_blocks: 1" in configs["icarl@k1"]
    steps = (out / "runs" / "10" / "lorax+ncmf" / "seed0" / "steps.jsonl").read_text().splitlines()
    assert [json.loads(s)["task_length"]["steps"] for s in steps] == [2, 2]  # --set reached the run
    # finished runs are reused: the table-only pass finds both
    assert mod.main(argv + ["--table-only"]) == 0
    assert len(list(csv.DictReader(open(out / "fewshot.csv")))) == 4
    # the rescored row comes back from its cache, unchanged
    assert mod.main(argv + rescore + ["--table-only"]) == 0
    again = {r["variant"]: r for r in csv.DictReader(open(out / "fewshot.csv"))}
    assert again["lorax+ncmf:head"] == head
    # a cache written for another training of the run (another AA) is not used
    cache = run / "rescore-head.json"
    stale = {**json.loads(cache.read_text()), "as_trained_aa": 0.123, "multi_real_aa": 0.0}
    cache.write_text(json.dumps(stale))
    assert mod.main(argv + rescore + ["--table-only"]) == 0
    again = {r["variant"]: r for r in csv.DictReader(open(out / "fewshot.csv"))}
    assert again["lorax+ncmf:head"] == head
    assert json.loads(cache.read_text())["as_trained_aa"] == summary["multi_real_aa"]
    # a finished run trained with another configuration than the command now gives (a default
    # changed since, an edited config) stops the script instead of entering the table
    cfg_file = run / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("head_balanced_steps: 0",
                                                     "head_balanced_steps: 5"))
    with pytest.raises(SystemExit, match=r"trained with another configuration.*"
                       r"train\.head_balanced_steps: 5 in the run, 0 now"):
        mod.main(argv + ["--table-only"])
