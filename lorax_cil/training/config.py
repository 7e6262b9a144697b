"""Typed run configuration, loaded from YAML with unknown-key errors.

Precedence: command line > config file > strategy presets > dataclass defaults. A key set on the
command line or in the config file is never replaced by a preset: a strategy that fixes the key
to another value stops the run instead (:func:`~lorax_cil.training.registry.apply_preset`). The
resolved configuration is saved with every run (``config.yaml``), so a run can always be
reproduced.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

__all__ = ["DataConfig", "ModelConfig", "TrainConfig", "BaselineConfig", "RunConfig", "load_config",
           "merge_config"]


@dataclass
class DataConfig:
    """Which data, in which order, and how images are pre-processed.

    Attributes:
        scenario: named scenario (``cddb-easy``, ``synth-easy``, ``custom``, ...).
        data_path: folder holding one sub-folder per task.
        tasks: task names or ``name=path`` pairs for ``custom``.
        eval_split: split folder of the evaluation stream (``val`` as in the papers).
        calib_fraction: fraction of each train class held out as a calibration stream.
        strict_data: raise on unreadable images instead of skipping them.
        crop: crop size; ``None`` = the backbone's input size.
        resize: resize the shorter side to this before cropping (``None``: only upsizing of
            images smaller than the crop).
        blur_prob: train-time Gaussian blur probability.
        jpeg_prob: train-time JPEG re-compression probability.
        hflip: train-time horizontal flips.
    """

    scenario: str = "synth-easy"
    data_path: str | None = None
    tasks: list[str] | None = None
    eval_split: str = "val"
    calib_fraction: float = 0.0
    strict_data: bool = False
    crop: int | None = None
    resize: int | None = None
    blur_prob: float = 0.0
    jpeg_prob: float = 0.0
    hflip: bool = False


@dataclass
class ModelConfig:
    """Backbone and per-task extractors.

    Attributes:
        backbone: registry name (``convit_base``, ``efficientnet-lite0``, ``ViT-B-16``, ...).
        pretrained: ``True``, ``False`` or a weights tag.
        weights: local weights file (``.safetensors`` or ``.pth``, loaded without unpickling).
        img_size: input resolution override.
        extractor: ``lora``, ``full``, ``finetune`` or ``frozen``.
        adapt_blocks: extractors start at block ``L - adapt_blocks`` (``None``: all blocks).
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha (scaling = alpha / r). ``None``: the extractor kind's default,
            filled in by the strategy preset (:func:`~lorax_cil.training.registry.apply_preset`):
            16 for the LoRA-based kinds (the official value), the width for ``side`` (scale 1).
        lora_dropout: LoRA dropout. ``None``: the kind's default, 0.1 for the LoRA-based kinds
            (official), 0 for ``side``.
        lora_targets: preset name, regex, or ``auto`` (the backbone family's default preset).
        divergence_head: auxiliary divergence head on the newest extractor.
        side_width: width of every task's side network for ``lorax-distill`` (its students,
            scale 1); ``None``: the strategy's default (64). Refused by other strategies.
        channels_last: store the convolution weights of a CNN backbone channels-last (NHWC),
            so that its convolutions and activations run in that layout: faster on CPU
            (benchmarks/cnn_layouts.py, docs/backbones.md); the same results up to float
            rounding, so not bit-identical to a run without it. Refused on a ViT backbone.
    """

    backbone: str = "efficientnet-lite0"
    pretrained: bool | str = True
    weights: str | None = None
    img_size: int | None = None
    extractor: str = "lora"
    adapt_blocks: int | None = None
    lora_r: int = 64
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    lora_targets: str = "auto"
    divergence_head: bool = True
    side_width: int | None = None
    channels_last: bool = False


@dataclass
class TrainConfig:
    """Optimisation, memory and run-time options (defaults: the official LoRAX ones, except
    ``min_steps_per_task``, which keeps small tasks from being starved of optimizer steps).

    Attributes:
        strategy: registry name (``lorax``, ``lorax-deep``, ``lorax-ca``, ``lorax-mole``,
            ``finetune``, ``finetune-replay`` and the baselines of docs/baselines.md).
        epochs: epochs per task.
        batch_size: training batch size: the global batch of one optimisation step (under
            torchrun each of N processes takes ``batch_size / N`` of it).
        eval_batch_size: evaluation batch size.
        lr_first: learning rate of task 0.
        lr: learning rate of later tasks.
        lr_scaling: ``none`` (rates used as given) or ``linear512`` (rates x batch / 512, the
            official code's convention, with the global batch).
        weight_decay: AdamW weight decay.
        warmup_epochs: warm-up epochs per task.
        min_steps_per_task: a task whose ``epochs`` give fewer optimizer steps than this trains
            more epochs, until it reaches this many steps (``0``: epochs as given, the official
            protocol). Large tasks (CDDB: hundreds of steps per epoch) are unaffected; a
            28-image task at batch 32 gets this many steps instead of ``epochs``. The derived
            epochs are logged and written to ``steps.jsonl`` (see docs/fewshot.md).
        warmup_steps: warm-up in optimizer steps (rounded up to whole epochs); ``None``: the
            warm-up is ``warmup_epochs``, scaled by the same factor when the epochs are raised.
        warmup_lr: learning rate at the start of the warm-up.
        min_lr: end of the cosine schedule.
        head_div: divergence-loss weight.
        memory_size: total exemplar budget.
        seed: seed of everything (data order, initialisation, herding ties).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        num_workers: data-loader workers.
        amp: bfloat16 autocast on CUDA (``auto``, ``true`` or ``false``).
        checkpoint_every_task: write a checkpoint after every task.
        head_init: new head rows start ``random`` (official) or as ``prototype`` (normalised
            class means of the new task's features); see docs/fewshot.md.
        head_wa: weight aligning (WA) of the new classes' head rows after each task.
        head_balanced_steps: steps of class-balanced fine-tuning of the head alone after each
            task, on the memory plus an equal-size sample of each new class (EEIL); 0: off;
            ``None``: the strategy's default (see ``readout``).
        head_balanced_lr: learning rate of that fine-tuning.
        head_balanced_loss: weight the training loss of every class by the inverse of its
            share of the task's training set (new images + exemplars), so that the few
            exemplars of each old class weigh as much as a new class (class-balanced
            cross-entropy); ``None``: the strategy's default.
        readout: ``head`` (the linear head), ``ncm`` (cosine to class means of the
            concatenated features, kept after each task), ``ncm-frozen`` (each class's
            mean on the feature blocks of its own time, never updated) or ``ncm-relative``
            (``ncm-frozen`` with each block's cosine minus the block's baseline similarity,
            frozen as well; an option, docs/fewshot.md) for evaluation and prediction;
            ``None``: the strategy's default: for ``lorax``, ``lorax-deep``, ``lorax-mole``
            and ``lorax-side`` ``ncm-frozen`` on a CNN backbone and ``head`` (with
            ``head_balanced_steps`` 100) on a ViT (chosen by ``benchmarks/fewshot.py``, see
            docs/fewshot.md), ``head`` otherwise. ``head`` with ``head_balanced_steps`` 0
            reproduces the official LoRAX.
            With a class-mean read-out the run records the linear head's matrices too
            (``accuracy_<metric>-head.csv``, ``summary.json`` ``head_readout``).
        distill_epochs: ``lorax-distill``: epochs of distillation of each task's LoRA teacher
            into its side network, over the task's images and the memory (at least
            ``min_steps_per_task`` optimizer steps); ``None``: the strategy's default (30).
        distill_lr: ``lorax-distill``: learning rate of that distillation (cosine to 0);
            ``None``: the strategy's default (3e-3).
        cache_trunk: compute the frozen trunk once per training image and task and train every
            epoch from the cached outputs (LoRAX family; refused when the training transform
            is random). Memory: one trunk output per training image.
    """

    strategy: str = "lorax"
    epochs: int = 50
    batch_size: int = 32
    eval_batch_size: int = 64
    lr_first: float = 1e-4
    lr: float = 5e-4
    lr_scaling: str = "none"
    weight_decay: float = 1e-6
    warmup_epochs: int = 5
    min_steps_per_task: int = 200
    warmup_steps: int | None = None
    warmup_lr: float = 1e-4
    min_lr: float = 1e-5
    head_div: float = 0.1
    memory_size: int = 500
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    amp: str = "auto"
    checkpoint_every_task: bool = True
    head_init: str = "random"
    head_wa: bool = False
    head_balanced_steps: int | None = None
    head_balanced_lr: float = 1e-4
    head_balanced_loss: bool | None = None
    readout: str | None = None
    distill_epochs: int | None = None
    distill_lr: float | None = None
    cache_trunk: bool = False


@dataclass
class BaselineConfig:
    """Hyperparameters that only one baseline strategy reads (see docs/baselines.md).

    Attributes:
        ewc_lambda: ``ewc``: weight of the EWC penalty (Avalanche ``EWC(ewc_lambda=...)``).
        ewc_mode: ``ewc``: ``separate`` (one penalty per past task) or ``online``.
        ewc_decay: ``ewc`` with ``online`` mode: importance decay factor.
        lwf_alpha: ``lwf``: weight of the distillation loss.
        lwf_temperature: ``lwf``: distillation temperature.
        l2p_pool_size: ``l2p``: prompts in the pool (paper: 10).
        l2p_prompt_length: ``l2p``: tokens per prompt (paper: 5).
        l2p_top_k: ``l2p``: prompts chosen per image (paper: 5).
        l2p_sim_coefficient: ``l2p``: weight of the key-query matching loss (paper: 0.1).
        simplecil_scale: ``simplecil``: scale of the cosine logits (no effect on predictions).
        joint_epochs: ``joint``: epochs of its single training on every task's data (``None``:
            ``train.epochs``). Joint training is the upper bound of a comparison only when it
            is trained to convergence, which on the union of T tasks can take more epochs
            than one task does.
    """

    ewc_lambda: float = 1000.0
    ewc_mode: str = "separate"
    ewc_decay: float | None = None
    lwf_alpha: float = 1.0
    lwf_temperature: float = 2.0
    l2p_pool_size: int = 10
    l2p_prompt_length: int = 5
    l2p_top_k: int = 5
    l2p_sim_coefficient: float = 0.1
    simplecil_scale: float = 1.0
    joint_epochs: int | None = None


@dataclass
class RunConfig:
    """Everything a run needs. ``out`` is the run directory; ``plugins`` the plugin modules
    (names or ``.py`` paths, see :mod:`lorax_cil.plugins`) that register what it uses."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    out: str = "runs/run"
    plugins: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "config") -> "RunConfig":
        return merge_config(cls(), d, source=source)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig,
             "baselines": BaselineConfig}


