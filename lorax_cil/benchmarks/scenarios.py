"""Named scenarios: ordered lists of generator tasks, and the label layout they imply.

Task ``t`` contributes two classes: ``real_t`` with label ``2t`` and ``fake_t`` with label
``2t + 1``. The label of a task never depends on later tasks, so appending a generator to a
finished run never relabels the old ones. Every sample also carries explicit ``task_id`` and
``is_fake`` fields (see :mod:`lorax_cil.benchmarks.datasets`), so no metric decodes parity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from lorax_cil.benchmarks.folders import DataLayoutError, list_subdirs

__all__ = [
    "CDDB_SCENARIOS",
    "TaskSource",
    "Scenario",
    "register_scenario",
    "scenario_names",
    "scenario_tasks",
    "resolve_scenario",
    "parse_task_spec",
]

#: Task orders of the CDDB scenarios (Li et al., WACV 2023), as used by the LoRAX paper.
CDDB_SCENARIOS: dict[str, tuple[str, ...]] = {
    "cddb-easy": ("gaugan", "biggan", "cyclegan", "imle", "deepfake", "crn", "wild"),
    "cddb-hard": ("gaugan", "biggan", "wild", "whichfaceisreal", "san"),
    "cddb-long": (
        "gaugan", "biggan", "cyclegan", "imle", "deepfake", "crn", "wild",
        "glow", "stargan_gf", "stylegan", "whichfaceisreal", "san",
    ),
}


#: Scenarios registered with :func:`register_scenario` (plugins, user code).
_REGISTERED: dict[str, tuple[str, ...]] = {}


def _synth_scenarios() -> dict[str, tuple[str, ...]]:
    from lorax_cil.benchmarks.synth import SYNTH_SCENARIOS

    return dict(SYNTH_SCENARIOS)


def register_scenario(name: str, tasks: Sequence[str]) -> tuple[str, ...]:
    """Register a named scenario: an ordered list of task folder names under ``--data-path``.

    Usable as ``--scenario NAME`` by every command once the registering module is loaded (e.g.
    as a plugin, see :mod:`lorax_cil.plugins`). Registering the same name again with the same
    tasks is a no-op; another task list, or a built-in name, raises ``ValueError``.
    """
    order = tuple(str(t) for t in tasks)
    if not name or name == "custom" or name in CDDB_SCENARIOS or name in _synth_scenarios():
        raise ValueError(f"scenario name {name!r} is reserved (built-in or 'custom')")
    if not order or len(set(order)) != len(order):
        raise ValueError(f"scenario {name!r}: tasks must be a non-empty list without repeats, "
                         f"got {list(order)}")
    if _REGISTERED.get(name, order) != order:
        raise ValueError(f"scenario {name!r} is already registered with tasks "
                         f"{list(_REGISTERED[name])}")
    _REGISTERED[name] = order
    return order


def scenario_names() -> list[str]:
    """All scenario names: the CDDB ones, the synthetic ones, registered ones and ``custom``."""
    return (sorted(CDDB_SCENARIOS) + sorted(_synth_scenarios()) + sorted(_REGISTERED)
            + ["custom"])


def scenario_tasks(name: str) -> tuple[str, ...]:
    """The ordered task names of a named scenario (not ``custom``)."""
    table = {**CDDB_SCENARIOS, **_synth_scenarios(), **_REGISTERED}
    if name not in table:
        raise ValueError(
            f"unknown scenario {name!r}; valid scenarios: {', '.join(scenario_names())} "
            "(a scenario registered in your own module needs --plugin MODULE)"
        )
    return table[name]


@dataclass(frozen=True)
class TaskSource:
    """One generator task: its name and the folder that holds its splits."""

    name: str
    path: str


@dataclass(frozen=True)
class Scenario:
    """An ordered sequence of generator tasks.

    Attributes:
        name: scenario name (``cddb-easy``, ``synth-long``, ``custom``, ...).
        tasks: the tasks in training order.
    """

    name: str
    tasks: tuple[TaskSource, ...]

    def __post_init__(self) -> None:
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"scenario {self.name!r} lists task(s) twice: {', '.join(dup)}")
        if not self.tasks:
            raise ValueError(f"scenario {self.name!r} has no tasks")

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def num_classes(self) -> int:
        return 2 * len(self.tasks)

    @staticmethod
    def label(task_id: int, is_fake: int | bool) -> int:
        """Class label of (task, real/fake): ``2 * task_id + is_fake``."""
        return 2 * int(task_id) + int(bool(is_fake))

    @property
    def class_names(self) -> list[str]:
        return [f"{t.name}/{kind}" for t in self.tasks for kind in ("real", "fake")]

    @property
    def class_is_fake(self) -> list[bool]:
        return [bool(c % 2) for c in range(self.num_classes)]

    @property
    def class_task(self) -> list[int]:
        return [c // 2 for c in range(self.num_classes)]

    def with_task(self, name: str, path: str | os.PathLike) -> "Scenario":
        """A new scenario with one more task appended (earlier labels unchanged)."""
        task = TaskSource(name, str(Path(path).resolve()))
        return replace(self, tasks=self.tasks + (task,))

    def prefix(self, num_tasks: int) -> "Scenario":
        """The scenario restricted to its first ``num_tasks`` tasks."""
        return replace(self, tasks=self.tasks[:num_tasks])

    def to_dict(self) -> dict:
        return {"name": self.name, "tasks": [{"name": t.name, "path": t.path} for t in self.tasks]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scenario":
        return cls(d["name"], tuple(TaskSource(t["name"], t["path"]) for t in d["tasks"]))


def parse_task_spec(spec: str, data_path: str | os.PathLike | None) -> TaskSource:
    """Parse ``name=path`` or a bare ``name`` (resolved under ``data_path``)."""
    if "=" in spec:
        name, path = spec.split("=", 1)
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise ValueError(f"task spec {spec!r} must be 'name=path' or 'name'")
        return TaskSource(name, str(Path(path).expanduser().resolve()))
    if data_path is None:
        raise ValueError(f"task {spec!r} has no path: give 'name=path' or set --data-path")
    return TaskSource(spec, str((Path(data_path) / spec).resolve()))


def _check_tasks_exist(tasks: Sequence[TaskSource], data_path: str | None) -> None:
    for t in tasks:
        if not Path(t.path).is_dir():
            parent = Path(t.path).parent
            existing = list_subdirs(parent) if parent.is_dir() else []
            where = f"existing tasks in {parent}: {', '.join(existing) if existing else '(none)'}"
            raise DataLayoutError(f"missing task folder for {t.name!r}: {t.path}; {where}")


def resolve_scenario(
    name: str,
    *,
    data_path: str | os.PathLike | None = None,
    tasks: Sequence[str] | None = None,
    check: bool = True,
) -> Scenario:
    """Resolve a scenario name (and, for ``custom``, task specs) to task folders.

    Args:
        name: ``cddb-easy``, ``cddb-hard``, ``cddb-long``, ``synth-easy``, ``synth-hard``,
            ``synth-long`` or ``custom``.
        data_path: root folder holding one sub-folder per task.
        tasks: for ``custom``, task names (under ``data_path``) or ``name=path`` pairs; for a
            named scenario, an optional subset/reordering is not allowed (use ``custom``).
        check: verify that every task folder exists.
    """
    if name == "custom":
        if not tasks:
            raise ValueError("scenario 'custom' needs --tasks: task names or name=path pairs")
        resolved = tuple(parse_task_spec(s, data_path) for s in tasks)
    else:
        if tasks:
            raise ValueError(
                f"--tasks is only valid with scenario 'custom' (got scenario {name!r})"
            )
        order = scenario_tasks(name)
        if data_path is None:
            raise ValueError(f"scenario {name!r} needs --data-path (the folder holding its tasks)")
        root = Path(data_path).expanduser().resolve()
        if check and not root.is_dir():
            raise DataLayoutError(f"--data-path folder does not exist: {root}")
        resolved = tuple(TaskSource(t, str(root / t)) for t in order)
    if check:
        _check_tasks_exist(resolved, None if data_path is None else str(data_path))
    return Scenario(name, resolved)
