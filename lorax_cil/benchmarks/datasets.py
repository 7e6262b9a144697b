"""Samples of a scenario and the torch dataset that reads them.

A :class:`Sample` carries its label *and* explicit ``task_id``, ``is_fake`` and ``generator``
fields. :class:`ImageSampleDataset` decodes images lazily, converts every mode to RGB, and
replaces a file that fails to decode at load time by the next readable sample of the same class
(with a warning naming the file), unless ``strict`` is set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from lorax_cil.benchmarks.folders import scan_task_split
from lorax_cil.benchmarks.images import DataIssues, ImageLoadError, load_rgb, probe_image
from lorax_cil.benchmarks.scenarios import Scenario
from lorax_cil.errors import UserError, printable

__all__ = [
    "Sample",
    "scan_scenario_split",
    "probe_samples",
    "carve_calibration",
    "ImageSampleDataset",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One image of a scenario.

    Attributes:
        path: absolute image path.
        label: class label, ``2 * task_id + is_fake``.
        task_id: index of the generator task in the scenario.
        is_fake: 1 for generated images, 0 for real ones.
        generator: task (generator) name.
        subclass: object subclass folder, ``""`` when the task has none.
    """

    path: str
    label: int
    task_id: int
    is_fake: int
    generator: str
    subclass: str = ""


def scan_scenario_split(scenario: Scenario, split: str) -> list[list[Sample]]:
    """Scan ``split`` of every task; returns one sorted sample list per task."""
    out: list[list[Sample]] = []
    for t, task in enumerate(scenario.tasks):
        recs = scan_task_split(task.path, split)
        out.append(
            [
                Sample(r.path, Scenario.label(t, r.is_fake), t, r.is_fake, task.name, r.subclass)
                for r in recs
            ]
        )
    return out


def probe_samples(
    samples: Sequence[Sample],
    *,
    min_size: int | None,
    issues: DataIssues,
    strict: bool = False,
) -> list[Sample]:
    """Read every header; drop unreadable files (or raise if ``strict``), note small ones."""
    kept: list[Sample] = []
    for s in samples:
        try:
            info = probe_image(s.path)
        except ImageLoadError as exc:
            if strict:
                raise strict_data_error(s.path, exc) from None
            issues.add_unreadable(s.path, (exc.reason or str(exc.__cause__ or exc)))
            continue
        if min_size is not None and min(info.width, info.height) < min_size:
            issues.add_small(s.path, (info.width, info.height))
        kept.append(s)
    return kept


def strict_data_error(path: str, exc: ImageLoadError) -> UserError:
    """The refusal of ``data.strict_data`` (``--strict-data``) for one unreadable file."""
    reason = printable((exc.reason or str(exc.__cause__ or exc)))
    return UserError(f"unreadable image {printable(path)} ({reason}); data.strict_data "
                     "(--strict-data) stops at the first one: remove or replace the file, or "
                     "train without --strict-data to skip unreadable files")


def carve_calibration(
    samples: Sequence[Sample], fraction: float, *, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Split ``samples`` into (train, calibration), stratified by class, deterministically.

    The calibration part takes ``round(fraction * n_c)`` samples of every class ``c`` (at least
    one when ``fraction > 0`` and the class has two or more samples), chosen by a permutation
    seeded from ``seed`` and the class label, so the split does not depend on other classes.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"calibration fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return list(samples), []
    by_class: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_class.setdefault(s.label, []).append(i)
    calib_idx: set[int] = set()
    for label, idx in sorted(by_class.items()):
        n_cal = int(round(fraction * len(idx)))
        if len(idx) >= 2:
            n_cal = min(max(n_cal, 1), len(idx) - 1)
        else:
            n_cal = 0
        rng = np.random.default_rng([seed, label])
        calib_idx.update(idx[j] for j in rng.permutation(len(idx))[:n_cal])
    train = [s for i, s in enumerate(samples) if i not in calib_idx]
    calib = [s for i, s in enumerate(samples) if i in calib_idx]
    return train, calib


class ImageSampleDataset:
    """A map-style torch dataset over :class:`Sample` records, returning ``(image, label)``.

    Args:
        samples: the records (not copied; treat as read-only).
        transform: callable applied to the RGB PIL image.
        strict: raise on a file that fails to decode instead of substituting it.
        issues: tally where load failures are recorded (per process).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        transform: Callable | None = None,
        strict: bool = False,
        issues: DataIssues | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.strict = strict
        self.issues = issues if issues is not None else DataIssues()
        self.targets = [s.label for s in self.samples]
        self._by_label: dict[int, list[int]] = {}
        for i, s in enumerate(self.samples):
            self._by_label.setdefault(s.label, []).append(i)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int):
        """Decode sample ``index``; on failure substitute the next readable one of its class."""
        s = self.samples[index]
        try:
            return load_rgb(s.path)
        except ImageLoadError as exc:
            if self.strict:
                raise strict_data_error(s.path, exc) from None
            self.issues.add_unreadable(s.path, (exc.reason or str(exc.__cause__ or exc)))
        same = self._by_label[s.label]
        start = same.index(index)
        for j in same[start + 1 :] + same[:start]:
            cand = self.samples[j]
            if cand.path in self.issues.unreadable:
                continue
            try:
                img = load_rgb(cand.path)
            except ImageLoadError as exc:
                self.issues.add_unreadable(cand.path, (exc.reason or str(exc.__cause__ or exc)))
                continue
            self.issues.add_substituted(s.path, cand.path)
            return img
        raise ImageLoadError(f"no readable image left in class {s.label} ({s.generator}): "
                             f"every file of the class failed to decode")

    def __getitem__(self, index: int):
        img = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.samples[index].label
