"""Explicit settings versus strategy presets: every entry of the preset table is checked."""

from __future__ import annotations

import pytest

from lorax_cil.cli import main
from lorax_cil.models.backbones import backbone_family
from lorax_cil.training.config import RunConfig, merge_config
from lorax_cil.training.registry import ByBackbone, PresetConflictError, apply_preset, preset_table

FIXED = [row for row in preset_table() if row[4]]
DEFAULTS = [row for row in preset_table() if not row[4]]


def other_value(key, value):
    """A value of ``key`` different from the preset's ``value``."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.5
    if value is None:
        return 2
    if key == "extractor":
        return "lora" if value != "lora" else "full"
    if key == "readout":
        return "head" if value != "head" else "ncm"
    raise AssertionError(f"no other value for {key}={value!r}")


def config(strategy, section, key, value) -> RunConfig:
    cfg = merge_config(RunConfig(), {section: {key: value}}, source="test")
    return merge_config(cfg, {"train": {"strategy": strategy}}, source="test")


@pytest.mark.parametrize("strategy,section,key,value", [r[:4] for r in FIXED],
                         ids=[f"{r[0]}-{r[2]}" for r in FIXED])
def test_fixed_entry_conflicts_stop_and_name_the_setting(strategy, section, key, value):
    wrong = other_value(key, value)
    how = f"--set {section}.{key}={wrong}"
    with pytest.raises(PresetConflictError) as err:
        apply_preset(config(strategy, section, key, wrong), {f"{section}.{key}": how})
    msg = str(err.value)
    assert msg.startswith(f"{how} conflicts with strategy {strategy!r}")
    assert f"fixes {section}.{key}={value!r}" in msg
    assert "use --strategy" in msg or "no registered strategy accepts it" in msg
    # suggested strategies really accept the value
    if "use --strategy" in msg:
        names = msg.split("use --strategy ")[1].split(" instead")[0].split(" or ")
        for name in names:
            got = apply_preset(config(name, section, key, wrong), {f"{section}.{key}": how})
            assert getattr(getattr(got, section), key) == wrong, name


@pytest.mark.parametrize("strategy,section,key,value", [r[:4] for r in FIXED],
                         ids=[f"{r[0]}-{r[2]}" for r in FIXED])
def test_fixed_entry_set_to_the_preset_value_is_accepted(strategy, section, key, value):
    got = apply_preset(config(strategy, section, key, value), {f"{section}.{key}": "x"})
    assert getattr(getattr(got, section), key) == value


@pytest.mark.parametrize("strategy,section,key,value", [r[:4] for r in FIXED],
                         ids=[f"{r[0]}-{r[2]}" for r in FIXED])
def test_without_explicit_settings_the_preset_applies(strategy, section, key, value):
    got = apply_preset(config(strategy, section, key, other_value(key, value)))
    assert getattr(getattr(got, section), key) == value


@pytest.mark.parametrize("strategy,section,key,value", [r[:4] for r in DEFAULTS],
                         ids=[f"{r[0]}-{r[2]}" for r in DEFAULTS])
def test_default_entries_yield_to_explicit_values(strategy, section, key, value):
    if isinstance(value, ByBackbone):  # the configuration's default backbone decides
        value = value.resolve(backbone_family(RunConfig().model.backbone))
    for mine in (other_value(key, value), None):
        got = apply_preset(config(strategy, section, key, mine), {f"{section}.{key}": "x"})
        assert getattr(getattr(got, section), key) == mine
    assert getattr(getattr(apply_preset(config(strategy, section, key, None)), section),
                   key) == value


def test_cli_flag_against_preset_exits_2_naming_flag_preset_and_alternative(capsys, tmp_path):
    rc = main(["train", "--strategy", "finetune", "--memory-size", "40",
               "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--memory-size 40 conflicts with strategy 'finetune'" in err
    assert "train.memory_size=0" in err and "finetune-replay" in err
    assert not (tmp_path / "r").exists()


def test_cli_config_file_key_against_preset(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  strategy: ewc\n  head_div: 0.3\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"train.head_div: 0.3 in {cfg} conflicts with strategy 'ewc'" in err


def test_compare_announces_the_keys_a_preset_fixes():
    from lorax_cil.training.compare import preset_changes

    shared = merge_config(RunConfig(), {"train": {"memory_size": 40}}, source="test")
    lines = preset_changes(shared, "finetune")
    assert "finetune: train.memory_size=0 (fixed by the strategy; the shared value 40 does not " \
           "apply)" in lines
    assert not any("memory_size" in line for line in preset_changes(shared, "finetune-replay"))


@pytest.mark.parametrize("strategy, r, alpha, dropout", [
    ("lorax", 64, 16.0, 0.1),        # LoRA's official values
    ("lorax-ca", 8, 16.0, 0.1),      # the task tokens' LoRA
    ("lorax-side", 64, 64.0, 0.0),   # side width r: scale 1, no dropout (the measured setting)
    ("lorax-side", 32, 32.0, 0.0),
])
def test_unset_lora_alpha_and_dropout_take_the_extractor_kinds_defaults(strategy, r, alpha, dropout):
    cfg = merge_config(RunConfig(), {"model": {"lora_r": r}, "train": {"strategy": strategy}},
                       source="test")
    assert cfg.model.lora_alpha is None and cfg.model.lora_dropout is None
    got = apply_preset(cfg, {"model.lora_r": "--lora-r"}).model
    assert (got.lora_alpha, got.lora_dropout) == (alpha, dropout)
    # a set value is never replaced, whatever the kind
    mine = merge_config(cfg, {"model": {"lora_alpha": 8.0, "lora_dropout": 0.2}}, source="test")
    got = apply_preset(mine, {"model.lora_alpha": "--lora-alpha"}).model
    assert (got.lora_alpha, got.lora_dropout) == (8.0, 0.2)


def test_compare_announces_strategy_defaults_and_reuses_no_run_of_another_side_width():
    from lorax_cil.training.compare import config_differences, preset_changes

    lines = preset_changes(RunConfig(), "lorax-side")
    assert "lorax-side: model.lora_alpha=64.0 (the strategy's default; the shared configuration " \
           "leaves it unset)" in lines
    run = apply_preset(merge_config(RunConfig(), {"train": {"strategy": "lorax-side"}},
                                    source="test"))
    wider = apply_preset(merge_config(RunConfig(), {"model": {"lora_r": 128},
                                                    "train": {"strategy": "lorax-side"}},
                                      source="test"))
    diff = config_differences(run.to_dict(), wider.to_dict())
    assert "model.lora_r: run has 64, requested 128" in diff
    assert "model.lora_alpha: run has 64.0, requested 128.0" in diff


def test_a_by_backbone_default_resolves_for_the_backbone_family(monkeypatch):
    from lorax_cil.training import registry

    entry = ByBackbone("ncm-frozen", vit="head")
    assert (entry.resolve("vit"), entry.resolve("cnn"), entry.resolve("")) == \
        ("head", "ncm-frozen", "ncm-frozen")
    assert repr(entry) == "'ncm-frozen', 'head' on vit backbones"
    with pytest.raises(ValueError, match=r"unknown backbone families \['rnn'\]"):
        ByBackbone(0, rnn=1)
    preset = registry.get_strategy("lorax")
    monkeypatch.setitem(preset.defaults, "readout", entry)

    def resolved(backbone, **explicit):
        cfg = merge_config(RunConfig(), {"model": {"backbone": backbone},
                                         "train": {"strategy": "lorax", **explicit}},
                           source="test")
        how = {f"train.{k}": "x" for k in explicit}
        return apply_preset(cfg, how).train.readout

    assert resolved("dinov2-vits14") == "head"
    assert resolved("vit_base_patch16_224") == "head"  # a registered pattern
    assert resolved("efficientnet-lite0") == "ncm-frozen"
    assert resolved("my-unregistered-net") == "ncm-frozen"  # unknown family: the plain default
    assert resolved("dinov2-vits14", readout="ncm-relative") == "ncm-relative"  # explicit wins


def test_a_by_backbone_default_can_apply_only_with_another_setting():
    def train(backbone, **explicit):
        cfg = merge_config(RunConfig(), {"model": {"backbone": backbone},
                                         "train": {"strategy": "lorax", **explicit}},
                           source="test")
        t = apply_preset(cfg, {f"train.{k}": "x" for k in explicit}).train
        return t.readout, t.head_balanced_steps

    # the LoRAX family on a ViT: the head, balanced; told to read by class means, no stage
    assert train("dinov2-vits14") == ("head", 100)
    assert train("dinov2-vits14", readout="ncm-frozen") == ("ncm-frozen", 0)
    assert train("dinov2-vits14", readout="head") == ("head", 100)
    assert train("dinov2-vits14", readout="head", head_balanced_steps=0) == ("head", 0)
    assert train("efficientnet-lite0") == ("ncm-frozen", 0)
    assert train("efficientnet-lite0", readout="head") == ("head", 0)  # the official head
    entry = ByBackbone(0, vit=100, only_with={"readout": "head"})
    assert repr(entry) == "0, 100 on vit backbones with readout='head'"


def test_backbone_dependent_defaults_are_announced_not_applied_silently():
    from lorax_cil.training.registry import backbone_default_notes

    def cfg(backbone, **train):
        return merge_config(RunConfig(), {"model": {"backbone": backbone},
                                          "train": {"strategy": "lorax", **train}}, source="t")

    notes = backbone_default_notes(cfg("dinov2-vits14"))
    assert any(n.startswith("train.readout='head': lorax's default on a vit backbone "
                            "(dinov2-vits14; 'ncm-frozen', 'head' on vit backbones)")
               for n in notes), notes
    assert any(n.startswith("train.head_balanced_steps=100:") for n in notes), notes
    assert all("--set train." in n for n in notes)
    cnn = backbone_default_notes(cfg("efficientnet-lite0"))
    assert any(n.startswith("train.readout='ncm-frozen': lorax's default on a cnn backbone")
               for n in cnn), cnn
    # a key the user set is theirs: nothing to announce for it
    notes = backbone_default_notes(cfg("dinov2-vits14", readout="ncm"))
    assert not any(n.startswith("train.readout") for n in notes)
    # and a default that applies only with the head says what it resolved to here
    assert any(n.startswith("train.head_balanced_steps=0:") for n in notes), notes
    assert not backbone_default_notes(merge_config(RunConfig(), {"train": {"strategy": "icarl"}},
                                                   source="t"))
