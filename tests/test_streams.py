"""Avalanche streams over generator folders, transforms and bad input."""

from __future__ import annotations

import pytest
import torch

from conftest import make_cddb_tree, write_image
from lorax_cil.benchmarks.datasets import ImageSampleDataset, carve_calibration, scan_scenario_split
from lorax_cil.benchmarks.images import load_rgb
from lorax_cil.benchmarks.scenarios import resolve_scenario
from lorax_cil.benchmarks.streams import build_cil_benchmark
from lorax_cil.benchmarks.transforms import TransformConfig, build_transform
from lorax_cil.errors import UserError


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = make_cddb_tree(tmp_path_factory.mktemp("d"), tasks=("alpha", "beta", "gamma"), n=6)
    (root / "alpha" / "train" / "0_real" / "zz_bad.png").write_bytes(b"not an image")
    write_image(root / "beta" / "val" / "cat" / "1_fake" / "zz_small.png", size=(16, 20))
    sc = resolve_scenario("custom", data_path=root, tasks=["alpha", "beta", "gamma"])
    return build_cil_benchmark(sc, transform_config=TransformConfig(size=32), calib_fraction=0.2)


def test_one_experience_per_task_with_its_two_classes(bench):
    assert len(bench.train_stream) == 3 and len(bench.test_stream) == 3
    for t, exp in enumerate(bench.train_stream):
        assert set(exp.classes_in_this_experience) == {2 * t, 2 * t + 1}
        assert set(exp.dataset.targets) == {2 * t, 2 * t + 1}
        assert set(exp.dataset.task_id) == {t}
        assert [y % 2 for y in exp.dataset.targets] == list(exp.dataset.is_fake)


def test_samples_are_task_aware_triples_of_right_shape(bench):
    x, y, t = bench.train_stream[1].dataset[0]
    assert x.shape == (3, 32, 32) and y in (2, 3) and t == 0
    x, y, t = bench.test_stream[2].dataset[0]
    assert x.shape == (3, 32, 32) and y in (4, 5)


def test_bad_file_skipped_and_counted_small_counted(bench):
    s = bench.issues.summary()
    assert s["unreadable"] == 1 and s["unreadable_files"][0].endswith("zz_bad.png")
    assert s["smaller_than_crop"] == 1 and s["smaller_than_crop_files"][0].endswith("zz_small.png")
    assert all(not p.path.endswith("zz_bad.png") for p in bench.samples["train"][0])
    x, _, _ = bench.test_stream[1].dataset[
        [p.path for p in bench.samples["test"][1]].index(s["smaller_than_crop_files"][0])]
    assert x.shape == (3, 32, 32)  # resized, then cropped: never zero-padded


def test_calibration_carved_deterministically_and_disjoint(bench):
    tr, cal = bench.samples["train"][1], bench.samples["calib"][1]
    assert cal and not set(p.path for p in tr) & set(p.path for p in cal)
    assert {p.label for p in cal} == {2, 3}
    again = carve_calibration(tr + cal, 0.2, seed=0)
    assert sorted(p.path for p in again[1]) == sorted(p.path for p in carve_calibration(
        tr + cal, 0.2, seed=0)[1])
    assert carve_calibration(tr + cal, 0.2, seed=1)[1] != again[1] or len(again[1]) <= 2
    with pytest.raises(ValueError, match="calibration fraction"):
        carve_calibration(tr, 1.5)


def test_eval_split_is_configurable(tmp_path):
    root = make_cddb_tree(tmp_path, tasks=("a",), n=2, splits=("train", "val", "test"))
    sc = resolve_scenario("custom", data_path=root, tasks=["a"])
    b = build_cil_benchmark(sc, transform_config=TransformConfig(size=32), eval_split="test")
    assert b.eval_split == "test"
    assert all("/test/" in s.path for s in b.samples["test"][0])


def test_strict_data_raises_naming_file(tmp_path):
    root = make_cddb_tree(tmp_path, tasks=("a",), n=2)
    (root / "a" / "train" / "1_fake" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    sc = resolve_scenario("custom", data_path=root, tasks=["a"])
    # --strict-data stops with the one-line user error that names the file and the option.
    with pytest.raises(UserError, match=r"broken\.jpg.*--strict-data"):
        build_cil_benchmark(sc, transform_config=TransformConfig(size=32), strict=True)


def test_truncated_file_substituted_at_load_time(tmp_path):
    root = make_cddb_tree(tmp_path, tasks=("a",), n=3)
    victim = root / "a" / "train" / "0_real" / "000.png"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # header intact, pixel data truncated
    sc = resolve_scenario("custom", data_path=root, tasks=["a"])
    samples = scan_scenario_split(sc, "train")[0]
    ds = ImageSampleDataset(samples, transform=build_transform(TransformConfig(size=32),
                                                                train=False))
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y == 0
    assert ds.issues.substituted == 1 and str(victim) in ds.issues.unreadable
    strict = ImageSampleDataset(samples, strict=True)
    with pytest.raises(UserError, match=r"000\.png.*--strict-data"):
        strict[0]


def test_decode_failures_in_dataloader_workers_reach_the_main_tally(tmp_path):
    from torch.utils.data import DataLoader

    root = make_cddb_tree(tmp_path / "d", tasks=("a",), n=3)
    victim = root / "a" / "train" / "0_real" / "000.png"
    victim.write_bytes(victim.read_bytes()[:60])
    sc = resolve_scenario("custom", data_path=root, tasks=["a"])
    samples = scan_scenario_split(sc, "train")[0]
    tf = build_transform(TransformConfig(size=32), train=False)

    def load_in_workers(ds):
        for _ in DataLoader(ds, batch_size=2, num_workers=2):
            pass

    lost = ImageSampleDataset(samples, transform=tf)  # no spool: the workers' tally dies
    load_in_workers(lost)
    assert lost.issues.total() == 0
    ds = ImageSampleDataset(samples, transform=tf)
    ds.issues.spool = str(tmp_path / "spool.jsonl")
    load_in_workers(ds)
    load_in_workers(ds)  # a second epoch: every load counts, the file is named once
    summary = ds.issues.summary()
    assert summary["substituted_at_load"] == 2 and summary["unreadable"] == 1
    assert list(summary["substituted_files"]) == [str(victim)]
    assert ds.issues.summary() == summary  # collecting again adds nothing


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_modes_become_rgb(tmp_path, mode):
    p = write_image(tmp_path / f"x_{mode}.img", mode=mode)
    img = load_rgb(str(p))
    assert img.mode == "RGB" and img.size == (40, 40)


def test_train_and_eval_transforms():
    from PIL import Image

    cfg = TransformConfig(size=24, blur_prob=1.0, jpeg_prob=1.0, hflip=True)
    img = Image.new("RGB", (30, 40), (255, 0, 0))
    x = build_transform(cfg, train=True)(img)
    assert x.shape == (3, 24, 24)
    e = build_transform(cfg, train=False)(Image.new("RGB", (10, 12), (255, 255, 255)))
    assert e.shape == (3, 24, 24) and torch.allclose(e, torch.ones_like(e))  # (1-.5)/.5
    with pytest.raises(ValueError, match="blur_prob"):
        TransformConfig(blur_prob=2.0)
