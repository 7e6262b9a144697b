"""Avalanche plugin metrics for attribution: multi-real / binary / strict accuracy and AP.

This module imports avalanche and torch at top level; ``lorax_cil.evaluation`` does not import
it, so only code paths that build an Avalanche strategy pay for it (~8 s).

:class:`AttributionMetric` collects per-sample predictions during evaluation
(``strategy.mb_output``, ``strategy.mb_y``; never ``mb_task_id``, which is ``mbatch[-1]`` and may
be an appended field), emits one ``MetricValue`` per evaluated experience and quantity, e.g.
``Top1_MultiReal_Exp/eval_phase/test_stream/Exp003``, and fills one :class:`AccuracyMatrix` per
(eval stream, quantity) with row = completed training experiences - 1 and column = the eval
experience id (the latest eval at or during step ``j`` wins). After each ``eval`` call it also
emits AA, step-average accuracy, BWT and forgetting of the multi-real matrix
(``AA_MultiReal/eval_phase/test_stream`` ...).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue
from avalanche.evaluation.metric_utils import get_metric_name, stream_type

from lorax_cil.evaluation.metrics import AccuracyMatrix, fakeness_score, prediction_metrics

__all__ = ["AttributionMetric", "attribution_metrics", "EXPERIENCE_METRIC_NAMES", "SUMMARY_NAMES"]

logger = logging.getLogger(__name__)

#: quantity key -> base name of the per-experience MetricValue.
EXPERIENCE_METRIC_NAMES = {
    "multi_real": "Top1_MultiReal_Exp",
    "binary": "Top1_Binary_Exp",
    "strict": "Top1_Strict_Exp",
    "ap": "AP_Fakeness_Exp",
}
#: summary key -> prefix of the per-stream MetricValue (suffix: quantity in CamelCase).
SUMMARY_NAMES = {
    "aa": "AA",
    "step_average_accuracy": "StepAvgAcc",
    "bwt": "BWT",
    "forgetting": "Forgetting",
}
_CAMEL = {"multi_real": "MultiReal", "binary": "Binary", "strict": "Strict", "ap": "AP"}

TableSource = Any  # array-like or a zero-argument callable returning one


def _resolve(source: TableSource) -> np.ndarray | None:
    if source is None:
        return None
    value = source() if callable(source) else source
    return np.asarray(value)


class AttributionMetric(PluginMetric[dict]):
    """Per-experience attribution metrics plus accuracy matrices, as one Avalanche plugin metric.

    Args:
        class_is_fake: bool per class, or a callable returning it (classes grow over time).
        class_task: task per class, or a callable returning it (optional; recorded per sample).
        class_tables: alternative to the two above: a callable returning
            ``(class_is_fake, class_task)``; evaluated at the end of every eval experience.
        task_names: names of the matrix columns, by eval experience id (default ``exp<i>``).
        summary_quantities: quantities whose matrix summaries are emitted after each eval.
        step_offset: added to the matrix row, for a run resumed after ``step_offset`` steps.
    """

    def __init__(
        self,
        *,
        class_is_fake: TableSource = None,
        class_task: TableSource = None,
        class_tables: Callable[[], tuple[Any, Any]] | None = None,
        task_names: Sequence[str] | Callable[[], Sequence[str]] | None = None,
        summary_quantities: Sequence[str] = ("multi_real",),
        step_offset: int = 0,
    ) -> None:
        super().__init__()
        if class_tables is None and class_is_fake is None:
            raise ValueError("AttributionMetric needs class_is_fake=... or class_tables=...")
        if class_tables is not None and (class_is_fake is not None or class_task is not None):
            raise ValueError("pass either class_tables or class_is_fake/class_task, not both")
        unknown = [q for q in summary_quantities if q not in EXPERIENCE_METRIC_NAMES]
        if unknown:
            raise ValueError(
                f"unknown summary quantities {unknown}; valid: {list(EXPERIENCE_METRIC_NAMES)}"
            )
        self._class_is_fake = class_is_fake
        self._class_task = class_task
        self._class_tables = class_tables
        self._task_names = task_names
        self._summary_quantities = tuple(summary_quantities)
        self._step_offset = int(step_offset)
        self._completed = 0
        self._in_train_exp = False
        self._matrices: dict[str, dict[str, AccuracyMatrix]] = {}
        self.history: list[dict[str, Any]] = []
        self._last: dict[str, Any] = {}
        self._reset_buffers()

    # ------------------------------------------------------------------ PluginMetric API
    def result(self) -> dict[str, Any]:
        """The record of the last evaluated experience (see :attr:`history`)."""
        return dict(self._last)

    def reset(self) -> None:
        """Clear the per-experience prediction buffers (matrices and history are kept)."""
        self._reset_buffers()

    def __str__(self) -> str:
        return "AttributionMetric"

    # ------------------------------------------------------------------ accessors
    @property
    def completed_steps(self) -> int:
        """Training experiences completed so far (plus ``step_offset``)."""
        return self._completed + self._step_offset

    @property
    def streams(self) -> list[str]:
        return sorted(self._matrices)

    def accuracy_matrix(
        self, quantity: str = "multi_real", stream: str | None = None
    ) -> AccuracyMatrix:
        """The matrix of ``quantity`` (``multi_real``/``binary``/``strict``/``ap``) on ``stream``.

        ``stream=None`` picks ``test`` when recorded, else the only recorded non-train stream.
        """
        if quantity not in EXPERIENCE_METRIC_NAMES:
            raise ValueError(
                f"unknown quantity {quantity!r}; valid: {list(EXPERIENCE_METRIC_NAMES)}"
            )
        if stream is None:
            candidates = [s for s in self._matrices if s != "train"] or list(self._matrices)
            if "test" in self._matrices:
                stream = "test"
            elif len(candidates) == 1:
                stream = candidates[0]
            else:
                raise ValueError(f"several or no eval streams {self.streams}; pass stream=")
        if stream not in self._matrices:
            raise ValueError(f"no matrix for stream {stream!r}; recorded streams: {self.streams}")
        return self._matrices[stream][quantity]

    @property
    def matrix(self) -> AccuracyMatrix:
        """Shortcut for the multi-real matrix of the default stream."""
        return self.accuracy_matrix("multi_real")

    # ------------------------------------------------------------------ callbacks
    def before_training_exp(self, strategy) -> None:
        self._in_train_exp = True

    def after_training_exp(self, strategy) -> None:
        self._completed += 1
        self._in_train_exp = False

    def before_eval_exp(self, strategy) -> None:
        self._reset_buffers()

    def after_eval_iteration(self, strategy) -> None:
        super().after_eval_iteration(strategy)
        out = strategy.mb_output
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            raise TypeError(
                f"AttributionMetric needs (N, C) logits in strategy.mb_output, got {type(out)}"
            )
        out = out.detach().float()
        self._preds.append(out.argmax(dim=1).cpu().numpy())
        self._probs.append(torch.softmax(out, dim=1).cpu().numpy())
        self._labels.append(strategy.mb_y.detach().cpu().numpy().astype(np.int64))

    def after_eval_exp(self, strategy) -> list[MetricValue]:
        record = self._close_experience(strategy)
        x = strategy.clock.train_iterations
        values = []
        for key, base in EXPERIENCE_METRIC_NAMES.items():
            name = get_metric_name(base, strategy, add_experience=True, add_task=False)
            values.append(MetricValue(self, name, float(record[key]), x))
        return values

    def after_eval(self, strategy) -> list[MetricValue]:
        row = self._current_row()
        if row < 0:
            return []
        stream = stream_type(strategy.experience)
        if stream not in self._matrices:
            return []
        x = strategy.clock.train_iterations
        values = []
        for quantity in self._summary_quantities:
            summary = self._matrices[stream][quantity].summary()
            for key, prefix in SUMMARY_NAMES.items():
                name = get_metric_name(f"{prefix}_{_CAMEL[quantity]}", strategy, add_task=False)
                values.append(MetricValue(self, name, float(summary[key]), x))
        return values

    # ------------------------------------------------------------------ internals
    def _current_row(self) -> int:
        """Matrix row of an eval happening now.

        After training experience ``j`` (and until the next one starts) the row is ``j``. A
        periodic eval *inside* training experience ``j`` (``eval_every`` with ``peval_mode``
        ``"epoch"``/``"iteration"``, which Avalanche runs before ``after_training_exp``) also
        writes row ``j``; the last eval of the experience overwrites the earlier ones. Before any
        training the row is -1 and nothing is recorded.
        """
        return self._completed + self._step_offset - 1 + (1 if self._in_train_exp else 0)

    def _reset_buffers(self) -> None:
        self._preds: list[np.ndarray] = []
        self._probs: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def _tables(self, num_outputs: int) -> tuple[np.ndarray, np.ndarray | None]:
        if self._class_tables is not None:
            cf, ct = self._class_tables()
            cf, ct = np.asarray(cf), (None if ct is None else np.asarray(ct))
        else:
            cf, ct = _resolve(self._class_is_fake), _resolve(self._class_task)
        cf = cf.astype(bool)
        if ct is not None and ct.shape != cf.shape:
            raise ValueError(f"class_task has {ct.size} entries but class_is_fake has {cf.size}")
        if num_outputs > cf.size:
            raise ValueError(
                f"the model outputs {num_outputs} classes but the class tables describe {cf.size}; "
                "class_is_fake/class_tables must cover every output unit"
            )
        return cf, ct

    def _close_experience(self, strategy) -> dict[str, Any]:
        exp_id = int(strategy.experience.current_experience)
        stream = stream_type(strategy.experience)
        num_outputs = self._probs[0].shape[1] if self._probs else 0
        cf, ct = self._tables(num_outputs)
        pred = np.concatenate(self._preds) if self._preds else np.zeros(0, np.int64)
        label = np.concatenate(self._labels) if self._labels else np.zeros(0, np.int64)
        probs = np.concatenate(self._probs) if self._probs else np.zeros((0, cf.size))
        if probs.shape[1] < cf.size:  # classes the model cannot output yet have probability 0
            probs = np.pad(probs, ((0, 0), (0, cf.size - probs.shape[1])))
        scores = fakeness_score(probs, cf) if (cf.any() and not cf.all()) else None
        record: dict[str, Any] = prediction_metrics(pred, label, cf, scores)
        tasks = sorted({int(t) for t in ct[label]}) if ct is not None and label.size else []
        row = self._current_row()
        record.update(stream=stream, experience=exp_id, step=row, tasks=tasks,
                      during_training=self._in_train_exp)
        if row < 0:
            logger.debug("eval of %s exp %d before any training: not in the matrix", stream, exp_id)
        elif exp_id > row:
            logger.debug("eval of %s exp %d at step %d: task not trained yet, not in the matrix",
                         stream, exp_id, row)
        else:
            for quantity, matrix in self._stream_matrices(stream, max(row, exp_id) + 1).items():
                matrix.set(row, exp_id, record[quantity])
        self.history.append(record)
        self._last = record
        self._reset_buffers()
        return record

    def _names(self, n: int) -> list[str]:
        given = self._task_names() if callable(self._task_names) else self._task_names
        given = [str(s) for s in (given or [])]
        return [given[i] if i < len(given) else f"exp{i}" for i in range(n)]

    def _stream_matrices(self, stream: str, size: int) -> dict[str, AccuracyMatrix]:
        mats = self._matrices.get(stream)
        if mats is None:
            names = self._names(size)
            mats = {q: AccuracyMatrix(size, task_names=names) for q in EXPERIENCE_METRIC_NAMES}
            self._matrices[stream] = mats
        else:
            current = next(iter(mats.values())).num_tasks
            if size > current:
                names = self._names(size)
                for matrix in mats.values():
                    matrix.expand(size, names[current:])
        return mats


def attribution_metrics(
    *,
    class_is_fake: TableSource = None,
    class_task: TableSource = None,
    class_tables: Callable[[], tuple[Any, Any]] | None = None,
    task_names: Sequence[str] | Callable[[], Sequence[str]] | None = None,
    summary_quantities: Sequence[str] = ("multi_real",),
    step_offset: int = 0,
) -> list[PluginMetric]:
    """Plugin metrics to pass to ``EvaluationPlugin(*attribution_metrics(...), loggers=...)``.

    Returns a one-element list holding an :class:`AttributionMetric`; keep a reference to it
    (``metric = attribution_metrics(...)[0]``) to read its accuracy matrices after training.
    """
    return [
        AttributionMetric(
            class_is_fake=class_is_fake,
            class_task=class_task,
            class_tables=class_tables,
            task_names=task_names,
            summary_quantities=summary_quantities,
            step_offset=step_offset,
        )
    ]
