"""``simplecil``: class prototypes on the frozen backbone's features, no training (SimpleCIL).

SimpleCIL (Zhou et al., "Revisiting class-incremental learning with pre-trained models", 2023)
keeps the pretrained backbone frozen and replaces the classifier with one prototype per class:
the mean feature of that class's training images. Prediction is the cosine similarity to every
prototype. Nothing is trained, no optimiser exists, and old prototypes never change, so there is
no forgetting by construction; it needs no exemplar memory.

Features are the backbone's pooled output (the same frozen trunk every strategy of a comparison
uses), computed on the *evaluation* transforms of the training images (no augmentation).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

from lorax_cil.models.base import TaskClassCounts
from lorax_cil.training.run_protocol import NoMemory

__all__ = ["PrototypeNet", "SimpleCIL", "build_simplecil_network", "build_simplecil"]

logger = logging.getLogger(__name__)

ARCH_FORMAT = "lorax-cil/prototype-net"


class PrototypeNet(TaskClassCounts, nn.Module):
    """A frozen backbone and a cosine classifier whose weights are class prototypes.

    Args:
        backbone: the frozen :class:`~lorax_cil.models.base.BlockBackbone`.
        scale: logits are ``scale x cosine`` (predictions do not depend on it).
    """

    def __init__(self, *, backbone: Any, scale: float = 1.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"baselines.simplecil_scale must be positive, got {scale}")
        self.backbone = backbone
        self.scale = float(scale)
        ref = next(backbone.parameters())
        self.register_buffer("prototypes", torch.zeros(0, backbone.feature_dim, dtype=ref.dtype))
        self.task_classes: list[int] = []
        self.backbone.eval()

    def train(self, mode: bool = True) -> "PrototypeNet":
        super().train(mode)
        self.backbone.eval()
        return self

    def add_task(self, num_new_classes: int = 2) -> None:
        n = int(num_new_classes)
        if n < 1:
            raise ValueError(f"num_new_classes must be a positive int, got {num_new_classes!r}")
        extra = self.prototypes.new_zeros(n, self.prototypes.shape[1])
        self.prototypes = torch.cat([self.prototypes, extra])
        self.task_classes.append(n)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = nn.functional.normalize(self.features(x).float(), dim=1)
        p = nn.functional.normalize(self.prototypes.float(), dim=1)
        return self.scale * f @ p.T

    def parameter_report(self) -> dict[str, Any]:
        protos = self.prototypes.numel()
        backbone = sum(p.numel() for p in self.backbone.parameters())
        return {"extractor": "frozen (prototypes)", "num_tasks": self.num_tasks,
                "trainable_extractor": 0, "per_extractor": [],
                "head": {"in": self.prototypes.shape[1], "out": self.num_classes,
                         "params": protos},
                "div_head": 0, "backbone": backbone, "trainable": 0,
                "total_stored": backbone + protos}

    def learned_state_dict(self) -> dict[str, torch.Tensor]:
        return {"prototypes": self.prototypes.detach().clone()}

    def load_learned_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        if set(sd) != {"prototypes"} or sd["prototypes"].shape != self.prototypes.shape:
            shape = tuple(sd["prototypes"].shape) if "prototypes" in sd else None
            raise ValueError(f"prototype state mismatch: keys {sorted(sd)}, shape {shape} != "
                             f"{tuple(self.prototypes.shape)}")
        self.prototypes.copy_(sd["prototypes"])

    def architecture(self) -> dict[str, Any]:
        return {"format": ARCH_FORMAT, "version": 1, "backbone": self.backbone.spec.name,
                "feature_dim": int(self.prototypes.shape[1]), "scale": self.scale,
                "task_classes": list(self.task_classes)}


class SimpleCIL:
    """The SimpleCIL "strategy": per experience, add the new classes' mean features.

    Args:
        net: the :class:`PrototypeNet`.
        device: torch device.
        batch_size: feature-pass batch size.
        num_workers: data-loader workers.
    """

    optimizer = None  # nothing is ever optimised

    def __init__(self, *, net: PrototypeNet, device: Any, batch_size: int = 64,
                 num_workers: int = 0) -> None:
        self.model = net
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.memory = NoMemory(strategy="simplecil")

    @torch.no_grad()
    def train(self, experiences: Any, num_workers: int | None = None, **kwargs: Any) -> dict:
        exp = experiences
        classes = sorted(int(c) for c in exp.classes_in_this_experience)
        first = self.model.num_classes
        if classes != list(range(first, first + len(classes))):
            raise ValueError(f"experience {exp.current_experience} brings classes {classes}, but "
                             f"the prototypes expect the next contiguous ids from {first}")
        self.model.add_task(len(classes))
        means = class_means(self.model, exp.dataset, device=self.device,
                            batch_size=self.batch_size,
                            num_workers=self.num_workers if num_workers is None else num_workers)
        for c in classes:
            self.model.prototypes[c] = means[c].to(self.model.prototypes)
        logger.info("simplecil: prototypes of classes %s", classes)
        return {}


@torch.no_grad()
def class_means(net: PrototypeNet, dataset: Any, *, device: Any, batch_size: int = 64,
                num_workers: int = 0) -> dict[int, torch.Tensor]:
    """Mean backbone feature per class over ``dataset`` (evaluation transforms)."""
    net.eval()
    data = dataset.eval()
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=getattr(data, "collate_fn", None))
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    for batch in loader:
        feats = net.features(batch[0].to(device)).double().cpu()
        labels = torch.as_tensor(batch[1]).long()
        for c in labels.unique().tolist():
            mask = labels == c
            sums[c] = sums[c] + feats[mask].sum(0) if c in sums else feats[mask].sum(0)
            counts[c] = counts.get(c, 0) + int(mask.sum())
    return {c: (sums[c] / counts[c]).float() for c in sums}


def build_simplecil_network(cfg: Any, backbone: Any) -> PrototypeNet:
    return PrototypeNet(backbone=backbone, scale=cfg.baselines.simplecil_scale)


def build_simplecil(cfg: Any, net: Any, device: Any, evaluator: Any, plugins: list) -> SimpleCIL:
    if any(not getattr(p, "optional", False) for p in plugins):
        raise ValueError("strategy 'simplecil' trains nothing and takes no Avalanche plugins")
    return SimpleCIL(net=net, device=device, batch_size=cfg.train.eval_batch_size,
                     num_workers=cfg.train.num_workers)
