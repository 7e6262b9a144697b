"""Per-epoch training progress: an Avalanche-style plugin (also usable without Avalanche).

:class:`EpochProgress` follows Avalanche's plugin protocol by its method names
(``before_training_exp``, ``before_training_epoch``, ``after_training_iteration``,
``after_training_epoch``), so any Avalanche strategy accepts it in ``plugins=[...]``: the LoRAX
family, the Avalanche baselines and a user's own strategy alike. Code that runs its own loop (the
detector trainer) calls :meth:`EpochProgress.start_epoch`, :meth:`~EpochProgress.update` and
:meth:`~EpochProgress.end_epoch` directly.

What it shows, per epoch:

* ``display="bar"``: a tqdm bar over the epoch's batches with the running loss, the learning
  rate, images per second and the estimated time left for the whole task (all its epochs);
* ``display="lines"``: one plain line per epoch through ``say`` (for logs, CI, no TTY);
* ``display="off"``: nothing (``-q``); the records are still kept.

``"auto"`` picks ``bar`` when standard error is a terminal and ``lines`` otherwise.

Every finished epoch is recorded (:attr:`EpochProgress.records`): epoch, mean loss, learning
rate, images, seconds, images per second. :class:`~lorax_cil.training.runner.Run` writes them to
``steps.jsonl`` (``epochs`` of each task's record).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable

__all__ = ["EpochProgress", "resolve_display"]

logger = logging.getLogger(__name__)

DISPLAYS = ("auto", "bar", "lines", "off")


def resolve_display(display: str, stream: Any = None) -> str:
    """``auto`` -> ``bar`` on a terminal, else ``lines``; other values are checked."""
    if display not in DISPLAYS:
        raise ValueError(f"progress display must be one of {list(DISPLAYS)}, got {display!r}")
    if display != "auto":
        return display
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


def _fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class EpochProgress:
    """Per-epoch progress bar or log line, and per-epoch records.

    Args:
        display: ``auto``, ``bar``, ``lines`` or ``off``.
        say: where ``lines`` go (default: ``logging.info``).
        label: prefix of the bar and the lines (e.g. the task name is added per task).
        stream: the bar's stream (default: standard error).

    A strategy that trains nothing may ignore this plugin (:attr:`optional`).
    """

    optional = True

    def __init__(self, *, display: str = "auto", say: Callable[[str], None] | None = None,
                 label: str = "", stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.display = resolve_display(display, self.stream)
        self.say = say or (lambda msg: logger.info("%s", msg))
        self.label = label
        self.records: list[dict[str, Any]] = []
        self._bar = None
        self._epoch: dict[str, Any] | None = None
        self._task_start = 0.0

    # --- generic API --------------------------------------------------------------------------
    def start_task(self, label: str = "") -> None:
        """A new task: its label prefixes the bar; its time estimate starts now."""
        self.label = label
        self._task_start = time.perf_counter()

    def start_epoch(self, epoch: int, epochs: int, *, steps: int | None = None,
                    lr: float | None = None) -> None:
        """Epoch ``epoch`` (0-based) of ``epochs`` starts; ``steps`` batches are expected."""
        if not self._task_start or epoch == 0:
            self._task_start = time.perf_counter()
        self._epoch = {"epoch": int(epoch), "epochs": int(epochs), "lr": lr, "images": 0,
                       "batches": 0, "loss_sum": 0.0, "loss_n": 0, "start": time.perf_counter()}
        if self.display == "bar":
            from tqdm.auto import tqdm

            desc = f"{self.label + ' ' if self.label else ''}epoch {epoch + 1}/{epochs}"
            self._bar = tqdm(total=steps, desc=desc, unit="batch", file=self.stream,
                             leave=True, dynamic_ncols=True)

    def update(self, n: int, loss: Any) -> None:
        """One batch of ``n`` images with mean loss ``loss`` (a float or a 0-d tensor)."""
        e = self._epoch
        if e is None:
            return
        value = float(loss.detach()) if hasattr(loss, "detach") else float(loss)
        e["images"] += int(n)
        e["batches"] += 1
        e["loss_sum"] += value * int(n)
        e["loss_n"] += int(n)
        if self._bar is not None:
            n = self._bar.n + 1
            if n == 1 or n % 5 == 0 or n == self._bar.total:
                self._bar.set_postfix_str(self._postfix(done=n), refresh=False)
            self._bar.update(1)

    def end_epoch(self, extra: str = "") -> dict[str, Any]:
        """Close the epoch; returns (and keeps) its record. ``extra`` is appended to the line."""
        e = self._epoch
        if e is None:
            return {}
        seconds = time.perf_counter() - e["start"]
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=True)
            self._bar.close()
            self._bar = None
        rec = {"epoch": e["epoch"], "loss": e["loss_sum"] / e["loss_n"] if e["loss_n"] else None,
               "lr": e["lr"], "images": e["images"], "batches": e["batches"],
               "seconds": round(seconds, 3),
               "images_per_s": round(e["images"] / seconds, 2) if seconds > 0 else None}
        self.records.append(rec)
        if self.display == "lines":
            loss = "n/a" if rec["loss"] is None else f"{rec['loss']:.4f}"
            lr = "" if e["lr"] is None else f", lr {e['lr']:.3g}"
            self.say(f"{self.label + ' ' if self.label else ''}epoch {e['epoch'] + 1}/"
                     f"{e['epochs']}: loss {loss}{lr}, {rec['images_per_s'] or 0:.1f} img/s, "
                     f"{seconds:.1f} s, {_fmt_seconds(self._task_left())} left"
                     f"{' (' + extra + ')' if extra else ''}")
        self._epoch = None
        return rec

    def take_records(self) -> list[dict[str, Any]]:
        """The records since the last call (and forget them)."""
        out, self.records = self.records, []
        return out

    def _task_left(self, done: int | None = None) -> float:
        """Estimated seconds left in the task: elapsed time per finished batch fraction
        (``done``: batches finished in this epoch, default the bar's count)."""
        e = self._epoch
        if e is None or not e["epochs"]:
            return 0.0
        done_epochs = e["epoch"]
        total = self._bar.total if self._bar is not None else None
        n = done if done is not None else (self._bar.n if self._bar is not None else 0)
        frac = (n / total) if (self._bar is not None and total) else 1.0
        done = done_epochs + frac
        elapsed = time.perf_counter() - self._task_start
        return elapsed / done * (e["epochs"] - done) if done > 0 else 0.0

    def _postfix(self, done: int | None = None) -> str:
        e = self._epoch
        loss = e["loss_sum"] / e["loss_n"] if e["loss_n"] else float("nan")
        rate = e["images"] / max(time.perf_counter() - e["start"], 1e-9)
        lr = "" if e["lr"] is None else f" lr={e['lr']:.3g}"
        return (f"loss={loss:.4f}{lr} {rate:.1f} img/s "
                f"task left {_fmt_seconds(self._task_left(done))}")

    # --- Avalanche plugin hooks ---------------------------------------------------------------
    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._task_start = time.perf_counter()

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        try:
            steps = len(strategy.dataloader)
        except TypeError:
            steps = None
        opt = getattr(strategy, "optimizer", None)
        lr = float(opt.param_groups[0]["lr"]) if opt is not None and opt.param_groups else None
        self.start_epoch(int(strategy.clock.train_exp_epochs), int(strategy.train_epochs),
                         steps=steps, lr=lr)

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self.update(len(strategy.mb_y), strategy.loss)

    def after_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        self.end_epoch()
