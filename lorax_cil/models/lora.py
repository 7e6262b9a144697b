"""Multi-adapter LoRA layers, group execution and module targeting.

LoRAX needs one feature vector per task adapter, each adapter applied *alone* on the frozen
backbone. peft either sums the active adapters in one pass or switches adapters with
``set_adapter`` (which changes ``requires_grad``), so this module has its own layers:

* :class:`MultiLoRALinear` / :class:`MultiLoRAConv2d` wrap a frozen ``nn.Linear`` /
  ``nn.Conv2d`` and hold any number of adapters.
* :func:`lora_group` is the only way to activate adapters. Inside ``with lora_group(model,
  [0, 1, None])`` the batch of every wrapped layer is split into three equal chunks; chunk ``i``
  gets adapter ``group[i]`` (``None`` = no adapter). Outside any group no adapter is applied.
  ``forward`` itself never changes state.
* :func:`inject_lora` wraps the targeted layers (idempotently); :func:`add_lora_adapter` adds one
  adapter to every wrapper.

Folded execution: without autograd (``torch.no_grad()`` / ``torch.inference_mode()``) an adapter
that is frozen or in eval mode is a fixed linear map, so a chunk runs as one base operation with
the folded weight ``W + scaling * B A`` instead of the base operation plus the two LoRA
operations. The folded weight is computed once per adapter and cached; the cache entry is
recomputed when the base or adapter weights change (tensor version counters, storage, device,
dtype). Training of the newest adapter (autograd on, dropout active) never folds.
:func:`lora_fold` switches folding (and its cache) off or on within a context.

A folded weight is a full copy of the layer's weight per adapter, so the cache is bounded: all
layers together keep at most :data:`FOLD_CACHE_MB` (default 512 MB; environment variable
``LORAX_CIL_FOLD_CACHE_MB`` or :func:`set_fold_cache_limit`). Past the bound an adapter runs
unfolded (``base(x) + B(A(x))``, still without autograd), which costs ``r (d_in + d_out)``
extra per token instead of a copy of the weight; results are the same either way.

A regex target matches a module when it fully matches the module's qualified name or a dotted
suffix of it (``attn\\.(qk|v)`` matches ``blocks.3.attn.qk`` but not ``blocks.3.attn.qkv``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
import re
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from lorax_cil.models.state import copy_state_strict
from lorax_cil.utils import strict_from_dict

__all__ = [
    "LoraSpec",
    "LoraAdapter",
    "MultiLoRALayer",
    "MultiLoRALinear",
    "MultiLoRAConv2d",
    "lora_group",
    "lora_fold",
    "set_fold_cache_limit",
    "fold_cache_bytes",
    "lora_layers",
    "inject_lora",
    "add_lora_adapter",
    "named_adapter_layers",
    "add_adapter_to_all",
    "adapter_modules",
    "adapter_tensors",
    "adapter_parameters",
    "count_adapter_parameters",
    "freeze_adapter",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "dense_delta",
]

logger = logging.getLogger(__name__)

_INITS = ("kaiming", "gaussian")
_BLOCKS_RE = re.compile(r"last:(\d+)")


@dataclass(frozen=True)
class LoraSpec:
    """Configuration of one LoRA adapter.

    Attributes:
        r: rank.
        alpha: scale numerator; scaling = ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: dropout on the adapter input while the adapter is trainable.
        targets: a preset name of the backbone (``lora_target_presets()``), a regex, or a
            list of exact module names (relative to the targeting root).
        blocks: ``"all"`` or ``"last:k"`` (only modules inside the last ``k`` candidate blocks).
        init: ``"kaiming"`` (A kaiming-uniform, B zeros, as peft) or ``"gaussian"``
            (A ~ N(0, 1/r), B zeros).
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
    """

    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.1
    targets: str | tuple[str, ...] = "lorax-paper"
    blocks: str = "all"
    init: str = "kaiming"
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.targets, (list, tuple)):
            object.__setattr__(self, "targets", tuple(str(t) for t in self.targets))
            if not self.targets:
                raise ValueError("LoraSpec.targets: empty list of module names")
        elif not isinstance(self.targets, str) or not self.targets:
            raise ValueError(f"LoraSpec.targets must be a preset, a regex or a list, got {self.targets!r}")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"LoraSpec.r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoraSpec.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSpec.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in _INITS:
            raise ValueError(f"LoraSpec.init must be one of {list(_INITS)}, got {self.init!r}")
        self.last_blocks()  # validates ``blocks``

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def last_blocks(self) -> int | None:
        """``None`` for ``blocks="all"``, else the ``k`` of ``"last:k"``."""
        if self.blocks == "all":
            return None
        m = _BLOCKS_RE.fullmatch(str(self.blocks))
        if not m or int(m.group(1)) < 1:
            raise ValueError(f"LoraSpec.blocks must be 'all' or 'last:k' with k >= 1, got {self.blocks!r}")
        return int(m.group(1))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets) if isinstance(self.targets, tuple) else self.targets
        d["scaling"] = self.scaling
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoraSpec":
        return strict_from_dict(cls, d, ignore=("scaling",))


class LoraAdapter(nn.Module):
    """One adapter: ``scaling * B(A(dropout(x)))``.

    A frozen adapter (``frozen=True``) is a fixed function: no dropout even in training mode.
    """

    def __init__(self, *, lora_A: nn.Module, lora_B: nn.Module, dropout: float, scaling: float) -> None:
        super().__init__()
        self.lora_A = lora_A
        self.lora_B = lora_B
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = float(scaling)
        self.frozen = False

    @property
    def rank(self) -> int:
        w = self.lora_A.weight
        return int(w.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.frozen:
            x = self.dropout(x)
        return self.lora_B(self.lora_A(x)) * self.scaling

    def extra_repr(self) -> str:
        return f"scaling={self.scaling:g}, frozen={self.frozen}"


# --- group activation ---------------------------------------------------------------------------
_GROUPS: contextvars.ContextVar[dict[int, tuple[int | None, ...]]] = contextvars.ContextVar(
    "lorax_cil_lora_groups", default={}
)


def lora_layers(module_or_layers: nn.Module | Iterable[nn.Module]) -> list["MultiLoRALayer"]:
    """All Multi-LoRA wrappers in a module tree (or the wrappers among an iterable of layers)."""
    mods = module_or_layers.modules() if isinstance(module_or_layers, nn.Module) else module_or_layers
    return [m for m in mods if isinstance(m, MultiLoRALayer)]


@contextlib.contextmanager
def lora_group(model_or_layers: nn.Module | Iterable[nn.Module], group: Sequence[int | None]) -> Iterator[None]:
    """Activate adapter ``group[i]`` on batch chunk ``i`` of every wrapper in ``model_or_layers``.

    The batch of each wrapped layer's input is split into ``len(group)`` equal chunks. The
    activation is scoped to this context (a ``ContextVar``) and to the given layers only; nested
    contexts override and restore.
    """
    group = tuple(None if g is None else int(g) for g in group)
    if not group:
        raise ValueError("lora_group: the group is empty")
    layers = lora_layers(model_or_layers)
    mapping = dict(_GROUPS.get())
    mapping.update({id(layer): group for layer in layers})
    token = _GROUPS.set(mapping)
    try:
        yield
    finally:
        _GROUPS.reset(token)


@dataclass(frozen=True)
class _FoldPolicy:
    enabled: bool = True
    cache: bool = True


_FOLD: contextvars.ContextVar[_FoldPolicy] = contextvars.ContextVar("lorax_cil_lora_fold", default=_FoldPolicy())


@contextlib.contextmanager
def lora_fold(enabled: bool = True, *, cache: bool = True) -> Iterator[None]:
    """Allow (default) or forbid folded execution of frozen adapters without autograd.

    Args:
        enabled: ``False`` runs every adapter as ``base(x) + B(A(x))`` (the unmerged execution).
        cache: keep the folded weights between calls (memory: one weight copy per adapted layer
            and adapter); ``False`` folds on every call.
    """
    token = _FOLD.set(_FoldPolicy(bool(enabled), bool(cache)))
    try:
        yield
    finally:
        _FOLD.reset(token)


def _env_fold_cache_mb() -> float:
    raw = os.environ.get("LORAX_CIL_FOLD_CACHE_MB", "512")
    try:
        mb = float(raw)
    except ValueError:
        mb = float("nan")
    if not mb >= 0:
        raise ValueError(f"LORAX_CIL_FOLD_CACHE_MB must be a number of MB >= 0, got {raw!r}")
    return mb


#: Bound, in MB, of the folded weights cached by all LoRA layers of the process together
#: (environment variable ``LORAX_CIL_FOLD_CACHE_MB`` at import, or :func:`set_fold_cache_limit`).
FOLD_CACHE_MB = _env_fold_cache_mb()
_CACHING_LAYERS: "weakref.WeakSet[MultiLoRALayer]" = weakref.WeakSet()


def set_fold_cache_limit(mb: float) -> float:
    """Set the bound (MB) on cached folded weights over all layers; returns the previous one.

    ``0`` caches nothing (frozen adapters then run unfolded); ``float("inf")`` removes the bound.
    Entries cached before the change are kept until their layer's cache is cleared.
    """
    global FOLD_CACHE_MB
    mb = float(mb)
    if not mb >= 0:
        raise ValueError(f"fold cache limit must be >= 0 MB, got {mb}")
    previous, FOLD_CACHE_MB = FOLD_CACHE_MB, mb
    return previous


def fold_cache_bytes() -> int:
    """Bytes held by the folded-weight caches of all live LoRA layers."""
    return sum(layer._fold_cache_nbytes() for layer in list(_CACHING_LAYERS))


def _fold_key(*tensors: torch.Tensor) -> tuple:
    return tuple((t._version, t.data_ptr(), t.device, t.dtype) for t in tensors)


# --- wrappers -------------------------------------------------------------------------------------
class MultiLoRALayer(nn.Module):
    """Base of the Multi-LoRA wrappers: a frozen ``base`` layer plus adapters chosen per chunk."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.adapters = nn.ModuleList()
        self._fold_cache: dict[int, tuple[tuple, torch.Tensor]] = {}

    # peft-style passthrough so code reading ``layer.weight.dtype`` keeps working.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def num_adapters(self) -> int:
        return len(self.adapters)

    def _make_pair(self, r: int) -> tuple[nn.Module, nn.Module]:  # pragma: no cover - abstract
        raise NotImplementedError

    def add_adapter(self, spec: LoraSpec) -> int:
        """Append a new trainable adapter; returns its index."""
        lora_A, lora_B = self._make_pair(spec.r)
        w = self.base.weight
        lora_A.to(device=w.device, dtype=w.dtype)
        lora_B.to(device=w.device, dtype=w.dtype)
        if spec.init == "kaiming":
            nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(lora_A.weight, std=1.0 / spec.r)
        nn.init.zeros_(lora_B.weight)
        self.adapters.append(
            LoraAdapter(lora_A=lora_A, lora_B=lora_B, dropout=spec.dropout, scaling=spec.scaling)
        )
        return len(self.adapters) - 1

    def active_group(self) -> tuple[int | None, ...] | None:
        return _GROUPS.get().get(id(self))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.active_group()
        if group is None or all(g is None for g in group):
            return self.base(x)
        n = len(group)
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} cannot be split into {n} equal adapter chunks")
        for g in group:
            if g is not None and not 0 <= g < len(self.adapters):
                raise IndexError(f"adapter {g} requested, layer has {len(self.adapters)}")
        if self._can_fold(group):
            return self._forward_folded(x, group)
        out = self.base(x)
        if n == 1:
            return out + self.adapters[group[0]](x)
        size = x.shape[0] // n
        deltas = [
            out.new_zeros((size,) + out.shape[1:]) if g is None else self.adapters[g](xi)
            for g, xi in zip(group, x.split(size))
        ]
        return out + torch.cat(deltas, dim=0)

    def delta_weight(self, index: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- folded execution ------------------------------------------------------------------
    def _can_fold(self, group: tuple[int | None, ...]) -> bool:
        """Fold when autograd is off and every adapter of the group is a fixed LoRA map."""
        if torch.is_grad_enabled() or not _FOLD.get().enabled:
            return False
        for g in group:
            if g is None:
                continue
            a = self.adapters[g]
            if type(a) is not LoraAdapter or (a.training and not a.frozen):
                return False
        return True

    def folded_weight(self, index: int) -> torch.Tensor:
        """``base.weight + scaling * B A`` of adapter ``index`` (cached while the weights stand)."""
        w = self._cached_fold(index, fold_anyway=True)
        assert w is not None
        return w

    def _cached_fold(self, index: int, *, fold_anyway: bool) -> torch.Tensor | None:
        """The folded weight from the cache, or computed (and cached while the process-wide
        bound allows). ``None`` when it is neither cached nor cacheable and ``fold_anyway`` is
        false: the caller then runs the adapter unfolded, cheaper than folding on every call."""
        a = self.adapters[index]
        key = _fold_key(self.base.weight, a.lora_A.weight, a.lora_B.weight) + (a.scaling,)
        hit = self._fold_cache.pop(index, None)  # a stale entry is dropped before the bound check
        if hit is not None and hit[0] == key:
            self._fold_cache[index] = hit
            return hit[1]
        policy = _FOLD.get()
        weight = self.base.weight
        cacheable = policy.cache and (
            fold_cache_bytes() + weight.numel() * weight.element_size() <= FOLD_CACHE_MB * 2**20)
        if not (cacheable or fold_anyway or not policy.cache):
            return None
        with torch.no_grad():
            w = weight + self.delta_weight(index).to(weight.dtype)
        if cacheable:
            self._fold_cache[index] = (key, w)
            _CACHING_LAYERS.add(self)
        return w

    def _fold_cache_nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for _, w in self._fold_cache.values())

    def clear_fold_cache(self) -> None:
        """Drop every cached folded weight."""
        self._fold_cache.clear()

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _forward_folded(self, x: torch.Tensor, group: tuple[int | None, ...]) -> torch.Tensor:
        weights = [self.base.weight if g is None else self._cached_fold(g, fold_anyway=False)
                   for g in group]
        chunks = x.chunk(len(group), dim=0) if len(group) > 1 else (x,)
        outs = [self._apply_weight(xi, w) if w is not None else self.base(xi) + self.adapters[g](xi)
                for xi, w, g in zip(chunks, weights, group)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


class MultiLoRALinear(MultiLoRALayer):
    """A frozen ``nn.Linear`` with any number of LoRA adapters (A: in -> r, B: r -> out)."""

    def __init__(self, base: nn.Linear) -> None:
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MultiLoRALinear wraps nn.Linear, got {type(base).__name__}")
        super().__init__(base)
        self.in_features = base.in_features
        self.out_features = base.out_features

    def _make_pair(self, r: int) -> tuple[nn.Module, nn.Module]:
        return nn.Linear(self.in_features, r, bias=False), nn.Linear(r, self.out_features, bias=False)

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, weight, self.base.bias)

    def delta_weight(self, index: int) -> torch.Tensor:
        a = self.adapters[index]
        return a.scaling * (a.lora_B.weight @ a.lora_A.weight)


