"""Exemplar memory: a fixed total budget, class-balanced, herding selection (iCaRL).

Built on avalanche-lib's storage policies: :class:`HerdingMemory` is a ``ParametricBuffer`` grouped
by class (the budget is split evenly over every class seen so far; older classes take the
remainder), and :class:`FeatureHerding` is a ``HerdingSelectionStrategy`` that computes features
with the *current* model, in eval mode, on eval transforms (no augmentation), through a feature
function rather than a forward hook (so it never goes stale when a strategy replaces its model).

Under ``torchrun`` the memory is global: herding runs once, on rank 0 (eval transforms, no
augmentation), and every rank receives its order, so all ranks hold the same exemplars and the
budget holds for the whole job, not per process.

Buffers are avalanche dataset *views* (subset indices into the experience datasets), so images
are re-read from disk, never stored as tensors. :meth:`HerdingMemory.state` returns the
exemplars as (class, path) pairs for checkpoints, and :meth:`HerdingMemory.restore` rebuilds the
views from them.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

import torch
from avalanche.training.storage_policy import HerdingSelectionStrategy, ParametricBuffer
from torch.utils.data import DataLoader

__all__ = ["FeatureHerding", "HerdingMemory", "herding_order"]

logger = logging.getLogger(__name__)

FeatureFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def herding_order(features: torch.Tensor, limit: int | None = None) -> list[int]:
    """Greedy herding order (iCaRL): each pick moves the running mean closest to the class mean.

    Features are L2-normalised first, as in iCaRL. Only the first ``limit`` picks are ranked;
    the remaining indices follow in their original order (they are cut first).
    """
    n = features.shape[0]
    if n == 0:
        return []
    f = torch.nn.functional.normalize(features.double(), dim=1)
    center = f.mean(dim=0)
    k = n if limit is None else min(n, max(0, int(limit)))
    selected: list[int] = []
    taken = torch.zeros(n, dtype=torch.bool)
    running = torch.zeros_like(center)
    for i in range(k):
        candidates = (running * i + f) / (i + 1)
        dist = ((candidates - center) ** 2).sum(dim=1)
        dist[taken] = math.inf
        j = int(torch.argmin(dist))
        selected.append(j)
        taken[j] = True
        running = candidates[j]
    selected.extend(i for i in range(n) if not taken[i])
    return selected


class FeatureHerding(HerdingSelectionStrategy):
    """Herding on features from ``feature_fn(model, x)``, eval mode and eval transforms.

    Args:
        feature_fn: maps ``(strategy.model, images)`` to ``(B, D)`` features.
        limit: rank only this many exemplars per class (the rest keep their order).
        num_workers: data-loader workers for the feature pass.
    """

    def __init__(self, feature_fn: FeatureFn, *, limit: int | None = None, num_workers: int = 0):
        # The parent constructor registers a forward hook on a model; we use feature_fn instead.
        self.feature_fn = feature_fn
        self.limit = limit
        self.num_workers = num_workers

    def make_sorted_indices(self, strategy: Any, data: Any) -> list[int]:
        """Herding order of ``data``. Under ``torchrun`` only rank 0 computes it (one global
        selection) and every rank receives the same order."""
        from lorax_cil.distributed import broadcast_object, is_main

        order = self._sorted_indices(strategy, data) if is_main() else None
        return broadcast_object(order)

    @torch.no_grad()
    def _sorted_indices(self, strategy: Any, data: Any) -> list[int]:
        model = strategy.model
        was_training = model.training
        model.eval()
        data = data.eval()
        loader = DataLoader(
            data,
            batch_size=strategy.eval_mb_size or 64,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=getattr(data, "collate_fn", None),
        )
        feats = [self.feature_fn(model, batch[0].to(strategy.device)).float().cpu()
                 for batch in loader]
        model.train(was_training)
        if not feats:
            return []
        return herding_order(torch.cat(feats), self.limit)

    def make_sorted_indices_from_features(self, features: torch.Tensor) -> list[int]:
        return herding_order(features, self.limit)


class HerdingMemory(ParametricBuffer):
    """Class-balanced exemplar memory with a fixed total budget and herding selection.

    Args:
        max_size: total number of exemplars over all classes (the LoRAX paper uses 500).
        feature_fn: features used for herding, ``feature_fn(model, x) -> (B, D)``.
        num_workers: data-loader workers for the feature pass.
    """

    def __init__(self, *, max_size: int, feature_fn: FeatureFn, num_workers: int = 0) -> None:
        if max_size < 0:
            raise ValueError(f"memory size must be >= 0, got {max_size}")
        self.herding = FeatureHerding(feature_fn, num_workers=num_workers)
        super().__init__(max_size, groupby="class", selection_strategy=self.herding)

    def post_adapt(self, agent: Any, exp: Any) -> None:
        """Add the experience's classes and re-balance every class to the budget."""
        if self.max_size == 0:
            return
        n_classes = len(self.seen_groups | set(int(c) for c in exp.dataset.targets.uniques))
        self.herding.limit = math.ceil(self.max_size / max(1, n_classes))
        super().post_adapt(agent, exp)
        total = sum(self.per_class().values())
        if total > self.max_size:
            raise RuntimeError(f"exemplar memory holds {total} samples, over its budget of "
                               f"{self.max_size}")
        logger.info("memory: %s", self.per_class())

    def per_class(self) -> dict[int, int]:
        """Exemplars stored per class."""
        return {int(c): len(g.buffer) for c, g in sorted(self.buffer_groups.items())}

    def unique_exemplars(self, paths_of: Callable[[Any], Sequence[str]]) -> set[tuple[int, str]]:
        """The stored exemplars as distinct (class, path) pairs."""
        return {(int(c), p) for c, g in self.buffer_groups.items() for p in paths_of(g.buffer)}

    def dataset(self) -> Any | None:
        """All exemplars as one avalanche dataset (train transforms), or None when empty."""
        groups = [g.buffer for _, g in sorted(self.buffer_groups.items()) if len(g.buffer)]
        if not groups:
            return None
        out = groups[0]
        for g in groups[1:]:
            out = out.concat(g)
        return out.train()

    def state(self, paths_of: Callable[[Any], Sequence[str]]) -> dict[str, list[str]]:
        """Exemplar paths per class (JSON-serialisable), via ``paths_of(dataset)``."""
        return {str(c): list(paths_of(g.buffer)) for c, g in sorted(self.buffer_groups.items())}

    def restore(self, state: dict[str, list[str]], datasets_by_class: dict[int, Any],
                paths_of: Callable[[Any], Sequence[str]]) -> None:
        """Rebuild the buffers from :meth:`state` output and the per-class source datasets.

        Raises:
            ValueError: an exemplar path is not in its class's source dataset.
        """
        from avalanche.training.storage_policy import _ParametricSingleBuffer

        self.buffer_groups = {}
        self.seen_groups = set()
        for key, paths in state.items():
            c = int(key)
            source = datasets_by_class[c]
            index = {p: i for i, p in enumerate(paths_of(source))}
            missing = [p for p in paths if p not in index]
            if missing:
                raise ValueError(
                    f"memory checkpoint names {len(missing)} exemplar(s) of class {c} that are not "
                    f"in the data any more, e.g. {missing[0]}"
                )
            buf = _ParametricSingleBuffer(len(paths), self.selection_strategy)
            buf.buffer = source.subset([index[p] for p in paths])
            self.buffer_groups[c] = buf
            self.seen_groups.add(c)
