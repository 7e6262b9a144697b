"""Folder scanning and named scenarios."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import make_cddb_tree, write_image
from lorax_cil.benchmarks.folders import (
    DataLayoutError,
    is_image_file,
    scan_class_folders,
    scan_genimage,
    scan_task_split,
)
from lorax_cil.benchmarks.scenarios import (
    CDDB_SCENARIOS,
    Scenario,
    parse_task_spec,
    resolve_scenario,
    scenario_names,
)


@pytest.mark.parametrize(
    "name,expected",
    [("a.png", True), ("a.PNG", True), ("b.JpEg", True), ("c.webp", True), ("d.tif", True),
     ("e.bmp", True), ("f.txt", False), ("g.png.json", False), ("h", False)],
)
def test_image_extensions_case_insensitive(name, expected):
    assert is_image_file(name) is expected


def test_scan_flat_split_sorted_and_skips_non_images(cddb_tree):
    recs = scan_task_split(cddb_tree / "alpha", "train")
    paths = [r.path for r in recs]
    assert all(not p.endswith(".txt") for p in paths)
    real = [r.path for r in recs if r.is_fake == 0]
    fake = [r.path for r in recs if r.is_fake == 1]
    assert real == sorted(real) and fake == sorted(fake)
    assert {r.subclass for r in recs} == {""}
    assert any(p.endswith("yy_rgba.PNG") for p in real)  # upper-case extension found
    assert scan_task_split(cddb_tree / "alpha", "train") == recs  # deterministic


def test_scan_detects_subclass_folders(cddb_tree):
    recs = scan_task_split(cddb_tree / "beta", "train")
    assert {r.subclass for r in recs} == {"cat", "dog"}
    assert sum(r.is_fake for r in recs) == 8 and len(recs) == 16


def test_missing_split_lists_existing(cddb_tree):
    with pytest.raises(DataLayoutError, match=r"missing split 'test'.*train, val"):
        scan_task_split(cddb_tree / "alpha", "test")


def test_missing_class_folder_names_path(tmp_path):
    write_image(tmp_path / "t" / "train" / "0_real" / "a.png")
    with pytest.raises(DataLayoutError, match=r"1_fake"):
        scan_task_split(tmp_path / "t", "train")


def test_empty_class_is_an_error(tmp_path):
    write_image(tmp_path / "t" / "train" / "0_real" / "a.png")
    (tmp_path / "t" / "train" / "1_fake").mkdir()
    (tmp_path / "t" / "train" / "1_fake" / "readme.txt").write_text("x")
    with pytest.raises(DataLayoutError, match=r"empty class folder: .*1_fake"):
        scan_task_split(tmp_path / "t", "train")


def test_mixed_layout_is_an_error(tmp_path):
    write_image(tmp_path / "s" / "0_real" / "a.png")
    write_image(tmp_path / "s" / "1_fake" / "a.png")
    write_image(tmp_path / "s" / "cats" / "0_real" / "a.png")
    with pytest.raises(DataLayoutError, match="mixes class folders"):
        scan_class_folders(tmp_path / "s")


def test_univfd_and_genimage_layouts(tmp_path):
    for cls in ("0_real", "1_fake"):
        write_image(tmp_path / "univ" / "progan" / "car" / cls / "x.png")
    recs = scan_class_folders(tmp_path / "univ" / "progan")
    assert [(r.subclass, r.is_fake) for r in recs] == [("car", 0), ("car", 1)]
    for cls in ("nature", "ai"):
        write_image(tmp_path / "gen" / "sdv14" / "val" / cls / "x.JPG", fmt="JPEG")
    recs = scan_genimage(tmp_path / "gen" / "sdv14", "val")
    assert [r.is_fake for r in recs] == [0, 1]
    with pytest.raises(DataLayoutError, match=r"missing split 'train' in GenImage generator folder .*splits: val"):
        scan_genimage(tmp_path / "gen" / "sdv14", "train")
    with pytest.raises(DataLayoutError, match=r"missing GenImage generator folder: .*midjourney"):
        scan_genimage(tmp_path / "gen" / "midjourney", "val")


def test_cddb_orders_exact():
    assert CDDB_SCENARIOS["cddb-easy"] == (
        "gaugan", "biggan", "cyclegan", "imle", "deepfake", "crn", "wild")
    assert CDDB_SCENARIOS["cddb-hard"] == ("gaugan", "biggan", "wild", "whichfaceisreal", "san")
    assert len(CDDB_SCENARIOS["cddb-long"]) == 12
    assert CDDB_SCENARIOS["cddb-long"][:7] == CDDB_SCENARIOS["cddb-easy"]
    assert CDDB_SCENARIOS["cddb-long"][7:] == (
        "glow", "stargan_gf", "stylegan", "whichfaceisreal", "san")


def test_unknown_scenario_lists_names():
    with pytest.raises(ValueError, match=r"unknown scenario 'cddb-medium'.*cddb-easy"):
        resolve_scenario("cddb-medium", data_path=".")
    assert "custom" in scenario_names() and "synth-long" in scenario_names()


def test_cddb_scenario_missing_task_lists_existing(tmp_path):
    make_cddb_tree(tmp_path, tasks=("gaugan", "biggan"), n=1)
    with pytest.raises(DataLayoutError, match=r"missing task folder for 'cyclegan'.*biggan, gaugan"):
        resolve_scenario("cddb-easy", data_path=tmp_path)


def test_custom_scenario_names_and_pairs(cddb_tree, tmp_path):
    sc = resolve_scenario("custom", data_path=cddb_tree,
                          tasks=["beta", f"mine={cddb_tree / 'alpha'}"])
    assert sc.task_names == ["beta", "mine"]
    assert Path(sc.tasks[1].path) == (cddb_tree / "alpha").resolve()
    with pytest.raises(ValueError, match="needs --tasks"):
        resolve_scenario("custom", data_path=cddb_tree)
    with pytest.raises(ValueError, match="lists task"):
        resolve_scenario("custom", data_path=cddb_tree, tasks=["alpha", "alpha"])
    with pytest.raises(ValueError, match="name=path"):
        parse_task_spec("=x", None)


def test_labels_and_appending_never_relabels(cddb_tree):
    sc = resolve_scenario("custom", data_path=cddb_tree, tasks=["alpha"])
    before = (sc.class_names, sc.class_is_fake, sc.class_task)
    grown = sc.with_task("beta", cddb_tree / "beta")
    assert grown.class_names[:2] == before[0]
    assert grown.class_is_fake[:2] == before[1] and grown.class_task[:2] == before[2]
    assert grown.class_names == ["alpha/real", "alpha/fake", "beta/real", "beta/fake"]
    assert [Scenario.label(t, f) for t in (0, 1) for f in (0, 1)] == [0, 1, 2, 3]
    assert Scenario.from_dict(grown.to_dict()) == grown
