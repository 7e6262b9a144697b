"""LoRAX runs end to end on tiny data: invariants, memory, resume and adding a task."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import assert_same_training_result, make_cddb_tree
from lorax_cil.benchmarks.scenarios import resolve_scenario
from lorax_cil.training.config import RunConfig, merge_config
from lorax_cil.training.runner import Run, resume_run

TASKS = ("a", "b", "c")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_cddb_tree(tmp_path_factory.mktemp("data"), tasks=TASKS + ("d",), n=6,
                          size=(36, 36), subclass_tasks=("c",))


def tiny_config(**train) -> RunConfig:
    t = {"epochs": 2, "batch_size": 8, "warmup_epochs": 1, "memory_size": 10,
         "min_steps_per_task": 0,
         "eval_batch_size": 16}
    t.update(train)
    return merge_config(RunConfig(), {
        "model": {"backbone": "vit-test", "pretrained": False, "lora_r": 4, "lora_alpha": 8,
                  "lora_dropout": 0.0},
        "data": {"scenario": "custom"},
        "train": t,
    }, source="test")


def make_run(data_root, out, cfg=None, tasks=TASKS) -> Run:
    run = Run(cfg or tiny_config(), run_dir=out)
    run.setup(resolve_scenario("custom", data_path=data_root, tasks=list(tasks)))
    return run


def adapter_state(run: Run, index: int) -> dict[str, torch.Tensor]:
    from lorax_cil.models.lora import adapter_state_dict

    return {k: v.clone() for k, v in adapter_state_dict(run.net.backbone.model, index).items()}


def test_old_adapters_and_backbone_stay_bit_identical(data_root, tmp_path):
    run = make_run(data_root, tmp_path / "r")
    run.run_dir.mkdir(parents=True)
    run._write_static()
    run._train_step(0)
    a0 = adapter_state(run, 0)
    base = {k: v.clone() for k, v in run.net.backbone.state_dict().items() if ".adapters." not in k
            and "lora" not in k}
    run._train_step(1)
    run._train_step(2)
    assert all(torch.equal(a0[k], v) for k, v in adapter_state(run, 0).items())
    after = run.net.backbone.state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)
    # the newest adapter did train (B starts at zero and moved)
    assert any(v.abs().sum() > 0 for k, v in adapter_state(run, 2).items() if "B" in k or "_b" in k)


def test_head_grows_and_divergence_head_targets_new_task(data_root, tmp_path):
    run = make_run(data_root, tmp_path / "r")
    run.train(stop_after=2)
    assert run.net.head.out_features == 4 and run.net.head.in_features == 2 * run.net.feature_dim
    assert run.net.div_head is not None and run.net.div_head.out_features == 3


def test_memory_budget_class_balanced_and_stored_as_paths(data_root, tmp_path):
    run = make_run(data_root, tmp_path / "r", tiny_config(memory_size=9))
    run.train()
    for step in run.steps:
        counts = {int(k): v for k, v in step["memory_per_class"].items()}
        n_classes = 2 * (step["step"] + 1)
        assert sum(counts.values()) <= 9 and len(counts) == n_classes
        assert max(counts.values()) - min(counts.values()) <= 1  # balanced
    state = run.strategy.memory.state(run.bench.paths_of)
    train_paths = {s.path: s.label for per in run.bench.samples["train"] for s in per}
    for c, paths in state.items():
        assert len(set(paths)) == len(paths)
        assert all(train_paths[p] == int(c) for p in paths)


def test_resume_gives_the_same_matrix_as_an_uninterrupted_run(data_root, tmp_path):
    full = make_run(data_root, tmp_path / "full")
    full.train()
    part = make_run(data_root, tmp_path / "part")
    part.train(stop_after=1)
    resumed = resume_run(tmp_path / "part")
    assert resumed.completed == 1
    resumed.train()
    assert_same_training_result(full, resumed)


def test_add_task_to_finished_run_keeps_old_labels_and_rows(data_root, tmp_path):
    run = make_run(data_root, tmp_path / "r", tasks=("a", "b"))
    run.train()
    before = run.matrices["multi_real"].matrix
    grown = resume_run(tmp_path / "r", add_tasks=[f"d={data_root / 'd'}"])
    assert grown.scenario.task_names == ["a", "b", "d"]
    assert grown.scenario.class_names[:4] == run.scenario.class_names
    grown.train()
    after = grown.matrices["multi_real"].matrix
    assert after.shape == (3, 3)
    np.testing.assert_array_equal(after[:2, :2], before)
    assert not np.isnan(after[2]).any()
    steps = [json.loads(line) for line in (tmp_path / "r" / "steps.jsonl").read_text().splitlines()]
    assert [s["task"] for s in steps] == ["a", "b", "d"]


def test_run_directory_outputs(data_root, tmp_path):
    run = make_run(data_root, tmp_path / "r", tiny_config(strategy="finetune"))
    summary = run.train()
    out = tmp_path / "r"
    for name in ("config.yaml", "data_manifest.json", "steps.jsonl", "summary.json",
                 "accuracy_multi_real.csv", "accuracy_binary.csv", "accuracy_strict.csv",
                 "ap.csv", "accuracy_matrix.png", "accuracy_over_steps.png",
                 "checkpoints/exp_002/tensors.safetensors", "checkpoints/exp_002/meta.json"):
        assert (out / name).is_file(), name
    assert summary["memory_size"] == 0  # the finetune preset forces no memory
    assert 0.0 <= summary["multi_real_aa"] <= 1.0
    assert summary["parameters"]["extractor"] == "finetune"


def test_lorax_mole_preset_trains_with_the_router_balance_loss(data_root, tmp_path):
    """`lorax-mole`: MoLE extractors on the last 3 blocks; the balance loss reaches the criterion."""
    cfg = tiny_config(strategy="lorax-mole", epochs=1)
    run = make_run(data_root, tmp_path / "r", cfg, tasks=("a", "b"))
    run.train(stop_after=1)
    assert run.net.extractor == "mole" and run.net.adapt_blocks == 3
    strategy = run.strategy
    strategy.model.train()
    size = run.net.backbone.spec.input_size
    strategy.mbatch = [torch.randn(4, 3, size, size), torch.tensor([0, 1, 0, 1]),
                       torch.zeros(4, dtype=torch.long)]
    strategy.mb_output = strategy.forward()
    assert strategy.mb_aux_loss is not None and float(strategy.mb_aux_loss.detach()) > 0
    with_aux = float(strategy.criterion().detach())
    strategy.mb_aux_loss = None
    assert with_aux > float(strategy.criterion().detach())


def test_decode_failures_in_dataloader_workers_reach_the_run_manifest(tmp_path):
    root = make_cddb_tree(tmp_path / "d", tasks=("a",), n=4, size=(36, 36), subclass_tasks=())
    victim = root / "a" / "train" / "1_fake" / "000.png"
    victim.write_bytes(victim.read_bytes()[:60])  # header intact, pixels truncated
    run = make_run(root, tmp_path / "r", tiny_config(num_workers=1, epochs=1, warmup_epochs=0),
                   tasks=("a",))
    run.train()
    issues = json.loads((run.run_dir / "data_manifest.json").read_text())["data_issues"]
    assert list(issues["substituted_files"]) == [str(victim)] and issues["unreadable"] == 1
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["data_issues"]["substituted_at_load"] >= 1


def test_channels_last_runs_the_same_training_in_nhwc(data_root, tmp_path):
    """model.channels_last: the CNN backbone's convolutions run channels-last, the run's
    predictions are those of the NCHW run (float rounding aside), config.yaml records it and a
    reloaded run is built the same way; a ViT backbone is refused, naming the key."""
    from lorax_cil.training.evaluate import load_trained

    def effnet(channels_last: bool) -> RunConfig:
        cfg = tiny_config()
        cfg.model.backbone, cfg.model.channels_last = "efficientnet-lite0", channels_last
        cfg.data.crop = 32
        return cfg

    runs = {}
    for layout in (False, True):
        run = make_run(data_root, tmp_path / f"cl-{layout}", effnet(layout), tasks=TASKS[:2])
        runs[layout] = (run, run.train())
    stem = runs[True][0].net.backbone.model._conv_stem.conv.weight  # (32, 3, 3, 3)
    assert stem.is_contiguous(memory_format=torch.channels_last) and not stem.is_contiguous()
    assert runs[False][0].net.backbone.model._conv_stem.conv.weight.is_contiguous()
    np.testing.assert_allclose(runs[True][1]["multi_real_aa"], runs[False][1]["multi_real_aa"])
    assert "channels_last: true" in (tmp_path / "cl-True" / "config.yaml").read_text()
    net = load_trained(tmp_path / "cl-True")[0]
    assert net.backbone.model._conv_stem.conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        a, b = runs[False][0].net.eval()(x), net.eval()(x)
    assert torch.allclose(a, b, atol=1e-4)
    vit = tiny_config()
    vit.model.channels_last = True
    with pytest.raises(ValueError, match="model.channels_last: vit-test is a vit backbone"):
        make_run(data_root, tmp_path / "vit", vit)