class MultiLoRAConv2d(MultiLoRALayer):
    """A frozen ``nn.Conv2d`` with LoRA adapters.

    A is a conv with the base's kernel, stride, padding and dilation to ``r`` channels; B is a
    1x1 conv ``r -> out`` (peft's Conv2d layout). Grouped convolutions are refused.
    """

    def __init__(self, base: nn.Conv2d) -> None:
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"MultiLoRAConv2d wraps nn.Conv2d, got {type(base).__name__}")
        if base.groups != 1:
            raise ValueError(f"LoRA on grouped/depthwise Conv2d (groups={base.groups}) is not supported")
        if base.padding_mode != "zeros":
            raise ValueError(f"LoRA on Conv2d needs padding_mode='zeros', got {base.padding_mode!r}")
        super().__init__(base)
        self.in_channels = base.in_channels
        self.out_channels = base.out_channels

    def _make_pair(self, r: int) -> tuple[nn.Module, nn.Module]:
        b = self.base
        lora_A = nn.Conv2d(
            b.in_channels, r, b.kernel_size, stride=b.stride, padding=b.padding, dilation=b.dilation, bias=False
        )
        return lora_A, nn.Conv2d(r, b.out_channels, 1, bias=False)

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.base._conv_forward(x, weight, self.base.bias)

    def delta_weight(self, index: int) -> torch.Tensor:
        a = self.adapters[index]
        b = a.lora_B.weight[:, :, 0, 0]
        return a.scaling * torch.einsum("or,rikl->oikl", b, a.lora_A.weight)


