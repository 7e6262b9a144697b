"""``"full"``: a trainable copy of the tail (adapted blocks + neck) per task (DER w/o pruning;
MEMO with ``adapt_blocks``)."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from lorax_cil.models.base import BlockBackbone
from lorax_cil.models.extractors.base import Extractor, register_extractor, training_mode
from lorax_cil.models.state import copy_state_strict

__all__ = ["TailCopy", "FullCopies"]


class TailCopy(nn.Module):
    """A trainable copy of the tensors the backbone tail (adapted blocks + neck) uses.

    It holds tensors, not modules: it runs by substituting its tensors into the shared backbone
    for one call (``torch.func.functional_call``). Tensor names are the backbone's qualified
    names relative to ``backbone.model`` (stored with ``.`` escaped as ``__``).
    """

    def __init__(self, *, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.param_names = list(params)
        self.buffer_names = list(buffers)
        for name, t in params.items():
            self.register_parameter(_esc(name), nn.Parameter(t.detach().clone(), requires_grad=True))
        for name, t in buffers.items():
            self.register_buffer(_esc(name), t.detach().clone())

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{qualified name: tensor}`` of every stored parameter and buffer."""
        names = self.param_names + self.buffer_names
        return {n: getattr(self, _esc(n)) for n in names}

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)


def _esc(name: str) -> str:
    return name.replace(".", "__")


class _TailRunner(nn.Module):
    """Runs blocks ``[start, L)`` + neck of a backbone (a throwaway holder for functional_call)."""

    def __init__(self, backbone: BlockBackbone, start: int) -> None:
        super().__init__()
        self.bb = backbone
        self.start = start

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.bb.neck(self.bb.run_blocks(h, self.start))


@register_extractor("full")
class FullCopies(Extractor):
    """A :class:`TailCopy` per task in ``self.extractors``; a new copy starts from the previous
    one (the first from the backbone), as DER and MEMO do."""

    def add_task(self, t: int) -> None:
        if t:
            self.freeze(t - 1)
        source = self.extractors[-1].tensors() if t else None
        self.extractors.append(self.new_copy(source))

    def freeze(self, t: int) -> None:
        self.extractors[t].freeze()

    def new_copy(self, source: Mapping[str, torch.Tensor] | None) -> TailCopy:
        """A copy of the tail's tensors from ``source`` (``None``: the backbone's own)."""
        pnames, bnames = self.tail.tensors_used()
        model = self.tail.backbone.model
        base = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        src = source if source is not None else base
        return TailCopy(params={n: src[n] for n in pnames}, buffers={n: src[n] for n in bnames})

    def features(self, h: torch.Tensor, tasks: Sequence[int], *, train: bool) -> list[torch.Tensor]:
        """The tail with copy ``t``'s tensors substituted; with ``train`` the tail's modules run
        in training mode (dropout, BatchNorm batch statistics updating the copy's buffers)."""
        bb = self.tail.backbone
        runner = _TailRunner(bb, self.tail.start)
        mods = [bb.model.get_submodule(n) for n in self.tail.modules_called()] if train else []
        out = []
        for t in tasks:
            tensors = {f"bb.model.{n}": v for n, v in self.extractors[t].tensors().items()}
            with training_mode(mods, True):
                out.append(torch.func.functional_call(runner, tensors, (h,)))
        return out

    def task_state_dict(self, t: int) -> dict[str, torch.Tensor]:
        """The copy's tensors under the backbone's own qualified names."""
        return {n: v.detach().clone() for n, v in self.extractors[t].tensors().items()}

    def load_task_state_dict(self, t: int, sd: Mapping[str, torch.Tensor]) -> None:
        copy_state_strict(self.extractors[t].tensors(), sd, f"extractor {t}")
