"""R2M: Real-aware residual model merging (training-free), as reconstructed from the paper's
abstract and a public kit.

Algorithm (each step's status is in ``docs/merging.md``):

1. ``tau_i = theta_i - theta_0``; ``M = [tau_1; ...; tau_N]`` over the *Real-estimate keys*
   (every parameter except LayerNorm weights/biases and, optionally, all biases).
2. Real subspace: top-``k`` right singular vectors of ``M`` (or of the centred ``M - 1 tau_bar^T``),
   obtained from the N x N Gram matrix (:mod:`lorax_cil.merging.gram`); ``Pi = V_k V_k^T``.
3. ``tau_core = Pi tau_bar``.
4. Residuals ``r_i = tau_i - tau_core`` (``residual="subtract"``) or ``(I - Pi) tau_i``
   (``"project"``).
5. Rank truncation of every 2-D attention/MLP weight matrix of every residual to
   ``q = max(1, floor(rho * min(m, n)))`` singular triplets; other tensors unchanged.
6. Norm matching: ``r_bar = mean_i (m_bar / ||r_i||) r_i`` with ``m_bar = mean_i ||r_i||``.
7. ``tau* = tau_core + eta * r_bar``, ``eta = alpha * ||tau_core|| / ||r_bar||`` (``"norm_ratio"``)
   or ``eta = alpha`` (``"fixed"``). Plain-mean keys get ``mean_i tau_i``.
8. Head: element-wise mean of the specialists' heads.

Norms in steps 6-7 are taken over the Real-estimate keys.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Sequence

import torch

from lorax_cil.merging.gram import GramCache, real_projection
from lorax_cil.merging.methods import stack_deltas
from lorax_cil.merging.result import (
    MergeResult,
    check_task_vectors,
    merged_vector,
    register_merge_method,
)
from lorax_cil.merging.task_vectors import TaskVector

__all__ = [
    "r2m",
    "NORM_PATTERN",
    "BIAS_PATTERN",
    "MATRIX_PATTERN",
    "RESIDUALS",
    "ETA_MODES",
    "truncation_rank",
    "truncate_matrix",
    "plain_mean_keys",
]

logger = logging.getLogger(__name__)

#: Normalisation-layer affine parameters (LayerNorm ``norm1``/``ln_1``/``LayerNorm``, BatchNorm
#: ``bn1`` and EfficientNet's ``_bn0``).
NORM_PATTERN = r"(?i)(^|\.)([^.]*norm[^.]*|ln(_[^.]+|\d+)?|_?bn\d*)\.(weight|bias)$"
#: Every bias (``.bias``, ``in_proj_bias``).
BIAS_PATTERN = r"(^|[._])bias$"
#: Attention / MLP modules whose 2-D weights are rank-truncated (timm, open_clip, HF names).
MATRIX_PATTERN = r"(?i)(^|\.)(attn|attention|self_attn|mlp|ffn|feed_forward|feedforward)(\.|$)"
RESIDUALS = ("subtract", "project")
ETA_MODES = ("norm_ratio", "fixed")
_NOISE = 1e-5  # relative residual norm treated as zero (float32 rounding of tau - tau_core)


def truncation_rank(shape: Sequence[int], rho: float) -> int:
    """``q = max(1, floor(rho * min(m, n)))`` for an ``m x n`` matrix."""
    m, n = shape
    return max(1, math.floor(rho * min(m, n) + 1e-9))


def truncate_matrix(x: torch.Tensor, rho: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Best rank-``q`` approximation of a 2-D ``x`` as factors ``(U_q S_q, V_q^T)`` and ``q``."""
    q = truncation_rank(x.shape, rho)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u[:, :q] * s[:q], vh[:q], q


def plain_mean_keys(keys: Sequence[str], *, pattern: str | None = NORM_PATTERN,
                    exclude_biases: bool = False) -> list[str]:
    """The keys left out of the Real estimate (they take the plain mean)."""
    sources = ([pattern] if pattern else []) + ([BIAS_PATTERN] if exclude_biases else [])
    pats = [re.compile(p) for p in sources]
    return [k for k in keys if any(p.search(k) for p in pats)]


def _check_options(k: int, residual: str, rho: float | None, eta_mode: str, alpha: float) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"R2M k must be a positive int, got {k!r}")
    if residual not in RESIDUALS:
        raise ValueError(f"R2M residual must be one of {list(RESIDUALS)}, got {residual!r}")
    if rho is not None and not 0.0 < rho <= 1.0:
        raise ValueError(f"R2M rho must be in (0, 1] or None (no truncation), got {rho!r}")
    if eta_mode not in ETA_MODES:
        raise ValueError(f"R2M eta_mode must be one of {list(ETA_MODES)}, got {eta_mode!r}")
    if not math.isfinite(alpha):
        raise ValueError(f"R2M alpha must be finite, got {alpha!r}")


