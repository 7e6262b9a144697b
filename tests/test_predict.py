"""`lorax-cil predict` and `lorax_cil.load`: inputs, errors, formats, agreement with the
evaluation path, refusal of damaged models, and the model card."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import make_cddb_tree, write_image
from lorax_cil.cli import main
from lorax_cil.training.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 2-task LoRAX run with a random vit-test backbone, reading by ncm-frozen
    class means (the LoRAX default on a CNN; on a ViT the default is the head)."""
    from lorax_cil.benchmarks.scenarios import resolve_scenario
    from lorax_cil.training.config import RunConfig, merge_config
    from lorax_cil.training.runner import Run

    root = tmp_path_factory.mktemp("predict")
    data = make_cddb_tree(root / "data", tasks=("a", "b"), n=4, size=(36, 36), subclass_tasks=())
    cfg = merge_config(RunConfig(), {
        "model": {"backbone": "vit-test", "pretrained": False, "lora_r": 4, "lora_alpha": 8,
                  "lora_dropout": 0.0},
        "data": {"scenario": "custom"},
        "train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0, "memory_size": 4,
                  "eval_batch_size": 16, "device": "cpu", "min_steps_per_task": 0,
                  "readout": "ncm-frozen"},
    }, source="test")
    run = Run(cfg, run_dir=root / "run")
    run.setup(resolve_scenario("custom", data_path=data, tasks=["a", "b"]))
    run.train()
    return root / "run"


@pytest.fixture
def images(tmp_path):
    """Good images (one in a sub-folder), a corrupt PNG, a text file and a hidden file."""
    folder = tmp_path / "imgs"
    write_image(folder / "a.png", size=(40, 40), seed=1)
    write_image(folder / "sub" / "b.jpg", size=(50, 44), seed=2, fmt="JPEG")
    write_image(folder / "sub" / "c.png", size=(20, 20), mode="RGBA", seed=3)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (folder / "notes.txt").write_text("not an image")
    write_image(folder / ".hidden.png", seed=4)
    return folder