# --- targeting ------------------------------------------------------------------------------------
def _block_prefixes(spec: LoraSpec, block_names: Sequence[str] | None) -> list[str] | None:
    if block_names is None:
        if spec.last_blocks() is not None:
            raise ValueError(f"LoraSpec.blocks={spec.blocks!r} needs the backbone's block names")
        return None
    names = list(block_names)
    k = spec.last_blocks()
    if k is not None:
        if k > len(names):
            raise ValueError(f"LoraSpec.blocks={spec.blocks!r}: only {len(names)} candidate blocks")
        names = names[-k:]
    return names


def _matcher(spec: LoraSpec, presets: Mapping[str, str]):
    if isinstance(spec.targets, tuple):
        exact = set(spec.targets)
        return (lambda name: name in exact), f"names {sorted(exact)[:5]}"
    pattern = presets.get(spec.targets, spec.targets)
    try:
        rx = re.compile(rf"(?:.*\.)?(?:{pattern})")
    except re.error as exc:
        raise ValueError(
            f"LoraSpec.targets={spec.targets!r} is neither a preset {sorted(presets)} nor a valid regex: {exc}"
        ) from None
    return (lambda name: rx.fullmatch(name) is not None), f"{spec.targets!r} (regex {pattern!r})"


def _candidates(root: nn.Module) -> tuple[dict[str, nn.Module], list[str]]:
    """Linear/Conv2d layers and wrappers by name (layers inside wrappers excluded), MHA names."""
    found: dict[str, nn.Module] = {}
    mha: list[str] = []
    skip: list[str] = []
    for name, mod in root.named_modules():
        if any(name.startswith(s) for s in skip):
            continue
        if isinstance(mod, nn.MultiheadAttention):
            mha.append(name)
        if isinstance(mod, MultiLoRALayer):
            found[name] = mod
            skip.append(name + ".")
        elif isinstance(mod, (nn.Linear, nn.Conv2d)):
            found[name] = mod
    return found, mha


