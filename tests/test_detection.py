"""Binary detectors: metrics and threshold oracles, save/load, LoRA deltas, calibration on source
training data only, evaluation layouts, robustness outputs and the `detect` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_cddb_tree, write_image
from lorax_cil.detection.model import (
    AdapterConfig,
    BackboneRecipe,
    Detector,
    load_detector,
    read_detector_meta,
    save_detector,
)
from lorax_cil.detection.protocol import (
    choose_threshold,
    detection_metrics,
    discover_generators,
    evaluate_detector,
    summary_rows,
)
from lorax_cil.models.mole import MoleSpec
from lorax_cil.training.checkpoint import CheckpointError


def _randomise(det: Detector, std: float = 0.2) -> Detector:
    with torch.no_grad():
        for p in det.trainable_parameters():
            p.normal_(0, std)
    return det


def _detector(kind="mole", name="vit-test", seed=0, options=None, **mole) -> Detector:
    adapter = AdapterConfig(kind=kind, mole=MoleSpec(**mole))
    return Detector.from_recipe(BackboneRecipe(name=name, seed=seed, options=options or {}), adapter)


# --- pure functions ---------------------------------------------------------------------------
def test_detection_metrics_on_a_hand_made_example():
    scores = [0.9, 0.8, 0.3, 0.6, 0.2, 0.1]
    fake = [1, 1, 1, 0, 0, 0]
    m = detection_metrics(scores, fake, threshold=0.25)
    # ranking: 0.9 F, 0.8 F, 0.6 R, 0.3 F -> AP = (1 + 1 + 3/4) / 3
    assert m["ap"] == pytest.approx((1 + 1 + 0.75) / 3)
    assert m["auc"] == pytest.approx(8 / 9)
    assert (m["real_acc@0.5"], m["fake_acc@0.5"], m["acc@0.5"]) == pytest.approx((2 / 3, 2 / 3, 4 / 6))
    assert (m["real_acc@thr"], m["fake_acc@thr"], m["acc@thr"]) == pytest.approx((2 / 3, 1.0, 5 / 6))
    assert (m["n_real"], m["n_fake"], m["threshold"]) == (3, 3, 0.25)
    only_real = detection_metrics([0.1, 0.7], [0, 0])
    assert np.isnan(only_real["ap"]) and np.isnan(only_real["fake_acc@0.5"])


def test_choose_threshold_maximises_balanced_accuracy_and_breaks_ties_towards_half():
    real, fake = [0.05, 0.1, 0.2, 0.3], [0.35, 0.4, 0.9]
    t = choose_threshold(real + fake, [0] * 4 + [1] * 3)
    assert t == pytest.approx(0.325)
    # 'accuracy' ties 0.425 with 'everything real' (5/6 each): the tie goes to the one nearer 0.5
    scores, y = [0.1, 0.2, 0.3, 0.4, 0.45, 0.6], [0, 0, 0, 0, 1, 0]
    assert choose_threshold(scores, y) == pytest.approx(0.425)
    assert choose_threshold(scores, y, rule="accuracy") == pytest.approx(0.425)
    with pytest.raises(ValueError, match="both real and fake"):
        choose_threshold([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="rule"):
        choose_threshold([0.1, 0.2], [0, 1], rule="youden")


def test_summary_rows_mean_over_generators_and_over_groups():
    rows = [{"generator": g, "group": grp, "ap": ap, "acc@0.5": ap, "n_real": 2, "n_fake": 3}
            for g, grp, ap in (("a", "G1", 0.2), ("b", "G1", 0.4), ("c", "G2", 0.9))]
    gen, grp = summary_rows(rows)
    assert gen["ap"] == pytest.approx(0.5) and grp["ap"] == pytest.approx((0.3 + 0.9) / 2)
    assert gen["n_real"] == 6 and grp["n_fake"] == 9


# --- the detector ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mole", "lora", "linear-probe"])
def test_only_adapter_and_head_train(kind):
    det = _detector(kind)
    names = [n for n, p in det.named_parameters() if p.requires_grad]
    assert names and all(".adapters.0." in n or n.startswith("net.head.") for n in names)
    assert det.head.out_features == 1
    x = torch.randn(3, 3, 32, 32)
    det.train()
    logits, aux = det.forward_with_aux(x)
    assert logits.shape == (3,)
    assert (float(aux.detach()) > 0) == (kind == "mole")
    rep = det.parameter_report()
    assert rep["trainable"] == rep["adapter_params"] + rep["head_params"]
    if kind == "linear-probe":
        assert rep["adapter_params"] == 0


@pytest.mark.parametrize("kind, name", [("mole", "vit-test"), ("lora", "clip-test"), ("linear-probe", "vit-test")])
def test_save_load_round_trip(kind, name, tmp_path):
    options = {"global_pool": "avg"} if kind == "mole" else None
    det = _randomise(_detector(kind, name, seed=3, options=options)).eval()
    det.threshold = 0.37
    save_detector(det, tmp_path / "det", training={"sources": [{"name": "a", "path": "/x"}]},
                  data_manifest={"listing_sha256": "abc"})
    meta = read_detector_meta(tmp_path / "det")
    assert meta["adapter"]["kind"] == kind and meta["threshold"] == 0.37
    assert meta["backbone"]["recipe"]["name"] == name and meta["data_manifest"]["listing_sha256"] == "abc"
    assert meta["backbone"]["recipe"]["options"] == (options or {})
    back = load_detector(tmp_path / "det")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(back(x), det(x), rtol=0, atol=1e-6)
    assert back.threshold == 0.37
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_detector(tmp_path / "det", backbone=BackboneRecipe(name=name, seed=4).build())


def test_lora_weight_deltas_reproduce_the_detector_on_a_plain_backbone():
    """What model merging needs: theta0 + delta, with theta0 = the recipe's backbone."""
    det = _randomise(_detector("lora", "clip-test", seed=1)).eval()
    deltas = det.weight_deltas()
    assert sorted(deltas) == sorted(f"{n}.weight" for n in det.targets)
    plain = det.recipe.build()
    theta0 = plain.model.state_dict()
    assert set(det.base_state_dict()) == set(theta0)
    merged = {k: v + deltas[k] if k in deltas else v for k, v in theta0.items()}
    plain.model.load_state_dict(merged)
    x = torch.randn(2, 3, 32, 32)
    feats = plain(x)
    torch.testing.assert_close(det.head(feats)[:, 0], det(x), rtol=0, atol=1e-5)
    assert _detector("linear-probe").weight_deltas() == {}
    with pytest.raises(ValueError, match="routes every token"):
        _detector("mole").weight_deltas()


