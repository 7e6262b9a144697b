"""Running a class-incremental experiment end to end, with outputs, checkpoints and resume.

Run directory::

    config.yaml              resolved configuration
    data_manifest.json       the data the run used (counts, listing hash, data issues)
    steps.jsonl              one JSON record per completed task (with per-epoch loss and time)
    accuracy_<metric>.csv    accuracy matrices (multi_real, binary, strict) and ap.csv
    accuracy_<metric>-head.csv, ap-head.csv
                             the linear head's matrices, from the same passes, when the run
                             reads by class means (train.readout ncm, ncm-frozen, ncm-relative)
    summary.json             AA, step-average accuracy, BWT, forgetting, parameters, time
    accuracy_matrix.png, accuracy_over_steps.png
    checkpoints/exp_NNN/     tensors.safetensors + meta.json after every task
    data_issues_workers.jsonl  images that failed to decode in DataLoader workers (merged into
                             data_manifest.json; only with train.num_workers > 0)

Under ``torchrun`` (see docs/distributed.md) every rank builds the same run; training batches
and evaluation are split over the ranks, and only rank 0 writes files (and prints progress).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from lorax_cil import distributed as dist
from lorax_cil.training.checkpoint import latest_checkpoint
from lorax_cil.training.config import RunConfig, saved_run_config
from lorax_cil.training.head_balance import check_head_options
from lorax_cil.training.integrity import data_changes, format_changes, protocol_changes
from lorax_cil.utils import atomic_write_text, resolve_device, seed_everything, write_json

__all__ = ["Run", "resolve_device", "build_network", "build_backbone"]

logger = logging.getLogger(__name__)

#: start of the comments config.yaml carries on the values derived per task
DERIVED_MARK = "# derived per task"
#: file in the run folder where DataLoader worker processes report images that failed to decode
WORKER_ISSUES = "data_issues_workers.jsonl"

METRICS = ("multi_real", "binary", "strict", "ap")

#: Default LoRA target preset per backbone family (``lora_targets: auto``).
AUTO_TARGETS = {"convit": "lorax-paper", "timm": "attn", "open_clip": "mlp",
                "efficientnet-lite": "pointwise"}


def build_backbone(cfg: RunConfig):
    """The configured backbone. Randomly initialised weights are drawn from ``train.seed``
    (without touching the global RNG), so a checkpoint can rebuild the identical backbone."""
    from lorax_cil.models.backbones import backbone_family, create_backbone

    m = cfg.model
    family = backbone_family(m.backbone) if m.channels_last else "cnn"
    if family != "cnn":  # checked before any weights are read
        what = (f"is a {family} backbone" if family else
                "has no registered family (register_backbone(..., family='cnn') names one)")
        raise ValueError(f"model.channels_last: {m.backbone} {what}; the channels-last layout "
                         "is for the convolutions of a cnn backbone. Leave model.channels_last "
                         "unset")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        backbone = create_backbone(m.backbone, pretrained=m.pretrained, weights=m.weights,
                                   img_size=m.img_size)
    crop = cfg.data.crop
    if crop and backbone.spec.family in TOKEN_FAMILIES and crop != backbone.spec.input_size:
        raise ValueError(
            f"data.crop (--crop) {crop} differs from the {backbone.spec.input_size} px input of "
            f"{m.backbone}: a ViT is built for the size it is fed; pass model.img_size "
            f"(--img-size) {crop}, or leave --crop unset"
        )
    if m.channels_last:
        backbone.to_channels_last()
    return backbone


#: Backbone families whose input size is fixed at construction (position embeddings).
TOKEN_FAMILIES = ("timm", "open_clip")


def _lora_targets(backbone: Any, targets: str) -> str:
    """``auto``: the backbone's ``lorax-paper`` preset when it declares one (ConViT, DINOv2),
    else the family default of :data:`AUTO_TARGETS`."""
    if targets != "auto":
        return targets
    from lorax_cil.models.backbones import lora_target_presets

    if "lorax-paper" in lora_target_presets(backbone):
        return "lorax-paper"
    family = backbone.spec.family
    if family == "timm" and "convit" in backbone.spec.name:
        family = "convit"
    return AUTO_TARGETS.get(family, "attn")


def build_network(cfg: RunConfig, backbone: Any):
    """The expandable network described by ``cfg.model`` on ``backbone``, or the strategy's own
    network when its preset names one (see :class:`~lorax_cil.training.run_protocol.RunModel`)."""
    from lorax_cil.models.extractors.distilled import DistilledSideSpec
    from lorax_cil.models.extractors.side import SideSpec
    from lorax_cil.models.heads import build_expandable_net
    from lorax_cil.models.lora import LoraSpec
    from lorax_cil.training.registry import get_strategy, kind_defaults

    cfg = dataclasses.replace(cfg, model=kind_defaults(cfg.model))  # a config without its preset
    check_distill_options(cfg)
    network = get_strategy(cfg.train.strategy).network
    if network is not None:
        return network(cfg, backbone)
    m = cfg.model
    spec: Any = None
    if m.extractor in ("lora", "distilled-side"):
        spec = LoraSpec(r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout,
                        targets=_lora_targets(backbone, m.lora_targets))
    if m.extractor == "distilled-side":
        t = cfg.train
        spec = DistilledSideSpec(lora=spec, side=SideSpec(width=m.side_width, alpha=float(m.side_width)),
                                 epochs=t.distill_epochs, lr=t.distill_lr)
    kwargs = dict(backbone=backbone, extractor=m.extractor, adapt_blocks=m.adapt_blocks,
                  spec=spec, divergence_head=m.divergence_head)
    return build_expandable_net(cfg.train.readout, **kwargs)


#: the keys only the ``distilled-side`` extractor (``lorax-distill``) reads
DISTILL_KEYS = ("model.side_width", "train.distill_epochs", "train.distill_lr")


def check_distill_options(cfg: RunConfig) -> None:
    """Refuse the distillation keys where nothing reads them, and demand them where the
    ``distilled-side`` extractor does (its strategy preset fills them in)."""
    values = {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in DISTILL_KEYS}
    if cfg.model.extractor == "distilled-side":
        unset = [k for k, v in values.items() if v is None]
        if unset:
            raise ValueError(f"model.extractor 'distilled-side' needs {', '.join(unset)} "
                             "(strategy lorax-distill sets them)")
        return
    given = [k for k, v in values.items() if v is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: read only by strategy lorax-distill "
                         f"(model.extractor 'distilled-side'), not by {cfg.train.strategy!r}; "
                         "leave unset")


@dataclass
class DatasetScores:
    """Class probabilities of one pass over a dataset (:func:`score_dataset`).

    Attributes:
        probs: ``(N, num_classes)`` softmax of the network's logits (its read-out).
        labels: ``(N,)`` true labels.
        head_probs: the linear head's probabilities of the same pass when the network reads
            another way (:attr:`ExpandableOutput.head_logits`); ``None`` otherwise.
    """

    probs: np.ndarray
    labels: np.ndarray
    head_probs: np.ndarray | None = None

    @property
    def pred(self) -> np.ndarray:
        """Predicted classes (the argmax of :attr:`probs`)."""
        return self.probs.argmax(1) if self.probs.size else np.zeros(0, dtype=np.int64)


@torch.no_grad()
def score_dataset(net: Any, dataset: Any, *, batch_size: int, device: torch.device,
                  num_workers: int = 0, sharded: bool = False) -> DatasetScores:
    """Class probabilities and true labels over an avalanche dataset, in dataset order.

    With ``sharded`` under ``torchrun``, each rank scores one contiguous part of the dataset and
    every rank receives all results in dataset order, each sample exactly once.
    """
    from torch.utils.data import DataLoader

    net.eval()
    n = len(dataset)
    start, stop = dist.shard_bounds(n) if sharded else (0, n)
    part = dataset if (start, stop) == (0, n) else dataset.subset(range(start, stop))
    forward_all = getattr(net, "forward_all", None)
    probs, head, labels = [], [], []
    if len(part):
        loader = DataLoader(part.eval(), batch_size=batch_size, shuffle=False,
                            num_workers=num_workers, collate_fn=getattr(part, "collate_fn", None))
        for batch in loader:
            x = batch[0].to(device)
            if forward_all is None:
                logits, head_logits = net(x), None
            else:
                out = forward_all(x)
                logits, head_logits = out.logits, out.head_logits
            probs.append(torch.softmax(logits.float(), dim=1).cpu())
            if head_logits is not None:
                head.append(torch.softmax(head_logits.float(), dim=1).cpu())
            labels.append(torch.as_tensor(batch[1]))
    empty = np.zeros((0, 0), dtype=np.float32)
    p = torch.cat(probs).numpy() if probs else empty
    h = torch.cat(head).numpy() if head else None
    y = torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64)
    if sharded and dist.is_distributed():
        # per item: the head's row, or None from a network without one (every rank has the
        # same network; a rank with an empty shard contributes no item either way)
        rows, ys, heads = dist.gather_ordered(
            n, start, [list(p), list(y), list(h) if h is not None else [None] * len(y)])
        p, y = np.stack(rows).astype(np.float32), np.asarray(ys)
        h = None if not heads or any(r is None for r in heads) else np.stack(heads).astype(np.float32)
    return DatasetScores(probs=p, labels=y, head_probs=h)


def predict_dataset(net: Any, dataset: Any, *, batch_size: int, device: torch.device,
                    num_workers: int = 0,
                    sharded: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(predicted classes, class probabilities, true labels)`` of :func:`score_dataset`."""
    s = score_dataset(net, dataset, batch_size=batch_size, device=device,
                      num_workers=num_workers, sharded=sharded)
    return s.pred, s.probs, s.labels


