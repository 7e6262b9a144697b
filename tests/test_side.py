"""The side extractor (``lorax-side``): state round trip, refusal of non-token backbones, the
cost formula against counted FLOPs, and the strategy end to end. The invariants it shares with
``class-attention`` (start at the frozen feature, one frozen pass for every task, isolation of
old tasks) are parametrized over both kinds in test_class_attention.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

# the strategy tests share test_class_attention's generated data
from test_class_attention import (
    assert_rebuilt_net_agrees,
    ca_config,
    data_root,  # noqa: F401  (fixture)
    make_run,
    randomise,
    x_batch,
)
from test_class_attention import (
    make_net as ca_make_net,
)

from conftest import assert_same_training_result
from lorax_cil.models.backbones import create_backbone
from lorax_cil.models.expandable import ExpandableNet
from lorax_cil.models.extractors.side import SideSpec, side_flops
from lorax_cil.training.runner import resume_run


def make_net(k: int | None = 2, tasks: int = 1, **spec) -> ExpandableNet:
    return ca_make_net(k=k, tasks=tasks, kind="side", **spec)


def test_state_and_architecture_round_trip():
    net = make_net(k=2, tasks=3, mlp_ratio=1.5)
    for t in range(3):
        randomise(net, t)
    arch = json.loads(json.dumps(net.architecture()))
    assert arch["extractor"] == "side" and arch["side"]["width"] == 8 and arch["side"]["mlp_ratio"] == 1.5
    sd = net.learned_state_dict()
    assert "extractor.2.down.2.weight" in sd and "extractor.0.mlp.1.fc2.bias" in sd
    assert_rebuilt_net_agrees(net, arch, sd)
    d, w, hid, k = 48, 8, 12, 2
    per = (k + 1) * (d * w + w) + k * (w * hid + hid + hid * w + w) + (w * d + d)
    assert net.parameter_report()["per_extractor"] == [per] * 3


@pytest.mark.parametrize("name,k", [("efficientnet-lite0", 1), ("convit-test", None)])
def test_backbones_without_one_token_layout_are_refused(name, k):
    """A CNN's stages change shape; ConViT adds its class token after its local blocks (its
    last blocks alone keep one layout and are accepted)."""
    bb = create_backbone(name, pretrained=False)
    with pytest.raises(ValueError, match="extractor 'side' needs a backbone whose blocks keep one"):
        ExpandableNet(backbone=bb, extractor="side", adapt_blocks=k)
    if name == "convit-test":
        ExpandableNet(backbone=bb, extractor="side", adapt_blocks=1).add_task(2)


def test_spec_is_validated():
    with pytest.raises(ValueError, match="width must be"):
        SideSpec(width=0)
    with pytest.raises(ValueError, match="dropout"):
        SideSpec(dropout=1.0)
    with pytest.raises(ValueError, match="unknown keys"):
        SideSpec.from_dict({"width": 4, "rank": 4})
    assert SideSpec.from_dict(SideSpec(width=4, alpha=2.0).to_dict()) == SideSpec(width=4, alpha=2.0)


@pytest.mark.parametrize("k,T", [(1, 1), (2, 4), (None, 2)])
def test_cost_formula_matches_counted_flops(k, T):
    from torch.utils.flop_counter import FlopCounterMode

    net = make_net(k=k, tasks=T)
    net.eval()
    bb = net.backbone
    x = x_batch(2)
    with torch.no_grad():
        h = net.trunk(x)
        frozen, taps = net.ext.shared(h)
        with FlopCounterMode(display=False) as counter:  # the per-task part only
            for t in range(T):
                net.ext.extractors[t](taps)
    n, d, L = h.shape[1], bb.feature_dim, bb.num_blocks
    hidden = bb.block(0).mlp.fc1.out_features
    cost = side_flops(n=n, dim=d, hidden=hidden, L=L, k=net.ext.k, T=T, width=8)
    assert counter.get_total_flops() == pytest.approx(2 * 2 * T * cost["per_task"], rel=1e-9)
    assert cost["passes"] == pytest.approx(1 + T * cost["per_task"] / cost["plain"])


@pytest.mark.parametrize("n,dim,width,passes", [(197, 768, 64, 1.11), (17, 384, 64, 1.29),
                                                 (197, 768, 128, 1.28), (17, 384, 128, 1.80)])
def test_cost_formula_at_twelve_tasks(n, dim, width, passes):
    """The numbers docs/class-attention.md and docs/performance.md quote: every block of a
    12-block ViT, T = 12 (ViT-B/16 at 224 px: 197 tokens; ViT-S/14 at 56 px: 17 tokens)."""
    cost = side_flops(n=n, dim=dim, hidden=4 * dim, L=12, k=12, T=12, width=width)
    assert round(cost["passes"], 2) == passes


def test_side_networks_run_together_as_each_alone_and_the_training_one_apart(monkeypatch):
    """Evaluation runs every task's side network in one batched pass; the result is each
    network's own output, and a task that trains with dropout is never batched."""
    net = make_net(k=2, tasks=4, dropout=0.5)
    for t in range(4):
        randomise(net, t)
    net.eval()
    h = net.trunk(x_batch())
    with torch.no_grad():
        alone = [net.ext.features(h, [t], train=False)[0] for t in range(4)]
        together = net.ext.features(h, [0, 1, 2, 3], train=False)
    for a, b in zip(alone, together):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(together[0], together[1])
    # frozen networks are stacked once; a weight changed in place (a loaded state) is seen
    with torch.no_grad():
        next(net.ext.extractors[1].parameters()).mul_(-1.0)
        again = net.ext.features(h, [0, 1, 2, 3], train=False)
        torch.testing.assert_close(again[1], net.ext.features(h, [1], train=False)[0],
                                   atol=1e-6, rtol=1e-5)
    assert not torch.allclose(again[1], together[1])
    batched = []
    original = type(net.ext)._run_together
    monkeypatch.setattr(type(net.ext), "_run_together",
                        lambda self, taps, tasks: batched.append(list(tasks)) or
                        original(self, taps, tasks))
    net.train()  # tasks 0-2 are frozen, task 3 trains with dropout
    net.ext.features(h, [0, 1, 2, 3], train=True)
    assert batched == [[0, 1, 2]]