def _combine(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum_j coef[j] x[j]`` (coef: (N,)) or, for coef (N, N), row ``i`` = ``sum_j coef[j, i] x[j]``."""
    c = coef.to(x.device, x.dtype)
    if c.dim() == 1:
        return torch.tensordot(c, x, dims=([0], [0]))
    return torch.tensordot(c.T, x, dims=([1], [0]))


def _check_cache_diag(cache: GramCache, key: str, x: torch.Tensor, names: Sequence[str]) -> None:
    sq = x.reshape(x.shape[0], -1).double().pow(2).sum(1).cpu()
    cached = cache.blocks[key].diagonal()
    bad = ~torch.isclose(sq, cached, rtol=1e-5, atol=1e-12)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"R2M: the Gram cache is stale: |tau|^2 of {names[i]!r} at {key!r} is "
                         f"{float(sq[i])}, cached {float(cached[i])}")


class _Residuals:
    """Per-key residuals of every specialist: dense ``(N, *shape)`` or rank-q factors per specialist."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.dense: dict[str, torch.Tensor] = {}
        self.factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.sq = torch.zeros(n, dtype=torch.float64)
        self.ranks: dict[str, int] = {}

    def add(self, key: str, res: torch.Tensor, rho: float | None, truncate: bool) -> None:
        if rho is None or not truncate:
            self.dense[key] = res
            self.sq += res.reshape(self.n, -1).double().pow(2).sum(1).cpu()
            return
        parts = []
        for i in range(self.n):
            us, vh, q = truncate_matrix(res[i], rho)
            parts.append((us, vh))
            self.sq[i] += float(us.double().pow(2).sum())  # ||U_q S_q V_q^T||_F^2 = sum of s_j^2
            self.ranks[key] = q
        self.factors[key] = parts

    def mean(self, key: str, scales: torch.Tensor) -> torch.Tensor:
        """``(1/N) sum_i scales[i] r_i[key]``."""
        if key in self.dense:
            return _combine(scales / self.n, self.dense.pop(key))
        parts = self.factors.pop(key)
        return sum(float(scales[i]) / self.n * (us @ vh) for i, (us, vh) in enumerate(parts))


@register_merge_method("r2m")
def r2m(
    task_vectors: Sequence[TaskVector],
    *,
    k: int = 1,
    center: bool = False,
    residual: str = "subtract",
    rho: float | None = 0.1,
    norm_match: bool = True,
    eta_mode: str = "norm_ratio",
    alpha: float = 0.6,
    exclude_biases: bool = False,
    plain_mean_pattern: str | None = NORM_PATTERN,
    matrix_pattern: str = MATRIX_PATTERN,
    gram: GramCache | None = None,
    eig_rtol: float = 1e-9,
) -> MergeResult:
    """Real-aware residual merging (see the module docstring and ``docs/merging.md``).

    Args:
        k: Real subspace dimension (top-k right singular vectors).
        center: centre the task matrix (``M - 1 tau_bar^T``) before the SVD.
        residual: ``"subtract"`` (``tau_i - tau_core``) or ``"project"`` (``(I - Pi) tau_i``).
        rho: rank-truncation ratio for 2-D attention/MLP matrices; ``None`` disables truncation.
        norm_match: rescale every (truncated) residual to the mean residual norm before averaging.
        eta_mode: ``"norm_ratio"`` (``eta = alpha ||tau_core|| / ||r_bar||``) or ``"fixed"``
            (``eta = alpha``).
        alpha: residual strength.
        exclude_biases: also leave every bias out of the Real estimate (plain mean).
        plain_mean_pattern: regex of keys left out of the Real estimate (default: norm layers);
            ``None`` for none.
        matrix_pattern: regex (``re.search``) of the keys of 2-D matrices that are truncated.
        gram: a :class:`GramCache` holding (at least) these sources and keys; built when ``None``.
            Returned in ``MergeResult.gram`` either way.
        eig_rtol: relative eigenvalue threshold below which a direction counts as absent.
    """
    tvs = check_task_vectors(task_vectors)
    _check_options(k, residual, rho, eta_mode, alpha)
    names, keys = [tv.name for tv in tvs], tvs[0].keys()
    plain = set(plain_mean_keys(keys, pattern=plain_mean_pattern, exclude_biases=exclude_biases))
    real = [key for key in keys if key not in plain]
    if not real:
        raise ValueError("R2M: every parameter matches the plain-mean patterns; nothing is left for "
                         "the Real estimate")
    cache = gram.select(names) if gram is not None else GramCache.build(tvs)
    g = cache.gram(real)
    proj = real_projection(g, k=k, center=center, rtol=eig_rtol)
    eye = torch.eye(len(tvs), dtype=torch.float64)
    res_coef = eye - proj.core[:, None] if residual == "subtract" else eye - proj.q
    deltas, residuals, core_norm = _core_and_residuals(tvs, real, proj.core, res_coef, rho, matrix_pattern,
                                                       cache if gram is not None else None)
    norms = residuals.sq.sqrt()
    alive = norms > _NOISE * g.diagonal().clamp_min(0).sqrt()
    scales, m_bar = _scales(norms, alive, norm_match)
    rbar = {key: residuals.mean(key, scales) for key in real}
    rbar_norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in rbar.values()))
    if eta_mode == "fixed":
        eta = float(alpha)
    else:
        eta = float(alpha) * core_norm / rbar_norm if rbar_norm > 0 else 0.0
    for key in keys:
        deltas[key] = deltas[key] + eta * rbar[key] if key in rbar else stack_deltas(tvs, key).mean(0)
    options = {"k": k, "center": bool(center), "residual": residual, "rho": rho,
               "norm_match": bool(norm_match), "eta_mode": eta_mode, "alpha": float(alpha),
               "exclude_biases": bool(exclude_biases), "plain_mean_pattern": plain_mean_pattern,
               "matrix_pattern": matrix_pattern}
    info: dict[str, Any] = {
        **proj.info(), "core_coefficients": [float(v) for v in proj.core],
        "eta": eta, "core_norm": core_norm, "residual_bar_norm": rbar_norm,
        "residual_norms": {nm: float(v) for nm, v in zip(names, norms)}, "mean_residual_norm": m_bar,
        "dropped_residuals": [nm for nm, a in zip(names, alive) if not a],
        "truncated": dict(residuals.ranks), "plain_mean_keys": sorted(plain), "real_keys": len(real),
        "gram_reused": gram is not None,
    }
    logger.info("R2M: N=%d, rank %d, eta=%.4g, |core|=%.4g, |r_bar|=%.4g, %d matrices truncated",
                len(tvs), proj.rank, eta, core_norm, rbar_norm, len(residuals.ranks))
    return MergeResult(method="r2m", options=options, sources=names,
                       task_vector=merged_vector(tvs, deltas, "r2m"), info=info, gram=cache)


