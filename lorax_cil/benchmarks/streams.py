"""Avalanche class-incremental streams from generator folders.

One experience per task (its two classes). The train stream reads ``train``; the evaluation
stream (named ``test`` as Avalanche expects) reads a configurable split, ``val`` by default as in
the papers; an optional ``calib`` stream is carved deterministically from ``train``.

Datasets are avalanche-lib task-aware classification datasets (samples ``(x, y, t)`` with the
task label ``t = 0`` everywhere, so replay buffers and LwF collate), with two extra data
attributes that are *not* put in the minibatch: ``task_id`` (generator index) and ``is_fake``.
Read them from the dataset or derive them from the class tables; never from ``mb_task_id``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

from lorax_cil.benchmarks.datasets import (
    ImageSampleDataset,
    Sample,
    carve_calibration,
    probe_samples,
    scan_scenario_split,
)
from lorax_cil.benchmarks.images import DataIssues
from lorax_cil.benchmarks.scenarios import Scenario
from lorax_cil.benchmarks.transforms import TransformConfig, build_transform

__all__ = ["CILBenchmark", "make_avalanche_dataset", "build_cil_benchmark", "streams_from_samples"]

logger = logging.getLogger(__name__)


def make_avalanche_dataset(
    samples: Sequence[Sample],
    *,
    transform_config: TransformConfig,
    strict: bool = False,
    issues: DataIssues | None = None,
    initial_group: str = "train",
):
    """Wrap samples as an avalanche-lib task-aware classification dataset.

    The dataset has transform groups ``train`` and ``eval`` (both always defined, so the eval
    group never silently reuses the train augmentation) and data attributes ``targets``,
    ``targets_task_labels`` (0), ``task_id``, ``is_fake`` and ``sample_index`` (position in
    ``samples``; with ``task_id`` it identifies the file even inside subsets and concatenations).
    """
    from avalanche.benchmarks.utils import DataAttribute
    from avalanche.benchmarks.utils.classification_dataset import (
        _make_taskaware_classification_dataset,
    )

    base = ImageSampleDataset(samples, strict=strict, issues=issues)
    groups = {
        "train": build_transform(transform_config, train=True),
        "eval": build_transform(transform_config, train=False),
    }
    ds = _make_taskaware_classification_dataset(
        base,
        targets=[s.label for s in samples],
        task_labels=0,
        transform_groups=groups,
        initial_transform_group=initial_group,
    )
    ds = ds.update_data_attribute("task_id", DataAttribute([s.task_id for s in samples], "task_id"))
    ds = ds.update_data_attribute("is_fake", DataAttribute([s.is_fake for s in samples], "is_fake"))
    ds = ds.update_data_attribute(
        "sample_index", DataAttribute(list(range(len(samples))), "sample_index")
    )
    return ds


@dataclass
class CILBenchmark:
    """A scenario turned into Avalanche streams, plus everything needed to report on it.

    Attributes:
        scenario: the tasks, in order.
        benchmark: the avalanche ``CLScenario`` (streams ``train``, ``test`` and maybe ``calib``).
        samples: per stream name, one sample list per task.
        eval_split: the folder split the ``test`` stream reads.
        transform_config: pre-processing shared by every stream.
        issues: unreadable and small files found while building.
    """

    scenario: Scenario
    benchmark: Any
    samples: dict[str, list[list[Sample]]]
    eval_split: str
    transform_config: TransformConfig
    issues: DataIssues = field(default_factory=DataIssues)

    @property
    def train_stream(self):
        return self.benchmark.train_stream

    @property
    def test_stream(self):
        return self.benchmark.test_stream

    @property
    def calib_stream(self):
        return getattr(self.benchmark, "calib_stream", None)

    @property
    def class_is_fake(self) -> list[bool]:
        return self.scenario.class_is_fake

    @property
    def class_task(self) -> list[int]:
        return self.scenario.class_task

    def decoded_mask(self, stream: str, task: int) -> list[bool]:
        """Which samples of a stream's task decoded, in sample order (``False``: the file failed
        to decode when it was read and another image was used in its place; metrics leave those
        out). Call it after the samples were read: DataLoader workers' reports are merged here."""
        self.issues.collect()
        bad = self.issues.substituted_files
        return [s.path not in bad for s in self.samples[stream][task]]

    def paths_of(self, dataset: Any, stream: str = "train") -> list[str]:
        """File paths of the samples of an avalanche dataset view built from ``stream``."""
        table = self.samples[stream]
        return [table[int(t)][int(i)].path for t, i in zip(dataset.task_id, dataset.sample_index)]

    def counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """Per stream, per task: number of real and fake samples."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for stream, per_task in self.samples.items():
            out[stream] = {}
            for task, samples in zip(self.scenario.task_names, per_task):
                fake = sum(s.is_fake for s in samples)
                out[stream][task] = {"real": len(samples) - fake, "fake": fake}
        return out


def streams_from_samples(
    scenario: Scenario,
    *,
    train_split: str,
    eval_split: str,
    calib_fraction: float,
    seed: int,
    min_size: int,
    issues: DataIssues,
    strict: bool,
    probe: bool,
) -> dict[str, list[list[Sample]]]:
    streams: dict[str, list[list[Sample]]] = {"train": [], "test": []}
    if calib_fraction > 0:
        streams["calib"] = []
    train_all = scan_scenario_split(scenario, train_split)
    test_all = scan_scenario_split(scenario, eval_split)
    for tr, te in zip(train_all, test_all):
        if probe:
            tr = probe_samples(tr, min_size=min_size, issues=issues, strict=strict)
            te = probe_samples(te, min_size=min_size, issues=issues, strict=strict)
        tr, cal = carve_calibration(tr, calib_fraction, seed=seed)
        streams["train"].append(tr)
        streams["test"].append(te)
        if calib_fraction > 0:
            streams["calib"].append(cal)
    for name, per_task in streams.items():
        for task, samples in zip(scenario.tasks, per_task):
            labels = {s.is_fake for s in samples}
            if labels != {0, 1}:
                missing = "real" if 0 not in labels else "fake"
                raise ValueError(
                    f"task {task.name!r} ({task.path}) has no readable {missing} images "
                    f"in stream {name!r}"
                )
    return streams


def build_cil_benchmark(
    scenario: Scenario,
    *,
    transform_config: TransformConfig | None = None,
    train_split: str = "train",
    eval_split: str = "val",
    calib_fraction: float = 0.0,
    seed: int = 0,
    strict: bool = False,
    probe: bool = True,
) -> CILBenchmark:
    """Build the Avalanche class-incremental benchmark of ``scenario``.

    Args:
        scenario: tasks in order (see :func:`~lorax_cil.benchmarks.scenarios.resolve_scenario`).
        transform_config: crop size, normalisation and augmentation.
        train_split: folder split of the train stream.
        eval_split: folder split of the evaluation stream (``test`` in Avalanche's naming).
        calib_fraction: fraction of each train class moved to a ``calib`` stream.
        seed: seed of the calibration carve.
        strict: raise on unreadable images instead of skipping them with a warning.
        probe: read every image header up front (finds unreadable and small files).
    """
    from avalanche.benchmarks import benchmark_from_datasets, with_classes_timeline

    cfg = transform_config or TransformConfig()
    issues = DataIssues()
    samples = streams_from_samples(
        scenario,
        train_split=train_split,
        eval_split=eval_split,
        calib_fraction=calib_fraction,
        seed=seed,
        min_size=cfg.size,
        issues=issues,
        strict=strict,
        probe=probe,
    )
    datasets = {
        name: [
            make_avalanche_dataset(
                s,
                transform_config=cfg,
                strict=strict,
                issues=issues,
                initial_group="train" if name == "train" else "eval",
            )
            for s in per_task
        ]
        for name, per_task in samples.items()
    }
    bench = with_classes_timeline(benchmark_from_datasets(**datasets))
    summary = issues.summary()
    if summary["unreadable"] or summary["smaller_than_crop"]:
        logger.warning(
            "data issues: %d unreadable file(s) skipped, %d image(s) smaller than the %d px crop "
            "(resized first)",
            summary["unreadable"],
            summary["smaller_than_crop"],
            cfg.size,
        )
    return CILBenchmark(scenario, bench, samples, eval_split, cfg, issues)
