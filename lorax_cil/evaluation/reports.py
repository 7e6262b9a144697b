"""Tables from metric results: run summaries, seed aggregation, Markdown and terminal text.

pandas is imported inside the functions, so importing this module stays cheap. The Markdown
formatter is self-contained (no ``tabulate`` dependency).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np

__all__ = [
    "summary_table",
    "aggregate_seeds",
    "mean_std_table",
    "to_markdown",
    "format_matrix",
]


def summary_table(runs: Mapping[str, Mapping[str, Any]], *, index_name: str = "run"):
    """One row per run from ``{run_name: summary_dict}``.

    Nested dicts are flattened with dots (``{"multi_real": {"aa": .9}}`` gives column
    ``multi_real.aa``). Columns keep the order of first appearance; missing values are NaN.

    Returns:
        pandas.DataFrame indexed by run name.
    """
    import pandas as pd

    from lorax_cil.utils import flatten_dict

    rows = {str(name): flatten_dict(summary) for name, summary in runs.items()}
    columns: list[str] = []
    for flat in rows.values():
        columns.extend(c for c in flat if c not in columns)
    df = pd.DataFrame.from_dict(rows, orient="index", columns=columns or None)
    df.index.name = index_name
    return df


def aggregate_seeds(df, by: str | Sequence[str], metrics: Sequence[str] | None = None):
    """Mean and sample standard deviation (ddof=1) of ``metrics`` over rows grouped by ``by``.

    Args:
        df: one row per (configuration, seed).
        by: column name(s) identifying a configuration (e.g. ``["strategy", "scenario"]``).
        metrics: columns to aggregate; default every numeric column not in ``by`` except ``seed``.

    Returns:
        DataFrame with the ``by`` columns, ``n`` (rows per group) and ``<metric>_mean``,
        ``<metric>_std`` per metric. ``std`` is NaN for a single seed; NaN values are skipped.
    """
    import pandas as pd

    keys = [by] if isinstance(by, str) else list(by)
    missing = [k for k in keys if k not in df.columns]
    if missing:
        raise ValueError(
            f"group columns {missing} not in the table; columns are {list(df.columns)}"
        )
    if metrics is None:
        metrics = [
            c for c in df.columns
            if c not in keys and c != "seed" and pd.api.types.is_numeric_dtype(df[c])
        ]
    else:
        metrics = list(metrics)
        unknown = [m for m in metrics if m not in df.columns]
        if unknown:
            raise ValueError(f"metrics {unknown} not in the table; columns are {list(df.columns)}")
    grouped = df.groupby(keys, sort=True, dropna=False)
    out = grouped.size().rename("n").to_frame()
    for m in metrics:
        values = grouped[m]
        out[f"{m}_mean"] = values.mean()
        out[f"{m}_std"] = values.std(ddof=1)
    return out.reset_index()


def mean_std_table(agg, metrics: Sequence[str], *, floatfmt: str = ".3f", scale: float = 1.0):
    """Cells ``"mean ± std"`` from :func:`aggregate_seeds` output (``scale=100`` for percent)."""
    out = agg.drop(columns=[c for c in agg.columns if c.endswith(("_mean", "_std"))]).copy()
    for m in metrics:
        mean, std = agg[f"{m}_mean"] * scale, agg[f"{m}_std"] * scale
        out[m] = [
            _fmt(a, floatfmt) if _isnan(s) else f"{_fmt(a, floatfmt)} ± {_fmt(s, floatfmt)}"
            for a, s in zip(mean, std)
        ]
    return out


def _isnan(x: Any) -> bool:
    return isinstance(x, Real) and math.isnan(float(x))


def _fmt(x: Any, floatfmt: str, nan: str = "n/a") -> str:
    if x is None or _isnan(x):
        return nan
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, Integral):
        return str(int(x))
    if isinstance(x, Real):
        return format(float(x), floatfmt)
    return str(x)


def _cell(x: Any, floatfmt: str, nan: str) -> str:
    return _fmt(x, floatfmt, nan).replace("|", "\\|").replace("\n", " ")


def to_markdown(df, floatfmt: str = ".4f", *, index: bool = True, nan: str = "n/a") -> str:
    """Render a DataFrame as a GitHub Markdown table (no ``tabulate`` needed).

    Floats use ``floatfmt``; NaN/None show as ``nan`` (default ``n/a``); ``|`` in cells is
    escaped; numeric columns are right-aligned, others left-aligned; columns are padded.
    """
    import pandas as pd

    headers = [str(c) for c in df.columns]
    columns = [list(df[c]) for c in df.columns]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
               for c in df.columns]
    if index:
        headers.insert(0, "" if df.index.name is None else str(df.index.name))
        columns.insert(0, list(df.index))
        numeric.insert(0, False)
    cells = [[_cell(v, floatfmt, nan) for v in col] for col in columns]
    widths = [max([3, len(h)] + [len(v) for v in col]) for h, col in zip(headers, cells)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "| " + " | ".join(parts) + " |"

    rule = ["-" * (w - 1) + ":" if num else "-" * w for w, num in zip(widths, numeric)]
    lines = [line([_cell(h, floatfmt, nan) for h in headers]), "| " + " | ".join(rule) + " |"]
    lines += [line(row) for row in zip(*cells)] if cells and cells[0] else []
    return "\n".join(lines) + "\n"


def format_matrix(
    R: Any,
    names: Sequence[str] | None = None,
    *,
    floatfmt: str = ".3f",
    nan: str = "-",
    scale: float = 1.0,
) -> str:
    """Fixed-width text of an accuracy matrix for a terminal.

    Rows are ``after <name>`` (training step), columns the evaluated tasks; NaN prints as
    ``nan`` (default ``-``).
    """
    m = np.asarray(R, dtype=np.float64) * scale
    if m.ndim != 2:
        raise ValueError(f"accuracy matrix must be 2-D, got shape {m.shape}")
    if names is None:
        names = [f"task{i}" for i in range(m.shape[1])]
    names = [str(n) for n in names]
    if len(names) != m.shape[1]:
        raise ValueError(f"{len(names)} names for a matrix with {m.shape[1]} columns")
    row_labels = [f"after {names[j]}" if j < len(names) else f"step {j}" for j in range(m.shape[0])]
    body = [[nan if math.isnan(v) else format(v, floatfmt) for v in row] for row in m]
    label_w = max([0] + [len(r) for r in row_labels])
    col_w = [max([len(n)] + [len(row[i]) for row in body]) for i, n in enumerate(names)]
    head = " " * label_w + "  " + "  ".join(n.rjust(w) for n, w in zip(names, col_w))
    lines = [head.rstrip()]
    for label, row in zip(row_labels, body):
        cells = "  ".join(v.rjust(w) for v, w in zip(row, col_w))
        lines.append(label.ljust(label_w) + "  " + cells)
    return "\n".join(lines) + "\n"
