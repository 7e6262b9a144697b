"""``"class-attention"``: a per-task class token that reads the frozen patch tokens (CaiT-style).

Whole-block extractors (``lora`` on the last ``k`` blocks) run ``k`` blocks over all ``N`` tokens
per task, so ``T`` tasks cost at least ``(L - k + T k) / L`` backbone passes. Here the frozen
backbone runs every block once for every token, shared by all tasks; each task owns one query
token that, in the last ``k`` blocks, attends to that block's frozen tokens (keys and values
taken from the frozen ``qkv`` of the shared pass, so they are computed once for every task).
Only the task tokens go through the rest of each block (query projection, attention output
projection, MLP), each with its own task's LoRA, as in the class-attention layers of CaiT
(Touvron et al., ICCV 2021). The feature of task ``t`` is its token after the final norm.

A task therefore costs about ``k / (L N)`` of a backbone pass instead of ``k / L``
(:func:`class_attention_flops` gives the exact count), and the last block's own output for the
frozen tokens is never needed: only its keys and values are computed.

Per block ``i`` of the last ``k`` and task token ``z`` (``x_i``: the frozen tokens entering
block ``i``, all ``N`` of them: class token, register tokens, patches)::

    u  = norm1(z)
    q  = W_q u + b_q + s B_q A_q u                     (W_q, b_q: the first third of qkv)
    a  = softmax(q K_i^T / sqrt(d_h)) V_i              (K_i, V_i from qkv(norm1(x_i)), shared)
    z  = z + ls1(W_o a + b_o + s B_o A_o a)
    u  = norm2(z)
    z  = z + ls2(fc2(act(fc1(u) + s B_1 A_1 u)) + s B_2 A_2 (...))

The token enters block ``L - k`` as the frozen class token at that point plus a learned offset
(zeros at the start). With the LoRA ``B`` matrices at zero, the task token then follows exactly
the frozen class token (it attends to the same keys, including the frozen class token's own),
so a new task starts from the frozen backbone's feature.

Every task's token runs in one batch: the frozen projections run once over the ``(B, T, D)``
tokens and ``T`` queries attend to the same keys and values in one attention call; only the
rank-``r`` LoRA updates are one small product per task (each on its own token).

Supported backbones: timm Vision Transformers with a class token (``vit_*``, ``deit_*``,
``dinov2-vits14``, ``vit-test``) whose blocks are timm's ``Block`` (pre-norm, fused ``qkv``
with or without bias, LayerScale ``ls1`` / ``ls2``, ``Mlp``). Others are refused with a
message.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from lorax_cil.models.base import BlockBackbone
from lorax_cil.models.extractors.base import ModulePerTask, SharedPass, Tail, register_extractor
from lorax_cil.models.timm_vit import TimmViTBackbone
from lorax_cil.utils import strict_from_dict

__all__ = ["ClassAttentionSpec", "ClassAttentionExtractor", "TaskToken", "class_attention_flops",
           "block_flops"]

_Pair = tuple[torch.Tensor, torch.Tensor]  # (A, B) of one LoRA
#: The layers a task token can adapt, in block order.
CA_TARGETS = ("q", "proj", "fc1", "fc2")
_INITS = ("kaiming", "gaussian")


@dataclass(frozen=True)
class ClassAttentionSpec:
    """Options of the class-attention extractor.

    Attributes:
        r: LoRA rank of every adapted layer.
        alpha: scale numerator; scaling = ``alpha / r``.
        dropout: dropout on the LoRA input while the task trains.
        targets: which layers of each adapted block get a LoRA on the task token (``q``: the
            query projection, ``proj``: the attention output projection, ``fc1`` / ``fc2``: the
            MLP).
        init: ``"kaiming"`` (A kaiming-uniform, B zeros) or ``"gaussian"`` (A ~ N(0, 1/r)).
    """

    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = CA_TARGETS
    init: str = "kaiming"

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(t for t in self.targets.replace(",", " ").split() if t))
        else:
            object.__setattr__(self, "targets", tuple(str(t) for t in self.targets))
        bad = [t for t in self.targets if t not in CA_TARGETS]
        if bad or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"ClassAttentionSpec.targets must be distinct names among {list(CA_TARGETS)}, "
                             f"got {list(self.targets)}")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"ClassAttentionSpec.r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"ClassAttentionSpec.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ClassAttentionSpec.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in _INITS:
            raise ValueError(f"ClassAttentionSpec.init must be one of {list(_INITS)}, got {self.init!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["scaling"] = self.scaling
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ClassAttentionSpec":
        return strict_from_dict(cls, d, ignore=("scaling",), targets=tuple)


class LowRank(nn.Module):
    """The two factors of one LoRA update: ``B (d_out, r)`` @ ``A (r, d_in)``."""

    def __init__(self, d_in: int, d_out: int, r: int, init: str) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, r))
        if init == "kaiming":  # as nn.Linear / peft
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.A, std=1.0 / r)


class TaskToken(nn.Module):
    """What one task owns: the class-token offset and a :class:`LowRank` per adapted layer and
    block (state names ``token`` and ``blocks.<j>.<layer>.A`` / ``.B``)."""

    def __init__(self, *, dim: int, dims: Mapping[str, tuple[int, int]], k: int,
                 spec: ClassAttentionSpec) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(dim))
        self.blocks = nn.ModuleList(
            nn.ModuleDict({name: LowRank(*dims[name], spec.r, spec.init) for name in spec.targets})
            for _ in range(k)
        )
        self.frozen = False


def _vit_parts(tail: Tail) -> tuple[nn.Module, list[nn.Module]]:
    """The timm model and its tail blocks, or a ValueError saying why the backbone is refused."""
    from timm.layers.attention import Attention
    from timm.layers.mlp import Mlp
    from timm.models.vision_transformer import Block, VisionTransformer

    bb = tail.backbone
    name = bb.spec.name
    need = ("extractor 'class-attention' needs a timm Vision Transformer with a class token "
            "and standard pre-norm blocks (vit_*, deit_*, dinov2-vits14, vit-test)")
    model = getattr(bb, "model", None)
    if not isinstance(bb, TimmViTBackbone) or not isinstance(model, VisionTransformer):
        raise ValueError(f"{need}; got backbone {name!r} ({bb.spec.family}, {type(bb).__name__})")
    if type(bb).run_block is not BlockBackbone.run_block:
        raise ValueError(f"{need}; backbone {name!r} changes its token layout between blocks")
    if getattr(model, "cls_token", None) is None or getattr(model, "num_prefix_tokens", 0) < 1:
        raise ValueError(f"{need}; backbone {name!r} has no class token")
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError(f"{need}; backbone {name!r} pools with attention (global_pool='map')")
    blocks = [bb.block(i) for i in range(tail.start, bb.num_blocks)]
    for i, blk in zip(range(tail.start, bb.num_blocks), blocks):
        ok = (type(blk) is Block and type(blk.attn) is Attention and type(blk.mlp) is Mlp
              and getattr(blk.attn, "gate", None) is None)
        if not ok:
            raise ValueError(f"{need}; block {i} of {name!r} is a {type(blk).__name__} with "
                             f"{type(getattr(blk, 'attn', None)).__name__} attention and "
                             f"{type(getattr(blk, 'mlp', None)).__name__}")
    return model, blocks


@register_extractor("class-attention")
class ClassAttentionExtractor(ModulePerTask):
    """A :class:`TaskToken` per task in ``self.extractors``; the frozen backbone runs once per
    image for all of them (``spec``: :class:`ClassAttentionSpec`)."""

    spec_key = "class_attention"
    spec_type = ClassAttentionSpec

    def __init__(self, tail: Tail, spec: Any = None) -> None:
        super().__init__(tail, spec)
        self.model, self.blocks = _vit_parts(tail)
        attn, mlp = self.blocks[0].attn, self.blocks[0].mlp
        dim = tail.backbone.feature_dim
        self.dims = {"q": (dim, attn.attn_dim), "proj": (attn.attn_dim, dim),
                     "fc1": (dim, mlp.fc1.out_features), "fc2": (mlp.fc1.out_features, dim)}
        self._shared = SharedPass()

    @property
    def k(self) -> int:
        return len(self.blocks)

    # --- growth --------------------------------------------------------------------------------
    def new_module(self) -> nn.Module:
        return TaskToken(dim=self.tail.backbone.feature_dim, dims=self.dims, k=self.k, spec=self.spec)

    # --- the shared frozen pass ----------------------------------------------------------------
    @property
    def shared_passes(self) -> int:
        """How many times the frozen tail ran (tests, benchmarks)."""
        return self._shared.passes

    def shared(self, h: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """``(class token entering block L-k, [(K_i, V_i) for the last k blocks])`` of trunk
        output ``h``, computed once without autograd and reused while ``h`` is alive and
        unchanged (a training step asks for the old tasks and the new one separately)."""
        return self._shared.get(h, self._compute_shared)

    def _compute_shared(self, h: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        bb = self.tail.backbone
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        captured: list[torch.Tensor] = []
        x = h
        cls0 = h[:, 0].clone()  # a view would keep h alive with the cache
        last = bb.num_blocks - 1
        for i, blk in zip(range(self.tail.start, bb.num_blocks), self.blocks):
            if i < last:  # the block itself runs; its qkv output is taken on the way
                hook = blk.attn.qkv.register_forward_hook(lambda _m, _i, out: captured.append(out))
                try:
                    x = bb.run_block(i, x)
                finally:
                    hook.remove()
                qkv = captured.pop()
            else:  # the last block: only its keys and values are needed
                qkv = blk.attn.qkv(blk.norm1(x))
            kv.append(self._keys_values(blk.attn, qkv))
        return cls0, kv

    @staticmethod
    def _keys_values(attn: nn.Module, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, _ = qkv.shape
        qkv = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        return attn.k_norm(qkv[1]), qkv[2]

    # --- task tokens ---------------------------------------------------------------------------
    def _factors(self, tasks: Sequence[int]) -> tuple[torch.Tensor, list[dict[str, list[_Pair]]]]:
        """Tokens ``(T, D)`` and per block ``{layer: [(A_t, B_t) for each task]}`` (the
        parameters themselves: no stacked copy, so memory grows by the parameters alone)."""
        mods = [self.extractors[t] for t in tasks]
        tokens = torch.stack([m.token for m in mods])
        blocks = [{name: [(m.blocks[j][name].A, m.blocks[j][name].B) for m in mods]
                   for name in self.spec.targets} for j in range(self.k)]
        return tokens, blocks

    def features(self, h: torch.Tensor, tasks: Sequence[int], *, train: bool) -> list[torch.Tensor]:
        """Features ``[(B, D)]`` of tasks ``tasks``: all their tokens in one batch (at most
        ``max_group_size`` tasks per batch when set)."""
        tasks = list(tasks)
        if not tasks:
            return []
        cls0, kv = self.shared(h)
        size = self.tail.max_group_size or len(tasks)
        feats: list[torch.Tensor] = []
        for i in range(0, len(tasks), size):
            feats.extend(self._run(cls0, kv, tasks[i : i + size], train=train))
        return feats

    def _run(self, cls0: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]], tasks: list[int], *,
             train: bool) -> list[torch.Tensor]:
        tokens, lora = self._factors(tasks)
        z = cls0.unsqueeze(1) + tokens.unsqueeze(0).to(cls0.dtype)  # (B, T, D)
        drop = self.spec.dropout if train and self.training and not any(
            self.extractors[t].frozen for t in tasks) else 0.0
        for blk, (k, v), ab in zip(self.blocks, kv, lora):
            z = self._block(blk, z, k, v, ab, drop)
        m = self.model
        out = m.head_drop(m.fc_norm(m.norm(z)))
        return list(out.unbind(1))

    def _block(self, blk: nn.Module, z: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               ab: Mapping[str, list[_Pair]], drop: float) -> torch.Tensor:
        attn, mlp = blk.attn, blk.mlp
        s = self.spec.scaling

        def lora(name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if name not in ab:
                return y
            if drop:
                x = F.dropout(x, drop, training=True)
            # task i's factors on its own token only: T products of (B, d_in) x (d_in, r) x (r, d_out)
            up = [F.linear(F.linear(x[:, i], A.to(x.dtype)), B.to(x.dtype)) for i, (A, B) in enumerate(ab[name])]
            return y + s * torch.stack(up, dim=1)

        Bn, T, _ = z.shape
        d = attn.attn_dim
        u = blk.norm1(z)
        w, b = attn.qkv.weight[:d], (attn.qkv.bias[:d] if attn.qkv.bias is not None else None)
        q = lora("q", u, F.linear(u, w, b))
        q = attn.q_norm(q.reshape(Bn, T, attn.num_heads, attn.head_dim).transpose(1, 2))
        a = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), scale=attn.scale)
        a = attn.norm(a.transpose(1, 2).reshape(Bn, T, d))
        z = z + blk.ls1(lora("proj", a, attn.proj(a)))
        u = blk.norm2(z)
        hid = mlp.norm(mlp.act(lora("fc1", u, mlp.fc1(u))))
        return z + blk.ls2(lora("fc2", hid, mlp.fc2(hid)))


# --- cost model ---------------------------------------------------------------------------------
def block_flops(n: int, dim: int, hidden: int, attn_dim: int | None = None) -> float:
    """Multiply-accumulates of one pre-norm ViT block over ``n`` tokens (projections and
    attention matrix products; norms, softmax and activations are left out)."""
    a = attn_dim or dim
    return n * (3 * dim * a + a * dim + 2 * dim * hidden) + 2 * n * n * a


def class_attention_flops(*, n: int, dim: int, hidden: int, L: int, k: int, T: int, r: int,
                          targets: Sequence[str] = CA_TARGETS) -> dict[str, float]:
    """Cost of the class-attention extractor at ``T`` tasks, in multiply-accumulates and in
    plain backbone passes (``n`` tokens, ``L`` blocks of ``dim`` / MLP ``hidden``).

    * shared: ``L - 1`` whole blocks over all tokens, plus ``norm1`` and ``qkv`` of block
      ``L - 1`` (its output for the frozen tokens is never used);
    * per task and adapted block: one token through the query projection (``d^2``), attention
      over ``n`` keys (``2 n d``), output projection (``d^2``) and MLP (``2 d h``), plus the
      LoRA factors ``r (d_in + d_out)`` of the adapted layers.

    Returns ``{"plain", "shared", "per_task", "total", "passes"}`` (``passes`` = total / plain).
    """
    block = block_flops(n, dim, hidden)
    plain = L * block
    shared = (L - 1) * block + n * 3 * dim * dim
    lora_dims = {"q": (dim, dim), "proj": (dim, dim), "fc1": (dim, hidden), "fc2": (hidden, dim)}
    per_block = dim * dim + 2 * n * dim + dim * dim + 2 * dim * hidden
    per_block += sum(r * sum(lora_dims[t]) for t in targets)
    per_task = k * per_block
    total = shared + T * per_task
    return {"plain": plain, "shared": shared, "per_task": per_task, "total": total,
            "passes": total / plain}
