"""The extractor interface: what an :class:`~lorax_cil.models.expandable.ExpandableNet` adds per task.

An extractor kind is one :class:`Extractor` subclass registered with :func:`register_extractor`.
The network composes one instance and never asks which kind it holds; everything that differs
between kinds sits behind these members (only the first three have no default):

==============================  ===================================================================
``add_task(t)``                 make the extractor of task ``t`` (freeze the older ones if it grows)
``freeze(t)``                   make extractor ``t`` a fixed function (no gradient, no dropout)
``features(h, tasks, train=)``  ``[(B, feature_dim)]`` of the extractors ``tasks`` from trunk output
                                ``h``; ``train=True`` only for the one extractor that trains now
``task_state_dict(t)``          extractor ``t`` as detached tensors with stable names
``load_task_state_dict(t, sd)`` the reverse (strict: names and shapes must match)
``parameters_of(t)``            the parameters of extractor ``t`` (the parameter report counts them)
``architecture()``              JSON fields added to the network's architecture record
``with_aux_loss(run)``          ``(features, extra training loss or None)`` of one training forward
``configure(spec, k, L)``       classmethod: resolve the spec and ``adapt_blocks`` before building
``config_defaults(r)``          classmethod: ``model.lora_alpha`` / ``lora_dropout`` when unset
``consolidate(t, batches)``     after task ``t`` trained, turn what trained into what is kept
                                (only kinds with ``consolidates = True``; e.g. distillation)
==============================  ===================================================================

Class attributes: ``grows`` (one feature block per task; ``False``: one block shared by every
task, e.g. fine-tuning), ``consolidates`` (the strategy calls ``consolidate`` after each task,
with the task's training images), ``learns`` (``False``: no learned tensors at all, e.g. the frozen
feature), ``spec_key`` / ``spec_type`` (the architecture-record key and the dataclass, with
``to_dict`` / ``from_dict``, of the kind's options; ``None`` = no options).

Every extractor receives a :class:`Tail`: the shared backbone and the block where extractors
start. Modules an extractor owns outside the backbone go in ``self.extractors`` (one entry per
task, or one shared entry): the default state, freezing and parameter methods work on them.
Kinds that wrap backbone layers instead (LoRA, MoLE) list the wrapped names in ``self.targets``.
A kind that owns one new module per task can derive from :class:`ModulePerTask` and define only
``new_module()`` and ``features``; kinds whose tasks all read one frozen pass cache it per batch
with :class:`SharedPass`.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from lorax_cil.models.base import BlockBackbone
from lorax_cil.models.lora import LoraSpec
from lorax_cil.models.state import copy_state_strict

__all__ = ["Tail", "Extractor", "ModulePerTask", "SharedPass", "register_extractor", "get_extractor",
           "list_extractors"]


class Tail:
    """Blocks ``[start, L)`` + neck of a backbone: what every extractor runs (not a module).

    Args:
        backbone: the shared frozen backbone.
        start: first block of the tail (``L - adapt_blocks``).
        max_group_size: run at most this many adapters in one batched pass (``None``: all at
            once on CUDA, one at a time on CPU).
    """

    def __init__(self, backbone: BlockBackbone, start: int, max_group_size: int | None = None) -> None:
        self.backbone = backbone
        self.start = start
        self.max_group_size = max_group_size
        self._modules: list[str] | None = None
        self._tensors: tuple[list[str], list[str]] | None = None

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.backbone.neck(self.backbone.run_blocks(h, self.start))

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

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

    # --- what the tail touches (probed once on a dummy input) -------------------------------
    def modules_called(self) -> list[str]:
        """Every module of ``backbone.model`` called in the tail, in call order."""
        if self._modules is None:
            self._probe(with_params=False)
        assert self._modules is not None
        return self._modules

    def tensors_used(self) -> tuple[list[str], list[str]]:
        """``(parameters, buffers)`` the tail uses: parameters that receive a gradient and the
        persistent buffers of the called modules (qualified names in ``backbone.model``)."""
        if self._tensors is None:
            self._probe(with_params=True)
        assert self._tensors is not None
        return self._tensors

    def neck_modules(self) -> list[str]:
        """Modules the tail calls outside every block (the neck), outermost first."""
        blocks = self.backbone.spec.block_names
        out: list[str] = []
        for n in self.modules_called():
            inside = any(n == b or n.startswith(b + ".") for b in blocks)
            if not inside and not any(n.startswith(o + ".") for o in out):
                out.append(n)
        return out

    def _probe(self, *, with_params: bool) -> None:
        bb, model = self.backbone, self.backbone.model
        size = bb.spec.input_size
        x = torch.zeros(1, 3, size, size, device=self.device, dtype=self.dtype)
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
                out = self(h)
                grads = torch.autograd.grad(out.sum(), list(params.values()), allow_unused=True) if params else ()
        finally:
            for hk in hooks:
                hk.remove()
            for n, p in params.items():
                p.requires_grad_(flags[n])
        self._modules = list(dict.fromkeys(n for n in called if n))
        if with_params:
            buffers = []
            for mname in self._modules:
                mod = model.get_submodule(mname)
                buffers += [f"{mname}.{b}" for b, _ in mod.named_buffers(recurse=False)
                            if b not in mod._non_persistent_buffers_set]
            used = [n for n, g in zip(params, grads) if g is not None]
            self._tensors = (used, list(dict.fromkeys(buffers)))


class SharedPass:
    """One no-grad computation on trunk output ``h``, kept while ``h`` is alive and unchanged.

    Kinds whose tasks all read one frozen pass (``class-attention``, ``side``) compute it
    once per batch: a training step asks for the old tasks and the new one separately, with the
    same ``h``. The cached result is dropped when ``h`` is freed or modified in place.
    ``passes`` counts the computations (tests and benchmarks read it).
    """

    def __init__(self) -> None:
        self._cache: tuple[Any, ...] | None = None
        self.passes = 0

    def get(self, h: torch.Tensor, compute: Callable[[torch.Tensor], Any]) -> Any:
        c = self._cache
        if c is not None and c[0]() is h and c[1] == h._version:
            return c[2]
        with torch.no_grad():
            out = compute(h)
        self.passes += 1
        token = object()
        self._cache = (weakref.ref(h), h._version, out, token)
        weakref.finalize(h, self._drop, token)
        return out

    def _drop(self, token: object) -> None:
        c = self._cache
        if c is not None and c[3] is token:
            self._cache = None

    def __deepcopy__(self, memo: dict) -> "SharedPass":  # a copy starts with an empty cache
        return SharedPass()


class Extractor(nn.Module):
    """Base of every extractor kind (see the module docstring for the members).

    Args:
        tail: the shared backbone tail the extractors run.
        spec: the kind's options (an instance of ``spec_type``), or ``None`` for kinds without.
    """

    kind: ClassVar[str] = ""
    grows: ClassVar[bool] = True
    learns: ClassVar[bool] = True
    consolidates: ClassVar[bool] = False
    spec_key: ClassVar[str | None] = None
    spec_type: ClassVar[type | None] = None

    def __init__(self, tail: Tail, spec: Any = None) -> None:
        super().__init__()
        self.tail = tail
        self.spec = spec if spec is not None or self.spec_type is None else self.spec_type()
        self.targets: list[str] = []
        self.extractors = nn.ModuleList()

    @classmethod
    def configure(cls, spec: Any, adapt_blocks: int | None, num_blocks: int) -> tuple[Any, int | None]:
        """``(spec, adapt_blocks)`` to build with: the default spec when none is given."""
        if spec is None and cls.spec_type is not None:
            spec = cls.spec_type()
        return spec, adapt_blocks

    @classmethod
    def config_defaults(cls, lora_r: int) -> dict[str, float]:
        """``model.lora_alpha`` and ``model.lora_dropout`` for a configuration that leaves them
        unset (``None``), given ``model.lora_r``: LoRA's official values here (alpha 16, dropout
        0.1); a kind that reads these keys with another meaning overrides it."""
        return {"lora_alpha": float(LoraSpec.alpha), "lora_dropout": float(LoraSpec.dropout)}

    @property
    def feature_dim(self) -> int:
        """Size of one extractor's feature (default: the backbone's)."""
        return self.tail.backbone.feature_dim

    # --- growth and computation (every kind defines these) ----------------------------------
    def add_task(self, t: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def freeze(self, t: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def features(self, h: torch.Tensor, tasks: Sequence[int], *, train: bool) -> list[torch.Tensor]:
        raise NotImplementedError  # pragma: no cover - abstract

    def with_aux_loss(self, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run one training forward (``run()`` returns the features); the extra loss to add to
        the training loss, already weighted, or ``None``."""
        return run(), None

    def consolidate(self, t: int, batches: Callable[[], Iterable[torch.Tensor]], *,
                    batches_per_epoch: int, min_steps: int = 0, amp: bool = False) -> dict[str, Any]:
        """After task ``t`` trained: make the extractor that is kept from the one that trained
        (``consolidates = True`` kinds only; the strategy calls it before the head's after-task
        stage and the memory update).

        Args:
            batches: ``batches()`` yields one epoch of trunk outputs (the task's training
                images and the memory, shuffled, training transforms) on the model's device.
            batches_per_epoch: how many batches ``batches()`` yields.
            min_steps: optimizer steps at least (``train.min_steps_per_task``).
            amp: bfloat16 autocast on CUDA.

        Returns:
            what to log (e.g. ``{"steps": ..., "loss": ...}``).
        """
        raise NotImplementedError(f"extractor {self.kind!r} does not consolidate")  # pragma: no cover

    # --- state (defaults: the modules in ``self.extractors``) ---------------------------------
    def parameters_of(self, t: int) -> list[nn.Parameter]:
        return list(self.extractors[t].parameters())

    def _named_tensors(self, t: int) -> dict[str, torch.Tensor]:
        mod = self.extractors[t]
        return {**dict(mod.named_parameters()), **dict(mod.named_buffers())}

    def task_state_dict(self, t: int) -> dict[str, torch.Tensor]:
        return {n: v.detach().clone() for n, v in self._named_tensors(t).items()}

    def load_task_state_dict(self, t: int, sd: Mapping[str, torch.Tensor]) -> None:
        copy_state_strict(self._named_tensors(t), sd, f"extractor {t}")

    def architecture(self) -> dict[str, Any]:
        """Fields for the architecture record (default: the spec under ``spec_key``)."""
        if self.spec_key is None or self.spec is None:
            return {}
        return {self.spec_key: self.spec.to_dict()}


