"""Pure metric functions for continual synthetic-image attribution.

Every formula lives here exactly once (see ``docs/metrics.md``).
Inputs are NumPy arrays (anything ``np.asarray`` accepts); undefined values are ``NaN``, never 0.

Class semantics are always passed explicitly: ``class_is_fake[c]`` says whether class ``c`` is a
fake class and ``class_task[c]`` which generator task it belongs to. Nothing here decodes label
parity (real = even / fake = odd), so any class order works.

The accuracy matrix ``R`` has ``R[j, i]`` = accuracy on task ``i``'s evaluation data after training
task ``j``. Only the lower triangle (``i <= j``) is meaningful; entries above the diagonal are
ignored by every summary. Trailing rows whose lower triangle is entirely NaN (steps a run in
progress has not reached yet) are dropped, so summaries describe the last completed step.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "multi_real_correct",
    "binary_correct",
    "strict_correct",
    "accuracy",
    "fakeness_score",
    "average_precision",
    "roc_auc",
    "prediction_metrics",
    "evaluate_predictions",
    "last_completed_step",
    "average_accuracy_per_step",
    "average_accuracy",
    "step_average_accuracy",
    "backward_transfer",
    "forgetting",
    "summarize_matrix",
    "AccuracyMatrix",
]

NAN = float("nan")


# --------------------------------------------------------------------------- input checks
def _class_table(class_is_fake: Any) -> np.ndarray:
    table = np.asarray(class_is_fake)
    if table.ndim != 1 or table.size == 0:
        raise ValueError(f"class_is_fake must be a non-empty 1-D table, got shape {table.shape}")
    if table.dtype != bool:
        if not np.isin(table, (0, 1)).all():
            raise ValueError("class_is_fake must hold booleans (or 0/1), one per class")
        table = table.astype(bool)
    return table


def _labels(x: Any, name: str, num_classes: int | None = None) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.mod(arr, 1) == 0):
            raise ValueError(f"{name} must hold integer class indices")
    arr = arr.astype(np.int64)
    if num_classes is not None and arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(
            f"{name} holds class indices outside [0, {num_classes}); the class tables describe "
            f"{num_classes} classes"
        )
    return arr


def _pred_label(pred: Any, label: Any, class_is_fake: Any) -> tuple[np.ndarray, ...]:
    table = _class_table(class_is_fake)
    p = _labels(pred, "pred", table.size)
    y = _labels(label, "label", table.size)
    if p.shape != y.shape:
        raise ValueError(f"pred and label differ in length: {p.size} vs {y.size}")
    return p, y, table


def _binary_targets(scores: Any, is_fake: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_fake)
    if s.ndim != 1 or y.ndim != 1 or s.shape != y.shape:
        raise ValueError(
            f"scores and is_fake must be 1-D of equal length, got {s.shape}, {y.shape}"
        )
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite (no NaN or inf)")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("is_fake must hold booleans (or 0/1)")
        y = y.astype(bool)
    return s, y


# --------------------------------------------------------------------------- per-sample correctness
def multi_real_correct(pred: Any, label: Any, class_is_fake: Any) -> np.ndarray:
    """Multi-real correctness (the LoRAX headline rule), one boolean per sample.

    ``correct = class_is_fake[pred] == False``   if the true class ``label`` is real;
    ``correct = (pred == label)``                 if the true class is fake.

    A real image counts as correct when predicted as *any* real class; a fake image only when
    predicted as its own generator's fake class.

    Args:
        pred: predicted class indices, shape (N,).
        label: true class indices, shape (N,).
        class_is_fake: bool per class, shape (C,).
    """
    p, y, table = _pred_label(pred, label, class_is_fake)
    return np.where(table[y], p == y, ~table[p])


def binary_correct(pred: Any, label: Any, class_is_fake: Any) -> np.ndarray:
    """Binary real/fake correctness: ``class_is_fake[pred] == class_is_fake[label]``."""
    p, y, table = _pred_label(pred, label, class_is_fake)
    return table[p] == table[y]


def strict_correct(pred: Any, label: Any, class_is_fake: Any | None = None) -> np.ndarray:
    """Strict (exact 2T-way class) correctness: ``pred == label``.

    ``class_is_fake`` is optional and only used to range-check the class indices.
    """
    if class_is_fake is not None:
        p, y, _ = _pred_label(pred, label, class_is_fake)
    else:
        p, y = _labels(pred, "pred"), _labels(label, "label")
        if p.shape != y.shape:
            raise ValueError(f"pred and label differ in length: {p.size} vs {y.size}")
    return p == y


def accuracy(correct: Any) -> float:
    """Mean of a boolean correctness vector: ``sum(correct) / N``; NaN when ``N == 0``."""
    c = np.asarray(correct, dtype=bool).ravel()
    return float(c.mean()) if c.size else NAN


# --------------------------------------------------------------------------- detection scores
def fakeness_score(probs: Any, class_is_fake: Any) -> np.ndarray:
    """CDDB fakeness score per sample: ``max_fake / (max_real + max_fake)``.

    ``max_fake`` is the largest probability over fake classes, ``max_real`` over real classes.
    NaN for a sample whose two maxima are both 0.

    Args:
        probs: class probabilities (e.g. softmax), shape (N, C).
        class_is_fake: bool per class, shape (C,); must contain both real and fake classes.
    """
    table = _class_table(class_is_fake)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != table.size:
        raise ValueError(
            f"probs must have shape (N, {table.size}) to match class_is_fake, got {p.shape}"
        )
    if table.all() or not table.any():
        raise ValueError("fakeness_score needs at least one real and one fake class")
    if p.shape[0] == 0:
        return np.zeros(0)
    max_fake = p[:, table].max(axis=1)
    max_real = p[:, ~table].max(axis=1)
    denom = max_real + max_fake
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, max_fake / np.where(denom > 0, denom, 1.0), NAN)


def average_precision(scores: Any, is_fake: Any) -> float:
    """Average precision of ``scores`` for the positive class "fake".

    ``AP = sum_n (R_n - R_{n-1}) * P_n`` over the distinct score thresholds in decreasing order
    (tied scores form one threshold), ``P_n``/``R_n`` the precision/recall at threshold ``n`` and
    ``R_{-1} = 0``. Equal to ``sklearn.metrics.average_precision_score``. NaN when only one class
    is present (or no samples).
    """
    s, y = _binary_targets(scores, is_fake)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        return NAN
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_threshold = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]
    tps = np.cumsum(y)[last_of_threshold]
    fps = last_of_threshold + 1 - tps
    precision = tps / (tps + fps)
    recall = tps / n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks of ``s``; tied values share the mean of their ranks."""
    order = np.argsort(s, kind="mergesort")
    ss = s[order]
    starts_mask = np.r_[True, ss[1:] != ss[:-1]]
    group = np.cumsum(starts_mask) - 1
    starts = np.flatnonzero(starts_mask)
    ends = np.r_[starts[1:], s.size]
    ranks = np.empty(s.size)
    ranks[order] = ((starts + 1 + ends) / 2.0)[group]
    return ranks


