"""`lorax-cil merge` end to end on tiny vit-test specialists: the merged detector is a detector
folder that `detect eval`, `predict` and `lorax_cil.load` read, computes theta_0 + tau* with the
averaged head in one backbone pass, `--add` equals merging from scratch, and bad input is refused
with errors that name the folder or option."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_cddb_tree
from lorax_cil.cli import main

FAMILIES = ("alpha", "beta", "gamma")


def _train(data: Path, fam: str, out: Path, *extra: str) -> Path:
    args = ["-q", "detect", "train", "--source", f"{fam}={data / fam}", "--backbone", "vit-test",
            "--no-pretrained", "--epochs", "1", "--batch-size", "4", "--calib-fraction", "0.3",
            "--lr", "0.05", "--device", "cpu", "--out", str(out), *extra]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """Data and specialists: LoRA per family, two full fine-tunes, and odd ones out."""
    root = tmp_path_factory.mktemp("merge")
    data = make_cddb_tree(root / "data", tasks=FAMILIES, n=4, size=(34, 34), subclass_tasks=())
    z = {"data": data, "root": root}
    for fam in FAMILIES:
        z[fam] = _train(data, fam, root / fam, "--adapter", "lora")
    for fam in ("alpha", "beta"):
        z[f"full-{fam}"] = _train(data, fam, root / f"full-{fam}", "--adapter", "full", "--blocks", "1")
    z["other-seed"] = _train(data, "gamma", root / "other-seed", "--adapter", "lora", "--seed", "7")
    z["mole"] = _train(data, "gamma", root / "mole", "--adapter", "mole")
    z["probe"] = _train(data, "gamma", root / "probe", "--adapter", "linear-probe")
    return z


def _merge(*args: str) -> int:
    return main(["-q", "merge", *map(str, args)])


def _scores(det, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.sigmoid(det.eval()(x))


def test_merged_detector_is_theta0_plus_merged_delta_and_loads_everywhere(zoo, tmp_path, capsys):
    from lorax_cil import load
    from lorax_cil.detection.model import load_detector, read_detector_meta
    from lorax_cil.merging import merge
    from lorax_cil.merging.detectors import load_specialist

    out = tmp_path / "m"
    assert _merge("--specialists", zoo["alpha"], zoo["beta"], "--method", "r2m", "--alpha", "0.8",
                  "--out", out) == 0
    meta = read_detector_meta(out)
    rec = meta["merge"]
    assert rec["method"] == "r2m" and rec["options"]["alpha"] == 0.8
    assert [s["name"] for s in rec["sources"]] == ["alpha", "beta"]
    for s, fam in zip(rec["sources"], ("alpha", "beta")):
        assert s["tensors_sha256"] == read_detector_meta(zoo[fam])["tensors_sha256"]
    assert rec["threshold"]["mode"] == "mean"
    assert meta["threshold"] == pytest.approx(sum(read_detector_meta(zoo[f])["threshold"]
                                                  for f in ("alpha", "beta")) / 2)
    assert (out / "gram" / "meta.json").is_file() and (out / "MODEL_CARD.md").is_file()
    # the folded weights are exactly theta_0 + tau* of the library merge, the head the mean
    sp = [load_specialist(zoo[f]) for f in ("alpha", "beta")]
    ref = merge("r2m", [s.task_vector for s in sp], alpha=0.8)
    det = load_detector(out)
    plain = det.recipe.build()
    plain.model.load_state_dict(ref.apply(plain.model.state_dict()))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = ref.head["weight"] @ plain.eval()(x).T + ref.head["bias"][:, None]
    torch.testing.assert_close(det.eval()(x), expected[0], rtol=0, atol=1e-5)
    # detect eval and predict / lorax_cil.load read it unchanged
    assert main(["detect", "eval", "--detector", str(out), "--data", str(zoo["data"]), "--device", "cpu",
                 "--out", str(tmp_path / "eval")]) == 0
    assert "mean of the specialists' calibrated thresholds" in capsys.readouterr().out
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert len(res["per_generator"]) == 3
    pred = load(out, device="cpu")
    rows = pred.predict(sorted((zoo["data"] / "gamma" / "val").rglob("*.png")))
    assert len(rows) == 8 and all(r["error"] is None for r in rows)
    assert pred.describe()["merged_from"] == ["alpha", "beta"]
    assert main(["predict", str(zoo["data"] / "beta" / "val"), "--model", str(out), "--device", "cpu",
                 "--workers", "0", "--out", str(tmp_path / "p.csv")]) == 0
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 9


def test_merged_detector_runs_one_backbone_pass_per_image(zoo, tmp_path):
    from lorax_cil.detection.model import load_detector

    out = tmp_path / "m"
    assert _merge("--specialists", *(zoo[f] for f in FAMILIES), "--method", "average", "--out", out) == 0

    def count_block_calls(dets) -> list[int]:
        calls = [0]
        hooks = [d.backbone.model.blocks[0].register_forward_pre_hook(
            lambda *_: calls.__setitem__(0, calls[0] + 1)) for d in dets]
        try:
            x = torch.randn(5, 3, 32, 32)
            for d in dets:
                _scores(d, x)
        finally:
            for h in hooks:
                h.remove()
        return calls[0]

    merged = load_detector(out)
    assert count_block_calls([merged]) == 1
    assert count_block_calls([load_detector(zoo[f]) for f in FAMILIES]) == 3
    assert merged.adapter.kind == "merged"


@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("method", ["average", "r2m"])
def test_merging_one_specialist_reproduces_it(zoo, tmp_path, kind, method):
    from lorax_cil.detection.model import load_detector

    src = zoo["alpha"] if kind == "lora" else zoo["full-alpha"]
    out = tmp_path / "one"
    assert _merge("--specialists", src, "--method", method, "--out", out) == 0
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(_scores(load_detector(out), x), _scores(load_detector(src), x),
                               rtol=0, atol=2e-5)


def test_full_fine_tuned_specialists_merge_with_averaged_batchnorm_free_backbone(zoo, tmp_path):
    from lorax_cil.detection.model import load_detector, read_detector_meta

    out = tmp_path / "full"
    assert _merge("--specialists", zoo["full-alpha"], zoo["full-beta"], "--method", "ties",
                  "--top-k", "0.5", "--out", out) == 0
    meta = read_detector_meta(out)
    assert meta["merge"]["options"] == {"top_k": 0.5, "lam": 1.0}
    assert all(k.startswith("blocks.3.") or k.startswith("norm.") or k.startswith("fc_norm.")
               for k in meta["backbone_weights"]["replaced"])
    assert load_detector(out).adapter.kind == "merged"


def test_add_reuses_the_gram_cache_and_equals_merging_from_scratch(zoo, tmp_path):
    from lorax_cil.detection.model import read_detector_meta
    from lorax_cil.training.checkpoint import load_checkpoint

    opts = ["--method", "r2m", "--k", "1", "--rho", "0.2", "--alpha", "0.4"]
    assert _merge("--specialists", zoo["alpha"], zoo["beta"], *opts, "--out", tmp_path / "two") == 0
    assert _merge("--add", zoo["gamma"], "--from", tmp_path / "two", "--out", tmp_path / "three") == 0
    assert _merge("--specialists", *(zoo[f] for f in FAMILIES), *opts, "--out", tmp_path / "scratch") == 0
    added, m_added = load_checkpoint(tmp_path / "three")
    scratch, m_scratch = load_checkpoint(tmp_path / "scratch")
    assert sorted(added) == sorted(scratch)
    for k in added:
        torch.testing.assert_close(added[k], scratch[k], rtol=0, atol=1e-6)
    rec = read_detector_meta(tmp_path / "three")["merge"]
    assert rec["options"] == m_scratch["merge"]["options"] and rec["info"]["gram_reused"] is True
    assert rec["gram_rows_computed"] == 1 and m_scratch["merge"]["info"]["gram_reused"] is False
    assert [s["name"] for s in rec["sources"]] == list(FAMILIES)


@pytest.mark.parametrize("flags, method, expected", [
    (["--method", "average"], "average", {}),
    (["--method", "task-arithmetic", "--lam", "0.5"], "task_arithmetic", {"lam": 0.5}),
    (["--method", "ties", "--top-k", "0.3", "--lam", "0.9"], "ties", {"top_k": 0.3, "lam": 0.9}),
    (["--method", "dare", "--p", "0.2", "--dare-seed", "3", "--base-method", "average"], "dare",
     {"p": 0.2, "seed": 3, "base_method": "average"}),
    (["--method", "r2m", "--k", "2", "--center", "--residual", "project", "--rho", "none",
      "--no-norm-match", "--eta-mode", "fixed", "--alpha", "0.3", "--exclude-biases"], "r2m",
     {"k": 2, "center": True, "residual": "project", "rho": None, "norm_match": False,
      "eta_mode": "fixed", "alpha": 0.3, "exclude_biases": True}),
])
def test_every_method_and_option_is_selectable(zoo, tmp_path, flags, method, expected):
    from lorax_cil.detection.model import read_detector_meta

    out = tmp_path / "m"
    assert _merge("--specialists", *(zoo[f] for f in FAMILIES), *flags, "--threshold", "0.5",
                  "--out", out) == 0
    rec = read_detector_meta(out)["merge"]
    assert rec["method"] == method
    assert {k: rec["options"][k] for k in expected} == expected
    assert read_detector_meta(out)["threshold"] == 0.5 and rec["threshold"]["mode"] == "fixed"


def test_threshold_recalibrated_on_a_folder(zoo, tmp_path):
    from lorax_cil.detection.model import read_detector_meta

    out = tmp_path / "m"
    assert _merge("--specialists", zoo["alpha"], zoo["beta"], "--calibrate", zoo["data"] / "alpha" / "train",
                  "--out", out) == 0
    meta = read_detector_meta(out)
    assert meta["merge"]["threshold"]["mode"] == "calibrated"
    assert meta["calibration"]["n_real"] == 4 and meta["calibration"]["n_fake"] == 4


def _error(capsys, *args) -> str:
    assert _merge(*args) == 2
    return capsys.readouterr().err


def test_errors_name_the_folder_or_option(zoo, tmp_path, capsys):
    a, out = zoo["alpha"], tmp_path / "out"
    assert "does not exist" in _error(capsys, "--specialists", a, tmp_path / "nope", "--out", out)
    (tmp_path / "empty").mkdir()
    err = _error(capsys, "--specialists", a, tmp_path / "empty", "--out", out)
    assert "is not a detector folder" in err and "empty" in err
    err = _error(capsys, "--specialists", a, zoo["other-seed"], "--out", out)
    assert "same backbone" in err and "other-seed" in err
    err = _error(capsys, "--specialists", a, zoo["full-beta"], "--out", out)
    assert "different adapter kinds" in err
    assert "routes every token" in _error(capsys, "--specialists", a, zoo["mole"], "--out", out)
    assert "nothing to merge" in _error(capsys, "--specialists", a, zoo["probe"], "--out", out)
    assert "--alpha is an option of r2m" in _error(capsys, "--specialists", a, "--method", "average",
                                                   "--alpha", "0.5", "--out", out)
    assert "--add and --from go together" in _error(capsys, "--add", a, "--out", out)
    assert _merge("--specialists", a, "--out", out) == 0
    assert "already holds a model" in _error(capsys, "--specialists", a, "--out", out)
    err = _error(capsys, "--specialists", out, "--out", tmp_path / "again")
    assert "is itself a merge" in err
    err = _error(capsys, "--add", a, "--from", zoo["beta"], "--out", tmp_path / "x")
    assert "not a merged one" in err
    assert main(["-q", "detect", "train", "--source", f"alpha={zoo['data'] / 'alpha'}", "--backbone",
                 "vit-test", "--no-pretrained", "--adapter", "merged", "--out", str(tmp_path / "t")]) == 2
    assert "written by 'lorax-cil merge'" in capsys.readouterr().err


def test_lora_variants_and_tampered_or_changed_files_are_refused(zoo, tmp_path, capsys):
    from lorax_cil.training.checkpoint import load_checkpoint, save_checkpoint

    # a LoRA variant: the recorded spec has a field this version does not know (DoRA)
    tensors, meta = load_checkpoint(zoo["beta"])
    meta["architecture"]["lora"]["use_dora"] = True
    for k in ("format", "format_version", "tensors_sha256", "num_tensors", "meta_sha256"):
        meta.pop(k, None)
    save_checkpoint(tmp_path / "dora", tensors, meta)
    err = _error(capsys, "--specialists", zoo["alpha"], tmp_path / "dora", "--out", tmp_path / "o1")
    assert "LoRA variant" in err and "dora" in err
    # flipped bytes in a tensor file
    shutil.copytree(zoo["beta"], tmp_path / "flip")
    f = tmp_path / "flip" / "tensors.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 0x01]))
    err = _error(capsys, "--specialists", zoo["alpha"], tmp_path / "flip", "--out", tmp_path / "o2")
    assert "checksum mismatch" in err and "flip" in err
    # a source changed after the merge: --add refuses to reuse the stale record
    shutil.copytree(zoo["beta"], tmp_path / "b2")
    assert _merge("--specialists", zoo["alpha"], tmp_path / "b2", "--out", tmp_path / "m") == 0
    shutil.rmtree(tmp_path / "b2")
    shutil.copytree(zoo["gamma"], tmp_path / "b2")
    err = _error(capsys, "--add", zoo["gamma"], "--from", tmp_path / "m", "--out", tmp_path / "m3")
    assert "changed since" in err and "b2" in err
