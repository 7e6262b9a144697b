"""Cross-generator detection protocol: per-generator metrics, calibration, robustness sweeps.

Layouts of an evaluation root (one folder per generator; listings sorted):

- ``univfd`` (UnivFD / CNNDetection test sets): ``<root>/<gen>/[<sub>/]{0_real,1_fake}/``;
- ``genimage``: ``<root>/<gen>/<split>/{nature,ai}/`` (split ``val`` by default);
- ``cddb``: ``<root>/<task>/<split>/[<sub>/]{0_real,1_fake}/`` (split ``val`` by default);
- ``auto``: decided per generator folder from what it holds.

Every image is scored (no subsampling unless ``max_per_class`` is given, which is recorded).
Per generator: AP, ROC AUC, accuracy at 0.5 and at the detector's calibrated threshold, real and
fake accuracy at both, N real and N fake; then the mean over generators and the mean over
generator groups (mean of the group means). Accuracy is over all images of a generator.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from lorax_cil.benchmarks.folders import (
    CDDB_CLASS_DIRS,
    GENIMAGE_CLASS_DIRS,
    DataLayoutError,
    ImageRecord,
    list_subdirs,
    scan_class_folders,
    scan_genimage,
    scan_task_split,
)
from lorax_cil.evaluation.metrics import accuracy, average_precision, roc_auc

__all__ = [
    "LAYOUTS",
    "UNIVFD_GROUPS",
    "BLUR_SIGMAS",
    "JPEG_QUALITIES",
    "GeneratorSet",
    "detection_metrics",
    "choose_threshold",
    "discover_generators",
    "score_records",
    "evaluate_detector",
    "summary_rows",
    "readable_records",
]

logger = logging.getLogger(__name__)

LAYOUTS = ("auto", "univfd", "genimage", "cddb")
BLUR_SIGMAS = (1.0, 2.0, 3.0, 4.0)
JPEG_QUALITIES = (90, 80, 70, 60, 50, 40, 30)
NAN = float("nan")

#: Generator groups of the UnivFD benchmark table (folder name -> group).
UNIVFD_GROUPS: dict[str, str] = {
    **{g: "GAN" for g in ("progan", "cyclegan", "biggan", "stylegan", "gaugan", "stargan")},
    "deepfake": "Deepfake",
    "seeingdark": "Low-level vision", "san": "Low-level vision",
    "crn": "Perceptual loss", "imle": "Perceptual loss",
    "guided": "Guided",
    **{g: "LDM" for g in ("ldm_200", "ldm_200_cfg", "ldm_100")},
    **{g: "Glide" for g in ("glide_100_27", "glide_50_27", "glide_100_10")},
    "dalle": "DALL-E",
}


# --------------------------------------------------------------------------- pure metrics
def detection_metrics(scores: Any, is_fake: Any, threshold: float = 0.5) -> dict[str, float]:
    """Binary detection metrics of ``P(fake)`` scores; a score ``>= t`` means "fake".

    Returns ``ap``, ``auc``, ``acc@0.5``, ``real_acc@0.5``, ``fake_acc@0.5``, ``acc@thr``,
    ``real_acc@thr``, ``fake_acc@thr``, ``threshold``, ``n_real``, ``n_fake``. Undefined values
    (AP with one class, accuracy of an empty class) are NaN.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(is_fake).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and is_fake ({y.size}) differ in length")
    out: dict[str, float] = {"ap": average_precision(s, y), "auc": roc_auc(s, y)}
    for tag, t in (("0.5", 0.5), ("thr", float(threshold))):
        pred = s >= t
        out[f"acc@{tag}"] = accuracy(pred == y)
        out[f"real_acc@{tag}"] = accuracy(~pred[~y])
        out[f"fake_acc@{tag}"] = accuracy(pred[y])
    out.update(threshold=float(threshold), n_real=int((~y).sum()), n_fake=int(y.sum()))
    return out