#: smallest accepted value of numeric keys (``None`` stays accepted where the key allows it).
MINIMUMS: dict[str, float] = {
    "data.crop": 1, "data.resize": 1, "data.calib_fraction": 0, "data.blur_prob": 0,
    "data.jpeg_prob": 0, "model.img_size": 1, "model.adapt_blocks": 1, "model.lora_r": 1,
    "model.side_width": 1, "model.lora_dropout": 0, "train.distill_epochs": 1, "train.distill_lr": 0,
    "train.epochs": 1, "train.batch_size": 1, "train.eval_batch_size": 1,
    "train.memory_size": 0, "train.seed": 0, "train.num_workers": 0, "train.warmup_epochs": 0,
    "train.min_steps_per_task": 0, "train.warmup_steps": 0, "train.lr": 0, "train.lr_first": 0,
    "baselines.joint_epochs": 1,
}
#: largest accepted value (probabilities and fractions).
MAXIMUMS: dict[str, float] = {"data.calib_fraction": 0.99, "data.blur_prob": 1, "data.jpeg_prob": 1,
                              "model.lora_dropout": 0.99,
                              # sizes that allocate memory: far above any real use, so that a
                              # typo or an edited file cannot ask for terabytes
                              "model.lora_r": 4096, "model.side_width": 4096, "model.img_size": 8192,
                              "data.crop": 8192, "data.resize": 16384, "model.adapt_blocks": 1000}

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _kinds(sections: Mapping[str, type], section: str, key: str) -> set[str]:
    """The type names in the annotation of ``section.key`` (``{"int", "None"}`` for
    ``int | None``; ``{"list"}`` for ``list[str]``)."""
    cls = sections.get(section)
    ann = {f.name: f.type for f in fields(cls)}.get(key) if cls is not None else None
    if not isinstance(ann, str):
        return set()
    return {part.strip().split("[")[0] for part in ann.split("|")}


