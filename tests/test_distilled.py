"""The distilled side extractor (``lorax-distill``): a LoRA teacher trains, a side network is
distilled from it and kept. Invariants of the network (only the teacher trains, distillation
moves the student towards the teacher and touches nothing else, the stored state is the
students'), the strategy end to end (train, resume, add a task, predict) and the refusals of
its configuration keys."""

from __future__ import annotations

import json

import pytest
import torch

# the strategy tests share test_class_attention's generated data
from test_class_attention import (
    ca_config,
    data_root,  # noqa: F401  (fixture)
    layerscale_vit,
    make_run,
    x_batch,
)
from test_side import check_train_resume_add_predict

from lorax_cil.models.backbones import create_backbone
from lorax_cil.models.expandable import ExpandableNet
from lorax_cil.models.extractors.distilled import DistilledSideSpec
from lorax_cil.models.extractors.side import SideSpec
from lorax_cil.models.lora import LoraSpec


def make_spec(**kw) -> DistilledSideSpec:
    return DistilledSideSpec(lora=LoraSpec(r=4, alpha=8.0, dropout=0.0, targets="attn"),
                             side=SideSpec(width=8, alpha=8.0), **{"epochs": 20, **kw})


def make_net(tasks: int = 1, **kw) -> ExpandableNet:
    torch.manual_seed(0)
    net = ExpandableNet(backbone=layerscale_vit(), extractor="distilled-side", spec=make_spec(**kw))
    for _ in range(tasks):
        net.add_task(2)
    return net