def choose_threshold(scores: Any, is_fake: Any, *, rule: str = "balanced-accuracy") -> float:
    """The threshold on ``P(fake)`` that maximises ``rule`` on (calibration) scores.

    Candidates are the midpoints between consecutive distinct scores plus both extremes; ties go
    to the candidate closest to 0.5. ``rule`` is ``balanced-accuracy`` (mean of real and fake
    accuracy) or ``accuracy``. Never call this on evaluation data.
    """
    if rule not in ("balanced-accuracy", "accuracy"):
        raise ValueError(f"threshold rule must be 'balanced-accuracy' or 'accuracy', got {rule!r}")
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(is_fake).astype(bool).ravel()
    if s.size == 0 or y.all() or not y.any():
        raise ValueError("choose_threshold needs calibration scores of both real and fake images")
    u = np.unique(s)
    cand = np.r_[u[0], (u[:-1] + u[1:]) / 2.0, np.nextafter(u[-1], np.inf)]
    real, fake = np.sort(s[~y]), np.sort(s[y])
    real_acc = np.searchsorted(real, cand, side="left") / real.size  # real scores < t
    fake_acc = 1.0 - np.searchsorted(fake, cand, side="left") / fake.size  # fake scores >= t
    if rule == "balanced-accuracy":
        value = (real_acc + fake_acc) / 2.0
    else:
        value = (real_acc * real.size + fake_acc * fake.size) / s.size
    best = np.flatnonzero(value >= value.max() - 1e-12)
    return float(cand[best[np.argmin(np.abs(cand[best] - 0.5))]])


# --------------------------------------------------------------------------- data discovery
@dataclass(frozen=True)
class GeneratorSet:
    """The evaluation images of one generator folder."""

    name: str
    group: str
    layout: str
    path: str
    records: tuple[ImageRecord, ...] = field(repr=False)

    @property
    def n_real(self) -> int:
        return sum(1 for r in self.records if not r.is_fake)

    @property
    def n_fake(self) -> int:
        return sum(1 for r in self.records if r.is_fake)


def _holds_pairs(folder: Path, class_dirs: Sequence[str]) -> bool:
    subs = list_subdirs(folder)
    if all(c in subs for c in class_dirs):
        return True
    return bool(subs) and all(all(c in list_subdirs(folder / s) for c in class_dirs) for s in subs)


def _detect_layout(folder: Path, split: str) -> str:
    sdir = folder / split  # checked first: a CDDB task's split folders look like subclasses
    if sdir.is_dir():
        return "genimage" if _holds_pairs(sdir, GENIMAGE_CLASS_DIRS) else "cddb"
    if _holds_pairs(folder, CDDB_CLASS_DIRS):
        return "univfd"
    raise DataLayoutError(
        f"{folder}: not a generator folder: expected {list(CDDB_CLASS_DIRS)} (UnivFD/CNNDetection), "
        f"'{split}/{{nature,ai}}' (GenImage) or '{split}/[<sub>/]{{0_real,1_fake}}' (CDDB); "
        f"found {list_subdirs(folder)[:8]}"
    )


def _scan(folder: Path, layout: str, split: str) -> list[ImageRecord]:
    if layout == "univfd":
        return scan_class_folders(folder)
    if layout == "genimage":
        return scan_genimage(folder, split)
    return scan_task_split(folder, split)


