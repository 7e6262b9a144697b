"""The built-in model kinds: class-incremental runs (LoRAX and baselines) and binary detectors.

Fake scores:

* a run (``fakeness_cddb``): the CDDB fakeness score ``max_fake / (max_real + max_fake)`` over
  the softmax of all ``2T`` classes (:func:`lorax_cil.evaluation.metrics.fakeness_score`, the
  score AP is computed from). At the default threshold 0.5 ``is_fake`` is exactly "the most
  probable class is a fake class" (binary accuracy's decision), up to exact ties. The sum of the
  fake-class probabilities was not chosen: it can fall below 0.5 while a fake class is the most
  probable one, so its decisions would contradict the attribution.
* a detector (``p_fake``): ``sigmoid(logit)``, the detector's own probability of "fake"; the
  default threshold is the one calibrated on held-out source training images at training time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from lorax_cil.inference.loading import RUN_KIND
from lorax_cil.inference.predictor import ModelIdentity, Predictor

__all__ = ["RunPredictor", "DetectorPredictor", "config_hash", "run_dir_of", "eval_transform"]

def config_hash(config: Mapping[str, Any] | None) -> str | None:
    """SHA-256 of the canonical JSON (sorted keys, no spaces) of a resolved configuration."""
    if not config:
        return None
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def run_dir_of(folder: str | Path) -> Path | None:
    """The run directory of a checkpoint folder ``<run>/checkpoints/exp_NNN`` (else ``None``)."""
    folder = Path(folder).resolve()
    return folder.parent.parent if folder.parent.name == "checkpoints" else None


def eval_transform(size: int, mean: Any, std: Any, resize: int | None,
                   interpolation: str = "bilinear") -> Any:
    """The evaluation transform recorded with a saved model (size, normalisation, resize)."""
    from lorax_cil.benchmarks.transforms import TransformConfig, build_transform

    cfg = TransformConfig(size=int(size), mean=tuple(mean), std=tuple(std), resize=resize,
                          interpolation=interpolation)
    return build_transform(cfg, train=False)


class RunPredictor(Predictor):
    """A class-incremental run (LoRAX or a baseline): attribution over ``2T`` classes
    ``<task>/real`` and ``<task>/fake``; ``prediction`` is the task of the most probable fake
    class when ``is_fake``, else ``"real"``."""

    score_name = "fakeness_cddb"
    score_definition = ("CDDB fakeness score max_fake / (max_real + max_fake) over the softmax of "
                        "all classes; at 0.5 it agrees with 'the most probable class is fake'")

    @classmethod
    def from_checkpoint(cls, folder: str | Path, meta: Mapping[str, Any], *,
                        device: str = "cpu") -> "RunPredictor":
        """Load a run checkpoint folder (checksum verified) with its evaluation transform."""
        from lorax_cil.training.evaluate import load_trained

        net, cfg, scenario, meta = load_trained(folder, device=device)
        spec = net.backbone.spec
        transform = eval_transform(cfg.data.crop or spec.input_size, spec.mean, spec.std,
                                    cfg.data.resize)
        n = net.num_classes
        run_dir = run_dir_of(folder)
        manifest = None
        if run_dir is not None and (run_dir / "data_manifest.json").is_file():
            manifest = json.loads((run_dir / "data_manifest.json").read_text())["listing_sha256"]
        identity = ModelIdentity(
            model_id=f"{run_dir.name}/{Path(folder).name}" if run_dir else Path(folder).name,
            model_kind=RUN_KIND, path=str(folder), weights_sha256=meta.get("tensors_sha256"),
            data_manifest_sha256=manifest, config_sha256=config_hash(meta.get("config")),
            details={"strategy": cfg.train.strategy, "backbone": spec.name,
                     "backbone_weights": spec.weights, "scenario": scenario.name,
                     "tasks": scenario.task_names[: n // 2],
                     "completed_tasks": meta.get("completed_tasks")},
        )
        pred = cls(model=net, transform=transform, classes=scenario.class_names[:n],
                   identity=identity, threshold=0.5,
                   threshold_source="default 0.5 for runs (no calibrated threshold; at 0.5, "
                                    "is_fake means the most probable class is a fake class)",
                   device=device)
        pred.task_names = scenario.task_names[: n // 2]
        pred.class_is_fake = np.array(scenario.class_is_fake[:n], dtype=bool)
        if pred.readout is not None:  # a baseline's own rule is not named
            identity.details["readout"] = pred.readout
        return pred

    @property
    def readout(self) -> str | None:
        """How the network reads its classes now (:func:`~lorax_cil.models.heads.current_readout`;
        ``None``: a baseline's own rule)."""
        from lorax_cil.models.heads import current_readout

        return current_readout(self.model)

    def select_readout(self, readout: str) -> None:
        """Predict with ``readout`` instead of the run's own: a run that reads by class means
        (``train.readout=ncm`` / ``ncm-frozen`` / ``ncm-relative``) also has its trained linear
        head, so ``head`` is always available; class means only in the kind the run computed
        (an ``ncm-relative`` run also reads ``ncm-frozen``: its class means without the block
        offsets).

        Raises:
            ValueError: ``readout`` unknown, or class means the checkpoint does not hold.
        """
        from lorax_cil.models.heads import use_readout

        use_readout(self.model, readout, where=str(self.identity.path))
        details = self.identity.details
        trained = details.setdefault("trained_readout", details.get("readout"))
        base = details.setdefault("trained_model_id", self.identity.model_id)
        # every row names the read-out when it is not the run's own: another prediction rule
        model_id = base if readout == trained else f"{base}@{readout}"
        self.identity = dataclasses.replace(self.identity, model_id=model_id)
        details["readout"] = self.readout

    def probabilities(self, batch: Any) -> np.ndarray:
        import torch

        with torch.no_grad():
            logits = self.model(batch.to(self.device)).float()
            return torch.softmax(logits, dim=1).cpu().numpy()

    def fake_scores(self, probs: np.ndarray) -> np.ndarray:
        from lorax_cil.evaluation.metrics import fakeness_score

        if probs.shape[0] == 0:
            return np.zeros(0)
        return fakeness_score(probs, self.class_is_fake)

    def labels(self, probs: np.ndarray, is_fake: np.ndarray) -> list[str]:
        fake_idx = np.flatnonzero(self.class_is_fake)
        best_fake = fake_idx[probs[:, fake_idx].argmax(axis=1)] if probs.shape[0] else []
        return [self.task_names[c // 2] if f else "real" for c, f in zip(best_fake, is_fake)]


class DetectorPredictor(Predictor):
    """A binary real/fake detector (MoLE, LoRA or linear probe): classes ``real``, ``fake``;
    ``prediction`` is ``"fake"`` or ``"real"``."""

    score_name = "p_fake"
    score_definition = "sigmoid of the detector's logit: its probability that the image is fake"

    @classmethod
    def from_checkpoint(cls, folder: str | Path, meta: Mapping[str, Any], *,
                        device: str = "cpu") -> "DetectorPredictor":
        """Load a detector folder (checksum and backbone fingerprint verified)."""
        from lorax_cil.detection.model import load_detector

        det = load_detector(folder, device=device)
        meta = dict(meta)
        bb = meta.get("backbone", {})
        tf = (meta.get("training") or {}).get("transform") or {}
        transform = eval_transform(tf.get("size") or bb["input_size"], tf.get("mean", bb["mean"]),
                                    tf.get("std", bb["std"]), tf.get("resize"),
                                    tf.get("interpolation", "bilinear"))
        cal = det.calibration or {}
        source = (f"calibrated ({cal.get('rule')}, on {cal.get('n_real')} real + "
                  f"{cal.get('n_fake')} fake held-out source training images)" if cal
                  else "saved with the detector (not calibrated)")
        merge = meta.get("merge") or {}
        if merge:  # a merged detector says how its threshold was set
            source = f"merged detector: {(merge.get('threshold') or {}).get('description', source)}"
        training = meta.get("training") or {}
        identity = ModelIdentity(
            model_id=Path(folder).resolve().name, model_kind=str(meta.get("kind")),
            path=str(folder), weights_sha256=meta.get("tensors_sha256"),
            data_manifest_sha256=(meta.get("data_manifest") or {}).get("listing_sha256"),
            config_sha256=config_hash(training.get("config")),
            details={"adapter": det.adapter.kind, "backbone": bb.get("name"),
                     **({"merge_method": merge.get("method"),
                         "merged_from": [x.get("name") for x in merge.get("sources", [])]} if merge else {}),
                     "backbone_weights": bb.get("weights"),
                     "sources": [s.get("name") for s in training.get("sources", [])]},
        )
        return cls(model=det, transform=transform, classes=["real", "fake"], identity=identity,
                   threshold=det.threshold, threshold_source=source, device=device)

    def probabilities(self, batch: Any) -> np.ndarray:
        import torch

        with torch.no_grad():
            p = torch.sigmoid(self.model(batch.to(self.device)).float()).cpu().numpy()
        return np.stack([1.0 - p, p], axis=1)

    def fake_scores(self, probs: np.ndarray) -> np.ndarray:
        return probs[:, 1].astype(np.float64)

    def labels(self, probs: np.ndarray, is_fake: np.ndarray) -> list[str]:
        return ["fake" if f else "real" for f in is_fake]
