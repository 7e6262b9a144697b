"""Comparing strategies under one protocol: runs, reuse/resume, one table, two figures.

:func:`run_comparison` runs every (strategy, seed) through :class:`~lorax_cil.training.runner.Run`
into ``<out>/<strategy>/seed<k>/``; everything but the strategy and the seed comes from one
configuration (scenario, class order, backbone, memory budget, transforms, epochs, optimiser),
and each strategy's preset then applies its own forced values (e.g. no memory for ``finetune``).

Re-running is cheap and safe: a finished run (``summary.json`` with every task) is reused, a
partial one resumes from its last checkpoint (strategies that cannot resume start again), and a
run directory made with a different configuration is an error that names the differing keys.

Outputs in ``<out>/``::

    runs.csv            one row per (strategy, seed): every table metric and the run's status
    comparison.csv      mean and standard deviation over seeds (``<metric>_mean/_std``)
    comparison.md       the table as "mean ± std" cells, with its caption and column notes
    comparison.json     caption, protocol and table records
    average_accuracy.png, matrices.png   seed-mean multi-real curves and final matrices

Under ``torchrun`` every process trains each run together (strategies of the LoRAX family
only); rank 0 decides whether a run is reused or resumed, reads the finished runs, times
inference and writes the outputs; the other processes return ``None``.

Inference milliseconds per image are measured in this process, on the final checkpoint of each
run, on the same evaluation images for every strategy, after one warm-up batch (fastest of three
timed passes).
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lorax_cil.training.config import RunConfig, merge_config
from lorax_cil.training.lock import LOCK_NAME
from lorax_cil.utils import flatten_dict

__all__ = ["TABLE_METRICS", "Comparison", "run_comparison", "config_differences", "preset_changes",
           "aggregate_runs", "markdown_table", "comparison_caption"]

logger = logging.getLogger(__name__)

#: key, column label, scale, format: the table's metrics in order.
TABLE_METRICS: tuple[tuple[str, str, float, str], ...] = (
    ("aa", "AA (multi-real %)", 100.0, ".2f"),
    ("step_avg", "step-avg acc %", 100.0, ".2f"),
    ("bwt", "BWT %", 100.0, ".2f"),
    ("forgetting", "forgetting %", 100.0, ".2f"),
    ("binary", "final binary acc %", 100.0, ".2f"),
    ("strict", "final strict acc %", 100.0, ".2f"),
    # runs that read by class means (train.readout ncm*) read with their linear head
    ("head_aa", "AA, linear head %", 100.0, ".2f"),
    ("head_bwt", "BWT, linear head %", 100.0, ".2f"),
    ("trainable_params", "trainable params/task", 1.0, ",.0f"),
    ("stored_params", "total stored params", 1.0, ",.0f"),
    ("exemplars", "exemplars", 1.0, ".0f"),
    ("train_s", "train s", 1.0, ".1f"),
    ("infer_ms", "inference ms/img", 1.0, ".3f"),
)
#: Config keys that do not change results (ignored when checking a run directory).
RUNTIME_KEYS = ("out", "plugins", "train.device", "train.num_workers")
#: Extractor kinds that read ``model.lora_*`` (LoRA; the task tokens' LoRA of
#: ``class-attention``; the width, scale and dropout of ``side``).
LORA_KEY_KINDS = ("lora", "class-attention", "side")


@dataclass
class Comparison:
    """What :func:`run_comparison` produced (the files are already written).

    Attributes:
        rows: pandas DataFrame, one row per (strategy, seed).
        table: pandas DataFrame, one row per strategy, ``<metric>_mean`` / ``<metric>_std``.
        markdown: the Markdown document: title, caption, table and column notes.
        table_markdown: the Markdown table alone.
        caption: protocol caption shared by the table and the figures.
        matrices: seed-mean multi-real accuracy matrix per strategy.
        paths: output files by name.
    """

    rows: Any
    table: Any
    markdown: str
    table_markdown: str
    caption: str
    matrices: dict[str, np.ndarray] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)


def run_comparison(cfg: RunConfig, *, strategies: Sequence[str], seeds: Sequence[int],
                   out: str | Path, scenario: Any = None,
                   progress: Callable[[str], None] | None = None,
                   timing_images: int = 128, display: str = "auto",
                   loggers: Sequence[Any] = ()) -> Comparison | None:
    """Run (or reuse) every strategy for every seed and write the comparison.

    Args:
        cfg: the shared configuration (``train.strategy``, ``train.seed`` and ``out`` are
            replaced per run).
        strategies: registry names, in table order.
        seeds: seeds, each one run per strategy.
        out: output folder.
        scenario: the resolved scenario (default: resolved from ``cfg.data``).
        progress: callback for progress lines.
        timing_images: evaluation images used for the inference timing.
        display: per-epoch progress of every run (``auto``, ``bar``, ``lines``, ``off``; see
            :class:`~lorax_cil.training.progress.EpochProgress`).
        loggers: experiment loggers of every run (:mod:`lorax_cil.training.loggers`); a given
            folder gets one sub-folder per run, ``<DIR>/<strategy>/seed<k>``.

    Raises:
        ValueError: unknown strategy, no seed, a strategy that cannot run on the backbone, or a
            run directory made with another configuration.
    """
    from lorax_cil import distributed as dist
    from lorax_cil.benchmarks.scenarios import resolve_scenario
    from lorax_cil.plugins import load_plugins

    cfg = merge_config(cfg, {"plugins": load_plugins(cfg.plugins)}, source="compare")
    say = progress or (lambda msg: logger.info("%s", msg))
    if not dist.is_main():
        say = lambda msg: logger.debug("%s", msg)  # noqa: E731
    strategies, seeds = _check_lists(strategies, seeds)
    if dist.is_distributed():
        _check_distributed(strategies)
    cfg = _absolute_data_path(cfg)
    if scenario is None:
        d = cfg.data
        scenario = resolve_scenario(d.scenario, data_path=d.data_path, tasks=d.tasks)
    backbone = _preflight(cfg, strategies)
    for s in strategies:
        for note in preset_changes(cfg, s):
            say(note)
    out = Path(out)
    main = dist.is_main()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    images = _timing_images(cfg, backbone, scenario, timing_images) if main else None
    rows, matrices = [], {}
    for s in strategies:
        for k in seeds:
            run_cfg = merge_config(cfg, {"train": {"strategy": s, "seed": int(k)},
                                         "out": str(out / s / f"seed{k}")}, source="compare")
            status = obtain_run(run_cfg, Path(run_cfg.out), scenario, say, display=display,
                                loggers=_per_run_loggers(loggers, s, k))
            if not main:
                continue
            row, R = _collect(run_cfg, Path(run_cfg.out), images)
            row["status"] = status
            rows.append(row)
            matrices.setdefault(s, []).append(R)
            say(f"{s} seed {k}: {status}; AA {100 * row['aa']:.2f}%, "
                f"{row['infer_ms']:.3f} ms/img")
    result = _write_outputs(cfg, scenario, strategies, seeds, rows, matrices, out) if main else None
    dist.barrier()
    return result


def _per_run_loggers(loggers: Sequence[Any], strategy: str, seed: int) -> list[Any]:
    """``tensorboard:DIR`` -> ``tensorboard:DIR/<strategy>/seed<k>`` (W&B projects stay)."""
    from lorax_cil.training.loggers import LoggerSpec, parse_logger_spec

    out = []
    for spec in loggers:
        spec = spec if isinstance(spec, LoggerSpec) else parse_logger_spec(spec)
        if spec.target and spec.kind != "wandb":
            spec = LoggerSpec(spec.kind, str(Path(spec.target) / strategy / f"seed{seed}"))
        out.append(spec)
    return out


def preset_changes(cfg: RunConfig, strategy: str) -> list[str]:
    """One line per shared setting that ``strategy``'s preset fixes to another value (e.g. no
    memory for ``finetune``): a comparison shares one protocol, and a strategy that by
    definition differs from it says so instead of changing silently."""
    from lorax_cil.training.registry import apply_preset

    shared = merge_config(cfg, {"train": {"strategy": strategy}}, source="compare")
    fixed = apply_preset(shared)
    out = []
    for section in ("model", "train"):
        a, b = getattr(shared, section), getattr(fixed, section)
        for key in a.__dataclass_fields__:
            if getattr(a, key) == getattr(b, key):
                continue
            if getattr(a, key) is None:
                out.append(f"{strategy}: {section}.{key}={getattr(b, key)!r} (the strategy's "
                           "default; the shared configuration leaves it unset)")
            else:
                out.append(f"{strategy}: {section}.{key}={getattr(b, key)!r} (fixed by the "
                           f"strategy; the shared value {getattr(a, key)!r} does not apply)")
    return out


def _check_distributed(strategies: Sequence[str]) -> None:
    """Refuse, before any training, strategies that cannot train with several processes."""
    from lorax_cil.training.builtin_strategies import lorax_family_strategies
    from lorax_cil.training.registry import get_strategy

    family = lorax_family_strategies()
    bad = [s for s in strategies if get_strategy(s).name not in family]
    if bad:
        raise ValueError(f"strategies {bad} cannot train with several processes (torchrun); "
                         f"distributed comparisons cover {', '.join(family)}: run the others "
                         "with one process (finished runs are reused when the comparison is run "
                         "again)")


# --- runs -------------------------------------------------------------------------------------
def _check_lists(strategies: Sequence[str], seeds: Sequence[int]) -> tuple[list[str], list[int]]:
    from lorax_cil.training.registry import get_strategy

    names = [s.strip() for s in strategies if s and s.strip()]
    if not names:
        raise ValueError("compare needs at least one strategy")
    if len(set(names)) != len(names):
        raise ValueError(f"strategies repeat: {names}")
    for s in names:
        get_strategy(s)  # unknown names raise, listing the valid ones
    seeds = [int(k) for k in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"compare needs distinct seeds, got {seeds}")
    return names, seeds


def _absolute_data_path(cfg: RunConfig) -> RunConfig:
    if not cfg.data.data_path:
        return cfg
    return merge_config(cfg, {"data": {"data_path": str(Path(cfg.data.data_path).resolve())}},
                        source="compare")


def _preflight(cfg: RunConfig, strategies: Sequence[str]) -> Any:
    """The shared backbone; refuse strategy/backbone/setting combinations that cannot work."""
    from lorax_cil.training.baselines import check_compatible
    from lorax_cil.training.registry import apply_preset
    from lorax_cil.training.runner import build_backbone

    backbone = build_backbone(cfg)
    for s in strategies:
        check_compatible(apply_preset(merge_config(cfg, {"train": {"strategy": s}},
                                                   source="compare")), backbone)
    return backbone


def obtain_run(cfg: RunConfig, run_dir: Path, scenario: Any,
               say: Callable[[str], None], display: str = "auto",
               loggers: Sequence[Any] = ()) -> str:
    """Reuse, resume or train the run in ``run_dir``.

    Returns:
        ``reused`` (finished), ``resumed`` (from its last checkpoint), ``restarted`` (partial, but
        the strategy cannot resume) or ``trained``.

    Raises:
        ValueError: ``run_dir`` holds a run made with a different configuration, or files that
            are not a run.
    """
    from lorax_cil import distributed as dist
    from lorax_cil.training.registry import apply_preset, get_strategy
    from lorax_cil.training.runner import Run, resume_run

    # rank 0 reads the run directory and decides; every rank follows (no shared disk needed)
    state = dist.on_main(lambda: _run_state(run_dir, apply_preset(cfg), scenario))
    if state == "finished":
        from lorax_cil.training.integrity import check_finished_run_data

        dist.on_main(lambda: check_finished_run_data(run_dir, apply_preset(cfg), scenario))
        return "reused"

    def progress(m: str) -> None:
        say(f"{cfg.train.strategy} seed {cfg.train.seed}: {m}")

    if state == "partial":
        if get_strategy(cfg.train.strategy).resumable:
            say(f"{cfg.train.strategy} seed {cfg.train.seed}: resuming {run_dir}")
            runtime = {"train": {"device": cfg.train.device, "num_workers": cfg.train.num_workers}}
            resume_run(run_dir, overrides=runtime, progress=progress, display=display,
                       loggers=loggers).train()
            return "resumed"
        say(f"{cfg.train.strategy} cannot resume: training {run_dir} again from the start")
        if dist.is_main():
            shutil.rmtree(run_dir)
        dist.barrier()
    run = Run(cfg, run_dir=run_dir, progress=progress, display=display, loggers=loggers)
    run.setup(scenario)
    run.train()
    return "trained" if state == "empty" else "restarted"


def _run_state(run_dir: Path, cfg: RunConfig, scenario: Any) -> str:
    """``finished``, ``partial`` (has a checkpoint) or ``empty``; checks the configuration."""
    import yaml

    # a lock file alone is what a run killed right after it started leaves behind
    if not run_dir.exists() or not any(p.name != LOCK_NAME for p in run_dir.iterdir()):
        return "empty"
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ValueError(f"{run_dir} is not empty and holds no run (no config.yaml): "
                         "choose another --out")
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    diffs = config_differences(saved, cfg.to_dict())
    if diffs:
        raise ValueError(f"{run_dir} was made with another configuration ({'; '.join(diffs[:6])}"
                         f"): choose another --out, or delete that run to train it again")
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        if (summary.get("completed_tasks") == scenario.num_tasks
                and summary.get("task_order") == list(scenario.task_names)):
            return "finished"
    has_ckpt = (run_dir / "checkpoints").is_dir() and any(
        (p / "meta.json").is_file() for p in (run_dir / "checkpoints").glob("exp_*"))
    return "partial" if has_ckpt else "empty"


def config_differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``"section.key: run has A, requested B"`` for every result-relevant difference.

    Both sides are normalised through :class:`RunConfig` (missing keys take their defaults).
    Ignored: :data:`RUNTIME_KEYS`, ``baselines.<name>_*`` keys of other strategies than the
    requested one, and ``model.lora_*`` keys when the requested extractor does not read them
    (:data:`LORA_KEY_KINDS`).
    """
    from lorax_cil.training.registry import list_strategies

    a = flatten_dict(RunConfig.from_dict(saved, source="run config").to_dict())
    b = flatten_dict(RunConfig.from_dict(wanted, source="requested config").to_dict())
    own = str(b.get("train.strategy", "")).replace("-", "")
    others = {s.replace("-", "") for s in list_strategies()} - {own}

    def relevant(key: str) -> bool:
        if key in RUNTIME_KEYS:
            return False
        if key.startswith("baselines."):
            return key.split(".", 1)[1].split("_", 1)[0] not in others
        return not (key.startswith("model.lora_") and b.get("model.extractor") not in LORA_KEY_KINDS)

    keys = [k for k in dict.fromkeys([*a, *b]) if relevant(k)]
    return [f"{k}: run has {a.get(k)!r}, requested {b.get(k)!r}" for k in keys
            if a.get(k) != b.get(k)]


