"""Tests of the synthetic embedded dataset (lorax_cil.benchmarks.synth)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorax_cil.benchmarks.synth import (
    CLASS_DIRS,
    FAMILIES,
    SYNTH_SCENARIOS,
    family_names,
    render_image,
    synthesize,
    task_subclasses,
)
from lorax_cil.benchmarks.synth_domains import DOMAINS
from lorax_cil.utils import sha256_file


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def tiny_easy(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("easy"), scenario="synth-easy", per_class=4,
                      val_per_class=2, size=40, seed=0, workers=1)


def test_scenarios_mirror_cddb_orders():
    long = SYNTH_SCENARIOS["synth-long"]
    assert len(long) == 12 and len(set(long)) == 12
    assert len(SYNTH_SCENARIOS["synth-easy"]) == 7
    assert len(SYNTH_SCENARIOS["synth-hard"]) == 5
    assert SYNTH_SCENARIOS["synth-easy"] == long[:7]
    assert SYNTH_SCENARIOS["synth-hard"] == tuple(long[i] for i in (0, 1, 6, 10, 11))
    assert all(task in FAMILIES for task in long)
    # every scenario has exactly one task with subclass folders, like CDDB's cyclegan
    for name in ("synth-easy", "synth-hard"):
        assert sum(bool(task_subclasses(t)) for t in SYNTH_SCENARIOS[name]) == 1


def test_family_registry():
    assert len(FAMILIES) >= 12
    assert family_names() == sorted(FAMILIES)
    for name, fam in FAMILIES.items():
        assert fam.name == name and fam.description and fam.imitates
        assert fam.domain in DOMAINS


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_keeps_shape_dtype_range_on_odd_sizes(name):
    rng = np.random.default_rng(0)
    img = rng.random((37, 37, 3), dtype=np.float32)
    out = FAMILIES[name].apply(img.copy(), rng)
    assert out.shape == img.shape and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert not np.array_equal(out, img)


def test_render_image_real_and_fake_are_distinct_samples():
    task = "blend-seam"
    real = render_image(task, "train", 0, 3, size=48, seed=1)
    fake = render_image(task, "train", 1, 3, size=48, seed=1)
    assert real.shape == (48, 48, 3) and real.dtype == np.uint8
    assert np.abs(real.astype(int) - fake.astype(int)).mean() > 5  # different source images
    assert np.array_equal(real, render_image(task, "train", 0, 3, size=48, seed=1))


def test_layout_and_metadata(tiny_easy):
    meta = json.loads((tiny_easy / "synth.json").read_text())
    assert meta["scenario"] == "synth-easy" and meta["tasks"] == list(SYNTH_SCENARIOS["synth-easy"])
    assert (meta["per_class"], meta["val_per_class"], meta["size"], meta["seed"]) == (4, 2, 40, 0)
    assert "version" in meta
    for task in meta["tasks"]:
        subs = task_subclasses(task)
        for split, n in (("train", 4), ("val", 2)):
            for cls in CLASS_DIRS:
                if subs:
                    dirs = [tiny_easy / task / split / s / cls for s in subs]
                    assert all(d.is_dir() for d in dirs)
                    files = [p for d in dirs for p in d.glob("*.png")]
                else:
                    files = list((tiny_easy / task / split / cls).glob("*.png"))
                assert sorted(p.name for p in files) == [f"{i:05d}.png" for i in range(n)]
    assert task_subclasses("tconv-checker") == ("discs", "stripes")
    discs = tiny_easy / "tconv-checker" / "train" / "discs" / "1_fake"
    assert len(list(discs.glob("*.png"))) == 2
    with Image.open(tiny_easy / "nn-upsample" / "val" / "0_real" / "00000.png") as im:
        assert im.size == (40, 40) and im.mode == "RGB"


def test_bit_identical_for_same_seed_and_any_workers(tiny_easy, tmp_path):
    again = synthesize(tmp_path / "a", per_class=4, val_per_class=2, size=40, seed=0, workers=2)
    assert _hashes(again) == _hashes(tiny_easy)
    assert (again / "synth.json").read_bytes() == (tiny_easy / "synth.json").read_bytes()
    other = synthesize(tmp_path / "b", per_class=4, val_per_class=2, size=40, seed=1, workers=1)
    h0, h1 = _hashes(tiny_easy), _hashes(other)
    assert h0.keys() == h1.keys()
    assert all(h0[k] != h1[k] for k in h0)


def test_cache_hit_and_regeneration(tmp_path):
    out = synthesize(tmp_path, scenario="synth-hard", per_class=4, size=32, workers=1)
    probe = out / "nn-upsample" / "train" / "0_real" / "00000.png"
    stamp = probe.stat().st_mtime_ns
    assert synthesize(tmp_path, scenario="synth-hard", per_class=4, size=32) == out
    assert probe.stat().st_mtime_ns == stamp  # nothing rewritten
    # a different configuration replaces the previous synth output without stale files
    synthesize(tmp_path, scenario="synth-hard", per_class=2, size=32, workers=1)
    assert len(list((out / "nn-upsample" / "train" / "0_real").glob("*.png"))) == 2
    assert json.loads((out / "synth.json").read_text())["per_class"] == 2


def test_interrupted_output_is_regenerated(tmp_path):
    synthesize(tmp_path, scenario="synth-hard", per_class=2, size=32, workers=1)
    (tmp_path / "synth.json").rename(tmp_path / ".synth-incomplete.json")  # as if interrupted
    synthesize(tmp_path, scenario="synth-hard", per_class=2, size=32, workers=1)
    assert (tmp_path / "synth.json").is_file()
    assert not (tmp_path / ".synth-incomplete.json").exists()


def test_refuses_foreign_non_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        synthesize(tmp_path, scenario="synth-hard", per_class=2, size=32)
    synthesize(tmp_path, scenario="synth-hard", per_class=2, size=32, overwrite=True, workers=1)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "synth.json").is_file()


@pytest.mark.parametrize("kwargs, option", [
    ({"scenario": "synth-medium"}, "scenario"),
    ({"per_class": 0}, "per_class"),
    ({"val_per_class": 0}, "val_per_class"),
    ({"size": 31}, "size"),
    ({"seed": -1}, "seed"),
    ({"workers": 0}, "workers"),
])
def test_bad_options_raise_value_error_naming_option(tmp_path, kwargs, option):
    with pytest.raises(ValueError, match=option) as err:
        synthesize(tmp_path, **kwargs)
    if option == "scenario":
        assert all(name in str(err.value) for name in SYNTH_SCENARIOS)
    assert not any(tmp_path.iterdir())  # nothing written


def _colour_histograms(root: Path, split: str, tasks: list[str]) -> tuple[np.ndarray, np.ndarray]:
    feats, labels = [], []
    for t, task in enumerate(tasks):
        for path in sorted((root / task / split).rglob("*.png")):
            img = np.asarray(Image.open(path).convert("RGB")) >> 4  # 16 bins per channel
            n = img.shape[0] * img.shape[1]
            feats.append(np.concatenate([np.bincount(img[..., c].ravel(), minlength=16) / n
                                         for c in range(3)]))
            labels.append(2 * t + CLASS_DIRS.index(path.parent.name))
    return np.asarray(feats), np.asarray(labels)


def test_colour_histograms_do_not_solve_attribution(tmp_path):
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    tasks = list(SYNTH_SCENARIOS["synth-easy"])
    root = synthesize(tmp_path, scenario="synth-easy", per_class=80, val_per_class=40, size=64)
    xtr, ytr = _colour_histograms(root, "train", tasks)
    xva, yva = _colour_histograms(root, "val", tasks)
    assert xtr.shape == (7 * 2 * 80, 48) and xva.shape == (7 * 2 * 40, 48)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    clf.fit(xtr, ytr)
    assert clf[-1].n_iter_.max() < 5000  # converged
    pred = clf.predict(xva)
    strict = float(np.mean(pred == yva))
    binary = float(np.mean(pred % 2 == yva % 2))
    assert strict < 0.70, f"colour histograms reach {strict:.1%} strict accuracy"
    assert binary < 0.70, f"colour histograms reach {binary:.1%} real/fake accuracy"
