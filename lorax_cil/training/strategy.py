"""The LoRAX strategy: an Avalanche ``SupervisedTemplate`` over the expandable network.

Per experience (one generator task):

1. the model grows in its adaptation step (:class:`ExpandableModel`), *before* the optimiser is
   built: old extractors are frozen, a new one (LoRA adapter, full copy, ...) is added, the head
   expands and a new divergence head is created;
2. the training set is the experience's data plus the exemplar memory;
3. a fresh AdamW over the trainable parameters, with the task-0 or later-task learning rate and a
   per-epoch cosine schedule with linear warm-up;
4. loss = CE(head) + ``head_div`` x CE(divergence head) (DER-style auxiliary loss), plus the
   router balance loss when the extractors are MoLE experts (``lorax-mole``);
5. after training, the memory is re-balanced with herding on the current model's features.

The same class runs the fine-tuning baselines: they are configurations of the network
(``extractor="finetune"``) and of the memory (0 or the LoRAX budget).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch
from avalanche.models import DynamicModule
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from lorax_cil import distributed as dist
from lorax_cil.models.expandable import ExpandableNet
from lorax_cil.models.heads import NCMExpandableNet
from lorax_cil.training.head_balance import HeadBalancer, HeadOptions
from lorax_cil.training.memory import HerdingMemory
from lorax_cil.training.task_length import TaskLength, plan_task_length
from lorax_cil.utils import resolve_amp

__all__ = ["ExpandableModel", "LoRAX", "ProtocolOptimizer", "cosine_warmup_lr",
           "train_transform_randomness", "enable_trunk_cache"]

logger = logging.getLogger(__name__)


class ExpandableModel(DynamicModule):
    """Avalanche dynamic-module wrapper: grows the wrapped :class:`ExpandableNet` per experience.

    Growth happens only in training mode and only when the experience brings classes the
    network does not have yet; they must be the next contiguous class ids.
    """

    def __init__(self, net: ExpandableNet) -> None:
        super().__init__()
        self.net = net

    def adaptation(self, experience: Any) -> None:
        if not self.training:
            return
        classes = sorted(int(c) for c in experience.classes_in_this_experience)
        known = self.net.num_classes
        new = [c for c in classes if c >= known]
        if not new:
            return
        if new != list(range(known, known + len(new))):
            raise ValueError(
                f"experience {experience.current_experience} brings classes {new}, but the "
                f"network expects the next contiguous ids starting at {known}"
            )
        self.net.add_task(len(new))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def cosine_warmup_lr(
    epoch: int, *, epochs: int, base_lr: float, warmup_epochs: int, warmup_lr: float,
    min_lr: float,
) -> float:
    """Learning rate of ``epoch`` (0-based): linear warm-up, then cosine decay to ``min_lr``."""
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return warmup_lr + (base_lr - warmup_lr) * epoch / warmup_epochs
    span = max(1, epochs - warmup_epochs)
    progress = min(1.0, (epoch - warmup_epochs) / span)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class ProtocolOptimizer:
    """Mixin (put it before an Avalanche ``SupervisedTemplate`` class): the run's optimiser.

    Call :meth:`setup_protocol` at the end of ``__init__``.
    """

    def setup_protocol(self, *, lr_first: float, lr: float, weight_decay: float,
                       warmup_epochs: int, warmup_lr: float, min_lr: float,
                       num_workers: int = 0, amp: Any = "auto", min_steps_per_task: int = 0,
                       warmup_steps: int | None = None) -> None:
        """``min_steps_per_task`` / ``warmup_steps``: see :mod:`~lorax_cil.training.task_length`
        (``0`` / ``None``: epochs and warm-up epochs as given, the official protocol)."""
        if lr_first <= 0 or lr <= 0:
            raise ValueError(f"learning rates must be positive, got {lr_first} and {lr}")
        self.protocol_lr = (float(lr_first), float(lr))
        self.weight_decay = float(weight_decay)
        self.warmup_epochs, self.warmup_lr, self.min_lr = int(warmup_epochs), warmup_lr, min_lr
        self.num_workers = int(num_workers)
        self.amp = resolve_amp(amp, self.device)
        self._epoch_in_exp = 0
        self.requested_epochs = int(self.train_epochs)
        self.min_steps_per_task = int(min_steps_per_task)
        self.warmup_steps = None if warmup_steps is None else int(warmup_steps)
        plan_task_length(0, batch_size=max(1, int(self.train_mb_size)),
                         epochs=self.requested_epochs, warmup_epochs=self.warmup_epochs,
                         min_steps=self.min_steps_per_task, warmup_steps=self.warmup_steps)
        self.task_length: TaskLength | None = None
        self._task_warmup = self.warmup_epochs

    def task_index(self) -> int:
        """Index of the experience being trained (0 outside training)."""
        exp = getattr(self, "experience", None)
        return int(exp.current_experience) if exp is not None else 0

    def base_lr(self) -> float:
        return self.protocol_lr[0] if self.task_index() <= 0 else self.protocol_lr[1]

    def make_optimizer(self, **kwargs: Any) -> None:
        """A fresh AdamW over the trainable parameters (none before the model has grown)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            return
        self.optimizer = torch.optim.AdamW(params, lr=self.base_lr(),
                                           weight_decay=self.weight_decay)
        self._epoch_in_exp = 0

    def make_train_dataloader(self, num_workers: int | None = None, **kwargs: Any) -> None:
        workers = self.num_workers if num_workers is None else num_workers
        kwargs.setdefault("persistent_workers", workers > 0)
        super().make_train_dataloader(num_workers=workers, **kwargs)
        self.plan_task_length(len(self.adapted_dataset))

    def plan_task_length(self, samples: int) -> TaskLength:
        """Set this task's epochs and warm-up from its training-set size (see
        :mod:`~lorax_cil.training.task_length`); the plan is kept in ``self.task_length``."""
        plan = plan_task_length(samples, batch_size=int(self.train_mb_size),
                                epochs=self.requested_epochs, warmup_epochs=self.warmup_epochs,
                                min_steps=self.min_steps_per_task, warmup_steps=self.warmup_steps)
        self.train_epochs = plan.epochs
        self._task_warmup = plan.warmup_epochs
        self.task_length = plan
        # The experience's own index: LoRAX's task_index() counts the network's tasks, and the
        # new task is added to the network only after this plan is made.
        exp = getattr(self, "experience", None)
        logger.info("task %d: %s", int(exp.current_experience) if exp is not None else 0,
                    plan.describe())
        return plan

    def _before_training_epoch(self, **kwargs: Any) -> None:
        base = self.base_lr()
        lr = cosine_warmup_lr(self._epoch_in_exp, epochs=self.train_epochs, base_lr=base,
                              warmup_epochs=min(self._task_warmup, self.train_epochs - 1),
                              warmup_lr=self.warmup_lr, min_lr=min(self.min_lr, base))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        super()._before_training_epoch(**kwargs)

    def _after_training_epoch(self, **kwargs: Any) -> None:
        self._epoch_in_exp += 1
        super()._after_training_epoch(**kwargs)

    def forward(self) -> torch.Tensor:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.amp):
            out = super().forward()
        return out.float()


