"""The built-in strategies: LoRAX, LoRAX on the last blocks, LoRAX with class-attention task
tokens or side networks, LoRAX distilled into side networks, LoRAX with MoLE extractors, and the
two fine-tuning baselines."""

from __future__ import annotations

from typing import Any

from lorax_cil.training.config import RunConfig
from lorax_cil.training.registry import ByBackbone, get_strategy, list_strategies, register_strategy

__all__ = ["build_lorax_family", "lorax_family_strategies", "lr_scale", "LORAX_DEFAULTS"]

#: Defaults of lorax, lorax-deep, lorax-side and lorax-mole where the configuration leaves them
#: unset (``None``), chosen by the few-shot ablation (benchmarks/fewshot.py, docs/fewshot.md) per
#: backbone family. On a CNN (EfficientNet-Lite0) the nearest-class-mean read-out with every
#: class on the feature blocks of its own time (``ncm-frozen``) has the higher AA and the least
#: forgetting. On a ViT (DINOv2 ViT-S/14) the linear head reads LoRAX's features with the
#: higher AA on every setting measured, and 100 steps of class-balanced head fine-tuning after
#: each task (EEIL's balanced stage) cut its forgetting; a ViT run told to read by class means
#: trains as before (no balanced stage). ``--set train.readout=head --set
#: train.head_balanced_steps=0`` is the official LoRAX head on any backbone;
#: ``--set train.readout=ncm-relative`` adds block baselines (an option). lorax-ca keeps the
#: linear head by default.
LORAX_DEFAULTS = {"readout": ByBackbone("ncm-frozen", vit="head"),
                  "head_balanced_steps": ByBackbone(0, vit=100, only_with={"readout": "head"})}


def _lorax_family(cfg: RunConfig, net: Any, device: Any, evaluator: Any, plugins: list) -> Any:
    from lorax_cil.training.head_balance import HeadOptions
    from lorax_cil.training.strategy import LoRAX

    t = cfg.train
    scale = lr_scale(t)
    return LoRAX(
        model=net,
        lr_first=t.lr_first * scale,
        lr=t.lr * scale,
        weight_decay=t.weight_decay,
        warmup_epochs=t.warmup_epochs,
        warmup_lr=t.warmup_lr * scale,
        min_lr=t.min_lr * scale,
        head_div=t.head_div if cfg.model.divergence_head else 0.0,
        memory_size=t.memory_size,
        train_mb_size=t.batch_size,
        train_epochs=t.epochs,
        eval_mb_size=t.eval_batch_size,
        device=device,
        amp=t.amp if t.amp == "auto" else t.amp in ("true", "1", True),
        num_workers=t.num_workers,
        min_steps_per_task=t.min_steps_per_task,
        warmup_steps=t.warmup_steps,
        head=HeadOptions.from_config(t),
        plugins=plugins,
        evaluator=evaluator,
    )


#: The builder of the LoRAX family and the fine-tuning baselines (one :class:`LoRAX` strategy
#: configured by the preset): register it under a new name with your own preset, e.g.
#: ``register_strategy("my-lorax", description=..., model={"extractor": "lora"})(build_lorax_family)``.
build_lorax_family = _lorax_family


def lorax_family_strategies() -> list[str]:
    """The registered strategies built as one :class:`LoRAX` strategy (the built-in LoRAX
    variants, the fine-tuning baselines, and any registered with :data:`build_lorax_family`):
    the ones that train under torchrun and can cache the frozen trunk."""
    return [n for n in list_strategies() if get_strategy(n).builder is _lorax_family]


def lr_scale(t: Any) -> float:
    """The factor ``train.lr_scaling`` applies to every learning rate.

    ``linear512`` is the official code's rule, rate x effective batch / 512. The effective
    batch is ``train.batch_size``: it is the *global* batch of one optimisation step, split over
    the processes under torchrun, so the factor (and the training) does not depend on the
    number of processes. (The official code multiplies its per-GPU batch by the world size;
    its 8 x 32 setting is ``train.batch_size=256`` here.)
    """
    if t.lr_scaling == "linear512":
        return t.batch_size / 512.0
    if t.lr_scaling != "none":
        raise ValueError(f"train.lr_scaling must be 'none' or 'linear512', got {t.lr_scaling!r}")
    return 1.0


