"""``MODEL_CARD.md``: what a trained model is, what it was trained on, how it scored, its limits.

Written into every run directory by :meth:`lorax_cil.training.runner.Run.finish` and, for binary
detectors, by :func:`write_model_card` on a detector folder. Cards are built from the files the
model folder already holds (``config.yaml``, ``data_manifest.json``, ``summary.json``,
``steps.jsonl`` and the checkpoint's ``meta.json``), so a card can be rebuilt for any existing run
with ``write_model_card(run_dir)``.

Sections: Model (backbone and weights tag, extractor, parameters, checksums), Data (scenario,
data-manifest hash, per-task image counts), Protocol (evaluation split, memory budget, seed,
epochs, optimisation, pre-processing), Metrics (values and their definitions, see
``docs/metrics.md``), Known limits, and how to use the model.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

from lorax_cil import __version__
from lorax_cil.utils import atomic_write_text

__all__ = ["MODEL_CARD", "write_model_card", "run_model_card", "detector_model_card"]

MODEL_CARD = "MODEL_CARD.md"

METRIC_DEFINITIONS = """\
Definitions (full formulas: `docs/metrics.md` of the lorax-cil documentation, "Metrics"):

- **multi-real accuracy**: a real image is correct when predicted as any real class; a fake image
  only when predicted as its own generator's fake class.
- **binary accuracy**: correct when the predicted class is on the right side (real / fake).
- **strict accuracy**: correct when the predicted class is exactly the true one of the 2T classes.
- **AP**: average precision of the CDDB fakeness score `max_fake / (max_real + max_fake)`
  (positive class = fake).
- **AA**: mean accuracy over all tasks after the last task; **step-average**: mean over steps of
  the average accuracy over the tasks seen so far; **BWT**: mean of (final accuracy - accuracy
  right after training the task) over all but the last task; **forgetting**: mean drop from the
  best earlier accuracy. Undefined values are NaN.
