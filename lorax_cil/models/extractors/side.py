"""``"side"``: a narrow per-task side network on the frozen token streams (ladder side-tuning).

Whole-block extractors run ``k`` backbone blocks over every token per task; ``class-attention``
runs one query token per task, so it is cheap but only *re-reads* the frozen tokens through
attention. Here the frozen backbone also runs once per image for every task, and each task owns
a side network of width ``w`` (``w`` much smaller than the backbone width ``D``) that processes
**every token**, fed from the frozen token stream at every block it covers (as in ladder
side-tuning, Sung et al., NeurIPS 2022). Per task, with ``x_0`` the frozen tokens entering block
``L - k`` and ``x_j`` the frozen tokens leaving its ``j``-th block (``j = 1..k``)::

    s  = D_0 LN(x_0)                                      (B, N, w)
    for j = 1..k:
        s = s + D_j LN(x_j)                               (down-projection of the tap, D -> w)
        s = s + M_j(LN(s))                                (per-token MLP, w -> m w -> w)
    f  = f_frozen + (alpha / w) U LN(mean_tokens(s))      (U: w -> D, zeros at the start)

``LN`` is a LayerNorm without affine parameters (the taps of different depths have very
different scales). ``f_frozen`` is the frozen backbone's own feature (the neck of the shared
pass), so a new task starts exactly at the frozen feature, as LoRA with ``B = 0`` does.

Cost per task (multiply-accumulates per token): ``(k + 1) D w + 2 k m w^2``, against
``L (4 D^2 + 2 D h)`` for a plain pass (``h``: the MLP width; attention's ``N^2`` terms left
out), i.e. about ``((k + 1) w / D + 4 k w^2 / D^2) / (12 L)`` of a pass at ``m = 2``,
``h = 4 D``. :func:`side_flops` gives the exact model (tested against torch's FLOP counter);
benchmarks/speed.py measures it (method ``lorax-side-w64``, docs/performance.md).

Memory: the shared pass keeps ``k + 1`` normalised token maps ``(B, N, D)`` per batch (for
ViT-B/16 at 224 px and a batch of 32 on every block, about 240 MB in float32). Side networks
that do not train run together (one matmul per tap for all tasks), from a stacked copy of
their weights kept between batches (about 3.5 MB per task for ViT-B/16 at ``w = 64``).

Supported backbones: any whose blocks keep a ``(B, N, D)`` token layout (timm ViTs, DeiT,
DINOv2). Backbones whose blocks change shape (CNN stages) are refused with a message.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from lorax_cil.models.extractors.base import ModulePerTask, SharedPass, Tail, register_extractor
from lorax_cil.models.extractors.class_attention import block_flops
from lorax_cil.utils import strict_from_dict

__all__ = ["SideSpec", "SideNet", "SideExtractor", "side_flops"]


@dataclass(frozen=True)
class SideSpec:
    """Options of the side extractor.

    Attributes:
        width: ``w``, the width of every task's side network (``model.lora_r`` for
            ``lorax-side``).
        alpha: the side feature is scaled by ``alpha / width`` before it is added to the frozen
            feature (``model.lora_alpha``).
        mlp_ratio: hidden width of each side MLP, in multiples of ``width``.
        dropout: dropout on the side stream while its task trains (``model.lora_dropout``).
    """

    width: int = 64
    alpha: float = 64.0
    mlp_ratio: float = 2.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.width, int) or isinstance(self.width, bool) or self.width < 1:
            raise ValueError(f"SideSpec.width must be a positive integer, got {self.width!r}")
        if not self.alpha > 0:
            raise ValueError(f"SideSpec.alpha must be > 0, got {self.alpha!r}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"SideSpec.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SideSpec.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def hidden(self) -> int:
        return max(1, round(self.width * self.mlp_ratio))

    @property
    def scaling(self) -> float:
        return self.alpha / self.width

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scaling"] = self.scaling
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SideSpec":
        return strict_from_dict(cls, d, ignore=("scaling",))


class SideNet(nn.Module):
    """What one task owns: ``down.<j>`` (``k + 1`` taps), ``mlp.<j>.fc1`` / ``.fc2`` (``k``
    blocks) and ``up`` (zeros at the start)."""

    def __init__(self, *, dim: int, k: int, spec: SideSpec) -> None:
        super().__init__()
        w = spec.width
        self.down = nn.ModuleList(nn.Linear(dim, w) for _ in range(k + 1))
        self.mlp = nn.ModuleList(
            nn.ModuleDict({"fc1": nn.Linear(w, spec.hidden), "fc2": nn.Linear(spec.hidden, w)})
            for _ in range(k)
        )
        self.up = nn.Linear(w, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.frozen = False

    def forward(self, taps: Sequence[torch.Tensor], *, dropout: float = 0.0) -> torch.Tensor:
        """The side feature ``U LN(mean_tokens(s))`` (unscaled) of normalised taps ``(B, N, D)``."""
        s = self.down[0](taps[0])
        for j, mlp in enumerate(self.mlp):
            s = s + self.down[j + 1](taps[j + 1])
            if dropout:
                s = F.dropout(s, dropout, training=True)
            u = F.layer_norm(s, s.shape[-1:])
            s = s + mlp["fc2"](F.gelu(mlp["fc1"](u)))
        pooled = s.mean(dim=1)
        return self.up(F.layer_norm(pooled, pooled.shape[-1:]))


@register_extractor("side")
class SideExtractor(ModulePerTask):
    """A :class:`SideNet` per task in ``self.extractors``; the frozen backbone runs once per
    image for all of them (``spec``: :class:`SideSpec`)."""

    spec_key = "side"
    spec_type = SideSpec

    @classmethod
    def config_defaults(cls, lora_r: int) -> dict[str, float]:
        """``model.lora_r`` is the width here: alpha defaults to it (the side feature enters
        at scale 1, :class:`SideSpec`'s own default) and dropout to :class:`SideSpec`'s (0), the
        setting measured in docs/class-attention.md."""
        return {"lora_alpha": float(lora_r), "lora_dropout": float(SideSpec.dropout)}

    def __init__(self, tail: Tail, spec: Any = None) -> None:
        super().__init__(tail, spec)
        self._shared = SharedPass()
        self._stack_cache: tuple[Any, dict[str, Any]] | None = None
        self._check_layout()

    def add_task(self, t: int) -> None:
        self._stack_cache = None  # a new group of networks: nothing stacked is reused
        super().add_task(t)

    @property
    def k(self) -> int:
        return self.tail.backbone.num_blocks - self.tail.start

    @property
    def side_spec(self) -> SideSpec:
        """The side networks' options (``spec`` here; a kind that holds more options in its
        spec returns its side part)."""
        return self.spec

    @property
    def shared_passes(self) -> int:
        """How many times the frozen tail ran (tests, benchmarks)."""
        return self._shared.passes

    def _check_layout(self) -> None:
        """Refuse backbones whose tail blocks do not keep one ``(B, N, D)`` token layout."""
        bb = self.tail.backbone
        size = bb.spec.input_size
        x = torch.zeros(1, 3, size, size, device=self.tail.device, dtype=self.tail.dtype)
        with torch.no_grad():
            h = bb.run_blocks(bb.stem(x), 0, self.tail.start)
            shapes = [tuple(h.shape)]
            for i in range(self.tail.start, bb.num_blocks):
                h = bb.run_block(i, h)
                shapes.append(tuple(h.shape))
        D = bb.feature_dim
        if any(len(s) != 3 or s != shapes[0] or s[-1] != D for s in shapes):
            raise ValueError(
                f"extractor {self.kind!r} needs a backbone whose blocks keep one (batch, tokens, {D}) "
                f"token layout (a Vision Transformer); backbone {bb.spec.name!r} gives block "
                f"outputs of shapes {sorted(set(shapes))}")

    # --- growth --------------------------------------------------------------------------------
    def new_module(self) -> nn.Module:
        return SideNet(dim=self.tail.backbone.feature_dim, k=self.k, spec=self.side_spec)

    # --- the shared frozen pass ----------------------------------------------------------------
    def shared(self, h: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(frozen feature, [LN(x_0), ..., LN(x_k)])`` of trunk output ``h``, computed once
        without autograd and reused while ``h`` is alive and unchanged."""
        return self._shared.get(h, self._compute_shared)

    def _compute_shared(self, h: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        bb = self.tail.backbone
        x = h
        taps = [F.layer_norm(x, x.shape[-1:])]
        for i in range(self.tail.start, bb.num_blocks):
            x = bb.run_block(i, x)
            taps.append(F.layer_norm(x, x.shape[-1:]))
        return bb.neck(x), taps

    def features(self, h: torch.Tensor, tasks: Sequence[int], *, train: bool) -> list[torch.Tensor]:
        tasks = list(tasks)
        if not tasks:
            return []
        frozen, taps = self.shared(h)
        s = self.side_spec
        # side networks without dropout run together: one matmul per layer for all of them
        # (many small per-task matmuls cost far more than their FLOPs on a CPU)
        drops = {t: s.dropout if train and self.training and not self.extractors[t].frozen else 0.0
                 for t in tasks}
        together = [t for t in tasks if not drops[t]]
        sides = dict(zip(together, self._run_together(taps, together))) if len(together) > 1 else {}
        out = []
        for t in tasks:
            side = sides.get(t)
            if side is None:
                net = self.extractors[t]
                side = net([x.to(net.up.weight.dtype) for x in taps], dropout=drops[t])
            out.append(frozen + s.scaling * side.to(frozen.dtype))
        return out

    def _run_together(self, taps: Sequence[torch.Tensor], tasks: Sequence[int]) -> list[torch.Tensor]:
        """The unscaled side features of ``tasks`` (no dropout) in one batched pass: the
        down-projections of all tasks as one matmul per tap, the side MLPs and up-projections
        as batched matmuls over tasks; equal to :meth:`SideNet.forward` per task up to float
        rounding."""
        nets = [self.extractors[t] for t in tasks]
        T, w = len(nets), self.side_spec.width
        B, N, D = taps[0].shape
        W = self._stacked(nets)
        s = None
        for j in range(len(W["down_w"])):
            y = F.linear(taps[j].to(W["up_w"].dtype).reshape(B * N, D), W["down_w"][j],
                         W["down_b"][j])
            y = y.view(B * N, T, w).transpose(0, 1)  # (T, B N, w)
            if s is None:
                s = y
                continue
            s = s + y  # block j's tap, then block j's side MLP (index j - 1)
            a = torch.baddbmm(W["fc1_b"][j - 1], F.layer_norm(s, (w,)), W["fc1_w"][j - 1])
            s = s + torch.baddbmm(W["fc2_b"][j - 1], F.gelu(a), W["fc2_w"][j - 1])
        pooled = F.layer_norm(s.reshape(T, B, N, w).mean(dim=2), (w,))  # (T, B, w)
        return list(torch.baddbmm(W["up_b"], pooled, W["up_w"]).unbind(0))  # T x (B, D)

    def _stacked(self, nets: Sequence[SideNet]) -> dict[str, Any]:
        """The weights of ``nets`` stacked for :meth:`_run_together` (down-projections
        concatenated per tap, the rest stacked and transposed for ``baddbmm``). Without a
        gradient to carry they are kept while no parameter of the group changed (the version
        counters of every tensor are part of the key): frozen networks are stacked once."""
        params = [p for n in nets for p in n.parameters()]
        graph = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        key = (tuple(id(n) for n in nets), tuple(p._version for p in params),
               params[0].device, params[0].dtype)
        if not graph and self._stack_cache is not None and self._stack_cache[0] == key:
            return self._stack_cache[1]

        def stack(get: Any) -> torch.Tensor:
            return torch.stack([get(n) for n in nets])

        k = len(nets[0].mlp)
        with contextlib.nullcontext() if graph else torch.no_grad():
            W = {
                "down_w": [torch.cat([n.down[j].weight for n in nets]) for j in range(k + 1)],
                "down_b": [torch.cat([n.down[j].bias for n in nets]) for j in range(k + 1)],
                "fc1_w": [stack(lambda n: n.mlp[j]["fc1"].weight.t()) for j in range(k)],
                "fc1_b": [stack(lambda n: n.mlp[j]["fc1"].bias).unsqueeze(1) for j in range(k)],
                "fc2_w": [stack(lambda n: n.mlp[j]["fc2"].weight.t()) for j in range(k)],
                "fc2_b": [stack(lambda n: n.mlp[j]["fc2"].bias).unsqueeze(1) for j in range(k)],
                "up_w": stack(lambda n: n.up.weight.t()),
                "up_b": stack(lambda n: n.up.bias).unsqueeze(1),
            }
        if not graph:
            self._stack_cache = (key, W)
        return W


# --- cost model ---------------------------------------------------------------------------------
def side_flops(*, n: int, dim: int, hidden: int, L: int, k: int, T: int, width: int,
               mlp_ratio: float = 2.0) -> dict[str, float]:
    """Cost of the side extractor at ``T`` tasks, in multiply-accumulates and in plain backbone
    passes (``n`` tokens, ``L`` blocks of width ``dim`` and MLP ``hidden``; attention's ``n^2``
    terms are in the plain pass, see :func:`~lorax_cil.models.extractors.class_attention.block_flops`).

    * shared: one plain pass (all ``L`` blocks over all tokens);
    * per task: ``k + 1`` down-projections ``n dim width``, ``k`` side MLPs
      ``2 n width hidden_side``, and the up-projection ``dim width`` of the pooled token.

    Returns ``{"plain", "shared", "per_task", "total", "passes"}`` (``passes`` = total / plain).
    """
    plain = L * block_flops(n, dim, hidden)
    side_hidden = max(1, round(width * mlp_ratio))
    per_task = (k + 1) * n * dim * width + k * 2 * n * width * side_hidden + dim * width
    total = plain + T * per_task
    return {"plain": plain, "shared": plain, "per_task": per_task, "total": total,
            "passes": total / plain}