def discover_generators(
    root: str | os.PathLike,
    *,
    layout: str = "auto",
    split: str = "val",
    generators: Sequence[str] | None = None,
    groups: Mapping[str, str] | None = None,
) -> list[GeneratorSet]:
    """Every generator folder under ``root`` (sorted), scanned completely.

    ``root`` may also be a single generator folder (it then holds ``0_real`` / ``1_fake``).
    Groups come from ``groups``, then :data:`UNIVFD_GROUPS`, else the generator's own name.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataLayoutError(f"evaluation folder does not exist: {root}")
    if layout in ("auto", "univfd") and CDDB_CLASS_DIRS[0] in list_subdirs(root):
        folders = {root.name: root}
    else:
        folders = {n: root / n for n in list_subdirs(root)}
    if generators:
        unknown = sorted(set(generators) - set(folders))
        if unknown:
            raise ValueError(f"unknown generator(s) {unknown} in {root}; available: {sorted(folders)}")
        folders = {n: folders[n] for n in generators}
    if not folders:
        raise DataLayoutError(f"no generator folders in {root}")
    table = {**UNIVFD_GROUPS, **dict(groups or {})}
    out = []
    for name, folder in folders.items():
        kind = _detect_layout(folder, split) if layout == "auto" else layout
        recs = _scan(folder, kind, split)
        out.append(GeneratorSet(name, table.get(name, name), kind, str(folder), tuple(recs)))
    return out


# --------------------------------------------------------------------------- scoring
def _subsample(records: Sequence[ImageRecord], max_per_class: int | None, seed: int) -> list[ImageRecord]:
    if max_per_class is None:
        return list(records)
    out: list[ImageRecord] = []
    for fake in (0, 1):
        idx = [i for i, r in enumerate(records) if r.is_fake == fake]
        keep = np.random.default_rng([seed, fake]).permutation(len(idx))[:max_per_class]
        out.extend(records[idx[j]] for j in sorted(keep))
    return out


def score_records(
    detector: Any,
    records: Sequence[ImageRecord],
    *,
    transform: Callable,
    batch_size: int = 64,
    device: Any = "cpu",
    num_workers: int = 0,
    issues: Any = None,
) -> np.ndarray:
    """``P(fake)`` of every record, in order (unreadable files were dropped by the caller)."""
    import torch
    from torch.utils.data import DataLoader

    from lorax_cil.benchmarks.datasets import ImageSampleDataset, Sample

    samples = [Sample(r.path, int(r.is_fake), 0, int(r.is_fake), "", r.subclass) for r in records]
    ds = ImageSampleDataset(samples, transform=transform, issues=issues)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    detector.eval()
    out = []
    with torch.no_grad():
        for x, _ in loader:
            out.append(torch.sigmoid(detector(x.to(device)).float()).cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def _eval_transform(detector: Any, crop: int | None, resize: int | None, extra: list | None = None):
    from lorax_cil.benchmarks.transforms import TransformConfig, build_transform

    s = detector.backbone.spec
    cfg = TransformConfig.for_backbone(s, crop=crop, resize=resize)
    return build_transform(cfg, train=False, extra=extra)


def _degrader(kind: str, level: float) -> list:
    from functools import partial

    from lorax_cil.benchmarks.transforms import degrade

    if kind == "clean":
        return []
    if kind == "blur":
        return [partial(degrade, blur_sigma=float(level))]
    return [partial(degrade, jpeg_quality=int(level))]


# --------------------------------------------------------------------------- tables
def summary_rows(per_generator: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``mean (generators)`` and ``mean (groups)`` rows of per-generator metric rows.

    Metric columns are averaged ignoring NaN; ``n_real`` / ``n_fake`` are summed.
    """
    if not per_generator:
        return []
    metrics = [k for k, v in per_generator[0].items()
               if isinstance(v, float) and k not in ("threshold",)]
    def mean_of(rows):
        vals = {m: np.array([r[m] for r in rows], dtype=float) for m in metrics}
        return {m: float(np.nanmean(v)) if np.isfinite(v).any() else NAN for m, v in vals.items()}
    by_group: dict[str, list] = {}
    for r in per_generator:
        by_group.setdefault(r["group"], []).append(r)
    group_means = [mean_of(rows) for _, rows in sorted(by_group.items())]
    totals = {"n_real": sum(r["n_real"] for r in per_generator),
              "n_fake": sum(r["n_fake"] for r in per_generator)}
    return [
        {"generator": "mean (generators)", "group": f"{len(per_generator)} generators",
         **mean_of(per_generator), **totals},
        {"generator": "mean (groups)", "group": f"{len(by_group)} groups", **mean_of(group_means), **totals},
    ]


_COLUMNS = ["generator", "group", "n_real", "n_fake", "ap", "auc", "acc@0.5", "real_acc@0.5",
            "fake_acc@0.5", "acc@thr", "real_acc@thr", "fake_acc@thr"]


def _write_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], path: Path, title: str) -> None:
    import pandas as pd

    from lorax_cil.evaluation.reports import to_markdown
    from lorax_cil.utils import atomic_write_text

    df = pd.DataFrame([{c: r.get(c) for c in columns} for r in rows], columns=list(columns))
    atomic_write_text(path.with_suffix(".csv"), df.to_csv(index=False, float_format="%.6f"))
    atomic_write_text(path.with_suffix(".md"), f"{title}\n\n" + to_markdown(df, ".4f", index=False))


