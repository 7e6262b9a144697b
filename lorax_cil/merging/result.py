"""What a merge returns, the method registry, and saving a merge as safetensors + JSON."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from lorax_cil.merging.task_vectors import TaskVector, apply_task_vector

__all__ = [
    "MERGE_FORMAT",
    "MergeResult",
    "register_merge_method",
    "merge_method_names",
    "get_merge_method",
    "merge",
    "save_merge_result",
    "load_merge_result",
    "check_task_vectors",
    "merged_vector",
]

logger = logging.getLogger(__name__)

MERGE_FORMAT = "lorax-cil/merge-result"
_METHODS: dict[str, Callable[..., "MergeResult"]] = {}


@dataclass
class MergeResult:
    """One merged task vector and how it was made.

    Attributes:
        method: registry name (``"average"``, ``"task_arithmetic"``, ``"ties"``, ``"dare"``, ``"r2m"``).
        options: the method's options, defaults filled in (JSON-serialisable).
        sources: the merged task vectors' names, in the order they were given.
        task_vector: the merged deltas (``theta* = theta_0 + deltas``) and the averaged head.
        info: diagnostics (R2M: eigenvalues, eta, norms, truncation ranks; TIES: thresholds...).
        gram: the Gram cache R2M used (for re-merging with one more specialist), else ``None``.
    """

    method: str
    options: dict[str, Any]
    sources: list[str]
    task_vector: TaskVector
    info: dict[str, Any] = field(default_factory=dict)
    gram: Any = None

    @property
    def head(self) -> dict[str, torch.Tensor] | None:
        return self.task_vector.head

    def apply(self, base_state: Mapping[str, torch.Tensor], *, prefix: str = "") -> dict[str, torch.Tensor]:
        """The merged backbone state ``theta_0 + tau*`` (see :func:`apply_task_vector`)."""
        return apply_task_vector(base_state, self.task_vector, prefix=prefix)

    def to_meta(self) -> dict[str, Any]:
        return {"kind": MERGE_FORMAT, "method": self.method, "options": dict(self.options),
                "sources": list(self.sources), "info": dict(self.info),
                "source_meta": self.task_vector.meta.get("sources", [])}


def register_merge_method(name: str) -> Callable:
    """Decorator: register a merge function ``fn(task_vectors, **options) -> MergeResult``."""
    def deco(fn: Callable) -> Callable:
        if name in _METHODS and _METHODS[name] is not fn:
            raise ValueError(f"merge method {name!r} is already registered")
        _METHODS[name] = fn
        return fn
    return deco


def _load_builtins() -> None:
    import lorax_cil.merging.methods  # noqa: F401  (registers the baselines)
    import lorax_cil.merging.r2m_merge  # noqa: F401
    from lorax_cil.plugins import load_entry_point_plugins

    load_entry_point_plugins()


def merge_method_names() -> list[str]:
    _load_builtins()
    return sorted(_METHODS)


def get_merge_method(name: str) -> Callable[..., "MergeResult"]:
    """The registered merge function; unknown names raise ``ValueError`` listing the valid ones."""
    _load_builtins()
    if name not in _METHODS:
        raise ValueError(f"unknown merge method {name!r}; valid: {sorted(_METHODS)} (a method "
                         "registered in your own module needs --plugin MODULE)")
    return _METHODS[name]


def merge(method: str, task_vectors: Sequence[TaskVector], **options: Any) -> "MergeResult":
    """``get_merge_method(method)(task_vectors, **options)``."""
    return get_merge_method(method)(task_vectors, **options)


def check_task_vectors(task_vectors: Sequence[TaskVector]) -> list[TaskVector]:
    """A non-empty list of compatible task vectors with distinct, non-empty names."""
    tvs = list(task_vectors)
    if not tvs:
        raise ValueError("merging needs at least one task vector")
    bad = [type(tv).__name__ for tv in tvs if not isinstance(tv, TaskVector)]
    if bad:
        raise TypeError(f"merging needs TaskVector objects, got {bad}")
    names = [tv.name for tv in tvs]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"task vectors need distinct non-empty names (the result records its sources), "
                         f"got {names}")
    for tv in tvs[1:]:
        tvs[0].check_compatible(tv)
    return tvs


def merged_vector(
    task_vectors: Sequence[TaskVector], deltas: Mapping[str, torch.Tensor], method: str
) -> TaskVector:
    """The merged :class:`TaskVector`: ``deltas`` in the inputs' dtype, the averaged head."""
    from lorax_cil.merging.task_vectors import average_heads

    first = task_vectors[0]
    out = {k: deltas[k].to(first[k].dtype) for k in first.keys()}
    names = ",".join(tv.name for tv in task_vectors)
    sources = [dict(tv.meta, name=tv.name) for tv in task_vectors]
    return TaskVector(deltas=out, head=average_heads(task_vectors), name=f"{method}({names})",
                      meta={"kind": "merged", "method": method, "sources": sources})


def save_merge_result(
    folder: str | Path, result: MergeResult, *, meta: Mapping[str, Any] | None = None
) -> Path:
    """Write ``delta.<key>`` and ``head.<key>`` tensors plus a JSON record (and ``gram/`` if any)."""
    from lorax_cil.training.checkpoint import save_checkpoint

    tv = result.task_vector
    tensors = {f"delta.{k}": v for k, v in tv.items()}
    tensors.update({f"head.{k}": v for k, v in (tv.head or {}).items()})
    record = {**result.to_meta(), "delta_keys": tv.keys(), "head_keys": list(tv.head or {}), **(meta or {})}
    folder = save_checkpoint(folder, tensors, record)
    if result.gram is not None:
        result.gram.save(Path(folder) / "gram")
    return Path(folder)


def load_merge_result(folder: str | Path) -> MergeResult:
    """Read a folder written by :func:`save_merge_result`."""
    from lorax_cil.training.checkpoint import load_checkpoint

    tensors, meta = load_checkpoint(folder)
    if meta.get("kind") != MERGE_FORMAT:
        raise ValueError(f"{folder} is not a merge result (kind={meta.get('kind')!r})")
    deltas = {k: tensors[f"delta.{k}"] for k in meta["delta_keys"]}
    head = {k: tensors[f"head.{k}"] for k in meta["head_keys"]} or None
    gram = None
    if (Path(folder) / "gram" / "meta.json").is_file():
        from lorax_cil.merging.gram import GramCache

        gram = GramCache.load(Path(folder) / "gram")
    tv = TaskVector(deltas=deltas, head=head, name=f"{meta['method']}({','.join(meta['sources'])})",
                    meta={"kind": "merged", "method": meta["method"], "sources": meta.get("source_meta", [])})
    return MergeResult(method=meta["method"], options=meta["options"], sources=meta["sources"],
                       task_vector=tv, info=meta.get("info", {}), gram=gram)