def _in(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _refuse_mha(hits: list[str], described: str) -> None:
    if hits:
        raise ValueError(
            f"LoRA targets {described} hit nn.MultiheadAttention ({hits[:3]}): its input projection "
            "is a parameter (in_proj_weight), not a module, and out_proj is bypassed by its forward; "
            "use the 'mlp' preset for this backbone"
        )


def inject_lora(
    module: nn.Module,
    spec: LoraSpec,
    *,
    preset_regexes: Mapping[str, str] | None = None,
    block_names: Sequence[str] | None = None,
    extra_names: Sequence[str] = (),
) -> list[str]:
    """Wrap the targeted ``nn.Linear``/``nn.Conv2d`` layers of ``module`` with Multi-LoRA wrappers.

    Idempotent: layers that are already wrapped are reused. No adapter is added here; call
    :func:`add_lora_adapter` afterwards.

    Args:
        module: targeting root; names are relative to it (for a ``BlockBackbone``, pass
            ``backbone.model``).
        spec: the adapter spec (``targets`` and ``blocks`` are used).
        preset_regexes: preset name -> regex (the backbone's ``lora_target_presets()``).
        block_names: ordered block names relative to ``module``; when given, only layers inside
            these blocks (or the last ``k`` of them with ``blocks="last:k"``) are targeted.
        extra_names: further module subtrees that may be targeted besides the blocks (the
            neck, e.g. EfficientNet's ``_conv_head``); only used with ``block_names``.

    Returns:
        The qualified names of the targeted layers.

    Raises:
        ValueError: nothing matches, a match lies in ``nn.MultiheadAttention`` or in
            ``patch_embed``, or an exact name is not a Linear/Conv2d layer.
    """
    presets = dict(preset_regexes or {})
    prefixes = _block_prefixes(spec, block_names)
    if prefixes is not None:
        prefixes += [n for n in extra_names if n]
    match, described = _matcher(spec, presets)
    found, mha = _candidates(module)
    _refuse_mha([n for n in mha if match(n)] + [n for n in found if match(n) and _in(n, mha)], described)
    names = [n for n in found if match(n) and (prefixes is None or _in(n, prefixes))]
    names = [n for n in names if "patch_embed" not in n.split(".")]
    if isinstance(spec.targets, tuple):
        missing = sorted(set(spec.targets) - set(names))
        if missing:
            raise ValueError(f"LoraSpec.targets: not Linear/Conv2d layers in the chosen blocks: {missing[:5]}")
    if not names:
        avail = [n for n in found if (prefixes is None or _in(n, prefixes)) and "patch_embed" not in n]
        hint = " (this backbone uses nn.MultiheadAttention; try the 'mlp' preset)" if mha else ""
        raise ValueError(
            f"LoRA targets {described} match no Linear/Conv2d layer{hint}. Presets: {sorted(presets)}; "
            f"available layers (sample): {avail[:12]}"
        )
    for name in names:
        layer = found[name]
        if isinstance(layer, MultiLoRALayer):
            continue
        wrapper = MultiLoRALinear(layer) if isinstance(layer, nn.Linear) else MultiLoRAConv2d(layer)
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, wrapper)
    logger.info("LoRA targets %s: %d layers: %s", described, len(names), names)
    return names