def _plot_curves(rows: Sequence[Mapping[str, Any]], kind: str, path: Path, caption: str) -> Path:
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    plt_cmap = colormaps["turbo"]
    fig = Figure(figsize=(10.5, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    clean = [r for r in rows if r["condition"] == "clean"]
    sweep = [r for r in rows if r["condition"] == kind]
    levels = sorted({r["level"] for r in sweep}, reverse=(kind == "jpeg"))
    x_clean = 0.0 if kind == "blur" else 100.0
    gens = sorted({r["generator"] for r in sweep if not r["generator"].startswith("mean")})
    colours = [plt_cmap(i / max(1, len(gens) - 1)) for i in range(len(gens))] + ["black"]
    for ax, metric in zip(fig.subplots(1, 2), ("ap", "acc@thr")):
        for g, colour in zip(gens + ["mean (generators)"], colours):
            pick = {r["level"]: r[metric] for r in sweep if r["generator"] == g}
            c0 = [r[metric] for r in clean if r["generator"] == g]
            xs, ys = [x_clean] + levels, c0 + [pick.get(v, NAN) for v in levels]
            is_mean = g.startswith("mean")
            ax.plot(xs, ys, marker="o", lw=2.5 if is_mean else 1.0, alpha=1.0 if is_mean else 0.6,
                    color=colour, label=g)
        ax.set_xlabel("Gaussian blur sigma (0 = clean)" if kind == "blur" else "JPEG quality (100 = clean)")
        ax.set_ylabel({"ap": "AP", "acc@thr": "accuracy at calibrated threshold"}[metric])
        ax.set_ylim(-0.02, 1.02)
        if kind == "jpeg":
            ax.invert_xaxis()
        ax.grid(alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="outside right center")
    fig.suptitle(caption, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


# --------------------------------------------------------------------------- the protocol
def readable_records(records: Sequence[ImageRecord], issues: Any) -> list[ImageRecord]:
    """The records whose image files can be decoded; the others are recorded in ``issues``."""
    from lorax_cil.benchmarks.images import ImageLoadError, probe_image

    kept = []
    for r in records:
        try:
            probe_image(r.path)
        except ImageLoadError as exc:
            issues.add_unreadable(r.path, str(exc.__cause__ or exc))
            continue
        kept.append(r)
    return kept


def _conditions(robustness: bool, blur: Sequence[float], jpeg: Sequence[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = [("clean", 0.0)]
    if robustness:
        out += [("blur", float(s)) for s in blur] + [("jpeg", float(q)) for q in jpeg]
    return out


def evaluate_detector(
    detector: Any,
    root: str | os.PathLike,
    *,
    layout: str = "auto",
    split: str = "val",
    generators: Sequence[str] | None = None,
    groups: Mapping[str, str] | None = None,
    batch_size: int = 64,
    device: Any = "cpu",
    num_workers: int = 0,
    crop: int | None = None,
    resize: int | None = None,
    max_per_class: int | None = None,
    seed: int = 0,
    robustness: bool = False,
    blur_sigmas: Sequence[float] = BLUR_SIGMAS,
    jpeg_qualities: Sequence[int] = JPEG_QUALITIES,
    out: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``detector`` on every generator folder under ``root``.

    Args:
        detector: a :class:`~lorax_cil.detection.model.Detector` (its ``threshold`` is used).
        root: evaluation root (see the module doc for layouts).
        layout: ``auto``, ``univfd``, ``genimage`` or ``cddb``.
        split: split folder for the GenImage and CDDB layouts.
        generators: restrict to these generator folders.
        groups: generator -> group (default: UnivFD groups, else the generator itself).
        crop, resize: evaluation crop size (default: the backbone's input size) and optional
            shorter-side resize before the centre crop.
        max_per_class: explicit subsampling (recorded in the results); ``None`` = every image.
        robustness: also evaluate under Gaussian blur ``blur_sigmas`` and JPEG ``jpeg_qualities``.
        out: folder for results.json, per_generator.{csv,md}, scores.csv and, with
            ``robustness``, robustness.csv (every generator and condition),
            robustness_summary.{csv,md} (means) and robustness_{blur,jpeg}.png (curves).

    Returns:
        ``per_generator`` rows, ``mean_generators``, ``mean_groups``, ``robustness`` rows (or
        ``None``), the threshold, counts of unreadable files and the evaluation settings.
    """
    from lorax_cil.benchmarks.images import DataIssues

    say = progress or (lambda msg: logger.info("%s", msg))
    sets = discover_generators(root, layout=layout, split=split, generators=generators, groups=groups)
    issues = DataIssues()
    conds = _conditions(robustness, blur_sigmas, jpeg_qualities)
    rows: list[dict[str, Any]] = []
    scores_out: list[tuple[str, str, int, float]] = []
    for gen in sets:
        recs = readable_records(_subsample(gen.records, max_per_class, seed), issues)
        y = np.array([r.is_fake for r in recs], dtype=bool)
        say(f"{gen.name}: {int((~y).sum())} real + {int(y.sum())} fake images, {len(conds)} condition(s)")
        for cond, level in conds:
            tf = _eval_transform(detector, crop, resize, _degrader(cond, level))
            s = score_records(detector, recs, transform=tf, batch_size=batch_size, device=device,
                              num_workers=num_workers, issues=issues)
            m = detection_metrics(s, y, detector.threshold)
            rows.append({"condition": cond, "level": level, "generator": gen.name, "group": gen.group, **m})
            if cond == "clean":
                scores_out += [(r.path, gen.name, int(r.is_fake), float(v)) for r, v in zip(recs, s)]
    per_gen = [{k: v for k, v in r.items() if k not in ("condition", "level")}
               for r in rows if r["condition"] == "clean"]
    means = summary_rows(per_gen)
    robust = None
    if robustness:
        robust = []
        for cond, level in conds:
            these = [r for r in rows if r["condition"] == cond and r["level"] == level]
            robust += these + [{"condition": cond, "level": level, **m}
                               for m in summary_rows([{k: v for k, v in r.items()
                                                       if k not in ("condition", "level")} for r in these])]
    result = {
        "root": str(Path(root).resolve()), "layout": layout, "split": split,
        "threshold": float(detector.threshold),
        "subsampled": {"max_per_class": max_per_class, "seed": seed} if max_per_class else None,
        "generators": {g.name: {"group": g.group, "layout": g.layout, "path": g.path} for g in sets},
        "per_generator": per_gen, "mean_generators": means[0], "mean_groups": means[1],
        "robustness": robust, "data_issues": issues.summary(),
    }
    if out is not None:
        _write_outputs(Path(out), result, scores_out)
    return result


def _write_outputs(out: Path, result: Mapping[str, Any], scores: Sequence[tuple]) -> None:
    import pandas as pd

    from lorax_cil.utils import atomic_write_text, write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", result)
    rows = list(result["per_generator"]) + [result["mean_generators"], result["mean_groups"]]
    thr = result["threshold"]
    _write_table(rows, _COLUMNS, out / "per_generator",
                 f"Per-generator detection metrics (calibrated threshold {thr:.4f}; every image "
                 f"{'' if result['subsampled'] is None else 'NOT '}evaluated)")
    df = pd.DataFrame(scores, columns=["path", "generator", "is_fake", "score"])
    atomic_write_text(out / "scores.csv", df.to_csv(index=False, float_format="%.6f"))
    robust = result["robustness"]
    if not robust:
        return
    cols = ["condition", "level", "generator", "group", "n_real", "n_fake", "ap", "auc", "acc@0.5",
            "acc@thr", "real_acc@thr", "fake_acc@thr"]
    pd.DataFrame([{c: r.get(c) for c in cols} for r in robust]).to_csv(
        out / "robustness.csv", index=False, float_format="%.6f")
    mean_rows = [r for r in robust if r["generator"].startswith("mean")]
    summary = [{"condition": r["condition"], "level": "-" if r["condition"] == "clean" else f"{r['level']:g}",
                "mean over": r["generator"][6:-1],
                "ap": r["ap"], "acc@0.5": r["acc@0.5"], "acc@thr": r["acc@thr"]} for r in mean_rows]
    _write_table(summary, ["condition", "level", "mean over", "ap", "acc@0.5", "acc@thr"],
                 out / "robustness_summary",
                 "Robustness: mean AP and accuracy over generators / groups per degradation")
    cap = f"{Path(result['root']).name}: per generator (thin) and mean over generators (black)"
    for kind in ("blur", "jpeg"):
        if any(r["condition"] == kind for r in robust):
            _plot_curves(robust, kind, out / f"robustness_{kind}.png", cap)
