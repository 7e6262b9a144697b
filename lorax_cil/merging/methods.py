"""Baseline merging methods over task vectors: averaging, Task Arithmetic, TIES and DARE.

Every method takes a list of :class:`~lorax_cil.merging.task_vectors.TaskVector` (same parameters,
distinct names) and returns a :class:`~lorax_cil.merging.result.MergeResult` whose task vector is
``tau*`` (the merged model is ``theta_0 + tau*``) and whose head is the element-wise mean of the
specialists' heads. Work is done parameter by parameter on ``(N, *shape)`` stacks; nothing
D x D is ever formed. Computation runs in float32 (float64 inputs stay float64); the result has
the inputs' dtype.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Sequence

import torch

from lorax_cil.merging.result import (
    MergeResult,
    check_task_vectors,
    merged_vector,
    register_merge_method,
)
from lorax_cil.merging.task_vectors import TaskVector

__all__ = [
    "weight_average",
    "task_arithmetic",
    "ties",
    "ties_trim",
    "dare",
    "dare_drop",
    "DARE_BASES",
    "stack_deltas",
]

logger = logging.getLogger(__name__)

DARE_BASES = ("task_arithmetic", "average")


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def stack_deltas(task_vectors: Sequence[TaskVector], key: str) -> torch.Tensor:
    """``(N, *shape)`` stack of one parameter's deltas in the working dtype."""
    first = task_vectors[0][key]
    return torch.stack([tv[key].to(first.device, _work_dtype(first)) for tv in task_vectors])


def _result(
    method: str, options: dict, tvs: list[TaskVector], deltas: dict, info: dict | None = None
) -> MergeResult:
    return MergeResult(method=method, options=options, sources=[tv.name for tv in tvs],
                       task_vector=merged_vector(tvs, deltas, method), info=info or {})


@register_merge_method("average")
def weight_average(task_vectors: Sequence[TaskVector]) -> MergeResult:
    """Weight averaging: ``tau* = mean_i tau_i`` (so ``theta* = mean_i theta_i``)."""
    tvs = check_task_vectors(task_vectors)
    deltas = {k: stack_deltas(tvs, k).mean(0) for k in tvs[0].keys()}
    return _result("average", {}, tvs, deltas)


@register_merge_method("task_arithmetic")
def task_arithmetic(task_vectors: Sequence[TaskVector], *, lam: float = 0.3) -> MergeResult:
    """Task Arithmetic: ``tau* = lam * sum_i tau_i``.

    Args:
        lam: scaling of the summed task vectors (``lam = 1/N`` is weight averaging). The right
            value depends on N and the specialists; tune it on validation data.
    """
    tvs = check_task_vectors(task_vectors)
    lam = float(lam)
    deltas = {k: lam * stack_deltas(tvs, k).sum(0) for k in tvs[0].keys()}
    return _result("task_arithmetic", {"lam": lam}, tvs, deltas)


# --- TIES -------------------------------------------------------------------------------------------
def ties_trim(tv: TaskVector, top_k: float) -> tuple[TaskVector, float]:
    """Keep the ``top_k`` fraction of entries of largest magnitude over the *whole* task vector.

    ``round(top_k * D)`` entries (at least 1) are kept; entries tied with the threshold are kept
    too. Returns the trimmed task vector and the magnitude threshold.
    """
    if not 0.0 < top_k <= 1.0:
        raise ValueError(f"TIES top_k must be in (0, 1], got {top_k!r}")
    mags = torch.cat([v.detach().reshape(-1).abs().to("cpu", torch.float32) for v in tv.deltas.values()])
    d = mags.numel()
    keep = max(1, min(d, round(top_k * d)))
    thr = float(torch.kthvalue(mags, d - keep + 1).values) if keep < d else 0.0
    trimmed = tv.map(lambda _k, v: torch.where(v.abs() >= thr, v, torch.zeros_like(v)))
    return trimmed, thr