register_strategy(
    "lorax",
    description="LoRAX: a new LoRA extractor per task on every block, memory, divergence head",
    model={"extractor": "lora"},
    defaults=LORAX_DEFAULTS,
)(_lorax_family)

register_strategy(
    "lorax-deep",
    description="LoRAX with LoRA only in the last k blocks; the frozen trunk runs once",
    model={"extractor": "lora"},
    defaults={"adapt_blocks": 3, **LORAX_DEFAULTS},
)(_lorax_family)

def _token_extractor_network(cfg: RunConfig, backbone: Any) -> Any:
    """The expandable network of the kinds that read one shared frozen pass (``lorax-ca``:
    class-attention task tokens, ``lorax-side``: side networks). ``model.lora_r``,
    ``lora_alpha`` and ``lora_dropout`` set the task tokens' LoRA (``lorax-ca``) or the side
    network's width, output scale ``alpha / width`` and dropout (``lorax-side``). Neither adapts
    backbone layers, so ``model.lora_targets`` must stay ``auto``."""
    from lorax_cil.models.extractors.class_attention import ClassAttentionSpec
    from lorax_cil.models.extractors.side import SideSpec
    from lorax_cil.models.heads import build_expandable_net

    m = cfg.model
    what = {"class-attention": "its task tokens adapt their query, output projection and MLP",
            "side": "its side networks adapt no backbone layer"}
    if m.extractor not in what:
        raise ValueError(f"strategy {cfg.train.strategy!r} needs model.extractor "
                         f"'class-attention' or 'side', got {m.extractor!r}")
    if m.lora_targets != "auto":
        raise ValueError(f"model.lora_targets={m.lora_targets!r} does not apply to strategy "
                         f"{cfg.train.strategy!r}: {what[m.extractor]}; leave model.lora_targets "
                         "at 'auto'")
    if m.extractor == "side":
        spec: Any = SideSpec(width=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout)
    else:
        spec = ClassAttentionSpec(r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout)
    kwargs = dict(backbone=backbone, extractor=m.extractor, adapt_blocks=m.adapt_blocks,
                  spec=spec, divergence_head=m.divergence_head)
    return build_expandable_net(cfg.train.readout, **kwargs)


register_strategy(
    "lorax-ca",
    description="LoRAX with per-task class-attention tokens on the last k blocks: the frozen "
                "backbone runs once for every task",
    model={"extractor": "class-attention"},
    defaults={"adapt_blocks": 4},
    network=_token_extractor_network,
)(_lorax_family)

register_strategy(
    "lorax-side",
    description="LoRAX with a narrow per-task side network on the frozen token stream of every "
                "block: the frozen backbone runs once for every task (measured below lorax-ca, "
                "docs/class-attention.md)",
    model={"extractor": "side"},
    defaults=LORAX_DEFAULTS,
    network=_token_extractor_network,
)(_lorax_family)

register_strategy(
    "lorax-distill",
    description="LoRAX whose per-task LoRA extractor is distilled into a side network after its "
                "task: the frozen backbone runs once for every task at inference",
    model={"extractor": "distilled-side"},
    defaults={"side_width": 64, "distill_epochs": 30, "distill_lr": 3e-3, **LORAX_DEFAULTS},
)(_lorax_family)

register_strategy(
    "lorax-mole",
    description="LoRAX with a mixture of LoRA experts (shared + routed) per task on the last k blocks",
    model={"extractor": "mole"},
    defaults={"adapt_blocks": 3, **LORAX_DEFAULTS},
)(_lorax_family)

register_strategy(
    "finetune",
    description="Fine-tuning of the whole network, no memory (lower bound)",
    model={"extractor": "finetune", "divergence_head": False},
    train={"memory_size": 0, "head_div": 0.0},
)(_lorax_family)

register_strategy(
    "finetune-replay",
    description="Fine-tuning of the whole network with the same exemplar memory as LoRAX",
    model={"extractor": "finetune", "divergence_head": False},
    train={"head_div": 0.0},
)(_lorax_family)
