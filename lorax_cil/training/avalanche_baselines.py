"""Avalanche-lib baselines under the run protocol: ``replay``, ``ewc``, ``lwf`` and ``joint``.

Each strategy is avalanche-lib's own class (``Replay``, ``EWC``, ``LwF``, ``JointTraining``)
with the :class:`ProtocolOptimizer` mixin in front of it, so every gradient-trained baseline uses
the run's optimiser protocol: a fresh AdamW per task over the trainable parameters, learning rate
``train.lr_first`` on task 0 and ``train.lr`` later, linear warm-up then cosine decay per epoch,
bfloat16 autocast on CUDA when ``train.amp`` allows it. The model is the expandable network with
a fine-tuned extractor (``extractor="finetune"``, one trainable copy of the adapted blocks, the
same network as the ``finetune`` strategy) and a growing head, wrapped as an Avalanche
``DynamicModule`` so it grows in the adaptation step.

Adaptations (see docs/baselines.md): ``replay`` swaps Avalanche's default experience-balanced
buffer for its ``ClassBalancedBuffer`` with the run's budget; ``lwf``'s teacher is put in eval
mode; ``joint`` trains once, on all tasks, when the run reaches the last task.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Sequence

import torch
from avalanche.training.plugins import ReplayPlugin
from avalanche.training.storage_policy import ClassBalancedBuffer, ReservoirSamplingBuffer
from avalanche.training.supervised import EWC, JointTraining, LwF, Replay
from torch import nn

from lorax_cil.training.run_protocol import NoMemory
from lorax_cil.training.strategy import ExpandableModel, ProtocolOptimizer

__all__ = [
    "ProtocolOptimizer",
    "ClassBalancedMemoryView",
    "ReplayStrategy",
    "EWCStrategy",
    "LwFStrategy",
    "JointStrategy",
    "optimizer_settings",
    "template_kwargs",
    "build_replay",
    "build_ewc",
    "build_lwf",
    "build_joint",
]

logger = logging.getLogger(__name__)


# --- memory view ------------------------------------------------------------------------------
class ClassBalancedMemoryView:
    """:class:`~lorax_cil.training.run_protocol.RunMemory` over Avalanche's ``ClassBalancedBuffer``.

    The checkpoint state holds, per class, the exemplar paths and their reservoir weights, so a
    resumed run keeps selecting exactly as an uninterrupted one.
    """

    def __init__(self, policy: ClassBalancedBuffer) -> None:
        self.policy = policy

    def per_class(self) -> dict[int, int]:
        return {int(c): len(g.buffer) for c, g in sorted(self.policy.buffer_groups.items())}

    def dataset(self) -> Any | None:
        return self.policy.buffer if len(self.policy.buffer) else None

    def state(self, paths_of: Callable[[Any], Sequence[str]]) -> dict[str, dict[str, list]]:
        return {str(c): {"paths": list(paths_of(g.buffer)),
                         "weights": [float(w) for w in g._buffer_weights]}
                for c, g in sorted(self.policy.buffer_groups.items())}

    def restore(self, state: dict[str, dict[str, list]], datasets_by_class: dict[int, Any],
                paths_of: Callable[[Any], Sequence[str]]) -> None:
        self.policy.buffer_groups = {}
        self.policy.seen_classes = set()
        for key, entry in state.items():
            c = int(key)
            source = datasets_by_class[c]
            index = {p: i for i, p in enumerate(paths_of(source))}
            missing = [p for p in entry["paths"] if p not in index]
            if missing:
                raise ValueError(f"replay memory checkpoint names {len(missing)} exemplar(s) of "
                                 f"class {c} that are not in the data any more, e.g. {missing[0]}")
            buf = ReservoirSamplingBuffer(len(entry["paths"]))
            buf.buffer = source.subset([index[p] for p in entry["paths"]])
            buf._buffer_weights = torch.tensor(entry["weights"], dtype=torch.float32)
            self.policy.buffer_groups[c] = buf
            self.policy.seen_classes.add(c)


# --- strategies -------------------------------------------------------------------------------
class ReplayStrategy(ProtocolOptimizer, Replay):
    """Avalanche ``Replay`` with a class-balanced buffer (random selection) of the run's budget.

    Avalanche's ``ReplayDataLoader`` pairs every training mini-batch with a memory mini-batch of
    the same size.
    """

    def __init__(self, *, model: nn.Module, memory_size: int, protocol: dict[str, Any],
                 **kwargs: Any) -> None:
        if memory_size <= 0:
            raise ValueError("strategy 'replay' needs an exemplar memory: train.memory_size > 0")
        placeholder = torch.optim.AdamW([nn.Parameter(torch.zeros(1))])
        super().__init__(model=model, optimizer=placeholder, criterion=nn.CrossEntropyLoss(),
                         mem_size=memory_size, **kwargs)
        plugin = next(p for p in self.plugins if isinstance(p, ReplayPlugin))
        plugin.storage_policy = ClassBalancedBuffer(max_size=memory_size, adaptive_size=True)
        self.memory = ClassBalancedMemoryView(plugin.storage_policy)
        self.setup_protocol(**protocol)


class EWCStrategy(ProtocolOptimizer, EWC):
    """Avalanche ``EWC`` (Fisher importances from squared gradients after each task)."""

    def __init__(self, *, model: nn.Module, ewc_lambda: float, mode: str,
                 decay_factor: float | None, protocol: dict[str, Any], **kwargs: Any) -> None:
        if mode not in ("separate", "online"):
            raise ValueError(f"baselines.ewc_mode must be 'separate' or 'online', got {mode!r}")
        if mode == "online" and decay_factor is None:
            raise ValueError("baselines.ewc_mode 'online' needs baselines.ewc_decay")
        placeholder = torch.optim.AdamW([nn.Parameter(torch.zeros(1))])
        super().__init__(model=model, optimizer=placeholder, criterion=nn.CrossEntropyLoss(),
                         ewc_lambda=ewc_lambda, mode=mode,
                         decay_factor=decay_factor if mode == "online" else None, **kwargs)
        self.memory = NoMemory(strategy="ewc", resume_error=(
            "Avalanche's EWC keeps its parameter importances and anchor weights in memory, and "
            "the checkpoint holds neither"))
        self.setup_protocol(**protocol)


class LwFStrategy(ProtocolOptimizer, LwF):
    """Avalanche ``LwF``: distillation from the model after the previous task, on old classes.

    The teacher runs in eval mode (Avalanche copies the model while it is in training mode).
    Resuming rebuilds the teacher from the checkpointed model.
    """

    def __init__(self, *, model: nn.Module, alpha: float, temperature: float,
                 protocol: dict[str, Any], **kwargs: Any) -> None:
        placeholder = torch.optim.AdamW([nn.Parameter(torch.zeros(1))])
        super().__init__(model=model, optimizer=placeholder, criterion=nn.CrossEntropyLoss(),
                         alpha=alpha, temperature=temperature, **kwargs)
        from avalanche.training.plugins import LwFPlugin

        self.lwf = next(p for p in self.plugins if isinstance(p, LwFPlugin)).lwf
        self.memory = NoMemory(strategy="lwf", on_restore=self._restore_teacher)
        self.setup_protocol(**protocol)

    def _after_training_exp(self, **kwargs: Any) -> None:
        super()._after_training_exp(**kwargs)
        if self.lwf.prev_model is not None:
            self.lwf.prev_model.eval()

    def _restore_teacher(self, datasets_by_class: dict[int, Any]) -> None:
        self.lwf.prev_model = copy.deepcopy(self.model).to(self.device).eval()
        self.lwf.prev_classes_by_task[0] = set(int(c) for c in datasets_by_class)


class JointStrategy(ProtocolOptimizer, JointTraining):
    """Avalanche ``JointTraining``: one training on every task's data, at the last task.

    Earlier steps train nothing and are not evaluated (:meth:`evaluate_after_step`), so the
    accuracy matrices hold one final row.
    """

    def __init__(self, *, model: nn.Module, protocol: dict[str, Any], **kwargs: Any) -> None:
        placeholder = torch.optim.AdamW([nn.Parameter(torch.zeros(1))])
        super().__init__(model=model, optimizer=placeholder, criterion=nn.CrossEntropyLoss(),
                         **kwargs)
        self.memory = NoMemory(strategy="joint")
        self.setup_protocol(**protocol)

    def train(self, experiences: Any, eval_streams: Any = None, **kwargs: Any) -> Any:
        if isinstance(experiences, (list, tuple)):
            return super().train(experiences, eval_streams=[], **kwargs)
        stream, index = experiences.origin_stream, int(experiences.current_experience)
        if index < len(stream) - 1:
            logger.info("joint: task %d of %d collected; training waits for the last task",
                        index + 1, len(stream))
            return {}
        return super().train([stream[i] for i in range(index + 1)], eval_streams=[], **kwargs)

    @staticmethod
    def evaluate_after_step(step: int, num_tasks: int) -> bool:
        return step == num_tasks - 1


# --- builders ---------------------------------------------------------------------------------
def optimizer_settings(cfg: Any) -> dict[str, Any]:
    """The run's optimiser protocol as :meth:`ProtocolOptimizer.setup_protocol` arguments."""
    from lorax_cil.training.builtin_strategies import lr_scale

    t = cfg.train
    scale = lr_scale(t)
    amp = t.amp if t.amp == "auto" else t.amp in ("true", "1", True)
    return dict(lr_first=t.lr_first * scale, lr=t.lr * scale, weight_decay=t.weight_decay,
                warmup_epochs=t.warmup_epochs, warmup_lr=t.warmup_lr * scale,
                min_lr=t.min_lr * scale, num_workers=t.num_workers, amp=amp,
                min_steps_per_task=t.min_steps_per_task, warmup_steps=t.warmup_steps)


