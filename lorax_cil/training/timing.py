"""Inference cost of a trained model: milliseconds per image on evaluation data, after warm-up.

Images are loaded (and transformed) once, before timing, so the number measures the model alone;
the same image tensor is used for every model of a comparison, in the same process. The fastest
of a few passes is reported: on a shared machine it is the pass least disturbed by others.
"""

from __future__ import annotations

import time
from typing import Any

import torch

__all__ = ["evaluation_images", "inference_ms_per_image"]


def evaluation_images(test_stream: Any, *, limit: int = 256) -> torch.Tensor:
    """Up to ``limit`` evaluation images (eval transforms), taken round-robin over the tasks.

    Raises:
        ValueError: ``limit`` < 1 or the stream holds no image.
    """
    if limit < 1:
        raise ValueError(f"the number of timing images must be >= 1, got {limit}")
    datasets = [exp.dataset.eval() for exp in test_stream]
    picked: list[torch.Tensor] = []
    i = 0
    while len(picked) < limit and any(i < len(d) for d in datasets):
        for d in datasets:
            if i < len(d) and len(picked) < limit:
                picked.append(torch.as_tensor(d[i][0]))
        i += 1
    if not picked:
        raise ValueError("the evaluation stream holds no image to time inference on")
    return torch.stack(picked)


def _sync(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)


@torch.no_grad()
def inference_ms_per_image(net: Any, images: torch.Tensor, *, batch_size: int, device: Any,
                           warmup_batches: int = 1, repeats: int = 3) -> float:
    """Wall-clock milliseconds per image of ``net(x)`` in eval mode over ``images``.

    The first ``warmup_batches`` batches run untimed first (allocator, kernels, caches); then
    every image is timed ``repeats`` times and the fastest pass counts (the least disturbed by
    other processes on a shared machine).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(device)
    net.eval()
    batches = [images[i : i + batch_size].to(device) for i in range(0, len(images), batch_size)]
    for x in batches[: max(0, warmup_batches)]:
        net(x)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for x in batches:
            net(x)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 1000.0 * best / len(images)
