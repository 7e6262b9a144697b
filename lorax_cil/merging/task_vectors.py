"""Task vectors: what fine-tuning added to a shared base, plus the specialist's head.

A :class:`TaskVector` holds ``tau = theta_i - theta_0`` as an ordered ``{name: tensor}`` mapping over
backbone parameters (the *deltas*), and the specialist's classification head *separately* as
absolute tensors (a head has no shared base: every specialist trains its own from scratch).

:func:`task_vector_from_state_dicts` builds one from two state dicts of the same backbone; the
LoRA and LoRAX builders are in :mod:`lorax_cil.merging.lora_vectors`.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

__all__ = [
    "TaskVector",
    "DEFAULT_SKIP",
    "task_vector_from_state_dicts",
    "copy_head",
    "average_heads",
    "apply_task_vector",
]

logger = logging.getLogger(__name__)

#: State-dict keys that are statistics, not learned weights (kept from the base, never merged).
DEFAULT_SKIP = r"(^|\.)(running_mean|running_var|num_batches_tracked)$"


def _delta_dtype(dtype: torch.dtype) -> torch.dtype:
    """Deltas of half-precision weights are kept in float32 (their difference loses bits)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class TaskVector:
    """``tau = theta_i - theta_0`` over backbone parameters, plus the specialist's head.

    Arithmetic (``+``, ``-``, unary ``-``, ``* scalar``, ``/ scalar``) acts on the backbone deltas
    only; the result carries no head, because heads are absolute weights that are merged by
    averaging (:func:`average_heads`), never added.

    Args:
        deltas: ordered ``{parameter name: delta tensor}``; the mapping is copied, tensors are not.
        head: the specialist's head as absolute tensors (``{"weight": (C, D), "bias": (C,)}``,
            ``C`` = 2 logits [real, fake] or 1 logit), or ``None``.
        name: identifies the specialist (merges need distinct names; DARE seeds by name).
        meta: JSON-serialisable facts about the source (kind, run, task, scaling...).
    """

    def __init__(
        self,
        *,
        deltas: Mapping[str, torch.Tensor],
        head: Mapping[str, torch.Tensor] | None = None,
        name: str = "",
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        for k, v in deltas.items():
            if not isinstance(v, torch.Tensor) or not torch.is_floating_point(v):
                raise TypeError(f"TaskVector {name!r}: delta {k!r} must be a floating-point tensor")
        self.deltas: dict[str, torch.Tensor] = dict(deltas)
        self.head: dict[str, torch.Tensor] | None = dict(head) if head is not None else None
        self.name = str(name)
        self.meta: dict[str, Any] = dict(meta or {})

    # --- mapping protocol -------------------------------------------------------------------
    def __getitem__(self, key: str) -> torch.Tensor:
        return self.deltas[key]

    def __contains__(self, key: object) -> bool:
        return key in self.deltas

    def __iter__(self) -> Iterator[str]:
        return iter(self.deltas)

    def __len__(self) -> int:
        return len(self.deltas)

    def keys(self) -> list[str]:
        return list(self.deltas)

    def items(self):
        return self.deltas.items()

    def numel(self) -> int:
        """``D``: the number of scalar parameters the deltas cover."""
        return sum(v.numel() for v in self.deltas.values())

    def __repr__(self) -> str:
        head = None if self.head is None else {k: tuple(v.shape) for k, v in self.head.items()}
        return f"TaskVector(name={self.name!r}, tensors={len(self)}, numel={self.numel()}, head={head})"

    # --- helpers ----------------------------------------------------------------------------
    def replace(self, **changes: Any) -> "TaskVector":
        """A copy with some of ``deltas``, ``head``, ``name``, ``meta`` replaced."""
        kw = {"deltas": self.deltas, "head": self.head, "name": self.name, "meta": self.meta}
        unknown = sorted(set(changes) - set(kw))
        if unknown:
            raise ValueError(f"TaskVector.replace: unknown fields {unknown}; valid: {sorted(kw)}")
        kw.update(changes)
        return TaskVector(**kw)

    def map(
        self, fn: Callable[[str, torch.Tensor], torch.Tensor], *, name: str | None = None
    ) -> "TaskVector":
        """A new task vector ``{k: fn(k, v)}`` with the same head."""
        return self.replace(deltas={k: fn(k, v) for k, v in self.deltas.items()},
                            name=self.name if name is None else name)

    def to(self, *args: Any, **kwargs: Any) -> "TaskVector":
        """``Tensor.to`` applied to every delta and head tensor."""
        head = None if self.head is None else {k: v.to(*args, **kwargs) for k, v in self.head.items()}
        return self.replace(deltas={k: v.to(*args, **kwargs) for k, v in self.deltas.items()}, head=head)

    def check_compatible(self, other: "TaskVector") -> None:
        """Raise ``ValueError`` naming the first key or shape that differs."""
        mine, theirs = set(self.deltas), set(other.deltas)
        if mine != theirs:
            only_a, only_b = sorted(mine - theirs)[:5], sorted(theirs - mine)[:5]
            raise ValueError(f"task vectors {self.name!r} and {other.name!r} cover different parameters: "
                             f"only in {self.name!r}: {only_a}, only in {other.name!r}: {only_b}")
        for k, v in self.deltas.items():
            if v.shape != other.deltas[k].shape:
                raise ValueError(f"parameter {k!r}: shape {tuple(v.shape)} in {self.name!r} but "
                                 f"{tuple(other.deltas[k].shape)} in {other.name!r}")

    def dot(self, other: "TaskVector", keys: Sequence[str] | None = None) -> float:
        """``<tau_a, tau_b>`` over ``keys`` (default all), accumulated in float64."""
        self.check_compatible(other)
        keys = self.keys() if keys is None else keys
        return float(sum((self[k].double() * other[k].double()).sum() for k in keys))

    def norm(self, keys: Sequence[str] | None = None) -> float:
        """Euclidean norm over ``keys`` (default all), accumulated in float64."""
        keys = self.keys() if keys is None else keys
        return math.sqrt(float(sum(self[k].double().pow(2).sum() for k in keys)))

    def flatten(self, keys: Sequence[str] | None = None) -> torch.Tensor:
        """The deltas as one ``(D,)`` vector in key order (for tests and small problems)."""
        keys = self.keys() if keys is None else keys
        return torch.cat([self[k].reshape(-1) for k in keys]) if keys else torch.zeros(0)

    # --- arithmetic (deltas only) -----------------------------------------------------------
    def _binary(self, other: "TaskVector", op: Callable, sym: str) -> "TaskVector":
        if not isinstance(other, TaskVector):
            return NotImplemented
        self.check_compatible(other)
        return TaskVector(deltas={k: op(v, other[k]) for k, v in self.deltas.items()},
                          name=f"({self.name}{sym}{other.name})")

    def __add__(self, other: "TaskVector") -> "TaskVector":
        return self._binary(other, torch.add, "+")

    def __sub__(self, other: "TaskVector") -> "TaskVector":
        return self._binary(other, torch.sub, "-")

    def __neg__(self) -> "TaskVector":
        return TaskVector(deltas={k: -v for k, v in self.deltas.items()}, name=f"-{self.name}")

    def __mul__(self, scalar: float) -> "TaskVector":
        if not isinstance(scalar, (int, float)):
            return NotImplemented
        return TaskVector(deltas={k: v * scalar for k, v in self.deltas.items()},
                          name=f"{scalar:g}*{self.name}")

    __rmul__ = __mul__

    def __truediv__(self, scalar: float) -> "TaskVector":
        if not isinstance(scalar, (int, float)):
            return NotImplemented
        return self * (1.0 / scalar)


# --- builders -------------------------------------------------------------------------------------
def task_vector_from_state_dicts(
    base: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, torch.Tensor],
    *,
    keys: Sequence[str] | None = None,
    head: Mapping[str, torch.Tensor] | None = None,
    name: str = "",
    skip: str | None = DEFAULT_SKIP,
    meta: Mapping[str, Any] | None = None,
) -> TaskVector:
    """``tau = finetuned - base`` over backbone parameters.

    Args:
        base: the shared pretrained state ``theta_0``.
        finetuned: the specialist's state ``theta_i`` (may be partial: only the fine-tuned blocks).
        keys: the parameters to take (default: every floating-point key of ``finetuned`` that does
            not match ``skip``). Non-floating-point tensors are ignored.
        head: the specialist's head (absolute tensors), stored beside the deltas.
        name: the specialist's name.
        skip: regex (``re.search``) of keys left out; default: BatchNorm running statistics.
        meta: extra facts to record.

    Raises:
        ValueError: a key is missing from ``base`` or ``finetuned``, or shapes differ (the error
            names the key).
    """
    rx = re.compile(skip) if skip else None
    chosen = list(finetuned) if keys is None else list(keys)
    deltas: dict[str, torch.Tensor] = {}
    for k in chosen:
        if k not in finetuned:
            raise ValueError(f"task vector {name!r}: key {k!r} is not in the fine-tuned state dict")
        ft = finetuned[k]
        if not torch.is_floating_point(ft) or (keys is None and rx is not None and rx.search(k)):
            continue
        if k not in base:
            raise ValueError(f"task vector {name!r}: key {k!r} of the fine-tuned state is not in the base "
                             f"state dict (base keys, sample: {list(base)[:5]})")
        b = base[k]
        if b.shape != ft.shape:
            raise ValueError(f"task vector {name!r}: key {k!r} has shape {tuple(ft.shape)} in the fine-tuned "
                             f"state but {tuple(b.shape)} in the base")
        dt = _delta_dtype(ft.dtype)
        deltas[k] = ft.detach().to(dt) - b.detach().to(device=ft.device, dtype=dt)
    if not deltas:
        raise ValueError(f"task vector {name!r}: no floating-point parameters selected")
    return TaskVector(deltas=deltas, head=copy_head(head), name=name,
                      meta={"kind": "state-dict", **(meta or {})})


