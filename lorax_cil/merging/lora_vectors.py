"""Task vectors from LoRA adapters: dense ``scaling * B @ A`` deltas, LoRAX runs, refusals.

* :func:`task_vector_from_lora_state_dict`: LoRA factors with their config (this package's adapter
  state or peft's), variants whose update is not ``scaling * B @ A`` (DoRA...) are refused;
* :func:`task_vectors_from_expandable` / :func:`task_vectors_from_lorax_run`: one task vector per
  task extractor of a LoRAX (or DER-style ``"full"``) network.

Keys of LoRA-derived deltas are the names of the *base* weights relative to the backbone's
``model`` (``blocks.0.attn.qkv.weight``), i.e. the keys of the unwrapped model's state dict.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from lorax_cil.merging.task_vectors import TaskVector, copy_head

__all__ = [
    "task_vector_from_lora_state_dict",
    "task_vectors_from_expandable",
    "task_vectors_from_lorax_run",
]

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
        raise ValueError(f"{where}: the LoRA config needs 'r' and 'alpha' (or 'lora_alpha'), "
                         f"got {sorted(config)}")
    if int(cfg_r) != r:
        raise ValueError(f"{where}: factors have rank {r} but the config says r={cfg_r}; the scaling "
                         "cannot be honoured")
    rs = bool(config.get("use_rslora", False))
    scaling = float(alpha) / (math.sqrt(r) if rs else r)
    if "scaling" in config and not math.isclose(float(config["scaling"]), scaling, rel_tol=1e-6):
        rule = "alpha / sqrt(r)" if rs else "alpha / r"
        raise ValueError(f"{where}: recorded scaling {config['scaling']} != {rule} = {scaling} "
                         f"(use_rslora={rs}); refusing to guess which one the adapter used")
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
    recorded = {k: v for k, v in config.items() if _jsonable_scalar(v)}
    info = {"kind": "lora", "lora": recorded, "ranks": sorted(ranks)}
    return TaskVector(deltas=deltas, head=copy_head(head), name=name, meta={**info, **(meta or {})})


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

    if net.extractor == "mole":
        raise ValueError("MoLE extractors route every token to one of several LoRA experts: their update "
                         "depends on the input and is not one dense delta scaling * B @ A; refusing to merge")
    if net.extractor not in ("lora", "full"):
        raise ValueError(f"task vectors need per-task extractors ('lora' or 'full'), "
                         f"got extractor={net.extractor!r}")
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