def _cli(capsys, *argv):
    code = main(["predict", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _rows(text):
    return list(csv.DictReader(io.StringIO(text)))


def test_folder_with_good_corrupt_and_non_image_files_csv(run_dir, images, capsys):
    code, out, err = _cli(capsys, "--model", run_dir, images, "--batch-size", "2")
    assert code == 0, err
    rows = _rows(out)
    names = [r["path"].rsplit("/", 1)[-1] for r in rows]
    # sorted walk; the text file and the hidden file are skipped
    assert names == ["a.png", "corrupt.png", "b.jpg", "c.png"]
    bad = rows[1]
    assert "cannot read image" in bad["error"] and "corrupt.png" in bad["error"]
    assert bad["prediction"] == "" and bad["fakeness_cddb"] == ""
    for r in (rows[0], rows[2], rows[3]):
        assert r["error"] == "" and r["prediction"] in ("a", "b", "real")
        assert r["top1"] in ("a/real", "a/fake", "b/real", "b/fake") and r["top3"]
        assert float(r["top1_prob"]) >= float(r["top2_prob"]) >= float(r["top3_prob"])
        assert (r["is_fake"] == "True") == (float(r["fakeness_cddb"]) >= 0.5)
        assert r["prediction"] == ("real" if r["is_fake"] == "False" else r["prediction"])
    manifest = json.loads((run_dir / "data_manifest.json").read_text())["listing_sha256"]
    assert {r["data_manifest_sha256"] for r in rows} == {manifest}
    assert {r["model_id"] for r in rows} == {"run/exp_001"}
    assert all(len(r["config_sha256"]) == 64 and len(r["weights_sha256"]) == 64 for r in rows)
    assert "4 input(s), 3 predicted, 1 with an error" in err


def test_json_output_and_header(run_dir, images, tmp_path, capsys):
    out_file = tmp_path / "p.json"
    code, out, err = _cli(capsys, "--model", run_dir, images, "--format", "json", "--top-k", "9",
                          "--out", out_file, "--threshold", "0.6")
    assert code == 0 and out == ""
    doc = json.loads(out_file.read_text())
    assert doc["model"]["threshold"] == 0.6 and doc["model"]["threshold_source"] == "--threshold"
    assert doc["model"]["classes"] == ["a/real", "a/fake", "b/real", "b/fake"]
    assert doc["model"]["score"] == "fakeness_cddb"
    assert "max_fake" in doc["model"]["score_definition"]
    preds = doc["predictions"]
    assert len(preds) == 4 and doc["columns"][-1] == "error" and "top4" in doc["columns"]
    assert "top5" not in doc["columns"]  # top-k is capped at the number of classes
    assert preds[1]["error"] and preds[1]["prediction"] is None
    ok = [p for p in preds if p["error"] is None]
    assert all(p["threshold"] == 0.6 and p["is_fake"] == (p["fakeness_cddb"] >= 0.6) for p in ok)
    assert all(abs(sum(p[f"top{i}_prob"] for i in range(1, 5)) - 1) < 1e-5 for p in ok)


def test_glob_explicit_non_image_and_missing_paths(run_dir, images, capsys):
    pattern = str(images / "**" / "*.png")
    code, out, _ = _cli(capsys, "--model", run_dir, pattern, images / "notes.txt",
                        images / "nope.png", str(images / "*.gif"), "--format", "jsonl")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in rows}
    assert set(by_name) == {"a.png", "corrupt.png", "c.png", "notes.txt", "nope.png", "*.gif"}
    assert "not an image file (extension .txt)" in by_name["notes.txt"]["error"]
    assert by_name["nope.png"]["error"] == "no such file or directory"
    assert "matched no image" in by_name["*.gif"]["error"]
    assert by_name["a.png"]["error"] is None and by_name["c.png"]["prediction"]


def test_progress_bar_on_stderr_for_inputs_beyond_one_batch(run_dir, images, capsys):
    code, _, err = _cli(capsys, "--model", run_dir, images, "--batch-size", "1")
    assert code == 0 and "4/4" in err
    code, _, err = _cli(capsys, "--model", run_dir, images, "--batch-size", "1", "--no-progress")
    assert "4/4" not in err


def test_api_agrees_with_predict_dataset_on_paths_pil_and_tensors(run_dir):
    import lorax_cil
    from lorax_cil.benchmarks.images import load_rgb
    from lorax_cil.benchmarks.streams import build_cil_benchmark
    from lorax_cil.benchmarks.transforms import TransformConfig
    from lorax_cil.evaluation.metrics import fakeness_score
    from lorax_cil.training.evaluate import load_trained
    from lorax_cil.training.runner import predict_dataset

    net, cfg, scenario, _ = load_trained(run_dir)
    spec = net.backbone.spec
    tcfg = TransformConfig(size=cfg.data.crop or spec.input_size, mean=spec.mean, std=spec.std)
    bench = build_cil_benchmark(scenario, transform_config=tcfg, eval_split="val")
    _, want, _ = predict_dataset(net, bench.test_stream[1].dataset, batch_size=5,
                                 device=torch.device("cpu"))
    paths = [s.path for s in bench.samples["test"][1]]

    pred = lorax_cil.load(run_dir, device="cpu")
    np.testing.assert_allclose(pred.predict_proba(paths, batch_size=3), want, atol=1e-5)
    pils = [load_rgb(p) for p in paths]
    np.testing.assert_allclose(pred.predict_proba(pils), want, atol=1e-5)
    from torchvision.transforms.functional import to_tensor

    batch = torch.stack([to_tensor(im) for im in pils])  # (B, 3, H, W) in [0, 1]
    np.testing.assert_allclose(pred.predict_proba(batch), want, atol=1e-5)
    np.testing.assert_allclose(pred.predict_proba([np.asarray(im) for im in pils]), want, atol=1e-5)

    rows = pred.predict(paths + [pils[0], batch[0]], top_k=4)
    assert [r["path"] for r in rows[-2:]] == ["<PIL image #8>", "<tensor #9>"]
    score = fakeness_score(want, scenario.class_is_fake)
    np.testing.assert_allclose([r["fakeness_cddb"] for r in rows[:8]], score, atol=1e-6)
    assert [r["top1"] for r in rows[:8]] == [scenario.class_names[c] for c in want.argmax(1)]
    frame = pred.predict(paths[:3], as_frame=True)
    assert list(frame.columns) == pred.columns(3) and len(frame) == 3
    one = pred.predict(paths[0])  # a single path
    assert len(one) == 1 and one[0]["top1_prob"] == pytest.approx(want[0].max(), abs=1e-5)


def test_readout_option_reads_the_linear_head_of_a_class_mean_run(run_dir, capsys):
    """The fixture run reads by ncm-frozen class means; --readout head predicts with its linear
    head (the probabilities of the network switched to its head), every row names the read-out,
    and a read-out the checkpoint does not hold is refused with a message naming it."""
    import lorax_cil
    from lorax_cil.benchmarks.streams import build_cil_benchmark
    from lorax_cil.benchmarks.transforms import TransformConfig
    from lorax_cil.training.evaluate import load_trained
    from lorax_cil.training.runner import predict_dataset

    net, cfg, scenario, _ = load_trained(run_dir)
    spec = net.backbone.spec
    tcfg = TransformConfig(size=cfg.data.crop or spec.input_size, mean=spec.mean, std=spec.std)
    bench = build_cil_benchmark(scenario, transform_config=tcfg, eval_split="val")
    ds = bench.test_stream[1].dataset
    paths = [s.path for s in bench.samples["test"][1]]
    _, means, _ = predict_dataset(net, ds, batch_size=8, device=torch.device("cpu"))
    net.readout = "head"
    _, head, _ = predict_dataset(net, ds, batch_size=8, device=torch.device("cpu"))
    assert not np.allclose(means, head)  # two different prediction rules

    pred = lorax_cil.load(run_dir, device="cpu")
    assert pred.readout == "ncm-frozen"
    np.testing.assert_allclose(pred.predict_proba(paths), means, atol=1e-5)
    pred.select_readout("head")
    np.testing.assert_allclose(pred.predict_proba(paths), head, atol=1e-5)
    assert pred.describe()["readout"] == "head"
    assert pred.describe()["trained_readout"] == "ncm-frozen"
    pred.select_readout("ncm-frozen")  # and back: the run's own rule and model id
    np.testing.assert_allclose(pred.predict_proba(paths), means, atol=1e-5)
    assert "@" not in pred.identity.model_id

    code, out, err = _cli(capsys, "--model", run_dir, *paths, "--readout", "head", "--top-k", "4")
    rows = _rows(out)
    assert code == 0 and len(rows) == len(paths)
    assert all(r["model_id"].endswith("@head") for r in rows)
    np.testing.assert_allclose([float(r["top1_prob"]) for r in rows], head.max(1), atol=1e-5)
    code, out, err = _cli(capsys, "--model", run_dir, paths[0], "--readout", "ncm")
    assert code == 2 and out == "" and "read-out 'ncm' is not in this checkpoint" in err
    assert "ncm-frozen class means" in err and "Traceback" not in err


def test_predict_streams_lazily_and_keeps_input_order(run_dir):
    import lorax_cil

    pred = lorax_cil.load(run_dir, device="cpu")
    pulled = []

    def source():
        for i in range(1000):
            pulled.append(i)
            yield np.full((36, 36, 3), i % 256, dtype=np.uint8)

    rows = pred.iter_predict(source(), batch_size=4, workers=1)
    first = [next(rows) for _ in range(5)]
    assert [r["path"] for r in first] == [f"<array #{i}>" for i in range(5)]
    assert len(pulled) <= 12  # a batch on the model plus one read ahead, not the whole input


def test_unreadable_in_memory_input_is_reported_not_raised(run_dir):
    import lorax_cil

    pred = lorax_cil.load(run_dir, device="cpu")
    rows = pred.predict([torch.zeros(2, 5, 5), np.zeros((8, 8, 3), dtype=np.uint8)])
    assert "ValueError" in rows[0]["error"] and "must be" in rows[0]["error"]
    assert rows[1]["error"] is None
    with pytest.raises(ValueError, match="cannot predict"):
        pred.predict_proba(["/does/not/exist.png"])


def test_tampered_truncated_and_newer_models_are_refused(run_dir, tmp_path, capsys):
    import lorax_cil

    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    ck = bad / "checkpoints" / "exp_001"
    data = bytearray((ck / "tensors.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    (ck / "tensors.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        lorax_cil.load(bad)
    code, out, err = _cli(capsys, "--model", bad, tmp_path)
    assert code == 2 and out == "" and "checksum mismatch" in err
    meta = json.loads((ck / "meta.json").read_text())
    meta["config"]["train"]["seed"] = 1  # an edited meta.json
    (ck / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="metadata was modified"):
        lorax_cil.load(ck)
    meta["format_version"] = 99
    (ck / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="upgrade lorax-cil"):
        lorax_cil.load(ck)
    with pytest.raises(ValueError, match="is not a model"):
        lorax_cil.load(tmp_path)


def test_detector_folder_uses_its_calibrated_threshold(tmp_path, images, capsys):
    import lorax_cil
    from lorax_cil.benchmarks.images import load_rgb
    from lorax_cil.detection.model import AdapterConfig, BackboneRecipe, Detector, save_detector

    det = Detector.from_recipe(BackboneRecipe(name="vit-test", seed=0), AdapterConfig(kind="lora"))
    det.threshold = 0.42
    save_detector(det, tmp_path / "det")
    pred = lorax_cil.load(tmp_path / "det", device="cpu")
    assert pred.classes == ["real", "fake"] and pred.threshold == 0.42
    rows = pred.predict([images / "a.png", images / "corrupt.png"], top_k=5)
    assert rows[0]["prediction"] == ("fake" if rows[0]["p_fake"] >= 0.42 else "real")
    assert rows[0]["top2"] and "top3" not in rows[0] and rows[1]["error"]
    x = pred.transform(load_rgb(str(images / "a.png")))[None]
    assert rows[0]["p_fake"] == pytest.approx(float(det.predict_proba(x)[0]), abs=1e-6)
    code, out, _ = _cli(capsys, "--model", tmp_path / "det", images / "a.png")
    assert code == 0 and _rows(out)[0]["threshold"] == "0.420000"
    code, out, err = _cli(capsys, "--model", tmp_path / "det", images / "a.png", "--readout", "head")
    assert code == 2 and out == "" and "--readout head" in err and "detector" in err


def test_merge_results_and_unknown_kinds_are_refused_clearly(tmp_path):
    import lorax_cil
    from lorax_cil.inference.loading import model_kind_names
    from lorax_cil.training.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "m", {"delta.w": torch.zeros(2)}, {"kind": "lorax-cil/merge-result"})
    with pytest.raises(ValueError, match="merged task vector"):
        lorax_cil.load(tmp_path / "m")
    save_checkpoint(tmp_path / "x", {"w": torch.zeros(2)}, {"kind": "someone/else"})
    with pytest.raises(ValueError, match="known kinds: .*lorax-cil/detector"):
        lorax_cil.load(tmp_path / "x")
    assert {"lorax-cil/run", "lorax-cil/detector"} <= set(model_kind_names())


def test_model_card_has_the_required_sections(run_dir, tmp_path):
    card = (run_dir / "MODEL_CARD.md").read_text()
    for section in ("## Model", "## Data", "## Protocol", "## Metrics", "## Known limits"):
        assert section in card
    manifest = json.loads((run_dir / "data_manifest.json").read_text())
    for fact in ("`vit-test`", "weights tag", "`random`", manifest["listing_sha256"],
                 "evaluation split", "`val`", "exemplar memory", "4 images in total", "seed",
                 "epochs per task", "docs/metrics.md", "multi-real accuracy", "AA",
                 "randomly initialised", "unseen generator", "`ncm-frozen`",
                 "multi_real, linear head"):
        assert fact in card, fact
    from lorax_cil.detection.model import AdapterConfig, BackboneRecipe, Detector, save_detector
    from lorax_cil.training.model_card import write_model_card

    det = Detector.from_recipe(BackboneRecipe(name="vit-test"), AdapterConfig(kind="linear-probe"))
    save_detector(det, tmp_path / "det")
    text = write_model_card(tmp_path / "det").read_text()
    for section in ("## Model", "## Data", "## Protocol", "## Metrics", "## Known limits",
                    "fingerprint", "unseen generators", "docs/metrics.md"):
        assert section in text, section


def test_import_and_predict_help_stay_cheap():
    code = ("import sys, lorax_cil\nf = lorax_cil.load\nfrom lorax_cil.cli import build_parser\n"
            "build_parser()\nimport lorax_cil.inference.inputs\n"
            "print([m for m in ('torch', 'timm', 'avalanche', 'open_clip', 'peft') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_trained_detector_writes_its_model_card(tmp_path):
    from lorax_cil.detection.train import DetectConfig, merge_detect_config, train_detector

    data = make_cddb_tree(tmp_path / "data", tasks=("alpha",), n=5, size=(34, 34))
    cfg = merge_detect_config(DetectConfig(), {
        "data": {"sources": ["alpha"], "data_path": str(data), "calib_fraction": 0.4},
        "model": {"backbone": "vit-test", "pretrained": False, "adapter": "linear-probe"},
        "train": {"epochs": 1, "batch_size": 4, "device": "cpu"},
        "out": str(tmp_path / "det")}, source="test")
    det, _ = train_detector(cfg)
    card = (tmp_path / "det" / "MODEL_CARD.md").read_text()
    meta = json.loads((tmp_path / "det" / "meta.json").read_text())
    for fact in ("## Metrics", "acc@thr", "balanced-accuracy", "`alpha`", "3 / 3", "2 / 2",
                 meta["data_manifest"]["listing_sha256"], f"{det.threshold:.4f}"):
        assert fact in card, fact