# --- per-run numbers --------------------------------------------------------------------------
def _timing_images(cfg: RunConfig, backbone: Any, scenario: Any, limit: int):
    from lorax_cil.benchmarks.streams import build_cil_benchmark
    from lorax_cil.benchmarks.transforms import TransformConfig
    from lorax_cil.training.timing import evaluation_images

    spec, d = backbone.spec, cfg.data
    tcfg = TransformConfig.for_backbone(spec, d, augment=False)
    bench = build_cil_benchmark(scenario, transform_config=tcfg, eval_split=d.eval_split,
                                strict=d.strict_data)
    return evaluation_images(bench.test_stream, limit=limit)


def _collect(cfg: RunConfig, run_dir: Path, images: Any) -> tuple[dict[str, Any], np.ndarray]:
    """The table numbers of one finished run, read from its files and its final checkpoint."""
    from lorax_cil.evaluation.metrics import AccuracyMatrix
    from lorax_cil.training.evaluate import load_trained
    from lorax_cil.training.runner import resolve_device
    from lorax_cil.training.timing import inference_ms_per_image

    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    steps = [json.loads(line) for line in
             (run_dir / "steps.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    R = AccuracyMatrix.from_csv(run_dir / "accuracy_multi_real.csv").matrix
    params = summary.get("parameters", {})
    head = summary.get("head_readout") or {}  # n/a: a run that reads with its head, or a baseline
    device = resolve_device(cfg.train.device)
    net = load_trained(run_dir, device=str(device))[0]
    ms = inference_ms_per_image(net, images, batch_size=cfg.train.eval_batch_size, device=device)
    row = {
        "strategy": cfg.train.strategy, "seed": cfg.train.seed,
        "aa": summary["multi_real_aa"],
        "step_avg": summary["multi_real_step_average_accuracy"],
        "bwt": summary["multi_real_bwt"], "forgetting": summary["multi_real_forgetting"],
        "binary": summary["binary_aa"],
        "strict": summary.get("strict_aa"),  # absent: n/a (a summary written before it existed)
        "head_aa": head.get("multi_real_aa"), "head_bwt": head.get("multi_real_bwt"),
        "trainable_params": params.get("trainable", float("nan")),
        "stored_params": params.get("total_stored", float("nan")),
        "exemplars": sum(int(v) for v in steps[-1]["memory_per_class"].values()),
        "train_s": summary["train_seconds"], "infer_ms": ms,
        "memory_size": summary["memory_size"],
    }
    return {k: _float_or_nan(v) if k not in ("strategy", "seed") else v
            for k, v in row.items()}, R


def _float_or_nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


# --- table, caption, figures ------------------------------------------------------------------
def aggregate_runs(rows: Any, strategies: Sequence[str]):
    """Mean and sample std over seeds per strategy (table order = ``strategies``)."""
    from lorax_cil.evaluation.reports import aggregate_seeds

    agg = aggregate_seeds(rows, "strategy", metrics=[m[0] for m in TABLE_METRICS])
    agg = agg.set_index("strategy").loc[list(strategies)].reset_index()
    return agg.rename(columns={"n": "seeds"})


def markdown_table(agg: Any) -> str:
    """``mean ± std`` cells (std omitted for one seed), one row per strategy."""
    import pandas as pd

    from lorax_cil.evaluation.reports import to_markdown

    cells: dict[str, list[str]] = {"seeds": [str(int(n)) for n in agg["seeds"]]}
    for key, label, scale, fmt in TABLE_METRICS:
        column = []
        for mean, std in zip(agg[f"{key}_mean"], agg[f"{key}_std"]):
            text = "n/a" if np.isnan(mean) else format(mean * scale, fmt)
            if not np.isnan(mean) and not np.isnan(std):
                text += f" ± {format(std * scale, fmt)}"
            column.append(text)
        cells[label] = column
    df = pd.DataFrame(cells, index=pd.Index(list(agg["strategy"]), name="strategy"))
    return to_markdown(df)


def comparison_caption(cfg: RunConfig, scenario: Any, seeds: Sequence[int],
                       rows: Any = None) -> str:
    """Memory budget, backbone, task order, eval split, epochs and seeds of a comparison."""
    m, t = cfg.model, cfg.train
    weights = (f"local weights {m.weights}" if m.weights else
               "pretrained" if m.pretrained not in (False, None) else "random init")
    budget = f"memory budget {t.memory_size} exemplars"
    if rows is not None:
        free = sorted({r for r, v in zip(rows["strategy"], rows["memory_size"]) if v == 0})
        if free:
            budget += f" (exemplar-free: {', '.join(free)})"
    order = " → ".join(scenario.task_names)
    return (f"{scenario.name}, {scenario.num_tasks} tasks in order {order}; backbone "
            f"{m.backbone} ({weights}); {budget}; eval split {cfg.data.eval_split}; "
            f"{t.epochs} epoch(s)/task, batch {t.batch_size}; seeds "
            f"{', '.join(str(k) for k in seeds)}")


def _mean_matrix(mats: Sequence[np.ndarray]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells stay NaN
        return np.nanmean(np.stack(mats), axis=0)


def _write_outputs(cfg: RunConfig, scenario: Any, strategies: Sequence[str],
                   seeds: Sequence[int], rows: list[dict], matrices: dict, out: Path
                   ) -> Comparison:
    import pandas as pd

    from lorax_cil.evaluation.plots import plot_average_accuracy_curves, plot_matrices_side_by_side
    from lorax_cil.utils import atomic_write_text, write_json

    df = pd.DataFrame(rows)
    agg = aggregate_runs(df, strategies)
    caption = comparison_caption(cfg, scenario, seeds, df)
    table = markdown_table(agg)
    mean_R = {s: _mean_matrix(matrices[s]) for s in strategies}
    paths = {"runs.csv": out / "runs.csv", "comparison.csv": out / "comparison.csv",
             "comparison.md": out / "comparison.md", "comparison.json": out / "comparison.json"}
    atomic_write_text(paths["runs.csv"], df.to_csv(index=False))
    atomic_write_text(paths["comparison.csv"], agg.to_csv(index=False))
    markdown = (f"# Strategy comparison\n\n{caption}; cells: mean ± std over seeds.\n\n"
                f"{table}\n{_NOTES}")
    atomic_write_text(paths["comparison.md"], markdown)
    write_json(paths["comparison.json"], {
        "caption": caption, "strategies": list(strategies), "seeds": list(seeds),
        "scenario": scenario.name, "task_order": list(scenario.task_names),
        "table": json.loads(agg.to_json(orient="records")),
        "runs": json.loads(df.to_json(orient="records")),
    })
    names = scenario.task_names
    paths["average_accuracy.png"] = plot_average_accuracy_curves(
        mean_R, out / "average_accuracy.png", names=names, caption=f"{caption}; mean over seeds",
        title="average multi-real accuracy over seen tasks (mean over seeds)")
    paths["matrices.png"] = plot_matrices_side_by_side(
        mean_R, out / "matrices.png", names=names, caption=f"{caption}; mean over seeds",
        title="final multi-real accuracy matrices (mean over seeds)")
    return Comparison(rows=df, table=agg, markdown=markdown, table_markdown=table,
                      caption=caption, matrices=mean_R, paths=paths)


_NOTES = """Columns (docs/metrics.md, docs/baselines.md): AA = mean multi-real accuracy over every
task after the last one; step-avg = mean over steps of the average accuracy on the tasks seen so
far; BWT (Lopez-Paz) and forgetting (Chaudhry) from the multi-real matrix (n/a for `joint`, which is
evaluated after the last task only); final binary acc = real-vs-fake accuracy averaged over tasks
after the last one; final strict acc = the same for the exact class (generator and real/fake);
trainable params/task = parameters updated while training the last task (extractor + heads);
total stored params = everything the final model keeps (frozen backbone included, exemplar
images excluded); exemplars = images in memory at the end; train s = training wall time summed
over tasks; inference ms/img = final model, this process, same evaluation images for every
strategy, after a warm-up batch, fastest of three passes.
"""