@dataclass
class StepRecord:
    """What one completed task adds to the run log."""

    step: int
    task: str
    train_seconds: float
    eval_seconds: float
    per_task: dict[str, dict[str, float]]
    memory_per_class: dict[int, int]
    parameters: dict[str, Any]
    world_size: int = 1
    memory_exemplars: int | None = None
    epochs: list[dict[str, Any]] = field(default_factory=list)
    initial_adapter: str | None = None
    task_length: dict[str, Any] | None = None
    consolidation: dict[str, Any] | None = None


class Run:
    """One class-incremental run: data, network, strategy, metrics and run directory.

    Args:
        cfg: the resolved configuration (strategy preset already applied).
        run_dir: output folder (created).
        progress: optional callback ``progress(message)`` for the CLI.
        explicit: the ``section.key`` settings the user made explicitly, mapped to how (e.g.
            ``"--memory-size 40"``): they win over the strategy preset, or the run stops with
            :class:`~lorax_cil.training.registry.PresetConflictError` (see
            :func:`~lorax_cil.training.registry.apply_preset`). ``None``: the preset applies.
        display: per-epoch progress (:class:`~lorax_cil.training.progress.EpochProgress`):
            ``auto`` (a bar on a terminal, else one line per epoch), ``bar``, ``lines`` or
            ``off``. The per-epoch loss and time go to ``steps.jsonl`` in every case.
        loggers: experiment loggers, ``tensorboard[:DIR]``, ``csv[:DIR]`` or
            ``wandb[:PROJECT]`` (strings or :class:`~lorax_cil.training.loggers.LoggerSpec`;
            see :mod:`lorax_cil.training.loggers`). Off by default.
    """

    def __init__(self, cfg: RunConfig, *, run_dir: str | Path,
                 progress: Callable[[str], None] | None = None,
                 explicit: Mapping[str, str] | None = None, display: str = "auto",
                 loggers: Sequence[Any] = ()) -> None:
        from lorax_cil.plugins import load_plugins
        from lorax_cil.training.loggers import LoggerSpec, parse_logger_spec
        from lorax_cil.training.progress import resolve_display
        from lorax_cil.training.registry import apply_preset, backbone_default_notes

        # the run's plugins register what its configuration names (strategy, backbone, ...)
        cfg = dataclasses.replace(cfg, plugins=load_plugins(cfg.plugins,
                                                            needed_by=f"run {run_dir}"))

        self.cfg = apply_preset(cfg, explicit)
        self.run_dir = Path(run_dir)
        say = progress or (lambda msg: logger.info("%s", msg))
        self.progress = say if dist.is_main() else (lambda msg: logger.debug("%s", msg))
        for note in backbone_default_notes(cfg, explicit, resolved=self.cfg):
            self.progress(note)
        self.device = dist.local_device(resolve_device(self.cfg.train.device))
        self.world_size = dist.world_size()
        self.display = resolve_display(display) if dist.is_main() else "off"
        self.epoch_progress = None
        self.logger_specs = [s if isinstance(s, LoggerSpec) else parse_logger_spec(s)
                             for s in loggers]
        self.run_loggers = None
        #: task name -> peft adapter folder its extractor starts from (``--adapter``)
        self.initial_adapters: dict[str, str] = {}
        #: what resumes changed and which data each task was trained on (see integrity.py)
        self.history: dict[str, Any] = {"protocol_changes": [], "data_changes": [],
                                        "trained_data_sha256": {}}
        self._manifest: dict[str, Any] | None = None
        self.scenario = None
        self.bench = None
        self.net = None
        self.strategy = None
        self.matrices: dict[str, Any] = {}
        #: the linear head's matrices, recorded beside :attr:`matrices` when the network reads
        #: by class means (``train.readout`` ``ncm``, ``ncm-frozen``, ``ncm-relative``; the head
        #: trains either way and one pass gives both); ``None`` otherwise, or when a resumed
        #: run's checkpoint did not record them from its first task
        self.head_matrices: dict[str, Any] | None = None
        self.steps: list[dict[str, Any]] = []

    # --- construction ----------------------------------------------------------------------
    def setup(self, scenario: Any) -> None:
        """Build the benchmark, network and strategy for ``scenario``."""
        from lorax_cil.benchmarks.streams import build_cil_benchmark
        from lorax_cil.benchmarks.transforms import TransformConfig
        from lorax_cil.evaluation.metrics import AccuracyMatrix
        from lorax_cil.models.heads import NCMExpandableNet
        from lorax_cil.training.progress import EpochProgress
        from lorax_cil.training.registry import get_strategy

        cfg = self.cfg
        seed_everything(cfg.train.seed)
        backbone = build_backbone(cfg)
        spec = backbone.spec
        d = cfg.data
        tcfg = TransformConfig.for_backbone(spec, d)
        self.scenario = scenario
        self.bench = build_cil_benchmark(scenario, transform_config=tcfg, eval_split=d.eval_split,
                                         calib_fraction=d.calib_fraction, seed=cfg.train.seed,
                                         strict=d.strict_data)
        if cfg.train.num_workers > 0 and dist.is_main():
            # DataLoader workers report failed decodes through this file (their own tally is
            # lost with them); the main process merges it before every report (only rank 0
            # writes the run's files, so only its workers report)
            spool = self.run_dir / WORKER_ISSUES
            spool.unlink(missing_ok=True)
            self.bench.issues.spool = str(spool)
        self.net = build_network(cfg, backbone).to(self.device)
        builder = get_strategy(cfg.train.strategy).builder
        self.epoch_progress = EpochProgress(display=self.display, say=self.progress)
        plugins: list[Any] = [self.epoch_progress]
        evaluator = None
        if self.logger_specs and dist.is_main():
            from lorax_cil.training.loggers import RunLoggers

            self.run_loggers = RunLoggers(self.logger_specs, run_dir=self.run_dir,
                                          run_name=self.run_dir.name, config=cfg.to_dict())
            evaluator = self.run_loggers.evaluator()
        if dist.is_distributed():
            from lorax_cil.training.ddp import DistributedTraining

            plugins.append(DistributedTraining(num_workers=cfg.train.num_workers))
        with warnings.catch_warnings():
            # The run writes its own logs; Avalanche's "no loggers" notice is expected here.
            warnings.filterwarnings("ignore", message="No loggers specified")
            self.strategy = builder(cfg, self.net, self.device, evaluator, plugins)
        if dist.is_distributed():
            _check_distributed_strategy(cfg.train.strategy, self.strategy)
        check_head_options(cfg, self.strategy)
        if cfg.train.cache_trunk:
            from lorax_cil.training.strategy import enable_trunk_cache

            enable_trunk_cache(self.strategy, self.bench)
        names = scenario.task_names
        self.matrices = {m: AccuracyMatrix(len(names), task_names=names) for m in METRICS}
        if isinstance(self.net, NCMExpandableNet):
            self.head_matrices = {m: AccuracyMatrix(len(names), task_names=names)
                                  for m in METRICS}

    # --- the loop --------------------------------------------------------------------------
    @property
    def completed(self) -> int:
        return len(self.steps)

    def train(self, *, stop_after: int | None = None) -> dict[str, Any]:
        """Train every remaining task (or up to ``stop_after`` tasks in total); return summary.

        The run directory is locked meanwhile (:class:`~lorax_cil.training.lock.RunLock`): a
        second process writing to it is refused."""
        from contextlib import nullcontext

        from lorax_cil.training.lock import RunLock

        with RunLock(self.run_dir) if dist.is_main() else nullcontext():
            if dist.is_main():
                self._write_static()
            total = self.scenario.num_tasks if stop_after is None else min(stop_after,
                                                                            self.scenario.num_tasks)
            for j in range(self.completed, total):
                self._train_step(j)
            summary = self.summary()
            if dist.is_main():
                self.finish()
        dist.barrier()
        return summary

    def _train_step(self, j: int) -> None:
        exp = self.bench.train_stream[j]
        name = self.scenario.task_names[j]
        self.progress(f"task {j + 1}/{self.scenario.num_tasks}: {name} "
                      f"({len(exp.dataset)} images + memory)")
        seed_everything(self._task_seed(j))
        adapter = self.initial_adapters.get(name)
        if adapter is not None:
            self._start_from_adapter(j, exp, adapter)
        self.epoch_progress.start_task(f"task {j + 1}/{self.scenario.num_tasks}")
        t0 = time.perf_counter()
        self.strategy.train(exp, num_workers=self.cfg.train.num_workers)
        train_s = time.perf_counter() - t0
        length = getattr(self.strategy, "task_length", None)
        if length is not None:
            self.progress(f"  schedule: {length.describe()}")
        consolidation = getattr(self.strategy, "consolidation", None)
        if consolidation is not None:
            self.progress("  consolidated: " + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in consolidation.items()))
        t0 = time.perf_counter()
        per_task = self.evaluate_step(j)
        eval_s = time.perf_counter() - t0
        record = StepRecord(
            step=j, task=name, train_seconds=round(train_s, 3), eval_seconds=round(eval_s, 3),
            per_task=per_task, memory_per_class=self.strategy.memory.per_class(),
            parameters=self.net.parameter_report(), world_size=self.world_size,
            memory_exemplars=self.check_memory(), epochs=self.epoch_progress.take_records(),
            initial_adapter=adapter,
            task_length=length.to_dict() if length is not None else None,
            consolidation=consolidation,
        )
        self.steps.append(json.loads(json.dumps(record.__dict__, default=_jsonable)))
        if self.run_loggers is not None:
            before = sum(len(s.get("epochs") or ()) for s in self.steps[:-1])
            self.run_loggers.log_step(j, self.matrices, self.scenario.task_names, record.epochs,
                                      first_epoch=before, head_matrices=self.head_matrices)
        if dist.is_main():
            self._write_step_outputs()
            if length is not None and length.derived:
                _note_derived(self.run_dir / "config.yaml", j, name, length)
        if self.cfg.train.checkpoint_every_task or j == self.scenario.num_tasks - 1:
            self.save_checkpoint()

    def _start_from_adapter(self, j: int, exp: Any, folder: str) -> None:
        """Grow the network for task ``j`` now and load its extractor from a peft adapter
        folder; the task then trains as usual, starting from those weights."""
        from lorax_cil.models.peft_adapter import extractor_state_from_peft

        state = extractor_state_from_peft(self.net, folder)
        if self.net.num_tasks != j:
            raise ValueError(f"task {j} would be extractor {self.net.num_tasks}: the network "
                             "does not match the run's steps")
        self.net.add_task(len(exp.classes_in_this_experience))
        self.net.load_extractor_state_dict(j, state)
        self.net.to(self.device)
        self.progress(f"  extractor of {self.scenario.task_names[j]} starts from the peft "
                      f"adapter {folder}")

    def check_memory(self) -> int | None:
        """The number of distinct exemplars held by the whole job (the union over ranks);
        ``None`` for strategies without a :class:`~lorax_cil.training.memory.HerdingMemory`.

        Raises:
            RuntimeError: the union exceeds ``train.memory_size``, or the ranks hold different
                memories (the memory must be one global selection).
        """
        memory = getattr(self.strategy, "memory", None)
        if memory is None or not hasattr(memory, "unique_exemplars"):
            return None
        mine = memory.unique_exemplars(self.bench.paths_of)
        every = dist.all_gather_objects(sorted(mine))
        union = set().union(*(set(map(tuple, e)) for e in every))
        budget = int(self.cfg.train.memory_size)
        if len(union) > budget:
            raise RuntimeError(f"the exemplar memory holds {len(union)} distinct samples over "
                               f"{len(every)} process(es), over train.memory_size={budget}")
        if any(set(map(tuple, e)) != union for e in every):
            raise RuntimeError("the ranks hold different exemplar memories; the memory must be "
                               "selected once and shared")
        return len(union)

    def _task_seed(self, j: int) -> int:
        return self.cfg.train.seed * 1000 + j

    def evaluate_step(self, j: int) -> dict[str, dict[str, float]]:
        """Evaluate every task seen so far after training task ``j``; fill matrix row ``j``."""
        from lorax_cil.evaluation.metrics import evaluate_predictions

        out: dict[str, dict[str, float]] = {}
        should = getattr(self.strategy, "evaluate_after_step", None)
        if should is not None and not should(j, self.scenario.num_tasks):
            return out  # e.g. joint training: only the final row is defined
        table = np.array(self.scenario.class_is_fake[: self.net.num_classes])
        for i in range(j + 1):
            ds = self.bench.test_stream[i].dataset
            scores = score_dataset(self.net, ds, batch_size=self.cfg.train.eval_batch_size,
                                   device=self.device, num_workers=self.cfg.train.num_workers,
                                   sharded=True)
            keep = np.array(self.bench.decoded_mask("test", i), dtype=bool)
            labels = scores.labels[keep]
            tasks = np.full(labels.shape, i)

            def rates(probs: np.ndarray) -> dict[str, float]:
                probs = probs[keep]
                return evaluate_predictions(probs.argmax(1), labels, probs, tasks,
                                            table[labels], table)[i]

            res = rates(scores.probs)
            for m in METRICS:
                self.matrices[m].set(j, i, res[m])
            if self.head_matrices is not None:
                if scores.head_probs is None:
                    raise RuntimeError("the network gave no linear-head scores to record")
                head = rates(scores.head_probs)
                for m in METRICS:
                    self.head_matrices[m].set(j, i, head[m])
            out[self.scenario.task_names[i]] = res
        return out

    # --- outputs ---------------------------------------------------------------------------
    def _write_static(self) -> None:
        import yaml

        from lorax_cil.benchmarks.verify import data_manifest

        path = self.run_dir / "config.yaml"
        # a resumed run rewrites the configuration and keeps the derived-values comments
        derived = _derived_notes(path.read_text(encoding="utf-8")) if path.is_file() else ""
        atomic_write_text(path, yaml.safe_dump(self.cfg.to_dict(), sort_keys=False) + derived)
        if self._manifest is None:
            self._manifest = data_manifest(self.bench.samples, self.scenario)
        self._write_manifest()

    def data_listing(self) -> dict[str, str]:
        """Per task, the listing hash of its data as it is now (every stream)."""
        from lorax_cil.benchmarks.verify import data_manifest

        if self._manifest is None:
            self._manifest = data_manifest(self.bench.samples, self.scenario)
        return dict(self._manifest["task_listing_sha256"])

    def _write_manifest(self) -> None:
        """data_manifest.json: the data, what each task was trained on, every data issue met
        so far (unreadable and substituted files, by name) and data changes seen on resume."""
        manifest = dict(self._manifest or {})
        manifest["data_issues"] = self.bench.issues.summary()
        manifest["trained_data_sha256"] = dict(self.history["trained_data_sha256"])
        manifest["data_changes"] = list(self.history["data_changes"])
        write_json(self.run_dir / "data_manifest.json", manifest)

    def _write_step_outputs(self) -> None:
        self.history["trained_data_sha256"][self.steps[-1]["task"]] = \
            self.data_listing()[self.steps[-1]["task"]]
        self._write_manifest()
        atomic_write_text(self.run_dir / "steps.jsonl",
                          "".join(json.dumps(s, sort_keys=True) + "\n" for s in self.steps))
        for m, mat in self.matrices.items():
            mat.to_csv(self.run_dir / ("ap.csv" if m == "ap" else f"accuracy_{m}.csv"))
        for m, mat in (self.head_matrices or {}).items():
            mat.to_csv(self.run_dir / ("ap-head.csv" if m == "ap" else f"accuracy_{m}-head.csv"))

    def summary(self) -> dict[str, Any]:
        """AA, step-average accuracy, BWT and forgetting for every accuracy type, and costs."""
        out: dict[str, Any] = {
            "strategy": self.cfg.train.strategy,
            "scenario": self.scenario.name,
            "task_order": self.scenario.task_names,
            "completed_tasks": self.completed,
            "backbone": self.cfg.model.backbone,
            "memory_size": self.cfg.train.memory_size,
            "eval_split": self.cfg.data.eval_split,
            "seed": self.cfg.train.seed,
            "train_seconds": round(sum(s["train_seconds"] for s in self.steps), 3),
            "eval_seconds": round(sum(s["eval_seconds"] for s in self.steps), 3),
            "world_size": self.world_size,
            "effective_batch_size": self.cfg.train.batch_size,
            "memory_exemplars": self.steps[-1].get("memory_exemplars") if self.steps else None,
        }
        out["readout"] = self.cfg.train.readout
        for m in ("multi_real", "binary", "strict"):
            for k, v in self.matrices[m].summary().items():
                out[f"{m}_{k}"] = v
        if self.head_matrices is not None:
            # the same keys for the linear head, read in the same passes
            out["head_readout"] = {f"{m}_{k}": v for m in ("multi_real", "binary", "strict")
                                   for k, v in self.head_matrices[m].summary().items()}
        if self.steps:
            params = self.steps[-1]["parameters"]
            out["parameters"] = params
        issues = self.bench.issues.summary() if self.bench is not None else {}
        out["data_issues"] = {k: issues.get(k, 0) for k in ("unreadable", "substituted_at_load")}
        out["protocol_changes"] = list(self.history["protocol_changes"])
        out["data_changes"] = list(self.history["data_changes"])
        return out

    def finish(self) -> dict[str, Any]:
        """Write summary.json, the plots and MODEL_CARD.md; return the summary."""
        from lorax_cil.evaluation.plots import plot_accuracy_matrix, plot_accuracy_over_steps
        from lorax_cil.training.model_card import write_model_card

        summary = self.summary()
        if self.run_loggers is not None:
            self.run_loggers.close()
            self.run_loggers = None
        write_json(self.run_dir / "summary.json", summary)
        caption = (f"{self.cfg.train.strategy} on {self.scenario.name}, backbone "
                   f"{self.cfg.model.backbone}, memory {self.cfg.train.memory_size}, "
                   f"eval split {self.cfg.data.eval_split}, seed {self.cfg.train.seed}")
        R = self.matrices["multi_real"].matrix
        names = self.scenario.task_names
        plot_accuracy_matrix(R, names, self.run_dir / "accuracy_matrix.png",
                             title="multi-real accuracy", caption=caption)
        plot_accuracy_over_steps(R, names, self.run_dir / "accuracy_over_steps.png",
                                 title="per-task multi-real accuracy", caption=caption)
        write_model_card(self.run_dir, weights_tag=self.net.backbone.spec.weights)
        return summary

    # --- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write the checkpoint of the last completed task (rank 0 only; every rank waits)."""
        j = self.completed - 1
        folder = self.run_dir / "checkpoints" / f"exp_{j:03d}"
        if dist.is_main():
            self._write_checkpoint(folder)
        dist.barrier()
        return folder

    def _write_checkpoint(self, folder: Path) -> None:
        from lorax_cil.training.checkpoint import save_checkpoint

        meta = {
            "completed_tasks": self.completed,
            "scenario": self.scenario.to_dict(),
            "architecture": self.net.architecture(),
            "memory": self.strategy.memory.state(self.bench.paths_of),
            "steps": self.steps,
            "matrices": {m: rows_from_matrix(mat.matrix) for m, mat in self.matrices.items()},
            "head_matrices": None if self.head_matrices is None else
            {m: rows_from_matrix(mat.matrix) for m, mat in self.head_matrices.items()},
            "config": self.cfg.to_dict(),
            # Randomness is re-seeded at the start of every task from (seed, task index), so
            # the next task's RNG state is fully determined by these two numbers.
            "rng": {"policy": "reseed-per-task", "seed": self.cfg.train.seed,
                    "next_task_seed": self._task_seed(self.completed)},
            "class_order": self.scenario.class_names[: self.net.num_classes],
            "trained_data_sha256": dict(self.history["trained_data_sha256"]),
            "protocol_changes": list(self.history["protocol_changes"]),
            "data_changes": list(self.history["data_changes"]),
        }
        save_checkpoint(folder, self.net.learned_state_dict(), meta)
        write_json(self.run_dir / "checkpoints" / "latest.json", {"folder": folder.name})

    def restore(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Load a checkpoint written by :meth:`save_checkpoint` into a set-up run."""
        arch = meta["architecture"]
        for key in self.history:
            value = meta.get(key)
            if isinstance(value, type(self.history[key])):
                self.history[key] = type(value)(value)
        for n in arch.get("task_classes", [2] * meta["completed_tasks"]):
            self.net.add_task(n)
        self.net.load_learned_state_dict(tensors)
        self.net.to(self.device)
        k = meta["completed_tasks"]
        self.steps = list(meta["steps"])
        _restore_matrices(self.matrices, meta["matrices"], k)
        if self.head_matrices is not None:
            recorded = meta.get("head_matrices")
            if recorded:
                _restore_matrices(self.head_matrices, recorded, k)
            else:  # a checkpoint written before the head was recorded: rows 0..k-1 are lost
                self.head_matrices = None
                self.progress("  the checkpoint has no linear-head matrices: this run records "
                              "only its read-out's (train.readout)")
        by_class = {}
        for t in range(k):
            ds = self.bench.train_stream[t].dataset
            targets = list(ds.targets)
            for c in sorted(set(targets)):
                by_class[c] = ds.subset([i for i, y in enumerate(targets) if y == c])
        self.strategy.memory.restore(meta["memory"], by_class, self.bench.paths_of)
        clock = getattr(self.strategy, "clock", None)
        if clock is not None:  # logged iteration numbers continue where the run stopped
            clock.train_iterations = sum(e.get("batches", 0) for s in self.steps
                                         for e in s.get("epochs") or ())


def _restore_matrices(matrices: Mapping[str, Any], recorded: Mapping[str, Any], k: int) -> None:
    """Rows ``0..k-1`` of checkpointed matrices (``None`` for NaN) into ``matrices``."""
    for m, rows in recorded.items():
        arr = matrix_from_rows(rows)
        for j in range(k):
            for i in range(j + 1):
                matrices[m].set(j, i, arr[j, i])


def _check_distributed_strategy(name: str, strategy: Any) -> None:
    """Only the LoRAX family (one strategy class, sharded by :mod:`lorax_cil.training.ddp`)
    trains under torchrun; other strategies keep state the plugin does not shard."""
    from lorax_cil.training.builtin_strategies import lorax_family_strategies
    from lorax_cil.training.strategy import LoRAX

    if not isinstance(strategy, LoRAX):
        raise ValueError(f"strategy {name!r} cannot train with several processes (torchrun); "
                         f"distributed training covers {', '.join(lorax_family_strategies())}: "
                         "run it with one process")


def _derived_notes(text: str) -> str:
    """The derived-values comment block at the end of a ``config.yaml`` ('' if none)."""
    i = text.find(DERIVED_MARK)
    return text[i:] if i >= 0 else ""


def _note_derived(path: Path, j: int, name: str, length: Any) -> None:
    """Append the values derived for task ``j`` to ``config.yaml`` as comments (so the file
    still loads as the configuration the user gave); a task trained again (a resumed run that
    stopped inside it) replaces its line."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    if DERIVED_MARK not in text:
        text += (f"{DERIVED_MARK} (train.min_steps_per_task / train.warmup_steps; "
                 "steps.jsonl task_length has every field):\n")
    line = f"# task {j} "
    text = "".join(row for row in text.splitlines(keepends=True) if not row.startswith(line))
    text += f"{line}{name}: {length.describe()}\n"
    atomic_write_text(path, text)


def matrix_from_rows(rows: Sequence[Sequence[float | None]]) -> np.ndarray:
    """A matrix stored by :func:`rows_from_matrix` back as a float array."""
    return np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=float)


