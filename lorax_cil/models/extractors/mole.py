"""``"mole"``: a new MoLE adapter (shared LoRA + routed LoRA experts) per task, see
:mod:`lorax_cil.models.mole`."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch

from lorax_cil.models.extractors.base import Tail, register_extractor
from lorax_cil.models.extractors.lora import AdapterExtractor
from lorax_cil.models.lora import lora_layers
from lorax_cil.models.mole import (
    MoleSpec,
    add_mole_adapter,
    collect_balance_losses,
    inject_mole,
    load_mole_adapter_state_dict,
    mole_adapter_state_dict,
)

__all__ = ["MoleExtractor"]


@register_extractor("mole")
class MoleExtractor(AdapterExtractor):
    """One MoLE adapter per task on the MLP linears of the adapted blocks (``spec``:
    :class:`MoleSpec`); training forwards add the weighted load-balancing losses."""

    spec_key = "mole"
    spec_type = MoleSpec

    @classmethod
    def configure(cls, spec: Any, adapt_blocks: int | None, num_blocks: int) -> tuple[Any, int | None]:
        """``adapt_blocks=None`` takes ``spec.blocks``; a given ``adapt_blocks`` replaces it."""
        spec = spec or MoleSpec()
        if adapt_blocks is None and spec.blocks is not None:
            adapt_blocks = min(spec.blocks, num_blocks)
        return dataclasses.replace(spec, blocks=adapt_blocks), adapt_blocks

    def __init__(self, tail: Tail, spec: Any = None) -> None:
        super().__init__(tail, spec)
        bb = tail.backbone
        self.targets = inject_mole(bb.model, spec, block_names=bb.spec.block_names)
        self.layers = lora_layers(bb.model)

    def new_adapter(self) -> int:
        return add_mole_adapter(self.root, self.spec)

    def with_aux_loss(self, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        with collect_balance_losses() as losses:
            feats = run()
        aux = self.spec.balance_weight * torch.stack(losses).sum() if losses else None
        return feats, aux

    def task_state_dict(self, t: int) -> dict[str, torch.Tensor]:
        return mole_adapter_state_dict(self.root, t)

    def load_task_state_dict(self, t: int, sd: Mapping[str, torch.Tensor]) -> None:
        load_mole_adapter_state_dict(self.root, t, sd)
