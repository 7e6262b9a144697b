"""``"frozen"``: no extractor; the feature is the frozen backbone's (linear probe, SimpleCIL, L2P)."""

from __future__ import annotations

from typing import Sequence

import torch

from lorax_cil.models.extractors.base import Extractor, register_extractor

__all__ = ["Frozen"]


@register_extractor("frozen")
class Frozen(Extractor):
    """The plain tail under ``no_grad``: one feature block, no learned tensors."""

    grows = False
    learns = False

    def add_task(self, t: int) -> None:
        """Nothing to add."""

    def freeze(self, t: int) -> None:
        """Nothing to freeze."""

    def features(self, h: torch.Tensor, tasks: Sequence[int], *, train: bool) -> list[torch.Tensor]:
        with torch.no_grad():
            f = self.tail(h)
        return [f for _ in tasks]
