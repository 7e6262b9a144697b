"""Operations on the expanding attribution head, and a nearest-class-mean read-out.

With frozen extractors (LoRAX) every point of forgetting is in the head: old rows keep training
while only a few exemplars per old class are seen, so logits drift toward the new classes. The
functions here act on the head's rows only; :mod:`lorax_cil.training.head_balance` decides when
they run.

* :func:`weight_align`: WA (Zhao et al., CVPR 2020): the new classes' rows (weights and biases)
  are scaled by ``gamma = mean ||w_old|| / mean ||w_new||``, so the new classes' logits no longer
  win by norm alone. Old rows are untouched.
* :func:`set_prototype_rows`: new rows start as L2-normalised class means of the features
  (scaled to the mean norm of the existing rows), biases at the old rows' mean bias.
* :class:`NCMExpandableNet`: the expandable network with a nearest-class-mean read-out: in
  evaluation and prediction, the logits are ``scale x cos(feature, class mean)`` over the
  concatenated features (SimpleCIL's classifier on LoRAX's features); training still uses
  the linear head. The class means are part of the checkpoint (``readout.prototypes``).
  With ``own_blocks=True`` (``train.readout=ncm-frozen``) each class is read only on the
  feature blocks of the extractors that existed when it was learnt: the logit of a class of
  task ``t`` is the mean over blocks ``0..t`` of the per-block cosine similarities
  (:func:`blockwise_cosine_logits`), so a class's score never changes once it is learnt.
  With ``relative=True`` as well (``train.readout=ncm-relative``) each block's cosine is
  taken relative to that block's baseline: minus ``block_offsets[b]``, the mean
  leave-one-out cosine of task ``b``'s training images to the mean of the task's other
  images in block ``b`` (:func:`block_offset`), computed once after task ``b``. Blocks differ
  in how close any image lies to any class mean (a block whose features are all alike gives
  every class a high cosine), and a plain average lets a class read on such a block outscore
  a class that is not; the offset removes that, and stays frozen like the class means.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from lorax_cil.models.expandable import ExpandableNet, ExpandableOutput

__all__ = ["weight_align", "set_prototype_rows", "cosine_logits", "blockwise_cosine_logits",
           "block_offset", "NCMExpandableNet", "build_expandable_net", "READOUT_KINDS", "current_readout",
           "use_readout"]

READOUT_KEY = "readout.prototypes"
OFFSETS_KEY = "readout.block_offsets"


@torch.no_grad()
def weight_align(head: nn.Linear, num_old: int) -> float:
    """Scale the rows ``num_old:`` of ``head`` (weights and biases) so that their mean weight
    norm equals that of rows ``:num_old``; returns the factor (1.0 when there is nothing to
    align)."""
    n = head.out_features
    if not 0 < num_old < n:
        return 1.0
    norms = head.weight.detach().double().norm(dim=1)
    new = float(norms[num_old:].mean())
    if new == 0.0:
        return 1.0
    gamma = float(norms[:num_old].mean()) / new
    head.weight[num_old:].mul_(gamma)
    head.bias[num_old:].mul_(gamma)
    return gamma


@torch.no_grad()
def set_prototype_rows(head: nn.Linear, rows: Sequence[int], means: torch.Tensor,
                       num_old: int) -> float:
    """Rows ``rows`` of ``head`` become the L2-normalised ``means`` (one per row) times the mean
    norm of the old rows ``:num_old`` (of the rows being replaced when there are none); their
    biases become the old rows' mean bias (0 without old rows). Returns the scale used."""
    rows = list(rows)
    if means.shape != (len(rows), head.in_features):
        raise ValueError(f"means must be {(len(rows), head.in_features)}, got {tuple(means.shape)}")
    w = head.weight
    ref = w[:num_old] if num_old > 0 else w[rows]
    scale = float(ref.detach().double().norm(dim=1).mean())
    unit = nn.functional.normalize(means.double(), dim=1)
    w[rows] = (unit * scale).to(w.dtype)
    head.bias[rows] = float(head.bias[:num_old].mean()) if num_old > 0 else 0.0
    return scale


