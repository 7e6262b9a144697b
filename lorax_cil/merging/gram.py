"""The N x N Gram matrix of task vectors, cached per parameter, and the Real projection from it.

R2M needs the top right singular vectors of the task matrix ``M = [tau_1; ...; tau_N]`` (N x D).
``D`` is the size of a backbone, so nothing D x D (or even a concatenated N x D copy) is formed:

* :class:`GramCache` holds, for every parameter name, the block ``G_key = M_key M_key^T``
  (float64, N x N); ``G = sum over keys`` of the blocks that take part in the estimate. Adding
  one specialist computes one new row/column (N + 1 dot products per key) and keeps the old ones.
* :func:`real_projection` eigendecomposes ``G`` (or the centred ``C G C``) and returns N-vectors
  of coefficients: every quantity R2M needs (``Pi tau_bar``, ``Pi tau_i``) is ``M^T w`` for some
  ``w`` in R^N, so it is formed parameter by parameter as ``sum_j w_j tau_j[key]``.

Derivation. Thin SVD ``M_c = U S V^T`` of the (optionally centred) task matrix
``M_c = C M`` with ``C = I - 11^T/N`` (or ``C = I``). Then ``M_c M_c^T = C G C = U L U^T`` with
``L = S^2`` and ``V = M_c^T U S^{-1}``. The projector on the top-k right singular vectors is
``Pi = V_k V_k^T = M_c^T U_k L_k^{-1} U_k^T M_c``. For ``x = M^T a`` (any vector in the span of the
task vectors) ``M_c x = C G a`` and ``M_c^T y = M^T C y``, so ``Pi M^T a = M^T Q a`` with
``Q = C U_k L_k^{-1} U_k^T C G``. With ``tau_bar = M^T 1/N``: ``tau_core = M^T (Q 1/N)``, which for
``C = I`` is the reference's ``w = U_k L_k^{-1} U_k^T (M tau_bar)`` since ``M tau_bar = G 1/N``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from lorax_cil.merging.task_vectors import TaskVector

__all__ = ["GramCache", "RealProjection", "real_projection", "gram_block"]

logger = logging.getLogger(__name__)

GRAM_FORMAT = "lorax-cil/gram-cache"


def gram_block(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``X X^T`` (float64, N x N) of the flattened tensors stacked as rows of ``X``."""
    x = torch.stack([t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors])
    return x @ x.T


class GramCache:
    """Per-parameter Gram blocks of N named task vectors.

    Args:
        sources: the task vectors' names, in row order.
        blocks: ``{parameter name: (N, N) float64}``.
    """

    def __init__(self, *, sources: Sequence[str], blocks: Mapping[str, torch.Tensor]) -> None:
        self.sources = [str(s) for s in sources]
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"GramCache: duplicate source names {self.sources}")
        n = len(self.sources)
        self.blocks = {k: v.to(torch.float64) for k, v in blocks.items()}
        for k, v in self.blocks.items():
            if tuple(v.shape) != (n, n):
                raise ValueError(f"GramCache: block {k!r} has shape {tuple(v.shape)}, expected ({n}, {n})")

    @property
    def num_sources(self) -> int:
        return len(self.sources)

    def keys(self) -> list[str]:
        return list(self.blocks)

    def __repr__(self) -> str:
        return f"GramCache(sources={self.sources}, keys={len(self.blocks)})"

    @classmethod
    def build(cls, task_vectors: Sequence[TaskVector]) -> "GramCache":
        """Compute every block from scratch (``N (N + 1) / 2`` dot products per parameter)."""
        _check_same_keys(task_vectors)
        keys = task_vectors[0].keys()
        blocks = {k: gram_block([tv[k] for tv in task_vectors]) for k in keys}
        return cls(sources=[tv.name for tv in task_vectors], blocks=blocks)

    def gram(self, keys: Sequence[str] | None = None) -> torch.Tensor:
        """``G = sum over keys`` of the blocks (default: all keys)."""
        keys = self.keys() if keys is None else list(keys)
        missing = [k for k in keys if k not in self.blocks]
        if missing:
            raise ValueError(f"GramCache has no entries for {missing[:5]} "
                             f"(cached keys, sample: {self.keys()[:5]})")
        g = torch.zeros(self.num_sources, self.num_sources, dtype=torch.float64)
        for k in keys:
            g += self.blocks[k]
        return g

    def select(self, names: Sequence[str]) -> "GramCache":
        """The cache restricted to / reordered as ``names``."""
        unknown = [n for n in names if n not in self.sources]
        if unknown:
            raise ValueError(f"GramCache has no source(s) {unknown}; cached: {self.sources}")
        idx = torch.tensor([self.sources.index(n) for n in names], dtype=torch.long)
        return GramCache(sources=list(names), blocks={k: v[idx][:, idx] for k, v in self.blocks.items()})

    def extend(self, new: TaskVector, existing: Sequence[TaskVector], *, rtol: float = 1e-5) -> "GramCache":
        """A cache with one more source: the new row/column only (old entries are reused).

        ``existing`` are the cached sources' task vectors (any order, matched by name): the new
        row needs ``<tau_new, tau_j>``. Their squared norms are compared with the cached diagonal
        on the way, so a stale cache (a specialist retrained since) is detected.

        Raises:
            ValueError: ``new.name`` is already cached, a cached source is missing from
                ``existing``, keys differ, or the cached diagonal does not match.
        """
        if new.name in self.sources:
            raise ValueError(f"GramCache.extend: {new.name!r} is already cached")
        by_name = {tv.name: tv for tv in existing}
        missing = [s for s in self.sources if s not in by_name]
        if missing:
            raise ValueError(f"GramCache.extend: task vectors of cached sources {missing} were not given")
        old = [by_name[s] for s in self.sources]
        _check_same_keys(old + [new])
        if set(new.keys()) != set(self.blocks):
            raise ValueError(f"GramCache.extend: {new.name!r} covers other parameters than the cache")
        n = self.num_sources
        blocks = {}
        for k, g in self.blocks.items():
            x_new = new[k].detach().reshape(-1).to("cpu", torch.float64)
            row = torch.empty(n + 1, dtype=torch.float64)
            for j, tv in enumerate(old):
                x = tv[k].detach().reshape(-1).to("cpu", torch.float64)
                sq = float(x @ x)
                if not math.isclose(sq, float(g[j, j]), rel_tol=rtol, abs_tol=1e-12):
                    raise ValueError(f"GramCache.extend: cached |tau|^2 of {tv.name!r} at {k!r} is "
                                     f"{float(g[j, j])} but the given task vector has {sq}: "
                                     "the cache is stale")
                row[j] = x_new @ x
            row[n] = x_new @ x_new
            big = torch.zeros(n + 1, n + 1, dtype=torch.float64)
            big[:n, :n] = g
            big[n, :], big[:, n] = row, row
            blocks[k] = big
        return GramCache(sources=self.sources + [new.name], blocks=blocks)

    def save(self, folder: str | Path) -> Path:
        """safetensors + JSON (through :func:`lorax_cil.training.checkpoint.save_checkpoint`)."""
        from lorax_cil.training.checkpoint import save_checkpoint

        keys = self.keys()
        tensors = {f"gram.{i}": self.blocks[k] for i, k in enumerate(keys)}
        return save_checkpoint(folder, tensors, {"kind": GRAM_FORMAT, "sources": self.sources, "keys": keys})

    @classmethod
    def load(cls, folder: str | Path) -> "GramCache":
        from lorax_cil.training.checkpoint import load_checkpoint

        tensors, meta = load_checkpoint(folder)
        if meta.get("kind") != GRAM_FORMAT:
            raise ValueError(f"{folder} is not a Gram cache (kind={meta.get('kind')!r})")
        blocks = {k: tensors[f"gram.{i}"] for i, k in enumerate(meta["keys"])}
        return cls(sources=meta["sources"], blocks=blocks)


