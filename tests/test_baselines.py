"""The baseline zoo: every registered strategy trains 2 tiny tasks on vit-test through `Run`."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import make_cddb_tree
from lorax_cil.benchmarks.scenarios import resolve_scenario
from lorax_cil.training.config import RunConfig, merge_config
from lorax_cil.training.registry import get_strategy, list_strategies
from lorax_cil.training.run_protocol import ResumeNotSupportedError, check_model_protocol
from lorax_cil.training.runner import Run, build_backbone, resume_run

TASKS = ("a", "b")
ZOO = ("finetune", "finetune-replay", "joint", "replay", "icarl", "lwf", "ewc", "l2p",
       "der-expandable", "memo", "simplecil", "lorax", "lorax-deep", "lorax-mole")
MEMORY = 10


def tiny_config(strategy: str, **train) -> RunConfig:
    t = {"strategy": strategy, "epochs": 1, "batch_size": 8, "warmup_epochs": 0,
         "min_steps_per_task": 0, "memory_size": MEMORY, "eval_batch_size": 16, "lr_first": 1e-3, "lr": 1e-3}
    t.update(train)
    return merge_config(RunConfig(), {
        "model": {"backbone": "vit-test", "pretrained": False, "lora_r": 4, "lora_alpha": 8,
                  "lora_dropout": 0.0},
        "data": {"scenario": "custom", "tasks": list(TASKS)},
        "train": t,
        "baselines": {"l2p_pool_size": 4, "l2p_prompt_length": 2, "l2p_top_k": 2},
    }, source="test")


def make_run(root, out, cfg) -> Run:
    run = Run(cfg, run_dir=out)
    run.setup(resolve_scenario("custom", data_path=root, tasks=list(cfg.data.tasks)))
    return run


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_cddb_tree(tmp_path_factory.mktemp("data"), tasks=TASKS + ("c",), n=6,
                          size=(36, 36), subclass_tasks=())


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """Every registered strategy, trained once on the same two tasks (seed 0)."""
    out = tmp_path_factory.mktemp("runs")
    runs = {}
    for name in list_strategies():
        run = make_run(data_root, out / name, tiny_config(name))
        run.train()
        runs[name] = run
    return runs


def test_the_zoo_is_registered_with_descriptions():
    assert set(ZOO) <= set(list_strategies())
    for name in ZOO:
        assert get_strategy(name).description
    assert "dark-er" not in list_strategies()  # Avalanche's DER is not offered (docs say why)
    assert not get_strategy("ewc").resumable and not get_strategy("icarl").resumable


@pytest.mark.parametrize("name", ZOO)
def test_every_strategy_fills_its_accuracy_matrices(trained, name):
    run = trained[name]
    for metric in ("multi_real", "binary", "strict", "ap"):
        R = run.matrices[metric].matrix
        if name == "joint":  # one final row: trained once, on everything, at the last task
            assert np.isnan(R[0]).all() and not np.isnan(R[1]).any()
        else:
            assert not np.isnan(R[np.tril_indices(2)]).any() and np.isnan(R[0, 1])
    summary = run.summary()
    assert summary["completed_tasks"] == 2 and 0.0 <= summary["multi_real_aa"] <= 1.0
    assert (run.run_dir / "checkpoints" / "exp_001" / "meta.json").is_file()
    assert check_model_protocol(run.net) == []
    assert run.net.num_classes == 4
    report = run.net.parameter_report()
    assert {"trainable_extractor", "trainable", "total_stored"} <= set(report)
    assert report["total_stored"] >= report["trainable"] >= 0


@pytest.mark.parametrize("name", ZOO)
def test_final_checkpoint_reloads_to_identical_logits(trained, name):
    from lorax_cil.training.evaluate import load_trained

    run = trained[name]
    x = torch.randn(3, 3, 32, 32)
    net, cfg, scenario, _ = load_trained(run.run_dir)
    run.net.eval()
    with torch.no_grad():
        expected, got = run.net(x), net(x)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_joint_bwt_and_forgetting_are_undefined(trained):
    s = trained["joint"].summary()
    assert np.isnan(s["multi_real_bwt"]) and np.isnan(s["multi_real_forgetting"])
    assert trained["joint"].steps[0]["per_task"] == {}


def test_every_strategy_sees_the_same_frozen_trunk(trained):
    """The backbone (adapters aside) is the seed's backbone for every strategy."""
    reference = build_backbone(tiny_config("lorax"))
    ref = {k: v for k, v in reference.model.named_parameters()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref_trunk = reference.run_blocks(reference.stem(x), 0, 2)
    for name, run in trained.items():
        bb = run.net.backbone
        for k, v in bb.model.named_parameters():
            if "lora" not in k and ".adapters." not in k:
                assert torch.equal(v, ref[k.replace(".base.", ".")] if k not in ref else ref[k]), (
                    name, k)
        if name in ("simplecil", "l2p", "memo", "lorax-deep"):
            with torch.no_grad():
                assert torch.equal(bb.run_blocks(bb.stem(x), 0, 2), ref_trunk), name


def test_exemplar_budgets(trained):
    for name in ("finetune-replay", "replay", "icarl", "lorax", "der-expandable", "memo"):
        counts = trained[name].steps[-1]["memory_per_class"]
        assert len(counts) == 4 and sum(counts.values()) <= MEMORY, (name, counts)
        assert max(counts.values()) - min(counts.values()) <= 1, (name, counts)
    for name in ("finetune", "ewc", "lwf", "l2p", "simplecil", "joint"):
        assert trained[name].cfg.train.memory_size == 0 and not trained[name].steps[-1][
            "memory_per_class"]


def test_expandable_baselines_are_configurations(trained):
    der, memo = trained["der-expandable"].net, trained["memo"].net
    assert (der.extractor, der.adapt_blocks, der.num_extractors) == ("full", None, 2)
    assert (memo.extractor, memo.adapt_blocks) == ("full", 3)
    assert der.div_head is not None and memo.div_head is not None
    # DER copies every block per task; MEMO only the last k: fewer stored parameters
    assert memo.parameter_report()["total_stored"] < der.parameter_report()["total_stored"]


def test_simplecil_needs_no_optimizer_step_and_prototypes_are_class_means(data_root, tmp_path):
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    from torch.utils.data import DataLoader

    steps = []
    hook = register_optimizer_step_pre_hook(lambda *a, **k: steps.append(1))
    try:
        run = make_run(data_root, tmp_path / "s", tiny_config("simplecil"))
        before = {k: v.clone() for k, v in run.net.backbone.state_dict().items()}
        run.train()
    finally:
        hook.remove()
    assert steps == [] and run.strategy.optimizer is None
    assert not any(p.requires_grad for p in run.net.parameters())
    assert all(torch.equal(v, run.net.backbone.state_dict()[k]) for k, v in before.items())
    for t in range(2):
        ds = run.bench.train_stream[t].dataset.eval()
        feats, labels = [], []
        for x, y, _ in DataLoader(ds, batch_size=5, collate_fn=ds.collate_fn):
            with torch.no_grad():
                feats.append(run.net.backbone(x))
            labels.append(torch.as_tensor(y))
        feats, labels = torch.cat(feats), torch.cat(labels)
        for c in (2 * t, 2 * t + 1):
            torch.testing.assert_close(run.net.prototypes[c], feats[labels == c].mean(0),
                                       rtol=1e-5, atol=1e-6)


def test_l2p_refuses_a_cnn_backbone_and_names_the_requirement(data_root, tmp_path):
    cfg = merge_config(tiny_config("l2p"), {"model": {"backbone": "efficientnet-lite0"},
                                             "data": {"crop": 32}}, source="test")
    with pytest.raises(ValueError, match="'l2p' cannot run on backbone 'efficientnet-lite0'.*"
                                         "timm VisionTransformer"):
        make_run(data_root, tmp_path / "l2p", cfg)


def test_icarl_refuses_a_memory_smaller_than_the_class_count(data_root, tmp_path):
    with pytest.raises(ValueError, match="icarl.*at least one exemplar per class"):
        make_run(data_root, tmp_path / "i", tiny_config("icarl", memory_size=3))


def test_icarl_features_survive_avalanches_unguarded_normalisation():
    """A CNN's pooled ReLU feature can be all zeros; Avalanche divides by its norm (NaN)."""
    from types import SimpleNamespace

    from lorax_cil.training.icarl import _Features

    class Zero(torch.nn.Module):
        def forward_all(self, x):
            return SimpleNamespace(features=torch.zeros(len(x), 5))

    D = _Features(Zero())(torch.zeros(2, 3)).T
    assert torch.isfinite(D / torch.norm(D, dim=0)).all()


def test_non_resumable_strategy_refuses_to_resume(data_root, tmp_path):
    run = make_run(data_root, tmp_path / "ewc", tiny_config("ewc"))
    run.train(stop_after=1)
    with pytest.raises(ResumeNotSupportedError, match="'ewc' cannot resume.*importances"):
        resume_run(tmp_path / "ewc")


@pytest.mark.parametrize("name", ["replay", "lwf"])
def test_resumed_avalanche_baseline_equals_uninterrupted_run(data_root, tmp_path, name):
    tasks = ["a", "b", "c"]
    cfg = merge_config(tiny_config(name), {"data": {"tasks": tasks}}, source="test")
    full = make_run(data_root, tmp_path / "full", cfg)
    full.train()
    part = make_run(data_root, tmp_path / "part", cfg)
    part.train(stop_after=1)
    resumed = resume_run(tmp_path / "part")
    resumed.train()
    np.testing.assert_array_equal(full.matrices["multi_real"].matrix,
                                  resumed.matrices["multi_real"].matrix)
    a, b = full.net.learned_state_dict(), resumed.net.learned_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_joint_epochs_option_sets_the_joint_training_length(data_root, tmp_path):
    from lorax_cil.training.avalanche_baselines import build_joint
    from lorax_cil.training.runner import build_network

    cfg = merge_config(tiny_config("joint", epochs=2), {"baselines": {"joint_epochs": 5}},
                       source="test")
    net = build_network(cfg, build_backbone(cfg))
    assert build_joint(cfg, net, torch.device("cpu"), None, []).train_epochs == 5
    assert build_joint(tiny_config("joint", epochs=2), net, torch.device("cpu"), None,
                       []).train_epochs == 2
    with pytest.raises(ValueError, match="baselines.joint_epochs must be >= 1"):
        merge_config(cfg, {"baselines": {"joint_epochs": 0}}, source="test")  # refused on load
    bad = copy.deepcopy(cfg)
    bad.baselines.joint_epochs = 0  # set past the config checks: the builder refuses it too
    with pytest.raises(ValueError, match="joint_epochs"):
        build_joint(bad, net, torch.device("cpu"), None, [])


def test_lorax_mole_is_refused_on_a_backbone_without_vit_mlps():
    from lorax_cil.training.baselines import check_compatible
    from lorax_cil.training.registry import apply_preset

    cfg = apply_preset(merge_config(tiny_config("lorax-mole"), {
        "model": {"backbone": "efficientnet-lite0", "pretrained": False}}, source="test"))
    with pytest.raises(ValueError, match="lorax-mole.*efficientnet-lite0.*mlp.fc1"):
        check_compatible(cfg, build_backbone(cfg))
    vit = apply_preset(tiny_config("lorax-mole"))
    check_compatible(vit, build_backbone(vit))  # a timm ViT has MLPs: accepted