def cosine_logits(features: torch.Tensor, prototypes: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale x`` cosine similarity of every feature to every prototype, ``(B, C)``."""
    f = nn.functional.normalize(features.float(), dim=1)
    p = nn.functional.normalize(prototypes.float(), dim=1)
    return scale * f @ p.T


def blockwise_cosine_logits(features: torch.Tensor, prototypes: torch.Tensor,
                            class_blocks: torch.Tensor, num_blocks: int,
                            scale: float = 1.0, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """``scale x`` the mean, over the first ``class_blocks[c]`` of ``num_blocks`` equal feature
    blocks, of the per-block cosine similarity of every feature to prototype ``c``; ``(B, C)``.
    With ``offsets`` (``(num_blocks,)``), block ``b``'s cosine is taken minus ``offsets[b]``.

    Blocks of a prototype beyond its ``class_blocks`` are ignored (whatever they hold)."""
    B, F = features.shape
    C = prototypes.shape[0]
    if F % num_blocks or prototypes.shape[1] != F or class_blocks.shape != (C,):
        raise ValueError(f"features {tuple(features.shape)} and prototypes "
                         f"{tuple(prototypes.shape)} do not split into {num_blocks} blocks for "
                         f"{tuple(class_blocks.shape)} class block counts")
    n = class_blocks.to(features.device).long()
    if C and (int(n.min()) < 1 or int(n.max()) > num_blocks):
        raise ValueError(f"class block counts must lie in 1..{num_blocks}")
    f = nn.functional.normalize(features.float().reshape(B, num_blocks, -1), dim=2)
    p = nn.functional.normalize(prototypes.float().reshape(C, num_blocks, -1), dim=2)
    used = torch.arange(num_blocks, device=n.device)[None, :] < n[:, None]  # (C, E)
    per_block = torch.einsum("bed,ced->bce", f, p)
    if offsets is not None:
        if offsets.shape != (num_blocks,):
            raise ValueError(f"offsets must be ({num_blocks},), got {tuple(offsets.shape)}")
        per_block = per_block - offsets.to(f.device, f.dtype)[None, None]
    per_block = per_block * used[None].to(f.dtype)
    return scale * per_block.sum(2) / n.to(f.dtype)[None]


@torch.no_grad()
def block_offset(features: torch.Tensor) -> float:
    """The baseline similarity of one feature block: the mean cosine similarity of each of a
    task's images to the mean of the task's *other* images in that block (leave-one-out, so
    that 28 images do not score a mean they are part of). Class-agnostic: it measures how
    alike the block makes the task's images, which every class read on the block inherits.
    ``features``: ``(N, D)``, one block of the task's features (evaluation transforms).
    Raises ``ValueError`` with fewer than two images."""
    x = features.double()
    n = x.shape[0]
    if n < 2:
        raise ValueError("the ncm-relative read-out needs two or more training images per task")
    rest = (x.sum(0, keepdim=True) - x) / (n - 1)
    return float(nn.functional.cosine_similarity(x, rest, dim=1).mean())


class NCMExpandableNet(ExpandableNet):
    """:class:`ExpandableNet` whose evaluation logits are cosine similarities to class means.

    ``prototypes`` (``(num_classes, num_features)``) is filled by the training strategy after
    every task (:mod:`lorax_cil.training.head_balance`); until then the read-out refuses to
    predict. ``readout`` can be switched to ``"head"`` to read the linear head instead.

    Args:
        readout_scale: logits are ``readout_scale x cosine`` (predictions do not depend on it).
        own_blocks: read each class on the feature blocks of the extractors that existed when
            its task was learnt (its own and the older ones), averaging per-block cosines;
            needs an extractor kind that grows (one frozen block per task).
        relative: with ``own_blocks``, take each block's cosine minus that block's offset
            (``block_offsets``, one per block, filled with the class means;
            :func:`block_offset`). Such a network can also read without the offsets
            (``ncm-frozen``, :func:`use_readout`).
        **kwargs: :class:`ExpandableNet` arguments.
    """

    def __init__(self, *, readout_scale: float = 1.0, own_blocks: bool = False,
                 relative: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if readout_scale <= 0:
            raise ValueError(f"readout_scale must be positive, got {readout_scale}")
        if own_blocks and not self.ext.grows:
            name = "ncm-relative" if relative else "ncm-frozen"
            raise ValueError(f"the {name} read-out needs one feature block per task; "
                             f"extractor {self.extractor!r} shares one block across tasks "
                             "(use train.readout=ncm)")
        if relative and not own_blocks:
            raise ValueError("the ncm-relative read-out reads each class on its own blocks "
                             "(own_blocks=True)")
        self.readout = "ncm"
        self.readout_scale = float(readout_scale)
        self.own_blocks = bool(own_blocks)
        self.relative = bool(relative)
        #: with ``relative``: read with the block offsets (False: as ``ncm-frozen``)
        self.use_offsets = self.relative
        self.register_buffer("prototypes", torch.zeros(0, 0))
        self.register_buffer("block_offsets", torch.zeros(0))

    @property
    def held_readout(self) -> str:
        """The class-mean read-out this network was built for and holds."""
        return "ncm-relative" if self.relative else "ncm-frozen" if self.own_blocks else "ncm"

    def class_blocks(self) -> torch.Tensor:
        """Feature blocks each class is read on: ``t + 1`` for the classes of task ``t`` with
        ``own_blocks``, every block otherwise."""
        per_task = [(t + 1 if self.own_blocks else self.num_extractors, n)
                    for t, n in enumerate(self.task_classes)]
        return torch.tensor([b for b, n in per_task for _ in range(n)], dtype=torch.long)

    def set_prototypes(self, prototypes: torch.Tensor) -> None:
        shape = (self.num_classes, self.num_features)
        if tuple(prototypes.shape) != shape:
            raise ValueError(f"prototypes must be {shape}, got {tuple(prototypes.shape)}")
        self.prototypes = prototypes.detach().to(self._ref().device, torch.float32).clone()

    def set_block_offsets(self, offsets: torch.Tensor) -> None:
        """One offset per feature block (``relative``); see :func:`block_offset`."""
        if tuple(offsets.shape) != (self.num_extractors,):
            raise ValueError(f"block offsets must be ({self.num_extractors},), got "
                             f"{tuple(offsets.shape)}")
        self.block_offsets = offsets.detach().to(self._ref().device, torch.float32).clone()

    def forward_all(self, x: torch.Tensor, *, from_trunk: bool = False) -> ExpandableOutput:
        out = super().forward_all(x, from_trunk=from_trunk)
        if self.training or self.readout != "ncm":
            return out
        if tuple(self.prototypes.shape) != (self.num_classes, self.num_features):
            raise RuntimeError("the NCM read-out has no class means for the current classes yet "
                               "(they are computed after each task's training)")
        offsets = None
        if self.relative and self.use_offsets:
            if tuple(self.block_offsets.shape) != (self.num_extractors,):
                raise RuntimeError("the ncm-relative read-out has no offset for every feature "
                                   "block yet (they are computed after each task's training)")
            offsets = self.block_offsets
        if self.own_blocks:
            logits = blockwise_cosine_logits(out.features, self.prototypes, self.class_blocks(),
                                             self.num_extractors, self.readout_scale, offsets)
        else:
            logits = cosine_logits(out.features, self.prototypes, self.readout_scale)
        return dataclasses.replace(out, logits=logits, head_logits=out.logits)

    def learned_state_dict(self) -> dict[str, torch.Tensor]:
        sd = super().learned_state_dict()
        sd[READOUT_KEY] = self.prototypes.detach().clone()
        if self.relative:
            sd[OFFSETS_KEY] = self.block_offsets.detach().clone()
        return sd

    def load_learned_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        if READOUT_KEY not in sd:
            raise ValueError(f"checkpoint has no {READOUT_KEY!r}: it was not trained with the "
                             "NCM read-out (train.readout=ncm)")
        if self.relative and OFFSETS_KEY not in sd:
            raise ValueError(f"checkpoint has no {OFFSETS_KEY!r}: it was not trained with the "
                             "ncm-relative read-out")
        super().load_learned_state_dict({k: v for k, v in sd.items()
                                         if k not in (READOUT_KEY, OFFSETS_KEY)})
        self.set_prototypes(sd[READOUT_KEY])
        if self.relative:
            self.set_block_offsets(sd[OFFSETS_KEY])

    def architecture(self) -> dict[str, Any]:
        record = super().architecture()
        record["readout"] = {"kind": self.held_readout, "scale": self.readout_scale}
        return record


#: the read-outs an expandable network can have (``train.readout``; the same tuple as the
#: torch-free ``lorax_cil.training.config.READOUTS`` the CLI lists)
READOUT_KINDS = ("head", "ncm", "ncm-frozen", "ncm-relative")


def current_readout(net: Any) -> str | None:
    """How ``net`` reads its classes now: ``ncm`` / ``ncm-frozen`` / ``ncm-relative`` (class
    means of an :class:`NCMExpandableNet`), ``head`` (the linear head of an expandable
    network), or ``None`` for another network (a baseline with a rule of its own, such as
    iCaRL's)."""
    if isinstance(net, NCMExpandableNet) and net.readout == "ncm":
        return "ncm-frozen" if net.relative and not net.use_offsets else net.held_readout
    return "head" if isinstance(net, ExpandableNet) else None


def use_readout(net: Any, readout: str, *, where: str = "the network") -> None:
    """Make ``net`` read its classes with ``readout``: ``head`` on any expandable network (one
    that reads by class means also has its trained linear head); ``ncm`` / ``ncm-frozen`` /
    ``ncm-relative`` only in the kind of class means the network holds (they are computed
    during training); a network that holds ``ncm-relative`` also reads ``ncm-frozen`` (the
    same class means without the block offsets).

    Raises:
        ValueError: an unknown read-out, a read-out the network does not hold, or a network
            that is not expandable (the message names ``where`` and what it holds).
    """
    if readout not in READOUT_KINDS:
        raise ValueError(f"unknown read-out {readout!r}; choose from {', '.join(READOUT_KINDS)}")
    if not isinstance(net, ExpandableNet):
        raise ValueError(f"{where}: read-out {readout!r} does not apply: {type(net).__name__} "
                         "reads its classes by its own rule (only the LoRAX family's expandable "
                         "networks have read-outs to choose from)")
    ncm = isinstance(net, NCMExpandableNet)
    if readout == "head":
        if ncm:
            net.readout = "head"
        return
    held = net.held_readout if ncm else None
    if held != readout and not (held == "ncm-relative" and readout == "ncm-frozen"):
        have = f"its linear head and {held} class means" if held else "its linear head"
        raise ValueError(f"{where}: read-out {readout!r} is not in this checkpoint (it holds "
                         f"{have}; class means are computed during training with train.readout)")
    net.readout = "ncm"
    net.use_offsets = readout == "ncm-relative"


def build_expandable_net(readout: str | None, **kwargs: Any) -> ExpandableNet:
    """The network for ``train.readout``: :class:`NCMExpandableNet` for ``ncm``,
    ``ncm-frozen`` (``own_blocks``) and ``ncm-relative`` (``own_blocks``, ``relative``), the
    plain :class:`ExpandableNet` for ``head`` / ``None``."""
    if readout in ("ncm", "ncm-frozen", "ncm-relative"):
        return NCMExpandableNet(own_blocks=readout != "ncm", relative=readout == "ncm-relative",
                                **kwargs)
    if readout not in (None, "head"):
        raise ValueError(f"train.readout must be one of {', '.join(READOUT_KINDS)}, got "
                         f"{readout!r}")
    return ExpandableNet(**kwargs)
