"""``icarl``: avalanche-lib's ``ICaRL`` under the run protocol.

The model (:class:`ICaRLNet`) is ICaRL's three parts on the run's backbone: a fine-tuned feature
extractor (the expandable network with ``extractor="finetune"``, the same trainable copy the
``finetune`` strategy trains), a linear training classifier over every class of the scenario
(ICaRL's sigmoid/distillation loss needs all outputs from the start) and Avalanche's
``NCMClassifier`` (nearest class mean on L2-normalised features), which makes the predictions.
It implements :class:`~lorax_cil.training.run_protocol.RunModel`, so the run evaluates and
checkpoints it like any other network; logits are restricted to the classes seen so far.

Adaptations (docs/baselines.md): the experience gets the ``benchmark`` namespace Avalanche's
ICaRL plugin reads (classes per experience and class order; our streams come from the new
benchmark API, which has none); the exemplar budget is kept at or under ``train.memory_size``
(Avalanche allocates ``ceil(M / classes)`` per class; we pass it a multiple of the class count).
ICaRL keeps its exemplars as image tensors and its distillation teacher in memory, so a run
cannot resume from a checkpoint (a clear error says so).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable, Mapping, Sequence

import torch
from avalanche.models import NCMClassifier
from avalanche.training.plugins.strategy_plugin import SupervisedPlugin
from avalanche.training.supervised import ICaRL
from avalanche.training.supervised.icarl import _ICaRLPlugin
from torch import nn

from lorax_cil.models.base import TaskClassCounts
from lorax_cil.models.expandable import ExpandableNet
from lorax_cil.training.avalanche_baselines import (
    ProtocolOptimizer,
    optimizer_settings,
    template_kwargs,
)
from lorax_cil.training.run_protocol import not_resumable, scenario_num_tasks

__all__ = ["ICaRLNet", "ICaRLStrategy", "build_icarl_network", "build_icarl"]

ARCH_FORMAT = "lorax-cil/icarl-net"


class _Features(nn.Module):
    """The concatenated extractor features of an expandable network (ICaRL's feature extractor).

    A constant ``eps`` is added: a CNN's pooled ReLU features can be exactly zero, and
    Avalanche's herding and class means L2-normalise without a guard (0 / 0 = NaN).
    """

    eps = 1e-6

    def __init__(self, net: ExpandableNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_all(x).features + self.eps


class ICaRLNet(TaskClassCounts, nn.Module):
    """Feature extractor + training classifier + nearest-mean classifier, as a run model.

    Args:
        net: an expandable network with ``extractor="finetune"`` (its own head is not used).
        num_total_classes: classes of the whole scenario (size of the training classifier).
    """

    def __init__(self, *, net: ExpandableNet, num_total_classes: int) -> None:
        super().__init__()
        if net.extractor != "finetune":
            raise ValueError(f"ICaRLNet needs extractor='finetune', got {net.extractor!r}")
        if net.num_tasks == 0:
            net.add_task(1)  # creates the shared trainable copy; the 1-unit head stays unused
        self.net = net
        self.feature_extractor = _Features(net)
        self.classifier = nn.Linear(net.feature_dim, int(num_total_classes))
        self.ncm = NCMClassifier(normalize=True)
        self.task_classes: list[int] = []

    @property
    def backbone(self) -> Any:
        return self.net.backbone

    def add_task(self, num_new_classes: int = 2) -> None:
        total = self.num_classes + int(num_new_classes)
        if total > self.classifier.out_features:
            raise ValueError(f"ICaRL was sized for {self.classifier.out_features} classes; "
                             f"task {self.num_tasks} would bring the total to {total}")
        self.task_classes.append(int(num_new_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Negative distances to the class means of the classes seen so far."""
        if self.ncm.class_means is None:
            raise RuntimeError("ICaRL has no class means yet: train a task first")
        return self.ncm(self.feature_extractor(x))[:, : self.num_classes]

    def parameter_report(self) -> dict[str, Any]:
        inner = self.net.parameter_report()
        tail = inner["per_extractor"][0]
        clf = sum(p.numel() for p in self.classifier.parameters())
        means = 0 if self.ncm.class_means is None else self.ncm.class_means.numel()
        return {
            "extractor": "icarl", "num_tasks": self.num_tasks, "trainable_extractor": tail,
            "per_extractor": [tail],
            "head": {"in": self.net.feature_dim, "out": self.classifier.out_features,
                     "params": clf},
            "div_head": 0, "class_means": means, "backbone": inner["backbone"],
            "trainable": tail + clf, "total_stored": inner["backbone"] + tail + clf + means,
        }

    def learned_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {f"extractor.0.{k}": v for k, v in self.net.extractor_state_dict(0).items()}
        sd["classifier.weight"] = self.classifier.weight.detach().clone()
        sd["classifier.bias"] = self.classifier.bias.detach().clone()
        if self.ncm.class_means is not None:
            sd["class_means"] = self.ncm.class_means.detach().clone()
        return sd

    def load_learned_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        prefix = "extractor.0."
        self.net.load_extractor_state_dict(
            0, {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
        with torch.no_grad():
            for name in ("weight", "bias"):
                target, value = getattr(self.classifier, name), sd[f"classifier.{name}"]
                if value.shape != target.shape:
                    raise ValueError(f"classifier.{name}: shape {tuple(value.shape)} != "
                                     f"{tuple(target.shape)}")
                target.copy_(value)
        if "class_means" in sd:
            means = sd["class_means"].to(self.classifier.weight.device)
            self.ncm.replace_class_means_dict({i: row for i, row in enumerate(means)})

    def architecture(self) -> dict[str, Any]:
        return {"format": ARCH_FORMAT, "version": 1, "backbone": self.backbone.spec.name,
                "feature_extractor": self.net.architecture(),
                "num_total_classes": self.classifier.out_features,
                "task_classes": list(self.task_classes)}


class _Budget(SupervisedPlugin):
    """Keeps Avalanche's ICaRL memory at or under the budget (runs before the ICaRL plugin)."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = int(budget)
        self.icarl: _ICaRLPlugin | None = None

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        n = len(self.icarl.observed_classes)
        if self.budget < n:
            raise ValueError(f"strategy 'icarl' needs at least one exemplar per class: "
                             f"train.memory_size={self.budget} < {n} classes")
        self.icarl.memory_size = (self.budget // n) * n  # ceil(size / n) == budget // n


class _ICaRLMemoryView:
    """Exemplar counts of Avalanche's ICaRL plugin (tensor copies: not checkpointable)."""

    def __init__(self, plugin: _ICaRLPlugin) -> None:
        self.plugin = plugin

    def per_class(self) -> dict[int, int]:
        return {int(y[0]): len(x) for x, y in zip(self.plugin.x_memory, self.plugin.y_memory)
                if len(y)}

    def state(self, paths_of: Callable[[Any], Sequence[str]]) -> dict[str, int]:
        return {str(c): n for c, n in sorted(self.per_class().items())}

    def restore(self, state: Any, datasets_by_class: dict[int, Any],
                paths_of: Callable[[Any], Sequence[str]]) -> None:
        raise not_resumable("icarl", "Avalanche's ICaRL keeps its exemplars as image tensors "
                            "and its distillation teacher in memory, and the checkpoint holds "
                            "neither")


class ICaRLStrategy(ProtocolOptimizer, ICaRL):
    """Avalanche ``ICaRL`` training an :class:`ICaRLNet` with the run's optimiser protocol."""

    def __init__(self, *, net: ICaRLNet, memory_size: int, protocol: dict[str, Any],
                 plugins: list, **kwargs: Any) -> None:
        budget = _Budget(memory_size)
        placeholder = torch.optim.AdamW([nn.Parameter(torch.zeros(1))])
        super().__init__(feature_extractor=net.feature_extractor, classifier=net.classifier,
                         optimizer=placeholder, memory_size=memory_size, buffer_transform=None,
                         fixed_memory=True, plugins=[budget, *plugins], **kwargs)
        self.model.eval_classifier = net.ncm
        budget.icarl = next(p for p in self.plugins if isinstance(p, _ICaRLPlugin))
        self.run_net = net
        self.memory = _ICaRLMemoryView(budget.icarl)
        self.setup_protocol(**protocol)

    def train(self, experiences: Any, eval_streams: Any = None, **kwargs: Any) -> Any:
        exp = experiences
        counts = [len(e.classes_in_this_experience) for e in exp.origin_stream]
        if sum(counts) > self.run_net.classifier.out_features:
            raise ValueError(f"the stream has {sum(counts)} classes but ICaRL was sized for "
                             f"{self.run_net.classifier.out_features} (data.scenario/tasks)")
        exp.benchmark = SimpleNamespace(n_classes_per_exp=counts,
                                        classes_order=list(range(sum(counts))))
        self.run_net.add_task(counts[exp.current_experience])
        return super().train(exp, eval_streams=[], **kwargs)


def build_icarl_network(cfg: Any, backbone: Any) -> ICaRLNet:
    """The ICaRL run model on the run's backbone (fine-tuned copy of the adapted blocks)."""
    net = ExpandableNet(backbone=backbone, extractor="finetune",
                        adapt_blocks=cfg.model.adapt_blocks, divergence_head=False)
    return ICaRLNet(net=net, num_total_classes=2 * scenario_num_tasks(cfg))


def build_icarl(cfg: Any, net: Any, device: Any, evaluator: Any, plugins: list) -> Any:
    n_classes = 2 * scenario_num_tasks(cfg)
    if cfg.train.memory_size < n_classes:
        raise ValueError(f"strategy 'icarl' needs at least one exemplar per class: "
                         f"train.memory_size={cfg.train.memory_size} < {n_classes} classes")
    kw = template_kwargs(cfg, device, evaluator, plugins)
    return ICaRLStrategy(net=net, memory_size=cfg.train.memory_size,
                         protocol=optimizer_settings(cfg), **kw)