def roc_auc(scores: Any, is_fake: Any) -> float:
    """Area under the ROC curve for the positive class "fake".

    ``AUC = (sum of the ranks of fake samples - n_fake (n_fake + 1) / 2) / (n_fake * n_real)``
    with tied scores given their average rank (Mann-Whitney U; the same value as the trapezoidal
    rule of ``sklearn.metrics.roc_auc_score``). NaN when only one class is present.
    """
    s, y = _binary_targets(scores, is_fake)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return NAN
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# --------------------------------------------------------------------------- grouped evaluation
def prediction_metrics(
    pred: Any, label: Any, class_is_fake: Any, scores: Any | None = None
) -> dict[str, float]:
    """Accuracies (and AP of ``scores``) over one group of samples.

    Returns ``{"multi_real", "binary", "strict", "ap", "n"}``; ``ap`` is the average precision of
    ``scores`` against ``class_is_fake[label]`` (NaN without scores or with one class only).
    """
    p, y, table = _pred_label(pred, label, class_is_fake)
    ap = NAN if scores is None else average_precision(scores, table[y])
    return {
        "multi_real": accuracy(multi_real_correct(p, y, table)),
        "binary": accuracy(binary_correct(p, y, table)),
        "strict": accuracy(strict_correct(p, y)),
        "ap": ap,
        "n": int(y.size),
    }


def evaluate_predictions(
    pred: Any,
    label: Any,
    probs: Any | None,
    task_id: Any,
    is_fake: Any,
    class_is_fake: Any,
    class_task: Any | None = None,
) -> dict[int, dict[str, float]]:
    """Per-task multi-real / binary / strict accuracy and AP of the fakeness score.

    Args:
        pred: predicted class per sample, shape (N,).
        label: true class per sample, shape (N,).
        probs: class probabilities, shape (N, C), or None (then ``ap`` is NaN).
        task_id: generator task per sample, shape (N,); groups are formed on it.
        is_fake: whether each sample is fake, shape (N,); must equal ``class_is_fake[label]``.
        class_is_fake: bool per class, shape (C,).
        class_task: task per class, shape (C,); when given must satisfy
            ``class_task[label] == task_id``.

    Returns:
        ``{task: {"multi_real", "binary", "strict", "ap", "n"}}`` for every task id present,
        sorted by task id. AP uses the fakeness score computed over all C classes.

    Raises:
        ValueError: when the per-sample fields disagree with the class tables.
    """
    p, y, table = _pred_label(pred, label, class_is_fake)
    tasks = _labels(task_id, "task_id")
    fake = np.asarray(is_fake).astype(bool)
    if tasks.shape != y.shape or fake.shape != y.shape:
        raise ValueError("pred, label, task_id and is_fake must all have the same length")
    bad = int((table[y] != fake).sum())
    if bad:
        raise ValueError(f"is_fake disagrees with class_is_fake[label] for {bad} samples")
    if class_task is not None:
        ct = _labels(class_task, "class_task")
        if ct.size != table.size:
            raise ValueError(f"class_task has {ct.size} entries, class_is_fake {table.size}")
        bad = int((ct[y] != tasks).sum())
        if bad:
            raise ValueError(f"task_id disagrees with class_task[label] for {bad} samples")
    scores = None if probs is None else fakeness_score(probs, table)
    out: dict[int, dict[str, float]] = {}
    for t in np.unique(tasks):
        m = tasks == t
        out[int(t)] = prediction_metrics(p[m], y[m], table, None if scores is None else scores[m])
    return out