class LoRAX(ProtocolOptimizer, SupervisedTemplate):
    """LoRA eXpandable networks for class-incremental synthetic-image attribution.

    Args:
        model: the expandable network (wrapped in :class:`ExpandableModel` if needed).
        lr_first: learning rate of task 0.
        lr: learning rate of later tasks.
        weight_decay: AdamW weight decay.
        warmup_epochs: linear warm-up epochs at the start of every task.
        warmup_lr: learning rate at the start of the warm-up.
        min_lr: final learning rate of the cosine schedule.
        head_div: weight of the divergence-head loss (0 disables it).
        memory_size: total exemplar budget over all classes (0: no memory).
        train_mb_size: training batch size.
        train_epochs: epochs per task.
        eval_mb_size: evaluation batch size.
        device: torch device.
        amp: bfloat16 autocast on CUDA (``"auto"``: when the GPU supports it).
        num_workers: data-loader workers (training and herding).
        cache_trunk: compute the frozen trunk's output once per training image and experience
            and train every epoch from it (valid only when the training transform is
            deterministic; :func:`enable_trunk_cache` checks that).
        min_steps_per_task: raise a task's epochs until it trains at least this many optimizer
            steps (0: epochs as given); see :mod:`~lorax_cil.training.task_length`.
        warmup_steps: warm-up in optimizer steps (``None``: ``warmup_epochs``, scaled with
            raised epochs).
        head: what happens to the head around each task (prototype initialisation, balanced
            fine-tuning, weight aligning, NCM read-out); default: the official behaviour. See
            :mod:`~lorax_cil.training.head_balance`.
        plugins: extra Avalanche plugins.
        evaluator: Avalanche evaluation plugin.
    """

    def __init__(
        self,
        *,
        model: ExpandableNet | ExpandableModel,
        lr_first: float = 1e-4,
        lr: float = 5e-4,
        weight_decay: float = 1e-6,
        warmup_epochs: int = 5,
        warmup_lr: float = 1e-4,
        min_lr: float = 1e-5,
        head_div: float = 0.1,
        memory_size: int = 500,
        train_mb_size: int = 32,
        train_epochs: int = 50,
        eval_mb_size: int = 64,
        device: str | torch.device = "cpu",
        amp: str | bool = "auto",
        num_workers: int = 0,
        cache_trunk: bool = False,
        min_steps_per_task: int = 0,
        warmup_steps: int | None = None,
        head: HeadOptions | None = None,
        plugins: Sequence[Any] | None = None,
        evaluator: Any = default_evaluator,
    ) -> None:
        if isinstance(model, ExpandableNet):
            model = ExpandableModel(model)
        if not isinstance(model, ExpandableModel):
            raise TypeError(f"model must be an ExpandableNet, got {type(model).__name__}")
        for name, value in (("lr_first", lr_first), ("lr", lr), ("train_epochs", train_epochs)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if warmup_epochs < 0 or head_div < 0:
            raise ValueError("warmup_epochs and head_div must be >= 0")
        placeholder = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=lr)
        super().__init__(
            model=model,
            optimizer=placeholder,
            criterion=nn.CrossEntropyLoss(),
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            device=device,
            plugins=list(plugins or []),
            evaluator=evaluator,
        )
        self.setup_protocol(lr_first=lr_first, lr=lr, weight_decay=weight_decay,
                            warmup_epochs=warmup_epochs, warmup_lr=warmup_lr, min_lr=min_lr,
                            num_workers=num_workers, amp=amp,
                            min_steps_per_task=min_steps_per_task, warmup_steps=warmup_steps)
        self.head_div = float(head_div)
        self.head_balancer = HeadBalancer(head or HeadOptions())
        readout = self.head_balancer.options.readout
        if readout != "head" and (not isinstance(model.net, NCMExpandableNet)
                                  or model.net.held_readout != readout):
            raise ValueError(f"train.readout={readout} needs the network built with that read-out "
                             "(lorax_cil.models.heads.build_expandable_net)")
        self.cache_trunk = bool(cache_trunk)
        self.memory = HerdingMemory(
            max_size=int(memory_size),
            feature_fn=lambda m, x: m.net.features_for_herding(x),
            num_workers=self.num_workers,
        )
        self.mb_div_logits: torch.Tensor | None = None
        self.mb_aux_loss: torch.Tensor | None = None
        self.class_weights: torch.Tensor | None = None  # head_balanced_loss, set per task
        #: what the extractor's consolidation of the last task reported (``None``: the kind
        #: does not consolidate); the run log records it per task
        self.consolidation: dict[str, Any] | None = None

    # --- set-up ----------------------------------------------------------------------------
    @property
    def net(self) -> ExpandableNet:
        return self.model.net

    def task_index(self) -> int:
        """The newest task of the network (the one being trained)."""
        return self.net.num_tasks - 1

    def train_dataset_adaptation(self, **kwargs: Any) -> None:
        """The experience's data plus every exemplar in memory (train transforms)."""
        data = self.experience.dataset.train()
        mem = self.memory.dataset()
        self.adapted_dataset = data if mem is None else data.concat(mem)
        if self.cache_trunk:
            self.adapted_dataset = self._trunk_dataset(self.adapted_dataset)

    @torch.no_grad()
    def _trunk_dataset(self, dataset: Any) -> Any:
        """The trunk outputs of ``dataset`` (train transforms, in order) as a tensor dataset.

        The global RNG is left untouched, so batch order and dropout match an uncached run.
        """
        from avalanche.benchmarks.utils.classification_dataset import (
            _make_taskaware_tensor_classification_dataset,
        )
        from torch.utils.data import DataLoader

        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            loader = DataLoader(dataset, batch_size=self.eval_mb_size, shuffle=False,
                                num_workers=self.num_workers, collate_fn=dataset.collate_fn,
                                pin_memory=self.device.type == "cuda")
            hs, ys, ts = [], [], []
            for batch in loader:
                with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.amp):
                    hs.append(self.net.trunk(batch[0].to(self.device, non_blocking=True)).cpu())
                ys.append(torch.as_tensor(batch[1]))
                ts.append(torch.as_tensor(batch[2]))
        h, y, t = torch.cat(hs), torch.cat(ys), torch.cat(ts)
        logger.info("trunk cache: %d images, %.1f MB", len(h), h.numel() * h.element_size() / 2**20)
        return _make_taskaware_tensor_classification_dataset(h, y, t, targets=y.tolist(),
                                                             task_labels=t.tolist())

    # --- forward and loss ------------------------------------------------------------------
    def forward(self) -> torch.Tensor:
        from_trunk = self.cache_trunk and self.is_training
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.amp):
            out = self.net.forward_all(self.mb_x, from_trunk=from_trunk)
        self.mb_div_logits = out.div_logits.float() if out.div_logits is not None else None
        self.mb_aux_loss = out.aux_loss.float() if out.aux_loss is not None else None
        return out.logits.float()

    def criterion(self) -> torch.Tensor:
        if self.is_training and self.class_weights is not None:
            w = self.class_weights.to(self.mb_output.device)
            loss = nn.functional.cross_entropy(self.mb_output, self.mb_y, weight=w)
        else:
            loss = self._criterion(self.mb_output, self.mb_y)
        if self.is_training and self.head_div > 0 and self.mb_div_logits is not None:
            targets = self.net.divergence_targets(self.mb_y)
            loss = loss + self.head_div * nn.functional.cross_entropy(self.mb_div_logits, targets)
        if self.is_training and self.mb_aux_loss is not None:
            loss = loss + self.mb_aux_loss  # MoLE's router balance loss (already weighted)
        return loss

    # --- memory ----------------------------------------------------------------------------
    def _before_training_exp(self, **kwargs: Any) -> None:
        super()._before_training_exp(**kwargs)
        self.head_balancer.before_task(self)  # e.g. prototype initialisation of the new rows
        self.class_weights = None
        if self.head_balancer.options.balanced_loss:
            self.class_weights = balanced_class_weights(
                [int(y) for y in self.adapted_dataset.targets], self.net.num_classes)
            logger.info("class-balanced loss: weights %s",
                        [round(w, 3) for w in self.class_weights.tolist()])

    def _after_training_exp(self, **kwargs: Any) -> None:
        self.consolidate_extractor()  # e.g. distil the task's teacher into its student
        self.head_balancer.after_task(self)  # balanced fine-tuning, WA, NCM class means
        self.memory.post_adapt(self, self.experience)
        super()._after_training_exp(**kwargs)

    def consolidate_extractor(self) -> dict[str, Any] | None:
        """Let an extractor kind that consolidates (:attr:`Extractor.consolidates`) turn the
        task's trained extractor into the one it keeps, on the task's training set (its images
        and the memory, training transforms, shuffled, ``train_mb_size`` batches). Under
        torchrun every process consolidates on the whole set, then rank 0's result is
        broadcast. Returns the kind's statistics (logged), or ``None``."""
        from torch.utils.data import DataLoader

        net = self.net
        self.consolidation = None
        if not net.ext.consolidates:
            return None
        t = net.num_extractors - 1
        data = self.adapted_dataset
        loader = DataLoader(data, batch_size=self.train_mb_size, shuffle=True,
                            num_workers=self.num_workers, collate_fn=getattr(data, "collate_fn", None),
                            pin_memory=self.device.type == "cuda")

        def batches() -> Any:
            for batch in loader:
                x = batch[0].to(self.device, non_blocking=True)
                yield x if self.cache_trunk else net.trunk(x)

        stats = net.ext.consolidate(t, batches, batches_per_epoch=len(loader),
                                    min_steps=self.min_steps_per_task, amp=self.amp)
        dist.broadcast_parameters(net.ext.parameters_of(t))  # no-op in one process
        logger.info("task %d consolidated: %s", t, stats)
        self.consolidation = stats
        return stats


