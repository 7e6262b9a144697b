"""The class-attention extractor (``lorax-ca``): shared frozen pass, isolation of old tasks,
batched = one by one, the cost formula against counted FLOPs, and the strategy end to end.

The invariants of every kind that reads one shared frozen pass (a new task starts at the frozen
feature, the frozen pass runs once whatever the number of tasks, training a new task leaves
the old ones bit-identical) run here for ``class-attention`` and ``side`` (``lorax-side``,
whose other tests are in test_side.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import assert_same_training_result, make_cddb_tree
from lorax_cil.benchmarks.scenarios import resolve_scenario
from lorax_cil.models.backbones import create_backbone
from lorax_cil.models.expandable import ExpandableNet
from lorax_cil.models.extractors.class_attention import (
    ClassAttentionSpec,
    class_attention_flops,
)
from lorax_cil.models.extractors.side import SideSpec
from lorax_cil.training.config import RunConfig, merge_config
from lorax_cil.training.runner import Run, resume_run

TASKS = ("a", "b", "c")


def layerscale_vit(depth: int = 4):
    """A tiny random timm ViT with LayerScale (random gammas) and qkv bias, as DINOv2 has."""
    import timm

    from lorax_cil.models.timm_vit import wrap_timm_vit

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                              patch_size=8, embed_dim=48, depth=depth, num_heads=3, init_values=0.5,
                              qkv_bias=True)
    with torch.no_grad():
        for blk in model.blocks:
            blk.ls1.gamma.uniform_(0.2, 1.5)
            blk.ls2.gamma.uniform_(0.2, 1.5)
    return wrap_timm_vit(model.eval(), name="vit-ls-test")


SHARED_PASS_KINDS = ("class-attention", "side")
#: a tensor each kind starts at zero (so a new task starts at the frozen feature)
ZERO_STARTED = {"class-attention": ".B", "side": "up.weight"}


def make_net(k: int | None = 2, tasks: int = 1, backbone=None, kind: str = "class-attention",
             **spec) -> ExpandableNet:
    torch.manual_seed(0)
    bb = backbone if backbone is not None else layerscale_vit()
    options = (ClassAttentionSpec(r=4, alpha=8.0, **spec) if kind == "class-attention"
               else SideSpec(**{"width": 8, "alpha": 16.0, **spec}))
    net = ExpandableNet(backbone=bb, extractor=kind, adapt_blocks=k, spec=options)
    for _ in range(tasks):
        net.add_task(2)
    return net


def assert_rebuilt_net_agrees(net: ExpandableNet, arch: dict, sd: dict) -> ExpandableNet:
    """The network rebuilt from ``arch`` (after a JSON round trip) and loaded with ``sd``,
    checked to give ``net``'s logits exactly."""
    again = ExpandableNet.from_architecture(arch, layerscale_vit())
    again.load_learned_state_dict(sd)
    net.eval()
    again.eval()
    x = x_batch()
    with torch.no_grad():
        assert torch.equal(net(x), again(x))
    return again


