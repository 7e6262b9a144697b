"""``MODEL_CARD.md`` of a binary detector folder (see :mod:`lorax_cil.training.model_card`, whose
:func:`~lorax_cil.training.model_card.write_model_card` renders it for a detector folder).

Sections: Model (backbone, weights tag and fingerprint, adapter, parameters, checksums), Merge
(merged detectors), Data (sources and their manifest), Protocol (training, pre-processing,
threshold rule), Metrics (calibration split) and Known limits.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from lorax_cil.training.model_card import (
    card_header,
    common_limits,
    counts_table,
    format_value,
    is_synthetic,
    markdown_table,
)

__all__ = ["DETECTOR_METRIC_DEFINITIONS", "detector_model_card"]

DETECTOR_METRIC_DEFINITIONS = """\
Definitions (full formulas: `docs/metrics.md` of the lorax-cil documentation, "Detection
scores"): **AP** is the average precision of `P(fake)` (positive class = fake), **AUC** the ROC
AUC; **acc@thr** / **real_acc@thr** / **fake_acc@thr** are the accuracies when `P(fake) >=
threshold` means fake; `@0.5` uses 0.5 instead. Undefined values are NaN.
"""


def _detector_model_section(meta: Mapping) -> str:
    bb, ad = meta.get("backbone", {}), meta.get("adapter", {})
    recipe, params = bb.get("recipe", {}), meta.get("parameters", {})
    mole = ad.get("mole", {})
    adapter = (f"`{ad.get('kind')}`: blocks {mole.get('blocks') or 'all'}, targets "
               f"`{mole.get('targets')}`" + (f", shared rank {mole.get('shared_rank')}, expert "
                                              f"ranks {mole.get('expert_ranks')}"
                                              if ad.get("kind") == "mole" else
                                              f", rank {ad.get('lora_rank')}"
                                              if ad.get("kind") == "lora" else ""))
    frac = params.get("fraction_with_head")
    rows = [
        ("backbone", f"`{bb.get('name')}` ({bb.get('family')}, frozen)"),
        ("weights tag", f"`{bb.get('weights')}` (recipe: pretrained={recipe.get('pretrained')}, "
                        f"weights={recipe.get('weights')}, seed={recipe.get('seed')})"),
        ("backbone fingerprint", f"`{bb.get('fingerprint_sha256')}` (checked at load)"),
        ("adapter", adapter),
        ("head", "one logit; `sigmoid(logit) = P(fake)`"),
        ("parameters", f"{params.get('trainable', '?')} trainable of {params.get('total', '?')}"
                       + (f" ({100 * frac:.4f} % incl. head)" if frac is not None else "")),
        ("tensors", f"`tensors.safetensors` SHA-256 `{meta.get('tensors_sha256')}` (format "
                    f"version {meta.get('format_version')}, detector version "
                    f"{meta.get('detector_version')})"),
    ]
    return "## Model\n\n" + markdown_table(rows, ("", "")) + "\n"


def _detector_protocol_section(meta: Mapping) -> str:
    training = meta.get("training") or {}
    cfg = training.get("config") or {}
    d, t = cfg.get("data", {}), cfg.get("train", {})
    cal = meta.get("calibration") or {}
    tf = training.get("transform") or {}
    rows = [
        ("sources", ", ".join(f"`{s.get('name')}`" for s in training.get("sources", []))),
        ("epochs / steps", f"{t.get('epochs')} / {training.get('steps')}"),
        ("batch size, learning rate", f"{t.get('batch_size')}, {t.get('lr')} (AdamW, weight "
                                      f"decay {t.get('weight_decay')})"),
        ("seed", t.get("seed")),
        ("pre-processing", f"crop {tf.get('size')}, resize {tf.get('resize')}; train-time blur "
                           f"p={tf.get('blur_prob')}, JPEG p={tf.get('jpeg_prob')}, flips "
                           f"{tf.get('hflip')}"),
        ("threshold", f"{format_value(meta.get('threshold'))}, rule `{cal.get('rule')}` on "
                      f"{cal.get('n_real')} real + {cal.get('n_fake')} fake calibration images "
                      f"({cal.get('split')}, fraction {d.get('calib_fraction')})"),
    ]
    return "## Protocol\n\n" + markdown_table(rows, ("", "")) + "\n"


def _merge_section(merge: Mapping) -> str:
    rows = [("method", f"`{merge.get('method')}`"),
            ("options", ", ".join(f"{k}={v}" for k, v in (merge.get("options") or {}).items()) or "none"),
            ("threshold", (merge.get("threshold") or {}).get("description"))]
    rows += [(f"source `{s.get('name')}`", f"{s.get('adapter')} detector `{s.get('path')}`, tensors "
              f"SHA-256 `{s.get('tensors_sha256')}`, threshold {format_value(s.get('threshold'))}")
             for s in merge.get("sources", [])]
    return ("## Merge\n\nMade by `lorax-cil merge` from specialists trained from the same backbone "
            "weights; the merged backbone weights are folded in, the head is the mean of the "
            "specialists' heads.\n\n" + markdown_table(rows, ("", "")) + "\n")


def detector_model_card(folder: str | os.PathLike) -> str:
    """The Markdown card of a binary detector folder (see the module doc)."""
    from lorax_cil.detection.model import read_detector_meta

    folder = Path(folder)
    meta = read_detector_meta(folder)
    manifest = meta.get("data_manifest") or {}
    counts, paths = manifest.get("counts", {}), manifest.get("task_paths", {})
    data = ("## Data\n\nSource generators and their data manifest: listing SHA-256 "
            f"`{manifest.get('listing_sha256')}`. Images per source (training and the "
            "calibration split carved from the training images):\n\n"
            + counts_table(counts, paths) + "\n")
    metrics = (meta.get("calibration") or {}).get("metrics") or {}
    keys = [k for k in ("ap", "auc", "acc@thr", "real_acc@thr", "fake_acc@thr", "acc@0.5")
            if k in metrics]
    metric_text = ("## Metrics\n\nOn the calibration split (held-out **source** training "
                   "images, the data the threshold was chosen on):\n\n"
                   + markdown_table([(k, format_value(metrics[k])) for k in keys], ("metric", "value")) + "\n"
                   + DETECTOR_METRIC_DEFINITIONS + "\n")
    recipe = meta.get("backbone", {}).get("recipe", {})
    mins = [c.get(k, 0) for c in counts.get("train", {}).values() for k in ("real", "fake")]
    random_bb = not recipe.get("pretrained") and not recipe.get("weights")
    limits = common_limits(synthetic=is_synthetic(paths, manifest.get("scenario") or ""),
                            random_backbone=random_bb,
                            min_count=min(mins) if mins else None)
    limits += [
        "The metrics above are **in-distribution** (source generators, calibration split). "
        "Performance on **unseen generators** must be measured with `lorax-cil detect eval`.",
        "The calibrated threshold may not transfer to other generators, image sizes or "
        "post-processing; AP/AUC do not depend on it.",
        "A binary detector does not attribute: `prediction` is only `fake` or `real`.",
    ]
    merge = meta.get("merge")
    if merge:
        limits.append("A merged detector was not trained: its weights combine the specialists' "
                      "(method and sources above); measure it with `lorax-cil detect eval`.")
    return (card_header(folder.resolve().name, folder) + _detector_model_section(meta)
            + (_merge_section(merge) if merge else "") + data
            + _detector_protocol_section(meta) + metric_text
            + "## Known limits\n\n" + "".join(f"- {x}\n" for x in limits))