class ModulePerTask(Extractor):
    """An extractor kind that owns one new module per task in ``self.extractors``
    (``class-attention``, ``side``): :meth:`new_module` builds it; adding a task freezes the
    previous module (no gradient, ``frozen = True``, which the kind reads to switch its
    dropout off) and appends the new one on the backbone's device and dtype."""

    def new_module(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def add_task(self, t: int) -> None:
        if t:
            self.freeze(t - 1)
        ref = next(self.tail.backbone.parameters())
        self.extractors.append(self.new_module().to(ref.device, ref.dtype))
        assert len(self.extractors) == t + 1, (len(self.extractors), t)

    def freeze(self, t: int) -> None:
        mod = self.extractors[t]
        for p in mod.parameters():
            p.requires_grad_(False)
        mod.frozen = True


_REGISTRY: dict[str, type[Extractor]] = {}


def register_extractor(name: str) -> Callable[[type[Extractor]], type[Extractor]]:
    """Class decorator: register an :class:`Extractor` subclass as kind ``name``."""

    def deco(cls: type[Extractor]) -> type[Extractor]:
        if not (isinstance(cls, type) and issubclass(cls, Extractor)):
            raise TypeError(f"register_extractor({name!r}) needs an Extractor subclass, got {cls!r}")
        if name in _REGISTRY:
            raise ValueError(f"extractor {name!r} is already registered")
        cls.kind = name
        _REGISTRY[name] = cls
        return cls

    return deco


def get_extractor(name: str) -> type[Extractor]:
    """The class registered as ``name``; unknown names list the valid ones."""
    if name not in _REGISTRY:
        raise ValueError(f"extractor must be one of {list_extractors()}, got {name!r}")
    return _REGISTRY[name]


def list_extractors() -> list[str]:
    """Registered kinds in registration order (the built-in ones first)."""
    return list(_REGISTRY)


@contextlib.contextmanager
def training_mode(modules: Sequence[nn.Module], mode: bool) -> Iterator[None]:
    """Set ``training`` of exactly these modules (not their children) inside the block."""
    before = [m.training for m in modules]
    try:
        for m in modules:
            m.training = mode
        yield
    finally:
        for m, b in zip(modules, before):
            m.training = b
