"""Data-parallel training of the LoRAX family under ``torchrun`` (an Avalanche plugin).

Why not wrap the model in ``DistributedDataParallel``: the strategy calls
``net.forward_all`` rather than ``model(x)``, the set of parameters that train changes every task
(old extractors are frozen, so DDP's reducer would wait for gradients that never come: "expected
to have finished reduction"), and DDP would have to be rebuilt after every growth step. The
plugin instead does what DDP does, on exactly the parameters the optimiser holds:

* ``before_training_exp``: rank 0's trainable weights are broadcast (every rank starts each task
  from identical weights), and the training loader is replaced by one over a
  :class:`~lorax_cil.distributed.GlobalBatchSampler`: every step's *global* batch of
  ``train.batch_size`` samples is the batch a single process would draw with the same seed, and
  each rank gets one contiguous part of it;
* ``before_training_epoch``: the epoch's shuffling seed is drawn from the global RNG in the
  position a single-process loader draws it, and rank 0's value is broadcast;
* ``before_update``: the gradients of the optimised parameters are replaced by their
  sample-weighted mean over ranks (:func:`~lorax_cil.distributed.allreduce_gradients`), which is
  the gradient of the mean loss over the global batch.

Frozen adapters, the frozen trunk and old heads are never communicated.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from avalanche.core import SupervisedPlugin

from lorax_cil.distributed import (
    GlobalBatchSampler,
    allreduce_gradients,
    broadcast_object,
    broadcast_parameters,
)

__all__ = ["DistributedTraining"]

logger = logging.getLogger(__name__)


def _draw_int64() -> int:
    return int(torch.empty((), dtype=torch.int64).random_().item())


class DistributedTraining(SupervisedPlugin, supports_distributed=True):
    """Shard global batches over ranks and average gradients of the trainable parameters.

    Args:
        num_workers: data-loader workers of the sharded training loader.
    """

    def __init__(self, *, num_workers: int = 0) -> None:
        super().__init__()
        self.num_workers = int(num_workers)
        self.sampler: GlobalBatchSampler | None = None
        self._step = 0
        self.samples_seen = 0

    def _optimised(self, strategy: Any) -> list[torch.nn.Parameter]:
        return [p for g in strategy.optimizer.param_groups for p in g["params"]]

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        from torch.utils.data import DataLoader

        broadcast_parameters(self._optimised(strategy))
        data = strategy.adapted_dataset
        self.sampler = GlobalBatchSampler(len(data), strategy.train_mb_size)
        workers = self.num_workers
        strategy.dataloader = DataLoader(
            data, batch_sampler=self.sampler, num_workers=workers,
            collate_fn=getattr(data, "collate_fn", None),
            pin_memory=strategy.device.type == "cuda", persistent_workers=workers > 0,
        )

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        # A single-process DataLoader(shuffle=True) draws two int64 from the global RNG when
        # its epoch starts: the iterator's base seed, then the sampler's shuffling seed. Peek at
        # the second without moving the stream; the sharded loader then draws both itself.
        state = torch.get_rng_state()
        _draw_int64()
        seed = _draw_int64()
        torch.set_rng_state(state)
        assert self.sampler is not None
        self.sampler.set_seed(broadcast_object(seed))
        self.sampler.consume_rng = True
        self._step = 0

    def before_update(self, strategy: Any, **kwargs: Any) -> None:
        assert self.sampler is not None
        local = self.sampler.local_counts[self._step]
        self.samples_seen += allreduce_gradients(self._optimised(strategy), local)

    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        self._step += 1
