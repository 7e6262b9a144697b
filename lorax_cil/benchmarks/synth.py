"""The synthetic embedded dataset: procedurally generated generator tasks in the CDDB layout.

It lets the demo and the tests run continual synthetic-image attribution offline. Every task
pairs a procedural *real domain* (:mod:`~lorax_cil.benchmarks.synth_domains`: fractal landscapes,
cells, faces, ...) with a *generator family* (:mod:`~lorax_cil.benchmarks.synth_families`) whose
fakes are fresh samples of that domain carrying an artifact fingerprint (checkerboards,
upsampling traces, spectral peaks, seams, JPEG blocks, ...). Tasks are named after their family.

:func:`synthesize` writes ``<out>/<task>/{train,val}/{0_real,1_fake}/<index:05d>.png`` and a
``synth.json`` describing the run; tasks whose domain has object categories (``tconv-checker``
and ``sr-ringing``, like CDDB's cyclegan) write ``<task>/<split>/<subclass>/{0_real,1_fake}``.
The scenarios mirror CDDB's task orders (see ``/docs/synthetic-data.md``):

* ``synth-long`` (12 tasks) follows CDDB long: gaugan, biggan, cyclegan, imle, deepfake, crn,
  wild, glow, stargan_gf, stylegan, whichfaceisreal, san;
* ``synth-easy`` is its first 7 tasks (CDDB easy);
* ``synth-hard`` is tasks 0, 1, 6, 10, 11 (CDDB hard: gaugan, biggan, wild, whichfaceisreal, san).

Output is bit-identical for the same arguments: every image is seeded from
``(seed, task, split, class, index)`` through :class:`numpy.random.SeedSequence`.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import numbers
import os
import shutil
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from lorax_cil.benchmarks.synth_domains import DOMAINS, finish
from lorax_cil.benchmarks.synth_families import FAMILIES, GeneratorFamily, family_names

__all__ = [
    "SYNTH_SCENARIOS",
    "FEWSHOT",
    "fewshot_memory_size",
    "FAMILIES",
    "GeneratorFamily",
    "SPLITS",
    "CLASS_DIRS",
    "synthesize",
    "family_names",
    "render_image",
    "task_subclasses",
]

logger = logging.getLogger(__name__)

_LONG = (
    "nn-upsample",        # gaugan
    "spectral-peaks",     # biggan
    "tconv-checker",      # cyclegan (subclass folders)
    "hf-suppress",        # imle
    "blend-seam",         # deepfake
    "bilinear-upsample",  # crn
    "jpeg-blocks",        # wild
    "noise-residual",     # glow
    "colour-shift",       # stargan_gf
    "aliasing",           # stylegan
    "chroma-subsample",   # whichfaceisreal
    "sr-ringing",         # san (subclass folders, so synth-hard has one subclass task too)
)

SYNTH_SCENARIOS: dict[str, tuple[str, ...]] = {
    "synth-easy": _LONG[:7],
    "synth-hard": tuple(_LONG[i] for i in (0, 1, 6, 10, 11)),
    "synth-long": _LONG,
}

#: Few-shot variants: the same task orders, a few dozen training images per generator (what an
#: analyst holds for a newly met generator). :func:`synthesize` writes
#: :data:`FEWSHOT_PER_CLASS` training images per class by default (10 to 30 accepted) and
#: :data:`FEWSHOT_VAL_PER_CLASS` evaluation images; runs use a memory of
#: :data:`FEWSHOT_MEMORY_PER_CLASS` exemplars per class (:func:`fewshot_memory_size`).
FEWSHOT: dict[str, str] = {"synth-easy-fewshot": "synth-easy", "synth-hard-fewshot": "synth-hard",
                           "synth-long-fewshot": "synth-long"}
FEWSHOT_PER_CLASS = 14
FEWSHOT_RANGE = (10, 30)
FEWSHOT_VAL_PER_CLASS = 50
FEWSHOT_MEMORY_PER_CLASS = 2
SYNTH_SCENARIOS.update({name: SYNTH_SCENARIOS[base] for name, base in FEWSHOT.items()})


def fewshot_memory_size(scenario: str, per_class: int = FEWSHOT_MEMORY_PER_CLASS) -> int:
    """Total exemplar budget that leaves ``per_class`` exemplars per class after the last task
    of ``scenario`` (2 classes per task)."""
    return 2 * len(SYNTH_SCENARIOS[scenario]) * int(per_class)

SPLITS: tuple[str, ...] = ("train", "val")
CLASS_DIRS: tuple[str, ...] = ("0_real", "1_fake")

_META = "synth.json"
_PARTIAL = ".synth-incomplete.json"
_GENERATOR = "lorax_cil.benchmarks.synth"
_FORMAT = 1


def task_subclasses(task: str) -> tuple[str, ...]:
    """Subclass (object category) folder names of a task; empty when it has none."""
    _check_task(task)
    return DOMAINS[FAMILIES[task].domain].categories


def render_image(task: str, split: str, label: int, index: int, *, size: int = 96,
                 seed: int = 0) -> np.ndarray:
    """Render one image of the dataset as a ``(size, size, 3)`` uint8 array.

    Args:
        task: task (= generator family) name.
        split: ``"train"`` or ``"val"``.
        label: 0 for real, 1 for fake.
        index: image index inside (task, split, label); with subclasses, index ``i`` belongs to
            subclass ``i % n_subclasses``.
        size: image side in pixels.
        seed: dataset seed.
    """
    _check_task(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    family = FAMILIES[task]
    domain = DOMAINS[family.domain]
    key = [int(seed), zlib.crc32(task.encode("utf-8")), SPLITS.index(split), int(label), int(index)]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))
    category = index % len(domain.categories) if domain.categories else 0
    img = finish(rng, domain.render(rng, size, category))
    if label == 1:
        img = family.apply(img, rng)
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def synthesize(out_dir: str | os.PathLike, *, scenario: str = "synth-easy",
               per_class: int | None = None,
               val_per_class: int | None = None, size: int = 96, seed: int = 0,
               workers: int | None = None, overwrite: bool = False) -> Path:
    """Generate (or reuse) a synthetic scenario in the CDDB folder layout.

    Args:
        out_dir: output folder; created when missing.
        scenario: one of :data:`SYNTH_SCENARIOS`.
        per_class: train images per class (real, fake) and task; default 200, and
            :data:`FEWSHOT_PER_CLASS` (14) for a ``*-fewshot`` scenario, which accepts 10 to 30.
        val_per_class: val images per class and task; default ``max(1, per_class // 2)``
            (:data:`FEWSHOT_VAL_PER_CLASS` for a ``*-fewshot`` scenario).
        size: image side in pixels (>= 32).
        seed: dataset seed (>= 0); the output is bit-identical for identical arguments.
        workers: worker processes; default ``min(2, cpu count)``; 1 runs in-process.
        overwrite: allow writing into a non-empty folder that is not a synth output (only the
            scenario's task folders and ``synth.json`` are replaced; other files stay).

    Returns:
        The output folder. When it already holds a synth output with an identical
        ``synth.json``, nothing is written (cache hit).

    Raises:
        ValueError: a bad option (the message names it).
        FileExistsError: ``out_dir`` is non-empty, holds no synth output and ``overwrite`` is
            false.
    """
    config = _config(scenario, per_class, val_per_class, size, seed)
    n_workers = _check_workers(workers)
    out = Path(out_dir)
    if _read_json(out / _META) == config and not (out / _PARTIAL).exists():
        logger.info("synthetic scenario %s already in %s (cache hit)", scenario, out)
        return out
    _clear_previous(out, config, overwrite)
    t0 = time.perf_counter()
    _write_json(out / _PARTIAL, config)
    jobs = _jobs(out, config)
    if n_workers <= 1 or len(jobs) <= 1:
        total = sum(_run_job(job) for job in jobs)
    else:
        with ProcessPoolExecutor(max_workers=n_workers, mp_context=_mp_context()) as pool:
            total = sum(pool.map(_run_job, jobs))
    _write_json(out / _META, config)
    (out / _PARTIAL).unlink()
    logger.info("wrote %d synthetic images (%s) to %s in %.1f s", total, scenario, out,
                time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------- internals
def _check_task(task: str) -> None:
    if task not in FAMILIES:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(family_names())}")


def _int_option(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _config(scenario: str, per_class: Any, val_per_class: Any, size: Any, seed: Any) -> dict:
    if scenario not in SYNTH_SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; valid: {', '.join(SYNTH_SCENARIOS)}")
    fewshot = scenario in FEWSHOT
    if per_class is None:
        per_class = FEWSHOT_PER_CLASS if fewshot else 200
    per_class = _int_option("per_class", per_class, 1)
    lo, hi = FEWSHOT_RANGE
    if fewshot and not lo <= per_class <= hi:
        raise ValueError(f"per_class (--per-class) of a few-shot scenario must be in [{lo}, {hi}], "
                         f"got {per_class}; use {FEWSHOT[scenario]!r} for more images per class")
    if val_per_class is None:
        val_per_class = FEWSHOT_VAL_PER_CLASS if fewshot else max(1, per_class // 2)
    val_per_class = _int_option("val_per_class", val_per_class, 1)
    size = _int_option("size", size, 32)
    seed = _int_option("seed", seed, 0)
    tasks = list(SYNTH_SCENARIOS[scenario])
    from lorax_cil import __version__

    return {
        "generator": _GENERATOR,
        "format": _FORMAT,
        "version": __version__,
        "scenario": scenario,
        "tasks": tasks,
        "subclasses": {t: list(task_subclasses(t)) for t in tasks if task_subclasses(t)},
        "per_class": per_class,
        "val_per_class": val_per_class,
        "size": size,
        "seed": seed,
    }


def _check_workers(workers: Any) -> int:
    if workers is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            cpus = os.cpu_count() or 1
        return max(1, min(2, cpus))
    return _int_option("workers", workers, 1)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj: Any) -> None:
    from lorax_cil.utils import write_json

    write_json(path, obj)


def _clear_previous(out: Path, config: dict, overwrite: bool) -> None:
    """Remove what an earlier synth run (or, with ``overwrite``, the new tasks) left in ``out``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} exists and is not a folder (--out must name a "
                         "folder)")
    previous = [d for d in (_read_json(out / _META), _read_json(out / _PARTIAL))
                if isinstance(d, dict) and d.get("generator") == _GENERATOR]
    if out.is_dir() and any(out.iterdir()) and not previous and not overwrite:
        raise FileExistsError(
            f"out_dir {str(out)!r} is not empty and holds no synthetic dataset (no {_META}); "
            "choose an empty folder or pass --overwrite (overwrite=True; only the scenario's "
            "task folders are then replaced)")
    stale = set(config["tasks"])
    for d in previous:
        stale.update(t for t in d.get("tasks", []) if t in FAMILIES)  # never trust paths
    for task in sorted(stale):
        if (out / task).is_dir():
            shutil.rmtree(out / task)
    for name in (_META, _PARTIAL):
        if (out / name).exists():
            (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)


def _jobs(out: Path, config: dict) -> list[tuple]:
    """One job per (task, split, class): 4 per task, spread over the worker processes."""
    counts = {"train": config["per_class"], "val": config["val_per_class"]}
    return [(str(out), task, split, label, counts[split], config["size"], config["seed"])
            for task in config["tasks"] for split in SPLITS for label in (0, 1)]


def _run_job(job: tuple) -> int:
    """Render and write every image of one (task, split, class); returns the image count."""
    from PIL import Image

    out, task, split, label, count, size, seed = job
    subs = task_subclasses(task)
    base = Path(out) / task / split
    folders = [base / s / CLASS_DIRS[label] for s in subs] if subs else [base / CLASS_DIRS[label]]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        arr = render_image(task, split, label, index, size=size, seed=seed)
        path = folders[index % len(folders)] / f"{index:05d}.png"
        Image.fromarray(arr).save(path, format="PNG", optimize=False, compress_level=1)
    return count


def _mp_context():
    """``fork`` where available (fast, no re-import of ``__main__``), else the default."""
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()  # pragma: no cover - Windows / macOS spawn