def template_kwargs(cfg: Any, device: Any, evaluator: Any, plugins: list) -> dict[str, Any]:
    """Batch sizes, epochs, device, plugins and evaluator shared by every template."""
    t = cfg.train
    return dict(train_mb_size=t.batch_size, train_epochs=t.epochs,
                eval_mb_size=t.eval_batch_size, device=device, plugins=list(plugins),
                evaluator=evaluator)


def _expandable(net: Any) -> ExpandableModel:
    return net if isinstance(net, ExpandableModel) else ExpandableModel(net)


def build_replay(cfg: Any, net: Any, device: Any, evaluator: Any, plugins: list) -> Any:
    return ReplayStrategy(model=_expandable(net), memory_size=cfg.train.memory_size,
                          protocol=optimizer_settings(cfg),
                          **template_kwargs(cfg, device, evaluator, plugins))


def build_ewc(cfg: Any, net: Any, device: Any, evaluator: Any, plugins: list) -> Any:
    b = cfg.baselines
    return EWCStrategy(model=_expandable(net), ewc_lambda=b.ewc_lambda, mode=b.ewc_mode,
                       decay_factor=b.ewc_decay, protocol=optimizer_settings(cfg),
                       **template_kwargs(cfg, device, evaluator, plugins))


def build_lwf(cfg: Any, net: Any, device: Any, evaluator: Any, plugins: list) -> Any:
    b = cfg.baselines
    return LwFStrategy(model=_expandable(net), alpha=b.lwf_alpha, temperature=b.lwf_temperature,
                       protocol=optimizer_settings(cfg),
                       **template_kwargs(cfg, device, evaluator, plugins))


def build_joint(cfg: Any, net: Any, device: Any, evaluator: Any, plugins: list) -> Any:
    kwargs = template_kwargs(cfg, device, evaluator, plugins)
    epochs = cfg.baselines.joint_epochs
    if epochs is not None:
        if int(epochs) != epochs or epochs < 1:
            raise ValueError(f"baselines.joint_epochs must be a positive integer, got {epochs!r}")
        kwargs["train_epochs"] = int(epochs)
    return JointStrategy(model=_expandable(net), protocol=optimizer_settings(cfg), **kwargs)
