"""Reports (pandas tables, Markdown, terminal text) and plots (PNG files)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from lorax_cil.evaluation import (
    aggregate_seeds,
    format_matrix,
    mean_std_table,
    plot_accuracy_matrix,
    plot_accuracy_over_steps,
    plot_average_accuracy_curves,
    plot_matrices_side_by_side,
    summary_table,
    to_markdown,
)

nan = float("nan")
R = np.array([[0.9, nan, nan], [0.95, 0.8, nan], [0.5, 0.7, 0.9]])
NAMES = ["gaugan", "biggan", "wild"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_package_import_is_cheap():
    code = (
        "import sys, lorax_cil.evaluation; "
        "bad = [m for m in ('torch', 'avalanche', 'matplotlib', 'pandas') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_summary_table_flattens_and_aligns():
    df = summary_table(
        {
            "lorax": {"multi_real": {"aa": 0.9, "bwt": -0.01}, "memory": 500},
            "naive": {"multi_real": {"aa": 0.5}, "extra": "x"},
        }
    )
    assert list(df.index) == ["lorax", "naive"]
    assert list(df.columns) == ["multi_real.aa", "multi_real.bwt", "memory", "extra"]
    assert df.loc["lorax", "multi_real.aa"] == 0.9
    assert math.isnan(df.loc["naive", "multi_real.bwt"])


def test_aggregate_seeds_mean_std():
    df = pd.DataFrame(
        {
            "strategy": ["lorax", "lorax", "lorax", "naive"],
            "seed": [0, 1, 2, 0],
            "aa": [0.8, 0.9, 1.0, 0.4],
            "bwt": [-0.1, -0.2, -0.3, nan],
        }
    )
    agg = aggregate_seeds(df, "strategy")
    assert list(agg.columns) == ["strategy", "n", "aa_mean", "aa_std", "bwt_mean", "bwt_std"]
    lorax = agg.set_index("strategy").loc["lorax"]
    assert lorax["n"] == 3
    assert lorax["aa_mean"] == pytest.approx(0.9)
    assert lorax["aa_std"] == pytest.approx(0.1)  # sample std of 0.8, 0.9, 1.0
    assert lorax["bwt_mean"] == pytest.approx(-0.2)
    naive = agg.set_index("strategy").loc["naive"]
    assert naive["aa_mean"] == pytest.approx(0.4) and math.isnan(naive["aa_std"])  # one seed
    assert math.isnan(naive["bwt_mean"])
    cells = mean_std_table(agg, ["aa"], floatfmt=".1f", scale=100).set_index("strategy")["aa"]
    assert cells["lorax"] == "90.0 ± 10.0" and cells["naive"] == "40.0"
    with pytest.raises(ValueError, match="not in the table"):
        aggregate_seeds(df, "scenario")


def test_to_markdown_without_tabulate():
    df = pd.DataFrame({"name": ["a|b", "c"], "aa": [0.91234, nan], "n": [3, 10]},
                      index=pd.Index(["r1", "r2"], name="run"))
    text = to_markdown(df, floatfmt=".2f")
    lines = text.splitlines()
    assert lines[0] == "| run | name |   aa |   n |"
    assert lines[1] == "| --- | ---- | ---: | --: |"
    assert lines[2] == "| r1  | a\\|b | 0.91 |   3 |"
    assert lines[3] == "| r2  | c    |  n/a |  10 |"
    assert to_markdown(df, index=False).splitlines()[0].startswith("| name")


def test_format_matrix_text():
    text = format_matrix(R, NAMES, floatfmt=".2f")
    lines = text.splitlines()
    assert lines[0].split() == NAMES
    assert lines[1].split() == ["after", "gaugan", "0.90", "-", "-"]
    assert lines[3].split() == ["after", "wild", "0.50", "0.70", "0.90"]
    assert len({len(line) for line in lines[1:]}) == 1  # aligned rows


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_plots_write_png(tmp_path):
    caption = "Multi-real accuracy, memory 500, seed 0. Blank cells: task not trained yet."
    paths = [
        plot_accuracy_matrix(R, NAMES, tmp_path / "m.png", "matrix", caption),
        plot_accuracy_over_steps(R, NAMES, tmp_path / "s.png", "steps", caption),
        plot_average_accuracy_curves({"lorax": R, "naive": R[:2, :2] * 0.5}, tmp_path / "c.png",
                                     names=NAMES, title="AA", caption=caption),
        plot_matrices_side_by_side({"lorax": R, "naive": R * 0.5}, tmp_path / "deep" / "x.png",
                                   names=NAMES, caption=caption),
        plot_accuracy_matrix(np.full((2, 2), nan), None, tmp_path / "empty.png"),
    ]
    for path in paths:
        assert path.exists() and _is_png(path), path
    with pytest.raises(ValueError, match="names"):
        plot_accuracy_matrix(R, ["only-one", "two"], tmp_path / "bad.png")
