"""MoLE: a mixture of low-rank experts on the MLP layers of the last ViT blocks.

Per adapted linear layer ``W0`` (Liu et al., CLIPMoLE)::

    h = W0 x + s B A x + G_k(x) s_k B_k A_k x,   k = argmax_i G_i(x),   G = softmax(W_g x)

with one shared LoRA (rank 8 by default), ``N`` routed LoRA experts (ranks 4, 8, 16 by default),
a linear router ``W_g`` (``N x d``, no bias) and top-1 routing per token: every token goes to
its single most probable expert, whose output is scaled by that gate value (Switch-Transformer
style, so the router receives a gradient through the chosen gate). ``s = alpha / r`` per branch.

The Switch load-balancing loss of one router over the ``T`` tokens it saw is
``L_lb = N * sum_j f_j P_j`` with ``f_j`` the fraction of tokens routed to expert ``j`` and
``P_j`` the mean gate probability of ``j`` (:func:`switch_balance_loss`). Collect the losses of
one forward pass with :func:`collect_balance_losses`.

The layers plug into the multi-adapter machinery of :mod:`lorax_cil.models.lora`:
:class:`MoleLinear` is a :class:`~lorax_cil.models.lora.MultiLoRALinear` whose adapters are
:class:`MoleAdapter` objects, so :func:`~lorax_cil.models.lora.lora_group` activates them (one
MoLE adapter per batch chunk) and ``freeze_adapter`` / ``count_adapter_parameters`` work on them.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from lorax_cil.models.lora import (
    LoraAdapter,
    MultiLoRALayer,
    MultiLoRALinear,
    adapter_tensors,
    add_adapter_to_all,
    lora_group,
)
from lorax_cil.models.state import copy_state_strict
from lorax_cil.utils import strict_from_dict

__all__ = [
    "MOLE_TARGETS",
    "MoleSpec",
    "MoleAdapter",
    "MoleLinear",
    "switch_balance_loss",
    "collect_balance_losses",
    "mole_target_regex",
    "inject_mole",
    "add_mole_adapter",
    "mole_layers",
    "mole_active",
    "mole_adapter_state_dict",
    "load_mole_adapter_state_dict",
]

logger = logging.getLogger(__name__)

#: target name -> (timm regex, open_clip regex or None); matched against names inside a block.
_TARGET_TABLE: dict[str, tuple[str, str | None]] = {
    "mlp": (r"mlp\.(fc1|fc2)", r"mlp\.(c_fc|c_proj)"),
    "mlp-in": (r"mlp\.fc1", r"mlp\.c_fc"),
    "mlp-out": (r"mlp\.fc2", r"mlp\.c_proj"),
    "attn": (r"attn\.(qkv|qk|v|proj)", None),
    "attn+mlp": (r"(attn\.(qkv|qk|v|proj)|mlp\.(fc1|fc2))", None),
}
#: Valid ``MoleSpec.targets`` values.
MOLE_TARGETS = tuple(_TARGET_TABLE)


@dataclass(frozen=True)
class MoleSpec:
    """Configuration of one MoLE adapter (defaults: the paper's).

    Attributes:
        shared_rank: rank of the shared LoRA; 0 = no shared LoRA ("separate only" ablation).
        expert_ranks: ranks of the routed experts; empty = no experts and no router
            ("shared only" ablation, numerically a plain LoRA).
        alpha: scale numerator of every branch (``scaling = alpha / r``); ``None``: each branch
            uses ``alpha = r`` (scaling 1). The paper does not state its alpha.
        dropout: dropout on the adapter input while the adapter trains.
        targets: which linear layers of each adapted block: ``mlp`` (both MLP linears, the
            paper's choice), ``mlp-in`` (timm ``fc1`` / open_clip ``c_fc``), ``mlp-out``
            (``fc2`` / ``c_proj``), ``attn`` or ``attn+mlp`` (timm only: open_clip attention
            is ``nn.MultiheadAttention``, whose projections cannot be wrapped).
        blocks: adapt the last ``blocks`` transformer blocks; ``None`` = every block.
        balance_weight: weight ``lambda`` of the summed load-balancing losses.
    """

    shared_rank: int = 8
    expert_ranks: tuple[int, ...] = (4, 8, 16)
    alpha: float | None = None
    dropout: float = 0.0
    targets: str = "mlp"
    blocks: int | None = 3
    balance_weight: float = 0.01

    def __post_init__(self) -> None:
        object.__setattr__(self, "expert_ranks", tuple(self.expert_ranks))
        ranks = (self.shared_rank, *self.expert_ranks)
        if any(not isinstance(r, int) or isinstance(r, bool) for r in ranks):
            raise ValueError(f"MoleSpec ranks must be integers, got {ranks!r}")
        if self.shared_rank < 0 or any(r < 1 for r in self.expert_ranks):
            raise ValueError(f"MoleSpec: shared_rank >= 0 and expert ranks >= 1, got {ranks!r}")
        if self.shared_rank == 0 and not self.expert_ranks:
            raise ValueError("MoleSpec needs a shared LoRA (shared_rank > 0) or routed experts")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"MoleSpec.alpha must be > 0 or None, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MoleSpec.dropout must be in [0, 1), got {self.dropout!r}")
        if self.targets not in _TARGET_TABLE:
            raise ValueError(f"MoleSpec.targets must be one of {list(MOLE_TARGETS)}, got {self.targets!r}")
        if self.blocks is not None and (isinstance(self.blocks, bool) or not isinstance(self.blocks, int)
                                        or self.blocks < 1):
            raise ValueError(f"MoleSpec.blocks must be a positive int or None, got {self.blocks!r}")
        if not self.balance_weight >= 0:
            raise ValueError(f"MoleSpec.balance_weight must be >= 0, got {self.balance_weight!r}")

    @property
    def num_experts(self) -> int:
        return len(self.expert_ranks)

    def scaling(self, r: int) -> float:
        """``alpha / r`` of a branch of rank ``r``."""
        return 1.0 if self.alpha is None else float(self.alpha) / r

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["expert_ranks"] = list(self.expert_ranks)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MoleSpec":
        return strict_from_dict(cls, d, expert_ranks=lambda ranks: tuple(int(r) for r in ranks))


# --- load-balancing loss ------------------------------------------------------------------------
_COLLECTOR: contextvars.ContextVar[list[torch.Tensor] | None] = contextvars.ContextVar(
    "lorax_cil_mole_balance", default=None
)


def switch_balance_loss(gates: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``N * sum_j f_j P_j`` of one router.

    Args:
        gates: softmax gate probabilities ``(..., N)`` of every token.
        index: the expert each token was routed to (default: the argmax of ``gates``).

    Returns:
        A scalar; 1.0 for perfectly balanced routing, up to ``N`` when one expert takes all.
        Only ``P`` (the mean gate probability) carries a gradient.
    """
    n = gates.shape[-1]
    g = gates.reshape(-1, n)
    idx = g.argmax(-1) if index is None else index.reshape(-1)
    f = F.one_hot(idx, n).to(g.dtype).mean(0)
    return n * (f * g.mean(0)).sum()


@contextlib.contextmanager
def collect_balance_losses() -> Iterator[list[torch.Tensor]]:
    """Collect the load-balancing loss of every trainable MoLE router run inside the block.

    Yields a list that receives one scalar per (router, batch chunk) call; frozen adapters add
    nothing. Nested blocks collect separately.
    """
    losses: list[torch.Tensor] = []
    token = _COLLECTOR.set(losses)
    try:
        yield losses
    finally:
        _COLLECTOR.reset(token)


# --- layers ---------------------------------------------------------------------------------------
class MoleAdapter(nn.Module):
    """One MoLE adapter of a linear layer: a shared LoRA, routed LoRA experts and a router.

    Parameters are named ``shared.lora_A.weight``, ``shared.lora_B.weight``,
    ``experts.<i>.lora_A.weight``, ``experts.<i>.lora_B.weight`` and ``router.weight``.
    """

    def __init__(self, *, in_features: int, out_features: int, spec: MoleSpec) -> None:
        super().__init__()
        self.spec = spec
        self.frozen = False
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.shared = self._branch(in_features, out_features, spec.shared_rank) if spec.shared_rank else None
        self.experts = nn.ModuleList(self._branch(in_features, out_features, r) for r in spec.expert_ranks)
        self.router = nn.Linear(in_features, spec.num_experts, bias=False) if spec.num_experts else None
        owner = [i for i, r in enumerate(spec.expert_ranks) for _ in range(r)]
        scale = [spec.scaling(r) for r in spec.expert_ranks for _ in range(r)]
        self.register_buffer("rank_owner", torch.tensor(owner, dtype=torch.long), persistent=False)
        self.register_buffer("rank_scale", torch.tensor(scale, dtype=torch.float32), persistent=False)

    def _branch(self, d_in: int, d_out: int, r: int) -> LoraAdapter:
        a, b = nn.Linear(d_in, r, bias=False), nn.Linear(r, d_out, bias=False)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        return LoraAdapter(lora_A=a, lora_B=b, dropout=0.0, scaling=self.spec.scaling(r))

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate probabilities ``(..., N)`` (float32) and the top-1 expert ``(...,)`` of every token."""
        if self.router is None:
            raise ValueError("this MoLE adapter has no routed experts")
        gates = torch.softmax(self.router(x).float(), dim=-1)
        return gates, gates.argmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.frozen:
            x = self.dropout(x)
        out = None
        if self.shared is not None:
            out = self.shared.lora_B(self.shared.lora_A(x)) * self.shared.scaling
        if self.num_experts:
            gates, idx = self.route(x)
            chosen = F.one_hot(idx, self.num_experts).to(gates.dtype) * gates  # top-1 gate only
            coef = (chosen.index_select(-1, self.rank_owner) * self.rank_scale).to(x.dtype)
            a = torch.cat([e.lora_A.weight for e in self.experts], dim=0)
            b = torch.cat([e.lora_B.weight for e in self.experts], dim=1)
            routed = F.linear(F.linear(x, a) * coef, b)
            out = routed if out is None else out + routed
            losses = _COLLECTOR.get()
            if losses is not None and not self.frozen:
                losses.append(switch_balance_loss(gates, idx))
        return out

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """Dense ``scaling * B @ A`` of every branch (``shared``, ``experts.<i>``), detached.

        The MoLE update itself is token-dependent (routing), so it has no single dense delta.
        """
        out = {}
        branches = ([("shared", self.shared)] if self.shared is not None else []) + [
            (f"experts.{i}", e) for i, e in enumerate(self.experts)]
        with torch.no_grad():
            for name, br in branches:
                out[name] = (br.scaling * (br.lora_B.weight @ br.lora_A.weight)).detach().clone()
        return out

    def extra_repr(self) -> str:
        s = self.spec
        return f"shared_rank={s.shared_rank}, expert_ranks={list(s.expert_ranks)}, frozen={self.frozen}"


class MoleLinear(MultiLoRALinear):
    """A frozen ``nn.Linear`` holding MoLE adapters (activated with ``lora_group``)."""

    def add_adapter(self, spec: MoleSpec) -> int:  # type: ignore[override]
        if not isinstance(spec, MoleSpec):
            raise TypeError(f"MoleLinear.add_adapter takes a MoleSpec, got {type(spec).__name__}")
        w = self.base.weight
        adapter = MoleAdapter(in_features=self.in_features, out_features=self.out_features, spec=spec)
        self.adapters.append(adapter.to(device=w.device, dtype=w.dtype))
        return len(self.adapters) - 1

    def delta_weight(self, index: int) -> torch.Tensor:
        raise TypeError(
            "a MoLE adapter routes every token to one expert, so it has no single dense weight "
            "delta; use adapters[i].delta_weights() for the per-branch deltas"
        )


# --- targeting ------------------------------------------------------------------------------------
def _chosen_blocks(spec: MoleSpec, block_names: Sequence[str]) -> list[str]:
    names = list(block_names)
    if not names:
        raise ValueError("MoLE needs the backbone's ordered block names")
    if spec.blocks is None:
        return names
    if spec.blocks > len(names):
        raise ValueError(f"MoleSpec.blocks={spec.blocks}: the backbone has only {len(names)} blocks")
    return names[-spec.blocks:]


def mole_target_regex(module: nn.Module, block_names: Sequence[str], targets: str) -> str:
    """The regex (over names inside a block) of ``targets`` for this backbone's naming.

    timm ViT blocks name their MLP ``mlp.fc1`` / ``mlp.fc2``; open_clip blocks ``mlp.c_fc`` /
    ``mlp.c_proj``. The naming is detected from the modules of the given blocks.

    Raises:
        ValueError: unknown target, a block with neither naming, or attention targets on
            open_clip (``nn.MultiheadAttention``).
    """
    if targets not in _TARGET_TABLE:
        raise ValueError(f"MoLE targets must be one of {list(MOLE_TARGETS)}, got {targets!r}")
    inner = [n for b in block_names for n, _ in module.get_submodule(b).named_modules()]
    timm_rx, clip_rx = _TARGET_TABLE[targets]
    if any(n.endswith("mlp.c_fc") for n in inner):
        if clip_rx is None:
            raise ValueError(
                f"MoLE targets {targets!r}: open_clip blocks use nn.MultiheadAttention, whose q/k/v "
                "projection is a parameter and whose out_proj is bypassed by its forward; valid "
                "targets for open_clip: 'mlp', 'mlp-in', 'mlp-out'"
            )
        return clip_rx
    if any(n.endswith("mlp.fc1") for n in inner):
        return timm_rx
    linears = [n for b in block_names[-1:] for n, m in module.get_submodule(b).named_modules()
               if isinstance(m, nn.Linear)]
    raise ValueError(
        "MoLE supports ViT blocks with mlp.fc1/mlp.fc2 (timm) or mlp.c_fc/mlp.c_proj (open_clip); "
        f"block {block_names[-1]!r} has linear layers {linears[:8]}"
    )


def inject_mole(module: nn.Module, spec: MoleSpec, *, block_names: Sequence[str]) -> list[str]:
    """Wrap the targeted linears of the last ``spec.blocks`` blocks with :class:`MoleLinear`.

    Idempotent (existing MoLE wrappers are reused). No adapter is added; call
    :func:`add_mole_adapter` afterwards.

    Args:
        module: targeting root (``backbone.model``); names are relative to it.
        spec: ``targets`` and ``blocks`` are used.
        block_names: the backbone's ordered block names relative to ``module``.

    Returns:
        Qualified names of the wrapped layers.
    """
    blocks = _chosen_blocks(spec, block_names)
    rx = re.compile(mole_target_regex(module, blocks, spec.targets))
    names: list[str] = []
    for b in blocks:
        block = module.get_submodule(b)
        mha = [n for n, m in block.named_modules() if isinstance(m, nn.MultiheadAttention)]
        for n, m in list(block.named_modules()):
            if not rx.fullmatch(n) or any(n.startswith(p + ".") for p in mha):
                continue
            if isinstance(m, MultiLoRALayer) and not isinstance(m, MoleLinear):
                raise ValueError(f"{b}.{n} already carries plain LoRA adapters; MoLE cannot share it")
            if not isinstance(m, nn.Linear) and not isinstance(m, MoleLinear):
                continue
            if not isinstance(m, MoleLinear):
                parent, _, child = n.rpartition(".")
                setattr(block.get_submodule(parent) if parent else block, child, MoleLinear(m))
            names.append(f"{b}.{n}")
    if not names:
        raise ValueError(f"MoLE targets {spec.targets!r} match no linear layer in blocks {blocks}")
    logger.info("MoLE targets %r: %d layers in %d blocks", spec.targets, len(names), len(blocks))
    return names


def mole_layers(root: nn.Module) -> list[MoleLinear]:
    """Every :class:`MoleLinear` under ``root``, in module order."""
    return [m for m in root.modules() if isinstance(m, MoleLinear)]


def add_mole_adapter(root: nn.Module, spec: MoleSpec) -> int:
    """Add one MoLE adapter to every :class:`MoleLinear` under ``root``; returns its index."""
    return add_adapter_to_all(root, spec, MoleLinear)


@contextlib.contextmanager
def mole_active(root: nn.Module, index: int = 0) -> Iterator[None]:
    """Apply MoLE adapter ``index`` to the whole batch inside the block."""
    with lora_group(mole_layers(root), [index]):
        yield


def mole_adapter_state_dict(root: nn.Module, index: int) -> dict[str, torch.Tensor]:
    """MoLE adapter ``index`` as ``{"<layer>.<param>": tensor}`` (detached copies).

    ``<param>`` is ``shared.lora_A.weight``, ``experts.<i>.lora_B.weight``, ``router.weight``,
    ...; keys carry no adapter index, so a state loads into any slot.
    """
    return {k: v.detach().clone() for k, v in adapter_tensors(root, index, MoleLinear).items()}


def load_mole_adapter_state_dict(root: nn.Module, index: int, sd: Mapping[str, torch.Tensor]) -> None:
    """Copy ``sd`` (from :func:`mole_adapter_state_dict`) into adapter ``index``; keys must match."""
    copy_state_strict(adapter_tensors(root, index, MoleLinear), sd, "MoLE adapter")