"""

DETECTOR_METRIC_DEFINITIONS = """\
Definitions (full formulas: `docs/metrics.md` of the lorax-cil documentation, "Detection
scores"): **AP** is the average precision of `P(fake)` (positive class = fake), **AUC** the ROC
AUC; **acc@thr** / **real_acc@thr** / **fake_acc@thr** are the accuracies when `P(fake) >=
threshold` means fake; `@0.5` uses 0.5 instead. Undefined values are NaN.
"""


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "NaN"
    if isinstance(v, float):
        return f"{100 * v:.2f} %" if pct else f"{v:.4f}"
    return str(v)


def _table(rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _counts_table(counts: Mapping[str, Mapping[str, Mapping[str, int]]],
                  paths: Mapping[str, str]) -> str:
    order = {"train": 0, "calibration": 1, "test": 2}
    streams = sorted(counts, key=lambda s: (order.get(s, 3), s))
    tasks = list(dict.fromkeys(t for s in streams for t in counts[s]))
    header = ("task", *[f"{s} real / fake" for s in streams], "folder")
    rows = [(t, *[f"{counts[s].get(t, {}).get('real', 0)} / {counts[s].get(t, {}).get('fake', 0)}"
                  for s in streams], f"`{paths.get(t, '?')}`") for t in tasks]
    return _table(rows, header)


def _is_synthetic(paths: Mapping[str, str], scenario: str) -> bool:
    return scenario.startswith("synth") or any(
        (Path(p).parent / "synth.json").is_file() for p in paths.values())


def _common_limits(*, synthetic: bool, random_backbone: bool, min_count: int | None) -> list[str]:
    out = []
    if synthetic:
        out.append("Trained on the embedded **synthetic** dataset (procedural images with "
                   "artificial generator fingerprints): its numbers say nothing about real "
                   "generators. Use it for demos and tests only.")
    if random_backbone:
        out.append("The backbone has **randomly initialised** weights (no pretrained weights): "
                   "a test or demo configuration, not a usable detector.")
    if min_count is not None and min_count < 100:
        out.append(f"Very small training set (as few as {min_count} images in a class): "
                   "expect high variance.")
    return out


def _header(title: str, folder: Path) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (f"# Model card: {title}\n\nWritten by lorax-cil {__version__} on {when}. "
            f"Use it with `lorax-cil predict --model {folder} IMAGES...` or "
            f"`lorax_cil.load(\"{folder}\").predict(images)`.\n\n")


# --- runs -------------------------------------------------------------------------------------
def _run_model_section(cfg: Mapping, ck: Mapping, summary: Mapping, weights_tag: str | None) -> str:
    m, t = cfg.get("model", {}), cfg.get("train", {})
    params = summary.get("parameters") or {}
    tag = weights_tag or (m.get("weights") or ("pretrained" if m.get("pretrained") else "random"))
    lora = (f"LoRA r={m.get('lora_r')}, alpha={m.get('lora_alpha')}, targets "
            f"`{m.get('lora_targets')}`" if m.get("extractor") == "lora" else m.get("extractor"))
    rows = [
        ("strategy", f"`{t.get('strategy')}`"),
        ("backbone", f"`{m.get('backbone')}` (frozen)"),
        ("weights tag", f"`{tag}` (config: pretrained={m.get('pretrained')}, "
                        f"weights={m.get('weights')})"),
        ("per-task extractor", f"{lora}; adapted blocks: {m.get('adapt_blocks') or 'all'}"),
        ("classes", f"{2 * (summary.get('completed_tasks') or 0)}: `<task>/real`, "
                    "`<task>/fake` per trained task"),
        ("parameters", f"{params.get('trainable', '?')} trainable, "
                       f"{params.get('total_stored', '?')} stored"),
        ("checkpoint", f"`checkpoints/{ck['_folder']}` (safetensors + JSON, format version "
                       f"{ck.get('format_version')}), tensors SHA-256 `{ck.get('tensors_sha256')}`"
         if ck else "none written yet"),
    ]
    return "## Model\n\n" + _table(rows, ("", "")) + "\n"


def _run_protocol_section(cfg: Mapping, order: list[str]) -> str:
    d, t = cfg.get("data", {}), cfg.get("train", {})
    rows = [
        ("task order", ", ".join(order)),
        ("evaluation split", f"`{d.get('eval_split')}` of every task"),
        ("exemplar memory", f"{t.get('memory_size')} images in total, class-balanced"),
        ("seed", f"{t.get('seed')} (re-seeded per task from (seed, task index))"),
        ("epochs per task", t.get("epochs")),
        ("batch size", t.get("batch_size")),
        ("learning rate", f"{t.get('lr_first')} (task 0), {t.get('lr')} (later tasks), "
                          f"{t.get('warmup_epochs')} warm-up epochs, "
                          f"scaling {t.get('lr_scaling')}"),
        ("pre-processing", f"crop {d.get('crop') or 'backbone input size'}, resize "
                           f"{d.get('resize')}; train-time blur p={d.get('blur_prob')}, JPEG "
                           f"p={d.get('jpeg_prob')}, flips {d.get('hflip')}"),
        ("calibration fraction", d.get("calib_fraction")),
    ]
    return "## Protocol\n\n" + _table(rows, ("", "")) + "\n"


def _run_metrics_section(summary: Mapping, steps: list[Mapping]) -> str:
    rows = [(kind, *[_fmt(summary.get(f"{kind}_{k}"), pct=True)
                     for k in ("aa", "step_average_accuracy", "bwt", "forgetting")])
            for kind in ("multi_real", "binary", "strict")]
    out = ("## Metrics\n\nAfter the last completed task "
           f"({summary.get('completed_tasks')} of {len(summary.get('task_order', []))}), on the "
           f"`{summary.get('eval_split')}` split:\n\n"
           + _table(rows, ("accuracy", "AA", "step-average", "BWT", "forgetting")) + "\n")
    per_task = (steps[-1].get("per_task") if steps else None) or {}
    if per_task:
        rows = [(name, *[_fmt(r.get(k), pct=k != "ap") for k in ("multi_real", "binary",
                                                                  "strict", "ap")], r.get("n"))
                for name, r in per_task.items()]
        out += ("Per task after the last task:\n\n"
                + _table(rows, ("task", "multi-real", "binary", "strict", "AP", "images")) + "\n")
    return out + METRIC_DEFINITIONS + "\n"


def _run_data_section(manifest: Mapping) -> str:
    counts, paths = manifest.get("counts", {}), manifest.get("task_paths", {})
    issues = manifest.get("data_issues") or {}
    unreadable = issues.get("unreadable", 0)
    substituted = issues.get("substituted_files") or {}
    named = "".join(f"\n- skipped: `{p}`" for p in issues.get("unreadable_files", [])[:20])
    named += "".join(f"\n- failed to decode at load time, `{r}` used in its place: `{p}`"
                     for p, r in list(substituted.items())[:20])
    changes = manifest.get("data_changes") or []
    changed = "".join(f"\n- task `{c.get('task')}` changed after it was trained (listing "
                      f"SHA-256 `{c.get('trained_with_sha256')}` -> `{c.get('now_sha256')}`)"
                      for c in changes)
    return (f"## Data\n\nScenario `{manifest.get('scenario')}`; data manifest "
            f"(`data_manifest.json`) listing SHA-256 `{manifest.get('listing_sha256')}` (paths "
            "and byte sizes of every image used). Images per task and stream:\n\n"
            + _counts_table(counts, paths) + "\n"
            f"Data issues: {unreadable} unreadable file(s) skipped, {len(substituted)} file(s) "
            f"that failed to decode at load time replaced by another image of their class (left "
            f"out of the evaluation counts).{named}{changed}\n\n")


def _run_limits(cfg: Mapping, manifest: Mapping, weights_tag: str | None) -> list[str]:
    counts, paths = manifest.get("counts", {}), manifest.get("task_paths", {})
    m = cfg.get("model", {})
    random_bb = (weights_tag == "random") if weights_tag else (not m.get("pretrained")
                                                               and not m.get("weights"))
    mins = [c.get(k, 0) for c in counts.get("train", {}).values() for k in ("real", "fake")]
    limits = _common_limits(synthetic=_is_synthetic(paths, manifest.get("scenario") or ""),
                            random_backbone=random_bb, min_count=min(mins) if mins else None)
    return limits + [
        "Closed set: it attributes images only to the generators it was trained on. An image "
        "from an **unseen generator** is attributed to a known generator or called real; its "
        "fake score may still be informative, but that is not measured here (measure it with "
        "`lorax-cil eval --run RUN --scenario custom --tasks NAME=FOLDER`).",
        "The metrics come from the evaluation split of the **same sources** as training "
        "(in-distribution); robustness to resizing, blur and JPEG was not measured.",
        "`predict` decides real/fake at fake score 0.5 by default (the argmax class); this "
        "threshold was not calibrated.",
        "Exemplars are stored as file paths: continuing training needs the original data.",
    ]


def run_model_card(run_dir: str | os.PathLike, *, weights_tag: str | None = None) -> str:
    """The Markdown card of a run directory (see the module doc)."""
    import yaml

    from lorax_cil.training.checkpoint import CheckpointError, read_checkpoint_meta
    from lorax_cil.training.runner import latest_checkpoint

    run_dir = Path(run_dir)
    try:
        folder = latest_checkpoint(run_dir)
        ck = dict(read_checkpoint_meta(folder), _folder=folder.name)
    except CheckpointError:  # a run stopped before its first checkpoint
        ck = {}
    cfg = ck.get("config") or yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    summary = _read_json(run_dir / "summary.json") or {}
    manifest = _read_json(run_dir / "data_manifest.json") or {}
    steps_file = run_dir / "steps.jsonl"
    steps = ([json.loads(x) for x in steps_file.read_text().splitlines() if x.strip()]
             if steps_file.is_file() else list(ck.get("steps") or []))
    limits = _run_limits(cfg, manifest, weights_tag)
    return (_header(run_dir.resolve().name, run_dir)
            + _run_model_section(cfg, ck, summary, weights_tag) + _run_data_section(manifest)
            + _run_protocol_section(cfg, summary.get("task_order") or [])
            + _run_metrics_section(summary, steps)
            + "## Known limits\n\n" + "".join(f"- {x}\n" for x in limits))


# --- detectors --------------------------------------------------------------------------------
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
    return "## Model\n\n" + _table(rows, ("", "")) + "\n"


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
        ("threshold", f"{_fmt(meta.get('threshold'))}, rule `{cal.get('rule')}` on "
                      f"{cal.get('n_real')} real + {cal.get('n_fake')} fake calibration images "
                      f"({cal.get('split')}, fraction {d.get('calib_fraction')})"),
    ]
    return "## Protocol\n\n" + _table(rows, ("", "")) + "\n"


def _merge_section(merge: Mapping) -> str:
    rows = [("method", f"`{merge.get('method')}`"),
            ("options", ", ".join(f"{k}={v}" for k, v in (merge.get("options") or {}).items()) or "none"),
            ("threshold", (merge.get("threshold") or {}).get("description"))]
    rows += [(f"source `{s.get('name')}`", f"{s.get('adapter')} detector `{s.get('path')}`, tensors "
              f"SHA-256 `{s.get('tensors_sha256')}`, threshold {_fmt(s.get('threshold'))}")
             for s in merge.get("sources", [])]
    return ("## Merge\n\nMade by `lorax-cil merge` from specialists trained from the same backbone "
            "weights; the merged backbone weights are folded in, the head is the mean of the "
            "specialists' heads.\n\n" + _table(rows, ("", "")) + "\n")


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
            + _counts_table(counts, paths) + "\n")
    metrics = (meta.get("calibration") or {}).get("metrics") or {}
    keys = [k for k in ("ap", "auc", "acc@thr", "real_acc@thr", "fake_acc@thr", "acc@0.5")
            if k in metrics]
    metric_text = ("## Metrics\n\nOn the calibration split (held-out **source** training "
                   "images, the data the threshold was chosen on):\n\n"
                   + _table([(k, _fmt(metrics[k])) for k in keys], ("metric", "value")) + "\n"
                   + DETECTOR_METRIC_DEFINITIONS + "\n")
    recipe = meta.get("backbone", {}).get("recipe", {})
    mins = [c.get(k, 0) for c in counts.get("train", {}).values() for k in ("real", "fake")]
    random_bb = not recipe.get("pretrained") and not recipe.get("weights")
    limits = _common_limits(synthetic=_is_synthetic(paths, manifest.get("scenario") or ""),
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
    return (_header(folder.resolve().name, folder) + _detector_model_section(meta)
            + (_merge_section(merge) if merge else "") + data
            + _detector_protocol_section(meta) + metric_text
            + "## Known limits\n\n" + "".join(f"- {x}\n" for x in limits))


def write_model_card(folder: str | os.PathLike, *, weights_tag: str | None = None) -> Path:
    """Write ``MODEL_CARD.md`` into a run directory or a detector folder (atomically).

    Args:
        folder: a run directory (with ``summary.json`` or ``checkpoints/``) or a detector
            folder (``meta.json`` of kind ``lorax-cil/detector``).
        weights_tag: the backbone's resolved weights description (``BackboneSpec.weights``) when
            known; a run's files only record the configured ``pretrained`` / ``weights``.

    Returns:
        The card's path.
    """
    folder = Path(folder)
    if (folder / "meta.json").is_file():
        text = detector_model_card(folder)
    elif (folder / "checkpoints").is_dir() or (folder / "summary.json").is_file():
        text = run_model_card(folder, weights_tag=weights_tag)
    else:
        raise ValueError(f"{folder} is neither a run directory (with checkpoints/) nor a "
                         "detector folder (with meta.json)")
    return atomic_write_text(folder / MODEL_CARD, text)
