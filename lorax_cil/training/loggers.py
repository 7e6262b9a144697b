"""Experiment loggers for a run: TensorBoard, CSV and Weights & Biases through Avalanche.

``--logger tensorboard[:DIR]``, ``--logger csv[:DIR]`` and ``--logger wandb[:PROJECT]``
(repeatable; off by default) give :class:`~lorax_cil.training.runner.Run` a list of
:class:`LoggerSpec`. The run then builds Avalanche's own loggers (``TensorboardLogger``,
``CSVLogger``, ``WandBLogger``) and an ``EvaluationPlugin`` with Avalanche's epoch metrics, so
what they receive is:

* from the evaluation plugin, per training epoch: ``Top1_Acc_Epoch/train_phase/train_stream/...``
  and ``Loss_Epoch/train_phase/train_stream/...`` (running accuracy and loss of the epoch);
* from the run, after every task ``j`` (x = ``j``): one scalar per evaluated task and accuracy
  type, ``AccuracyMatrix/<metric>/<task>`` (row ``j`` of the accuracy matrices, the run's own
  evaluation), and ``AA/<metric>``, for ``multi_real``, ``binary`` and ``strict``;
* from the progress plugin, per epoch (x = epochs so far in the run): ``Epoch/lr``,
  ``Epoch/images_per_s`` and ``Epoch/seconds``.

Avalanche's ``CSVLogger`` writes only the epoch metrics (``training_results.csv``); the
accuracy matrices are in the run's own ``accuracy_<metric>.csv``. A resumed run appends to the
CSV files (Avalanche's logger would truncate them) and adds event files to the TensorBoard
folder. Avalanche is imported only when a logger is requested.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["LOGGER_KINDS", "LoggerSpec", "parse_logger_spec", "check_logger_packages",
           "RunLoggers"]

log = logging.getLogger(__name__)

#: kind -> what the optional ``:VALUE`` names.
LOGGER_KINDS = {"tensorboard": "log folder (default <run>/tensorboard)",
                "csv": "log folder (default <run>/csv)",
                "wandb": "W&B project (default lorax-cil)"}


@dataclass(frozen=True)
class LoggerSpec:
    """One ``--logger`` value: ``kind`` and the optional folder or project."""

    kind: str
    target: str | None = None

    def __str__(self) -> str:
        return self.kind + (f":{self.target}" if self.target else "")


def parse_logger_spec(text: str) -> LoggerSpec:
    """``"tensorboard"``, ``"tensorboard:runs/tb"``, ``"csv"``, ``"wandb:my-project"``, ...

    Raises:
        ValueError: an unknown kind (the message lists the valid ones) or an empty target.
    """
    kind, sep, target = str(text).partition(":")
    kind = kind.strip().lower()
    if kind not in LOGGER_KINDS:
        valid = ", ".join(f"{k}[:{'PROJECT' if k == 'wandb' else 'DIR'}]" for k in LOGGER_KINDS)
        raise ValueError(f"--logger {text!r}: unknown logger {kind!r}; valid: {valid}")
    if sep and not target.strip():
        raise ValueError(f"--logger {text!r}: nothing after ':'")
    return LoggerSpec(kind, target.strip() or None)


def _require(module: str, kind: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"--logger {kind} needs the {module!r} package, which cannot be "
                         f"imported ({exc}); install it (pip install {module}) or drop the "
                         "logger") from None


class RunLoggers:
    """The Avalanche loggers and evaluation plugin of one run (rank 0 only).

    Args:
        specs: the requested loggers.
        run_dir: the run directory (default folders live in it).
        run_name: the W&B run name.
        config: the resolved configuration (sent to W&B).
    """

    def __init__(self, specs: Sequence[LoggerSpec], *, run_dir: str | Path, run_name: str,
                 config: Mapping[str, Any] | None = None) -> None:
        self.specs = list(specs)
        self.run_dir = Path(run_dir)
        self.loggers: list[Any] = []
        self._csv: list[tuple[Path, Path]] = []  # (session folder, final folder)
        for spec in self.specs:
            self.loggers.append(self._build(spec, run_name, config))

    def _build(self, spec: LoggerSpec, run_name: str, config: Mapping[str, Any] | None) -> Any:
        if spec.kind == "tensorboard":
            _require("tensorboard", "tensorboard")
            from avalanche.logging import TensorboardLogger

            folder = Path(spec.target) if spec.target else self.run_dir / "tensorboard"
            return TensorboardLogger(tb_log_dir=folder)
        if spec.kind == "csv":
            from avalanche.logging import CSVLogger

            folder = Path(spec.target) if spec.target else self.run_dir / "csv"
            session = folder / ".session"
            shutil.rmtree(session, ignore_errors=True)
            self._csv.append((session, folder))
            return CSVLogger(log_folder=str(session))
        _require("wandb", "wandb")
        from avalanche.logging import WandBLogger

        return WandBLogger(project_name=spec.target or "lorax-cil", run_name=run_name,
                           dir=str(self.run_dir), config=dict(config or {}), save_code=False)

    def evaluator(self) -> Any:
        """Avalanche's ``EvaluationPlugin``: epoch accuracy and loss to every logger."""
        from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
        from avalanche.training.plugins import EvaluationPlugin

        return EvaluationPlugin(accuracy_metrics(epoch=True), loss_metrics(epoch=True),
                                loggers=self.loggers)

    def log_step(self, j: int, matrices: Mapping[str, Any], task_names: Sequence[str],
                 epochs: Sequence[Mapping[str, Any]] = (), first_epoch: int = 0,
                 head_matrices: Mapping[str, Any] | None = None) -> None:
        """Row ``j`` of the accuracy matrices (one scalar per task), the AA after task ``j``,
        and the per-epoch learning rate, speed and time of the task (x = ``first_epoch``, the
        epochs the run trained before this task, and on). ``head_matrices``: the linear head's,
        recorded beside a class-mean read-out, logged as ``<metric>-head``."""
        values: list[tuple[str, float, int]] = []
        sets = [("", matrices)] + ([("-head", head_matrices)] if head_matrices else [])
        for suffix, mats in sets:
            for metric in ("multi_real", "binary", "strict"):
                mat, name = mats[metric], metric + suffix
                for i in range(j + 1):
                    v = float(mat.matrix[j, i])
                    if v == v:  # NaN: not evaluated (e.g. joint training before its last task)
                        values.append((f"AccuracyMatrix/{name}/{task_names[i]}", v, j))
                row = [float(mat.matrix[j, i]) for i in range(j + 1)]
                row = [v for v in row if v == v]
                if row:
                    values.append((f"AA/{name}", sum(row) / len(row), j))
        for e, rec in enumerate(epochs):
            for key in ("lr", "images_per_s", "seconds"):
                if rec.get(key) is not None:
                    values.append((f"Epoch/{key}", float(rec[key]), first_epoch + e))
        for logger in self.loggers:
            for name, value, x in values:
                logger.log_single_metric(name, value, x)

    def close(self) -> None:
        """Flush and close every logger; CSV rows of this session are appended to the files."""
        for logger in self.loggers:
            if hasattr(logger, "writer"):
                logger.writer.flush()
                logger.writer.close()
            elif hasattr(logger, "close"):
                logger.close()
            elif hasattr(logger, "wandb"):
                logger.wandb.finish()
        for session, folder in self._csv:
            for name in ("training_results.csv", "eval_results.csv"):
                src, dst = session / name, folder / name
                if not src.is_file():
                    continue
                lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
                if dst.is_file():
                    with open(dst, "a", encoding="utf-8") as fh:
                        fh.writelines(lines[1:])
                else:
                    dst.write_text("".join(lines), encoding="utf-8")
            shutil.rmtree(session, ignore_errors=True)
        self.loggers = []


def check_logger_packages(specs: Sequence[LoggerSpec]) -> None:
    """Raise ``ValueError`` naming a requested logger whose package cannot be imported."""
    for spec in specs:
        if spec.kind in ("tensorboard", "wandb"):
            _require(spec.kind, spec.kind)