# --- evaluation layouts ----------------------------------------------------------------------
def _univfd_tree(root: Path) -> Path:
    seed = 500
    for gen, subs in (("progan", ("car", "cat")), ("dalle", ("",)), ("ldm_100", ("",))):
        for sub in subs:
            for cls, n in (("0_real", 3), ("1_fake", 2)):
                for i in range(n):
                    seed += 1
                    write_image(root / gen / sub / cls / f"{i}.png", size=(34, 34), seed=seed)
    return root


def _genimage_tree(root: Path) -> Path:
    for j, gen in enumerate(("adm", "midjourney")):
        for cls in ("nature", "ai"):
            for i in range(2):
                write_image(root / gen / "val" / cls / f"{i}.png", size=(34, 34), seed=900 + 10 * j + i)
    return root


def test_discover_generators_in_every_layout(tmp_path):
    uni = discover_generators(_univfd_tree(tmp_path / "uni"))
    assert [(g.name, g.group, g.layout, g.n_real, g.n_fake) for g in uni] == [
        ("dalle", "DALL-E", "univfd", 3, 2), ("ldm_100", "LDM", "univfd", 3, 2),
        ("progan", "GAN", "univfd", 6, 4)]
    gi = discover_generators(_genimage_tree(tmp_path / "gi"), groups={"adm": "diffusion"})
    assert [(g.name, g.group, g.layout, g.n_real) for g in gi] == [
        ("adm", "diffusion", "genimage", 2), ("midjourney", "midjourney", "genimage", 2)]
    cddb = discover_generators(make_cddb_tree(tmp_path / "cddb", n=2), split="val")
    assert [(g.name, g.layout, g.n_fake) for g in cddb] == [("alpha", "cddb", 2), ("beta", "cddb", 4)]
    single = discover_generators(tmp_path / "uni" / "dalle")
    assert [g.name for g in single] == ["dalle"]
    with pytest.raises(ValueError, match="available"):
        discover_generators(tmp_path / "uni", generators=["sd14"])


def test_evaluate_every_image_with_robustness_outputs(tmp_path):
    det = _randomise(_detector("mole", seed=2), std=0.05)
    det.threshold = 0.45
    res = evaluate_detector(det, _univfd_tree(tmp_path / "uni"), robustness=True, blur_sigmas=(3,),
                            jpeg_qualities=(30,), out=tmp_path / "eval", batch_size=4)
    per = {r["generator"]: r for r in res["per_generator"]}
    assert (per["progan"]["n_real"], per["progan"]["n_fake"]) == (6, 4)  # no subsampling
    assert res["mean_generators"]["n_real"] == 12 and res["subsampled"] is None
    assert res["mean_groups"]["group"] == "3 groups"
    assert all(r["threshold"] == 0.45 for r in res["per_generator"])
    conds = {(r["condition"], r["level"]) for r in res["robustness"]}
    assert conds == {("clean", 0.0), ("blur", 3.0), ("jpeg", 30.0)}
    for f in ("results.json", "per_generator.csv", "per_generator.md", "scores.csv", "robustness.csv",
              "robustness_summary.csv", "robustness_summary.md", "robustness_blur.png", "robustness_jpeg.png"):
        assert (tmp_path / "eval" / f).is_file(), f
    scores = (tmp_path / "eval" / "scores.csv").read_text().splitlines()
    assert len(scores) == 1 + 20
    sub = evaluate_detector(det, tmp_path / "uni", generators=["progan"], max_per_class=1)
    assert sub["subsampled"]["max_per_class"] == 1 and sub["per_generator"][0]["n_real"] == 1


