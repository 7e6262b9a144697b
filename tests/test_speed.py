"""The fast paths behind the speed benchmark: folded LoRA execution, the shared trunk without
autograd, the trunk cache, and a smoke run of benchmarks/speed.py (no timing assertions)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import make_cddb_tree
from lorax_cil.models.backbones import create_backbone
from lorax_cil.models.expandable import ExpandableNet
from lorax_cil.models.lora import LoraSpec, MultiLoRAConv2d, MultiLoRALayer, lora_fold, lora_group

ROOT = Path(__file__).resolve().parents[1]


def lora_net(num_tasks: int = 3, adapt_blocks: int | None = None, seed: int = 0) -> ExpandableNet:
    torch.manual_seed(seed)
    net = ExpandableNet(backbone=create_backbone("vit-test"), extractor="lora", adapt_blocks=adapt_blocks,
                        lora=LoraSpec(r=4, alpha=8, dropout=0.0, targets="attn"))
    for _ in range(num_tasks):
        net.add_task(2)
    with torch.no_grad():  # B starts at zero: give every adapter a non-zero update
        for layer in net.ext.layers:
            for a in layer.adapters:
                a.lora_B.weight.normal_(0, 0.2)
    return net


def test_folded_inference_equals_unfolded_and_uses_the_cache():
    net = lora_net().eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        with lora_fold(False):
            ref = net(x)
        assert all(not layer._fold_cache for layer in net.ext.layers)
        folded = net(x)
    torch.testing.assert_close(folded, ref, rtol=1e-4, atol=1e-5)
    layer = net.ext.layers[0]
    assert sorted(layer._fold_cache) == [0, 1, 2]
    cached = layer._fold_cache[1][1]
    with torch.no_grad():
        net(x)
    assert layer._fold_cache[1][1] is cached  # reused while the weights stand


def test_fold_cache_is_invalidated_when_an_adapter_changes():
    net = lora_net().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        net(x)
        for layer in net.ext.layers:
            layer.adapters[2].lora_B.weight.mul_(-1.5)  # in place, as an optimiser step does
        folded = net(x)
        with lora_fold(False):
            ref = net(x)
    torch.testing.assert_close(folded, ref, rtol=1e-4, atol=1e-5)


def test_fold_cache_is_bounded_and_past_the_bound_adapters_run_unfolded():
    from lorax_cil.models.lora import fold_cache_bytes, set_fold_cache_limit

    net = lora_net().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), lora_fold(False):
        ref = net(x)
    per_task = sum(layer.base.weight.numel() * 4 for layer in net.ext.layers)
    previous = set_fold_cache_limit(0)
    try:
        for layer in net.ext.layers:
            layer.clear_fold_cache()
        with torch.no_grad():
            torch.testing.assert_close(net(x), ref, rtol=1e-4, atol=1e-5)
        assert all(not layer._fold_cache for layer in net.ext.layers)
        set_fold_cache_limit(1.5 * per_task / 2**20)  # room for one task's folded weights
        with torch.no_grad():
            torch.testing.assert_close(net(x), ref, rtol=1e-4, atol=1e-5)
        cached = sum(layer._fold_cache_nbytes() for layer in net.ext.layers)
        assert 0 < cached <= 1.5 * per_task and cached <= fold_cache_bytes()
        assert any(len(layer._fold_cache) < 3 for layer in net.ext.layers)
        with pytest.raises(ValueError, match="fold cache limit"):
            set_fold_cache_limit(-1)
    finally:
        set_fold_cache_limit(previous)
        for layer in net.ext.layers:
            layer.clear_fold_cache()


def test_folded_conv_group_equals_unfolded():
    torch.manual_seed(0)
    layer = MultiLoRAConv2d(nn.Conv2d(6, 8, 3, padding=1))
    for _ in range(2):
        layer.add_adapter(LoraSpec(r=2, alpha=4, dropout=0.0, targets="x"))
    for a in layer.adapters:
        nn.init.normal_(a.lora_B.weight, std=0.3)
    layer.eval()
    x = torch.randn(6, 6, 5, 5)
    with torch.no_grad(), lora_group([layer], [1, None, 0]):
        folded = layer(x)
        with lora_fold(False):
            ref = layer(x)
    torch.testing.assert_close(folded, ref, rtol=1e-4, atol=1e-5)


def test_training_the_newest_adapter_is_unchanged_by_folding():
    grads = []
    for fold in (True, False):
        net = lora_net(num_tasks=3, adapt_blocks=2).train()
        x, y = torch.randn(4, 3, 32, 32), torch.tensor([4, 5, 0, 1])
        with lora_fold(fold):
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
        newest = [p.grad.clone() for layer in net.ext.layers for p in layer.adapters[2].parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in newest)
        assert all(p.grad is None for layer in net.ext.layers for p in layer.adapters[0].parameters())
        grads.append(newest)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_trunk_once_and_old_extractors_without_autograd():
    net = lora_net(num_tasks=3, adapt_blocks=2).train()
    calls = {"trunk": 0, "groups": []}
    trunk, features = net.trunk, net.ext.features

    def counting_trunk(x):
        calls["trunk"] += 1
        h = trunk(x)
        assert not h.requires_grad
        return h

    def recording_features(h, indices, **kw):
        out = features(h, indices, **kw)
        calls["groups"].append((list(indices), [f.requires_grad for f in out]))
        return out

    net.trunk, net.ext.features = counting_trunk, recording_features
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    assert calls["trunk"] == 1
    assert calls["groups"] == [([0, 1], [False, False]), ([2], [True])]


def test_old_adapters_fold_during_training():
    net = lora_net(num_tasks=3, adapt_blocks=2).train()
    net(torch.randn(2, 3, 32, 32))
    layers = [m for m in net.backbone.modules() if isinstance(m, MultiLoRALayer)]
    assert all(sorted(m._fold_cache) == [0, 1] for m in layers)  # old ones folded, newest not


def test_adapter_groups_one_at_a_time_on_cpu_unless_capped():
    net = lora_net(num_tasks=3)
    assert net.group_size(torch.zeros(2, 17, 48), 3) == 1
    net.max_group_size = 2
    assert net.group_size(torch.zeros(2, 17, 48), 3) == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        one = net.eval()(x)
        net.max_group_size = 3
        torch.testing.assert_close(net(x), one, rtol=1e-4, atol=1e-5)


# --- trunk cache -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def square_data(tmp_path_factory):
    return make_cddb_tree(tmp_path_factory.mktemp("data"), tasks=("a", "b"), n=4, size=(32, 32),
                          subclass_tasks=())


def _run(data_root, out, **train):
    from lorax_cil.benchmarks.scenarios import resolve_scenario
    from lorax_cil.training.config import RunConfig, merge_config
    from lorax_cil.training.runner import Run

    t = {"epochs": 2, "batch_size": 4, "warmup_epochs": 1, "memory_size": 4, "eval_batch_size": 8,
         "num_workers": 0, "min_steps_per_task": 0}
    t.update(train)
    cfg = merge_config(RunConfig(), {
        "model": {"backbone": "vit-test", "pretrained": False, "lora_r": 4, "lora_alpha": 8,
                  "lora_dropout": 0.1, "adapt_blocks": 2},
        "data": {"scenario": "custom"},
        "train": t,
    }, source="test")
    run = Run(cfg, run_dir=out)
    run.setup(resolve_scenario("custom", data_path=data_root, tasks=["a", "b"]))
    return run


def test_cache_trunk_equals_the_uncached_run(square_data, tmp_path):
    runs = []
    for cache in (False, True):
        run = _run(square_data, tmp_path / str(cache), cache_trunk=cache)
        assert run.strategy.cache_trunk is cache
        run.train()
        runs.append(run)
    plain, cached = runs
    a, b = plain.net.learned_state_dict(), cached.net.learned_state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.as_tensor(plain.matrices["multi_real"].matrix),
                               torch.as_tensor(cached.matrices["multi_real"].matrix), equal_nan=True)


def test_cache_trunk_refuses_a_random_transform(tmp_path):
    from lorax_cil.benchmarks.transforms import TransformConfig
    from lorax_cil.training.strategy import train_transform_randomness

    root = make_cddb_tree(tmp_path / "big", tasks=("a", "b"), n=2, size=(40, 36), subclass_tasks=())
    with pytest.raises(ValueError, match="random 32 px crops of 40x36"):
        _run(root, tmp_path / "r", cache_trunk=True)
    cfg = TransformConfig(size=32, hflip=True, blur_prob=0.1)
    reasons = train_transform_randomness(cfg, [(32, 32)])
    assert any("hflip" in r for r in reasons) and any("blur" in r for r in reasons)
    assert train_transform_randomness(TransformConfig(size=32), [(32, 32), (20, 20)]) == []
    assert train_transform_randomness(TransformConfig(size=32, resize=32), [(64, 64)]) == []
    assert train_transform_randomness(TransformConfig(size=32, resize=32), [(64, 80)])


def test_cache_trunk_flag_sets_the_config():
    from lorax_cil.cli import build_parser
    from lorax_cil.commands.train import config_from_args

    args = build_parser().parse_args(["train", "--cache-trunk", "--no-pretrained"])
    assert config_from_args(args).train.cache_trunk is True


def test_timed_pair_repeats_short_calls_and_alternates_with_the_reference():
    """Each timed sample repeats a short call until it lasts min_time; calls alternate with ref."""
    import time

    from lorax_cil.bench.speed import timed_pair

    calls = []

    def fast():
        calls.append("f")

    def slow():
        calls.append("r")
        time.sleep(0.004)

    f_s, r_s = timed_pair(fast, slow, repeats=3, warmup=1, device=torch.device("cpu"), min_time=0.02)
    assert calls[:2] == ["f", "r"]  # warm-up, then one calibration call each
    timed = calls[4:]
    assert timed.count("r") >= 3 * 2  # 0.02 s / (>= 0.004 s per call): several per sample
    assert timed.count("f") > timed.count("r")  # the fast call needs many more per sample
    assert 0 < f_s < r_s
    calls.clear()
    timed_pair(fast, slow, repeats=2, warmup=0, device=torch.device("cpu"))  # min_time 0: one call each
    assert calls == ["f", "r", "f", "r"]


# --- benchmark smoke run ------------------------------------------------------------------------
def test_speed_benchmark_smoke(tmp_path):
    out = tmp_path / "speed"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--smoke", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = list(csv.DictReader(open(out / "speed.csv", encoding="utf-8")))
    need = {"config", "method", "T", "k", "infer_ms_per_image", "infer_images_per_s", "infer_ratio",
            "train_ms_per_image", "train_ratio", "train_peak_rss_mb", "floor_ratio"}
    assert need <= set(rows[0])
    methods = {r["method"] for r in rows}
    assert {"plain", "reference", "lorax", "lorax-deep-k1", "merged", "lorax-ca-k4", "lorax-ca-all",
            "lorax-side-w64", "lorax-distill-w64"} <= methods
    ca = [r for r in rows if r["method"] == "lorax-ca-all"]  # its floor column is the FLOP model
    assert [int(r["k"]) for r in ca] == [4, 4] and all(0.5 < float(r["floor_ratio"]) < 1.5 for r in ca)
    side = [r for r in rows if r["method"] == "lorax-side-w64"]  # FLOP model: one pass + T side nets
    floors = [float(r["floor_ratio"]) for r in side]
    assert [int(r["k"]) for r in side] == [4, 4] and 1.0 < floors[0] < floors[1]
    # lorax-distill's inference network is lorax-side's: the same FLOP model; it trains a teacher
    distilled = [r for r in rows if r["method"] == "lorax-distill-w64"]
    assert [float(r["floor_ratio"]) for r in distilled] == floors
    assert all(r["train_ratio"] for r in distilled) == all(r["train_ratio"] for r in side)
    # and measures its distillation step too; no other method has one
    assert all(r["distill_ratio"] for r in distilled) == all(r["train_ratio"] for r in side)
    assert not any(r["distill_ratio"] for r in rows if r["method"] != "lorax-distill-w64")
    for r in rows:
        for key in ("infer_ms_per_image", "infer_ratio"):
            v = float(r[key])
            assert math.isfinite(v) and v > 0, (r["method"], key, v)
        if r["train_ratio"]:
            assert math.isfinite(float(r["train_ratio"])) and float(r["train_ratio"]) > 0
    assert (out / "speed.md").is_file() and (out / "speed.png").is_file()
    assert "PASS" in res.stdout or "FAIL" in res.stdout
    assert "loader" in (out / "speed.md").read_text()
    docs = tmp_path / "docs"  # re-rendering names the measuring command, not its own
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--render-only",
                          "--out", str(out), "--docs", str(docs)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    page = (docs / "performance.md").read_text()
    assert "speed.py --smoke" in page and "--render-only" not in page
    assert "Not produced yet" in page  # no accuracy trade-off in a smoke run
    assert "(img/performance-speed.png)" in page and (docs / "img" / "performance-speed.png").is_file()
    # a second page beside it keeps its own plot (the first page's image is not overwritten)
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--render-only",
                          "--out", str(out), "--page", str(docs / "performance-vit.md")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "(img/performance-vit-speed.png)" in (docs / "performance-vit.md").read_text()
    assert (docs / "img" / "performance-vit-speed.png").is_file()
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--render-only",
                          "--out", str(tmp_path / "none"), "--docs", str(docs)], capture_output=True, text=True)
    assert res.returncode != 0 and "no speed results" in res.stderr
    # a method filter measures plain + the named methods and keeps the other rows of --out
    before = {(r["method"], r["T"]): r for r in rows}
    res = subprocess.run(cmd + ["--methods", "lorax-ca-all"], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    after = {(r["method"], r["T"]): r for r in csv.DictReader(open(out / "speed.csv", encoding="utf-8"))}
    assert after.keys() == before.keys()
    assert after[("reference", "2")] == before[("reference", "2")]  # kept, not measured again
    assert after[("lorax-ca-all", "2")]["infer_ms_per_image"] != before[("lorax-ca-all", "2")]["infer_ms_per_image"]
    assert "lorax-ca-all" in json.loads((out / "speed.json").read_text())["methods"]
    assert "--methods lorax-ca-all" in json.loads((out / "speed.json").read_text())["command"]