def named_adapter_layers(root: nn.Module, layer_type: type | None = None) -> list[tuple[str, "MultiLoRALayer"]]:
    """``(name, layer)`` of every adapter wrapper of ``layer_type`` under ``root`` (default: every
    Multi-LoRA wrapper; :mod:`lorax_cil.models.mole` passes ``MoleLinear``); raises when none."""
    layer_type = layer_type or MultiLoRALayer
    found = [(n, m) for n, m in root.named_modules() if isinstance(m, layer_type)]
    if not found:
        raise ValueError(f"no {layer_type.__name__} layers found: inject the adapters first")
    return found


def add_adapter_to_all(root: nn.Module, spec: Any, layer_type: type | None = None) -> int:
    """Add one adapter built from ``spec`` to every wrapper under ``root``; returns its index."""
    wrappers = named_adapter_layers(root, layer_type)
    counts = {m.num_adapters for _, m in wrappers}
    if len(counts) != 1:
        raise RuntimeError(f"wrappers hold different numbers of adapters: {sorted(counts)}")
    return [m.add_adapter(spec) for _, m in wrappers][0]


def adapter_modules(root: nn.Module, index: int, layer_type: type | None = None) -> list[tuple[str, nn.Module]]:
    """``(layer name, adapter)`` of adapter ``index`` in every wrapper under ``root``."""
    out = []
    for name, m in named_adapter_layers(root, layer_type):
        if not 0 <= index < m.num_adapters:
            raise IndexError(f"adapter {index} does not exist in {name!r} ({m.num_adapters} adapters)")
        out.append((name, m.adapters[index]))
    return out