@register_merge_method("ties")
def ties(task_vectors: Sequence[TaskVector], *, top_k: float = 0.2, lam: float = 1.0) -> MergeResult:
    """TIES-merging: trim, elect sign, disjoint mean.

    1. Trim: keep the ``top_k`` fraction of largest-magnitude entries of each task vector
       (:func:`ties_trim`), zero the rest.
    2. Elect: per parameter entry, ``gamma = sign(sum_i trimmed_i)`` (the sign with more mass).
    3. Disjoint mean: average the trimmed entries whose sign equals ``gamma`` (zeros excluded);
       entries with no agreeing value stay 0. ``tau* = lam * disjoint mean``.
    """
    tvs = check_task_vectors(task_vectors)
    trimmed, thresholds = zip(*(ties_trim(tv, float(top_k)) for tv in tvs))
    deltas, kept = {}, 0
    for k in tvs[0].keys():
        t = stack_deltas(trimmed, k)
        gamma = torch.sign(t.sum(0))
        agree = (torch.sign(t) == gamma) & (t != 0)
        count = agree.sum(0)
        kept += int((count > 0).sum())
        deltas[k] = float(lam) * (t * agree).sum(0) / count.clamp_min(1).to(t.dtype)
    info = {"thresholds": {tv.name: thr for tv, thr in zip(tvs, thresholds)},
            "nonzero_fraction": kept / max(1, tvs[0].numel())}
    return _result("ties", {"top_k": float(top_k), "lam": float(lam)}, tvs, deltas, info)


# --- DARE -------------------------------------------------------------------------------------------
def _stable_seed(*parts: object) -> int:
    digest = hashlib.sha256("\0".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dare_drop(tv: TaskVector, *, p: float, seed: int = 0) -> TaskVector:
    """Drop every entry with probability ``p`` and rescale survivors by ``1 / (1 - p)``.

    The mask of parameter ``key`` is drawn from a ``torch.Generator`` seeded by
    ``(seed, tv.name, key)``: it depends on the specialist's identity, not on its position in a
    list or on the order of parameters, so merges are reproducible and order-independent. The
    expectation of every entry is preserved.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"DARE drop rate p must be in [0, 1), got {p!r}")
    if p == 0.0:
        return tv.replace(deltas=dict(tv.deltas))

    def drop(key: str, v: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(_stable_seed(seed, tv.name, key))
        keep = (torch.rand(v.shape, generator=g) >= p).to(v.device)
        return torch.where(keep, v / (1.0 - p), torch.zeros_like(v))

    return tv.map(drop)


@register_merge_method("dare")
def dare(
    task_vectors: Sequence[TaskVector],
    *,
    p: float = 0.5,
    seed: int = 0,
    base_method: str = "task_arithmetic",
    lam: float = 0.3,
) -> MergeResult:
    """DARE: random drop and rescale of every task vector (:func:`dare_drop`), then merge.

    Args:
        p: drop probability per entry.
        seed: base seed; each specialist's masks are seeded by ``(seed, name, parameter)``.
        base_method: ``"task_arithmetic"`` (``lam * sum``) or ``"average"`` (mean).
        lam: Task Arithmetic scaling (ignored by ``"average"``).
    """
    if base_method not in DARE_BASES:
        raise ValueError(f"DARE base_method must be one of {list(DARE_BASES)}, got {base_method!r}")
    tvs = check_task_vectors(task_vectors)
    dropped = [dare_drop(tv, p=float(p), seed=int(seed)) for tv in tvs]
    inner = task_arithmetic(dropped, lam=lam) if base_method == "task_arithmetic" else weight_average(dropped)
    options = {"p": float(p), "seed": int(seed), "base_method": base_method}
    if base_method == "task_arithmetic":
        options["lam"] = float(lam)
    kept = sum(int((v != 0).sum()) for tv in dropped for v in tv.deltas.values())
    total = sum(tv.numel() for tv in tvs)
    info = {"kept_fraction": kept / max(1, total)}
    return _result("dare", options, tvs, dict(inner.task_vector.deltas), info)
