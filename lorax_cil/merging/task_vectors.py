"""Task vectors: what fine-tuning added to a shared base, plus the specialist's head.

A :class:`TaskVector` holds ``tau = theta_i - theta_0`` as an ordered ``{name: tensor}`` mapping over
backbone parameters (the *deltas*), and the specialist's classification head *separately* as
absolute tensors (a head has no shared base: every specialist trains its own from scratch).

Builders:

* :func:`task_vector_from_state_dicts`: two state dicts of the same backbone (base, fine-tuned);
* :func:`task_vector_from_lora_state_dict`: LoRA factors ``A``/``B`` with their config, turned into
  dense ``scaling * B @ A`` deltas (variants whose update is not that, such as DoRA, are refused);
* :func:`task_vectors_from_expandable` / :func:`task_vectors_from_lorax_run`: one task vector per
  task extractor of a LoRAX (or DER-style ``"full"``) network.

Keys of LoRA-derived deltas are the names of the *base* weights relative to the backbone's
``model`` (``blocks.0.attn.qkv.weight``), i.e. the keys of the unwrapped model's state dict.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "TaskVector",
    "DEFAULT_SKIP",
    "task_vector_from_state_dicts",
    "task_vector_from_lora_state_dict",
    "task_vectors_from_expandable",
    "task_vectors_from_lorax_run",
    "average_heads",
    "apply_task_vector",
]

logger = logging.getLogger(__name__)

#: State-dict keys that are statistics, not learned weights (kept from the base, never merged).
DEFAULT_SKIP = r"(^|\.)(running_mean|running_var|num_batches_tracked)$"


def _delta_dtype(dtype: torch.dtype) -> torch.dtype:
    """Deltas of half-precision weights are kept in float32 (their difference loses bits)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class TaskVector:
    """``tau = theta_i - theta_0`` over backbone parameters, plus the specialist's head.

    Arithmetic (``+``, ``-``, unary ``-``, ``* scalar``, ``/ scalar``) acts on the backbone deltas
    only; the result carries no head, because heads are absolute weights that are merged by
    averaging (:func:`average_heads`), never added.

    Args:
        deltas: ordered ``{parameter name: delta tensor}``; the mapping is copied, tensors are not.
        head: the specialist's head as absolute tensors (``{"weight": (C, D), "bias": (C,)}``,
            ``C`` = 2 logits [real, fake] or 1 logit), or ``None``.
        name: identifies the specialist (merges need distinct names; DARE seeds by name).
        meta: JSON-serialisable facts about the source (kind, run, task, scaling...).
    """

    def __init__(
        self,
        *,
        deltas: Mapping[str, torch.Tensor],
        head: Mapping[str, torch.Tensor] | None = None,
        name: str = "",
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        for k, v in deltas.items():
            if not isinstance(v, torch.Tensor) or not torch.is_floating_point(v):
                raise TypeError(f"TaskVector {name!r}: delta {k!r} must be a floating-point tensor")
        self.deltas: dict[str, torch.Tensor] = dict(deltas)
        self.head: dict[str, torch.Tensor] | None = dict(head) if head is not None else None
        self.name = str(name)
        self.meta: dict[str, Any] = dict(meta or {})

    # --- mapping protocol -------------------------------------------------------------------
    def __getitem__(self, key: str) -> torch.Tensor:
        return self.deltas[key]

    def __contains__(self, key: object) -> bool:
        return key in self.deltas

    def __iter__(self) -> Iterator[str]:
        return iter(self.deltas)

    def __len__(self) -> int:
        return len(self.deltas)

    def keys(self) -> list[str]:
        return list(self.deltas)

    def items(self):
        return self.deltas.items()

    def numel(self) -> int:
        """``D``: the number of scalar parameters the deltas cover."""
        return sum(v.numel() for v in self.deltas.values())

    def __repr__(self) -> str:
        head = None if self.head is None else {k: tuple(v.shape) for k, v in self.head.items()}
        return f"TaskVector(name={self.name!r}, tensors={len(self)}, numel={self.numel()}, head={head})"

    # --- helpers ----------------------------------------------------------------------------
    def replace(self, **changes: Any) -> "TaskVector":
        """A copy with some of ``deltas``, ``head``, ``name``, ``meta`` replaced."""
        kw = {"deltas": self.deltas, "head": self.head, "name": self.name, "meta": self.meta}
        unknown = sorted(set(changes) - set(kw))
        if unknown:
            raise ValueError(f"TaskVector.replace: unknown fields {unknown}; valid: {sorted(kw)}")
        kw.update(changes)
        return TaskVector(**kw)

    def map(self, fn: Callable[[str, torch.Tensor], torch.Tensor], *, name: str | None = None) -> "TaskVector":
        """A new task vector ``{k: fn(k, v)}`` with the same head."""
        return self.replace(deltas={k: fn(k, v) for k, v in self.deltas.items()},
                            name=self.name if name is None else name)

    def to(self, *args: Any, **kwargs: Any) -> "TaskVector":
        """``Tensor.to`` applied to every delta and head tensor."""
        head = None if self.head is None else {k: v.to(*args, **kwargs) for k, v in self.head.items()}
        return self.replace(deltas={k: v.to(*args, **kwargs) for k, v in self.deltas.items()}, head=head)

    def check_compatible(self, other: "TaskVector") -> None:
        """Raise ``ValueError`` naming the first key or shape that differs."""
        mine, theirs = set(self.deltas), set(other.deltas)
        if mine != theirs:
            only_a, only_b = sorted(mine - theirs)[:5], sorted(theirs - mine)[:5]
            raise ValueError(f"task vectors {self.name!r} and {other.name!r} cover different parameters: "
                             f"only in {self.name!r}: {only_a}, only in {other.name!r}: {only_b}")
        for k, v in self.deltas.items():
            if v.shape != other.deltas[k].shape:
                raise ValueError(f"parameter {k!r}: shape {tuple(v.shape)} in {self.name!r} but "
                                 f"{tuple(other.deltas[k].shape)} in {other.name!r}")

    def dot(self, other: "TaskVector", keys: Sequence[str] | None = None) -> float:
        """``<tau_a, tau_b>`` over ``keys`` (default all), accumulated in float64."""
        self.check_compatible(other)
        keys = self.keys() if keys is None else keys
        return float(sum((self[k].double() * other[k].double()).sum() for k in keys))

    def norm(self, keys: Sequence[str] | None = None) -> float:
        """Euclidean norm over ``keys`` (default all), accumulated in float64."""
        keys = self.keys() if keys is None else keys
        return math.sqrt(float(sum(self[k].double().pow(2).sum() for k in keys)))

    def flatten(self, keys: Sequence[str] | None = None) -> torch.Tensor:
        """The deltas as one ``(D,)`` vector in key order (for tests and small problems)."""
        keys = self.keys() if keys is None else keys
        return torch.cat([self[k].reshape(-1) for k in keys]) if keys else torch.zeros(0)

    # --- arithmetic (deltas only) -----------------------------------------------------------
    def _binary(self, other: "TaskVector", op: Callable, sym: str) -> "TaskVector":
        if not isinstance(other, TaskVector):
            return NotImplemented
        self.check_compatible(other)
        return TaskVector(deltas={k: op(v, other[k]) for k, v in self.deltas.items()},
                          name=f"({self.name}{sym}{other.name})")

    def __add__(self, other: "TaskVector") -> "TaskVector":
        return self._binary(other, torch.add, "+")

    def __sub__(self, other: "TaskVector") -> "TaskVector":
        return self._binary(other, torch.sub, "-")

    def __neg__(self) -> "TaskVector":
        return TaskVector(deltas={k: -v for k, v in self.deltas.items()}, name=f"-{self.name}")

    def __mul__(self, scalar: float) -> "TaskVector":
        if not isinstance(scalar, (int, float)):
            return NotImplemented
        return TaskVector(deltas={k: v * scalar for k, v in self.deltas.items()}, name=f"{scalar:g}*{self.name}")

    __rmul__ = __mul__

    def __truediv__(self, scalar: float) -> "TaskVector":
        if not isinstance(scalar, (int, float)):
            return NotImplemented
        return self * (1.0 / scalar)


# --- builders -------------------------------------------------------------------------------------
def task_vector_from_state_dicts(
    base: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, torch.Tensor],
    *,
    keys: Sequence[str] | None = None,
    head: Mapping[str, torch.Tensor] | None = None,
    name: str = "",
    skip: str | None = DEFAULT_SKIP,
    meta: Mapping[str, Any] | None = None,
) -> TaskVector:
    """``tau = finetuned - base`` over backbone parameters.

    Args:
        base: the shared pretrained state ``theta_0``.
        finetuned: the specialist's state ``theta_i`` (may be partial: only the fine-tuned blocks).
        keys: the parameters to take (default: every floating-point key of ``finetuned`` that does
            not match ``skip``). Non-floating-point tensors are ignored.
        head: the specialist's head (absolute tensors), stored beside the deltas.
        name: the specialist's name.
        skip: regex (``re.search``) of keys left out; default: BatchNorm running statistics.
        meta: extra facts to record.

    Raises:
        ValueError: a key is missing from ``base`` or ``finetuned``, or shapes differ (the error
            names the key).
    """
    rx = re.compile(skip) if skip else None
    chosen = list(finetuned) if keys is None else list(keys)
    deltas: dict[str, torch.Tensor] = {}
    for k in chosen:
        if k not in finetuned:
            raise ValueError(f"task vector {name!r}: key {k!r} is not in the fine-tuned state dict")
        ft = finetuned[k]
        if not torch.is_floating_point(ft) or (keys is None and rx is not None and rx.search(k)):
            continue
        if k not in base:
            raise ValueError(f"task vector {name!r}: key {k!r} of the fine-tuned state is not in the base "
                             f"state dict (base keys, sample: {list(base)[:5]})")
        b = base[k]
        if b.shape != ft.shape:
            raise ValueError(f"task vector {name!r}: key {k!r} has shape {tuple(ft.shape)} in the fine-tuned "
                             f"state but {tuple(b.shape)} in the base")
        dt = _delta_dtype(ft.dtype)
        deltas[k] = ft.detach().to(dt) - b.detach().to(device=ft.device, dtype=dt)
    if not deltas:
        raise ValueError(f"task vector {name!r}: no floating-point parameters selected")
    return TaskVector(deltas=deltas, head=_copy_head(head), name=name, meta={"kind": "state-dict", **(meta or {})})