def rows_from_matrix(a: np.ndarray) -> list[list[float | None]]:
    """A matrix as JSON rows, NaN written as ``None`` (read back by :func:`matrix_from_rows`)."""
    return [[None if np.isnan(v) else float(v) for v in row] for row in np.asarray(a)]


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def resume_run(run_dir: str | Path, *, add_tasks: Sequence[str] = (), overrides: dict | None = None,
               progress: Callable[[str], None] | None = None,
               explicit: Mapping[str, str] | None = None, display: str = "auto",
               loggers: Sequence[Any] = (), adapters: Mapping[str, str] | None = None,
               allow_protocol_change: bool = False) -> Run:
    """Rebuild a run from its latest checkpoint, optionally appending new generator tasks.

    ``overrides`` (nested ``{section: {key: value}}``) are explicit settings: they win over the
    strategy preset or stop with a message (``explicit`` names how each was set; default
    ``section.key=value``). ``adapters`` maps added task names to peft LoRA adapter folders
    their extractors start from (:mod:`lorax_cil.models.peft_adapter`).

    A resume keeps the run's protocol: an override that changes it (backbone, seed, memory
    size, crop, ...) and training data that changed since a task was trained on it are refused
    with a message naming them, unless ``allow_protocol_change``, which records both in the
    checkpoints, ``summary.json`` and ``data_manifest.json``."""
    from lorax_cil.benchmarks.scenarios import Scenario, parse_task_spec
    from lorax_cil.errors import UserError
    from lorax_cil.training.checkpoint import load_checkpoint
    from lorax_cil.training.config import merge_config
    from lorax_cil.training.integrity import validate_run_meta

    def read() -> tuple[Path, dict, dict]:
        folder = latest_checkpoint(run_dir)
        return (folder, *load_checkpoint(folder))

    folder, tensors, meta = dist.on_main(read)  # rank 0 reads; the other ranks receive it
    validate_run_meta(meta, folder)
    stored = saved_run_config(meta["config"], source=str(folder / "meta.json")).to_dict()
    cfg = RunConfig.from_dict(stored, source=str(folder / "meta.json"))
    if overrides:
        cfg = merge_config(cfg, overrides, source="command line")
    changes = protocol_changes(RunConfig.from_dict(stored, source="checkpoint").to_dict(),
                               cfg.to_dict())
    if changes and not allow_protocol_change:
        raise UserError(f"--resume {run_dir} would change the protocol of the run in progress: "
                        f"{format_changes(changes)}. Start a new run (another --out) to use these "
                        "settings, or pass --allow-protocol-change to continue with them (the "
                        "change is recorded in the checkpoints and summary.json)")
    scenario = Scenario.from_dict(meta["scenario"])
    for spec in add_tasks:
        task = parse_task_spec(spec, cfg.data.data_path)
        scenario = scenario.with_task(task.name, task.path)
    if add_tasks:
        cfg.data.tasks = [f"{t.name}={t.path}" for t in scenario.tasks]
        cfg.data.scenario = "custom"
    if explicit is None:
        explicit = {f"{section}.{key}": f"{section}.{key}={value!r}"
                    for section, values in (overrides or {}).items()
                    if isinstance(values, Mapping) for key, value in values.items()}
    run = Run(cfg, run_dir=run_dir, progress=progress, explicit=explicit, display=display,
              loggers=loggers)
    run.setup(scenario)
    done = scenario.task_names[: meta["completed_tasks"]]
    changed = data_changes(meta.get("trained_data_sha256") or {}, run.data_listing(), done)
    if changed and not allow_protocol_change:
        raise UserError(
            f"--resume {run_dir}: the data of already trained task(s) "
            f"{', '.join(c['task'] for c in changed)} changed since they were trained (file names "
            "or sizes differ from the record in the checkpoint). Restore the data, start a new "
            "run, or pass --allow-protocol-change to continue (both hashes are recorded per task "
            "in data_manifest.json)")
    run.restore(meta, tensors)
    if adapters:
        from lorax_cil.models.peft_adapter import extractor_state_from_peft

        added = {t.name for t in scenario.tasks[meta["completed_tasks"]:]}
        for task, folder in adapters.items():
            if task not in added:
                raise ValueError(f"--adapter {task}={folder}: {task!r} is not a task added by "
                                 f"this resume (added: {sorted(added) or 'none'})")
            extractor_state_from_peft(run.net, folder)  # refuses a mismatch before training
        run.initial_adapters = {str(k): str(v) for k, v in adapters.items()}
    if changes:
        run.history["protocol_changes"].append({"after_task": meta["completed_tasks"],
                                                "changes": changes})
        logger.warning("protocol changed on resume: %s", format_changes(changes))
    for c in changed:
        run.history["data_changes"].append({**c, "after_task": meta["completed_tasks"]})
        logger.warning("the data of task %s changed since it was trained", c["task"])
    logger.info("resumed %s after %d task(s) from %s", run_dir, run.completed, folder)
    return run
