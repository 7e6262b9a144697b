"""`lorax-cil data synth | verify | sheet` and the data part of the demo."""

from __future__ import annotations

import json

from conftest import make_cddb_tree, write_image
from lorax_cil.benchmarks.verify import verify_data
from lorax_cil.cli import main


def test_synth_then_verify_then_sheet(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["-q", "data", "synth", "--out", str(out), "--scenario", "synth-hard",
                 "--per-class", "4", "--val-per-class", "2", "--size", "48"]) == 0
    manifest = tmp_path / "m.json"
    assert main(["-q", "data", "verify", "--data-path", str(out), "--scenario", "synth-hard",
                 "--crop-size", "48", "--manifest", str(manifest)]) == 0
    text = capsys.readouterr().out
    assert "unreadable files: 0" in text and "content sha256" in text
    m = json.loads(manifest.read_text())
    assert len(m["task_order"]) == 5
    for task in m["task_order"]:
        assert m["tasks"][task]["train"]["real"] == 4 and m["tasks"][task]["val"]["fake"] == 2
    sheet = tmp_path / "sheet.png"
    assert main(["-q", "data", "sheet", "--data-path", str(out), "--scenario", "synth-hard",
                 "--out", str(sheet)]) == 0
    from PIL import Image

    with Image.open(sheet) as img:
        assert img.size[0] > 300 and img.size[1] > 5 * 48


def test_verify_reports_bad_files_small_images_and_shortcuts(tmp_path, capsys):
    root = make_cddb_tree(tmp_path / "d", tasks=("a",), n=3, size=(40, 40))
    (root / "a" / "train" / "0_real" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    for i in range(4):  # fakes as JPEG of another size: a format and size shortcut
        write_image(root / "a" / "val" / "1_fake" / f"j{i}.jpg", size=(64, 64), fmt="JPEG")
    report = verify_data(root, crop_size=48)
    assert [p for p, _ in report.unreadable] == [str(root / "a" / "train" / "0_real" /
                                                     "broken.png")]
    assert len(report.small) > 0
    assert any("file format" in w for w in report.warnings)
    assert any("possible shortcut" in w for w in report.warnings)
    assert main(["-q", "data", "verify", "--data-path", str(root), "--strict-data",
                 "--manifest", str(tmp_path / "m.json")]) == 1
    assert "broken.png" in capsys.readouterr().out


def test_manifest_hash_changes_with_content(tmp_path):
    root = make_cddb_tree(tmp_path / "d", tasks=("a",), n=2)
    h1 = verify_data(root, crop_size=8).manifest
    victim = root / "a" / "val" / "1_fake" / "000.png"
    write_image(victim, seed=999)
    h2 = verify_data(root, crop_size=8).manifest
    assert h1["content_sha256"] != h2["content_sha256"]
    assert h1["tasks"] == h2["tasks"]