def _copy_head(head: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    return None if head is None else {k: v.detach().clone() for k, v in head.items()}


_LORA_KEY = re.compile(r"^(?P<prefix>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def _lora_scaling(config: Mapping[str, Any], r: int, where: str) -> float:
    """``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA) from a LoraSpec- or peft-style config."""
    if config.get("use_dora"):
        raise ValueError(f"{where}: DoRA adapters (use_dora=True) rescale the weight by a learned magnitude; "
                         "their dense delta is not scaling * B @ A, refusing to merge them")
    for pat in ("rank_pattern", "alpha_pattern"):
        if config.get(pat):
            raise ValueError(f"{where}: per-module {pat} is not supported (one rank/alpha for all layers)")
    cfg_r = config.get("r")
    alpha = config.get("alpha", config.get("lora_alpha"))
    if cfg_r is None or alpha is None:
        raise ValueError(f"{where}: the LoRA config needs 'r' and 'alpha' (or 'lora_alpha'), got {sorted(config)}")
    if int(cfg_r) != r:
        raise ValueError(f"{where}: factors have rank {r} but the config says r={cfg_r}; the scaling "
                         "cannot be honoured")
    rs = bool(config.get("use_rslora", False))
    scaling = float(alpha) / (math.sqrt(r) if rs else r)
    if "scaling" in config and not math.isclose(float(config["scaling"]), scaling, rel_tol=1e-6):
        raise ValueError(f"{where}: recorded scaling {config['scaling']} != alpha / {'sqrt(r)' if rs else 'r'} "
                         f"= {scaling} (use_rslora={rs}); refusing to guess which one the adapter used")
    return scaling


def _ba(a: torch.Tensor, b: torch.Tensor, key: str) -> torch.Tensor:
    """``B @ A`` for Linear (2-D) or Conv2d (A: ``(r, in, kh, kw)``, B: ``(out, r, 1, 1)``) factors."""
    if a.dim() == 2 and b.dim() == 2 and b.shape[1] == a.shape[0]:
        return b.float() @ a.float()
    if a.dim() == 4 and b.dim() == 4 and b.shape[2:] == (1, 1) and b.shape[1] == a.shape[0]:
        return torch.einsum("or,rikl->oikl", b[:, :, 0, 0].float(), a.float())
    raise ValueError(f"LoRA factors of {key!r} do not compose: A {tuple(a.shape)}, B {tuple(b.shape)}")


def task_vector_from_lora_state_dict(
    lora_state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    head: Mapping[str, torch.Tensor] | None = None,
    name: str = "",
    strip_prefix: str = "",
    meta: Mapping[str, Any] | None = None,
) -> TaskVector:
    """Dense deltas ``scaling * B @ A`` from LoRA factors.

    Accepts this package's adapter state (``<layer>.lora_A.weight``, see
    :func:`lorax_cil.models.lora.adapter_state_dict`) and peft's (``<layer>.lora_A[.<adapter>].weight``).
    The delta of ``<layer>`` is keyed ``<layer>.weight`` (after removing ``strip_prefix``).

    Args:
        lora_state: the factors.
        config: ``LoraSpec.to_dict()`` or a peft ``LoraConfig`` as a dict: ``r``, ``alpha`` /
            ``lora_alpha``, optional ``use_rslora``, ``use_dora``, ``scaling``.
        head, name, meta: as in :func:`task_vector_from_state_dicts`.
        strip_prefix: removed from the start of every layer name (e.g. ``"base_model.model."``).

    Raises:
        ValueError: any key that is not a plain ``lora_A``/``lora_B`` weight (DoRA's
            ``lora_magnitude_vector``, LoRA biases, embedding factors...), ``use_dora``, a rank that
            disagrees with ``config["r"]``, a recorded scaling that disagrees with ``alpha``/``r``
            and ``use_rslora``, or a layer with only one factor.
    """
    where = f"LoRA task vector {name!r}"
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in lora_state.items():
        m = _LORA_KEY.match(key)
        if m is None:
            hint = " (DoRA magnitude)" if "magnitude" in key else ""
            raise ValueError(f"{where}: key {key!r}{hint} is not a plain LoRA factor; only adapters whose "
                             "dense delta is scaling * B @ A can be merged")
        layer = m["prefix"]
        if strip_prefix and layer.startswith(strip_prefix):
            layer = layer[len(strip_prefix):]
        pairs.setdefault(layer, {})[m["ab"]] = t
    deltas: dict[str, torch.Tensor] = {}
    ranks: set[int] = set()
    for layer, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{where}: layer {layer!r} has only lora_{''.join(ab)}")
        r = int(ab["A"].shape[0])
        ranks.add(r)
        scaling = _lora_scaling(config, r, f"{where}, layer {layer!r}")
        deltas[f"{layer}.weight"] = scaling * _ba(ab["A"].detach(), ab["B"].detach(), layer)
    if not deltas:
        raise ValueError(f"{where}: no LoRA factors found")
    info = {"kind": "lora", "lora": {k: v for k, v in config.items() if _jsonable_scalar(v)}, "ranks": sorted(ranks)}
    return TaskVector(deltas=deltas, head=_copy_head(head), name=name, meta={**info, **(meta or {})})


def _jsonable_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str)) or (
        isinstance(v, (list, tuple)) and all(isinstance(x, (bool, int, float, str)) for x in v))


