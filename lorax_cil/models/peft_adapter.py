"""peft interoperability: a task's LoRA extractor as a peft adapter folder, and back.

A LoRAX extractor with ``extractor="lora"`` is exactly a peft LoRA adapter on the backbone's
module tree: the same modules (``blocks.9.attn.qkv``, ...), ``A`` and ``B`` matrices in peft's
layout (``nn.Linear`` and ``nn.Conv2d``), scaling ``alpha / r`` (``alpha / sqrt(r)`` with
rsLoRA). :func:`export_peft_adapter` writes

    adapter_config.json         peft ``LoraConfig`` (written by peft itself): r, lora_alpha,
                                use_rslora, and target_modules = the exact adapted module names
                                (only the last ``adapt_blocks`` blocks when the run adapts those)
    adapter_model.safetensors   ``base_model.model.<module>.lora_{A,B}.weight``
    README.md                   the backbone it belongs to and how to load it

so that ``peft.PeftModel.from_pretrained(backbone_model, folder)`` on the *same* backbone (the
run's timm / open_clip model with the same weights) computes the toolkit's features of that
task. :func:`extractor_state_from_peft` reads such a folder (from the toolkit or trained
elsewhere with peft) into the state of a new extractor.

Not expressible in peft, and refused with a message: MoLE extractors (a router mixes several
LoRA experts per token), ``full`` / ``finetune`` extractors (trainable copies of whole blocks,
not low-rank deltas) and ``frozen`` (no per-task extractor).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

__all__ = ["PEFT_PREFIX", "peft_unsupported_reason", "export_peft_adapter", "read_peft_adapter",
           "extractor_state_from_peft"]

#: Prefix of peft's saved adapter keys (a ``PeftModel`` over the plain model).
PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

_UNSUPPORTED = {
    "mole": "a MoLE extractor mixes a shared LoRA and routed LoRA experts per token through a "
            "learned router, which a peft LoRA adapter cannot express",
    "full": "a 'full' extractor is a trainable copy of whole blocks, not a low-rank adapter",
    "finetune": "a 'finetune' extractor is the fine-tuned blocks themselves, not a low-rank "
                "adapter",
    "frozen": "extractor 'frozen' has no per-task extractor",
}


def peft_unsupported_reason(extractor: str) -> str | None:
    """Why an extractor kind has no peft form (``None`` for ``lora``)."""
    if extractor == "lora":
        return None
    return _UNSUPPORTED.get(extractor, f"extractor {extractor!r} is not a LoRA adapter")


def _check_lora(net: Any) -> None:
    extractor = getattr(net, "extractor", None)
    reason = peft_unsupported_reason(str(extractor))
    if reason:
        raise ValueError(f"cannot express this run's extractors as a peft adapter: {reason}")


def export_peft_adapter(net: Any, task: int, out: str | Path, *,
                        base_model: str | None = None, notes: str = "") -> Path:
    """Write extractor ``task`` of the expandable network ``net`` as a peft LoRA adapter folder.

    Args:
        net: an :class:`~lorax_cil.models.expandable.ExpandableNet` with ``extractor="lora"``.
        task: extractor index.
        out: the folder to write (created; existing adapter files are replaced).
        base_model: recorded as ``base_model_name_or_path`` (e.g. the timm model name).
        notes: extra Markdown for README.md (the backbone recipe, how to rebuild it).

    Raises:
        ValueError: the extractor is not a LoRA adapter (the message says why).
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    _check_lora(net)
    spec = net.lora_spec
    state = net.extractor_state_dict(task)
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        use_rslora=spec.use_rslora, target_modules=targets, bias="none",
                        base_model_name_or_path=base_model)
    config.save_pretrained(str(out))
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / "README.md").write_text(
        f"# LoRA adapter of task {task}\n\nExported by `lorax-cil export-adapter`: rank "
        f"{spec.r}, alpha {spec.alpha:g}{' (rsLoRA)' if spec.use_rslora else ''}, "
        f"{len(targets)} adapted modules ({targets[0]} ... {targets[-1]}).\n\n"
        "```python\nfrom peft import PeftModel\n"
        "model = PeftModel.from_pretrained(base_model, \"<this folder>\")  # the same backbone\n"
        "```\n\n" + notes, encoding="utf-8")
    return out


def read_peft_adapter(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config, tensors)`` of a peft adapter folder (safetensors only: no pickle).

    Raises:
        FileNotFoundError: the folder lacks ``adapter_config.json`` or the safetensors weights.
        ValueError: not a LoRA adapter, or options the toolkit's adapters do not have.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME} (not a peft adapter folder)")
    if not weights.is_file():
        found = sorted(p.name for p in folder.glob("adapter_model.*"))
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_NAME}"
                                + (f" (found {found}; only safetensors are read)" if found else ""))
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{cfg_path}: not valid JSON ({exc})") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {config.get('peft_type')!r}, only LoRA "
                         "adapters become extractors")
    for key, ok in (("bias", "none"), ("use_dora", False), ("fan_in_fan_out", False)):
        if config.get(key, ok) not in (ok, None):
            raise ValueError(f"{cfg_path}: {key}={config[key]!r} is not supported (needs {ok!r})")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"{cfg_path}: per-module {key} is not supported")
    return config, load_file(str(weights))


def extractor_state_from_peft(net: Any, folder: str | Path) -> dict[str, torch.Tensor]:
    """The extractor state (keys of ``net.extractor_state_dict``) of a peft LoRA adapter.

    The adapter must adapt exactly the run's LoRA modules with the run's rank; a different
    ``lora_alpha`` (or rsLoRA setting) is absorbed into ``B`` so the function is unchanged.

    Raises:
        ValueError: the run's extractors are not LoRA, or the adapter's modules or rank differ
            (the message names them).
    """
    _check_lora(net)
    config, tensors = read_peft_adapter(folder)
    spec = net.lora_spec
    state: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        state[name] = value
    have = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    want = sorted(net.lora_targets)
    if have != want:
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        raise ValueError(f"{folder}: the adapter's modules differ from the run's LoRA targets "
                         f"(missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, not in the "
                         f"run {extra[:4]}{' ...' if len(extra) > 4 else ''}); it must be trained "
                         "on the same backbone with the same target modules")
    r = int(config.get("r", 0))
    if r != spec.r:
        raise ValueError(f"{folder}: adapter rank r={r}, the run's extractors have "
                         f"model.lora_r={spec.r}")
    alpha = float(config.get("lora_alpha", r))
    scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    factor = scale / spec.scaling
    expected = net.extractor_state_dict(0) if net.num_extractors else None
    out = {}
    for k, v in state.items():
        if expected is not None and k in expected and tuple(expected[k].shape) != tuple(v.shape):
            raise ValueError(f"{folder}: {k} has shape {tuple(v.shape)}, the run's is "
                             f"{tuple(expected[k].shape)}")
        out[k] = v * factor if ".lora_B." in k and factor != 1.0 else v
    return out
