"""The block-structured backbone interface every registry entry implements.

A backbone is exposed as ``stem -> blocks[0] -> ... -> blocks[L-1] -> neck``. "Block" means the
same for every family because each entry declares its ordered blocks (ViT transformer blocks, CNN
stages or inverted-residual blocks). This is what lets the expandable network share a frozen trunk
(``stem`` + ``blocks[:L-k]``) and run only the last ``k`` blocks once per task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

__all__ = ["BackboneSpec", "BlockBackbone", "TaskClassCounts"]


@dataclass(frozen=True)
class BackboneSpec:
    """Static facts about a backbone: what it expects and what it returns.

    Attributes:
        name: registry name the backbone was created from.
        family: implementation family (``"timm"``, ``"open_clip"``, ``"efficientnet-lite"``, ...).
        feature_dim: size of the pooled feature returned by :meth:`BlockBackbone.neck`.
        input_size: square input resolution in pixels.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        interpolation: resize interpolation named as in PIL / torchvision (``"bicubic"``, ...).
        crop_pct: centre-crop fraction used by the backbone's own evaluation transform.
        weights: description of the weights that were loaded (``"random"``, a tag or a path).
        block_names: qualified module names of the ordered blocks inside :attr:`BlockBackbone.model`.
    """

    name: str
    family: str
    feature_dim: int
    input_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    weights: str = "random"
    block_names: tuple[str, ...] = field(default_factory=tuple)

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)


class BlockBackbone(nn.Module):
    """A frozen image backbone exposed as ``stem``, ordered ``blocks`` and ``neck``.

    Subclasses wrap a concrete model (``self.model``) and implement :meth:`stem`,
    :meth:`run_block` and :meth:`neck`. ``forward(x)`` returns the pooled feature ``(B, D)``.
    All parameters are frozen on construction; adapters are added by the expandable network.
    """

    spec: BackboneSpec

    def __init__(self, *, model: nn.Module, spec: BackboneSpec) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        for p in self.model.parameters():
            p.requires_grad_(False)

    # --- structure -------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.spec.num_blocks

    @property
    def feature_dim(self) -> int:
        return self.spec.feature_dim

    def block(self, index: int) -> nn.Module:
        """The module of block ``index`` (negative indices count from the end)."""
        name = self.spec.block_names[index]
        return self.model.get_submodule(name)

    def blocks(self) -> list[nn.Module]:
        return [self.model.get_submodule(n) for n in self.spec.block_names]

    def to_channels_last(self) -> "BlockBackbone":
        """Store the model's 4-D weights channels-last (NHWC), so that its convolutions, and
        the activations they produce, run in that layout (``model.channels_last``); returns
        ``self``. Values are unchanged; results change only by float rounding."""
        self.model.to(memory_format=torch.channels_last)
        return self

    # --- computation -----------------------------------------------------------------------
    def stem(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Everything before block 0 (patch embedding, position embedding, ...)."""
        raise NotImplementedError

    def run_block(self, index: int, h: torch.Tensor) -> torch.Tensor:
        """Run block ``index`` on hidden state ``h``.

        Families whose token layout changes between blocks (ConViT inserts its class token
        before the first non-local block) override this.
        """
        return self.block(index)(h)

    def run_blocks(self, h: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Run blocks ``start`` (inclusive) to ``end`` (exclusive) on ``h``."""
        end = self.num_blocks if end is None else end
        for i in range(start, end):
            h = self.run_block(i, h)
        return h

    def neck(self, h: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Everything after the last block, down to the pooled feature ``(B, feature_dim)``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.run_blocks(self.stem(x)))

    def extra_repr(self) -> str:
        s = self.spec
        return f"name={s.name!r}, family={s.family!r}, blocks={s.num_blocks}, dim={s.feature_dim}"


class TaskClassCounts:
    """Mixin for class-incremental networks that record ``task_classes`` (classes per task)."""

    task_classes: list[int]

    @property
    def num_tasks(self) -> int:
        return len(self.task_classes)

    @property
    def num_classes(self) -> int:
        return sum(self.task_classes)


def _check_names(names: Sequence[str], model: nn.Module) -> None:
    """Raise if a declared block name is not a submodule of ``model``."""
    known = dict(model.named_modules())
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"backbone declares blocks that do not exist: {missing[:5]}")