# --------------------------------------------------------------------------- accuracy matrices
def _effective_matrix(R: Any) -> np.ndarray:
    """Lower triangle of ``R`` (upper set to NaN), trailing unfinished rows dropped."""
    m = np.array(R, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"accuracy matrix must be square T x T, got shape {m.shape}")
    m[np.triu_indices(m.shape[0], 1)] = np.nan
    t = last_completed_step(m) + 1
    return m[:t, :t]


def last_completed_step(R: Any) -> int:
    """Index of the last row whose lower triangle holds any value; -1 when there is none."""
    m = np.asarray(R, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"accuracy matrix must be 2-D, got shape {m.shape}")
    lower = np.tril(~np.isnan(m))
    rows = np.flatnonzero(lower.any(axis=1))
    return int(rows[-1]) if rows.size else -1


def average_accuracy_per_step(R: Any) -> np.ndarray:
    """Average accuracy after each step ``j``: ``A_j = mean_{i<=j} R[j, i]`` (length T)."""
    m = _effective_matrix(R)
    return np.array([m[j, : j + 1].mean() for j in range(m.shape[0])], dtype=np.float64)


def average_accuracy(R: Any) -> float:
    """AA, average accuracy after the last step: ``mean_i R[T-1, i]``; NaN for an empty matrix."""
    m = _effective_matrix(R)
    return float(m[-1].mean()) if m.size else NAN


def step_average_accuracy(R: Any) -> float:
    """Step-averaged accuracy: ``mean_j mean_{i<=j} R[j, i]`` (our reading of the papers' AAF)."""
    a = average_accuracy_per_step(R)
    return float(a.mean()) if a.size else NAN


def backward_transfer(R: Any) -> float:
    """BWT (Lopez-Paz & Ranzato): ``mean_{i<T-1} (R[T-1, i] - R[i, i])``; NaN when T < 2."""
    m = _effective_matrix(R)
    t = m.shape[0]
    if t < 2:
        return NAN
    return float(np.mean(m[t - 1, : t - 1] - np.diag(m)[: t - 1]))


def forgetting(R: Any) -> float:
    """Forgetting (Chaudhry et al.): ``mean_{i<T-1} (max_{i<=j<T-1} R[j, i] - R[T-1, i])``.

    NaN when T < 2. Entries above the diagonal never enter the maximum.
    """
    m = _effective_matrix(R)
    t = m.shape[0]
    if t < 2:
        return NAN
    per_task = [np.max(m[i : t - 1, i]) - m[t - 1, i] for i in range(t - 1)]
    return float(np.mean(per_task))


def summarize_matrix(R: Any) -> dict[str, float]:
    """``{"aa", "step_average_accuracy", "bwt", "forgetting"}`` at the last completed step."""
    return {
        "aa": average_accuracy(R),
        "step_average_accuracy": step_average_accuracy(R),
        "bwt": backward_transfer(R),
        "forgetting": forgetting(R),
    }


# --------------------------------------------------------------------------- AccuracyMatrix
def _check_names(names: Sequence[str], expected: int) -> tuple[str, ...]:
    out = tuple(str(n) for n in names)
    if len(out) != expected:
        raise ValueError(f"expected {expected} task names, got {len(out)}: {list(out)}")
    if len(set(out)) != len(out) or any(not n for n in out):
        raise ValueError(f"task names must be unique and non-empty, got {list(out)}")
    return out


