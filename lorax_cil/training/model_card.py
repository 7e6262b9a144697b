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
from typing import Any, Callable, Mapping

from lorax_cil import __version__
from lorax_cil.utils import atomic_write_text

__all__ = ["MODEL_CARD", "write_model_card", "run_model_card", "register_model_card", "format_value",
           "markdown_table", "counts_table", "is_synthetic", "common_limits", "card_header"]

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

#: Model folders with a ``meta.json`` whose card a package above training renders: ``kind`` ->
#: renderer or ``"module:function"`` (imported on first use, as the strategy registry loads its
#: built-in modules). The binary detectors' card is in :mod:`lorax_cil.detection.model_card`.
DETECTOR = "lorax-cil/detector"
_FOLDER_CARDS: dict[str, Any] = {DETECTOR: "lorax_cil.detection.model_card:detector_model_card"}


def register_model_card(kind: str, renderer: Callable[[Path], str]) -> None:
    """Render the card of model folders whose ``meta.json`` has ``"kind": kind`` with
    ``renderer(folder) -> markdown`` (used by :func:`write_model_card`)."""
    _FOLDER_CARDS[kind] = renderer


def _folder_card(kind: str | None) -> Callable[[Path], str]:
    renderer = _FOLDER_CARDS.get(kind, _FOLDER_CARDS[DETECTOR])
    if isinstance(renderer, str):
        import importlib

        module, _, name = renderer.partition(":")
        renderer = getattr(importlib.import_module(module), name)
    return renderer


def _meta_kind(path: Path) -> str | None:
    """The ``kind`` of a model folder's ``meta.json`` (``None`` when unreadable: the detector
    card then reports what is wrong with it)."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None
    return meta.get("kind") if isinstance(meta, dict) else None


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def format_value(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "NaN"
    if isinstance(v, float):
        return f"{100 * v:.2f} %" if pct else f"{v:.4f}"
    return str(v)


def markdown_table(rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def counts_table(counts: Mapping[str, Mapping[str, Mapping[str, int]]],
                  paths: Mapping[str, str]) -> str:
    order = {"train": 0, "calibration": 1, "test": 2}
    streams = sorted(counts, key=lambda s: (order.get(s, 3), s))
    tasks = list(dict.fromkeys(t for s in streams for t in counts[s]))
    header = ("task", *[f"{s} real / fake" for s in streams], "folder")
    rows = [(t, *[f"{counts[s].get(t, {}).get('real', 0)} / {counts[s].get(t, {}).get('fake', 0)}"
                  for s in streams], f"`{paths.get(t, '?')}`") for t in tasks]
    return markdown_table(rows, header)


def is_synthetic(paths: Mapping[str, str], scenario: str) -> bool:
    return scenario.startswith("synth") or any(
        (Path(p).parent / "synth.json").is_file() for p in paths.values())


def common_limits(*, synthetic: bool, random_backbone: bool, min_count: int | None) -> list[str]:
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


def card_header(title: str, folder: Path) -> str:
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
        *([("read-out", f"`{t.get('readout')}`"
                        + (" (class means; `predict --readout head` reads the trained linear "
                           "head)" if summary.get("head_readout") else ""))]
          if t.get("readout") else []),
        ("parameters", f"{params.get('trainable', '?')} trainable, "
                       f"{params.get('total_stored', '?')} stored"),
        ("checkpoint", f"`checkpoints/{ck['_folder']}` (safetensors + JSON, format version "
                       f"{ck.get('format_version')}), tensors SHA-256 `{ck.get('tensors_sha256')}`"
         if ck else "none written yet"),
    ]
    return "## Model\n\n" + markdown_table(rows, ("", "")) + "\n"


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
    return "## Protocol\n\n" + markdown_table(rows, ("", "")) + "\n"


def _run_metrics_section(summary: Mapping, steps: list[Mapping]) -> str:
    rows = [(kind, *[format_value(summary.get(f"{kind}_{k}"), pct=True)
                     for k in ("aa", "step_average_accuracy", "bwt", "forgetting")])
            for kind in ("multi_real", "binary", "strict")]
    head = summary.get("head_readout")
    if head:  # the linear head, read in the same passes
        rows.append(("multi_real, linear head", *[format_value(head.get(f"multi_real_{k}"),
                                                               pct=True)
                                                  for k in ("aa", "step_average_accuracy", "bwt",
                                                            "forgetting")]))
    out = ("## Metrics\n\nAfter the last completed task "
           f"({summary.get('completed_tasks')} of {len(summary.get('task_order', []))}), on the "
           f"`{summary.get('eval_split')}` split:\n\n"
           + markdown_table(rows, ("accuracy", "AA", "step-average", "BWT", "forgetting")) + "\n")
    per_task = (steps[-1].get("per_task") if steps else None) or {}
    if per_task:
        rows = [(name, *[format_value(r.get(k), pct=k != "ap") for k in ("multi_real", "binary",
                                                                  "strict", "ap")], r.get("n"))
                for name, r in per_task.items()]
        out += ("Per task after the last task:\n\n"
                + markdown_table(rows, ("task", "multi-real", "binary", "strict", "AP", "images")) + "\n")
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
            + counts_table(counts, paths) + "\n"
            f"Data issues: {unreadable} unreadable file(s) skipped, {len(substituted)} file(s) "
            f"that failed to decode at load time replaced by another image of their class (left "
            f"out of the evaluation counts).{named}{changed}\n\n")


def _run_limits(cfg: Mapping, manifest: Mapping, weights_tag: str | None) -> list[str]:
    counts, paths = manifest.get("counts", {}), manifest.get("task_paths", {})
    m = cfg.get("model", {})
    random_bb = (weights_tag == "random") if weights_tag else (not m.get("pretrained")
                                                               and not m.get("weights"))
    mins = [c.get(k, 0) for c in counts.get("train", {}).values() for k in ("real", "fake")]
    limits = common_limits(synthetic=is_synthetic(paths, manifest.get("scenario") or ""),
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

    from lorax_cil.training.checkpoint import (
        CheckpointError,
        latest_checkpoint,
        read_checkpoint_meta,
    )

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
    return (card_header(run_dir.resolve().name, run_dir)
            + _run_model_section(cfg, ck, summary, weights_tag) + _run_data_section(manifest)
            + _run_protocol_section(cfg, summary.get("task_order") or [])
            + _run_metrics_section(summary, steps)
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
        text = _folder_card(_meta_kind(folder / "meta.json"))(folder)
    elif (folder / "checkpoints").is_dir() or (folder / "summary.json").is_file():
        text = run_model_card(folder, weights_tag=weights_tag)
    else:
        raise ValueError(f"{folder} is neither a run directory (with checkpoints/) nor a "
                         "detector folder (with meta.json)")
    return atomic_write_text(folder / MODEL_CARD, text)
