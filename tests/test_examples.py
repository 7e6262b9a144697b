"""Every example script runs on tiny synthetic data (each in its own process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: script -> extra arguments that keep it small; every file in examples/ must be listed.
EXAMPLES = {
    "lorax_avalanche.py": ["--backbone", "vit-test", "--epochs", "1", "--quiet"],
    "compare_baselines.py": ["--strategies", "finetune,simplecil"],
    "custom_strategy.py": [],
    "predict_folder.py": ["--make-demo-run", "--model", "demo-run"],
    "mole_detector.py": ["--out", "mole-out"],
    "merge_specialists.py": ["--out", "merge-out"],
}


def test_every_example_is_covered():
    found = {p.name for p in (ROOT / "examples").glob("*.py")}
    assert found <= set(EXAMPLES) | set(os.environ.get("LORAX_EXTRA_EXAMPLES", "").split()), (
        f"examples without a test entry: {sorted(found - set(EXAMPLES))}")


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_runs(script, tmp_path):
    if not (ROOT / "examples" / script).is_file():
        pytest.fail(f"examples/{script} is listed but missing")
    args = list(EXAMPLES[script])
    if script in ("lorax_avalanche.py", "compare_baselines.py", "custom_strategy.py"):
        args += ["--data", str(tmp_path / "data")]
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    if script == "lorax_avalanche.py":
        assert "summary:" in proc.stdout and "exemplars per class:" in proc.stdout
    if script == "compare_baselines.py":
        assert "| simplecil" in proc.stdout and (tmp_path / "runs/compare-example/comparison.md"
                                                  ).is_file()
    if script == "custom_strategy.py":
        assert "| mas " in proc.stdout
    if script == "predict_folder.py":
        assert "predicted 8 image(s)" in proc.stdout and (tmp_path / "predictions.csv").is_file()
    if script == "mole_detector.py":
        assert "trained:" in proc.stdout and "AP " in proc.stdout
        assert (tmp_path / "mole-out/detector/MODEL_CARD.md").is_file()
    if script == "merge_specialists.py":
        assert "AUC" in proc.stdout and "(held out)" in proc.stdout
        assert "then added 'jpeg-blocks': ['nn-upsample', 'spectral-peaks', 'jpeg-blocks']" in proc.stdout
        assert (tmp_path / "merge-out/merged-r2m+add/gram/meta.json").is_file()
