"""Few-shot synthetic scenarios: same task orders, 10-30 training images per class."""

from __future__ import annotations

import json

import pytest

from lorax_cil.benchmarks.scenarios import resolve_scenario, scenario_names, scenario_tasks
from lorax_cil.benchmarks.synth import FEWSHOT, fewshot_memory_size, synthesize


def test_fewshot_scenarios_are_named_scenarios_with_the_base_task_order():
    for name, base in FEWSHOT.items():
        assert name in scenario_names()
        assert scenario_tasks(name) == scenario_tasks(base)
    assert fewshot_memory_size("synth-easy-fewshot") == 28  # 7 tasks x 2 classes x 2
    assert fewshot_memory_size("synth-hard-fewshot", 1) == 10


def test_synthesize_writes_14_training_images_per_class_by_default(tmp_path):
    out = synthesize(tmp_path / "fs", scenario="synth-hard-fewshot", val_per_class=2, size=32,
                     workers=1)
    meta = json.loads((out / "synth.json").read_text())
    assert meta["per_class"] == 14 and meta["scenario"] == "synth-hard-fewshot"
    first = scenario_tasks("synth-hard-fewshot")[0]
    assert len(list((out / first / "train" / "1_fake").glob("*.png"))) == 14
    sc = resolve_scenario("synth-hard-fewshot", data_path=out)
    assert sc.task_names == list(scenario_tasks("synth-hard"))


@pytest.mark.parametrize("per_class", [9, 31, 200])
def test_fewshot_refuses_sizes_outside_10_to_30(tmp_path, per_class):
    with pytest.raises(ValueError, match=r"per_class .*\[10, 30\].*'synth-easy'"):
        synthesize(tmp_path, scenario="synth-easy-fewshot", per_class=per_class)
    assert not any(tmp_path.iterdir())