def typed_coercer(sections: Mapping[str, type], *, minimums: Mapping[str, float] | None = None,
                  maximums: Mapping[str, float] | None = None
                  ) -> Callable[[str, str, Any, Any, str], Any]:
    """The ``coerce`` function of :func:`merge_sections` for config dataclasses ``sections``
    (section name -> dataclass): each value is checked against its field's declared type and
    the ``section.key`` bounds, and converted where exact (``3.0`` -> ``3`` for an integer,
    ``"1e-3"`` -> ``0.001`` for a float). Run and detector configurations share it."""
    low_bounds, high_bounds = dict(minimums or {}), dict(maximums or {})

    def coerce(section: str, key: str, value: Any, current: Any, source: str) -> Any:
        return _check_value(f"{section}.{key}", _kinds(sections, section, key), value, current,
                            source, low_bounds, high_bounds)

    return coerce


def _check_value(name: str, kinds: set[str], value: Any, current: Any, source: str,
                 minimums: Mapping[str, float], maximums: Mapping[str, float]) -> Any:
    if not kinds:  # not a dataclass field with a readable annotation: the old, lenient check
        kinds = {type(current).__name__} if current is not None else set()
    if value is None:
        if "None" in kinds or not kinds:
            return None
        raise ValueError(f"{source}: {name} needs a value (it cannot be empty)")
    if "dict" in kinds:
        if not isinstance(value, Mapping):
            raise ValueError(f"{source}: {name} must be a mapping, got {value!r}")
        return dict(value)
    if "list" in kinds:
        if isinstance(value, (list, tuple)):
            return list(value)
        if "str" not in kinds:
            raise ValueError(f"{source}: {name} must be a list, got {value!r}")
    if "bool" in kinds and isinstance(value, bool):
        return value
    if isinstance(value, bool) and kinds & {"int", "float"}:
        raise ValueError(f"{source}: {name} must be a number, got {value!r}")
    if "int" in kinds:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int):
            return _in_range(name, value, source, minimums, maximums)
        if "str" not in kinds:
            raise ValueError(f"{source}: {name} must be an integer, got {value!r}")
    if "float" in kinds:
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-3 as a string
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(f"{source}: {name} must be a finite number, got {value!r}")
            return _in_range(name, float(value), source, minimums, maximums)
        raise ValueError(f"{source}: {name} must be a number, got {value!r}")
    if "bool" in kinds and "str" not in kinds:
        raise ValueError(f"{source}: {name} must be true or false, got {value!r}")
    if name == "model.pretrained" and _looks_like_file(value):
        raise ValueError(f"{source}: model.pretrained={value!r} names a file; it takes true, false "
                         "or a weights tag of the backbone's library. Give local weights with "
                         "model.weights (--weights: .safetensors, or .pth read without "
                         "unpickling); lorax-cil never loads pickled files, which can run code")
    if name == "train.device" and not (isinstance(value, str) and _DEVICE.fullmatch(value)):
        raise ValueError(f"{source}: train.device (--device) must be auto, cpu, cuda, cuda:N or "
                         f"mps, got {value!r}")
    return value