def teach(net: ExpandableNet, seed: int = 3) -> None:
    """Give the live teacher a trained-looking state (its B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.ext.teacher_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def distil(net: ExpandableNet, h: torch.Tensor) -> dict:
    t = net.num_tasks - 1
    return net.ext.consolidate(t, lambda: [h[:16], h[16:]], batches_per_epoch=2)


def trunk_batch(net: ExpandableNet, n: int = 32) -> torch.Tensor:
    return net.trunk(torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(5)))


def test_spec_round_trip_and_validation():
    spec = make_spec(lr=1e-3)
    assert DistilledSideSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    for bad in ({"epochs": 0}, {"epochs": 2.5}, {"lr": 0.0}, {"lr": float("nan")}):
        with pytest.raises(ValueError, match="DistilledSideSpec"):
            make_spec(**bad)
    with pytest.raises(ValueError, match="unknown keys"):
        DistilledSideSpec.from_dict({**spec.to_dict(), "width": 3})


def test_only_the_teacher_trains_and_a_task_starts_at_the_frozen_feature():
    net = make_net(tasks=1)
    head = {id(p) for p in net.head.parameters()}
    trainable = [p for p in net.trainable_parameters() if id(p) not in head]
    assert trainable and {id(p) for p in trainable} == {id(p) for p in net.ext.teacher_parameters()}
    assert not any(p.requires_grad for p in net.ext.extractors[0].parameters())
    net.eval()
    h = trunk_batch(net, 4)
    with torch.no_grad():
        frozen = net.ext.shared(h)[0]
        torch.testing.assert_close(net.ext.features(h, [0], train=False)[0], frozen)
        teach(net)
        assert not torch.allclose(net.ext.features(h, [0], train=False)[0], frozen)


def test_distillation_moves_the_student_to_its_teacher_and_nothing_else():
    net = make_net(tasks=1)
    net.eval()
    h = trunk_batch(net)
    teach(net, seed=3)
    distil(net, h)
    assert net.ext.teaching is None and all(layer.num_adapters == 0 for layer in net.ext.layers)
    net.add_task(2)
    teach(net, seed=4)
    with torch.no_grad():
        frozen = net.ext.shared(h)[0]
        old = net.ext.features(h, [0], train=False)[0]
        teacher = net.ext.features(h, [1], train=False)[0]
    old_state = {k: v.clone() for k, v in net.ext.task_state_dict(0).items()}
    stats = distil(net, h)
    with torch.no_grad():
        student = net.ext.features(h, [1], train=False)[0]
        residual = float((student - teacher).pow(2).sum() / (teacher - frozen).pow(2).sum())
        torch.testing.assert_close(net.ext.features(h, [0], train=False)[0], old, rtol=0, atol=0)
    assert stats["steps"] == 40 and stats["epochs"] == 20
    assert residual < 0.8, residual  # the student starts at the frozen feature: residual 1
    assert abs(stats["residual"] - residual) < 0.1  # the last epoch's figure, while training
    assert all(torch.equal(v, net.ext.task_state_dict(0)[k]) for k, v in old_state.items())
    assert not any(p.requires_grad for p in net.ext.extractors[1].parameters())
    with pytest.raises(RuntimeError, match="task 1 has no live teacher"):
        distil(net, h)


def test_min_steps_raise_the_epochs():
    net = make_net(tasks=1, epochs=2)
    teach(net)
    h = trunk_batch(net)
    stats = net.ext.consolidate(0, lambda: [h[:16], h[16:]], batches_per_epoch=2, min_steps=7)
    assert (stats["epochs"], stats["steps"]) == (4, 8)


def test_stored_state_is_the_students_and_loading_it_drops_the_teacher():
    net = make_net(tasks=1)
    h = trunk_batch(net)
    teach(net)
    distil(net, h)
    net.add_task(2)
    teach(net, seed=4)
    distil(net, h)
    sd = net.learned_state_dict()
    assert "extractor.1.up.weight" in sd and not any("lora" in k for k in sd)
    arch = json.loads(json.dumps(net.architecture()))
    assert arch["extractor"] == "distilled-side" and arch["distilled_side"]["side"]["width"] == 8
    again = ExpandableNet.from_architecture(arch, layerscale_vit())
    assert again.num_tasks == 2 and again.ext.teaching == 1  # add_task made a teacher; the stored student replaces it
    again.load_learned_state_dict(sd)
    assert again.ext.teaching is None and all(layer.num_adapters == 0 for layer in again.ext.layers)
    net.eval()
    again.eval()
    x = x_batch()
    with torch.no_grad():
        assert torch.equal(net(x), again(x))


def test_a_cnn_is_refused():
    bb = create_backbone("efficientnet-lite0", pretrained=False)
    with pytest.raises(ValueError, match="extractor 'distilled-side' needs a backbone whose blocks"):
        ExpandableNet(backbone=bb, extractor="distilled-side", spec=make_spec())


# --- the strategy end to end ----------------------------------------------------------------------
def distill_config(**train):
    cfg = ca_config(lora_targets="attn", side_width=8)
    cfg.train.strategy = "lorax-distill"
    cfg.train.distill_epochs = 2
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_strategy_trains_resumes_adds_a_task_and_predicts(data_root, tmp_path):  # noqa: F811
    full = make_run(data_root, tmp_path / "full", distill_config(), tasks=("a", "b"))
    assert full.net.extractor == "distilled-side" and full.net.adapt_blocks is None
    spec = full.net.ext.spec
    assert (spec.side.width, spec.epochs, spec.lr, spec.lora.r) == (8, 2, 3e-3, 4)
    check_train_resume_add_predict(data_root, tmp_path, full, distill_config)
    steps = [json.loads(line) for line in (tmp_path / "full" / "steps.jsonl").read_text().splitlines()]
    assert [s["consolidation"]["epochs"] for s in steps] == [2, 2, 2]  # 2 tasks, then the added one
    assert all(s["consolidation"]["steps"] >= 2 for s in steps)
    assert full.net.ext.teaching is None


def test_distillation_keys_are_refused_where_nothing_reads_them(data_root, tmp_path):  # noqa: F811
    cfg = ca_config(side_width=16)
    cfg.train.strategy = "lorax-side"
    with pytest.raises(ValueError, match="model.side_width: read only by strategy lorax-distill"):
        make_run(data_root, tmp_path / "r", cfg)
    cfg = ca_config()
    cfg.train.strategy, cfg.train.distill_lr = "lorax", 1e-3
    with pytest.raises(ValueError, match="train.distill_lr: read only by strategy lorax-distill"):
        make_run(data_root, tmp_path / "r2", cfg)
