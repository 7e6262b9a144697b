"""The expandable multi-extractor network (LoRAX, DER w/o pruning, MEMO, fine-tuning, probes).

One architecture, two axes:

* what a task's extractor is (``extractor``): ``"lora"`` (a new LoRA adapter per task),
  ``"mole"`` (a new MoLE adapter per task: shared LoRA + routed LoRA experts, see
  :mod:`lorax_cil.models.mole`), ``"full"`` (a trainable copy of the adapted blocks + neck per task), ``"finetune"`` (one shared
  trainable copy, never frozen) or ``"frozen"`` (no extractor: the frozen backbone feature);
* where it starts (``adapt_blocks=k``): extractors cover blocks ``[L-k, L)`` + neck; the trunk
  (stem + blocks ``[0, L-k)``) is frozen and computed once per image, shared by every task.

Features of all extractors are concatenated in task order and fed to a growing linear head.
Class ids are contiguous by task: task ``t`` owns ``[offset_t, offset_t + n_t)``.

The network takes ownership of the backbone it is given (LoRA wrappers are injected into it)
and keeps it in eval mode: it is a fixed function (BatchNorm statistics never move).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from lorax_cil.models.base import BlockBackbone, TaskClassCounts
from lorax_cil.models.lora import (
    LoraSpec,
    add_lora_adapter,
    adapter_state_dict,
    count_adapter_parameters,
    freeze_adapter,
    inject_lora,
    load_adapter_state_dict,
    lora_group,
    lora_layers,
)
from lorax_cil.models.mole import (
    MoleSpec,
    add_mole_adapter,
    collect_balance_losses,
    inject_mole,
    load_mole_adapter_state_dict,
    mole_adapter_state_dict,
)

__all__ = ["EXTRACTORS", "ExpandableOutput", "TailCopy", "ExpandableNet"]

logger = logging.getLogger(__name__)

EXTRACTORS = ("lora", "mole", "full", "finetune", "frozen")
#: Extractors that are adapters inside the shared backbone (activated with ``lora_group``).
_ADAPTERS = ("lora", "mole")
ARCH_FORMAT = "lorax-cil/expandable-net"
ARCH_VERSION = 1


@dataclass
class ExpandableOutput:
    """Everything one forward pass produces.

    Attributes:
        logits: ``(B, num_classes)`` from the expanding head.
        div_logits: ``(B, n_new + 1)`` from the divergence head, or ``None`` when there is none.
        features: ``(B, num_features)`` concatenated extractor features, task order.
        aux_loss: ``"mole"`` in training mode: the MoLE load-balancing losses of the trainable
            extractor, summed and already multiplied by ``MoleSpec.balance_weight`` (add it to
            the training loss); otherwise ``None``.
    """

    logits: torch.Tensor
    div_logits: torch.Tensor | None
    features: torch.Tensor
    aux_loss: torch.Tensor | None = None


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


@contextlib.contextmanager
def _training(modules: list[nn.Module], mode: bool) -> Iterator[None]:
    before = [m.training for m in modules]
    try:
        for m in modules:
            m.training = mode
        yield
    finally:
        for m, b in zip(modules, before):
            m.training = b


class ExpandableNet(TaskClassCounts, nn.Module):
    """A frozen trunk, one feature extractor per task, concatenated features, expanding head.

    Args:
        backbone: the frozen block-structured backbone (ownership is taken).
        extractor: one of :data:`EXTRACTORS`.
        adapt_blocks: ``k``: extractors start at block ``L-k``; ``None`` = all blocks (for
            ``"mole"``: ``None`` takes ``mole.blocks``, and a given ``k`` replaces it).
        lora: LoRA spec for ``extractor="lora"`` (default :class:`LoraSpec`).
        mole: MoLE spec for ``extractor="mole"`` (default :class:`MoleSpec`: shared rank 8,
            experts 4/8/16 on both MLP linears of the last 3 blocks).
        divergence_head: build the auxiliary head on the newest extractor from task 1 on
            (only for ``"lora"``, ``"mole"`` and ``"full"``, the extractors that grow).
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
        divergence_head: bool = True,
        max_group_size: int | None = None,
    ) -> None:
        super().__init__()
        if extractor not in EXTRACTORS:
            raise ValueError(f"extractor must be one of {list(EXTRACTORS)}, got {extractor!r}")
        L = backbone.num_blocks
        if adapt_blocks is not None and not (isinstance(adapt_blocks, int) and 1 <= adapt_blocks <= L):
            raise ValueError(f"adapt_blocks must be None or an int in [1, {L}], got {adapt_blocks!r}")
        if lora is not None and extractor != "lora":
            raise ValueError(f"lora is only used with extractor='lora', not {extractor!r}")
        if mole is not None and extractor != "mole":
            raise ValueError(f"mole is only used with extractor='mole', not {extractor!r}")
        if extractor == "mole":
            mole = mole or MoleSpec()
            if adapt_blocks is None and mole.blocks is not None:
                adapt_blocks = min(mole.blocks, L)
            mole = dataclasses.replace(mole, blocks=adapt_blocks)
        if max_group_size is not None and max_group_size < 1:
            raise ValueError(f"max_group_size must be >= 1, got {max_group_size!r}")
        self.backbone = backbone
        self.extractor = extractor
        self.adapt_blocks = adapt_blocks
        self.start = L - (adapt_blocks or L)
        self.lora_spec = (lora or LoraSpec()) if extractor == "lora" else None
        self.mole_spec = mole
        self.use_divergence = bool(divergence_head) and extractor in ("lora", "mole", "full")
        self.max_group_size = max_group_size
        self.task_classes: list[int] = []
        self.extractors = nn.ModuleList()  # TailCopy per task ("full") or one ("finetune")
        self.head: nn.Linear | None = None
        self.div_head: nn.Linear | None = None
        self.lora_targets: list[str] = []
        self._tail_tensors: tuple[list[str], list[str]] | None = None
        self._tail_modules: list[str] = []
        self.backbone.eval()
        if extractor == "lora":
            presets = backbone.lora_target_presets() if hasattr(backbone, "lora_target_presets") else {}
            self._probe_tail(with_params=False)
            self.lora_targets = inject_lora(
                backbone.model,
                self.lora_spec,
                preset_regexes=presets,
                block_names=backbone.spec.block_names[self.start :],
                extra_names=self._neck_modules(),
            )
            self._lora_layers = lora_layers(backbone.model)
        elif extractor == "mole":
            self.lora_targets = inject_mole(backbone.model, mole, block_names=backbone.spec.block_names)
            self._lora_layers = lora_layers(backbone.model)

    # --- sizes (num_tasks and num_classes from TaskClassCounts) ----------------------------
    @property
    def feature_dim(self) -> int:
        """Size of one extractor's feature."""
        return self.backbone.feature_dim

    @property
    def num_extractors(self) -> int:
        """Feature blocks in the concatenated feature (``"frozen"``: the backbone's, 1)."""
        if self.extractor in (*_ADAPTERS, "full"):
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
        if self.extractor in _ADAPTERS:
            if t:
                freeze_adapter(self.backbone.model, t - 1)
            if self.extractor == "lora":
                index = add_lora_adapter(self.backbone.model, self.lora_spec)
            else:
                index = add_mole_adapter(self.backbone.model, self.mole_spec)
            assert index == t, (index, t)
        elif self.extractor == "full":
            if t:
                self.extractors[-1].freeze()
            source = self.extractors[-1].tensors() if t else None
            self.extractors.append(self._new_tail_copy(source))
        elif self.extractor == "finetune" and t == 0:
            self.extractors.append(self._new_tail_copy(None))
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

    def _probe_tail(self, *, with_params: bool) -> None:
        """Find the modules, parameters and buffers the tail uses (forward hooks + autograd).

        Sets ``_tail_modules`` (every module called in blocks ``[start, L)`` + neck) and, with
        ``with_params``, ``_tail_tensors`` (parameters that receive a gradient, and the persistent
        buffers of the called modules).
        """
        bb, model, ref = self.backbone, self.backbone.model, self._ref()
        x = torch.zeros(1, 3, bb.spec.input_size, bb.spec.input_size, device=ref.device, dtype=ref.dtype)
        params = dict(model.named_parameters()) if with_params else {}
        flags = {n: p.requires_grad for n, p in params.items()}
        called: list[str] = []
        names = {id(m): n for n, m in model.named_modules()}
        hooks = [m.register_forward_pre_hook(lambda mod, _a: called.append(names[id(mod)])) for m in model.modules()]
        try:
            with torch.no_grad():
                h = bb.run_blocks(bb.stem(x), 0, self.start)
            called.clear()
            for p in params.values():
                p.requires_grad_(True)
            with torch.enable_grad():
                out = _TailRunner(bb, self.start)(h)
                grads = torch.autograd.grad(out.sum(), list(params.values()), allow_unused=True) if params else ()
        finally:
            for hk in hooks:
                hk.remove()
            for n, p in params.items():
                p.requires_grad_(flags[n])
        self._tail_modules = list(dict.fromkeys(n for n in called if n))
        if with_params:
            buffers = []
            for mname in self._tail_modules:
                mod = model.get_submodule(mname)
                buffers += [f"{mname}.{b}" for b, _ in mod.named_buffers(recurse=False)
                            if b not in mod._non_persistent_buffers_set]
            used = [n for n, g in zip(params, grads) if g is not None]
            self._tail_tensors = (used, list(dict.fromkeys(buffers)))

    def _neck_modules(self) -> list[str]:
        """Modules the tail calls outside every block (the neck), outermost first."""
        blocks = self.backbone.spec.block_names
        out: list[str] = []
        for n in self._tail_modules:
            inside = any(n == b or n.startswith(b + ".") for b in blocks)
            if not inside and not any(n.startswith(o + ".") for o in out):
                out.append(n)
        return out

    def _new_tail_copy(self, source: Mapping[str, torch.Tensor] | None) -> TailCopy:
        if self._tail_tensors is None:
            self._probe_tail(with_params=True)
        pnames, bnames = self._tail_tensors
        base = dict(self.backbone.model.named_parameters())
        base.update(dict(self.backbone.model.named_buffers()))
        src = source if source is not None else base
        return TailCopy(params={n: src[n] for n in pnames}, buffers={n: src[n] for n in bnames})

    # --- modes ------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "ExpandableNet":
        super().train(mode)
        self.backbone.eval()
        if self.extractor in _ADAPTERS and self.num_tasks:
            for layer in self._lora_layers:
                layer.adapters[self.num_tasks - 1].train(mode)
        return self

    def _trainable_extractor(self) -> int | None:
        """Index of the extractor that trains now (None for ``"frozen"``)."""
        if not self.num_tasks or self.extractor == "frozen":
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
        return self.backbone.neck(self.backbone.run_blocks(h, self.start))

    def group_size(self, h: torch.Tensor, n: int) -> int:
        """How many adapters run batched in one pass over trunk output ``h``.

        ``max_group_size`` when set; otherwise all of them on CUDA (one large batch keeps a GPU
        busy) and one at a time on CPU. A group repeats ``h`` once per adapter and concatenates
        the outputs, while every adapted layer still runs one matrix product per adapter (each
        chunk has its own folded weight), so on CPU batching only adds memory traffic:
        `benchmarks/speed.py` measured full-depth ViT-B/16 at T = 12 at 13.2 plain passes
        batched against 11.4 one at a time, and the small test ViT at 20.7 against 11.4.
        """
        if self.max_group_size:
            return self.max_group_size
        return max(1, n) if h.device.type == "cuda" else 1

    def _lora_features(self, h: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        """Features ``[(B, D)]`` of adapters ``indices``, batched in groups."""
        size = self.group_size(h, len(indices))
        feats: list[torch.Tensor] = []
        for i in range(0, len(indices), size):
            group = indices[i : i + size]
            hh = h.repeat((len(group),) + (1,) * (h.dim() - 1)) if len(group) > 1 else h
            with lora_group(self._lora_layers, group):
                feats.extend(self._tail(hh).chunk(len(group), dim=0))
        return feats

    def _full_features(self, h: torch.Tensor, index: int, train: bool) -> torch.Tensor:
        tensors = {f"bb.model.{n}": t for n, t in self.extractors[index].tensors().items()}
        runner = _TailRunner(self.backbone, self.start)
        mods = [self.backbone.model.get_submodule(n) for n in self._tail_modules] if train else []
        with _training(mods, True):  # the trainable copy runs its tail in training mode
            return torch.func.functional_call(runner, tensors, (h,))

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if not self.num_tasks:
            raise RuntimeError("ExpandableNet has no task yet: call add_task() first")
        return self._features_from_trunk(self.trunk(x))

    def _features_from_trunk(self, h: torch.Tensor) -> torch.Tensor:
        """Concatenated features from the trunk output ``h``; old extractors run without grad."""
        if not self.num_tasks:
            raise RuntimeError("ExpandableNet has no task yet: call add_task() first")
        if self.extractor == "frozen":
            with torch.no_grad():
                return self._tail(h)
        n, live = self.num_extractors, self.training and self._trainable_extractor() is not None
        if self.extractor in _ADAPTERS:
            if not live:
                return torch.cat(self._lora_features(h, list(range(n))), dim=1)
            with torch.no_grad():
                old = self._lora_features(h, list(range(n - 1))) if n > 1 else []
            return torch.cat(old + self._lora_features(h, [n - 1]), dim=1)
        with torch.no_grad():
            old = [self._full_features(h, i, False) for i in range(n - 1)]
        new = self._full_features(h, n - 1, live)
        return torch.cat(old + [new], dim=1)

    def forward_all(self, x: torch.Tensor, *, from_trunk: bool = False) -> ExpandableOutput:
        """Logits, divergence logits (or ``None``) and concatenated features.

        With ``from_trunk=True``, ``x`` is the output of :meth:`trunk` (e.g. from a cache), not
        an image batch.
        """
        features = self._features_from_trunk if from_trunk else self._features
        aux = None
        if self.extractor == "mole" and self.training:
            with collect_balance_losses() as losses:
                feats = features(x)
            if losses:
                aux = self.mole_spec.balance_weight * torch.stack(losses).sum()
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
        if self.extractor in _ADAPTERS:
            return count_adapter_parameters(self.backbone.model, t)
        self._check_extractor(t)
        return sum(p.numel() for p in self.extractors[t].parameters())

    def parameter_report(self) -> dict[str, Any]:
        """Parameter counts: newest trainable extractor, per extractor, heads, total stored."""
        count = 0 if self.extractor == "frozen" else self.num_extractors
        per = [self.extractor_parameter_count(t) for t in range(count)]
        adapters = sum(per) if self.extractor in _ADAPTERS else 0
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
        if self.extractor == "frozen":
            raise ValueError("extractor='frozen' has no per-task extractors")
        if not 0 <= t < self.num_extractors:
            raise IndexError(f"extractor {t} does not exist ({self.num_extractors} extractors)")

    def extractor_state_dict(self, t: int) -> dict[str, torch.Tensor]:
        """Extractor ``t`` as plain tensors (detached copies) with stable names."""
        self._check_extractor(t)
        if self.extractor == "lora":
            return adapter_state_dict(self.backbone.model, t)
        if self.extractor == "mole":
            return mole_adapter_state_dict(self.backbone.model, t)
        return {n: v.detach().clone() for n, v in self.extractors[t].tensors().items()}

    def load_extractor_state_dict(self, t: int, sd: Mapping[str, torch.Tensor]) -> None:
        self._check_extractor(t)
        if self.extractor == "lora":
            load_adapter_state_dict(self.backbone.model, t, sd)
            return
        if self.extractor == "mole":
            load_mole_adapter_state_dict(self.backbone.model, t, sd)
            return
        _copy_into(self.extractors[t].tensors(), sd, f"extractor {t}")

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
        _copy_into(target, sd, "head")

    def learned_state_dict(self) -> dict[str, torch.Tensor]:
        """Every learned tensor: ``extractor.<t>.<name>`` plus the head keys."""
        sd = self.head_state_dict()
        if self.extractor != "frozen":
            for t in range(self.num_extractors):
                sd.update({f"extractor.{t}.{k}": v for k, v in self.extractor_state_dict(t).items()})
        return sd

    def load_learned_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        if self.extractor != "frozen":
            for t in range(self.num_extractors):
                prefix = f"extractor.{t}."
                self.load_extractor_state_dict(t, {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)})
        known = {k for k in sd if k.startswith("extractor.")}
        self.load_head_state_dict({k: v for k, v in sd.items() if k not in known})

    def architecture(self) -> dict[str, Any]:
        """JSON-serialisable description from which :meth:`from_architecture` rebuilds the net."""
        s = self.backbone.spec
        return {
            "format": ARCH_FORMAT,
            "version": ARCH_VERSION,
            "backbone": s.name,
            "feature_dim": s.feature_dim,
            "num_blocks": s.num_blocks,
            "extractor": self.extractor,
            "adapt_blocks": self.adapt_blocks,
            "lora": self.lora_spec.to_dict() if self.lora_spec is not None else None,
            "mole": self.mole_spec.to_dict() if self.mole_spec is not None else None,
            "lora_targets": list(self.lora_targets),
            "divergence_head": self.use_divergence,
            "task_classes": list(self.task_classes),
        }

    @classmethod
    def from_architecture(cls, arch: Mapping[str, Any], backbone: BlockBackbone) -> "ExpandableNet":
        """Rebuild an empty network with the same structure (load the state afterwards)."""
        if arch.get("format") != ARCH_FORMAT or arch.get("version") != ARCH_VERSION:
            raise ValueError(f"not a {ARCH_FORMAT} v{ARCH_VERSION} architecture: {arch.get('format')!r}")
        s = backbone.spec
        for key, have in (("backbone", s.name), ("feature_dim", s.feature_dim), ("num_blocks", s.num_blocks)):
            if arch[key] != have:
                raise ValueError(f"architecture {key}={arch[key]!r} does not match the backbone's {have!r}")
        net = cls(
            backbone=backbone,
            extractor=arch["extractor"],
            adapt_blocks=arch["adapt_blocks"],
            lora=LoraSpec.from_dict(arch["lora"]) if arch["lora"] is not None else None,
            mole=MoleSpec.from_dict(arch["mole"]) if arch.get("mole") is not None else None,
            divergence_head=arch["divergence_head"],
        )
        if list(arch["lora_targets"]) != net.lora_targets:
            raise ValueError("adapter targets resolved on this backbone differ from the architecture's")
        for n in arch["task_classes"]:
            net.add_task(int(n))
        return net


def _copy_into(target: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], what: str) -> None:
    missing, unexpected = sorted(set(target) - set(sd)), sorted(set(sd) - set(target))
    if missing or unexpected:
        raise ValueError(f"{what} state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for k, t in target.items():
            if sd[k].shape != t.shape:
                raise ValueError(f"{what} state {k!r}: shape {tuple(sd[k].shape)} != {tuple(t.shape)}")
            t.copy_(sd[k])