#: The run configuration's coercer (types of :class:`RunConfig`'s sections, its bounds).
_check_type = typed_coercer(_SECTIONS, minimums=MINIMUMS, maximums=MAXIMUMS)


def _looks_like_file(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    suffixes = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".safetensors", ".npz")
    return ("/" in value or "\\" in value or value.lower().endswith(suffixes)
            or Path(value).expanduser().is_file())


def _in_range(name: str, value: float, source: str, minimums: Mapping[str, float],
              maximums: Mapping[str, float]) -> Any:
    low, high = minimums.get(name), maximums.get(name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (f"between {low:g} and {high:g}" if high is not None else f">= {low:g}")
        raise ValueError(f"{source}: {name} must be {bounds}, got {value!r}")
    return value


def merge_sections(base: Any, updates: Mapping[str, Any], *, sections: Sequence[str], source: str,
                   coerce: Callable[[str, str, Any, Any, str], Any]) -> Any:
    """A copy of the config dataclass ``base`` (dataclass sections plus ``out``) updated by a
    nested mapping; unknown sections or keys raise ValueError naming ``source``.
    ``coerce(section, key, value, current, source)`` checks and converts one value."""
    out = dataclasses.replace(base, **{s: dataclasses.replace(getattr(base, s)) for s in sections})
    for section, values in updates.items():
        if section == "out":
            out.out = str(values)
            continue
        if section == "plugins" and hasattr(out, "plugins"):
            if values is None:
                values = []
            if isinstance(values, str) or not all(isinstance(v, str) for v in values):
                raise ValueError(f"{source}: plugins must be a list of module names or .py paths, "
                                 f"got {values!r}")
            out.plugins = list(values)
            continue
        if section not in sections:
            raise ValueError(
                f"{source}: unknown section {section!r}; valid: {', '.join([*sections, 'out'])}"
            )
        if not isinstance(values, Mapping):
            raise ValueError(f"{source}: section {section!r} must be a mapping")
        obj = getattr(out, section)
        valid = {f.name for f in fields(obj)}
        for key, value in values.items():
            if key not in valid:
                raise ValueError(
                    f"{source}: unknown key {section}.{key}; valid keys: {', '.join(sorted(valid))}"
                )
            setattr(obj, key, coerce(section, key, value, getattr(obj, key), source))
    return out


def merge_config(base: RunConfig, updates: Mapping[str, Any], *, source: str) -> RunConfig:
    """Return ``base`` updated by a nested mapping; unknown sections or keys raise ValueError."""
    return merge_sections(base, updates, sections=tuple(_SECTIONS), source=source,
                          coerce=_check_type)


#: values of ``train.readout`` (lorax_cil.training.head_balance; torch-free for the CLI's --help)
READOUTS = ("head", "ncm", "ncm-frozen", "ncm-relative")
#: read-outs a finished run can be read with afterwards (``lorax-cil eval --rescore``)
RESCORE_READOUTS = ("head", "ncm-frozen", "ncm-relative")

#: ``train`` keys added after runs were first saved, with the behaviour those runs had: a saved
#: configuration without them means these values (see :func:`saved_run_config`).
LEGACY_TRAIN = {"min_steps_per_task": 0, "readout": "head", "head_balanced_steps": 0}


def saved_run_config(d: Mapping[str, Any], *, source: str) -> RunConfig:
    """The :class:`RunConfig` of a saved run (``meta.json`` / ``config.yaml``): keys the run's
    version did not have take the behaviour it had (:data:`LEGACY_TRAIN`), not today's
    defaults."""
    d = dict(d)
    d["train"] = {**LEGACY_TRAIN, **dict(d.get("train") or {})}
    return RunConfig.from_dict(d, source=source)


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a nested dict (validated when merged)."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config file {path} is a folder; give a YAML file")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: invalid YAML: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                             f"offset {exc.start}); save the config file as UTF-8") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections")
    return data
