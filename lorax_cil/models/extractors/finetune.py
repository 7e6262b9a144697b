"""``"finetune"``: one shared trainable copy of the tail, never frozen (fine-tuning baselines)."""

from __future__ import annotations

from lorax_cil.models.extractors.base import register_extractor
from lorax_cil.models.extractors.full import FullCopies

__all__ = ["FineTune"]


@register_extractor("finetune")
class FineTune(FullCopies):
    """A single :class:`~lorax_cil.models.extractors.full.TailCopy` made at task 0 that keeps
    training on every task: one feature block, no divergence head."""

    grows = False

    def add_task(self, t: int) -> None:
        if t == 0:
            self.extractors.append(self.new_copy(None))

    def freeze(self, t: int) -> None:
        """Never frozen: the shared copy trains on every task."""
