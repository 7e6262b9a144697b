"""Loading a trained run and evaluating it on a scenario (`lorax-cil eval`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lorax_cil.training.config import RESCORE_READOUTS

__all__ = ["load_trained", "evaluate_run", "readout_matrices", "all_readout_matrices",
           "ncm_frozen_matrices", "class_mean_matrices", "head_matrices", "RESCORE_READOUTS"]


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
    readout: str | None = None,
) -> dict[str, Any]:
    """Per-task accuracies and AP of a trained run on a scenario's evaluation split.

    Tasks are matched to the trained ones by name. A task the run never trained on has no
    attribution class of its own: its multi-real and strict accuracies are NaN and only binary
    accuracy (real vs any fake class) and AP are reported. ``readout``: read the classes this
    way instead of the run's own (:func:`~lorax_cil.models.heads.use_readout`: ``head`` for a
    run that reads by class means).
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
    from lorax_cil.models.heads import current_readout, use_readout
    from lorax_cil.training.runner import predict_dataset
    from lorax_cil.utils import write_json

    net, cfg, trained, _ = load_trained(run, device=device)
    if readout is not None:
        use_readout(net, readout, where=f"run {run}")
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
        keep = np.array(bench.decoded_mask("test", t), dtype=bool)
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
        "readout": current_readout(net),
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


def readout_matrices(run: str | Path, readout: str, *, data_path: str | Path | None = None,
                     device: str = "cpu", recorded: bool = True) -> dict[str, Any]:
    """The accuracy matrices a finished run would have recorded with ``readout``, without
    training: ``ncm-frozen`` / ``ncm-relative`` (:func:`ncm_frozen_matrices`) or ``head``
    (:func:`head_matrices`).

    Returns ``{"multi_real" | "binary" | "strict": (T, T) array (NaN above the diagonal),
    "summary": {kind: summarize_matrix(...)}, "task_names": [...], "source": ...}``;
    ``source`` says where they come from: ``recorded`` (during training) or ``checkpoints``
    (computed now from the checkpoints and the data).
    """
    if readout in ("ncm-frozen", "ncm-relative"):
        return ncm_frozen_matrices(run, data_path=data_path, device=device,
                                   relative=readout == "ncm-relative")
    if readout == "head":
        return head_matrices(run, data_path=data_path, device=device, recorded=recorded)
    raise ValueError(f"readout must be one of {list(RESCORE_READOUTS)}, got {readout!r}")


def _rescore_data(run: str | Path, cfg: Any, sc: Any, net: Any,
                  data_path: str | Path | None) -> tuple[Any, Any]:
    """``(scenario, benchmark)`` of the run's own tasks (at ``data_path`` when given), refused
    when the data is not what the run trained on."""
    from lorax_cil.benchmarks.scenarios import resolve_scenario
    from lorax_cil.benchmarks.streams import build_cil_benchmark
    from lorax_cil.benchmarks.transforms import TransformConfig
    from lorax_cil.training.integrity import check_finished_run_data

    if data_path is not None:
        sc = resolve_scenario("custom", data_path=data_path, tasks=list(sc.task_names))
    check_finished_run_data(Path(run), cfg, sc)
    d = cfg.data
    tcfg = TransformConfig.for_backbone(net.backbone.spec, d, augment=False)
    return sc, build_cil_benchmark(sc, transform_config=tcfg, eval_split=d.eval_split,
                                   calib_fraction=d.calib_fraction, seed=cfg.train.seed)


def _matrices(T: int, predict: Any, table: np.ndarray, names: Sequence[str],
              bench: Any) -> dict[str, Any]:
    """Matrices from ``predict(s, j) -> (pred, labels)`` over the test stream of ``bench``
    (row ``s``: after task ``s``); files that failed to decode are left out, as in training."""
    from lorax_cil.evaluation.metrics import binary_correct, multi_real_correct, strict_correct

    rules = {"multi_real": multi_real_correct, "binary": binary_correct,
             "strict": strict_correct}
    R = {kind: np.full((T, T), np.nan) for kind in rules}
    for s in range(T):
        for j in range(s + 1):
            pred, labels = predict(s, j)  # a file fails to decode when it is read: mask after
            keep = np.array(bench.decoded_mask("test", j), dtype=bool)
            pred, labels = pred[keep], labels[keep]
            for kind, rule in rules.items():
                R[kind][s, j] = float(np.mean(rule(pred, labels, table)))
    return _result(R, names[:T], "checkpoints")


