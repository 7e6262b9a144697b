"""Checks that keep a run directory honest: output folders, checkpoint metadata, ``latest.json``,
and what a resume may change.

* :func:`check_out_dir`: ``--out`` must be a folder lorax-cil can write, and never the data
  folder (or inside it): refused before anything is written.
* :func:`read_latest_pointer` (defined in :mod:`lorax_cil.training.checkpoint`):
  ``checkpoints/latest.json`` names a checkpoint folder of the same run (``exp_NNN``), nothing
  else.
* :func:`validate_run_meta`: the keys a run checkpoint must hold, and a class count that
  matches its scenario, checked before anything is allocated.
* :func:`protocol_changes`: the configuration keys a ``--resume`` would change. A run's protocol
  (backbone, seed, memory budget, schedule, transforms, ...) is fixed when it starts; a resume
  that changes it is refused unless ``--allow-protocol-change``, and then recorded.
* :func:`data_changes`: tasks whose data (file names and sizes of every stream) differ from
  what they were trained on; refused on resume unless ``--allow-protocol-change``, and then
  recorded with both hashes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

from lorax_cil.errors import UserError, printable
from lorax_cil.training.checkpoint import CheckpointError, read_latest_pointer
from lorax_cil.utils import flatten_dict

__all__ = [
    "RESUME_FREE_KEYS",
    "RUN_META_KEYS",
    "check_out_dir",
    "read_latest_pointer",
    "validate_run_meta",
    "protocol_changes",
    "format_changes",
    "data_changes",
]

#: configuration keys a resume may change without changing the protocol (where it runs, how
#: fast, where the data now lives: moved data keep their relative names and sizes, and
#: :func:`data_changes` compares those).
RESUME_FREE_KEYS = frozenset({
    "train.device", "train.num_workers", "train.eval_batch_size", "data.data_path",
    "data.strict_data", "out", "plugins",
})

#: keys of a run checkpoint's ``meta.json`` that loading and resuming read.
RUN_META_KEYS = ("completed_tasks", "scenario", "architecture", "config", "steps", "matrices",
                 "memory")

#: the most classes one task may add (runs add 2: real and fake).
MAX_CLASSES_PER_TASK = 1000

def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out_dir(out: str | os.PathLike, *, data_paths: Iterable[str | os.PathLike] = (),
                  what: str = "--out") -> Path:
    """Refuse an output folder that is a file, cannot be written, or is (inside) a data folder.

    Nothing is created here; the folder (or its nearest existing parent) is writable.

    Raises:
        UserError: naming ``what`` and the reason.
    """
    target = _resolved(out)
    shown = printable(os.fspath(out))
    for data in data_paths:
        if data is None:
            continue
        root = _resolved(data)
        if _inside(target, root):
            raise UserError(f"{what} {shown} is inside the data folder {printable(str(root))}: "
                            "writing there would mix outputs with the images (and a later scan "
                            "would take the outputs for data); choose a folder outside it")
    existing = target
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UserError(f"{what} {shown}: {printable(str(existing))} is a file, not a folder; "
                        "choose a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {shown}: cannot write in {printable(str(existing))} "
                        "(permission denied); choose a folder you can write to")
    try:  # a probe file in the folder (or its nearest existing parent): nothing is left behind
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UserError(f"{what} {shown}: cannot write there ({exc.strerror or exc}); choose "
                        "another folder") from None
    return target


def validate_run_meta(meta: Mapping[str, Any], folder: str | os.PathLike) -> None:
    """Check the keys and class counts of a run checkpoint before it is built.

    Raises:
        CheckpointError: naming the missing keys, or the class count that does not fit.
    """
    where = Path(folder) / "meta.json"
    missing = [k for k in RUN_META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{where} lacks the key(s) {', '.join(missing)} that a run "
                              "checkpoint holds; it was not written by `lorax-cil train`, or was "
                              "edited")
    arch, scenario = meta["architecture"], meta["scenario"]
    tasks = scenario.get("tasks") if isinstance(scenario, Mapping) else None
    classes = arch.get("task_classes") if isinstance(arch, Mapping) else None
    done = meta["completed_tasks"]
    if not isinstance(done, int) or isinstance(done, bool) or done < 0:
        raise CheckpointError(f"{where}: completed_tasks must be a count, got {done!r}")
    if not isinstance(tasks, list) or not all(
            isinstance(t, Mapping) and isinstance(t.get("name"), str)
            and isinstance(t.get("path"), str) for t in tasks):
        raise CheckpointError(f"{where}: scenario.tasks must list tasks with a name and a path")
    if not isinstance(scenario.get("name"), str):
        raise CheckpointError(f"{where}: scenario.name must be a string")
    for key, kind in (("config", Mapping), ("steps", list), ("matrices", Mapping),
                      ("architecture", Mapping)):
        if not isinstance(meta[key], kind):
            raise CheckpointError(f"{where}: {key} must be a "
                                  f"{'list' if kind is list else 'mapping'}")
    if len(meta["steps"]) != done:
        raise CheckpointError(f"{where}: {len(meta['steps'])} step records for {done} completed "
                              "tasks")
    if done > len(tasks):
        raise CheckpointError(f"{where}: {done} completed tasks but the scenario has "
                              f"{len(tasks)}")
    if classes is None:
        return
    if (not isinstance(classes, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_CLASSES_PER_TASK
            for n in classes)):
        raise CheckpointError(f"{where}: architecture.task_classes must list 1 to "
                              f"{MAX_CLASSES_PER_TASK} classes per task, got {printable(str(classes)[:80])}")
    if len(classes) > len(tasks) or sum(classes) > 2 * len(tasks):
        raise CheckpointError(f"{where}: architecture.task_classes ({sum(classes)} classes over "
                              f"{len(classes)} tasks) does not fit the scenario's {len(tasks)} "
                              "tasks of 2 classes")


def protocol_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``{"section.key": [old, new]}`` for every protocol key (not in :data:`RESUME_FREE_KEYS`)
    whose value differs between two resolved configurations (``RunConfig.to_dict()``)."""
    a, b = flatten_dict(old), flatten_dict(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys())
            if k not in RESUME_FREE_KEYS and a.get(k) != b.get(k)}


