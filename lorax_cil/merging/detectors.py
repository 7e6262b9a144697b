"""Merging detector folders into one detector folder: what ``lorax-cil merge`` does.

Specialists are detector folders written by ``lorax-cil detect train`` with a ``lora`` adapter
(dense delta ``scaling * B @ A`` per adapted layer) or ``full`` fine-tuning of the last blocks
(the fine-tuned copy minus ``theta_0``), all trained from the same backbone weights (same
fingerprint). The merged detector is a detector folder of adapter kind ``merged``: the merged
backbone ``theta_0 + tau*`` is folded into the backbone weights (``backbone.<name>`` tensors),
the head is the element-wise mean of the specialists' heads, so ``detect eval``, ``predict`` and
``lorax_cil.load`` run it like any detector, with **one backbone pass per image**.

``meta.json["merge"]`` records the method, its options, the sources (folder, name, tensor and
metadata checksums, threshold) and how the threshold was set. R2M merges keep their Gram cache
in ``<out>/gram/`` (safetensors + JSON): :func:`merge_detector_folders` with ``add_from`` re-merges
with more specialists and computes only the new Gram rows.

Threshold of the merged detector (``threshold``):

* ``"mean"`` (default): the mean of the specialists' calibrated thresholds (no data needed);
* a number in [0, 1]: that value (e.g. 0.5 for the averaged head's own decision boundary);
* with ``calibrate=<folder>``: chosen on that folder's images with ``threshold_rule`` (as
  ``detect train`` does on its calibration split), which overrides ``threshold``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from lorax_cil.merging.result import MergeResult
from lorax_cil.merging.task_vectors import TaskVector

__all__ = [
    "MERGEABLE_ADAPTERS",
    "THRESHOLD_MODES",
    "Specialist",
    "load_specialist",
    "check_specialists",
    "merge_specialists",
    "build_merged_detector",
    "merge_detector_folders",
    "read_folder_meta",
]

logger = logging.getLogger(__name__)

MERGEABLE_ADAPTERS = ("lora", "full")
THRESHOLD_MODES = ("mean",)
GRAM_FOLDER = "gram"
#: fields of the evaluation transform that must agree between specialists.
_TRANSFORM_FIELDS = ("size", "mean", "std", "resize", "interpolation")


@dataclass
class Specialist:
    """One specialist detector folder, reduced to what a merge needs.

    Attributes:
        name: unique name (the folder's name unless given).
        folder: the detector folder.
        meta: its validated ``meta.json``.
        task_vector: ``tau = theta_i - theta_0`` over backbone parameters, with the 1-logit head.
        buffers: ``full`` specialists' fine-tuned BatchNorm running statistics (else empty).
    """

    name: str
    folder: Path
    meta: dict[str, Any]
    task_vector: TaskVector
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return self.meta["backbone"]["fingerprint_sha256"]

    @property
    def transform(self) -> dict[str, Any]:
        return dict((self.meta.get("training") or {}).get("transform") or {})

    def record(self) -> dict[str, Any]:
        """What the merged detector records about this source."""
        training = self.meta.get("training") or {}
        return {"name": self.name, "path": str(self.folder.resolve()),
                "tensors_sha256": self.meta.get("tensors_sha256"),
                "meta_sha256": self.meta.get("meta_sha256"),
                "adapter": self.meta["adapter"]["kind"], "threshold": float(self.meta["threshold"]),
                "training_sources": [s.get("name") for s in training.get("sources", [])]}


def read_folder_meta(folder: Path, what: str) -> dict[str, Any]:
    """The checked ``meta.json`` of a detector folder; errors name the folder as ``what``."""
    from lorax_cil.detection.model import read_detector_meta
    from lorax_cil.training.checkpoint import CheckpointError

    if not folder.exists():
        raise FileNotFoundError(f"{what} folder does not exist: {folder}")
    if not (folder / "meta.json").is_file():
        raise ValueError(f"{what} {folder} is not a detector folder (no meta.json; expected a folder "
                         "written by 'lorax-cil detect train')")
    try:
        return read_detector_meta(folder)
    except CheckpointError as exc:
        raise CheckpointError(f"{what} {folder}: {exc}") from exc


def _check_lora(det: Any, meta: Mapping[str, Any], where: str) -> None:
    """The adapters must be plain LoRA whose dense delta is ``scaling * B @ A``."""
    from lorax_cil.merging.lora_vectors import _check_plain_adapter, _check_recorded_spec

    _check_recorded_spec(det.net, (meta.get("architecture") or {}).get("lora"), where)
    spec = det.net.lora_spec
    for name in det.targets:
        _check_plain_adapter(det.backbone.model.get_submodule(name), 0, spec.scaling,
                             f"{where}, layer {name!r}")


def load_specialist(folder: str | os.PathLike, *, name: str | None = None) -> Specialist:
    """Read one specialist detector folder (checksums and backbone fingerprint verified).

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: not a detector folder, tampered files (``CheckpointError``), an adapter that
            has no dense weight delta (``mole``, ``linear-probe``, ``merged``), a LoRA variant
            whose delta is not ``scaling * B @ A``, or a head with more than one logit.
    """
    from lorax_cil.detection.model import load_detector
    from lorax_cil.training.checkpoint import CheckpointError

    folder = Path(folder)
    meta = read_folder_meta(folder, "specialist")
    kind = meta["adapter"]["kind"]
    where = f"specialist {folder}"
    if kind not in MERGEABLE_ADAPTERS:
        why = {"mole": "routes every token to one expert, so its update has no dense weight delta",
               "linear-probe": "has no backbone update (only a head): there is nothing to merge",
               "merged": "is itself a merge; merge its sources (listed in its meta.json) instead"}
        raise ValueError(f"{where}: adapter {kind!r} {why.get(kind, 'is not mergeable')}; specialists "
                         f"must be trained with --adapter {' or '.join(MERGEABLE_ADAPTERS)}")
    try:
        det = load_detector(folder)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    if det.head.out_features != 1:
        raise ValueError(f"{where}: the head has {det.head.out_features} outputs, expected 1 logit")
    if kind == "lora":
        _check_lora(det, meta, where)
    head = {"weight": det.head.weight.detach().clone(), "bias": det.head.bias.detach().clone()}
    name = name or folder.resolve().name
    tv = TaskVector(deltas=det.weight_deltas(), head=head, name=name,
                    meta={"kind": f"detector-{kind}", "path": str(folder.resolve()),
                          "tensors_sha256": meta.get("tensors_sha256")})
    buffers = {k: v.clone() for k, v in det.tail_buffers().items()}
    return Specialist(name=name, folder=folder, meta=meta, task_vector=tv, buffers=buffers)


def _unique_names(folders: Sequence[Path]) -> list[str]:
    names = [f.resolve().name for f in folders]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if names.count(n) == 1 else f"{n}#{seen[n]}")
    return out


def check_specialists(specialists: Sequence[Specialist]) -> None:
    """Same backbone (name and weights fingerprint), head size, adapter kind, parameters and
    evaluation transform; distinct names. Errors name the folders that differ."""
    if not specialists:
        raise ValueError("merging needs at least one specialist")
    first = specialists[0]
    names = [s.name for s in specialists]
    if len(set(names)) != len(names):
        raise ValueError(f"specialist names must be distinct, got {names}")
    for s in specialists[1:]:
        a, b = first.meta["backbone"], s.meta["backbone"]
        if a["name"] != b["name"] or s.fingerprint != first.fingerprint:
            raise ValueError(f"specialists {first.folder} and {s.folder} were not trained from the same "
                             f"backbone weights (backbone {a['name']!r} vs {b['name']!r}, weights "
                             f"fingerprint {first.fingerprint[:12]} vs {s.fingerprint[:12]}); merging "
                             "needs one shared theta_0")
        ha, hb = first.task_vector.head["weight"].shape, s.task_vector.head["weight"].shape
        if ha != hb:
            raise ValueError(f"specialists {first.folder} and {s.folder} have different heads "
                             f"({tuple(ha)} vs {tuple(hb)})")
        ka, kb = first.meta["adapter"]["kind"], s.meta["adapter"]["kind"]
        if ka != kb:
            raise ValueError(f"specialists {first.folder} ({ka}) and {s.folder} ({kb}) have different "
                             "adapter kinds; their task vectors cover different parameters")
        try:
            first.task_vector.check_compatible(s.task_vector)
        except ValueError as exc:
            raise ValueError(f"specialists {first.folder} and {s.folder} adapt different parameters "
                             f"(other blocks or targets?): {exc}") from exc
        ta, tb = first.transform, s.transform
        diff = [f for f in _TRANSFORM_FIELDS if ta.get(f) != tb.get(f)]
        if diff:
            raise ValueError(f"specialists {first.folder} and {s.folder} use different input "
                             f"pre-processing ({', '.join(f'{f}: {ta.get(f)} vs {tb.get(f)}' for f in diff)})")


def merge_specialists(
    specialists: Sequence[Specialist],
    method: str,
    options: Mapping[str, Any] | None = None,
    *,
    gram: Any = None,
) -> MergeResult:
    """Run merge ``method`` over the specialists' task vectors (``gram``: R2M's cache to reuse)."""
    from lorax_cil.merging.result import get_merge_method

    check_specialists(specialists)
    fn = get_merge_method(method)
    opts = dict(options or {})
    if gram is not None:
        if method != "r2m":
            raise ValueError(f"a Gram cache is only used by r2m, not {method!r}")
        opts["gram"] = gram
    return fn([s.task_vector for s in specialists], **opts)


def _mean_buffers(specialists: Sequence[Specialist]) -> dict[str, torch.Tensor]:
    if not specialists[0].buffers:
        return {}
    keys = list(specialists[0].buffers)
    return {k: torch.stack([s.buffers[k].double() for s in specialists]).mean(0).to(specialists[0].buffers[k].dtype)
            for k in keys}


def build_merged_detector(specialists: Sequence[Specialist], result: MergeResult) -> Any:
    """The merged detector: ``theta_0 + tau*`` folded into a fresh backbone, the averaged head.

    ``full`` specialists' BatchNorm running statistics are averaged too. The threshold is the
    mean of the specialists' (replace it afterwards to choose another).
    """
    from lorax_cil.detection.model import (
        MERGED,
        AdapterConfig,
        BackboneRecipe,
        Detector,
        backbone_fingerprint,
    )

    first = specialists[0]
    recipe = BackboneRecipe.from_dict(first.meta["backbone"]["recipe"])
    det = Detector(backbone=recipe.build(), adapter=AdapterConfig(kind=MERGED), recipe=recipe)
    if backbone_fingerprint(det) != first.fingerprint:
        raise ValueError(f"the backbone rebuilt from {first.folder}'s recipe ({recipe.name!r}) differs from "
                         "the one the specialists were trained on (fingerprint mismatch)")
    base = det.base_state_dict()
    weights = {k: (base[k].double() + d.double()).to(base[k].dtype) for k, d in result.task_vector.items()}
    weights.update(_mean_buffers(specialists))
    det.set_backbone_weights(weights)
    head = result.head
    with torch.no_grad():
        det.head.weight.copy_(head["weight"])
        det.head.bias.copy_(head["bias"])
    det.threshold = float(sum(float(s.meta["threshold"]) for s in specialists) / len(specialists))
    return det.eval()


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    return str(x)


def _calibrate(det: Any, folder: str, *, split: str, rule: str, transform: Mapping[str, Any],
               batch_size: int) -> dict[str, Any]:
    """Choose the threshold on every image under ``folder`` (any ``detect eval`` layout)."""
    import numpy as np

    from lorax_cil.benchmarks.images import DataIssues
    from lorax_cil.detection.protocol import (
        choose_threshold,
        detection_metrics,
        discover_generators,
        readable_records,
        score_records,
    )
    from lorax_cil.inference.kinds import eval_transform

    spec = det.backbone.spec
    tf = eval_transform(transform.get("size") or spec.input_size, transform.get("mean", spec.mean),
                         transform.get("std", spec.std), transform.get("resize"),
                         transform.get("interpolation", "bilinear"))
    issues = DataIssues()
    recs = [r for g in discover_generators(folder, split=split) for r in g.records]
    recs = readable_records(recs, issues)
    y = np.array([r.is_fake for r in recs], dtype=bool)
    if y.all() or not y.any():
        raise ValueError(f"--calibrate {folder}: needs real and fake images, found {int((~y).sum())} real "
                         f"and {int(y.sum())} fake")
    scores = score_records(det, recs, transform=tf, batch_size=batch_size, issues=issues)
    det.threshold = choose_threshold(scores, y, rule=rule)
    return {"rule": rule, "split": f"calibration folder {Path(folder).resolve()}", "fraction": None,
            "n_real": int((~y).sum()), "n_fake": int(y.sum()),
            "metrics": detection_metrics(scores, y, det.threshold)}


def _set_threshold(det: Any, specialists: Sequence[Specialist], threshold: str | float,
                   calibrate: str | None, split: str, rule: str, batch_size: int) -> dict[str, Any]:
    thresholds = [float(s.meta["threshold"]) for s in specialists]
    if calibrate is not None:
        det.calibration = _calibrate(det, calibrate, split=split, rule=rule,
                                     transform=specialists[0].transform, batch_size=batch_size)
        return {"mode": "calibrated", "value": det.threshold,
                "description": f"recalibrated ({rule}) on {det.calibration['n_real']} real + "
                               f"{det.calibration['n_fake']} fake images of {calibrate}"}
    if threshold == "mean":
        det.threshold = sum(thresholds) / len(thresholds)
        return {"mode": "mean", "value": det.threshold, "specialists": thresholds,
                "description": "mean of the specialists' calibrated thresholds (not recalibrated)"}
    value = float(threshold)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold must be 'mean' or a number in [0, 1], got {threshold!r}")
    det.threshold = value
    return {"mode": "fixed", "value": value, "description": f"fixed at {value:g} (not calibrated)"}


def _merged_training(specialists: Sequence[Specialist]) -> dict[str, Any]:
    sources = []
    for s in specialists:
        for src in (s.meta.get("training") or {}).get("sources", []):
            sources.append({**src, "specialist": s.name})
    return {"transform": specialists[0].transform, "sources": sources,
            "merged_from": [s.name for s in specialists]}


def _specialists_from_record(merged: Path, record: Mapping[str, Any]) -> list[Specialist]:
    """Reload the sources a merged detector records; refuse any whose files changed since."""
    out = []
    for src in record.get("sources", []):
        folder = Path(src["path"])
        if not folder.exists():
            raise FileNotFoundError(f"{merged} was merged from {folder}, which no longer exists; merge "
                                    "all specialists again with --specialists")
        s = load_specialist(folder, name=src["name"])
        if s.meta.get("tensors_sha256") != src.get("tensors_sha256"):
            raise ValueError(f"specialist {folder} changed since {merged} was merged (tensor checksum "
                             f"{str(s.meta.get('tensors_sha256'))[:12]} vs recorded "
                             f"{str(src.get('tensors_sha256'))[:12]}); merge all specialists again")
        out.append(s)
    return out


def merge_detector_folders(
    specialists: Sequence[str | os.PathLike] = (),
    *,
    out: str | os.PathLike,
    method: str | None = None,
    options: Mapping[str, Any] | None = None,
    add_from: str | os.PathLike | None = None,
    threshold: str | float = "mean",
    calibrate: str | None = None,
    calibrate_split: str = "val",
    threshold_rule: str = "balanced-accuracy",
    batch_size: int = 64,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Merge detector folders into the detector folder ``out``; returns a summary.

    Args:
        specialists: detector folders (with ``add_from``: the specialists to add).
        out: the merged detector folder.
        method: ``average``, ``task_arithmetic``, ``ties``, ``dare`` or ``r2m`` (``-`` accepted
            for ``_``); with ``add_from`` the recorded method when ``None``.
        options: the method's options; with ``add_from`` they update the recorded ones.
        add_from: a merged detector folder: re-merge its sources plus ``specialists``, reusing
            its Gram cache (R2M) so that only the new rows are computed.
        threshold, calibrate, threshold_rule: see the module doc; ``calibrate_split`` is the split
            folder read in CDDB / GenImage layouts (as ``detect eval --split``).
        batch_size: images per pass when calibrating.
        overwrite: replace an existing detector in ``out``.
    """
    from lorax_cil.detection.model import save_detector
    from lorax_cil.merging.gram import GramCache
    from lorax_cil.merging.result import merge_method_names
    from lorax_cil.training.model_card import write_model_card

    say = progress or (lambda msg: logger.info("%s", msg))
    out = Path(out)
    folders = [Path(f) for f in specialists]
    if not folders:
        raise ValueError("no specialists given" + (" to add" if add_from else ""))
    if (out / "meta.json").exists() and not overwrite:
        raise ValueError(f"{out} already holds a model; choose another --out (or --overwrite)")
    old: list[Specialist] = []
    opts = dict(options or {})
    gram = None
    if add_from is not None:
        add_from = Path(add_from)
        if out.resolve() == add_from.resolve():
            raise ValueError("--out must differ from --from (the merged detector being extended)")
        record = read_folder_meta(add_from, "merged detector").get("merge")
        if not record:
            raise ValueError(f"{add_from} is a detector but not a merged one (no merge record)")
        method = method or record["method"]
        if method == record["method"]:
            opts = {**record["options"], **opts}
        old = _specialists_from_record(add_from, record)
        if method == "r2m" and (add_from / GRAM_FOLDER / "meta.json").is_file():
            gram = GramCache.load(add_from / GRAM_FOLDER)
    if method is None:
        raise ValueError("no merge method given")
    method = method.replace("-", "_")
    if method not in merge_method_names():
        raise ValueError(f"unknown merge method {method!r}; valid: {merge_method_names()}")
    taken = {s.name for s in old}
    names = _unique_names(folders)
    names = [n if n not in taken else f"{n}#{len(taken) + i + 1}" for i, n in enumerate(names)]
    new = [load_specialist(f, name=n) for f, n in zip(folders, names)]
    every = old + new
    check_specialists(every)
    computed_rows = None
    if gram is not None:
        if sorted(gram.sources) != sorted(s.name for s in old):
            raise ValueError(f"{add_from}/{GRAM_FOLDER} caches {gram.sources}, but the merge record lists "
                             f"{[s.name for s in old]}")
        for s in new:
            gram = gram.extend(s.task_vector, [o.task_vector for o in old] + new[: new.index(s)])
        computed_rows = len(new)
    say(f"merging {len(every)} specialists with {method}" + (f" (Gram cache of {add_from} reused, "
                                                             f"{computed_rows} new row(s))" if gram else ""))
    result = merge_specialists(every, method, opts, gram=gram)
    det = build_merged_detector(every, result)
    thr = _set_threshold(det, every, threshold, calibrate, calibrate_split, threshold_rule, batch_size)
    merge_record = {
        "method": result.method, "options": _jsonable(result.options), "info": _jsonable(result.info),
        "sources": [s.record() for s in every], "threshold": thr,
        "buffers": "mean of the specialists' BatchNorm running statistics" if every[0].buffers else None,
        "gram": GRAM_FOLDER if result.gram is not None else None,
        "added_to": str(add_from.resolve()) if add_from is not None else None,
        "gram_rows_computed": computed_rows,
    }
    manifests = {s.name: (s.meta.get("data_manifest") or {}).get("listing_sha256") for s in every}
    save_detector(det, out, training=_merged_training(every), data_manifest={"specialists": manifests},
                  merge=merge_record)
    if result.gram is not None:
        result.gram.save(out / GRAM_FOLDER)
    write_model_card(out)
    say(f"threshold {det.threshold:.4f} ({thr['description']}); merged detector saved to {out}")
    return {"out": str(out), "method": result.method, "options": merge_record["options"],
            "sources": [s.name for s in every], "threshold": det.threshold, "info": merge_record["info"],
            "replaced_tensors": len(det.backbone_overrides)}
