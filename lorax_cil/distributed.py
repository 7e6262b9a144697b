"""Multi-process training with ``torch.distributed``: process group, collectives, sharding.

Launched by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``), every process runs the same command. :func:`distributed_session` initialises the
default process group from those variables (NCCL when the run uses CUDA, gloo on CPU) and tears
it down at the end; without them (a plain ``lorax-cil train``) nothing is initialised and every
helper here answers as a single process would (rank 0 of a world of 1).

The training side (global batches sharded over ranks, gradients of the trainable parameters
averaged by all-reduce, see :mod:`lorax_cil.training.ddp`) only needs the pieces below:

* :func:`rank`, :func:`world_size`, :func:`local_rank`, :func:`is_main`, :func:`barrier`;
* :func:`broadcast_object` / :func:`all_gather_objects` (pickled objects between *our own*
  processes, never from files);
* :func:`shard_bounds` and :func:`gather_ordered` (evaluation: each rank scores one contiguous
  part, the parts are gathered and put back in dataset order, each sample exactly once);
* :class:`GlobalBatchSampler` (each optimisation step sees the batch a single process would see,
  split over the ranks) and :func:`allreduce_gradients` (the exact mean-loss gradient of that
  global batch, whatever the split);
* :func:`broadcast_parameters` (identical trainable weights on every rank).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

__all__ = [
    "DistInfo", "distributed_session", "env_world_size", "is_distributed", "rank", "world_size",
    "local_rank", "is_main", "barrier", "broadcast_object", "on_main", "all_gather_objects",
    "shard_bounds", "gather_ordered", "local_device", "broadcast_parameters", "allreduce_gradients",
    "GlobalBatchSampler",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when absent)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as exc:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from exc


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """Global rank (0 without a process group)."""
    dist = _dist()
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    dist = _dist()
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    """Rank on this node (``LOCAL_RANK``; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on the process that writes files and prints (rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        _dist().barrier()


def _wants_cuda(device: str) -> bool:
    import torch

    if device == "auto":
        return torch.cuda.is_available()
    return str(device).startswith("cuda")


@contextlib.contextmanager
def distributed_session(device: str = "auto", *, backend: str | None = None,
                        timeout_s: float = 1800.0,
                        import_avalanche: bool = True) -> Iterator[DistInfo | None]:
    """Initialise the default process group from torchrun's environment for the ``with`` body.

    Yields ``None`` (and does nothing) when ``WORLD_SIZE`` is absent or 1. Otherwise it picks
    NCCL when ``device`` resolves to CUDA and gloo otherwise (``backend`` overrides), binds the
    process to GPU ``LOCAL_RANK``, and destroys the group on exit (after a barrier when the body
    ended normally). ``import_avalanche`` imports
    avalanche first (it refuses to build its import-time loggers in a non-main process once a
    group exists); code that never imports avalanche can skip that.

    Raises:
        ValueError: CUDA is requested but this node has fewer GPUs than local ranks.
    """
    import datetime

    import torch

    if env_world_size() == 1 or _dist().is_initialized():
        yield None
        return
    cuda = _wants_cuda(device)
    if cuda:
        if not torch.cuda.is_available() or torch.cuda.device_count() <= local_rank():
            raise ValueError(f"train.device={device!r} with LOCAL_RANK={local_rank()}, but this node "
                             f"has {torch.cuda.device_count() if torch.cuda.is_available() else 0} "
                             "GPU(s): start at most one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(local_rank())
    backend = backend or ("nccl" if cuda else "gloo")
    if import_avalanche:  # see the docstring
        import avalanche.training  # noqa: F401

    dist = _dist()
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank(), backend)
    logger.info("process group: rank %d of %d (local rank %d), %s", info.rank, info.world_size,
                info.local_rank, backend)
    try:
        yield info
        # every process leaves together: a rank still receiving the last collective would
        # abort if another destroyed the group under it (not after an error: it would hang)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def local_device(device: Any) -> Any:
    """``device`` bound to this process's GPU under torchrun (``cuda`` -> ``cuda:LOCAL_RANK``)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", local_rank())
    return device


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled between our own processes)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` computed on rank 0 only (e.g. reading files) and received by every rank; an
    exception raised there is raised on every rank, with its message."""
    if not is_distributed():
        return fn()
    box: tuple[str, Any] | None = None
    if is_main():
        try:
            box = ("ok", fn())
        except Exception as exc:  # re-raised below on every rank
            box = ("error", (type(exc).__name__, str(exc)))
            broadcast_object(box)
            raise
    kind, value = broadcast_object(box)
    if kind == "error":
        name, message = value
        raise RuntimeError(f"rank 0 failed: {name}: {message}")
    return value


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def shard_bounds(n: int, *, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """``[start, stop)`` of this rank's contiguous part of ``n`` items (parts differ by <= 1).

    Parts are never padded: the union over ranks is ``range(n)``, each index once.
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    base, extra = divmod(int(n), w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def gather_ordered(n: int, start: int, parts: Sequence[Any]) -> list[list[Any]]:
    """Gather each rank's per-item ``parts`` (lists covering ``[start, start + len)``) and return
    them in global item order, checking that every one of the ``n`` items came exactly once.

    ``parts`` is a sequence of columns (e.g. predictions, labels), each of the shard's length.

    Raises:
        RuntimeError: the gathered shards do not tile ``range(n)`` (an item missing or counted
            twice).
    """
    lengths = {len(p) for p in parts}
    if len(lengths) > 1:
        raise ValueError(f"columns of one shard differ in length: {sorted(lengths)}")
    shards = all_gather_objects((int(start), [list(p) for p in parts]))
    shards.sort(key=lambda s: s[0])
    expected = 0
    columns: list[list[Any]] = [[] for _ in parts]
    for begin, cols in shards:
        size = len(cols[0]) if cols else 0
        if begin != expected:
            raise RuntimeError(f"evaluation shards do not tile the dataset: a shard starts at "
                               f"{begin}, expected {expected}")
        for acc, col in zip(columns, cols):
            acc.extend(col)
        expected += size
    if expected != n:
        raise RuntimeError(f"evaluation shards hold {expected} samples, the dataset {n}")
    return columns


def _comm_device() -> Any:
    import torch

    if _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_parameters(params: Iterable[Any], src: int = 0) -> None:
    """Copy rank ``src``'s values of ``params`` (tensors, in the same order everywhere) in place."""
    if not is_distributed():
        return
    import torch

    dist = _dist()
    dev = _comm_device()
    with torch.no_grad():
        for p in params:
            buf = p.data.to(dev)
            dist.broadcast(buf, src=src)
            if buf is not p.data:
                p.data.copy_(buf)


def allreduce_gradients(params: Sequence[Any], local_count: int, *,
                        bucket_bytes: int = 25 * 2**20) -> int:
    """Replace the gradients of ``params`` by the sample-weighted mean over ranks.

    Every rank computed gradients of a *mean* loss over its ``local_count`` samples of one global
    batch; the result ``sum_r n_r g_r / sum_r n_r`` is the gradient a single process gets from the
    mean loss over the whole global batch, however unevenly it was split (a rank with 0 samples
    contributes nothing). A parameter keeps ``grad=None`` only when it has none on every rank,
    as in a single process. Gradients travel in flat buckets of about ``bucket_bytes``.

    Returns:
        the global number of samples of the step.
    """
    if not is_distributed():
        return int(local_count)
    import torch

    dist = _dist()
    dev = _comm_device()
    params = list(params)
    header = torch.zeros(1 + len(params), dtype=torch.float64, device=dev)
    header[0] = float(local_count)
    for i, p in enumerate(params):
        header[1 + i] = 0.0 if p.grad is None else 1.0
    dist.all_reduce(header)
    total = int(round(header[0].item()))
    has_grad = (header[1:] > 0).tolist()
    live = [p for p, h in zip(params, has_grad) if h]
    scale = float(local_count) / max(total, 1)
    for bucket in _buckets(live, bucket_bytes):
        flat = torch.cat([(p.grad.detach() * scale if p.grad is not None
                           else torch.zeros_like(p.data)).reshape(-1).to(dev, torch.float32)
                          for p in bucket])
        dist.all_reduce(flat)
        offset = 0
        for p in bucket:
            k = p.numel()
            g = flat[offset:offset + k].view_as(p.data).to(p.data.device, p.data.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            offset += k
    return total


def _buckets(params: Sequence[Any], limit: int) -> Iterator[list[Any]]:
    bucket: list[Any] = []
    size = 0
    for p in params:
        bucket.append(p)
        size += p.numel() * 4
        if size >= limit:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


class GlobalBatchSampler:
    """Batch sampler: the global batches of one shuffled epoch, this rank's part of each.

    Each epoch draws one permutation of ``n`` indices from ``seed`` (set by :meth:`set_seed` before
    iterating; identical on every rank) or from ``generator`` (seeded identically on every rank,
    used as a ``DataLoader(shuffle=True, generator=...)`` uses it), cuts it into global batches of
    ``batch_size`` exactly as a single-process ``DataLoader(shuffle=True)`` with that seed would,
    and yields this rank's contiguous part of every global batch (:func:`shard_bounds`). A rank
    whose part of a short last batch is empty gets the batch's first index as a stand-in and a
    weight of 0 in :attr:`local_counts` (the gradient all-reduce ignores it), so every rank runs the
    same number of steps.

    Attributes:
        local_counts: real samples of this rank per step of the current epoch.
        consume_rng: draw one int64 from the global torch RNG per epoch, as a shuffling
            ``RandomSampler`` does (keeps the RNG stream of a single-process run).
    """

    def __init__(self, n: int, batch_size: int, *, rank_: int | None = None,
                 world: int | None = None, drop_last: bool = False,
                 generator: Any = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.drop_last = int(n), int(batch_size), bool(drop_last)
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world
        self.seed: int | None = None
        self.generator = generator
        self.consume_rng = False
        self.local_counts: list[int] = []

    def set_seed(self, seed: int) -> None:
        self.seed = int(seed)

    def global_batches(self) -> list[list[int]]:
        """The epoch's global batches (before sharding)."""
        import torch

        if self.generator is not None:
            gen = self.generator
        elif self.seed is None:
            raise RuntimeError("GlobalBatchSampler.set_seed must be called before each epoch")
        else:
            gen = torch.Generator()
            gen.manual_seed(self.seed)
        perm = torch.randperm(self.n, generator=gen).tolist()
        batches = [perm[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[list[int]]:
        import torch

        if self.consume_rng:  # draw what a RandomSampler draws, so the global RNG stream
            torch.empty((), dtype=torch.int64).random_()  # matches a single-process run
        batches = self.global_batches()
        self.local_counts = []
        parts = []
        for b in batches:
            lo, hi = shard_bounds(len(b), rank_=self.rank, world=self.world)
            part = b[lo:hi]
            self.local_counts.append(len(part))
            parts.append(part if part else b[:1])
        yield from parts
