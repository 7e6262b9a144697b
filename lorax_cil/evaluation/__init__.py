"""Evaluation: pure metrics over predictions and accuracy matrices, reports and plots.

This package imports only NumPy and its own modules (``tests/test_layers.py`` checks it):
pandas and matplotlib are imported inside the report and plot functions. The Avalanche plugin
metrics, which need avalanche and torch, live in :mod:`lorax_cil.training.avalanche_metrics`;
the speed benchmark in :mod:`lorax_cil.bench.speed`.
"""

from __future__ import annotations

from lorax_cil.evaluation.metrics import (
    AccuracyMatrix,
    accuracy,
    average_accuracy,
    average_accuracy_per_step,
    average_precision,
    backward_transfer,
    binary_correct,
    evaluate_predictions,
    fakeness_score,
    forgetting,
    last_completed_step,
    multi_real_correct,
    prediction_metrics,
    roc_auc,
    step_average_accuracy,
    strict_correct,
    summarize_matrix,
)
from lorax_cil.evaluation.plots import (
    plot_accuracy_matrix,
    plot_accuracy_over_steps,
    plot_average_accuracy_curves,
    plot_matrices_side_by_side,
)
from lorax_cil.evaluation.reports import (
    aggregate_seeds,
    format_matrix,
    mean_std_table,
    summary_table,
    to_markdown,
)

__all__ = [
    "AccuracyMatrix",
    "accuracy",
    "aggregate_seeds",
    "average_accuracy",
    "average_accuracy_per_step",
    "average_precision",
    "backward_transfer",
    "binary_correct",
    "evaluate_predictions",
    "fakeness_score",
    "forgetting",
    "format_matrix",
    "last_completed_step",
    "mean_std_table",
    "multi_real_correct",
    "plot_accuracy_matrix",
    "plot_accuracy_over_steps",
    "plot_average_accuracy_curves",
    "plot_matrices_side_by_side",
    "prediction_metrics",
    "roc_auc",
    "step_average_accuracy",
    "strict_correct",
    "summarize_matrix",
    "summary_table",
    "to_markdown",
]
