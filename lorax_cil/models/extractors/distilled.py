"""``"distilled-side"``: each task trains as LoRA, then lives on as a side network.

Full-depth LoRA learns a new generator best of the kinds measured (docs/class-attention.md),
but at ``T`` tasks it runs ``T`` backbone passes; a side network (:mod:`.side`) costs a
fraction of a pass per task but learns less from labels alone. This kind keeps the first one's
learning and the second one's cost. Per task ``t``:

1. **teacher**: one LoRA adapter (``spec.lora``) on the tail's layers trains as ``lora`` does,
   beside the frozen students of the older tasks (one shared frozen pass serves all of them);
2. **distillation** (:meth:`DistilledSideExtractor.consolidate`, called by the strategy after
   the task trained): a new side network (``spec.side``) learns to reproduce the teacher's
   feature, mean squared error on ``f_frozen + (alpha / w) side(x)`` against the teacher's
   ``f_teacher(x)``, on the images the task trained on (its own and the exemplar memory, which
   carries the older tasks' images: the student must match its teacher on every generator the
   head reads it for), ``spec.epochs`` epochs (at least ``min_steps`` optimizer steps) of AdamW
   at ``spec.lr`` with a cosine schedule;
3. the teacher is dropped: what the task keeps, stores and predicts with is the student.

So after every task the network is exactly a ``side`` network: one frozen pass plus ``T`` side
networks (:func:`~lorax_cil.models.extractors.side.side_flops`; 1.11 plain passes at T = 12 on
ViT-B/16 with width 64). Training a task costs a LoRA step plus one frozen pass for the old
students; the distillation adds, per epoch and image, one frozen and one teacher forward pass.

The head reads each block as the student gives it: the strategy's after-task head stage
(balanced fine-tuning, class means) and the memory's herding run after the distillation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch.nn import functional as F

from lorax_cil.models.extractors.base import Tail, register_extractor
from lorax_cil.models.extractors.lora import wrap_tail
from lorax_cil.models.extractors.side import SideExtractor, SideSpec
from lorax_cil.models.lora import LoraSpec, adapter_parameters, add_lora_adapter, lora_group
from lorax_cil.utils import strict_from_dict

__all__ = ["DistilledSideSpec", "DistilledSideExtractor"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistilledSideSpec:
    """Options of the distilled side extractor.

    Attributes:
        lora: the teacher's LoRA (``model.lora_r``, ``lora_alpha``, ``lora_dropout``,
            ``lora_targets``).
        side: the student side network (``model.side_width``; scale 1, no dropout).
        epochs: distillation epochs over the task's training images and the memory
            (``train.distill_epochs``).
        lr: distillation learning rate (``train.distill_lr``).
    """

    lora: LoraSpec = field(default_factory=LoraSpec)
    side: SideSpec = field(default_factory=SideSpec)
    epochs: int = 30
    lr: float = 3e-3

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 1:
            raise ValueError(f"DistilledSideSpec.epochs must be a positive integer, got {self.epochs!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"DistilledSideSpec.lr must be > 0, got {self.lr!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"lora": self.lora.to_dict(), "side": self.side.to_dict(), "epochs": self.epochs,
                "lr": self.lr}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DistilledSideSpec":
        return strict_from_dict(cls, d, lora=LoraSpec.from_dict, side=SideSpec.from_dict)


@register_extractor("distilled-side")
class DistilledSideExtractor(SideExtractor):
    """A LoRA teacher for the task that trains, a :class:`~.side.SideNet` student per task
    (``spec``: :class:`DistilledSideSpec`). ``teaching`` is the task whose teacher is live
    (``None`` once it is distilled, or when the task's student was loaded)."""

    spec_key = "distilled_side"
    spec_type = DistilledSideSpec
    consolidates = True

    @classmethod
    def config_defaults(cls, lora_r: int) -> dict[str, float]:
        """``model.lora_*`` set the teacher: LoRA's official values."""
        return {"lora_alpha": float(LoraSpec.alpha), "lora_dropout": float(LoraSpec.dropout)}

    def __init__(self, tail: Tail, spec: Any = None) -> None:
        super().__init__(tail, spec)
        self.targets, self.layers = wrap_tail(tail, self.spec.lora)
        self.teaching: int | None = None

    @property
    def side_spec(self) -> SideSpec:
        return self.spec.side

    # --- the teacher ---------------------------------------------------------------------------
    @property
    def root(self) -> torch.nn.Module:
        return self.tail.backbone.model

    def _drop_teacher(self) -> None:
        for layer in self.layers:
            layer.adapters = torch.nn.ModuleList()
            layer.clear_fold_cache()
        self.teaching = None

    def teacher_parameters(self) -> list[torch.nn.Parameter]:
        """The live teacher's parameters (empty when none is live)."""
        return adapter_parameters(self.root, 0) if self.teaching is not None else []

    def add_task(self, t: int) -> None:
        self._drop_teacher()  # an undistilled teacher (e.g. of a loaded run) is not kept
        super().add_task(t)
        self.freeze(t)  # the student trains only in consolidate()
        index = add_lora_adapter(self.root, self.spec.lora)
        assert index == 0, index
        self.teaching = t

    def train(self, mode: bool = True) -> "DistilledSideExtractor":
        super().train(mode)
        for layer in self.layers:
            for a in layer.adapters:
                a.train(mode)
        return self

    def features(self, h: torch.Tensor, tasks: Sequence[int], *, train: bool) -> list[torch.Tensor]:
        tasks = list(tasks)
        students = [t for t in tasks if t != self.teaching]
        out = dict(zip(students, super().features(h, students, train=False))) if students else {}
        if self.teaching in tasks:
            with lora_group(self.layers, [0]):
                out[self.teaching] = self.tail(h)
        return [out[t] for t in tasks]

    def load_task_state_dict(self, t: int, sd: Mapping[str, torch.Tensor]) -> None:
        super().load_task_state_dict(t, sd)
        if t == self.teaching:  # the student is what was stored: the teacher is not needed
            self._drop_teacher()
            self.freeze(t)

    # --- distillation ----------------------------------------------------------------------------
    def distill_optimizer(self, t: int) -> torch.optim.Optimizer:
        """Make student ``t`` trainable; its AdamW at ``spec.lr`` (weight decay 1e-6)."""
        net = self.extractors[t]
        for p in net.parameters():
            p.requires_grad_(True)
        net.frozen = False
        return torch.optim.AdamW(net.parameters(), lr=self.spec.lr, weight_decay=1e-6)

    def distill_step(self, t: int, h: torch.Tensor, opt: torch.optim.Optimizer, *,
                     amp: bool = False) -> tuple[float, float, float]:
        """One optimizer step of student ``t`` towards teacher ``t`` on trunk output ``h``:
        the frozen pass (shared with the other students) and the teacher's run without
        autograd, the student with it. Returns the loss and, summed over the batch, the squared
        residual ``|f_student - f_teacher|^2`` and the teacher's squared change
        ``|f_teacher - f_frozen|^2``."""
        net = self.extractors[t]
        autocast = dict(device_type="cuda", dtype=torch.bfloat16, enabled=amp)
        with torch.no_grad(), torch.autocast(**autocast):
            frozen, taps = self.shared(h)
            with lora_group(self.layers, [0]):
                target = self.tail(h).float()
        with torch.autocast(**autocast):
            side = net([x.to(net.up.weight.dtype) for x in taps])
        student = frozen.float() + self.side_spec.scaling * side.float()
        loss = F.mse_loss(student, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            return (float(loss), float((student - target).pow(2).sum()),
                    float((target - frozen.float()).pow(2).sum()))

    def consolidate(self, t: int, batches: Callable[[], Iterable[torch.Tensor]], *,
                    batches_per_epoch: int, min_steps: int = 0, amp: bool = False) -> dict[str, Any]:
        """Distil teacher ``t`` into student ``t`` (see the module docstring), then drop the
        teacher. Returns ``{"steps", "epochs", "loss", "residual"}``: the last epoch's mean
        loss and the student's remaining share of the teacher's change of the frozen feature,
        ``|f_student - f_teacher|^2 / |f_teacher - f_frozen|^2`` summed over that epoch."""
        if t != self.teaching:
            raise RuntimeError(f"distilled-side: task {t} has no live teacher "
                               f"(teaching: {self.teaching})")
        if batches_per_epoch < 1:
            raise ValueError(f"distilled-side: task {t} has no training image to distil on")
        epochs = max(self.spec.epochs, math.ceil(min_steps / batches_per_epoch))
        total = epochs * batches_per_epoch
        opt = self.distill_optimizer(t)
        was = self.training
        self.train(False)  # the teacher without dropout: its feature is the target
        steps = 0
        try:
            for _ in range(epochs):
                sums = [0.0, 0.0, 0.0, 0]  # loss, squared residual, squared change, batches
                for h in batches():
                    for g in opt.param_groups:  # cosine decay over the whole distillation
                        g["lr"] = self.spec.lr * 0.5 * (1 + math.cos(math.pi * min(steps, total) / total))
                    for i, v in enumerate(self.distill_step(t, h, opt, amp=amp)):
                        sums[i] += v
                    sums[3] += 1
                    steps += 1
        finally:
            self.freeze(t)
            self._drop_teacher()
            self.train(was)
        stats = {"steps": steps, "epochs": epochs, "loss": sums[0] / max(1, sums[3]),
                 "residual": sums[1] / sums[2] if sums[2] > 0 else float("nan")}
        logger.info("distilled-side: task %d distilled in %d steps (%d epochs), loss %.4g, "
                    "residual %.3f of the teacher's change", t, steps, epochs, stats["loss"],
                    stats["residual"])
        return stats
