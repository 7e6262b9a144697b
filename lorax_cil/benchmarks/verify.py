"""`lorax-cil data verify`: counts, unreadable files, small images, shortcut warnings, manifest.

The manifest records, per task and split, the image counts per class and two hashes:
``listing_sha256`` (relative paths and byte sizes: cheap, computed by every training run) and,
when requested, ``content_sha256`` (every file's bytes). A run that records the manifest says
exactly which data it used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lorax_cil.benchmarks.folders import DataLayoutError, list_subdirs, scan_task_split
from lorax_cil.benchmarks.images import ImageLoadError, load_rgb, probe_image
from lorax_cil.benchmarks.scenarios import Scenario, resolve_scenario
from lorax_cil.errors import printable

__all__ = ["MANIFEST_VERSION", "VerifyReport", "verify_data", "data_manifest", "discover_scenario"]

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1


@dataclass
class VerifyReport:
    """What `data verify` found. ``manifest`` is the JSON written next to the report."""

    manifest: dict[str, Any]
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    small: list[tuple[str, int, int]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unreadable

    def rows(self) -> list[dict[str, Any]]:
        """One row per (task, split, subclass, class) with its count, for tables."""
        out = []
        for task, splits in self.manifest["tasks"].items():
            for split, info in splits.items():
                for sub, counts in sorted(info["by_subclass"].items()):
                    for cls in ("real", "fake"):
                        out.append(
                            {
                                "task": task,
                                "split": split,
                                "subclass": sub or "-",
                                "class": cls,
                                "images": counts[cls],
                            }
                        )
        return out


def discover_scenario(data_path: str | os.PathLike) -> Scenario:
    """Every task folder under ``data_path``, in sorted order, as a ``custom`` scenario."""
    root = Path(data_path).expanduser().resolve()
    if not root.is_dir():
        raise DataLayoutError(f"--data-path folder does not exist: {root}")
    names = list_subdirs(root)
    if not names:
        raise DataLayoutError(f"no task folders in {root}")
    return resolve_scenario("custom", data_path=root, tasks=names)


def _split_names(task_path: str, splits: Sequence[str] | None) -> list[str]:
    if splits:
        return list(splits)
    found = list_subdirs(task_path)
    if not found:
        raise DataLayoutError(f"task folder {task_path} has no split folders")
    return found


def _describe(counter: Counter) -> str:
    total = sum(counter.values())
    return ", ".join(f"{k} ({100.0 * v / total:.0f}%)" for k, v in counter.most_common(3))


def _shortcut_warnings(task: str, split: str, fmt: dict, size: dict) -> list[str]:
    warns = []
    if fmt[0] and fmt[1] and set(fmt[0]) != set(fmt[1]):
        warns.append(
            f"{task}/{split}: real images are {_describe(fmt[0])} but fake images are "
            f"{_describe(fmt[1])}; a detector can learn the file format instead of the generator"
        )
    if size[0] and size[1]:
        top_real = size[0].most_common(1)[0][0]
        top_fake = size[1].most_common(1)[0][0]
        if top_real != top_fake:
            warns.append(
                f"{task}/{split}: most real images are {top_real[0]}x{top_real[1]} but most fake "
                f"images are {top_fake[0]}x{top_fake[1]}; image size is a possible shortcut"
            )
    return warns


def _hash_update(h: Any, rel: str, path: str, content: bool) -> None:
    """Add one file (its relative name, and its size or bytes) to a listing hash. The name is
    hashed as the bytes on disk (also when they are not UTF-8); a file that cannot be read
    (dangling link, symlink loop, FIFO, no permission) is hashed as such, never opened."""
    h.update(os.fsencode(rel) + b"\0")
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise OSError("not a regular file")
        if content:
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(str(st.st_size).encode() + b"\0")
    except OSError:
        h.update(b"<unreadable>\0")


def verify_data(
    data_path: str | os.PathLike | None = None,
    *,
    scenario: Scenario | None = None,
    splits: Sequence[str] | None = None,
    crop_size: int = 224,
    decode: bool = True,
    hash_content: bool = True,
) -> VerifyReport:
    """Check every image of a scenario (or of every task under ``data_path``).

    Args:
        data_path: dataset root; used to discover tasks when ``scenario`` is None.
        scenario: the tasks to check.
        splits: splits to check (default: every split folder of each task).
        crop_size: images whose shorter side is below this are reported as small.
        decode: fully decode every image (finds truncated files); otherwise read headers only.
        hash_content: include ``content_sha256`` (reads every byte).
    """
    if scenario is None:
        if data_path is None:
            raise ValueError("verify_data needs data_path or scenario")
        scenario = discover_scenario(data_path)
    report = VerifyReport(manifest={})
    listing = hashlib.sha256()
    content = hashlib.sha256() if hash_content else None
    tasks: dict[str, Any] = {}
    for task in scenario.tasks:
        tasks[task.name] = {}
        for split in _split_names(task.path, splits):
            records = scan_task_split(task.path, split)
            by_sub: dict[str, dict[str, int]] = {}
            fmt: dict[int, Counter] = {0: Counter(), 1: Counter()}
            size: dict[int, Counter] = {0: Counter(), 1: Counter()}
            for r in records:
                rel = os.path.relpath(r.path, os.path.dirname(task.path))
                _hash_update(listing, rel, r.path, False)
                if content is not None:
                    _hash_update(content, rel, r.path, True)
                counts = by_sub.setdefault(r.subclass, {"real": 0, "fake": 0})
                counts["fake" if r.is_fake else "real"] += 1
                try:
                    info = probe_image(r.path)
                    if decode:
                        load_rgb(r.path)
                except ImageLoadError as exc:
                    report.unreadable.append((printable(r.path), printable((exc.reason or str(exc.__cause__ or exc)))))
                    continue
                fmt[r.is_fake][info.format] += 1
                size[r.is_fake][(info.width, info.height)] += 1
                if min(info.width, info.height) < crop_size:
                    report.small.append((printable(r.path), info.width, info.height))
            report.warnings.extend(_shortcut_warnings(task.name, split, fmt, size))
            tasks[task.name][split] = {
                "real": sum(c["real"] for c in by_sub.values()),
                "fake": sum(c["fake"] for c in by_sub.values()),
                "by_subclass": by_sub,
                "formats": {"real": dict(fmt[0]), "fake": dict(fmt[1])},
            }
    report.manifest = {
        "manifest_version": MANIFEST_VERSION,
        "scenario": scenario.name,
        "task_order": scenario.task_names,
        "tasks": tasks,
        "listing_sha256": listing.hexdigest(),
        "content_sha256": content.hexdigest() if content is not None else None,
        "unreadable": len(report.unreadable),
        "smaller_than_crop": len(report.small),
        "crop_size": crop_size,
    }
    return report


def data_manifest(samples: dict[str, list[list[Any]]], scenario: Scenario) -> dict[str, Any]:
    """A cheap manifest of the samples a run actually used (paths and byte sizes hashed)."""
    h = hashlib.sha256()
    per_task_h = {t.name: hashlib.sha256() for t in scenario.tasks}
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for stream in sorted(samples):
        counts[stream] = {}
        for task, per_task in zip(scenario.tasks, samples[stream]):
            fake = 0
            for s in per_task:
                rel = os.path.relpath(s.path, os.path.dirname(task.path))
                for target in (h, per_task_h[task.name]):
                    target.update(stream.encode() + b"\0")
                    _hash_update(target, rel, s.path, False)
                fake += s.is_fake
            counts[stream][task.name] = {"real": len(per_task) - fake, "fake": fake}
    return {
        "manifest_version": MANIFEST_VERSION,
        "scenario": scenario.name,
        "task_order": scenario.task_names,
        "task_paths": {t.name: printable(t.path) for t in scenario.tasks},
        "counts": counts,
        "listing_sha256": h.hexdigest(),
        # per task: every stream's relative paths and byte sizes (what a resume compares)
        "task_listing_sha256": {name: th.hexdigest() for name, th in per_task_h.items()},
    }