def _core_and_residuals(
    tvs: list[TaskVector], real: list[str], core_coef: torch.Tensor, res_coef: torch.Tensor,
    rho: float | None, matrix_pattern: str, cache: GramCache | None,
) -> tuple[dict[str, torch.Tensor], _Residuals, float]:
    """One pass over the Real keys: ``tau_core`` per key, the (truncated) residuals, ``||tau_core||``.

    With a reused ``cache``, its diagonal is checked against the task vectors on the way.
    """
    mrx = re.compile(matrix_pattern)
    names = [tv.name for tv in tvs]
    deltas: dict[str, torch.Tensor] = {}
    residuals = _Residuals(len(tvs))
    core_sq = 0.0
    for key in real:
        x = stack_deltas(tvs, key)
        if cache is not None:
            _check_cache_diag(cache, key, x, names)
        core = _combine(core_coef, x)
        core_sq += float(core.double().pow(2).sum())
        deltas[key] = core
        residuals.add(key, _combine(res_coef, x), rho, x.dim() == 3 and bool(mrx.search(key)))
    return deltas, residuals, math.sqrt(core_sq)


def _scales(norms: torch.Tensor, alive: torch.Tensor, norm_match: bool) -> tuple[torch.Tensor, float]:
    """Per-residual weights before the uniform mean, and ``m_bar``.

    A residual below ``_NOISE * |tau_i|`` is rounding noise (one specialist, identical
    specialists): it gets weight 0 instead of being blown up by norm matching or the norm-ratio eta.
    """
    m_bar = float(norms[alive].mean()) if bool(alive.any()) else 0.0
    if not norm_match:
        return alive.to(torch.float64), m_bar
    return torch.where(alive, m_bar / norms.clamp_min(1e-300), torch.zeros_like(norms)), m_bar
