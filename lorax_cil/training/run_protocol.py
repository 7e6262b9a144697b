"""What :class:`~lorax_cil.training.runner.Run` needs from a strategy and its model.

Every registered strategy runs through the same :class:`Run` (same per-step evaluation, outputs,
checkpoints and resume). The run talks to the *model* and the *strategy* only through the two
small protocols below, so a baseline whose model is not the expandable network (ICaRL's
nearest-mean classifier, L2P's prompted ViT, SimpleCIL's prototypes) plugs in by implementing
them; its preset names a ``network(cfg, backbone)`` factory (see
:func:`~lorax_cil.training.registry.register_strategy`).

:class:`RunModel` (``Run.net``)
    ``net(x)`` gives ``(B, num_classes)`` logits over the classes seen so far (eval mode);
    ``num_classes`` / ``num_tasks``; ``add_task(n)`` (restore replays growth before loading);
    ``parameter_report()`` with at least ``trainable_extractor``, ``trainable`` and
    ``total_stored``; ``learned_state_dict()`` / ``load_learned_state_dict()`` (every tensor the
    model learned, as plain tensors, saved as safetensors); ``architecture()`` (JSON, with
    ``task_classes``); ``backbone`` (the frozen :class:`~lorax_cil.models.base.BlockBackbone`,
    whose ``spec`` gives the transforms); ``to()``, ``eval()``, ``train()``.

:class:`RunStrategy` (``Run.strategy``)
    ``train(experience, num_workers=...)``; ``memory`` with ``per_class()``,
    ``state(paths_of)`` (JSON) and ``restore(state, datasets_by_class, paths_of)`` (the last
    call of a resume: a strategy that cannot resume raises :class:`ResumeNotSupportedError`
    there); optionally ``evaluate_after_step(j, num_tasks) -> bool`` (``False``: row ``j`` of
    the accuracy matrices stays undefined, as for joint training before the last task).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

__all__ = [
    "RunModel",
    "RunMemory",
    "RunStrategy",
    "ResumeNotSupportedError",
    "NoMemory",
    "not_resumable",
    "scenario_num_tasks",
    "check_model_protocol",
]

@runtime_checkable
class RunModel(Protocol):
    """The model interface :class:`~lorax_cil.training.runner.Run` evaluates and checkpoints."""

    backbone: Any

    @property
    def num_classes(self) -> int: ...

    @property
    def num_tasks(self) -> int: ...

    def __call__(self, x: Any) -> Any: ...

    def add_task(self, num_new_classes: int = 2) -> None: ...

    def parameter_report(self) -> dict[str, Any]: ...

    def learned_state_dict(self) -> dict[str, Any]: ...

    def load_learned_state_dict(self, sd: Mapping[str, Any]) -> None: ...

    def architecture(self) -> dict[str, Any]: ...


@runtime_checkable
class RunMemory(Protocol):
    """The exemplar-memory view :class:`Run` logs and checkpoints."""

    def per_class(self) -> dict[int, int]: ...

    def state(self, paths_of: Callable[[Any], Sequence[str]]) -> Any: ...

    def restore(self, state: Any, datasets_by_class: dict[int, Any],
                paths_of: Callable[[Any], Sequence[str]]) -> None: ...


@runtime_checkable
class RunStrategy(Protocol):
    """The strategy interface :class:`Run` drives."""

    memory: RunMemory

    def train(self, experiences: Any, **kwargs: Any) -> Any: ...


class ResumeNotSupportedError(ValueError):
    """A strategy keeps state that its checkpoints do not hold, so it cannot resume."""


class NoMemory:
    """The memory view of an exemplar-free strategy.

    Args:
        strategy: registry name (for the error message).
        resume_error: when set, :meth:`restore` raises :class:`ResumeNotSupportedError` with
            this reason (the strategy keeps state the checkpoint does not hold).
        on_restore: called by :meth:`restore` (after the model was loaded) to rebuild state
            derived from the model, e.g. LwF's teacher.
    """

    def __init__(self, *, strategy: str, resume_error: str | None = None,
                 on_restore: Callable[[dict[int, Any]], None] | None = None) -> None:
        self.strategy = strategy
        self.resume_error = resume_error
        self.on_restore = on_restore

    def per_class(self) -> dict[int, int]:
        return {}

    def state(self, paths_of: Callable[[Any], Sequence[str]]) -> dict[str, list[str]]:
        return {}

    def restore(self, state: Any, datasets_by_class: dict[int, Any],
                paths_of: Callable[[Any], Sequence[str]]) -> None:
        if self.resume_error:
            raise not_resumable(self.strategy, self.resume_error)
        if self.on_restore is not None:
            self.on_restore(datasets_by_class)


def not_resumable(strategy: str, reason: str) -> ResumeNotSupportedError:
    """The error a non-resumable strategy raises when a run is resumed."""
    return ResumeNotSupportedError(
        f"strategy {strategy!r} cannot resume from a checkpoint: {reason}. Train it again from "
        "the start (`lorax-cil compare` restarts partial runs of such strategies by itself)"
    )


def scenario_num_tasks(cfg: Any) -> int:
    """Number of tasks of the configured scenario (for models sized for every class up front).

    Raises:
        ValueError: ``custom`` without ``data.tasks``, or an unknown scenario name.
    """
    from lorax_cil.benchmarks.scenarios import scenario_tasks

    d = cfg.data
    if d.tasks:
        return len(d.tasks)
    if d.scenario == "custom":
        raise ValueError("scenario 'custom' needs data.tasks (the task list) for this strategy")
    return len(scenario_tasks(d.scenario))


def check_model_protocol(net: Any) -> list[str]:
    """Names of the :class:`RunModel` members ``net`` lacks (empty when it conforms)."""
    names = ("backbone", "num_classes", "num_tasks", "add_task", "parameter_report",
             "learned_state_dict", "load_learned_state_dict", "architecture")
    return [n for n in names if not hasattr(net, n)]