def adapter_tensors(root: nn.Module, index: int, layer_type: type | None = None) -> dict[str, torch.Tensor]:
    """Adapter ``index`` as ``{"<layer>.<parameter>": parameter}`` (the live tensors).

    Keys do not contain the adapter index, so a state loads into any slot.
    """
    return {f"{name}.{pname}": p for name, a in adapter_modules(root, index, layer_type)
            for pname, p in a.named_parameters()}


def add_lora_adapter(root: nn.Module, spec: LoraSpec) -> int:
    """Add one adapter to every wrapper under ``root``; returns the common adapter index."""
    return add_adapter_to_all(root, spec)


def adapter_parameters(root: nn.Module, index: int) -> list[nn.Parameter]:
    """The parameters of adapter ``index`` in every wrapper under ``root``."""
    return [p for _, a in adapter_modules(root, index) for p in a.parameters()]


def count_adapter_parameters(root: nn.Module, index: int) -> int:
    return sum(p.numel() for p in adapter_parameters(root, index))


def freeze_adapter(root: nn.Module, index: int) -> None:
    """Make adapter ``index`` a fixed function: ``requires_grad=False`` and no dropout."""
    for _, a in adapter_modules(root, index):
        a.frozen = True
        for p in a.parameters():
            p.requires_grad_(False)


def adapter_state_dict(root: nn.Module, index: int) -> dict[str, torch.Tensor]:
    """Adapter ``index`` as ``{"<layer>.lora_A.weight": tensor, "<layer>.lora_B.weight": ...}``.

    Keys do not contain the adapter index, so a state loads into any slot. Tensors are detached
    copies.
    """
    return {k: v.detach().clone() for k, v in adapter_tensors(root, index).items()}


def load_adapter_state_dict(root: nn.Module, index: int, sd: Mapping[str, torch.Tensor]) -> None:
    """Copy ``sd`` (from :func:`adapter_state_dict`) into adapter ``index``; keys must match."""
    copy_state_strict(adapter_tensors(root, index), sd, "adapter")


def dense_delta(layer: nn.Module, index: int) -> torch.Tensor:
    """The dense weight update ``scaling * B @ A`` of adapter ``index``, shaped like ``base.weight``."""
    if not isinstance(layer, MultiLoRALayer):
        raise TypeError(f"dense_delta needs a Multi-LoRA layer, got {type(layer).__name__}")
    if not 0 <= index < layer.num_adapters:
        raise IndexError(f"adapter {index} does not exist ({layer.num_adapters} adapters)")
    with torch.no_grad():
        return layer.delta_weight(index).detach().clone()
