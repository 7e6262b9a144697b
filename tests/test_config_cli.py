"""Configuration loading and precedence, and the command line's cheap paths and errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lorax_cil.cli import build_parser, main
from lorax_cil.commands.train import config_from_args, parse_set
from lorax_cil.training.config import RunConfig, load_config, merge_config
from lorax_cil.training.registry import apply_preset, get_strategy, list_strategies

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_section_and_key_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key train.epoch; valid keys: .*epochs"):
        merge_config(RunConfig(), {"train": {"epoch": 3}}, source="x.yaml")
    with pytest.raises(ValueError, match="unknown section 'trian'"):
        merge_config(RunConfig(), {"trian": {}}, source="x.yaml")
    with pytest.raises(ValueError, match="train.epochs must be an integer"):
        merge_config(RunConfig(), {"train": {"epochs": "many"}}, source="x.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2")
    with pytest.raises(ValueError, match="invalid YAML"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_flags_override_config_file_which_overrides_defaults(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  epochs: 7\n  lr: 0.01\nmodel:\n  backbone: vit-test\n")
    parser = build_parser()
    args = parser.parse_args(["train", "--config", str(cfg_file), "--epochs", "2",
                              "--set", "train.warmup_epochs=1", "--no-pretrained"])
    cfg = config_from_args(args)
    assert cfg.train.epochs == 2            # flag beats file
    assert cfg.train.lr == 0.01             # file beats default
    assert cfg.train.batch_size == 32       # default
    assert cfg.train.warmup_epochs == 1 and cfg.model.pretrained is False
    assert cfg.model.backbone == "vit-test"


def test_set_parsing():
    assert parse_set(["train.lr=1e-3", "data.hflip=true"]) == {
        "train": {"lr": 1e-3}, "data": {"hflip": True}}
    with pytest.raises(ValueError, match="SECTION.KEY=VALUE"):
        parse_set(["lr=3"])


@pytest.mark.parametrize("name", ["cddb-easy", "cddb-hard", "cddb-long"])
def test_paper_configs_load_and_match_the_reference(name):
    raw = load_config(ROOT / "benchmarks" / "configs" / f"{name}.yaml")
    cfg = apply_preset(merge_config(RunConfig(), raw, source=name))
    assert cfg.data.scenario == name and cfg.model.backbone == "convit_base"
    assert (cfg.model.lora_r, cfg.model.lora_alpha, cfg.model.lora_targets) == (64, 16.0,
                                                                                "lorax-paper")
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.memory_size) == (50, 32, 500)
    assert (cfg.train.lr_first, cfg.train.lr, cfg.train.head_div) == (1e-4, 5e-4, 0.1)


def test_strategy_registry_and_presets():
    assert {"lorax", "lorax-deep", "finetune", "finetune-replay"} <= set(list_strategies())
    with pytest.raises(ValueError, match="unknown strategy 'lorx'.*lorax"):
        get_strategy("lorx")
    ft = apply_preset(merge_config(RunConfig(), {"train": {"strategy": "finetune",
                                                           "memory_size": 500}}, source="t"))
    assert ft.train.memory_size == 0 and ft.model.extractor == "finetune"
    deep = apply_preset(merge_config(RunConfig(), {"train": {"strategy": "lorax-deep"}},
                                     source="t"))
    assert deep.model.adapt_blocks == 3


def test_help_does_not_import_heavy_packages():
    code = ("import sys, lorax_cil.cli as c\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'avalanche', 'timm', 'open_clip', 'peft') "
            "if m in sys.modules]\nprint('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["train", "--add-task", "x=/tmp/x"]) == 2
    assert "--add-task needs --resume" in capsys.readouterr().err
    assert main(["data", "verify", "--data-path", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--scenario", "cddb-medium", "--data-path", str(tmp_path)]) == 2
    assert "unknown scenario 'cddb-medium'" in capsys.readouterr().err


def test_amp_and_device_flags_resolve_or_fail_clearly():
    import torch

    from lorax_cil.utils import resolve_amp, resolve_device

    cpu = torch.device("cpu")
    assert [resolve_amp(v, cpu) for v in ("auto", True, "true", "no")] == [False] * 4  # CPU: never
    with pytest.raises(ValueError, match="amp must be auto, true or false, got 'maybe'"):
        resolve_amp("maybe", cpu)
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_flat_config_keys_survive_a_yaml_round_trip():
    import yaml

    from lorax_cil.training.compare import config_differences
    from lorax_cil.training.integrity import protocol_changes
    from lorax_cil.utils import flatten_dict

    cfg = merge_config(RunConfig(), {"data": {"tasks": ["a", "b"]}, "train": {"lr": 3e-4}},
                       source="test")
    flat = flatten_dict(cfg.to_dict())
    assert flat["train.lr"] == 3e-4 and flat["data.tasks"] == ["a", "b"]
    assert not any(isinstance(v, (dict, tuple)) for v in flat.values())
    saved = yaml.safe_load(yaml.safe_dump(cfg.to_dict()))
    assert flatten_dict(saved) == flat
    assert config_differences(saved, cfg.to_dict()) == []
    other = merge_config(cfg, {"train": {"lr": 1e-3}}, source="test")
    assert protocol_changes(saved, other.to_dict()) == {"train.lr": [3e-4, 1e-3]}
    assert config_differences(saved, other.to_dict()) == ["train.lr: run has 0.0003, requested 0.001"]
