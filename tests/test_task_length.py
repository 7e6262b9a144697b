"""Training length on small tasks: epochs raised to a minimum number of optimizer steps."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import make_cddb_tree
from lorax_cil.benchmarks.scenarios import resolve_scenario
from lorax_cil.training.config import RunConfig, load_config, merge_config
from lorax_cil.training.runner import Run, _note_derived, resume_run
from lorax_cil.training.task_length import plan_task_length


def test_small_task_is_raised_to_min_steps_and_warmup_keeps_its_fraction():
    plan = plan_task_length(28, batch_size=32, epochs=10, warmup_epochs=5, min_steps=200)
    assert (plan.steps_per_epoch, plan.epochs, plan.steps) == (1, 200, 200)
    assert plan.warmup_epochs == 100  # 5 of 10 epochs -> 100 of 200
    assert plan.requested_epochs == 10 and any("min_steps_per_task=200" in d for d in plan.derived)


def test_large_task_keeps_the_configured_epochs():
    plan = plan_task_length(8000, batch_size=32, epochs=50, warmup_epochs=5, min_steps=200)
    assert (plan.steps_per_epoch, plan.epochs, plan.warmup_epochs) == (250, 50, 5)
    assert plan.steps == 12500 and plan.derived == ()


def test_zero_min_steps_is_the_official_protocol():
    plan = plan_task_length(28, batch_size=32, epochs=10, warmup_epochs=5, min_steps=0)
    assert (plan.epochs, plan.steps, plan.warmup_epochs, plan.derived) == (10, 10, 5, ())


def test_warmup_steps_round_up_to_whole_epochs():
    plan = plan_task_length(100, batch_size=32, epochs=50, warmup_epochs=5, min_steps=0,
                            warmup_steps=10)
    assert plan.steps_per_epoch == 4 and plan.warmup_epochs == 3
    assert any("warmup_steps=10" in d for d in plan.derived)


def test_warmup_never_covers_the_whole_task():
    plan = plan_task_length(10, batch_size=32, epochs=2, warmup_epochs=5, min_steps=0)
    assert plan.warmup_epochs == 1


@pytest.mark.parametrize("kw", [{"batch_size": 0}, {"epochs": 0}, {"min_steps": -1},
                                {"warmup_steps": -2}])
def test_bad_values_raise(kw):
    args = dict(batch_size=32, epochs=10, warmup_epochs=5, min_steps=0) | kw
    with pytest.raises(ValueError):
        plan_task_length(28, **args)


class StepCounter:
    """Avalanche plugin counting optimizer steps per experience."""

    def __init__(self):
        self.steps: list[int] = []

    def __getattr__(self, name):  # every other callback is a no-op
        if name.startswith(("before_", "after_")):
            return lambda *a, **k: None
        raise AttributeError(name)

    def before_training_exp(self, strategy, **kw):
        self.steps.append(0)

    def after_update(self, strategy, **kw):
        self.steps[-1] += 1


def small_task_config() -> RunConfig:
    return merge_config(RunConfig(), {
        "model": {"backbone": "vit-test", "pretrained": False, "lora_r": 4, "lora_alpha": 8,
                  "lora_dropout": 0.0},
        "data": {"scenario": "custom"},
        "train": {"epochs": 2, "batch_size": 32, "warmup_epochs": 1, "memory_size": 4,
                  "eval_batch_size": 32, "min_steps_per_task": 7, "lr": 1e-3, "lr_first": 1e-3},
    }, source="test")


def test_a_28_image_task_gets_min_steps_optimizer_steps(tmp_path):
    data = make_cddb_tree(tmp_path / "data", tasks=("a", "b"), n=14, size=(36, 36),
                          subclass_tasks=())
    run = Run(small_task_config(), run_dir=tmp_path / "run")
    run.setup(resolve_scenario("custom", data_path=data, tasks=["a", "b"]))
    counter = StepCounter()
    run.strategy.plugins.append(counter)
    run.train()
    # task a: 28 images = 1 step per epoch -> 7 epochs; task b: 28 + 4 exemplars = 1 step
    assert counter.steps == [7, 7]
    steps = [json.loads(line) for line in (run.run_dir / "steps.jsonl").read_text().splitlines()]
    lengths = [s["task_length"] for s in steps]
    assert [(t["samples"], t["epochs"], t["steps"], t["requested_epochs"]) for t in lengths] == [
        (28, 7, 7, 2), (32, 7, 7, 2)]
    assert lengths[0]["warmup_epochs"] == 4  # 1 of 2 epochs -> round(3.5) of 7
    text = (run.run_dir / "config.yaml").read_text()
    assert "# task 0 a: 28 samples, 1 step(s)/epoch, 7 epochs = 7 steps" in text
    # the comments leave the file a loadable configuration with the user's values
    reloaded = merge_config(RunConfig(), load_config(run.run_dir / "config.yaml"), source="x")
    assert reloaded.train.epochs == 2 and reloaded.train.min_steps_per_task == 7
    assert yaml.safe_load(text)["train"]["epochs"] == 2


def test_resumed_run_keeps_the_derived_notes_once_per_task(tmp_path):
    data = make_cddb_tree(tmp_path / "data", tasks=("a", "b"), n=14, size=(36, 36),
                          subclass_tasks=())
    run = Run(small_task_config(), run_dir=tmp_path / "run")
    run.setup(resolve_scenario("custom", data_path=data, tasks=["a", "b"]))
    run.train(stop_after=1)
    resume_run(tmp_path / "run").train()
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert text.count("# derived per task") == 1
    assert text.count("# task 0 a: ") == 1 and text.count("# task 1 b: ") == 1
    assert yaml.safe_load(text)["train"]["min_steps_per_task"] == 7
    # a task trained again replaces its line
    length = type("L", (), {"describe": lambda self: "again"})()
    _note_derived(tmp_path / "run" / "config.yaml", 1, "b", length)
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert "# task 1 b: again" in text and text.count("# task 1 ") == 1
