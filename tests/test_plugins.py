"""Plugin modules: a strategy, backbone and scenario registered in a file outside the repository,
used by train, --resume, eval and predict in fresh processes; a missing plugin is named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from conftest import make_cddb_tree

PLUGIN = textwrap.dedent('''
    from lorax_cil.benchmarks.scenarios import register_scenario
    from lorax_cil.models.backbones import create_backbone, register_backbone
    from lorax_cil.training.builtin_strategies import build_lorax_family
    from lorax_cil.training.registry import register_strategy

    register_scenario("my-pair", ("a", "b"))


    @register_backbone("my-vit")
    def my_vit(name, **kwargs):
        return create_backbone("vit-test", **kwargs)


    register_strategy("my-lorax", description="LoRAX on every block, from a plugin",
                      model={"extractor": "lora"})(build_lorax_family)
''')


def cli(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "lorax_cil", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("plug")
    data = make_cddb_tree(root / "data", tasks=("a", "b"), n=4, size=(32, 32), subclass_tasks=())
    plugin = root / "elsewhere" / "my_plugin.py"
    plugin.parent.mkdir()
    plugin.write_text(PLUGIN)
    return root, data, plugin


def test_plugin_strategy_backbone_scenario_through_train_resume_eval_predict(setup):
    root, data, plugin = setup
    run = root / "run"
    p = cli("train", "-q", "--plugin", plugin, "--strategy", "my-lorax", "--scenario", "my-pair",
            "--data-path", data, "--backbone", "my-vit", "--no-pretrained", "--epochs", "1",
            "--batch-size", "8", "--memory-size", "4", "--set", "train.warmup_epochs=0",
            "--set", "train.min_steps_per_task=0", "--set", "model.lora_r=2",
            "--stop-after", "1", "--out", run, cwd=root)
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["plugins"] == [str(plugin.resolve())]
    assert (cfg["train"]["strategy"], cfg["model"]["backbone"], cfg["data"]["scenario"]) == \
        ("my-lorax", "my-vit", "my-pair")

    # --resume without --plugin: the run's recorded plugin is loaded again
    p = cli("train", "-q", "--resume", run, cwd=root)
    assert p.returncode == 0, p.stderr[-3000:]
    steps = (run / "steps.jsonl").read_text().splitlines()
    assert [json.loads(s)["task"] for s in steps] == ["a", "b"]

    p = cli("eval", "--run", run, cwd=root)
    assert p.returncode == 0 and "mean multi-real accuracy" in p.stdout, p.stderr[-3000:]

    p = cli("predict", "--model", run, data / "b" / "val", "--format", "jsonl", "--workers", "0",
            cwd=root)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 8

    # the plugin file moved: the command names it, exit 2, no traceback
    moved = root / "moved" / "my_plugin.py"
    moved.parent.mkdir()
    plugin.rename(moved)
    try:
        p = cli("predict", "--model", run, data / "b" / "val", cwd=root)
        assert p.returncode == 2
        assert f"plugin file {plugin.resolve()} does not exist (recorded by run" in p.stderr
        assert "Traceback" not in p.stderr
        # ... and --plugin with its new place is enough
        p = cli("predict", "--plugin", moved, "--model", run, data / "b" / "val", "--format",
                "jsonl", "--workers", "0", cwd=root)
        assert p.returncode == 0, p.stderr[-3000:]
    finally:
        moved.rename(plugin)


def test_unknown_names_point_to_plugins_and_bad_plugins_are_named(setup, capsys):
    from lorax_cil.cli import main

    root, data, _ = setup
    assert main(["train", "--strategy", "nope", "--out", str(root / "x")]) == 2
    assert "needs --plugin MODULE" in capsys.readouterr().err
    assert main(["train", "--plugin", "no_such_plugin_module", "--out", str(root / "x")]) == 2
    assert "plugin module 'no_such_plugin_module' not found" in capsys.readouterr().err
    broken = root / "broken_plugin.py"
    broken.write_text("raise RuntimeError('boom')\n")
    assert main(["train", "--plugin", str(broken), "--out", str(root / "x")]) == 2
    err = capsys.readouterr().err
    assert f"plugin '{broken}' failed to import: RuntimeError: boom" in err


def test_register_scenario_rules():
    from lorax_cil.benchmarks.scenarios import register_scenario, scenario_names, scenario_tasks

    register_scenario("test-order-xy", ["x", "y"])
    register_scenario("test-order-xy", ["x", "y"])  # same again: fine
    assert scenario_tasks("test-order-xy") == ("x", "y") and "test-order-xy" in scenario_names()
    with pytest.raises(ValueError, match="already registered"):
        register_scenario("test-order-xy", ["y", "x"])
    with pytest.raises(ValueError, match="reserved"):
        register_scenario("cddb-easy", ["x"])
    with pytest.raises(ValueError, match="without repeats"):
        register_scenario("test-rep", ["x", "x"])


def test_entry_point_plugins_are_loaded(monkeypatch):
    import importlib.metadata as md

    import lorax_cil.plugins as plugins

    calls = []

    class EP:
        name, value = "demo", "demo_pkg.plugin"

        def load(self):
            calls.append(self.name)

    monkeypatch.setattr(md, "entry_points", lambda group: [EP()] if group ==
                        plugins.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(plugins, "_ENTRY_POINTS_LOADED", False)
    assert plugins.load_entry_point_plugins() == ["demo"] and calls == ["demo"]
    assert plugins.load_entry_point_plugins() == []  # once per process


def test_merge_method_from_a_plugin_file(tmp_path, capsys):
    from lorax_cil.cli import main
    from lorax_cil.merging.result import get_merge_method, merge_method_names
    from lorax_cil.plugins import load_plugin

    assert main(["merge", "--plugin", str(tmp_path / "none.py"), "--specialists", "a", "b",
                 "--out", str(tmp_path / "m")]) == 2
    assert "none.py does not exist" in capsys.readouterr().err
    assert main(["merge", "--method", "my-mean", "--specialists", "a", "b",
                 "--out", str(tmp_path / "m")]) == 2
    assert "unknown merge method 'my_mean'" in capsys.readouterr().err
    plugin = tmp_path / "merge_plugin.py"
    plugin.write_text(textwrap.dedent('''
        from lorax_cil.merging.methods import weight_average
        from lorax_cil.merging.result import register_merge_method

        register_merge_method("my_mean")(weight_average)
    '''))
    load_plugin(str(plugin))
    assert "my_mean" in merge_method_names() and get_merge_method("my_mean") is not None
