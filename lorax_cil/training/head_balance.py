"""Keeping the expanding head from drifting toward the newest classes (LoRAX family).

With frozen extractors and backbone, the only part of LoRAX that forgets is the linear head:
its old rows keep training on a few exemplars per old class beside a full new task. Four
options, each off by default in :class:`HeadOptions` (the official behaviour) and combinable:

``init="prototype"`` (before a task's training)
    The new classes' head rows start as the L2-normalised class means of the concatenated
    features of the new task's images (evaluation transforms; the new extractor is still
    the identity adapter, so its block is the backbone feature), scaled to the old rows' mean
    norm; biases at the old rows' mean (:func:`~lorax_cil.models.heads.set_prototype_rows`).
``balanced_steps > 0`` (after training; EEIL, Castro et al., ECCV 2018)
    The head alone is fine-tuned for ``balanced_steps`` AdamW steps at ``balanced_lr`` on a
    class-balanced set: every exemplar the task trained with (the memory before its
    re-balancing) plus, for each new class, as many randomly drawn new images as the smallest
    old class has exemplars. Features are computed once, without augmentation and without
    autograd, so extractors and backbone cannot change (the optimiser holds only
    ``head.weight`` and ``head.bias``). Not run on the first task (nothing to balance).
``wa=True`` (after training, after the balanced stage; Zhao et al., CVPR 2020)
    The new classes' rows are scaled to the old rows' mean norm
    (:func:`~lorax_cil.models.heads.weight_align`).
``readout="ncm"`` (after training)
    :class:`~lorax_cil.models.heads.NCMExpandableNet` predicts by cosine similarity to class
    means of the concatenated features. New classes: the mean over all the task's images.
    Old classes: their stored mean keeps its blocks of the extractors that existed when it
    was last updated (those extractors are frozen, so the values are exact); the blocks of
    later extractors are means over the class's exemplars in memory.
``readout="ncm-frozen"`` (after training)
    The same class means, but a class is read only on the blocks of the extractors that
    existed when it was learnt (``NCMExpandableNet(own_blocks=True)``): its mean is computed
    once, over all its task's images, and never changes, so nothing rests on the exemplars and
    an old class's score for an image never changes (SimpleCIL's property, on LoRAX features).
``readout="ncm-relative"`` (after training)
    ``ncm-frozen`` with one more number per task: the offset of the new extractor's block
    (:func:`~lorax_cil.models.heads.block_offset`, the mean leave-one-out cosine of the task's
    images to the mean of its other images in that block), subtracted from that block's
    cosines whenever a class is read on it. Computed once, from the task's images, and never
    changed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from lorax_cil.distributed import broadcast_parameters
from lorax_cil.models.heads import NCMExpandableNet, block_offset, set_prototype_rows, weight_align
from lorax_cil.training.config import READOUTS

__all__ = ["HeadOptions", "HeadBalancer", "feature_table", "feature_class_means",
           "new_block_offsets", "check_head_options"]

logger = logging.getLogger(__name__)

INITS = ("random", "prototype")


@dataclass(frozen=True)
class HeadOptions:
    """What happens to the head around each task (defaults: the official LoRAX behaviour).

    Attributes:
        init: ``random`` (``nn.Linear`` initialisation) or ``prototype``.
        wa: weight aligning of the new rows after each task.
        balanced_steps: steps of class-balanced head fine-tuning after each task (0: off).
        balanced_lr: learning rate of that fine-tuning.
        balanced_batch: batch size of that fine-tuning.
        readout: ``head`` (linear head), ``ncm`` (nearest class mean, cosine),
            ``ncm-frozen`` (nearest class mean, each class on the blocks of its time) or
            ``ncm-relative`` (``ncm-frozen`` with per-block offsets).
        balanced_loss: class-balanced training loss (each class weighted by the inverse of
            its count in the task's training set, exemplars included).
    """

    init: str = "random"
    wa: bool = False
    balanced_steps: int = 0
    balanced_lr: float = 1e-4
    balanced_batch: int = 32
    readout: str = "head"
    balanced_loss: bool = False

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"train.head_init must be one of {list(INITS)}, got {self.init!r}")
        if self.readout not in READOUTS:
            raise ValueError(f"train.readout must be one of {list(READOUTS)}, got {self.readout!r}")
        if self.balanced_steps < 0 or self.balanced_lr <= 0 or self.balanced_batch < 1:
            raise ValueError("train.head_balanced_steps must be >= 0, train.head_balanced_lr > 0 "
                             "and the batch size >= 1")

    @classmethod
    def from_config(cls, t: Any) -> "HeadOptions":
        """The options of a ``TrainConfig``."""
        return cls(init=t.head_init, wa=bool(t.head_wa), balanced_steps=int(t.head_balanced_steps or 0),
                   balanced_lr=float(t.head_balanced_lr), balanced_batch=int(t.batch_size),
                   readout=t.readout or "head", balanced_loss=bool(t.head_balanced_loss))


def check_head_options(cfg: Any, strategy: Any) -> None:
    """Refuse head options (``train.head_*``, ``train.readout``) that ``strategy`` would ignore:
    they act on the LoRAX strategy class (the LoRAX family, fine-tuning, DER, MEMO)."""
    options = HeadOptions.from_config(cfg.train)
    if options == HeadOptions(balanced_lr=options.balanced_lr, balanced_batch=options.balanced_batch):
        return
    if getattr(strategy, "head_balancer", None) is None or \
            strategy.head_balancer.options != options:
        raise ValueError(f"strategy {cfg.train.strategy!r} does not use train.head_init, "
                         "train.head_wa, train.head_balanced_steps, train.head_balanced_loss or "
                         "train.readout (they apply "
                         "to lorax, lorax-deep, lorax-mole, finetune, finetune-replay, "
                         "der-expandable and memo); leave them at their defaults")


@torch.no_grad()
def feature_table(net: Any, dataset: Any, *, device: Any, batch_size: int = 64,
                  num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated features (evaluation transforms, eval mode, no autograd) and labels of
    ``dataset``, on the CPU in float32."""
    data = dataset.eval()
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=getattr(data, "collate_fn", None))
    feats, labels = [], []
    for batch in loader:
        feats.append(net.features_for_herding(batch[0].to(device)).float().cpu())
        labels.append(torch.as_tensor(batch[1]).long())
    if not feats:
        return torch.zeros(0, net.num_features), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def new_block_offsets(feats: torch.Tensor, num_blocks: int, blocks: Any) -> torch.Tensor:
    """:func:`~lorax_cil.models.heads.block_offset` of each of ``blocks`` (indices among the
    ``num_blocks`` equal blocks of ``feats``), from one task's features."""
    split = feats.reshape(feats.shape[0], num_blocks, -1)
    return torch.tensor([block_offset(split[:, b]) for b in blocks], dtype=torch.float32)