def balanced_class_weights(targets: Sequence[int], num_classes: int) -> torch.Tensor:
    """Per-class loss weights ``n / (k n_c)`` (``n`` samples, ``k`` classes present, ``n_c``
    samples of class ``c``; 0 for an absent class): every present class then carries the same
    total weight, and the weights average to 1 over the samples."""
    counts = torch.bincount(torch.as_tensor(list(targets), dtype=torch.long), minlength=num_classes).double()
    present = counts > 0
    weights = torch.zeros(num_classes, dtype=torch.float64)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.float()


def train_transform_randomness(cfg: Any, sizes: Sequence[tuple[int, int]]) -> list[str]:
    """Why the training transform of ``cfg`` (a ``TransformConfig``) is random on images of
    ``sizes`` (width, height); empty when it is deterministic."""
    reasons = []
    if cfg.blur_prob > 0:
        reasons.append(f"random blur (data.blur_prob={cfg.blur_prob})")
    if cfg.jpeg_prob > 0:
        reasons.append(f"random JPEG re-compression (data.jpeg_prob={cfg.jpeg_prob})")
    if cfg.hflip:
        reasons.append("random horizontal flips (data.hflip=true)")
    for w, h in dict.fromkeys(sizes):
        if cfg.resize is not None:  # torchvision Resize(int): the shorter side to ``resize``
            w, h = (cfg.resize, int(cfg.resize * h / w)) if w <= h else (int(cfg.resize * w / h), cfg.resize)
        if min(w, h) < cfg.size:
            scale = cfg.size / min(w, h)
            w, h = max(cfg.size, round(w * scale)), max(cfg.size, round(h * scale))
        if (w, h) != (cfg.size, cfg.size):
            reasons.append(f"random {cfg.size} px crops of {w}x{h} images (set data.crop or "
                           "data.resize so that images are cropped to their own size)")
            break
    return reasons


def enable_trunk_cache(strategy: Any, bench: Any) -> None:
    """Turn on ``strategy.cache_trunk`` after checking that the training transform of ``bench``
    is deterministic on its training images (so cached trunk outputs equal recomputed ones).

    Raises:
        ValueError: the strategy cannot cache, or the transform is random (the reasons are named).
    """
    from PIL import Image

    if not isinstance(strategy, LoRAX):
        raise ValueError(f"train.cache_trunk needs a LoRAX-family strategy, not {type(strategy).__name__}")
    sizes = []
    for per_task in bench.samples["train"]:
        for sample in per_task:
            with Image.open(sample.path) as img:
                sizes.append(img.size)
    reasons = train_transform_randomness(bench.transform_config, sizes)
    if reasons:
        raise ValueError("train.cache_trunk (--cache-trunk) needs a deterministic training transform; "
                         "this one has " + "; ".join(reasons))
    strategy.cache_trunk = True