def _check_plain_adapter(layer: nn.Module, index: int, scaling: float, where: str) -> None:
    """Refuse adapters whose dense delta is not ``scaling * B @ A`` (DoRA-like, biased, rescaled)."""
    from lorax_cil.models.lora import LoraAdapter, MultiLoRAConv2d, MultiLoRALinear

    if type(layer) not in (MultiLoRALinear, MultiLoRAConv2d):
        raise ValueError(f"{where}: layer type {type(layer).__name__} is not a plain Multi-LoRA layer; its "
                         "dense delta may not be scaling * B @ A (DoRA-like variant?), refusing to merge")
    a = layer.adapters[index]
    if type(a) is not LoraAdapter:
        raise ValueError(f"{where}: adapter type {type(a).__name__} is not a plain LoraAdapter (DoRA-like "
                         "variant?); its dense delta is not scaling * B @ A, refusing to merge")
    names = sorted(n for n, _ in a.named_parameters()) + sorted(n for n, _ in a.named_buffers())
    if names != ["lora_A.weight", "lora_B.weight"]:
        raise ValueError(f"{where}: adapter holds {names}; only lora_A.weight and lora_B.weight are "
                         "allowed (a magnitude vector or bias means the delta is not scaling * B @ A)")
    if not math.isclose(a.scaling, scaling, rel_tol=1e-6):
        raise ValueError(f"{where}: adapter scaling {a.scaling} != the spec's {scaling} (alpha/r, or "
                         "alpha/sqrt(r) with use_rslora); refusing to guess which one is right")


