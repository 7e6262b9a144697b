"""Explicit settings versus strategy presets: every entry of the preset table is checked."""

from __future__ import annotations

import pytest

from lorax_cil.cli import main
from lorax_cil.training.config import RunConfig, merge_config
from lorax_cil.training.registry import PresetConflictError, apply_preset, preset_table

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