def _result(R: dict[str, np.ndarray], names: Sequence[str], source: str) -> dict[str, Any]:
    from lorax_cil.evaluation.metrics import summarize_matrix

    return {**R, "summary": {kind: summarize_matrix(m) for kind, m in R.items()},
            "task_names": list(names), "source": source}


def _recorded_head(meta: dict[str, Any], net: Any) -> dict[str, np.ndarray] | None:
    """The head's matrices a run that reads by class means recorded beside its own while
    training (``None`` for other runs, and for runs resumed from a checkpoint without them)."""
    from lorax_cil.models.heads import NCMExpandableNet
    from lorax_cil.training.runner import matrix_from_rows

    rows = meta.get("head_matrices")
    if not rows or not isinstance(net, NCMExpandableNet):
        return None
    k = int(meta["completed_tasks"])
    return {kind: matrix_from_rows(rows[kind])[:k, :k] for kind in ("multi_real", "binary", "strict")}


def head_matrices(run: str | Path, *, data_path: str | Path | None = None,
                  device: str = "cpu", recorded: bool = True) -> dict[str, Any]:
    """The accuracy matrices of ``run`` read with its linear head.

    With ``recorded`` and no ``data_path``, a run that reads by class means gives the head's
    matrices it recorded beside its own while training, from the same passes. Otherwise, or
    for a run that did not record them, they are computed from the checkpoint written after
    every task (``train.checkpoint_every_task``, the default): row ``s`` is the network of
    checkpoint ``s`` with its head read (an NCM read-out set aside), so a run trained with
    ``ncm-frozen`` or ``ncm`` is read the official way on the same training. Exact: each
    checkpoint holds the head as it was after its task. Networks with a rule of their own
    (iCaRL, SimpleCIL, ...) have no head to read and are refused."""
    import torch

    from lorax_cil.models.heads import use_readout
    from lorax_cil.training.runner import predict_dataset

    net, cfg, sc, meta = load_trained(run, device=device)
    T = net.num_tasks
    if recorded and data_path is None:
        R = _recorded_head(meta, net)
        if R is not None:
            return _result(R, sc.task_names[:T], "recorded")
    folders = [Path(run) / "checkpoints" / f"exp_{s:03d}" for s in range(T)]
    missing = [f.name for f in folders if not (f / "meta.json").is_file()]
    if missing:
        raise ValueError(f"run {run}: the head read-out of every step needs the checkpoint "
                         f"written after every task (train.checkpoint_every_task); missing "
                         f"{', '.join(missing)}")
    sc, bench = _rescore_data(run, cfg, sc, net, data_path)
    table = np.array(sc.class_is_fake[: net.num_classes])
    state = {"step": -1, "net": None}

    def predict(s: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        if state["step"] != s:
            step_net = load_trained(folders[s], device=device)[0]
            use_readout(step_net, "head")
            state.update(step=s, net=step_net)
        pred, _, labels = predict_dataset(state["net"], bench.test_stream[j].dataset,
                                          batch_size=cfg.train.eval_batch_size,
                                          device=torch.device(device))
        return pred, labels

    return _matrices(T, predict, table, sc.task_names, bench)


def ncm_frozen_matrices(run: str | Path, *, data_path: str | Path | None = None,
                        device: str = "cpu", relative: bool = False) -> dict[str, Any]:
    """The accuracy matrices a finished run would have recorded with the ``ncm-frozen``
    read-out (``train.readout=ncm-frozen``), or with ``relative`` the ``ncm-relative`` one,
    computed from its last checkpoint without training.

    Exact for extractors that grow (the LoRAX family, DER, MEMO): the blocks of tasks ``0..t``
    never change after task ``t``, so the class means of task ``t``'s classes (over its training
    images, evaluation transforms, as the read-out computes them after the task) and every score
    they give are what the run would have computed then, and row ``s`` of a matrix is the
    argmax over the classes of tasks ``0..s``. A run trained with the linear head can so be
    read both ways on the same training. The block offsets of ``ncm-relative`` come from the
    same features (block ``t`` of task ``t``'s training images), as the read-out computes them.

    ``data_path``: the folder that now holds the run's task folders (by name), when its data
    moved. Either way the data must be what the run trained on (file names and sizes against
    its ``data_manifest.json``), or the call stops naming the tasks that changed.

    Returns ``{"multi_real" | "binary" | "strict": (T, T) array (NaN above the diagonal),
    "summary": {kind: summarize_matrix(...)}, "task_names": [...]}``.
    """
    name = "ncm-relative" if relative else "ncm-frozen"
    return class_mean_matrices(run, (name,), data_path=data_path, device=device)[name]


def class_mean_matrices(run: str | Path, readouts: Sequence[str] = ("ncm-frozen", "ncm-relative"),
                        *, data_path: str | Path | None = None,
                        device: str = "cpu") -> dict[str, dict[str, Any]]:
    """:func:`ncm_frozen_matrices` for several class-mean read-outs (``ncm-frozen``,
    ``ncm-relative``) from one feature pass over the run's data: ``{readout: result}``."""
    import torch

    from lorax_cil.models.expandable import ExpandableNet
    from lorax_cil.models.heads import blockwise_cosine_logits
    from lorax_cil.training.head_balance import (
        feature_class_means,
        feature_table,
        new_block_offsets,
    )

    unknown = [r for r in readouts if r not in ("ncm-frozen", "ncm-relative")]
    if unknown or not readouts:
        raise ValueError(f"class-mean read-outs are ncm-frozen and ncm-relative, got {list(readouts)}")
    name = " / ".join(readouts)
    net, cfg, sc, _ = load_trained(run, device=device)
    if not isinstance(net, ExpandableNet):
        raise ValueError(f"run {run}: the {name} read-out reads the feature blocks of an "
                         f"expandable network; {type(net).__name__} ({cfg.train.strategy}) "
                         "classifies by a rule of its own")
    if not net.ext.grows:
        raise ValueError(f"run {run}: the {name} read-out needs one frozen feature block per "
                         f"task; extractor {net.extractor!r} shares one block across tasks")
    T, E = net.num_tasks, net.num_extractors
    if E != T:
        raise ValueError(f"run {run}: {E} feature blocks for {T} tasks")
    sc, bench = _rescore_data(run, cfg, sc, net, data_path)
    table = np.array(sc.class_is_fake[: net.num_classes])
    offsets = np.cumsum([0, *net.task_classes])
    table_args = dict(device=device, batch_size=cfg.train.eval_batch_size)
    means, blocks, block_offsets = [], [], []
    for t in range(T):
        feats, labels = feature_table(net, bench.train_stream[t].dataset, **table_args)
        classes = list(range(int(offsets[t]), int(offsets[t + 1])))
        missing = [c for c in classes if not bool((labels == c).any())]
        if missing:
            raise ValueError(f"run {run}: classes {missing} of task {sc.task_names[t]!r} have no "
                             "training image")
        means.append(feature_class_means(feats, labels, classes))
        blocks += [t + 1] * len(classes)
        if "ncm-relative" in readouts:
            block_offsets.append(new_block_offsets(feats, E, [t]))
    protos, class_blocks = torch.cat(means), torch.tensor(blocks)
    shifts = {"ncm-frozen": None,
              "ncm-relative": torch.cat(block_offsets) if block_offsets else None}
    tested: dict[int, tuple[torch.Tensor, np.ndarray]] = {}  # one feature pass per task

    def test_features(j: int) -> tuple[torch.Tensor, np.ndarray]:
        if j not in tested:
            feats, labels = feature_table(net, bench.test_stream[j].dataset, **table_args)
            tested[j] = (feats, labels.numpy())
        return tested[j]

    def reader(readout: str) -> Any:
        scored: dict[int, torch.Tensor] = {}

        def predict(s: int, j: int) -> tuple[np.ndarray, np.ndarray]:
            feats, labels = test_features(j)
            if j not in scored:
                scored[j] = blockwise_cosine_logits(feats, protos, class_blocks, E,
                                                    offsets=shifts[readout])
            return scored[j][:, : int(offsets[s + 1])].argmax(1).numpy(), labels

        return predict

    return {r: _matrices(T, reader(r), table, sc.task_names, bench) for r in readouts}


def all_readout_matrices(run: str | Path, *, data_path: str | Path | None = None,
                         device: str = "cpu") -> dict[str, dict[str, Any]]:
    """Every read-out of :data:`RESCORE_READOUTS` for ``run`` (:func:`readout_matrices` each):
    ``{readout: result}``, where a read-out the run cannot be read with gives
    ``{"error": message}`` instead (a baseline with a rule of its own, an extractor that shares
    one block across tasks, missing per-task checkpoints)."""
    out: dict[str, dict[str, Any]] = {}
    try:
        out["head"] = readout_matrices(run, "head", data_path=data_path, device=device)
    except ValueError as exc:
        out["head"] = {"error": str(exc)}
    means = [r for r in RESCORE_READOUTS if r != "head"]
    try:  # the class-mean read-outs share one feature pass
        out.update(class_mean_matrices(run, means, data_path=data_path, device=device))
    except ValueError as exc:
        out.update({r: {"error": str(exc)} for r in means})
    return {r: out[r] for r in RESCORE_READOUTS}
