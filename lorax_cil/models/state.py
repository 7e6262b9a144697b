"""Strict state copies shared by every model that loads tensors by name."""

from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["copy_state_strict"]


def copy_state_strict(target: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], what: str) -> None:
    """Copy ``sd`` into the tensors of ``target`` in place; names and shapes must match exactly.

    Raises:
        ValueError: ``"<what> state mismatch: missing [...], unexpected [...]"`` or a shape
            mismatch naming the key; nothing is copied in either case.
    """
    missing, unexpected = sorted(set(target) - set(sd)), sorted(set(sd) - set(target))
    if missing or unexpected:
        raise ValueError(f"{what} state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, t in target.items():
        if sd[k].shape != t.shape:
            raise ValueError(f"{what} state {k!r}: shape {tuple(sd[k].shape)} != {tuple(t.shape)}")
    with torch.no_grad():
        for k, t in target.items():
            t.copy_(sd[k])
