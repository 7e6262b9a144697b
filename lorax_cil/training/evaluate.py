"""Loading a trained run and evaluating it on a scenario (`lorax-cil eval`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["load_trained", "evaluate_run"]


def load_trained(run_or_checkpoint: str | Path, *, device: str = "cpu") -> tuple[Any, Any, Any, dict]:
    """``(net, cfg, scenario, meta)`` from a run directory or one checkpoint folder."""
    from lorax_cil.benchmarks.scenarios import Scenario
    from lorax_cil.plugins import load_plugins
    from lorax_cil.training.checkpoint import latest_checkpoint, load_checkpoint
    from lorax_cil.training.config import saved_run_config
    from lorax_cil.training.integrity import validate_run_meta
    from lorax_cil.training.registry import apply_preset
    from lorax_cil.training.runner import build_backbone, build_network

    path = Path(run_or_checkpoint)
    folder = path if (path / "meta.json").is_file() else latest_checkpoint(path)
    tensors, meta = load_checkpoint(folder)
    validate_run_meta(meta, folder)
    cfg = saved_run_config(meta["config"], source=str(folder / "meta.json"))
    load_plugins(cfg.plugins, needed_by=f"run {path}")  # what registered its strategy, backbone
    cfg = apply_preset(cfg)
    net = build_network(cfg, build_backbone(cfg))
    for n in meta["architecture"]["task_classes"]:
        net.add_task(n)
    net.load_learned_state_dict(tensors)
    net.to(device).eval()
    return net, cfg, Scenario.from_dict(meta["scenario"]), meta


def evaluate_run(
    run: str | Path,
    *,
    scenario: str | None = None,
    data_path: str | None = None,
    tasks: Sequence[str] | None = None,
    eval_split: str | None = None,
    out: str | Path | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Per-task accuracies and AP of a trained run on a scenario's evaluation split.

    Tasks are matched to the trained ones by name. A task the run never trained on has no
    attribution class of its own: its multi-real and strict accuracies are NaN and only binary
    accuracy (real vs any fake class) and AP are reported.
    """
    import torch

    from lorax_cil.benchmarks.scenarios import resolve_scenario
    from lorax_cil.benchmarks.streams import build_cil_benchmark
    from lorax_cil.benchmarks.transforms import TransformConfig
    from lorax_cil.evaluation.metrics import (
        accuracy,
        average_precision,
        evaluate_predictions,
        fakeness_score,
    )
    from lorax_cil.training.runner import predict_dataset
    from lorax_cil.utils import write_json

    net, cfg, trained, _ = load_trained(run, device=device)
    if scenario is None and (data_path is not None or tasks):
        # The run's own tasks, read from the folder given: never silently its original data.
        scenario = trained.name
        if trained.name == "custom" and not tasks:
            tasks = list(trained.task_names)
        if data_path is None and trained.name != "custom":
            raise ValueError("--tasks needs --scenario custom")
    sc = trained if scenario is None else resolve_scenario(scenario, data_path=data_path,
                                                           tasks=tasks)
    spec = net.backbone.spec
    tcfg = TransformConfig.for_backbone(spec, cfg.data, augment=False)
    split = eval_split or cfg.data.eval_split
    bench = build_cil_benchmark(sc, transform_config=tcfg, eval_split=split)
    table = np.array(trained.class_is_fake[: net.num_classes])
    # only the tasks the network has classes for: a partial run (--stop-after, interrupted)
    # treats the rest of its scenario as tasks it never trained on
    known = {name: i for i, name in enumerate(trained.task_names[: net.num_classes // 2])}
    per_task: dict[str, dict[str, float]] = {}
    for t, name in enumerate(sc.task_names):
        pred, probs, labels = predict_dataset(net, bench.test_stream[t].dataset,
                                              batch_size=cfg.train.eval_batch_size,
                                              device=torch.device(device))
        is_fake = np.array([s.is_fake for s in bench.samples["test"][t]], dtype=np.int64)
        # files that failed to decode were replaced by another image at load time: not counted
        keep = np.array([s.path not in bench.issues.substituted_files
                         for s in bench.samples["test"][t]], dtype=bool)
        pred, probs, labels, is_fake = pred[keep], probs[keep], labels[keep], is_fake[keep]
        if name in known:
            mapped = 2 * known[name] + is_fake
            per_task[name] = evaluate_predictions(pred, mapped, probs, np.zeros_like(mapped),
                                                  table[mapped], table)[0]
        else:
            fake_pred = table[pred]
            per_task[name] = {
                "multi_real": float("nan"), "strict": float("nan"),
                "binary": accuracy(fake_pred == is_fake.astype(bool)),
                "ap": average_precision(fakeness_score(probs, table), is_fake),
                "n": int(labels.size),
            }
    result = {
        "run": str(run),
        "scenario": sc.name,
        "eval_split": split,
        "per_task": per_task,
        "completed_tasks": net.num_classes // 2,
        "data_path": None if data_path is None else str(data_path),
        # unreadable files were skipped and files that failed to decode left out of every n
        "data_issues": bench.issues.summary(),
        "mean_multi_real": float(np.nanmean([r["multi_real"] for r in per_task.values()]))
        if any(not np.isnan(r["multi_real"]) for r in per_task.values()) else float("nan"),
    }
    if out:
        write_json(out, result)
    return result
