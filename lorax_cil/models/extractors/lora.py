"""``"lora"``: a new LoRA adapter per task inside the shared backbone (LoRAX).

:class:`AdapterExtractor` holds what LoRA and MoLE share: adapters live in Multi-LoRA wrappers
of the backbone's tail layers, only :func:`~lorax_cil.models.lora.lora_group` activates them,
and several adapters run as one batched pass over the repeated trunk output.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from lorax_cil.models.extractors.base import Extractor, Tail, register_extractor
from lorax_cil.models.lora import (
    LoraSpec,
    MultiLoRALayer,
    adapter_parameters,
    adapter_state_dict,
    add_lora_adapter,
    freeze_adapter,
    inject_lora,
    load_adapter_state_dict,
    lora_group,
    lora_layers,
)

__all__ = ["AdapterExtractor", "LoraExtractor", "wrap_tail"]


def wrap_tail(tail: Tail, spec: LoraSpec) -> tuple[list[str], list[MultiLoRALayer]]:
    """Wrap the layers of ``tail`` that ``spec`` targets in Multi-LoRA wrappers (the backbone
    family's target presets apply); returns the wrapped names and the wrappers."""
    bb = tail.backbone
    presets = bb.lora_target_presets() if hasattr(bb, "lora_target_presets") else {}
    extra = tail.neck_modules()  # probed before wrapping: the neck may hold targets too
    targets = inject_lora(bb.model, spec, preset_regexes=presets,
                          block_names=bb.spec.block_names[tail.start :], extra_names=extra)
    return targets, lora_layers(bb.model)


class AdapterExtractor(Extractor):
    """Adapters inside the backbone's wrapped layers (``self.layers``), one per task.

    Subclasses wrap the layers in ``__init__`` (setting ``targets`` and ``layers``) and define
    :meth:`new_adapter`; the state methods default to plain LoRA adapters.
    """

    layers: list[MultiLoRALayer]

    @property
    def root(self) -> nn.Module:
        return self.tail.backbone.model

    def new_adapter(self) -> int:  # pragma: no cover - abstract
        """Append one adapter to every wrapped layer; returns its index."""
        raise NotImplementedError

    def add_task(self, t: int) -> None:
        if t:
            self.freeze(t - 1)
        index = self.new_adapter()
        assert index == t, (index, t)

    def freeze(self, t: int) -> None:
        freeze_adapter(self.root, t)

    def train(self, mode: bool = True) -> "AdapterExtractor":
        """The newest adapter follows ``mode``; frozen ones never apply dropout anyway."""
        super().train(mode)
        n = self.layers[0].num_adapters if self.layers else 0
        if n:
            for layer in self.layers:
                layer.adapters[n - 1].train(mode)
        return self

    def features(self, h: torch.Tensor, tasks: Sequence[int], *, train: bool) -> list[torch.Tensor]:
        """Features of adapters ``tasks``, batched in groups of :meth:`Tail.group_size`."""
        tasks = list(tasks)
        size = self.tail.group_size(h, len(tasks))
        feats: list[torch.Tensor] = []
        for i in range(0, len(tasks), size):
            group = tasks[i : i + size]
            hh = h.repeat((len(group),) + (1,) * (h.dim() - 1)) if len(group) > 1 else h
            with lora_group(self.layers, group):
                feats.extend(self.tail(hh).chunk(len(group), dim=0))
        return feats

    def parameters_of(self, t: int) -> list[nn.Parameter]:
        return adapter_parameters(self.root, t)

    def task_state_dict(self, t: int) -> dict[str, torch.Tensor]:
        return adapter_state_dict(self.root, t)

    def load_task_state_dict(self, t: int, sd: Mapping[str, torch.Tensor]) -> None:
        load_adapter_state_dict(self.root, t, sd)


@register_extractor("lora")
class LoraExtractor(AdapterExtractor):
    """One LoRA adapter per task on the targeted layers of the tail (``spec``: :class:`LoraSpec`)."""

    spec_key = "lora"
    spec_type = LoraSpec

    def __init__(self, tail: Tail, spec: Any = None) -> None:
        super().__init__(tail, spec)
        self.targets, self.layers = wrap_tail(tail, spec)

    def new_adapter(self) -> int:
        return add_lora_adapter(self.root, self.spec)
