"""The expandable multi-extractor network (LoRAX, DER w/o pruning, MEMO, fine-tuning, probes).

One architecture, two axes:

* what a task's extractor is (``extractor``, a kind registered in
  :mod:`lorax_cil.models.extractors`): ``"lora"`` (a new LoRA adapter per task), ``"mole"`` (a
  new MoLE adapter per task: shared LoRA + routed LoRA experts, see :mod:`lorax_cil.models.mole`),
  ``"full"`` (a trainable copy of the adapted blocks + neck per task), ``"finetune"`` (one shared
  trainable copy, never frozen) or ``"frozen"`` (no extractor: the frozen backbone feature). The
  network holds one :class:`~lorax_cil.models.extractors.Extractor` (``net.ext``) and never
  branches on the kind;
* where it starts (``adapt_blocks=k``): extractors cover blocks ``[L-k, L)`` + neck; the trunk
  (stem + blocks ``[0, L-k)``) is frozen and computed once per image, shared by every task.

Features of all extractors are concatenated in task order and fed to a growing linear head.
Class ids are contiguous by task: task ``t`` owns ``[offset_t, offset_t + n_t)``.

The network takes ownership of the backbone it is given (LoRA wrappers are injected into it)
and keeps it in eval mode: it is a fixed function (BatchNorm statistics never move).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from lorax_cil.models.base import BlockBackbone, TaskClassCounts
from lorax_cil.models.extractors import Extractor, Tail, TailCopy, get_extractor, list_extractors
from lorax_cil.models.lora import LoraSpec
from lorax_cil.models.mole import MoleSpec
from lorax_cil.models.state import copy_state_strict

__all__ = ["EXTRACTORS", "ExpandableOutput", "TailCopy", "ExpandableNet"]

logger = logging.getLogger(__name__)

#: The built-in extractor kinds (``list_extractors()`` also lists registered ones).
EXTRACTORS = tuple(list_extractors())
#: Spec keys every architecture record carries (``None`` when the kind has another or none),
#: so records keep the layout they had before the extractor registry.
RECORD_SPEC_KEYS = ("lora", "mole")
ARCH_FORMAT = "lorax-cil/expandable-net"
ARCH_VERSION = 1


@dataclass
class ExpandableOutput:
    """Everything one forward pass produces.

    Attributes:
        logits: ``(B, num_classes)`` from the expanding head.
        div_logits: ``(B, n_new + 1)`` from the divergence head, or ``None`` when there is none.
        features: ``(B, num_features)`` concatenated extractor features, task order.
        aux_loss: in training mode, the extractor's extra training loss (``"mole"``: the
            load-balancing losses of the trainable extractor, summed and already multiplied by
            ``MoleSpec.balance_weight``; add it to the training loss); otherwise ``None``.
        head_logits: when ``logits`` come from another read-out (the class means of
            :class:`~lorax_cil.models.heads.NCMExpandableNet`), the linear head's logits of the
            same pass; otherwise ``None`` (``logits`` are the head's).
    """

    logits: torch.Tensor
    div_logits: torch.Tensor | None
    features: torch.Tensor
    aux_loss: torch.Tensor | None = None
    head_logits: torch.Tensor | None = None


class ExpandableNet(TaskClassCounts, nn.Module):
    """A frozen trunk, one feature extractor per task, concatenated features, expanding head.

    Args:
        backbone: the frozen block-structured backbone (ownership is taken).
        extractor: a registered extractor kind (:data:`EXTRACTORS` and any kind registered with
            :func:`~lorax_cil.models.extractors.register_extractor`).
        adapt_blocks: ``k``: extractors start at block ``L-k``; ``None`` = all blocks (for
            ``"mole"``: ``None`` takes ``mole.blocks``, and a given ``k`` replaces it).
        lora: LoRA spec for ``extractor="lora"`` (default :class:`LoraSpec`).
        mole: MoLE spec for ``extractor="mole"`` (default :class:`MoleSpec`: shared rank 8,
            experts 4/8/16 on both MLP linears of the last 3 blocks).
        spec: the options of any kind that has some (its ``spec_type``); ``lora`` and ``mole``
            are this argument under their kind's name.
        divergence_head: build the auxiliary head on the newest extractor from task 1 on
            (only for the kinds that grow: ``"lora"``, ``"mole"`` and ``"full"``).
        max_group_size: run at most this many adapters per batched group (memory cap).
    """

    def __init__(
        self,
        *,
        backbone: BlockBackbone,
        extractor: str = "lora",
        adapt_blocks: int | None = None,
        lora: LoraSpec | None = None,
        mole: MoleSpec | None = None,
        spec: Any = None,
        divergence_head: bool = True,
        max_group_size: int | None = None,
    ) -> None:
        super().__init__()
        kind = get_extractor(extractor)
        L = backbone.num_blocks
        if adapt_blocks is not None and not (isinstance(adapt_blocks, int) and 1 <= adapt_blocks <= L):
            raise ValueError(f"adapt_blocks must be None or an int in [1, {L}], got {adapt_blocks!r}")
        for key, value in (("lora", lora), ("mole", mole)):
            if value is None:
                continue
            if key != kind.spec_key:
                raise ValueError(f"{key} is only used with extractor={key!r}, not {extractor!r}")
            if spec is not None:
                raise ValueError(f"give the {key} spec once: {key}= or spec=, not both")
            spec = value
        if spec is not None and kind.spec_type is None:
            raise ValueError(f"extractor={extractor!r} takes no spec, got {type(spec).__name__}")
        if max_group_size is not None and max_group_size < 1:
            raise ValueError(f"max_group_size must be >= 1, got {max_group_size!r}")
        spec, adapt_blocks = kind.configure(spec, adapt_blocks, L)
        self.backbone = backbone
        self.extractor = extractor
        self.adapt_blocks = adapt_blocks
        self.start = L - (adapt_blocks or L)
        self.use_divergence = bool(divergence_head) and kind.grows
        self.task_classes: list[int] = []
        self.head: nn.Linear | None = None
        self.div_head: nn.Linear | None = None
        self.backbone.eval()
        self.tail = Tail(backbone, self.start, max_group_size)
        self.ext: Extractor = kind(self.tail, spec)

    # --- what the extractor holds -----------------------------------------------------------
    @property
    def extractors(self) -> nn.ModuleList:
        """Modules the extractor keeps outside the backbone (a ``TailCopy`` per task for
        ``"full"``, one for ``"finetune"``; empty for adapters inside the backbone)."""
        return self.ext.extractors

    @property
    def lora_targets(self) -> list[str]:
        """Backbone layers the extractor wrapped (the adapter targets; empty for other kinds)."""
        return self.ext.targets

    def _spec(self, key: str) -> Any:
        return self.ext.spec if self.ext.spec_key == key else None

    @property
    def lora_spec(self) -> LoraSpec | None:
        return self._spec("lora")

    @property
    def mole_spec(self) -> MoleSpec | None:
        return self._spec("mole")

    @property
    def max_group_size(self) -> int | None:
        return self.tail.max_group_size

    @max_group_size.setter
    def max_group_size(self, value: int | None) -> None:
        self.tail.max_group_size = value

    # --- sizes (num_tasks and num_classes from TaskClassCounts) ----------------------------
    @property
    def feature_dim(self) -> int:
        """Size of one extractor's feature."""
        return self.ext.feature_dim

    @property
    def num_extractors(self) -> int:
        """Feature blocks in the concatenated feature (one per task for the kinds that grow)."""
        if self.ext.grows:
            return self.num_tasks
        return 1 if self.num_tasks else 0

    @property
    def num_features(self) -> int:
        return self.num_extractors * self.feature_dim

    def class_offsets(self) -> list[int]:
        """First class id of every task."""
        out, acc = [], 0
        for n in self.task_classes:
            out.append(acc)
            acc += n
        return out

    def _ref(self) -> torch.Tensor:
        return next(self.backbone.parameters())

    # --- growth -----------------------------------------------------------------------------
    def add_task(self, num_new_classes: int = 2) -> None:
        """Freeze existing extractors, add the new one, expand the head, rebuild the div head."""
        if not isinstance(num_new_classes, int) or num_new_classes < 1:
            raise ValueError(f"num_new_classes must be a positive int, got {num_new_classes!r}")
        t = self.num_tasks
        self.ext.add_task(t)
        self.task_classes.append(num_new_classes)
        self._expand_head()
        self.div_head = None
        if self.use_divergence and t >= 1:
            ref = self._ref()
            self.div_head = nn.Linear(self.feature_dim, num_new_classes + 1).to(ref.device, ref.dtype)
        self.train(self.training)
        logger.info("task %d added: %d classes, %d features", t, self.num_classes, self.num_features)

    def _expand_head(self) -> None:
        ref = self._ref()
        new = nn.Linear(self.num_features, self.num_classes).to(ref.device, ref.dtype)
        old = self.head
        if old is not None:
            with torch.no_grad():
                new.weight[: old.out_features, : old.in_features].copy_(old.weight)
                new.bias[: old.out_features].copy_(old.bias)
        self.head = new

    # --- modes ------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "ExpandableNet":
        super().train(mode)
        self.backbone.eval()
        self.ext.train(mode)  # again after backbone.eval(): adapters inside it take their mode
        return self

    def _trainable_extractor(self) -> int | None:
        """Index of the extractor that trains now (None when the kind learns nothing)."""
        if not self.num_tasks or not self.ext.learns:
            return None
        return self.num_extractors - 1

    # --- forward ----------------------------------------------------------------------------
    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen trunk (stem + blocks ``[0, L-k)``) without autograd: the hidden state every
        extractor starts from. It is the same for every task, so it is computed once per image
        (and can be cached across epochs when the input is deterministic)."""
        with torch.no_grad():
            return self.backbone.run_blocks(self.backbone.stem(x), 0, self.start)

    _trunk = trunk

    def _tail(self, h: torch.Tensor) -> torch.Tensor:
        return self.tail(h)

    def group_size(self, h: torch.Tensor, n: int) -> int:
        """How many adapters run batched in one pass (:meth:`Tail.group_size`)."""
        return self.tail.group_size(h, n)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if not self.num_tasks:
            raise RuntimeError("ExpandableNet has no task yet: call add_task() first")
        return self._features_from_trunk(self.trunk(x))

    def _features_from_trunk(self, h: torch.Tensor) -> torch.Tensor:
        """Concatenated features from the trunk output ``h``; old extractors run without grad."""
        if not self.num_tasks:
            raise RuntimeError("ExpandableNet has no task yet: call add_task() first")
        n = self.num_extractors
        if not (self.training and self._trainable_extractor() is not None):
            return torch.cat(self.ext.features(h, list(range(n)), train=False), dim=1)
        with torch.no_grad():
            old = self.ext.features(h, list(range(n - 1)), train=False) if n > 1 else []
        return torch.cat(old + self.ext.features(h, [n - 1], train=True), dim=1)

    def forward_all(self, x: torch.Tensor, *, from_trunk: bool = False) -> ExpandableOutput:
        """Logits, divergence logits (or ``None``) and concatenated features.

        With ``from_trunk=True``, ``x`` is the output of :meth:`trunk` (e.g. from a cache), not
        an image batch.
        """
        features = self._features_from_trunk if from_trunk else self._features
        aux = None
        if self.training:
            feats, aux = self.ext.with_aux_loss(lambda: features(x))
        else:
            feats = features(x)
        logits = self.head(feats)
        div = None
        if self.div_head is not None:
            div = self.div_head(feats[:, -self.feature_dim :])
        return ExpandableOutput(logits=logits, div_logits=div, features=feats, aux_loss=aux)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x).logits

    def features_for_herding(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated features ``(B, num_features)`` in eval mode without grad."""
        was = self.training
        self.train(False)
        try:
            with torch.no_grad():
                return self._features(x)
        finally:
            self.train(was)

    def divergence_targets(self, y: torch.Tensor) -> torch.Tensor:
        """Labels for the divergence head: old classes -> 0, new class ``offset + j`` -> ``j + 1``.

        This is the DER / DyTox convention (bucket 0 = "old").
        """
        if not self.num_tasks:
            raise RuntimeError("no task yet")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}), got [{int(y.min())}, {int(y.max())}]")
        first_new = self.num_classes - self.task_classes[-1]
        return torch.where(y >= first_new, y - first_new + 1, torch.zeros_like(y))

    # --- parameters -------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def extractor_parameter_count(self, t: int) -> int:
        self._check_extractor(t)
        return sum(p.numel() for p in self.ext.parameters_of(t))

    def parameter_report(self) -> dict[str, Any]:
        """Parameter counts: newest trainable extractor, per extractor, heads, total stored."""
        count = self.num_extractors if self.ext.learns else 0
        per = [self.extractor_parameter_count(t) for t in range(count)]
        in_backbone = {id(p) for p in self.backbone.parameters()}  # adapters live inside it
        adapters = sum(p.numel() for t in range(count) for p in self.ext.parameters_of(t) if id(p) in in_backbone)
        backbone = sum(p.numel() for p in self.backbone.parameters()) - adapters
        head = sum(p.numel() for p in self.head.parameters()) if self.head is not None else 0
        div = sum(p.numel() for p in self.div_head.parameters()) if self.div_head is not None else 0
        k = self._trainable_extractor()
        return {
            "extractor": self.extractor,
            "num_tasks": self.num_tasks,
            "trainable_extractor": per[k] if k is not None else 0,
            "per_extractor": per,
            "head": {"in": self.num_features, "out": self.num_classes, "params": head},
            "div_head": div,
            "backbone": backbone,
            "trainable": sum(p.numel() for p in self.trainable_parameters()),
            "total_stored": backbone + sum(per) + head + div,
        }

    # --- state ------------------------------------------------------------------------------
    def _check_extractor(self, t: int) -> None:
        if not self.ext.learns:
            raise ValueError(f"extractor={self.extractor!r} has no per-task extractors")
        if not 0 <= t < self.num_extractors:
            raise IndexError(f"extractor {t} does not exist ({self.num_extractors} extractors)")

    def extractor_state_dict(self, t: int) -> dict[str, torch.Tensor]:
        """Extractor ``t`` as plain tensors (detached copies) with stable names."""
        self._check_extractor(t)
        return self.ext.task_state_dict(t)

    def load_extractor_state_dict(self, t: int, sd: Mapping[str, torch.Tensor]) -> None:
        self._check_extractor(t)
        self.ext.load_task_state_dict(t, sd)

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """``head.weight``, ``head.bias`` and, when present, ``div_head.weight``/``div_head.bias``."""
        sd: dict[str, torch.Tensor] = {}
        for prefix, mod in (("head", self.head), ("div_head", self.div_head)):
            if mod is not None:
                sd[f"{prefix}.weight"] = mod.weight.detach().clone()
                sd[f"{prefix}.bias"] = mod.bias.detach().clone()
        return sd

    def load_head_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        target: dict[str, torch.Tensor] = {}
        for prefix, mod in (("head", self.head), ("div_head", self.div_head)):
            if mod is not None:
                target.update({f"{prefix}.weight": mod.weight, f"{prefix}.bias": mod.bias})
        copy_state_strict(target, sd, "head")

    def learned_state_dict(self) -> dict[str, torch.Tensor]:
        """Every learned tensor: ``extractor.<t>.<name>`` plus the head keys."""
        sd = self.head_state_dict()
        if self.ext.learns:
            for t in range(self.num_extractors):
                sd.update({f"extractor.{t}.{k}": v for k, v in self.extractor_state_dict(t).items()})
        return sd

    def load_learned_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        if self.ext.learns:
            for t in range(self.num_extractors):
                prefix = f"extractor.{t}."
                self.load_extractor_state_dict(t, {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)})
        known = {k for k in sd if k.startswith("extractor.")}
        self.load_head_state_dict({k: v for k, v in sd.items() if k not in known})

    def architecture(self) -> dict[str, Any]:
        """JSON-serialisable description from which :meth:`from_architecture` rebuilds the net."""
        s = self.backbone.spec
        record: dict[str, Any] = {
            "format": ARCH_FORMAT,
            "version": ARCH_VERSION,
            "backbone": s.name,
            "feature_dim": s.feature_dim,
            "num_blocks": s.num_blocks,
            "extractor": self.extractor,
            "adapt_blocks": self.adapt_blocks,
            **{key: None for key in RECORD_SPEC_KEYS},
        }
        record.update(self.ext.architecture())
        record.update({
            "lora_targets": list(self.lora_targets),
            "divergence_head": self.use_divergence,
            "task_classes": list(self.task_classes),
        })
        return record

    @classmethod
    def from_architecture(cls, arch: Mapping[str, Any], backbone: BlockBackbone) -> "ExpandableNet":
        """Rebuild an empty network with the same structure (load the state afterwards)."""
        if arch.get("format") != ARCH_FORMAT or arch.get("version") != ARCH_VERSION:
            raise ValueError(f"not a {ARCH_FORMAT} v{ARCH_VERSION} architecture: {arch.get('format')!r}")
        s = backbone.spec
        for key, have in (("backbone", s.name), ("feature_dim", s.feature_dim), ("num_blocks", s.num_blocks)):
            if arch[key] != have:
                raise ValueError(f"architecture {key}={arch[key]!r} does not match the backbone's {have!r}")
        kind = get_extractor(arch["extractor"])
        recorded = arch.get(kind.spec_key) if kind.spec_key is not None else None
        spec = kind.spec_type.from_dict(recorded) if recorded is not None and kind.spec_type is not None else None
        net = cls(
            backbone=backbone,
            extractor=arch["extractor"],
            adapt_blocks=arch["adapt_blocks"],
            spec=spec,
            divergence_head=arch["divergence_head"],
        )
        if list(arch["lora_targets"]) != net.lora_targets:
            raise ValueError("adapter targets resolved on this backbone differ from the architecture's")
        for n in arch["task_classes"]:
            net.add_task(int(n))
        return net