def randomise(net: ExpandableNet, t: int) -> None:
    """Give task ``t`` a trained-looking state (B and the token offset start at zero)."""
    g = torch.Generator().manual_seed(100 + t)
    with torch.no_grad():
        for p in net.ext.parameters_of(t):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def x_batch(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", SHARED_PASS_KINDS)
@pytest.mark.parametrize("backbone", ["layerscale", "vit-test"])
@pytest.mark.parametrize("k", [1, 2, None])
def test_a_new_task_starts_at_the_frozen_feature(kind, backbone, k):
    torch.manual_seed(0)
    bb = layerscale_vit() if backbone == "layerscale" else create_backbone("vit-test", pretrained=False)
    x = x_batch()
    with torch.no_grad():
        frozen = bb(x)
    net = ExpandableNet(backbone=bb, extractor=kind, adapt_blocks=k)
    net.add_task(2)
    net.eval()
    with torch.no_grad():
        feats = net.forward_all(x).features
    torch.testing.assert_close(feats, frozen, atol=2e-5, rtol=1e-5)
    # a trained task does not give the frozen feature any more
    randomise(net, 0)
    with torch.no_grad():
        assert (net.forward_all(x).features - frozen).abs().max() > 1e-2


@pytest.mark.parametrize("kind", SHARED_PASS_KINDS)
def test_the_frozen_pass_runs_once_whatever_the_number_of_tasks(kind):
    net = make_net(k=2, tasks=1, kind=kind)
    L = net.backbone.num_blocks
    calls = {i: 0 for i in range(L)}
    hooks = [net.backbone.block(i).register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i in range(L)]
    last_qkv = []
    hooks.append(net.backbone.block(L - 1).attn.qkv.register_forward_hook(lambda m, a, o: last_qkv.append(1)))
    x = x_batch(4)
    try:
        for T in (1, 3, 6):
            while net.num_tasks < T:
                net.add_task(2)
            for mode in ("eval", "train"):
                net.train(mode == "train")
                for i in calls:
                    calls[i] = 0
                last_qkv.clear()
                before = net.ext.shared_passes
                out = net.forward_all(x)
                if mode == "train":
                    out.logits.sum().backward()
                    net.zero_grad(set_to_none=True)
                if kind == "class-attention":
                    # blocks 0 .. L-2 run once; of block L-1 only its qkv runs (keys and values)
                    assert calls == {**{i: 1 for i in range(L - 1)}, L - 1: 0}, (T, mode, calls)
                    assert len(last_qkv) == 1
                else:  # every block runs once, its output tapped
                    assert calls == {i: 1 for i in range(L)}, (T, mode, calls)
                assert net.ext.shared_passes == before + 1
    finally:
        for h in hooks:
            h.remove()


def test_batched_tasks_equal_tasks_one_by_one():
    net = make_net(k=3, tasks=4)
    for t in range(4):
        randomise(net, t)
    net.eval()
    with torch.no_grad():
        h = net.trunk(x_batch())
        together = net.ext.features(h, [0, 1, 2, 3], train=False)
        alone = [net.ext.features(h, [t], train=False)[0] for t in range(4)]
        net.max_group_size = 3  # groups of at most 3 tasks: the same features
        grouped = net.ext.features(h, [0, 1, 2, 3], train=False)
    for a, b, c in zip(together, alone, grouped):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(c, b, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(together[0], together[1])


@pytest.mark.parametrize("kind", SHARED_PASS_KINDS)
def test_training_a_new_task_leaves_old_tasks_bit_identical(kind):
    net = make_net(k=2, tasks=1, kind=kind, dropout=0.2)
    randomise(net, 0)
    x = x_batch(6)
    net.eval()
    with torch.no_grad():
        h = net.trunk(x)
        f0 = net.ext.features(h, [0], train=False)[0].clone()
    s0 = net.extractor_state_dict(0)
    backbone = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    net.add_task(2)
    net.train()
    assert {id(p) for p in net.trainable_parameters()} == (
        {id(p) for p in net.ext.parameters_of(1)} | {id(p) for p in net.head.parameters()}
        | {id(p) for p in net.div_head.parameters()})
    opt = torch.optim.AdamW(net.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    y = torch.tensor([0, 1, 2, 3, 2, 3])
    for _ in range(3):
        out = net.forward_all(x)
        loss = torch.nn.functional.cross_entropy(out.logits, y)
        loss = loss + 0.1 * torch.nn.functional.cross_entropy(out.div_logits, net.divergence_targets(y))
        loss.backward()
        # gradients reach the newest task's module only
        assert all(p.grad is not None for p in net.ext.parameters_of(1))
        assert all(p.grad is None for p in net.ext.parameters_of(0))
        assert all(p.grad is None for p in net.backbone.parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
    s0_after = net.extractor_state_dict(0)
    assert s0.keys() == s0_after.keys() and all(torch.equal(s0[k], s0_after[k]) for k in s0)
    assert all(torch.equal(v, net.backbone.state_dict()[k]) for k, v in backbone.items())
    # the new task trained (a tensor that starts at zero moved)
    assert any(v.abs().sum() > 0 for k, v in net.extractor_state_dict(1).items()
               if k.endswith(ZERO_STARTED[kind]))
    net.eval()
    with torch.no_grad():
        h = net.trunk(x)
        assert torch.equal(net.ext.features(h, [0], train=False)[0], f0)
        both = net.forward_all(x).features
    torch.testing.assert_close(both[:, : net.feature_dim], f0, atol=1e-6, rtol=1e-5)


def test_state_and_architecture_round_trip():
    net = make_net(k=2, tasks=3, targets=("q", "fc2"))
    for t in range(3):
        randomise(net, t)
    arch = json.loads(json.dumps(net.architecture()))
    assert arch["extractor"] == "class-attention" and arch["class_attention"]["targets"] == ["q", "fc2"]
    sd = net.learned_state_dict()
    assert "extractor.0.token" in sd and "extractor.2.blocks.1.fc2.B" in sd
    assert not any(".proj." in k or ".fc1." in k for k in sd)
    again = assert_rebuilt_net_agrees(net, arch, sd)
    report = net.parameter_report()
    d, r, hidden = 48, 4, 192
    per = d + 2 * (r * (d + d) + r * (hidden + d))  # token + 2 blocks x (q, fc2)
    assert report["per_extractor"] == [per] * 3 and report["trainable_extractor"] == per
    with pytest.raises(ValueError, match="state mismatch"):
        again.load_extractor_state_dict(0, {k: v for k, v in net.extractor_state_dict(0).items() if k != "token"})


@pytest.mark.parametrize("name", ["efficientnet-lite0", "convit-test"])
def test_non_vit_backbones_are_refused(name):
    bb = create_backbone(name, pretrained=False)
    with pytest.raises(ValueError, match="extractor 'class-attention' needs a timm Vision Transformer"):
        ExpandableNet(backbone=bb, extractor="class-attention", adapt_blocks=1)


def test_spec_is_validated():
    with pytest.raises(ValueError, match="targets"):
        ClassAttentionSpec(targets=("q", "qkv"))
    with pytest.raises(ValueError, match="r must be"):
        ClassAttentionSpec(r=0)
    assert ClassAttentionSpec(targets="q, fc1").targets == ("q", "fc1")
    with pytest.raises(ValueError, match="unknown keys"):
        ClassAttentionSpec.from_dict({"r": 4, "rank": 4})


@pytest.mark.parametrize("k,T", [(1, 1), (2, 5), (4, 3)])
def test_cost_formula_matches_counted_flops(k, T):
    """The formula (multiply-accumulates of the matrix products) against torch's FLOP counter
    on the tail: the shared frozen part of the last k blocks plus T task tokens."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    net = make_net(k=k, tasks=T)
    net.eval()
    bb = net.backbone
    x = x_batch(2)
    # the math attention kernel: its matrix products are counted (the fused CPU kernel is not)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        h = net.trunk(x)
        with FlopCounterMode(display=False) as counter:
            net.ext.features(h, list(range(T)), train=False)
        with FlopCounterMode(display=False) as plain_counter:
            bb.run_blocks(h, 0)  # L plain blocks over the same tokens
    n, d, L = h.shape[1], bb.feature_dim, bb.num_blocks
    hidden = bb.block(0).mlp.fc1.out_features
    cost = class_attention_flops(n=n, dim=d, hidden=hidden, L=L, k=k, T=T, r=4)
    block = cost["plain"] / L
    tail = cost["shared"] - (L - k) * block + T * cost["per_task"]  # the tail's share
    assert counter.get_total_flops() == pytest.approx(2 * 2 * tail, rel=1e-9)  # 2 FLOPs per MAC, batch 2
    assert plain_counter.get_total_flops() == pytest.approx(2 * 2 * cost["plain"], rel=1e-9)


def test_cost_formula_at_twelve_tasks_on_vit_b16():
    """The numbers docs/performance.md quotes: ViT-B/16 at 224 px (197 tokens) and DINOv2 ViT-S/14
    at 112 px (65 tokens), k = 4, r = 16."""
    vitb = class_attention_flops(n=197, dim=768, hidden=3072, L=12, k=4, T=12, r=16)
    vits = class_attention_flops(n=65, dim=384, hidden=1536, L=12, k=4, T=12, r=16)
    # below one pass: the last block's own output for the frozen tokens is never computed
    assert vitb["passes"] == pytest.approx(0.954, abs=1e-3) and vits["passes"] == pytest.approx(0.991, abs=1e-3)
    assert vitb["per_task"] / vitb["plain"] < 0.002


# --- the strategy end to end ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_cddb_tree(tmp_path_factory.mktemp("data"), tasks=TASKS + ("d",), n=6, size=(36, 36),
                          subclass_tasks=())


def ca_config(**model) -> RunConfig:
    m = {"backbone": "vit-test", "pretrained": False, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    m.update(model)
    return merge_config(RunConfig(), {
        "model": m,
        "data": {"scenario": "custom"},
        "train": {"strategy": "lorax-ca", "epochs": 2, "batch_size": 8, "warmup_epochs": 0,
                  "min_steps_per_task": 0, "memory_size": 10, "eval_batch_size": 16,
                  "lr_first": 1e-3, "lr": 1e-3},
    }, source="test")


def make_run(data_root, out, cfg=None, tasks=TASKS) -> Run:
    run = Run(cfg or ca_config(), run_dir=out)
    run.setup(resolve_scenario("custom", data_path=data_root, tasks=list(tasks)))
    return run


def test_strategy_trains_resumes_and_predicts(data_root, tmp_path):
    import lorax_cil

    full = make_run(data_root, tmp_path / "full")
    assert full.net.extractor == "class-attention" and full.net.adapt_blocks == 4
    assert full.net.ext.spec == ClassAttentionSpec(r=4, alpha=8.0, dropout=0.0)
    full.train()
    part = make_run(data_root, tmp_path / "part")
    part.train(stop_after=1)
    resumed = resume_run(tmp_path / "part")
    assert resumed.completed == 1
    resumed.train()
    sa = assert_same_training_result(full, resumed)
    assert "extractor.2.token" in sa
    # memory as lorax: class-balanced within the budget
    counts = {int(k): v for k, v in full.steps[-1]["memory_per_class"].items()}
    assert sum(counts.values()) <= 10 and len(counts) == 6

    pred = lorax_cil.load(tmp_path / "full", device="cpu")
    paths = sorted(str(p) for p in (data_root / "b").rglob("*.png"))[:4]
    proba = pred.predict_proba(paths)
    assert proba.shape == (4, 6) and np.allclose(proba.sum(1), 1, atol=1e-5)
    from lorax_cil.training.evaluate import load_trained

    net, *_ = load_trained(tmp_path / "full")
    assert net.extractor == "class-attention"
    assert all(torch.equal(v, net.learned_state_dict()[k]) for k, v in sa.items())


def test_strategy_add_task_to_a_finished_run(data_root, tmp_path):
    run = make_run(data_root, tmp_path / "r", tasks=("a", "b"))
    run.train()
    before = run.matrices["multi_real"].matrix
    old = run.net.extractor_state_dict(0)
    grown = resume_run(tmp_path / "r", add_tasks=[f"d={data_root / 'd'}"])
    grown.train()
    after = grown.matrices["multi_real"].matrix
    assert after.shape == (3, 3) and not np.isnan(after[2]).any()
    np.testing.assert_array_equal(after[:2, :2], before)
    assert all(torch.equal(v, grown.net.extractor_state_dict(0)[k]) for k, v in old.items())


def test_strategy_refuses_lora_targets_it_cannot_use(data_root, tmp_path):
    with pytest.raises(ValueError, match="model.lora_targets='attn' does not apply to strategy 'lorax-ca'"):
        make_run(data_root, tmp_path / "r", ca_config(lora_targets="attn"))


def test_accuracy_script_refuses_an_out_folder_of_another_head_setting(tmp_path):
    """benchmarks/class_attention_accuracy.py reuses rows by scenario, size, images and epochs;
    a folder whose runs were trained with another read-out or balanced stage stops the command
    (naming both settings) instead of entering the table under the new setting."""
    import argparse
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "class_attention_accuracy.py"
    spec = importlib.util.spec_from_file_location("ca_accuracy", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = argparse.Namespace(readout="head", balanced_steps=100)
    mod.check_training_setting(tmp_path, args)  # a new folder
    (tmp_path / "accuracy.json").write_text(json.dumps({"command": "old"}))
    mod.check_training_setting(tmp_path, args)  # written before the setting was recorded
    (tmp_path / "accuracy.json").write_text(json.dumps({"readout": "head", "balanced_steps": 100}))
    mod.check_training_setting(tmp_path, args)  # the same setting
    (tmp_path / "accuracy.json").write_text(json.dumps({"readout": "head", "balanced_steps": 0}))
    with pytest.raises(SystemExit, match="--balanced-steps 0; this command asks for "
                                         "--readout head --balanced-steps 100: give another --out"):
        mod.check_training_setting(tmp_path, args)
