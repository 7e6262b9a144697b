"""`lorax-cil demo` end to end on a tiny synthetic dataset with a random ViT."""

from __future__ import annotations

import json

from lorax_cil.cli import main


def test_demo_runs_strategies_side_by_side_and_writes_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["-q", "demo", "--out", str(out), "--data-dir", str(tmp_path / "data"),
               "--backbone", "vit-test", "--per-class", "6", "--val-per-class", "3",
               "--size", "32", "--epochs", "1", "--memory-size", "14",
               "--strategies", "lorax,finetune"])
    printed = capsys.readouterr().out
    assert rc == 0
    for name in ("summary.md", "average_accuracy.png", "matrices.png", "contact_sheet.png",
                 "data_manifest.json"):
        assert (out / name).is_file(), name
    table = (out / "summary.md").read_text()
    assert "| lorax " in table and "| finetune " in table and "all blocks adapted" in table
    assert "LoRAX AA minus fine-tuning AA" in printed
    for strategy in ("lorax", "finetune"):
        summary = json.loads((out / strategy / "summary.json").read_text())
        assert summary["completed_tasks"] == 7 and summary["strategy"] == strategy
        assert 0.0 <= summary["multi_real_aa"] <= 1.0
        matrix = (out / strategy / "accuracy_multi_real.csv").read_text().splitlines()
        assert len(matrix) == 8  # header + one row per task
