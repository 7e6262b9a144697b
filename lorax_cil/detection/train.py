"""Training a binary detector on one or more source generators, with threshold calibration.

Loss: BCE on the single logit + ``balance_weight`` x the summed MoLE load-balancing losses;
AdamW (lr 6e-4 by default) over the adapter and the head only. Train-time Gaussian blur and
JPEG re-compression each with probability 0.1. A calibration split is carved from the source
*training* images (stratified per source and class) before training; the decision threshold is
chosen on it after training and saved with the detector. Evaluation data is never touched.

Output folder (a detector folder, loadable with :func:`~lorax_cil.detection.model.load_detector`)::

    tensors.safetensors, meta.json   the detector (see lorax_cil.detection.model)
    config.yaml                      the resolved configuration
    train_log.jsonl                  one record per epoch (loss, BCE, balance loss, seconds)
    calibration_scores.csv           scores of the calibration images
    MODEL_CARD.md                    what the detector is, its data, protocol, metrics, limits

Configuration precedence: command-line flags > config file > defaults (:func:`merge_detect_config`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from lorax_cil.utils import resolve_amp, resolve_device

__all__ = [
    "DetectDataConfig",
    "DetectModelConfig",
    "DetectTrainConfig",
    "DetectConfig",
    "merge_detect_config",
    "load_source_samples",
    "build_detector",
    "resolve_device",
    "train_detector",
]

logger = logging.getLogger(__name__)


@dataclass
class DetectDataConfig:
    """Source data and pre-processing.

    Attributes:
        sources: source generators: ``name=path`` pairs or names under ``data_path``. A source
            folder either holds ``<train_split>/[<sub>/]{0_real,1_fake}`` (CDDB task) or
            ``[<sub>/]{0_real,1_fake}`` directly (e.g. CNNDetection's ProGAN training set).
        data_path: folder holding the named sources.
        train_split: split folder of a CDDB-style source.
        calib_fraction: fraction of every (source, class) held out for the threshold.
        crop: crop size (``None``: the backbone's input size).
        resize: shorter-side resize before cropping (``None``: only upsizing small images).
        blur_prob: train-time Gaussian blur probability (sigma uniform in [0, 3]).
        jpeg_prob: train-time JPEG probability (quality uniform in [30, 100]).
        hflip: random horizontal flips.
        strict_data: fail on unreadable images instead of skipping them.
    """

    sources: list[str] | None = None
    data_path: str | None = None
    train_split: str = "train"
    calib_fraction: float = 0.1
    crop: int | None = None
    resize: int | None = None
    blur_prob: float = 0.1
    jpeg_prob: float = 0.1
    hflip: bool = True
    strict_data: bool = False


@dataclass
class DetectModelConfig:
    """Backbone and adapter (defaults: the MoLE paper's CLIP ViT-L/14 setting).

    Attributes:
        backbone: registry name.
        pretrained: ``True``, ``False`` or a weights tag.
        weights: local weights file (when set, ``pretrained`` is ignored).
        img_size: input resolution override.
        backbone_options: further keyword options of the backbone factory, e.g.
            ``{global_pool: avg}`` for timm ViTs or ``{pool_type: avg}`` for open_clip towers.
        adapter: ``mole``, ``lora``, ``linear-probe`` or ``full`` (full fine-tuning of the last
            ``blocks`` blocks and the neck; the specialists ``lorax-cil merge`` takes are ``lora``
            or ``full``).
        blocks: adapt the last ``blocks`` blocks (``None``: all).
        targets: ``mlp``, ``mlp-in``, ``mlp-out``, ``attn`` or ``attn+mlp``.
        shared_rank: MoLE shared LoRA rank (0 = none).
        expert_ranks: MoLE expert ranks (empty = none).
        alpha: LoRA alpha of every branch (``None``: alpha = r, scaling 1).
        dropout: adapter input dropout.
        lora_rank: rank of the plain LoRA adapter.
    """

    backbone: str = "ViT-L-14"
    pretrained: bool | str = True
    weights: str | None = None
    img_size: int | None = None
    backbone_options: dict[str, Any] = field(default_factory=dict)
    adapter: str = "mole"
    blocks: int | None = 3
    targets: str = "mlp"
    shared_rank: int = 8
    expert_ranks: list[int] = field(default_factory=lambda: [4, 8, 16])
    alpha: float | None = None
    dropout: float = 0.0
    lora_rank: int = 8


@dataclass
class DetectTrainConfig:
    """Optimisation.

    Attributes:
        epochs: passes over the training images.
        max_steps: stop after this many optimiser steps (``None``: no limit).
        batch_size: training batch size.
        eval_batch_size: batch size for calibration scoring.
        lr: AdamW learning rate (paper: 6e-4).
        weight_decay: AdamW weight decay.
        balance_weight: weight of the summed load-balancing losses (paper: 0.01).
        threshold_rule: ``balanced-accuracy`` or ``accuracy`` on the calibration split.
        seed: seed of everything, including randomly initialised backbone weights.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        num_workers: data-loader workers.
        amp: bfloat16 autocast on CUDA: ``auto``, ``true`` or ``false``.
    """

    epochs: int = 5
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 6e-4
    weight_decay: float = 0.0
    balance_weight: float = 0.01
    threshold_rule: str = "balanced-accuracy"
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    amp: str = "auto"


@dataclass
class DetectConfig:
    """Everything ``detect train`` needs; ``out`` is the detector folder."""

    data: DetectDataConfig = field(default_factory=DetectDataConfig)
    model: DetectModelConfig = field(default_factory=DetectModelConfig)
    train: DetectTrainConfig = field(default_factory=DetectTrainConfig)
    out: str = "detectors/detector"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = ("data", "model", "train")
#: Bounds of numeric detector keys (as the run configuration's, where the keys mean the same).
DETECT_MINIMUMS: dict[str, float] = {
    "data.calib_fraction": 0, "data.crop": 1, "data.resize": 1, "data.blur_prob": 0,
    "data.jpeg_prob": 0, "model.img_size": 1, "model.blocks": 1, "model.shared_rank": 0,
    "model.dropout": 0, "model.lora_rank": 1, "train.epochs": 1, "train.max_steps": 1,
    "train.batch_size": 1, "train.eval_batch_size": 1, "train.lr": 0, "train.weight_decay": 0,
    "train.balance_weight": 0, "train.seed": 0, "train.num_workers": 0,
}
DETECT_MAXIMUMS: dict[str, float] = {
    "data.calib_fraction": 0.99, "data.blur_prob": 1, "data.jpeg_prob": 1, "model.dropout": 0.99,
    "data.crop": 8192, "data.resize": 16384, "model.img_size": 8192, "model.lora_rank": 4096,
    "model.shared_rank": 4096, "model.blocks": 1000,
}


def merge_detect_config(base: DetectConfig, updates: Mapping[str, Any], *, source: str) -> DetectConfig:
    """``base`` updated by a nested mapping (a new object); unknown sections or keys raise."""
    from lorax_cil.training.config import merge_sections, typed_coercer

    coerce = typed_coercer(
        {"data": DetectDataConfig, "model": DetectModelConfig, "train": DetectTrainConfig},
        minimums=DETECT_MINIMUMS, maximums=DETECT_MAXIMUMS)
    return merge_sections(base, updates, sections=_SECTIONS, source=source, coerce=coerce)


# --------------------------------------------------------------------------- data
def load_source_samples(cfg: DetectDataConfig) -> tuple[Any, list[list[Any]]]:
    """The sources as a scenario and one sorted :class:`Sample` list per source.

    ``Sample.label`` is ``2 * source + is_fake`` (so calibration is stratified per source and
    class); the detector's target is ``is_fake``.
    """
    from lorax_cil.benchmarks.datasets import Sample
    from lorax_cil.benchmarks.folders import DataLayoutError, scan_class_folders
    from lorax_cil.benchmarks.scenarios import Scenario, parse_task_spec

    if not cfg.sources:
        raise ValueError("detect train needs at least one source: --source NAME=PATH (or NAME with --data-path)")
    tasks = tuple(parse_task_spec(s, cfg.data_path) for s in cfg.sources)
    scenario = Scenario("detect-sources", tasks)
    out: list[list[Sample]] = []
    for t, task in enumerate(tasks):
        folder = Path(task.path)
        if not folder.is_dir():
            raise DataLayoutError(f"source {task.name!r}: folder does not exist: {folder}")
        split = folder / cfg.train_split
        recs = scan_class_folders(split if split.is_dir() else folder)
        out.append([Sample(r.path, Scenario.label(t, r.is_fake), t, r.is_fake, task.name, r.subclass)
                    for r in recs])
    return scenario, out


# --------------------------------------------------------------------------- model
def build_detector(cfg: DetectConfig):
    """The untrained detector described by ``cfg.model`` (backbone seeded by ``train.seed``)."""
    from lorax_cil.detection.model import ADAPTERS, AdapterConfig, BackboneRecipe, Detector
    from lorax_cil.models.mole import MoleSpec

    m = cfg.model
    if m.adapter not in ADAPTERS:
        raise ValueError(f"model.adapter must be one of {list(ADAPTERS)}, got {m.adapter!r} (merged "
                         "detectors are written by 'lorax-cil merge', not trained)")
    pretrained = False if m.weights else m.pretrained  # a local weights file replaces downloads
    recipe = BackboneRecipe(name=m.backbone, pretrained=pretrained, weights=m.weights,
                            img_size=m.img_size, seed=cfg.train.seed, options=dict(m.backbone_options))
    mole = MoleSpec(shared_rank=int(m.shared_rank), expert_ranks=tuple(int(r) for r in m.expert_ranks),
                    alpha=m.alpha, dropout=float(m.dropout), targets=m.targets, blocks=m.blocks,
                    balance_weight=float(cfg.train.balance_weight))
    adapter = AdapterConfig(kind=m.adapter, mole=mole, lora_rank=int(m.lora_rank))
    return Detector.from_recipe(recipe, adapter)


def _transform_config(cfg: DetectConfig, spec: Any):
    from lorax_cil.benchmarks.transforms import TransformConfig

    d = cfg.data
    return TransformConfig.for_backbone(spec, d)


def _epoch(det, loader, opt, device, amp: bool, state: dict, max_steps: int | None,
           meter: Any = None) -> dict[str, float]:
    """One epoch; under torchrun the loader's batch sampler is a ``GlobalBatchSampler`` and the
    gradients are averaged over the ranks before every step."""
    import torch
    from torch.nn import functional as F

    from lorax_cil.distributed import all_gather_objects, allreduce_gradients, is_distributed

    det.train()
    sampler = loader.batch_sampler if is_distributed() else None
    tot = {"loss": 0.0, "bce": 0.0, "balance": 0.0, "n": 0}
    for i, (x, label) in enumerate(loader):
        if max_steps is not None and state["step"] >= max_steps:
            break
        x, y = x.to(device), (label % 2).float().to(device)  # label = 2 * source + is_fake
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp):
            logits, aux = det.forward_with_aux(x)
        bce = F.binary_cross_entropy_with_logits(logits.float(), y)
        loss = bce + aux.float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        n = x.shape[0]
        if sampler is not None:
            n = sampler.local_counts[i]  # 0 for a stand-in sample
            allreduce_gradients([p for g in opt.param_groups for p in g["params"]], n)
        opt.step()
        state["step"] += 1
        tot["loss"] += float(loss.detach()) * n
        tot["bce"] += float(bce.detach()) * n
        tot["balance"] += float(aux.detach()) * n
        tot["n"] += n
        if meter is not None:
            meter.update(n, loss)
    if sampler is not None:  # sums over the ranks
        tot = {k: sum(t[k] for t in all_gather_objects(tot)) for k in tot}
    n = max(tot.pop("n"), 1)
    return {k: v / n for k, v in tot.items()}


def train_detector(cfg: DetectConfig, *, progress: Callable[[str], None] | None = None,
                   display: str = "auto"):
    """Train, calibrate and save a detector; returns ``(detector, summary)``.

    ``display``: per-epoch progress (``auto``: a bar on a terminal, else one line per epoch;
    ``bar``, ``lines`` or ``off``; see :class:`~lorax_cil.training.progress.EpochProgress`).

    The summary holds the calibration threshold and metrics, the parameter report and the
    per-epoch history. Everything is written to ``cfg.out``.

    Under torchrun each global batch of ``train.batch_size`` images (the batch one process
    would draw) is split over the ranks and the gradients are averaged; rank 0 calibrates
    and writes the detector folder.
    """
    import torch
    from torch.utils.data import DataLoader

    from lorax_cil import distributed as dist
    from lorax_cil.benchmarks.datasets import ImageSampleDataset
    from lorax_cil.benchmarks.images import DataIssues
    from lorax_cil.benchmarks.transforms import build_transform
    from lorax_cil.training.progress import EpochProgress
    from lorax_cil.utils import seed_everything

    say = progress or (lambda msg: logger.info("%s", msg))
    if not dist.is_main():
        say = lambda msg: logger.debug("%s", msg)  # noqa: E731
    t = cfg.train
    if t.epochs < 1 or t.batch_size < 1 or not t.lr > 0:
        raise ValueError("train.epochs and train.batch_size must be >= 1 and train.lr > 0")
    out = Path(cfg.out)
    seed_everything(t.seed)
    device = dist.local_device(resolve_device(t.device))
    scenario, per_source = load_source_samples(cfg.data)
    det = build_detector(cfg).to(device)
    issues = DataIssues()
    tcfg = _transform_config(cfg, det.backbone.spec)
    train_s, calib_s = _split_sources(per_source, cfg, tcfg.size, issues)
    flat_train = [s for ss in train_s for s in ss]
    flat_calib = [s for ss in calib_s for s in ss]
    report = det.parameter_report()
    say(f"{det.adapter.kind} detector on {det.backbone.spec.name}: {report['trainable']:,} trainable of "
        f"{report['total']:,} parameters ({100 * report['fraction_with_head']:.4f} % incl. head); "
        f"{len(flat_train)} training and {len(flat_calib)} calibration images from {scenario.task_names}")
    gen = torch.Generator().manual_seed(t.seed)
    data = ImageSampleDataset(flat_train, transform=build_transform(tcfg, train=True),
                              strict=cfg.data.strict_data, issues=issues)
    drop_last = len(flat_train) > t.batch_size
    if dist.is_distributed():
        sampler = dist.GlobalBatchSampler(len(data), t.batch_size, drop_last=drop_last,
                                          generator=gen)
        loader = DataLoader(data, batch_sampler=sampler, num_workers=t.num_workers, generator=gen)
    else:
        loader = DataLoader(data, batch_size=t.batch_size, shuffle=True, num_workers=t.num_workers,
                            generator=gen, drop_last=drop_last)
    opt = torch.optim.AdamW(det.trainable_parameters(), lr=t.lr, weight_decay=t.weight_decay)
    dist.broadcast_parameters([p for g in opt.param_groups for p in g["params"]])
    amp, state, history = resolve_amp(t.amp, device), {"step": 0}, []
    meter = EpochProgress(display=display if dist.is_main() else "off", say=say)
    for epoch in range(t.epochs):
        t0 = time.perf_counter()
        meter.start_epoch(epoch, t.epochs, steps=len(loader), lr=opt.param_groups[0]["lr"])
        rec = _epoch(det, loader, opt, device, amp, state, t.max_steps, meter)
        rec.update(epoch=epoch, steps=state["step"], seconds=round(time.perf_counter() - t0, 3))
        shown = meter.end_epoch(f"BCE {rec['bce']:.4f}, balance {rec['balance']:.4f}")
        rec.update(lr=shown["lr"], images_per_s=shown["images_per_s"])
        history.append(rec)
        if t.max_steps is not None and state["step"] >= t.max_steps:
            break
    def calibrate() -> tuple[dict[str, Any], float, dict[str, Any]]:
        res = _calibrate(det, flat_calib, cfg, tcfg, device, issues)
        return res, det.threshold, det.calibration

    calib, det.threshold, det.calibration = dist.on_main(calibrate)  # rank 0 scores
    say(f"threshold {det.threshold:.4f} ({t.threshold_rule} on {len(flat_calib)} calibration images): "
        f"calibration AP {calib['metrics']['ap']:.4f}, acc@thr {calib['metrics']['acc@thr']:.4f}")
    training = {"config": cfg.to_dict(), "sources": scenario.to_dict()["tasks"], "history": history,
                "steps": state["step"], "transform": dataclasses.asdict(tcfg), "amp": amp,
                "device": str(device)}
    training["world_size"] = dist.world_size()
    scores = calib.pop("scores")
    if dist.is_main():
        _save(det, out, cfg, scenario, (train_s, calib_s), training, scores, issues)
    dist.barrier()
    return det, {"threshold": det.threshold, "calibration": calib, "parameters": report,
                 "history": history, "out": str(out)}


def _split_sources(per_source, cfg: DetectConfig, min_size: int, issues) -> tuple[list, list]:
    """Drop unreadable files, then carve the calibration part of every source (stratified)."""
    from lorax_cil.benchmarks.datasets import carve_calibration, probe_samples

    train_s, calib_s = [], []
    for samples in per_source:
        samples = probe_samples(samples, min_size=min_size, issues=issues, strict=cfg.data.strict_data)
        tr, ca = carve_calibration(samples, cfg.data.calib_fraction, seed=cfg.train.seed)
        train_s.append(tr)
        calib_s.append(ca)
    flat = [s for ss in calib_s for s in ss]
    if not flat or len({s.is_fake for s in flat}) < 2:
        raise ValueError("the calibration split needs real and fake images: raise data.calib_fraction "
                         "(it is carved from the source training images)")
    return train_s, calib_s


def _save(det, out: Path, cfg: DetectConfig, scenario, parts, training, calib_scores, issues) -> None:
    """The detector folder: tensors + meta, config, log, calibration scores, model card."""
    import yaml

    from lorax_cil.benchmarks.verify import data_manifest
    from lorax_cil.detection.model import save_detector
    from lorax_cil.training.model_card import write_model_card
    from lorax_cil.utils import atomic_write_text

    train_s, calib_s = parts
    manifest = data_manifest({"train": train_s, "calibration": calib_s}, scenario)
    manifest["data_issues"] = issues.summary()
    out.mkdir(parents=True, exist_ok=True)
    save_detector(det, out, training=training, data_manifest=manifest)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    atomic_write_text(out / "train_log.jsonl", "".join(json.dumps(h) + "\n" for h in training["history"]))
    flat = [s for ss in calib_s for s in ss]
    atomic_write_text(out / "calibration_scores.csv", "path,is_fake,score\n" + "".join(
        f"{s.path},{s.is_fake},{v:.6f}\n" for s, v in zip(flat, calib_scores)))
    write_model_card(out)


def _calibrate(det, samples, cfg: DetectConfig, tcfg, device, issues) -> dict[str, Any]:
    """Score the calibration split and set ``det.threshold`` / ``det.calibration``."""
    from lorax_cil.benchmarks.folders import ImageRecord
    from lorax_cil.benchmarks.transforms import build_transform
    from lorax_cil.detection.protocol import choose_threshold, detection_metrics, score_records

    recs = [ImageRecord(s.path, s.is_fake, s.subclass) for s in samples]
    scores = score_records(det, recs, transform=build_transform(tcfg, train=False),
                           batch_size=cfg.train.eval_batch_size, device=device,
                           num_workers=cfg.train.num_workers, issues=issues)
    y = np.array([s.is_fake for s in samples], dtype=bool)
    det.threshold = choose_threshold(scores, y, rule=cfg.train.threshold_rule)
    metrics = detection_metrics(scores, y, det.threshold)
    det.calibration = {"rule": cfg.train.threshold_rule, "split": "carved from source training data",
                       "fraction": cfg.data.calib_fraction, "n_real": int((~y).sum()),
                       "n_fake": int(y.sum()), "metrics": metrics}
    return {**det.calibration, "scores": scores}
