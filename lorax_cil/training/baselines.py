"""The baseline zoo: registry entries next to LoRAX (see docs/baselines.md).

=================  ===========================================================================
name               what it is (implementation)
=================  ===========================================================================
``joint``          all tasks at once, the upper bound (Avalanche ``JointTraining``)
``replay``         fine-tuning + class-balanced random replay (Avalanche ``Replay``)
``icarl``          iCaRL: herding memory, distillation, nearest-mean classifier (Avalanche)
``lwf``            Learning without Forgetting, no memory (Avalanche ``LwF``)
``ewc``            Elastic Weight Consolidation, no memory (Avalanche ``EWC``)
``l2p``            Learning to Prompt on the frozen ViT, no memory (Avalanche
                   ``LearningToPrompt``)
``der-expandable`` Dynamically Expandable Representation without pruning: a full trainable
                   copy of the backbone per task, concatenated features, auxiliary head
                   (expandable network, ``extractor="full"``); *not* Avalanche's ``DER``
``memo``           MEMO: full trainable copies of the last k blocks per task on a shared frozen
                   trunk (expandable network, ``extractor="full"`` + ``adapt_blocks``)
``simplecil``      class prototypes on frozen features, no training
=================  ===========================================================================

``finetune``, ``finetune-replay``, ``lorax`` and ``lorax-deep`` live in
:mod:`~lorax_cil.training.builtin_strategies`. This module only registers: every builder imports
its heavy implementation module (Avalanche, timm) when it runs, so listing strategies stays cheap.
Avalanche's Dark Experience Replay is not offered (see docs/baselines.md).
"""

from __future__ import annotations

from typing import Any

from lorax_cil.training.builtin_strategies import _lorax_family
from lorax_cil.training.registry import register_strategy

__all__ = ["FINE_TUNED", "EXEMPLAR_FREE", "check_compatible"]

#: Model settings of the baselines that fine-tune the backbone with a growing head.
FINE_TUNED = {"extractor": "finetune", "divergence_head": False}
#: Train settings of exemplar-free baselines.
EXEMPLAR_FREE = {"memory_size": 0, "head_div": 0.0}


def _lazy(module: str, name: str):
    def call(*args: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(f"lorax_cil.training.{module}"), name)(*args)

    call.__name__ = name
    return call


def check_compatible(cfg: Any, backbone: Any) -> None:
    """Raise ``ValueError`` when ``cfg``'s strategy cannot run with ``backbone`` and settings.

    ``cfg`` has its strategy preset applied. Checked before anything trains (``compare``).
    """
    from lorax_cil.training.run_protocol import scenario_num_tasks

    strategy, memory = cfg.train.strategy, cfg.train.memory_size
    if strategy == "l2p":
        _lazy("l2p", "check_l2p_backbone")(backbone)
    if cfg.model.extractor == "mole":
        from lorax_cil.models.mole import mole_target_regex

        try:
            mole_target_regex(backbone.model, backbone.spec.block_names, "mlp")
        except ValueError as exc:
            raise ValueError(f"strategy {strategy!r} cannot run on backbone "
                             f"{backbone.spec.name!r}: {exc}") from None
    if strategy == "replay" and memory <= 0:
        raise ValueError("strategy 'replay' needs an exemplar memory: train.memory_size > 0")
    if strategy == "icarl" and memory < 2 * scenario_num_tasks(cfg):
        raise ValueError(f"strategy 'icarl' needs at least one exemplar per class: "
                         f"train.memory_size={memory} < {2 * scenario_num_tasks(cfg)} classes")


register_strategy(
    "der-expandable",
    description="DER w/o pruning: a full trainable backbone copy per task, concatenated "
                "features, auxiliary head, memory",
    model={"extractor": "full", "adapt_blocks": None, "divergence_head": True},
)(_lorax_family)

register_strategy(
    "memo",
    description="MEMO: trainable copies of the last k blocks per task on a shared frozen trunk, "
                "auxiliary head, memory",
    model={"extractor": "full", "divergence_head": True},
    defaults={"adapt_blocks": 3},
)(_lorax_family)

register_strategy(
    "joint",
    description="Joint training on every task's data at once (upper bound; final row only)",
    model=FINE_TUNED,
    train=EXEMPLAR_FREE,
)(_lazy("avalanche_baselines", "build_joint"))

register_strategy(
    "replay",
    description="Fine-tuning with Avalanche Replay (class-balanced random memory)",
    model=FINE_TUNED,
    train={"head_div": 0.0},
)(_lazy("avalanche_baselines", "build_replay"))

register_strategy(
    "ewc",
    description="Fine-tuning with Avalanche EWC (no memory)",
    model=FINE_TUNED,
    train=EXEMPLAR_FREE,
    resumable=False,
)(_lazy("avalanche_baselines", "build_ewc"))

register_strategy(
    "lwf",
    description="Fine-tuning with Avalanche LwF distillation (no memory)",
    model=FINE_TUNED,
    train=EXEMPLAR_FREE,
)(_lazy("avalanche_baselines", "build_lwf"))

register_strategy(
    "icarl",
    description="Avalanche iCaRL: herding memory, distillation, nearest-mean classifier",
    model=FINE_TUNED,
    train={"head_div": 0.0},
    network=_lazy("icarl", "build_icarl_network"),
    resumable=False,
)(_lazy("icarl", "build_icarl"))

register_strategy(
    "l2p",
    description="Avalanche Learning to Prompt on the frozen ViT (no memory; ViT backbones only)",
    model={"extractor": "frozen", "divergence_head": False},
    train=EXEMPLAR_FREE,
    network=_lazy("l2p", "build_l2p_network"),
)(_lazy("l2p", "build_l2p"))

register_strategy(
    "simplecil",
    description="SimpleCIL: class-mean prototypes on frozen features, cosine classifier, "
                "no training",
    model={"extractor": "frozen", "divergence_head": False},
    train=EXEMPLAR_FREE,
    network=_lazy("simplecil", "build_simplecil_network"),
)(_lazy("simplecil", "build_simplecil"))