def copy_head(head: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    return None if head is None else {k: v.detach().clone() for k, v in head.items()}


# --- heads and application ------------------------------------------------------------------------
def average_heads(task_vectors: Sequence[TaskVector]) -> dict[str, torch.Tensor] | None:
    """Element-wise mean of the specialists' heads (``None`` when none has a head).

    Raises:
        ValueError: some task vectors have a head and others not, or head keys/shapes differ.
    """
    heads = [tv.head for tv in task_vectors]
    if all(h is None for h in heads):
        return None
    missing = [tv.name for tv in task_vectors if tv.head is None]
    if missing:
        raise ValueError(f"task vectors {missing} have no head while others do")
    first = task_vectors[0]
    for tv in task_vectors[1:]:
        if set(tv.head) != set(first.head):
            raise ValueError(f"heads differ: {tv.name!r} has {sorted(tv.head)}, "
                             f"{first.name!r} has {sorted(first.head)}")
        for k, v in tv.head.items():
            if v.shape != first.head[k].shape:
                raise ValueError(f"head {k!r}: shape {tuple(v.shape)} in {tv.name!r} but "
                                 f"{tuple(first.head[k].shape)} in {first.name!r} "
                                 "(1-logit vs 2-logit heads?)")
    return {k: torch.stack([h[k].float() for h in heads]).mean(0).to(first.head[k].dtype) for k in first.head}


def apply_task_vector(
    base_state: Mapping[str, torch.Tensor],
    tv: TaskVector,
    *,
    scale: float = 1.0,
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """``theta = theta_0 + scale * tau`` as a new state dict (the caller's dict is not mutated).

    Keys of ``tv`` are looked up as ``prefix + key`` in ``base_state``; tensors of untouched keys
    are shared with ``base_state``, updated ones are new and keep the base dtype.

    Raises:
        ValueError: a key of ``tv`` is missing from ``base_state`` or has another shape.
    """
    out = dict(base_state)
    for k, d in tv.items():
        key = prefix + k
        if key not in base_state:
            raise ValueError(f"apply_task_vector: key {key!r} of task vector {tv.name!r} is not in the base "
                             f"state (sample: {list(base_state)[:5]})")
        b = base_state[key]
        if b.shape != d.shape:
            raise ValueError(f"apply_task_vector: key {key!r} has shape {tuple(b.shape)} in the base but "
                             f"{tuple(d.shape)} in task vector {tv.name!r}")
        work = _delta_dtype(b.dtype)
        out[key] = (b.detach().to(work) + scale * d.to(b.device, work)).to(b.dtype)
    return out
