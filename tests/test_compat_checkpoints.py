"""Checkpoints written by an earlier version load unchanged and give the same outputs.

The fixtures in tests/data/compat/ were written by ``tests/data/make_compat_checkpoints.py`` at
the commit named in ``written_by.json``, before the extractor interface existed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorax_cil.models.backbones import create_backbone
from lorax_cil.models.expandable import ExpandableNet
from lorax_cil.training.checkpoint import load_checkpoint

DATA = Path(__file__).resolve().parent / "data" / "compat"
NETS = ["lora", "lora-k2", "mole", "full", "finetune", "frozen"]
RUNS = ["lorax", "memo"]


def _input() -> torch.Tensor:
    return load_file(str(DATA / "input.safetensors"))["x"]


def _check_outputs(net, folder: Path) -> None:
    expected = load_file(str(folder / "expected.safetensors"))
    net.eval()
    with torch.no_grad():
        out = net.forward_all(_input())
    torch.testing.assert_close(out.logits, expected["logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.features, expected["features"], rtol=1e-5, atol=1e-6)


def test_fixtures_come_from_an_earlier_commit():
    info = json.loads((DATA / "written_by.json").read_text())
    assert len(info["commit"]) == 40 and info["lorax_cil_modified"] is False


@pytest.mark.parametrize("kind", NETS)
def test_expandable_net_checkpoint_loads_with_the_same_outputs(kind):
    folder = DATA / f"net-{kind}"
    tensors, meta = load_checkpoint(folder / "checkpoint")
    torch.manual_seed(meta["backbone_seed"])
    net = ExpandableNet.from_architecture(meta["architecture"], create_backbone("vit-test"))
    net.load_learned_state_dict(tensors)
    assert net.architecture() == meta["architecture"]  # the record itself is unchanged
    sd = net.learned_state_dict()
    assert sorted(sd) == sorted(tensors)  # same tensor names
    for k, v in tensors.items():
        assert torch.equal(sd[k], v), k
    _check_outputs(net, folder)


@pytest.mark.parametrize("strategy", RUNS)
def test_run_checkpoint_and_config_load_with_the_same_outputs(strategy):
    from lorax_cil.training.config import RunConfig, load_config
    from lorax_cil.training.evaluate import load_trained

    folder = DATA / f"run-{strategy}"
    net, cfg, scenario, meta = load_trained(folder)
    assert cfg.train.strategy == strategy and scenario.task_names == ["a", "b"]
    assert net.architecture() == meta["architecture"]
    saved = RunConfig.from_dict(load_config(folder / "config.yaml"), source="config.yaml")
    assert saved.to_dict() == RunConfig.from_dict(meta["config"], source="meta").to_dict()
    _check_outputs(net, folder)