def feature_class_means(feats: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Mean feature of each class in ``classes`` (float64 sums, float32 result)."""
    return torch.stack([feats[labels == c].double().mean(0) for c in classes]).float()


class HeadBalancer:
    """Runs the :class:`HeadOptions` of a LoRAX-family strategy around each task.

    The strategy calls :meth:`before_task` once the network has grown (optimizer built) and
    :meth:`after_task` after training, before the memory is re-balanced.
    """

    def __init__(self, options: HeadOptions) -> None:
        self.options = options

    def _table(self, strategy: Any, dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return feature_table(strategy.model.net, dataset, device=strategy.device,
                             batch_size=strategy.eval_mb_size or 64,
                             num_workers=getattr(strategy, "num_workers", 0))

    # --- before training --------------------------------------------------------------------
    def before_task(self, strategy: Any) -> None:
        if self.options.init != "prototype":
            return
        net = strategy.model.net
        n_new = net.task_classes[-1]
        first = net.num_classes - n_new
        feats, labels = self._table(strategy, strategy.experience.dataset)
        classes = list(range(first, net.num_classes))
        missing = [c for c in classes if not bool((labels == c).any())]
        if missing:
            raise ValueError(f"prototype initialisation: classes {missing} have no training image")
        scale = set_prototype_rows(net.head, classes, feature_class_means(feats, labels, classes), first)
        logger.info("head: rows %s initialised from class means (scale %.3f)", classes, scale)

    # --- after training ---------------------------------------------------------------------
    def after_task(self, strategy: Any) -> None:
        o = self.options
        net = strategy.model.net
        if o.balanced_steps <= 0 and not o.wa and not o.readout.startswith("ncm"):
            return
        n_new = net.task_classes[-1]
        first = net.num_classes - n_new
        new_feats, new_labels = self._table(strategy, strategy.experience.dataset)
        mem = strategy.memory.dataset()
        # ncm-frozen / ncm-relative read no exemplar: the memory's features serve the others
        if mem is not None and first > 0 and (o.balanced_steps > 0 or o.readout == "ncm"):
            mem_feats, mem_labels = self._table(strategy, mem)
        else:
            mem_feats, mem_labels = torch.zeros(0, net.num_features), torch.zeros(0, dtype=torch.long)
        if o.balanced_steps > 0 and first > 0 and len(mem_labels):
            self.balanced_finetune(net, new_feats, new_labels, mem_feats, mem_labels, first,
                                   device=strategy.device)
        if o.wa and first > 0:
            gamma = weight_align(net.head, first)
            logger.info("head: weight aligning of the new rows, gamma %.4f", gamma)
        if o.readout.startswith("ncm"):
            self.update_prototypes(net, new_feats, new_labels, mem_feats, mem_labels, first)

    def balanced_finetune(self, net: Any, new_feats: torch.Tensor, new_labels: torch.Tensor,
                          mem_feats: torch.Tensor, mem_labels: torch.Tensor, first: int, *,
                          device: Any) -> None:
        """Fine-tune ``net.head`` alone on exemplars + an equal-size sample per new class.

        Its random draws come from the global stream, which the task's training has consumed
        (a resumed run replays the task from its seed, so it draws the same); the processes of
        a distributed run have consumed different amounts, so rank 0's head is broadcast."""
        o = self.options
        old_counts = [int((mem_labels == c).sum()) for c in range(first)]
        per_class = min(c for c in old_counts if c > 0) if any(old_counts) else 0
        if per_class == 0:
            return
        keep_x, keep_y = [mem_feats[mem_labels < first]], [mem_labels[mem_labels < first]]
        for c in sorted(set(new_labels.tolist())):
            idx = torch.nonzero(new_labels == c).flatten()
            pick = idx[torch.randperm(len(idx))[:per_class]]
            keep_x.append(new_feats[pick])
            keep_y.append(new_labels[pick])
        x, y = torch.cat(keep_x).to(device), torch.cat(keep_y).to(device)
        counts = torch.bincount(y, minlength=net.num_classes).float()
        # class-balanced loss weights: exemplar counts of old classes may still differ by one
        weight = torch.where(counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()),
                             torch.zeros_like(counts))
        head = net.head
        params = [head.weight, head.bias]
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=o.balanced_lr, weight_decay=0.0)
        loss_fn = nn.CrossEntropyLoss(weight=weight.to(x.device, x.dtype))
        n, batch = len(y), min(o.balanced_batch, len(y))
        order = torch.randperm(n)
        pos = 0
        loss = torch.zeros(())
        with torch.enable_grad():
            for _ in range(o.balanced_steps):
                if pos + batch > n:
                    order, pos = torch.randperm(n), 0
                i = order[pos : pos + batch].to(x.device)
                pos += batch
                loss = loss_fn(head(x[i].to(head.weight.dtype)).float(), y[i])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        broadcast_parameters(params)  # one head on every process (a no-op in one process)
        logger.info("head: balanced fine-tuning, %d steps on %d samples (%d per class), loss %.4f",
                    o.balanced_steps, n, per_class, loss.item())

    @torch.no_grad()
    def update_prototypes(self, net: Any, new_feats: torch.Tensor, new_labels: torch.Tensor,
                          mem_feats: torch.Tensor, mem_labels: torch.Tensor, first: int) -> None:
        """Class means for the NCM read-out (see the module docstring)."""
        if not isinstance(net, NCMExpandableNet):
            raise TypeError("train.readout=ncm needs the network built with the NCM read-out")
        F = net.num_features
        protos = torch.zeros(net.num_classes, F)
        classes = list(range(first, net.num_classes))
        protos[first:] = feature_class_means(new_feats, new_labels, classes)
        if first:
            old = net.prototypes.detach().cpu().float()
            # extractors that grow freeze the old blocks, a frozen extractor never changes:
            # the stored blocks stay exact; a shared trained extractor invalidates them all
            ext = net.ext
            kept = old.shape[1] if ext.grows or not ext.learns else 0
            protos[:first, :kept] = old[:first, :kept]
            if kept < F and not net.own_blocks:
                for c in range(first):
                    mask = mem_labels == c
                    if bool(mask.any()):
                        protos[c, kept:] = mem_feats[mask, kept:].double().mean(0).float()
                    elif kept == 0:
                        protos[c] = old[c]  # no exemplar left: keep what the class had
        net.set_prototypes(protos)
        if net.relative:
            # one block per task (own_blocks): the new task adds the offset of its own block
            offsets = net.block_offsets.detach().cpu().float() if first else torch.zeros(0)
            E = net.num_extractors
            if len(offsets) != E - 1:
                raise RuntimeError(f"ncm-relative: {len(offsets)} block offsets before the "
                                   f"task's, for {E} feature blocks")
            new = new_block_offsets(new_feats, E, [E - 1])
            net.set_block_offsets(torch.cat([offsets, new]))
            logger.info("head: block offsets %s", [round(float(v), 4) for v in net.block_offsets])
        logger.info("head: NCM class means for %d classes", net.num_classes)