def _check_same_keys(task_vectors: Sequence[TaskVector]) -> None:
    if not task_vectors:
        raise ValueError("no task vectors given")
    for tv in task_vectors[1:]:
        task_vectors[0].check_compatible(tv)


@dataclass
class RealProjection:
    """The Real subspace of the task matrix, as coefficients over the task vectors.

    Attributes:
        core: ``w`` (N,) with ``tau_core = Pi tau_bar = M^T w``.
        q: ``Q`` (N, N) with ``Pi (M^T a) = M^T (Q a)``; column ``i`` gives ``Pi tau_i``.
        eigenvalues: of ``G`` (or ``C G C``), descending.
        rank: the number of directions used (``min(k, numerical rank)``).
    """

    core: torch.Tensor
    q: torch.Tensor
    eigenvalues: torch.Tensor
    rank: int

    def info(self) -> dict[str, Any]:
        return {"eigenvalues": [float(v) for v in self.eigenvalues], "rank_used": self.rank}


def real_projection(
    gram: torch.Tensor, *, k: int = 1, center: bool = False, rtol: float = 1e-9
) -> RealProjection:
    """Eigendecompose the (centred) Gram matrix and express ``Pi`` through task-vector coefficients.

    Args:
        gram: ``G = M M^T`` (N x N).
        k: number of top right singular vectors spanning the Real subspace.
        center: use ``M - 1 tau_bar^T`` (Gram ``C G C``) instead of ``M``.
        rtol: eigenvalues ``<= rtol * trace(G)`` count as zero (fewer than ``k`` directions
            are then used, and a warning is logged).
    """
    g = gram.to(torch.float64)
    n = g.shape[0]
    if g.shape != (n, n):
        raise ValueError(f"Gram matrix must be square, got {tuple(g.shape)}")
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, N={n}], got {k!r}")
    c = torch.eye(n, dtype=torch.float64)
    if center:
        c -= 1.0 / n
    gc = c @ g @ c
    gc = (gc + gc.T) / 2
    evals, evecs = torch.linalg.eigh(gc)
    evals, evecs = evals.flip(0), evecs.flip(1)
    scale = float(torch.trace(g))  # the uncentred energy: centring noise is measured against it
    rank = int((evals > rtol * scale).sum()) if scale > 0 else 0
    used = min(k, rank)
    if used < k:
        logger.warning("R2M: the %stask matrix has numerical rank %d < k=%d; using %d direction(s)",
                       "centred " if center else "", rank, k, used)
    uk, lk = evecs[:, :used], evals[:used]
    q = c @ uk @ torch.diag(1.0 / lk) @ uk.T @ c @ g if used else torch.zeros(n, n, dtype=torch.float64)
    core = q @ torch.full((n,), 1.0 / n, dtype=torch.float64)
    return RealProjection(core=core, q=q, eigenvalues=evals.clamp_min(0.0), rank=used)