def format_changes(changes: Mapping[str, list[Any]]) -> str:
    return ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in changes.items())


def data_changes(trained: Mapping[str, str], current: Mapping[str, str],
                 tasks: Iterable[str]) -> list[dict[str, str]]:
    """Tasks among ``tasks`` whose current listing hash differs from the one they were trained
    with (tasks without a recorded hash are skipped)."""
    out = []
    for task in tasks:
        before, now = trained.get(task), current.get(task)
        if before is not None and before != now:
            out.append({"task": task, "trained_with_sha256": before, "now_sha256": now})
    return out


def current_task_listing(cfg: Any, scenario: Any) -> dict[str, str]:
    """Per task, the listing hash of the data ``cfg`` and ``scenario`` select now (the same
    samples a :class:`~lorax_cil.training.runner.Run` would use; headers are read, pixels not)."""
    from lorax_cil.benchmarks.images import DataIssues
    from lorax_cil.benchmarks.streams import streams_from_samples
    from lorax_cil.benchmarks.verify import data_manifest

    d = cfg.data
    samples = streams_from_samples(scenario, train_split="train", eval_split=d.eval_split,
                                    calib_fraction=d.calib_fraction, seed=cfg.train.seed,
                                    min_size=0, issues=DataIssues(), strict=False, probe=True)
    return data_manifest(samples, scenario)["task_listing_sha256"]


def check_finished_run_data(run_dir: Path, cfg: Any, scenario: Any) -> None:
    """Refuse to reuse a finished run whose data changed after it was trained.

    Raises:
        UserError: naming the changed tasks and the run directory.
    """
    path = Path(run_dir) / "data_manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    trained = manifest.get("trained_data_sha256") or {}
    if not trained:  # written before per-task hashes existed: nothing to compare
        return
    changed = data_changes(trained, current_task_listing(cfg, scenario), scenario.task_names)
    if changed:
        raise UserError(f"{run_dir} was trained on other data than the data now under its task "
                        f"folders (task(s) {', '.join(c['task'] for c in changed)} differ in file "
                        "names or sizes): delete that run to train it again on the current data, "
                        "or choose another --out")


#: the largest rank or count a detector file may ask for (far above any real use).
MAX_DETECTOR_SIZE = 4096


def validate_detector_meta(meta: Mapping[str, Any], folder: str | os.PathLike) -> None:
    """Check what a detector's ``meta.json`` asks to build before anything is built: the keys
    the loader reads, a threshold in [0, 1], a backbone recipe whose ``pretrained`` is no file
    path (nothing is unpickled), and ranks and counts within :data:`MAX_DETECTOR_SIZE`.

    Raises:
        CheckpointError: naming the key and the file.
    """
    import math

    from lorax_cil.training.checkpoint import CheckpointError
    from lorax_cil.training.config import _looks_like_file

    where = Path(folder) / "meta.json"
    backbone = meta.get("backbone")
    missing = [k for k in ("backbone", "adapter", "threshold", "targets") if k not in meta]
    if isinstance(backbone, Mapping):
        missing += [f"backbone.{k}" for k in ("recipe", "name", "fingerprint_sha256")
                    if k not in backbone]
    elif "backbone" not in missing:
        missing.append("backbone (a mapping)")
    if missing:
        raise CheckpointError(f"{where} lacks the key(s) {', '.join(missing)} that a detector "
                              "holds; it was not written by lorax-cil, or was edited")
    thr = meta["threshold"]
    if (isinstance(thr, bool) or not isinstance(thr, (int, float)) or not math.isfinite(thr)
            or not 0.0 <= thr <= 1.0):
        raise CheckpointError(f"{where}: threshold must be a number in [0, 1], got {thr!r}")
    recipe = backbone["recipe"]
    if not isinstance(recipe, Mapping) or not isinstance(meta["adapter"], Mapping):
        raise CheckpointError(f"{where}: backbone.recipe and adapter must be mappings")
    if _looks_like_file(recipe.get("pretrained")):
        raise CheckpointError(f"{where}: backbone.recipe.pretrained names a file "
                              f"({recipe.get('pretrained')!r}); refused (lorax-cil never loads "
                              "pickled weights; local weights go in backbone.recipe.weights)")

    def sizes(obj: Any, path: str):
        if isinstance(obj, Mapping):
            for k, v in obj.items():
                yield from sizes(v, f"{path}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from sizes(v, f"{path}[{i}]")
        elif isinstance(obj, int) and not isinstance(obj, bool):
            yield path, obj

    for path, value in [*sizes(meta["adapter"], "adapter"), *sizes(recipe, "backbone.recipe")]:
        if path.endswith(".seed"):
            continue
        if abs(value) > MAX_DETECTOR_SIZE * 4:  # img_size may reach 8192 x 2
            raise CheckpointError(f"{where}: {path}={value} is beyond any real detector; refused "
                                  "before allocating it")
