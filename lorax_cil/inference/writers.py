"""Streaming writers for prediction rows: CSV, JSON and JSON Lines.

Rows are written as they come, so a long prediction run keeps its results even if it is stopped.

* ``csv``: a header line of column names, then one line per row; empty cells for ``None``;
  probabilities with 6 decimals.
* ``json``: one document ``{"model": {...}, "columns": [...], "predictions": [row, ...]}``;
  ``model`` describes the model (identity, classes, threshold and its source, score definition).
* ``jsonl``: one JSON object per line (rows only).

NaN values are written as empty cells (CSV) or ``null`` (JSON).
"""

from __future__ import annotations

import csv
import json
import math
from typing import Any, Mapping, Sequence, TextIO

__all__ = ["FORMATS", "RowWriter", "open_row_writer"]

FORMATS = ("csv", "json", "jsonl")


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


class RowWriter:
    """Write prediction rows to a text stream in one of :data:`FORMATS`.

    Args:
        stream: an open text stream (``sys.stdout`` or a file).
        fmt: ``csv``, ``json`` or ``jsonl``.
        columns: the row keys, in output order.
        header: the ``model`` object of JSON output.
    """

    def __init__(self, *, stream: TextIO, fmt: str, columns: Sequence[str],
                 header: Mapping[str, Any] | None = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown output format {fmt!r}; valid: {list(FORMATS)}")
        self.stream, self.fmt, self.columns = stream, fmt, list(columns)
        self.count = 0
        if fmt == "csv":
            self._csv = csv.writer(stream, lineterminator="\n")
            self._csv.writerow(self.columns)
        elif fmt == "json":
            head = json.dumps(dict(header or {}), sort_keys=True, default=str)
            stream.write(f'{{"model": {head},\n "columns": {json.dumps(self.columns)},\n'
                         ' "predictions": [')

    def write(self, row: Mapping[str, Any]) -> None:
        """Write one row (keys outside :attr:`columns` are ignored)."""
        values = [_clean(row.get(c)) for c in self.columns]
        if self.fmt == "csv":
            self._csv.writerow(["" if v is None else f"{v:.6f}" if isinstance(v, float) else v
                                for v in values])
        else:
            text = json.dumps(dict(zip(self.columns, values)), default=str)
            if self.fmt == "jsonl":
                self.stream.write(text + "\n")
            else:
                self.stream.write(("\n  " if self.count == 0 else ",\n  ") + text)
        self.count += 1

    def close(self) -> None:
        """Finish the document (JSON) and flush; the stream itself stays open."""
        if self.fmt == "json":
            self.stream.write("\n ]}\n" if self.count else "]}\n")
        self.stream.flush()


def open_row_writer(stream: TextIO, fmt: str, columns: Sequence[str],
                    header: Mapping[str, Any] | None = None) -> RowWriter:
    """A :class:`RowWriter` (the header is written immediately)."""
    return RowWriter(stream=stream, fmt=fmt, columns=columns, header=header)
