"""How long one task trains: epochs, raised to a minimum number of optimizer steps on small tasks.

Papers quote epochs for tasks of thousands of images (CDDB: 50 epochs of a few hundred steps
each). A new generator met in practice often brings a few dozen images: 28 images plus a small
memory at batch 32 is *one* optimizer step per epoch, so "10 epochs" would be 10 steps, most of
them inside the warm-up. :func:`plan_task_length` turns the configured protocol into the
schedule of one task:

* ``steps_per_epoch = ceil(samples / batch_size)`` (the training set is the task's data plus the
  exemplar memory; the last partial batch is a step);
* ``train.min_steps_per_task = S > 0``: when ``epochs x steps_per_epoch < S`` the task trains
  ``ceil(S / steps_per_epoch)`` epochs instead (``0``: the epochs as given, the official
  protocol). A large task is never shortened;
* warm-up: ``train.warmup_steps`` (when set) is converted to whole epochs,
  ``ceil(warmup_steps / steps_per_epoch)``; otherwise ``train.warmup_epochs`` is kept, and when
  the epochs were raised it is scaled with them so the warm-up keeps its fraction of the task
  (5 of 50 epochs stays a tenth). The learning rate still changes once per epoch, as in the
  official code; on a raised task an epoch is one or two steps, so the schedule is per step.

Every derived value and the reason for it are kept in :class:`TaskLength` (written to
``steps.jsonl`` and logged), so a configured value is never changed silently.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["TaskLength", "plan_task_length"]


@dataclass(frozen=True)
class TaskLength:
    """The schedule of one task and how it was derived from the configuration.

    Attributes:
        samples: training samples of the task (its data plus the memory).
        batch_size: training batch size.
        steps_per_epoch: optimizer steps per epoch.
        epochs: epochs the task trains.
        warmup_epochs: warm-up epochs the task uses.
        steps: optimizer steps of the task (``epochs x steps_per_epoch``).
        requested_epochs: ``train.epochs``.
        requested_warmup_epochs: ``train.warmup_epochs``.
        min_steps: ``train.min_steps_per_task``.
        warmup_steps: ``train.warmup_steps`` (``None``: warm-up given in epochs).
        derived: human-readable reasons for every value that differs from the configuration
            (empty when the task trains exactly as configured).
    """

    samples: int
    batch_size: int
    steps_per_epoch: int
    epochs: int
    warmup_epochs: int
    steps: int
    requested_epochs: int
    requested_warmup_epochs: int
    min_steps: int
    warmup_steps: int | None
    derived: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["derived"] = list(self.derived)
        return d

    def describe(self) -> str:
        """One line for the log and the progress output."""
        text = (f"{self.samples} samples, {self.steps_per_epoch} step(s)/epoch, {self.epochs} "
                f"epochs = {self.steps} steps, warm-up {self.warmup_epochs} epochs")
        return text + (" (" + "; ".join(self.derived) + ")" if self.derived else "")


def plan_task_length(samples: int, *, batch_size: int, epochs: int, warmup_epochs: int,
                     min_steps: int = 0, warmup_steps: int | None = None) -> TaskLength:
    """The schedule of a task of ``samples`` training samples (see the module docstring).

    Raises:
        ValueError: a non-positive batch size or epoch count, or a negative minimum/warm-up.
    """
    if batch_size < 1 or epochs < 1:
        raise ValueError(f"batch size and epochs must be >= 1, got {batch_size} and {epochs}")
    if min_steps < 0 or warmup_epochs < 0 or (warmup_steps is not None and warmup_steps < 0):
        raise ValueError("train.min_steps_per_task, train.warmup_epochs and train.warmup_steps "
                         "must be >= 0")
    samples = int(samples)
    per_epoch = max(1, math.ceil(samples / batch_size))
    derived: list[str] = []
    eff = int(epochs)
    if min_steps > 0 and eff * per_epoch < min_steps:
        eff = math.ceil(min_steps / per_epoch)
        derived.append(f"epochs {epochs} -> {eff}: {epochs} epoch(s) x {per_epoch} step(s) < "
                       f"train.min_steps_per_task={min_steps}")
    if warmup_steps is not None:
        warm = math.ceil(warmup_steps / per_epoch)
        if warm != warmup_epochs:
            derived.append(f"warm-up {warmup_epochs} -> {warm} epoch(s): "
                           f"train.warmup_steps={warmup_steps} at {per_epoch} step(s)/epoch")
    elif eff != epochs:
        warm = round(warmup_epochs * eff / epochs)
        if warm != warmup_epochs:
            derived.append(f"warm-up {warmup_epochs} -> {warm} epoch(s): the same fraction "
                           f"({warmup_epochs}/{epochs}) of the raised epochs")
    else:
        warm = int(warmup_epochs)
    if warm > eff - 1 and warm > 0:
        derived.append(f"warm-up capped at {eff - 1} epoch(s): one epoch after it at least")
        warm = max(0, eff - 1)
    return TaskLength(samples=samples, batch_size=int(batch_size), steps_per_epoch=per_epoch,
                      epochs=eff, warmup_epochs=warm, steps=eff * per_epoch,
                      requested_epochs=int(epochs), requested_warmup_epochs=int(warmup_epochs),
                      min_steps=int(min_steps), warmup_steps=warmup_steps,
                      derived=tuple(derived))