def _task_head(net: nn.Module, t: int, class_is_fake: Sequence[bool] | None) -> dict[str, torch.Tensor]:
    """Rows of task ``t``'s classes reading task ``t``'s own feature block, ordered [real, fake]."""
    off, n, d = net.class_offsets()[t], net.task_classes[t], net.feature_dim
    rows = list(range(off, off + n))
    if class_is_fake is not None:
        flags = [bool(class_is_fake[c]) for c in rows]
        if sorted(flags) != [False, True]:
            raise ValueError(f"task {t} has classes {rows} with is_fake={flags}: a binary head needs one "
                             "real and one fake class")
        rows = [c for c in rows if not class_is_fake[c]] + [c for c in rows if class_is_fake[c]]
    cols = slice(t * d, (t + 1) * d)
    w, b = net.head.weight.detach(), net.head.bias.detach()
    return {"weight": w[rows, cols].clone(), "bias": b[rows].clone()}


def task_vectors_from_expandable(
    net: nn.Module,
    *,
    names: Sequence[str] | None = None,
    class_is_fake: Sequence[bool] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> list[TaskVector]:
    """One task vector per task extractor of an :class:`~lorax_cil.models.expandable.ExpandableNet`.

    * ``extractor="lora"``: adapter ``t``'s delta of every adapted layer, ``dense_delta(layer, t)``
      (``scaling * B @ A``), keyed ``<layer>.weight`` relative to ``net.backbone.model``.
    * ``extractor="full"``: copy ``t``'s parameters minus the frozen backbone's.

    The head of task ``t`` is the block of the expanding head that maps task ``t``'s own feature
    (columns ``[t*D, (t+1)*D)``) to task ``t``'s classes (rows ``[offset_t, offset_t + n_t)``),
    reordered [real, fake] when ``class_is_fake`` is given. Cross-task weights (other tasks'
    features feeding these rows) are dropped: a merged detector has one feature.

    Raises:
        ValueError: other extractor kinds, or an adapter that is not plain LoRA (DoRA-like,
            extra parameters, scaling that disagrees with the spec).
    """
    from lorax_cil.models.lora import MultiLoRALayer, dense_delta

    if net.extractor not in ("lora", "full"):
        raise ValueError(f"task vectors need per-task extractors ('lora' or 'full'), got extractor={net.extractor!r}")
    names = list(names) if names is not None else [f"task{t}" for t in range(net.num_tasks)]
    if len(names) != net.num_tasks:
        raise ValueError(f"{len(names)} names for {net.num_tasks} tasks")
    model = net.backbone.model
    out = []
    for t in range(net.num_tasks):
        deltas: dict[str, torch.Tensor] = {}
        if net.extractor == "lora":
            spec = net.lora_spec
            for lname, layer in model.named_modules():
                if isinstance(layer, MultiLoRALayer):
                    _check_plain_adapter(layer, t, spec.scaling, f"task {names[t]!r}, layer {lname!r}")
                    deltas[f"{lname}.weight"] = dense_delta(layer, t)
            info = {"kind": "lorax-adapter", "task": t, "lora": spec.to_dict()}
        else:
            base = dict(model.named_parameters())
            copy = net.extractors[t]
            deltas = {n: (copy.tensors()[n].detach() - base[n].detach()).float() for n in copy.param_names}
            info = {"kind": "lorax-full-copy", "task": t}
        out.append(TaskVector(deltas=deltas, head=_task_head(net, t, class_is_fake), name=names[t],
                              meta={**info, **(meta or {})}))
    return out


def _check_recorded_spec(net: nn.Module, recorded: Mapping[str, Any] | None, where: str) -> None:
    """The LoRA spec saved with the run must give the scaling the rebuilt adapters use."""
    if net.extractor != "lora" or recorded is None:
        return
    from lorax_cil.models.lora import LoraSpec

    extra = sorted(set(recorded) - set(LoraSpec.__dataclass_fields__) - {"scaling"})
    if extra:
        raise ValueError(f"{where}: the recorded LoRA spec has fields {extra} this version does not know "
                         "(a LoRA variant?); its dense delta may not be scaling * B @ A, refusing to merge")
    spec = LoraSpec.from_dict(recorded)
    have = net.lora_spec.scaling
    if not math.isclose(spec.scaling, have, rel_tol=1e-6) or (
            "scaling" in recorded and not math.isclose(float(recorded["scaling"]), have, rel_tol=1e-6)):
        raise ValueError(f"{where}: the run recorded LoRA scaling {recorded.get('scaling', spec.scaling)} "
                         f"(use_rslora={spec.use_rslora}) but the rebuilt adapters use {have}; refusing to "
                         "merge with a scaling the adapters were not trained with")


def task_vectors_from_lorax_run(run_dir: str, *, device: str = "cpu") -> list[TaskVector]:
    """One task vector per task adapter of a LoRAX run (its latest checkpoint), named by task.

    See :func:`task_vectors_from_expandable` for the keys and the head slicing.
    """
    from lorax_cil.training.evaluate import load_trained

    net, _cfg, scenario, meta = load_trained(run_dir, device=device)
    _check_recorded_spec(net, meta.get("architecture", {}).get("lora"), str(run_dir))
    names = scenario.task_names[: net.num_tasks]
    return task_vectors_from_expandable(net, names=names, class_is_fake=scenario.class_is_fake,
                                        meta={"run": str(run_dir), "backbone": net.backbone.spec.name})


# --- heads and application ------------------------------------------------------------------------
def average_heads(task_vectors: Sequence[TaskVector]) -> dict[str, torch.Tensor] | None:
    """Element-wise mean of the specialists' heads (``None`` when none has a head).

    Raises:
        ValueError: some task vectors have a head and others not, or head keys/shapes differ.
    """
    heads = [tv.head for tv in task_vectors]
    if all(h is None for h in heads):
        return None
    missing = [tv.name for tv in task_vectors if tv.head is None]
    if missing:
        raise ValueError(f"task vectors {missing} have no head while others do")
    first = task_vectors[0]
    for tv in task_vectors[1:]:
        if set(tv.head) != set(first.head):
            raise ValueError(f"heads differ: {tv.name!r} has {sorted(tv.head)}, {first.name!r} has {sorted(first.head)}")
        for k, v in tv.head.items():
            if v.shape != first.head[k].shape:
                raise ValueError(f"head {k!r}: shape {tuple(v.shape)} in {tv.name!r} but "
                                 f"{tuple(first.head[k].shape)} in {first.name!r} (1-logit vs 2-logit heads?)")
    return {k: torch.stack([h[k].float() for h in heads]).mean(0).to(first.head[k].dtype) for k in first.head}


def apply_task_vector(
    base_state: Mapping[str, torch.Tensor],
    tv: TaskVector,
    *,
    scale: float = 1.0,
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """``theta = theta_0 + scale * tau`` as a new state dict (the caller's dict is not mutated).

    Keys of ``tv`` are looked up as ``prefix + key`` in ``base_state``; tensors of untouched keys
    are shared with ``base_state``, updated ones are new and keep the base dtype.

    Raises:
        ValueError: a key of ``tv`` is missing from ``base_state`` or has another shape.
    """
    out = dict(base_state)
    for k, d in tv.items():
        key = prefix + k
        if key not in base_state:
            raise ValueError(f"apply_task_vector: key {key!r} of task vector {tv.name!r} is not in the base "
                             f"state (sample: {list(base_state)[:5]})")
        b = base_state[key]
        if b.shape != d.shape:
            raise ValueError(f"apply_task_vector: key {key!r} has shape {tuple(b.shape)} in the base but "
                             f"{tuple(d.shape)} in task vector {tv.name!r}")
        out[key] = (b.detach().to(_delta_dtype(b.dtype)) + scale * d.to(b.device, _delta_dtype(b.dtype))).to(b.dtype)
    return out