# --- training ------------------------------------------------------------------------------
def test_train_calibrates_on_carved_source_training_data_only(tmp_path):
    from lorax_cil.detection.train import DetectConfig, merge_detect_config, train_detector

    data = make_cddb_tree(tmp_path / "data", tasks=("alpha", "beta"), n=5, size=(34, 34))
    cfg = merge_detect_config(DetectConfig(), {
        "data": {"sources": ["alpha"], "data_path": str(data), "calib_fraction": 0.4},
        "model": {"backbone": "vit-test", "pretrained": False},
        "train": {"epochs": 2, "batch_size": 4, "device": "cpu"},
        "out": str(tmp_path / "det")}, source="test")
    det, summary = train_detector(cfg)
    calib = [line.split(",")[0] for line in (tmp_path / "det" / "calibration_scores.csv").read_text().splitlines()[1:]]
    train_dir = str(data / "alpha" / "train")
    assert len(calib) == 4 and all(p.startswith(train_dir) for p in calib)
    meta = read_detector_meta(tmp_path / "det")
    counts = meta["data_manifest"]["counts"]
    assert counts["calibration"]["alpha"] == {"real": 2, "fake": 2}
    assert counts["train"]["alpha"] == {"real": 3, "fake": 3}
    assert meta["threshold"] == summary["threshold"] == det.threshold
    assert meta["calibration"]["n_real"] == 2 and meta["training"]["sources"][0]["name"] == "alpha"
    assert len(meta["training"]["history"]) == 2
    assert load_detector(tmp_path / "det").threshold == det.threshold


def test_config_precedence_flags_over_file_over_defaults(tmp_path):
    from lorax_cil.cli import build_parser
    from lorax_cil.commands.detect import detect_config_from_args

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train: {lr: 0.001, epochs: 7}\nmodel: {adapter: lora}\nout: from-file\n")
    args = build_parser().parse_args(["detect", "train", "--config", str(cfg_file), "--lr", "0.002",
                                      "--source", "a=/tmp/a", "--expert-ranks", "2", "4",
                                      "--set", "data.hflip=false", "--backbone-option", "global_pool=avg"])
    cfg = detect_config_from_args(args)
    assert cfg.train.lr == 0.002 and cfg.train.epochs == 7 and cfg.model.adapter == "lora"
    assert cfg.model.expert_ranks == [2, 4] and cfg.data.hflip is False and cfg.out == "from-file"
    assert cfg.train.batch_size == 32 and cfg.train.balance_weight == 0.01
    assert cfg.model.backbone_options == {"global_pool": "avg"}
    args = build_parser().parse_args(["detect", "train", "--set", "train.bogus=1"])
    with pytest.raises(ValueError, match="unknown key train.bogus"):
        detect_config_from_args(args)


def test_cli_detect_train_eval_info(tmp_path, capsys):
    from lorax_cil.cli import main

    data = make_cddb_tree(tmp_path / "data", tasks=("alpha", "beta", "gamma"), n=4, size=(34, 34))
    assert main(["detect", "train", "--source", f"alpha={data / 'alpha'}", "--backbone", "clip-test",
                 "--no-pretrained", "--epochs", "1", "--batch-size", "4", "--calib-fraction", "0.3",
                 "--device", "cpu", "--out", str(tmp_path / "det")]) == 0
    assert main(["detect", "eval", "--detector", str(tmp_path / "det"), "--data", str(data),
                 "--robustness", "--blur", "2", "--jpeg", "50", "--groups", "beta=B", "gamma=B",
                 "--device", "cpu", "--out", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert "mean (groups)" in out and "threshold" in out
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["mean_groups"]["group"] == "2 groups"
    assert main(["detect", "info", str(tmp_path / "det")]) == 0
    assert '"kind": "mole"' in capsys.readouterr().out
    assert main(["detect", "eval", "--detector", str(tmp_path / "nothing"), "--data", str(data),
                 "--out", str(tmp_path / "e2")]) == 2


def test_detect_config_values_are_checked_like_run_config_values():
    """Detector and run configurations share one typed coercer (types and bounds)."""
    from lorax_cil.detection.train import DetectConfig, merge_detect_config

    cfg = merge_detect_config(DetectConfig(), {"train": {"lr": "6e-4", "epochs": 3.0},
                                               "model": {"expert_ranks": (4, 8)}}, source="t")
    assert cfg.train.lr == 6e-4 and cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.model.expert_ranks == [4, 8]
    for updates, message in (
        ({"train": {"epochs": 2.5}}, "train.epochs must be an integer"),
        ({"train": {"epochs": 0}}, "train.epochs must be >= 1"),
        ({"data": {"blur_prob": 1.5}}, "data.blur_prob must be between 0 and 1"),
        ({"model": {"backbone_options": "avg"}}, "model.backbone_options must be a mapping"),
        ({"model": {"expert_ranks": 8}}, "model.expert_ranks must be a list"),
        ({"train": {"device": "tpu"}}, "train.device"),
    ):
        with pytest.raises(ValueError, match=message):
            merge_detect_config(DetectConfig(), updates, source="t")