class AccuracyMatrix:
    """A growing T x T accuracy matrix ``R[step, task]`` (NaN where not measured).

    Args:
        num_tasks: number of tasks T.
        task_names: one name per task (default ``task0``, ``task1``, ...).
    """

    ROW_PREFIX = "after "

    def __init__(self, num_tasks: int, *, task_names: Sequence[str] | None = None) -> None:
        if int(num_tasks) < 0:
            raise ValueError(f"num_tasks must be >= 0, got {num_tasks}")
        n = int(num_tasks)
        names = task_names if task_names is not None else _default_names(0, n)
        self._names = _check_names(names, n)
        self._R = np.full((n, n), np.nan)

    @classmethod
    def from_array(cls, R: Any, *, task_names: Sequence[str] | None = None) -> AccuracyMatrix:
        """Build from a T x T array; entries above the diagonal must be NaN."""
        m = np.array(R, dtype=np.float64)
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"accuracy matrix must be square, got shape {m.shape}")
        if np.isfinite(m[np.triu_indices(m.shape[0], 1)]).any():
            raise ValueError("accuracy matrix has values above the diagonal (task > step)")
        out = cls(m.shape[0], task_names=task_names)
        for j, i in zip(*np.nonzero(np.isfinite(m))):
            out.set(int(j), int(i), float(m[j, i]))
        return out

    @property
    def num_tasks(self) -> int:
        return self._R.shape[0]

    @property
    def task_names(self) -> tuple[str, ...]:
        return self._names

    @property
    def matrix(self) -> np.ndarray:
        """A copy of the T x T matrix."""
        return self._R.copy()

    @property
    def last_step(self) -> int:
        """Last step with any value (-1 when empty)."""
        return last_completed_step(self._R)

    def set(self, step: int, task: int, value: float) -> None:
        """Record the accuracy on ``task`` after training ``step`` (``0 <= task <= step < T``)."""
        step, task = int(step), int(task)
        if not 0 <= step < self.num_tasks or not 0 <= task < self.num_tasks:
            raise ValueError(
                f"(step={step}, task={task}) outside a {self.num_tasks}-task matrix; use expand()"
            )
        if task > step:
            raise ValueError(f"task {task} is not trained yet at step {step} (above the diagonal)")
        v = float(value)
        if not (math.isnan(v) or 0.0 <= v <= 1.0):
            raise ValueError(f"accuracy must be a fraction in [0, 1] or NaN, got {v}")
        self._R[step, task] = v

    def get(self, step: int, task: int) -> float:
        return float(self._R[int(step), int(task)])

    def expand(self, new_num_tasks: int, new_names: Sequence[str] | None = None) -> AccuracyMatrix:
        """Grow to ``new_num_tasks`` tasks in place (existing entries kept) and return self.

        ``new_names`` lists either the added tasks only or all tasks (then the old names must be
        its prefix); default names ``task<i>`` are used for added tasks when omitted.
        """
        old, new = self.num_tasks, int(new_num_tasks)
        if new < old:
            raise ValueError(f"cannot shrink an accuracy matrix from {old} to {new} tasks")
        if new_names is None:
            names = self._names + _default_names(old, new)
        else:
            given = tuple(str(n) for n in new_names)
            if len(given) == new and given[:old] == self._names:
                names = given
            elif len(given) == new - old:
                names = self._names + given
            else:
                raise ValueError(
                    f"new_names must list the {new - old} added tasks or all {new} tasks "
                    f"(starting with {list(self._names)}), got {list(given)}"
                )
        self._names = _check_names(names, new)
        grown = np.full((new, new), np.nan)
        grown[:old, :old] = self._R
        self._R = grown
        return self

    def summary(self) -> dict[str, float]:
        """Matrix summaries at the last completed step; see :func:`summarize_matrix`."""
        return summarize_matrix(self._R)

    def to_frame(self):
        """pandas DataFrame: rows ``"after <task>"``, columns task names."""
        import pandas as pd

        return pd.DataFrame(
            self._R.copy(),
            index=[f"{self.ROW_PREFIX}{n}" for n in self._names],
            columns=list(self._names),
        )

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write the matrix as CSV (empty cells for NaN, floats at full precision) atomically."""
        from lorax_cil.utils import atomic_write_text

        return atomic_write_text(path, self.to_frame().to_csv())

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> AccuracyMatrix:
        """Read a matrix written by :meth:`to_csv`."""
        import pandas as pd

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"accuracy matrix CSV not found: {path}")
        df = pd.read_csv(path, index_col=0, dtype={0: str})
        names = [str(c) for c in df.columns]
        rows = [f"{cls.ROW_PREFIX}{n}" for n in names]
        if [str(r) for r in df.index] != rows:
            raise ValueError(f"{path}: row labels {list(df.index)} do not match columns {rows}")
        return cls.from_array(df.to_numpy(dtype=np.float64), task_names=names)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AccuracyMatrix):
            return NotImplemented
        return self._names == other._names and np.array_equal(self._R, other._R, equal_nan=True)

    def __repr__(self) -> str:
        return f"AccuracyMatrix(num_tasks={self.num_tasks}, last_step={self.last_step})"


def _default_names(start: int, stop: int) -> tuple[str, ...]:
    return tuple(f"task{i}" for i in range(start, stop))