# --- the strategy end to end ----------------------------------------------------------------------
def side_config(**model):
    cfg = ca_config(lora_r=8, lora_alpha=8, **model)
    cfg.train.strategy = "lorax-side"
    return cfg


def test_strategy_trains_resumes_adds_a_task_and_predicts(data_root, tmp_path):  # noqa: F811
    full = make_run(data_root, tmp_path / "full", side_config(), tasks=("a", "b"))
    assert full.net.extractor == "side" and full.net.adapt_blocks is None
    assert full.net.ext.spec == SideSpec(width=8, alpha=8.0, dropout=0.0)
    # the lorax family's read-out on a ViT: the head, balanced after each task
    assert (full.cfg.train.readout, full.cfg.train.head_balanced_steps) == ("head", 100)
    check_train_resume_add_predict(data_root, tmp_path, full, side_config)


def check_train_resume_add_predict(root, tmp_path, full, make_config) -> None:
    """Train ``full`` (2 tasks, in ``tmp_path / "full"``); a run stopped after its first task
    and resumed ends with the same stored tensors (the second task's side network among them);
    adding a task leaves the first rows of the matrices as they were; the run predicts."""
    import lorax_cil

    full.train()
    part = make_run(root, tmp_path / "part", make_config(), tasks=("a", "b"))
    part.train(stop_after=1)
    resumed = resume_run(tmp_path / "part")
    resumed.train()
    assert "extractor.1.up.weight" in assert_same_training_result(full, resumed)
    before = full.matrices["multi_real"].matrix
    grown = resume_run(tmp_path / "full", add_tasks=[f"d={root / 'd'}"])
    grown.train()
    after = grown.matrices["multi_real"].matrix
    assert after.shape == (3, 3) and not np.isnan(after[2]).any()
    np.testing.assert_array_equal(after[:2, :2], before)
    pred = lorax_cil.load(tmp_path / "full", device="cpu")
    paths = sorted(str(p) for p in (root / "b").rglob("*.png"))[:4]
    proba = pred.predict_proba(paths)
    assert proba.shape == (4, 6) and np.allclose(proba.sum(1), 1, atol=1e-5)


def test_strategy_refuses_lora_targets_it_cannot_use(data_root, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="model.lora_targets='attn' does not apply to strategy 'lorax-side'"):
        make_run(data_root, tmp_path / "r", side_config(lora_targets="attn"))
