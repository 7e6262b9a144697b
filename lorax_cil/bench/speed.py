"""Speed and memory of LoRAX execution strategies against one plain frozen pass.

``benchmarks/speed.py`` and ``lorax-cil bench speed`` run :func:`run`. For every backbone config
and number of tasks ``T`` it measures, in one process tree, after warm-up, the median of repeats:

* ``plain``: one frozen backbone pass (the floor of inference) and one plain fine-tuning step of
  the whole backbone (the floor of training);
* ``reference``: one full backbone pass per task adapter, switching the active adapter between
  passes, each adapter unmerged (``base(x) + B(A(x))``): the official LoRAX execution; its
  training step also trains as the official code does: autograd records every adapter's pass
  (old adapters keep ``requires_grad``, so the backward runs through all ``T`` passes, although
  only the newest adapter is updated) and old adapters' dropout stays active;
* ``lorax``: the toolkit's LoRAX with adapters on every block (one batched pass over all
  adapters, frozen adapters folded into the weights);
* ``lorax-deep-k{1,2,3}``: adapters on the last ``k`` blocks, the trunk computed once;
* ``merged``: one detector whose weights hold the mean of the ``T`` adapters (one pass);
* ``lorax-ca-k{4}``, ``lorax-ca-all``: class-attention extractors (a per-task query token on
  the last 4 / all blocks over the shared frozen pass, ViT configs only); their "floor" column
  is the FLOP model :func:`~lorax_cil.models.extractors.class_attention.class_attention_flops`;
* ``lorax-side-w64``: side networks of width 64 on every block over the shared frozen pass
  (``lorax-side``, ViT configs only); "floor" is the FLOP model
  :func:`~lorax_cil.models.extractors.side.side_flops`.
* ``lorax-distill-w64``: ``lorax-distill`` (ViT configs only): its training step is the LoRA
  teacher's on every block beside the ``T - 1`` students' shared frozen pass; its inference is
  the ``T`` distilled width-64 students (the network ``lorax-side-w64`` measures), floor
  ``side_flops``.

``--methods`` measures a subset (``plain`` always runs: it is the unit of the training ratios);
rows of other methods already in ``--out`` are kept, so one filtered invocation adds or
refreshes rows without measuring everything again.

Every method runs in a fresh child process, so its peak resident memory is its own. Figures
are reported as ratios to the plain pass measured in the same child (inference) and to the plain
fine-tuning step of the same config (training). Targets (issue "speed and scale") are checked
from these numbers and printed as PASS / FAIL; a FAIL prints a ``torch.profiler`` summary.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from lorax_cil.bench.provenance import git_commit, machine_info

__all__ = ["CONFIGS", "add_arguments", "run", "render_page", "write_page", "timed_pair"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    """A backbone at one input size and batch, with its LoRA rank and targets."""

    name: str
    backbone: str
    img_size: int
    batch: int
    lora_r: int
    targets: str
    uniform_blocks: bool  # blocks of equal cost: the (L - k + T k) / L floor applies


CONFIGS = {
    "vit-test": BenchConfig("vit-test", "vit-test", 32, 64, 16, "attn", True),
    "efficientnet-lite0": BenchConfig("efficientnet-lite0", "efficientnet-lite0", 96, 32, 16,
                                      "pointwise", False),
    "vit-b16": BenchConfig("vit-b16", "vit_base_patch16_224", 224, 2, 64, "attn", True),
    "dinov2-vits14": BenchConfig("dinov2-vits14", "dinov2-vits14", 112, 8, 16, "attn", True),
}
#: configs of the default run (``dinov2-vits14`` is measured on request: ``--configs``)
DEFAULT_CONFIGS = ("vit-test", "efficientnet-lite0", "vit-b16")
DEFAULT_TASKS = (1, 5, 7, 12)
DEEP_KS = (1, 2, 3)
#: the kinds whose tasks all read one shared frozen pass (ViT configs only): method ->
#: (extractor kind, adapted blocks (``None``: all)); ``lorax-side-w64`` has side width 64, as
#: the students of ``lorax-distill-w64``
SHARED_PASS_VARIANTS = {"lorax-ca-k4": ("class-attention", 4), "lorax-ca-all": ("class-attention", None),
                        "lorax-side-w64": ("side", None),
                        "lorax-distill-w64": ("distilled-side", None)}
SIDE_WIDTH = 64
METHODS = ("plain", "reference", "lorax", *[f"lorax-deep-k{k}" for k in DEEP_KS], "merged",
           *SHARED_PASS_VARIANTS)
#: targets of the shared-pass kinds (issue "12 generators for one pass"): inference and training
#: step at the largest T at most 1.5 plain passes / plain fine-tuning steps, memory 1.3x of T = 1
SHARED_INFER_BOUND, SHARED_TRAIN_BOUND, SHARED_MEMORY_BOUND = 1.5, 1.5, 1.3
FIELDS = ("config", "method", "T", "k", "batch", "infer_ms_per_image", "infer_images_per_s",
          "infer_ratio", "floor_ratio", "floor_measured_ratio", "train_ms_per_image",
          "train_ratio", "train_peak_rss_mb", "train_peak_rss_growth_mb", "threads", "device",
          "distill_ratio")
#: within 15 % of the floor; training at most 1.7x plain fine-tuning; memory 1.5x of T = 1.
INFER_SLACK, TRAIN_BOUND, MEMORY_BOUND = 1.15, 1.7, 1.5


# --- timing helpers ---------------------------------------------------------------------------
def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loops(fn: Callable[[], Any], device: Any, min_time: float) -> int:
    """Calls of ``fn`` per timed sample so that one sample lasts at least ``min_time`` seconds
    (as ``timeit``'s autorange: millisecond calls are otherwise dominated by timer and scheduler
    noise). One call is timed with ``torch.utils.benchmark.Timer`` (after its warm-up calls,
    synchronising CUDA, at the current thread count)."""
    if min_time <= 0:
        return 1
    import torch
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    once = max(timer.timeit(1).mean, 1e-6)
    return max(1, math.ceil(min_time / once))


def timed_pair(fn: Callable[[], Any], ref: Callable[[], Any], *, repeats: int, warmup: int,
               device: Any, min_time: float = 0.0) -> tuple[float, float]:
    """Median seconds per call of ``fn`` and of ``ref``, sampled alternately (load drift on a
    shared machine hits both alike, so their ratio is stable). Each sample runs a function enough
    times to last ``min_time`` seconds and is divided by that count.

    The samples themselves are timed here rather than with ``Timer.timeit``, which runs untimed
    warm-up calls before every sample and would break the strict alternation."""
    for _ in range(warmup):
        fn()
        ref()
    loops = {id(f): _loops(f, device, min_time) for f in (fn, ref)}
    a, b = [], []
    for _ in range(repeats):
        for f, out in ((fn, a), (ref, b)):
            n = loops[id(f)]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            _sync(device)
            out.append((time.perf_counter() - t0) / n)
    return statistics.median(a), statistics.median(b)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# --- building ---------------------------------------------------------------------------------
def build_backbone(cfg: BenchConfig, seed: int = 0) -> Any:
    import torch

    from lorax_cil.models.backbones import create_backbone

    torch.manual_seed(seed)
    return create_backbone(cfg.backbone, pretrained=False, img_size=cfg.img_size)


def _lora_net(cfg: BenchConfig, backbone: Any, k: int | None) -> Any:
    from lorax_cil.models.expandable import ExpandableNet
    from lorax_cil.models.lora import LoraSpec

    spec = LoraSpec(r=cfg.lora_r, alpha=float(cfg.lora_r), dropout=0.0, targets=cfg.targets)
    return ExpandableNet(backbone=copy.deepcopy(backbone), extractor="lora", adapt_blocks=k, lora=spec)


def _shared_pass_net(cfg: BenchConfig, backbone: Any, method: str) -> Any:
    """The network of a :data:`SHARED_PASS_VARIANTS` method: class-attention tokens with the
    config's LoRA rank, or side networks of width :data:`SIDE_WIDTH`."""
    from lorax_cil.models.expandable import ExpandableNet
    from lorax_cil.models.extractors.class_attention import ClassAttentionSpec
    from lorax_cil.models.extractors.distilled import DistilledSideSpec
    from lorax_cil.models.extractors.side import SideSpec
    from lorax_cil.models.lora import LoraSpec

    kind, k = SHARED_PASS_VARIANTS[method]
    side = SideSpec(width=SIDE_WIDTH, alpha=float(SIDE_WIDTH))
    spec: Any = {
        "side": side,
        "distilled-side": DistilledSideSpec(
            lora=LoraSpec(r=cfg.lora_r, alpha=float(cfg.lora_r), dropout=0.0, targets=cfg.targets),
            side=side),
    }.get(kind) or ClassAttentionSpec(r=cfg.lora_r, alpha=float(cfg.lora_r), dropout=0.0)
    return ExpandableNet(backbone=copy.deepcopy(backbone), extractor=kind, adapt_blocks=k, spec=spec)


def _shared_pass_formula(net: Any, x: Any, T: int) -> float:
    """Plain passes of the FLOP model of ``net``'s kind (class attention or side networks) on
    input ``x``."""
    from lorax_cil.models.extractors.class_attention import class_attention_flops
    from lorax_cil.models.extractors.side import side_flops

    bb = net.backbone
    blk = bb.block(0)
    n = int(bb.stem(x[:1]).shape[1])
    shape = dict(n=n, dim=bb.feature_dim, hidden=blk.mlp.fc1.out_features, L=bb.num_blocks,
                 k=net.ext.k, T=T)
    if net.extractor in ("side", "distilled-side"):
        side = net.ext.side_spec
        return side_flops(**shape, width=side.width, mlp_ratio=side.mlp_ratio)["passes"]
    return class_attention_flops(**shape, r=net.ext.spec.r, targets=net.ext.spec.targets)["passes"]


def _grow(net: Any, T: int) -> None:
    import torch

    while net.num_tasks < T:
        if net.extractor == "distilled-side":
            _distilled(net, net.num_tasks - 1)  # the previous task as after its distillation
        net.add_task(2)
        with torch.no_grad():  # a trained-looking adapter (B is zero at initialisation)
            if net.extractor == "class-attention":
                for name, p in net.extractors[-1].named_parameters():
                    if name == "token" or name.endswith(".B"):
                        p.normal_(0, 0.02)
                continue
            if net.extractor == "side":
                net.extractors[-1].up.weight.normal_(0, 0.02)
                continue
            for layer in net.ext.layers:  # lora; distilled-side: the newest task's live teacher
                layer.adapters[-1].lora_B.weight.normal_(0, 0.02)


def _distilled(net: Any, t: int) -> None:
    """``distilled-side``: task ``t`` as after its distillation, a trained-looking student
    loaded in place of its teacher (no-op for ``t < 0`` or a task already distilled)."""
    import torch

    if t < 0 or net.ext.teaching != t:
        return
    sd = net.ext.task_state_dict(t)
    sd["up.weight"] = torch.randn(sd["up.weight"].shape, generator=torch.Generator().manual_seed(t)) * 0.02
    net.ext.load_task_state_dict(t, {k: v.to(net.ext.extractors[t].up.weight.device) for k, v in sd.items()})


class _Step:
    """One training step of ``net`` (AdamW over its trainable parameters, LoRAX loss)."""

    def __init__(self, net: Any, forward: Callable[[Any], Any], x: Any, amp: bool) -> None:
        import torch

        self.net, self.forward, self.x, self.amp = net, forward, x, amp
        self.y = torch.randint(net.num_classes - 2, net.num_classes, (x.shape[0],), device=x.device)
        self.opt = torch.optim.AdamW(net.trainable_parameters(), lr=1e-4)

    def __call__(self) -> None:
        import torch
        from torch.nn import functional as F

        with torch.autocast(device_type=self.x.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits, div = self.forward(self.x)
            loss = F.cross_entropy(logits.float(), self.y)
            if div is not None:
                loss = loss + 0.1 * F.cross_entropy(div.float(), self.net.divergence_targets(self.y))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _reference_forward(net: Any, train: bool) -> Callable[[Any], Any]:
    """One full pass per adapter, switching the active adapter, unmerged adapters.

    With ``train``, as the official training: every pass runs under autograd with its adapter's
    parameters requiring gradients and its dropout active (the toolkit freezes old adapters:
    no graph, no dropout), so the backward goes through all ``T`` passes and fills the old
    adapters' gradients. Build the optimiser before the first call, so that it updates only
    the newest adapter and the heads, and call ``forward.restore()`` after the measurement to
    freeze the old adapters again.
    """
    import torch

    from lorax_cil.models.lora import lora_fold, lora_group

    bb = net.backbone
    old = [layer.adapters[t] for layer in net.ext.layers for t in range(net.num_tasks - 1)]
    saved = [(a, a.frozen, [p.requires_grad for p in a.parameters()]) for a in old]

    def official_old_adapters() -> None:
        for a in old:
            a.frozen = False  # dropout active in training mode, as in the official code
            for p in a.parameters():
                p.requires_grad_(True)

    def restore() -> None:
        for a, frozen, flags in saved:
            a.frozen = frozen
            for p, flag in zip(a.parameters(), flags):
                p.requires_grad_(flag)

    def forward(x: Any) -> tuple[Any, Any]:
        if train:
            official_old_adapters()
        feats = []
        with lora_fold(False), torch.set_grad_enabled(train):
            for t in range(net.num_tasks):
                with lora_group(net.ext.layers, [t]):
                    feats.append(bb(x))
        f = torch.cat(feats, dim=1)
        div = net.div_head(f[:, -net.feature_dim:]) if net.div_head is not None else None
        return net.head(f), div

    forward.restore = restore  # type: ignore[attr-defined]
    return forward


def _net_forward(net: Any) -> Callable[[Any], Any]:
    def forward(x: Any) -> tuple[Any, Any]:
        out = net.forward_all(x)
        return out.logits, out.div_logits

    return forward


def _merged_backbone(net: Any, backbone: Any) -> Any:
    """A copy of ``backbone`` whose adapted layers hold ``W + mean_t dW_t`` (no wrappers)."""
    import torch

    from lorax_cil.models.lora import dense_delta

    merged = copy.deepcopy(backbone)
    with torch.no_grad():
        for name in net.lora_targets:
            layer = net.backbone.model.get_submodule(name)
            delta = sum(dense_delta(layer, t) for t in range(net.num_tasks)) / net.num_tasks
            merged.model.get_submodule(name).weight.add_(delta)
    return merged


# --- one method, all T, in a child process ------------------------------------------------------
def _floor_s(backbone: Any, k: int, T: int, x: Any, pair: Callable) -> tuple[float, float]:
    """Seconds of the structural floor (the trunk once + T plain tails, no adapters) and of the
    plain pass timed alternately with it."""
    start = backbone.num_blocks - k
    h = backbone.run_blocks(backbone.stem(x), 0, start)
    hh = h.repeat((T,) + (1,) * (h.dim() - 1))

    def floor() -> None:
        backbone.run_blocks(backbone.stem(x), 0, start)
        backbone.neck(backbone.run_blocks(hh, start))

    return pair(floor)


def measure_method(cfg: BenchConfig, method: str, tasks: Sequence[int], *, backbone: Any,
                   repeats: int, warmup: int, device: Any, amp: bool, train: bool,
                   plain_train_s: float | None, min_time: float = 0.0) -> dict[str, Any]:
    """Rows (one per ``T``) of ``method`` on ``cfg``; runs in its own process.

    Every timing is taken alternately with the plain frozen pass, and reported relative to it;
    ``plain_train_s`` is the plain fine-tuning step in plain-pass units (from the ``plain`` run).
    """
    import torch

    torch.manual_seed(0)
    base_rss = _rss_mb()
    x = torch.randn(cfg.batch, 3, cfg.img_size, cfg.img_size, device=device)
    backbone = backbone.to(device)
    autocast = lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp)  # noqa: E731

    def no_grad(fn: Callable[[], Any]) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad(), autocast():
                fn()
        return call

    plain = no_grad(lambda: backbone(x))

    def pair(fn: Callable[[], Any]) -> tuple[float, float]:
        return timed_pair(fn, plain, repeats=repeats, warmup=warmup, device=device,
                          min_time=min_time)

    rows, profiles = [], {}
    if method == "plain":
        plain_s, _ = pair(plain)
        ft_rel = None
        if train:
            ft = copy.deepcopy(backbone).eval()
            for p in ft.parameters():
                p.requires_grad_(True)
            head = torch.nn.Linear(ft.feature_dim, 2).to(device)
            opt = torch.optim.AdamW([*ft.parameters(), *head.parameters()], lr=1e-4)
            y = torch.randint(0, 2, (cfg.batch,), device=device)

            def ft_step() -> None:
                with autocast():
                    loss = torch.nn.functional.cross_entropy(head(ft(x)).float(), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            ft_s, p_s = pair(ft_step)
            ft_rel = ft_s / p_s
        peak = (_peak_rss_mb(), _peak_rss_mb() - base_rss)
        for T in tasks:
            rows.append(_row(cfg, method, T, None, plain_s, plain_s, ft_rel, ft_rel, peak, device,
                             floor=1.0, floor_measured=1.0))
        return {"rows": rows, "profiles": profiles}

    k = int(method.rsplit("k", 1)[1]) if method.startswith("lorax-deep") else None
    if method in SHARED_PASS_VARIANTS:
        net = _shared_pass_net(cfg, backbone, method).to(device)
    else:
        net = _lora_net(cfg, backbone, k).to(device)

    def train_ratio() -> float:
        net.train()
        fwd = _reference_forward(net, train=True) if method == "reference" else _net_forward(net)
        step = _Step(net, fwd, x, amp)  # its optimiser: the newest extractor and heads
        t_s, p_s = pair(step)
        if hasattr(fwd, "restore"):
            fwd.restore()
        if T == max(tasks) and method.startswith("lorax"):
            profiles["train"] = _profile(step)
        return t_s / p_s

    def distill_ratio() -> float:
        """One distillation step of the newest student (trunk, frozen pass, teacher without
        autograd, student with it) in plain passes; :func:`_row` turns it into plain
        fine-tuning steps."""
        net.eval()
        t = net.num_tasks - 1
        opt = net.ext.distill_optimizer(t)
        d_s, p_s = pair(lambda: net.ext.distill_step(t, net.trunk(x), opt, amp=amp))
        return d_s / p_s

    for T in tasks:
        _grow(net, T)
        net.to(device)
        train_rel = distill_rel = None
        if net.extractor == "distilled-side":  # the teacher's step, then inference as after it
            if train:
                train_rel = train_ratio()
                distill_rel = distill_ratio()
            _distilled(net, T - 1)
        net.eval()
        if method == "reference":
            fwd = _reference_forward(net, train=False)
            infer_s, plain_s = pair(no_grad(lambda: fwd(x)))
        elif method == "merged":
            merged = _merged_backbone(net, backbone)
            head = torch.nn.Linear(merged.feature_dim, 2).to(device)
            infer_s, plain_s = pair(no_grad(lambda: head(merged(x))))
        else:
            infer_s, plain_s = pair(no_grad(lambda: net(x)))
        floor, floor_measured = 1.0, None
        if method in SHARED_PASS_VARIANTS:
            with torch.no_grad():
                floor = _shared_pass_formula(net, x, T)
        elif k is not None:
            with torch.no_grad(), autocast():
                f_s, p_s = _floor_s(backbone, k, T, x, pair)
            floor, floor_measured = (backbone.num_blocks - k + T * k) / backbone.num_blocks, f_s / p_s
        elif method in ("reference", "lorax"):
            floor = floor_measured = float(T)
        if train and method != "merged" and net.extractor != "distilled-side":
            train_rel = train_ratio()
        if T == max(tasks) and method.startswith("lorax"):
            net.eval()
            with torch.no_grad():
                profiles["infer"] = _profile(lambda: net(x))
        peak = (_peak_rss_mb(), _peak_rss_mb() - base_rss)
        rows.append(_row(cfg, method, T, net.ext.k if method in SHARED_PASS_VARIANTS else k, infer_s, plain_s,
                         train_rel, plain_train_s, peak, device,
                         floor=floor, floor_measured=floor_measured, distill_rel=distill_rel))
    return {"rows": rows, "profiles": profiles}


def _profile(fn: Callable[[], Any], top: int = 12) -> str:
    """``torch.profiler`` summary (self CPU time) of one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def _row(cfg: BenchConfig, method: str, T: int, k: int | None, infer_s: float, plain_s: float,
         train_rel: float | None, plain_train_rel: float | None, peak_mb: tuple[float, float],
         device: Any, *, floor: float, floor_measured: float | None,
         distill_rel: float | None = None) -> dict[str, Any]:
    """One CSV row; ``train_rel``, ``plain_train_rel`` and ``distill_rel`` (a distillation step,
    ``lorax-distill-w64``) are in units of the plain pass timed alongside them, so the training
    time per image is ``train_rel * plain_s / batch``."""
    import torch

    b = cfg.batch
    train_s = None if train_rel is None else train_rel * plain_s
    return {
        "config": cfg.name, "method": method, "T": T, "k": "" if k is None else k, "batch": b,
        "infer_ms_per_image": 1000 * infer_s / b, "infer_images_per_s": b / infer_s,
        "infer_ratio": infer_s / plain_s, "floor_ratio": floor,
        "floor_measured_ratio": "" if floor_measured is None else floor_measured,
        "train_ms_per_image": "" if train_s is None else 1000 * train_s / b,
        "train_ratio": "" if train_rel is None or not plain_train_rel else train_rel / plain_train_rel,
        "train_peak_rss_mb": peak_mb[0], "train_peak_rss_growth_mb": peak_mb[1],
        "threads": torch.get_num_threads(), "device": str(device),
        "distill_ratio": "" if distill_rel is None or not plain_train_rel else distill_rel / plain_train_rel,
    }


def _child_main(conn: Any, cfg: BenchConfig, method: str, tasks: list[int], threads: int,
                device: str, kwargs: dict[str, Any]) -> None:
    """Entry of a spawned child: build the backbone, measure one method, send the result."""
    try:
        import torch

        torch.set_num_threads(threads)
        backbone = build_backbone(cfg).eval()
        conn.send({"ok": measure_method(cfg, method, tasks, backbone=backbone,
                                        device=torch.device(device), **kwargs)})
    except BaseException as exc:  # reported by the parent
        import traceback

        conn.send({"error": f"{exc!r}\n{traceback.format_exc()}"})


def _in_child(cfg: BenchConfig, method: str, tasks: list[int], *, device: Any,
              **kwargs: Any) -> dict[str, Any]:
    """Measure ``method`` in a fresh (spawned) process: its peak RSS is its own, and no thread
    pool state is inherited."""
    import multiprocessing as mp

    import torch

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(child, cfg, method, list(tasks), torch.get_num_threads(),
                                                  str(device), kwargs))
    proc.start()
    child.close()
    try:
        out = parent.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"benchmark child for {cfg.name} {method} died (exit code {proc.exitcode})") from None
    proc.join()
    if "error" in out:
        raise RuntimeError(f"benchmark child failed: {out['error']}")
    return out["ok"]


# --- loader throughput ----------------------------------------------------------------------------
def loader_throughput(cfg: BenchConfig, data_dir: Path, *, workers: int, pin: bool,
                      batches: int = 4) -> float:
    """Images/s of the training data pipeline alone (decode + transforms + collate)."""
    from torch.utils.data import DataLoader

    from lorax_cil.benchmarks.scenarios import resolve_scenario
    from lorax_cil.benchmarks.streams import build_cil_benchmark
    from lorax_cil.benchmarks.transforms import TransformConfig

    scenario = resolve_scenario("synth-easy", data_path=data_dir)
    bench = build_cil_benchmark(scenario, transform_config=TransformConfig(size=cfg.img_size))
    ds = bench.train_stream[0].dataset.train()
    loader = DataLoader(ds, batch_size=cfg.batch, shuffle=True, num_workers=workers,
                        pin_memory=pin, collate_fn=ds.collate_fn, drop_last=False,
                        persistent_workers=workers > 0)
    n, t0, seen = 0, None, 0
    for epoch in range(100):
        for batch in loader:
            if t0 is None:  # the first batch pays for worker start-up
                t0 = time.perf_counter()
                continue
            n += len(batch[0])
            seen += 1
            if seen >= batches:
                return n / (time.perf_counter() - t0)
    return n / (time.perf_counter() - t0) if n else float("nan")


# --- targets ------------------------------------------------------------------------------------
@dataclass
class Check:
    name: str
    value: float
    bound: float
    method: str
    config: str
    note: str = ""

    @property
    def ok(self) -> bool:
        return math.isfinite(self.value) and self.value <= self.bound

    def line(self) -> str:
        return (f"{'PASS' if self.ok else 'FAIL'}  {self.config:<18} {self.name}: "
                f"{self.value:.2f} (bound {self.bound:.2f})" + (f"; {self.note}" if self.note else ""))


def _num_blocks(row: dict[str, Any]) -> int:
    """L from a lorax-deep row: its floor ratio is (L - k + T k) / L."""
    T, k, floor = int(row["T"]), int(row["k"]), float(row["floor_ratio"])
    return round(k * (T - 1) / (floor - 1)) if floor > 1 else 0


def check_targets(rows: list[dict[str, Any]], cfg: BenchConfig) -> list[Check]:
    """The issue's targets at the largest T, from the rows of one config."""
    T = max(int(r["T"]) for r in rows)
    at = {(r["method"], int(r["T"])): r for r in rows}
    checks: list[Check] = []
    for k in DEEP_KS:
        r = at.get((f"lorax-deep-k{k}", T))
        if r is None:
            continue
        floor = float(r["floor_ratio"]) if cfg.uniform_blocks else float(r["floor_measured_ratio"])
        kind = "(L-k+Tk)/L" if cfg.uniform_blocks else "measured trunk + T tails"
        checks.append(Check(f"inference T={T} k={k} x plain, <= 1.15 x floor {floor:.2f} [{kind}]",
                            float(r["infer_ratio"]), INFER_SLACK * floor, r["method"], cfg.name))
    r = at.get((f"lorax-deep-k{DEEP_KS[-1]}", T))
    if r is not None and r["train_ratio"] != "":
        note = ""
        if cfg.uniform_blocks and float(r["train_ratio"]) > 0 and _num_blocks(r):
            k, L = DEEP_KS[-1], _num_blocks(r)
            # plain passes: trunk once, T-1 old tails without autograd, the newest tail forward
            # and backward (about 3 tail passes); the plain fine-tuning step in plain passes
            passes = (L + (T + 1) * k) / L
            ft_passes = ((float(r["train_ms_per_image"]) / float(r["train_ratio"]))
                         / (float(r["infer_ms_per_image"]) / float(r["infer_ratio"])))
            note = (f"work floor (L + (T+1)k)/L = {passes:.2f} plain passes = "
                    f"{passes / ft_passes:.2f} fine-tuning steps at L={L}")
        checks.append(Check(f"training step T={T} k={DEEP_KS[-1]} x plain fine-tuning step",
                            float(r["train_ratio"]), TRAIN_BOUND, r["method"], cfg.name, note))
    for t in sorted({int(r["T"]) for r in rows}):
        ref, lx = at.get(("reference", t)), at.get(("lorax", t))
        if ref and lx:
            checks.append(Check(f"full-depth lorax inference T={t} / reference", float(lx["infer_ratio"])
                                / float(ref["infer_ratio"]), 1.0, "lorax", cfg.name))
            if ref["train_ratio"] != "" and lx["train_ratio"] != "":
                # both in units of the plain fine-tuning step measured beside each of them, as
                # the inference check (methods run in separate processes, at different times)
                checks.append(Check(f"full-depth lorax training T={t} / reference",
                                    float(lx["train_ratio"]) / float(ref["train_ratio"]),
                                    1.0, "lorax", cfg.name))
    for m in SHARED_PASS_VARIANTS:
        r = at.get((m, T))
        if r is None:
            continue
        checks.append(Check(f"{m} inference T={T} x plain (FLOP model {float(r['floor_ratio']):.2f})",
                            float(r["infer_ratio"]), SHARED_INFER_BOUND, m, cfg.name))
        if r["train_ratio"] != "":
            checks.append(Check(f"{m} training step T={T} x plain fine-tuning step",
                                float(r["train_ratio"]), SHARED_TRAIN_BOUND, m, cfg.name))
        if r.get("distill_ratio", "") != "":
            checks.append(Check(f"{m} distillation step T={T} x plain fine-tuning step",
                                float(r["distill_ratio"]), SHARED_TRAIN_BOUND, m, cfg.name))
    T1 = min(int(r["T"]) for r in rows)
    for m in SHARED_PASS_VARIANTS:
        lo, hi = at.get((m, T1)), at.get((m, T))
        if lo and hi and T > T1 and lo["train_ms_per_image"] != "":
            checks.append(Check(f"{m} training peak RSS (process) T={T} / T={T1}",
                                float(hi["train_peak_rss_mb"]) / float(lo["train_peak_rss_mb"]),
                                SHARED_MEMORY_BOUND, m, cfg.name))
    for m in ("lorax", *[f"lorax-deep-k{k}" for k in DEEP_KS]):
        lo, hi = at.get((m, T1)), at.get((m, T))
        if lo and hi and T > T1 and lo["train_ms_per_image"] != "":
            checks.append(Check(f"{m} training peak RSS (process) T={T} / T={T1}",
                                float(hi["train_peak_rss_mb"]) / float(lo["train_peak_rss_mb"]),
                                MEMORY_BOUND, m, cfg.name))
    return checks


# --- reports --------------------------------------------------------------------------------------
def _fmt(v: Any, spec: str = ".2f") -> str:
    if v in ("", None):
        return "-"
    return format(float(v), spec)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ("| config | method | T | inference ms/img | img/s | x plain | floor | train ms/img "
            "| x plain FT step | peak RSS MB | growth MB |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        floor = r["floor_measured_ratio"] if r["floor_measured_ratio"] != "" else r["floor_ratio"]
        lines.append(f"| {r['config']} | {r['method']} | {r['T']} | {_fmt(r['infer_ms_per_image'], '.3f')} "
                     f"| {_fmt(r['infer_images_per_s'], '.1f')} | {_fmt(r['infer_ratio'])} "
                     f"| {_fmt(floor)} | {_fmt(r['train_ms_per_image'], '.3f')} | {_fmt(r['train_ratio'])} "
                     f"| {_fmt(r['train_peak_rss_mb'], '.0f')} | {_fmt(r['train_peak_rss_growth_mb'], '.0f')} |")
    return "\n".join(lines)


def shared_pass_markdown(rows: list[dict[str, Any]]) -> str:
    """The shared-pass rows (class attention, side networks) beside their FLOP model: inference
    in plain passes (measured and model), training in plain fine-tuning steps, peak RSS relative
    to the smallest T."""
    sel = [r for r in rows if r["method"] in SHARED_PASS_VARIANTS]
    if not sel:
        return ("Not measured in this run: `python benchmarks/speed.py --configs vit-b16 dinov2-vits14 "
                "--methods lorax-ca-k4 lorax-ca-all lorax-side-w64 lorax-distill-w64` adds the rows.")
    lines = ["| config | method | k | T | inference x plain | FLOP model x plain | measured / model "
             "| training x plain FT step | distillation x plain FT step | peak RSS / smallest T |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (c, m) in dict.fromkeys((r["config"], r["method"]) for r in sel):
        rs = sorted((r for r in sel if r["config"] == c and r["method"] == m), key=lambda r: int(r["T"]))
        base = float(rs[0]["train_peak_rss_mb"])
        for r in rs:
            inf, model = float(r["infer_ratio"]), float(r["floor_ratio"])
            lines.append(f"| {c} | {m} | {r['k']} | {r['T']} | {inf:.2f} | {model:.3f} | {inf / model:.2f} "
                         f"| {_fmt(r['train_ratio'])} | {_fmt(r.get('distill_ratio', ''))} "
                         f"| {float(r['train_peak_rss_mb']) / base:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Inference (and training) cost vs T, x plain pass, one panel per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, axes = plt.subplots(2, len(configs), figsize=(4.2 * len(configs), 7), squeeze=False)
    for j, c in enumerate(configs):
        for i, (key, label) in enumerate((("infer_ratio", "inference x plain pass"),
                                          ("train_ratio", "training x plain fine-tuning step"))):
            ax = axes[i][j]
            for m in dict.fromkeys(r["method"] for r in rows if r["config"] == c):
                pts = [(int(r["T"]), float(r[key])) for r in rows
                       if r["config"] == c and r["method"] == m and r[key] != ""]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=m)
            ax.set_title(f"{c}: {label}", fontsize=9)
            ax.set_xlabel("tasks T")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            if i == 0 and j == len(configs) - 1:
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- accuracy trade-off -------------------------------------------------------------------------
ACC_STRATEGIES = (("lorax", None), ("lorax-deep", 1), ("lorax-deep", 2), ("lorax-deep", 3))


def accuracy_tradeoff(out: Path, *, seeds: Sequence[int], per_class: int, epochs: int,
                      size: int, data_dir: Path | None,
                      echo: Callable[[str], None] = logger.info) -> list[dict[str, Any]]:
    """Final AA and BWT (multi-real) of lorax (full depth) and lorax-deep k=1,2,3 on synth-long
    with EfficientNet-Lite0 (ImageNet weights), same data and seeds for every variant."""
    from lorax_cil.benchmarks.scenarios import resolve_scenario
    from lorax_cil.benchmarks.synth import synthesize
    from lorax_cil.training.config import RunConfig, merge_config
    from lorax_cil.training.runner import Run

    data = data_dir or out / f"synth-long-{size}px-{per_class}"
    synthesize(data, scenario="synth-long", per_class=per_class, size=size, seed=0)
    rows = []
    for seed in seeds:
        for strategy, k in ACC_STRATEGIES:
            cfg = merge_config(RunConfig(), {
                "data": {"scenario": "synth-long", "data_path": str(data), "crop": size},
                "model": {"backbone": "efficientnet-lite0", "pretrained": True, "lora_r": 16,
                          "lora_alpha": 16.0, "lora_dropout": 0.0, "adapt_blocks": k},
                "train": {"strategy": strategy, "epochs": epochs, "batch_size": 32,
                          "eval_batch_size": 128, "lr_first": 1e-3, "lr": 1e-3, "warmup_epochs": 0,
                          "min_lr": 1e-5, "memory_size": 24 * per_class // 2, "seed": seed,
                          "device": "cpu", "checkpoint_every_task": False,
                          "min_steps_per_task": 0, "readout": "head"},
            }, source="speed benchmark")
            name = strategy if k is None else f"{strategy}-k{k}"
            run = Run(cfg, run_dir=out / "accuracy-runs" / f"{name}-s{seed}",
                      progress=lambda msg: echo(f"[accuracy {name} seed {seed}] {msg}"))
            run.setup(resolve_scenario("synth-long", data_path=data))
            s = run.train()
            rows.append({"method": name, "k": "" if k is None else k, "seed": seed,
                         "aa": 100 * s["multi_real_aa"], "bwt": 100 * s["multi_real_bwt"],
                         "train_seconds": s["train_seconds"]})
    return rows


def accuracy_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | k | seeds | final AA (%) | BWT (%) | train s (sum) |",
             "|---|---:|---:|---:|---:|---:|"]
    for m in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == m]
        aa = [float(r["aa"]) for r in sel]
        bwt = [float(r["bwt"]) for r in sel]
        sd = lambda v: f" ± {statistics.stdev(v):.1f}" if len(v) > 1 else ""  # noqa: E731
        lines.append(f"| {m} | {sel[0]['k'] or 'all'} | {len(sel)} | {statistics.mean(aa):.1f}{sd(aa)} "
                     f"| {statistics.mean(bwt):.1f}{sd(bwt)} | {sum(float(r['train_seconds']) for r in sel):.0f} |")
    return "\n".join(lines)


# --- docs page ------------------------------------------------------------------------------------
def _checks_from_rows(rows: list[dict[str, Any]], saved: list[str]) -> list[str]:
    """The target checks recomputed from the CSV rows (the current rules), per config in row
    order; the saved lines for configs this version does not know."""
    lines: list[str] = []
    for name in dict.fromkeys(r["config"] for r in rows):
        if name in CONFIGS:
            lines += [c.line() for c in check_targets([r for r in rows if r["config"] == name], CONFIGS[name])]
        else:
            lines += [line for line in saved if line.split()[1:2] == [name]]
    return lines


def write_page(out: Path, page: Path, *, command: str) -> Path:
    """Write the results page to ``page`` (an explicit path: the library never picks a docs
    folder) and its plot to ``img/<page name>-speed.png`` beside it, from the files in ``out``
    (``performance.md`` -> ``img/performance-speed.png``; a second page keeps its own plot)."""
    import shutil

    img = page.parent / "img" / plot_name(page)
    img.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "speed.png", img)
    page.write_text(render_page(out, command=command, plot=img.name), encoding="utf-8")
    return page


def plot_name(page: Path) -> str:
    """File name of a results page's plot in ``img/``."""
    return f"{page.stem}-speed.png"


def render_page(out: Path, *, command: str, plot: str = "performance-speed.png") -> str:
    """The markdown of the performance page from the CSV / JSON files in ``out`` (the plot is
    referenced as ``img/<plot>``)."""
    meta = json.loads((out / "speed.json").read_text())
    rows = _read_csv(out / "speed.csv")
    acc = _read_csv(out / "accuracy.csv") if (out / "accuracy.csv").is_file() else []
    m = meta["machine"]
    loader = "\n".join(f"| {c} | {v['workers']} | {v['images_per_s']:.0f} | {v['model_images_per_s']:.0f} |"
                       for c, v in meta["loader"].items())
    checks = "\n".join(f"    {line}" for line in _checks_from_rows(rows, meta["checks"]))
    command = meta.get("command") or command  # the command that measured, not a re-render
    acc_meta = json.loads((out / "accuracy.json").read_text()) if (out / "accuracy.json").is_file() else {}
    acc_command = acc_meta.get("command") or meta.get("accuracy_command") or "a command not recorded"
    acc_md = (accuracy_markdown(acc) + f"\n\nProduced by `{acc_command}` "
              f"(synth-long, 12 tasks, EfficientNet-Lite0 with ImageNet weights, "
              f"{acc[0].get('epochs', '?')} epochs per task, LoRA rank 16 on the pointwise convolutions, "
              f"{acc_meta.get('per_class', 'the --acc-per-class default of 24')} training images per class "
              "and task at 96 px; k counts the last of the backbone's 16 blocks, `all` is full depth). "
              "Same data, order and seeds for every row.") if acc else (
        "Not produced yet: run `python benchmarks/speed.py --accuracy --write-docs`.")
    gpu = ("GPU figures are pending: no GPU was available when this page was generated. Produce "
           "them on a CUDA machine with `python benchmarks/speed.py --device cuda --amp "
           "--write-docs` (bf16 autocast, same configs; larger `--batch-scale` keeps a GPU busy).")
    if "gpu" in m:
        gpu = f"The figures above ran on {m['gpu']} (`--device cuda`)."
    text = f"""# Performance: cost of T task adapters

The official LoRAX runs one full backbone pass per task adapter for every image, so its cost
grows linearly with the number of generators. This page measures what the toolkit's execution
costs instead, as a ratio to one plain pass of the frozen backbone measured in the same run.

## How it was produced

```
{command}
```

Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, torch {m['torch']},
device `{meta['device']}`{' (bf16 autocast)' if meta.get('amp') else ''}. Medians of {meta['repeats']} repeats
after {meta['warmup']} warm-up call(s); a timed sample repeats a call until it lasts at least
{meta.get('min_time', 0)} s and divides by the count; every sample alternates with a sample of the plain
frozen pass, and each ratio divides by the median of those plain passes (load drift on a shared machine hits both
alike). Every method runs in its own fresh process (its peak
resident memory is its own: "peak RSS" is that process's high-water mark, "growth" the part above
the process after start-up and building the backbone). Timings on a shared machine are noisy; ratios within one run are
the figures to read. Generated {meta['date']} at commit `{meta['commit']}`.

Configs: {', '.join(f"`{c}` ({v})" for c, v in meta['configs'].items())}.

Methods:

- **plain**: one pass of the frozen backbone (inference floor); training: one fine-tuning step of
  the whole backbone (forward, backward, AdamW), the training floor;
- **reference**: one full backbone pass per adapter, switching the active adapter, adapters not
  merged (`base(x) + B(A(x))`): the official LoRAX execution; its training step backpropagates
  through every adapter's pass with the old adapters' dropout active, as the official code does
  (only the newest adapter is updated);
- **lorax**: the toolkit with adapters on every block: adapters batched in one group on CUDA,
  one at a time on CPU, frozen adapters folded into the weights (`W + s B A`, cached up to
  `LORAX_CIL_FOLD_CACHE_MB`, default 512 MB);
- **lorax-deep-kN**: adapters on the last N blocks; the frozen trunk runs once per image;
- **merged**: a single detector holding the mean of the T adapters (one pass);
- **lorax-ca-k4**, **lorax-ca-all**: class-attention extractors (`lorax-ca`, docs/lorax.md): the
  frozen backbone runs once for every task, and each task's query token reads the frozen tokens
  of the last 4 / all blocks with its own LoRA (ViT configs only);
- **lorax-side-w64**: side networks (`lorax-side`, docs/class-attention.md): the frozen backbone
  runs once for every task, and each task's width-64 side stream processes every token, fed by
  the frozen tokens of every block (ViT configs only).
- **lorax-distill-w64**: `lorax-distill` (docs/class-attention.md): each task trains a LoRA
  teacher on every block (the training row: its step beside the T - 1 students' shared frozen
  pass), then keeps a width-64 side network distilled from it (the inference row: the same
  network as `lorax-side-w64`) (ViT configs only).

Training rows are one step of the newest extractor at task T (old extractors frozen, run without
autograd, except in `reference`, which trains as the official code: every adapter's pass under
autograd, old adapters' dropout active); ratios are to the plain fine-tuning step. "floor" is `(L - k + T k) / L` for
backbones with blocks of equal cost, and the measured cost of the trunk once plus T plain tails
for EfficientNet-Lite0 (its blocks differ in cost).

![cost vs T](img/{plot})

{markdown_table(rows)}

## Shared-pass extractors against their cost model

The class-attention FLOP model (`lorax_cil.models.extractors.class_attention.class_attention_flops`,
checked against torch's FLOP counter in the tests) counts the matrix products: the shared pass is
`L - 1` whole blocks plus `norm1` and `qkv` of the last block; each task adds, per adapted
block, one token through the query projection, attention over the `N` frozen keys, the output
projection and the MLP, plus its LoRA factors. "measured / model" above 1 is what the model
leaves out: norms, softmax and the per-call overhead of the small per-token products, which
dominates on CPU at small batches. The side networks' model
(`lorax_cil.models.extractors.side.side_flops`, tested the same way) is one plain pass plus, per
task, `k + 1` down-projections of every token to width `w`, `k` per-token side MLPs and one
up-projection. The methods, and their accuracy against full-depth LoRAX and `lorax-deep`:
[class-attention.md](class-attention.md).

{shared_pass_markdown(rows)}

## Targets at T = {meta['max_T']}

A call of `vit-test` or EfficientNet-Lite0 takes milliseconds; the timed samples repeat such
calls (`--min-time`) so that timer and scheduler noise averages out. On a loaded machine the
ratios still move by some percent between runs; re-run with more `--repeats` on a quiet machine
where a check sits near its bound.

```
{checks}
```

{meta.get('profile_note', '')}

## Data loading

Training pipeline alone (PNG decode, transforms, collate) on generated 96 px images, beside the
model's lorax-deep (k = 3) inference throughput at T = {meta['max_T']} on the same config:

| config | loader workers | loader img/s | model img/s |
|---|---:|---:|---:|
{loader}

`train.num_workers` sets the loader workers of training and evaluation; on CUDA the loaders pin
memory. With a deterministic training transform (no blur, JPEG, flips, and images already at the
crop size) `lorax-cil train --cache-trunk` computes the trunk once per image and task and trains
every epoch from the cached outputs. On a CNN backbone `--set model.channels_last=true` runs the
convolutions channels-last, faster on CPU at real image sizes and equal up to float rounding
(`benchmarks/cnn_layouts.py`, [backbones.md](backbones.md#efficientnet-lite0-offline-imagenet-weights)).

## Accuracy trade-off

{acc_md}

## GPU

{gpu}

## Choosing k

- Inference and training cost at T tasks is about `(L - k + T k) / L` plain passes: k = 1
  keeps twelve generators under 2x a plain pass on a 12-block ViT, k = 3 under 4x; full depth
  (k = L) costs T passes whatever the execution.
- Start with k = 3 (the `lorax-deep` default); lower k when T is large and throughput matters,
  raise it when the accuracy table shows the last blocks are not enough for your generators.
- On a ViT with many generators, `lorax-ca` (class-attention tokens, see above) costs about one
  plain pass whatever T: the per-task work is one token per adapted block, not k blocks.
  `lorax-side` (a width-`w` side network per task over every token, fed by the frozen tokens of
  every block) also shares one frozen pass; its FLOP model gives 1.11 plain passes at T = 12
  on ViT-B/16 with `w = 64` (measured: the `lorax-side-w64` rows above, when this run has them).
  Its accuracy against full depth depends on the training length
  ([class-attention.md](class-attention.md#per-token-side-networks-lorax-side)).
- For full depth's accuracy at that inference cost, `lorax-distill` trains each task as
  full-depth LoRA and keeps a width-64 side network distilled from it (the `lorax-side`
  network; training takes longer, the distillation epochs run the frozen backbone and the
  teacher: [class-attention.md](class-attention.md#side-networks-distilled-from-full-depth-lora-lorax-distill)).
- Memory grows with T by the adapters, the head and the cached folded weights of the adapted
  layers (one weight copy per adapted layer and task, about 110 MB per task for full-depth
  ViT-B/16 attention). All layers together cache at most 512 MB (`LORAX_CIL_FOLD_CACHE_MB`,
  or `lorax_cil.models.lora.set_fold_cache_limit`); adapters past the bound run unfolded
  without autograd, which costs `r (d_in + d_out)` per token more and nothing in accuracy.
- On CPU the adapters' tails run one after another on the shared trunk output; on CUDA they run
  as one batch (`ExpandableNet.max_group_size` caps it when GPU memory is short).
"""
    return text


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _write_csv(path: Path, rows: list[dict[str, Any]], fields: Sequence[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(fields))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


# --- command line -------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=list(CONFIGS),
                   help=f"backbone configs (default: {' '.join(DEFAULT_CONFIGS)})")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS), metavar="METHOD",
                   help="measure only these methods (plain always runs; rows of other methods "
                        f"already in --out are kept); choices: {' '.join(METHODS)}")
    p.add_argument("--tasks", nargs="+", type=int, default=list(DEFAULT_TASKS), help="values of T")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up calls")
    p.add_argument("--min-time", type=float, default=0.2,
                   help="seconds per timed sample: short calls are repeated and averaged (0: one call)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--batch-scale", type=float, default=1.0, help="multiply every config's batch")
    p.add_argument("--no-train", action="store_true", help="inference only")
    p.add_argument("--loader-workers", type=int, default=2, help="workers of the loader throughput")
    p.add_argument("--out", default="benchmarks/results/speed", help="output folder")
    p.add_argument("--page", default=None, metavar="PATH",
                   help="also write the results page (markdown) to PATH, its plot to img/ beside it "
                        "(benchmarks/speed.py --write-docs: docs/performance.md)")
    p.add_argument("--accuracy", action="store_true",
                   help="also run the accuracy trade-off on synth-long (minutes)")
    p.add_argument("--accuracy-only", action="store_true", help="only the accuracy trade-off")
    p.add_argument("--acc-seeds", nargs="+", type=int, default=[0])
    p.add_argument("--acc-per-class", type=int, default=24)
    p.add_argument("--acc-epochs", type=int, default=2)
    p.add_argument("--acc-data", default=None, help="synth-long folder (generated when missing)")
    p.add_argument("--render-only", action="store_true",
                   help="only rewrite the --page from the results already in --out")
    p.add_argument("--smoke", action="store_true",
                   help="tiny run (vit-test, T = 1 2, batch 4, 1 repeat): checks the pipeline only")


def run(args: argparse.Namespace, echo: Callable[[str], None] = logger.info) -> int:
    """Run the benchmark described by ``args`` (see :func:`add_arguments`); progress, checks and
    tables go to ``echo`` (the CLI passes ``print``)."""
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/speed.py " + " ".join(sys.argv[1:]) if sys.argv[1:] else "python benchmarks/speed.py"
    if args.smoke:
        args.configs, args.tasks, args.repeats, args.warmup = ["vit-test"], [1, 2], 1, 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available")
    amp = bool(args.amp) and device.type == "cuda"
    if args.render_only:
        if not (out / "speed.json").is_file():
            raise FileNotFoundError(f"--render-only: no speed results in {out} (run the benchmark first)")
        if not args.page:
            raise ValueError("--render-only rewrites a page: give --page PATH")
        echo(f"wrote {write_page(out, Path(args.page), command=command)}")
        return 0
    if not args.accuracy_only:
        speed(args, out, device, amp, command, echo)
    if args.accuracy or args.accuracy_only:
        acc = accuracy_tradeoff(out, seeds=args.acc_seeds, per_class=args.acc_per_class,
                                epochs=args.acc_epochs, size=96,
                                data_dir=Path(args.acc_data) if args.acc_data else None, echo=echo)
        for r in acc:
            r["epochs"] = args.acc_epochs
        _write_csv(out / "accuracy.csv", acc, list(acc[0]))
        (out / "accuracy.json").write_text(json.dumps({"command": command, "per_class": args.acc_per_class,
                                                       "date": time.strftime("%Y-%m-%d")}, indent=2))
        echo(accuracy_markdown(acc))
    if args.page:
        echo(f"wrote {write_page(out, Path(args.page), command=command)}")
    return 0


def speed(args: argparse.Namespace, out: Path, device: Any, amp: bool, command: str,
          echo: Callable[[str], None]) -> None:
    import tempfile

    from lorax_cil.benchmarks.synth import synthesize

    tasks = sorted(set(args.tasks))
    chosen = getattr(args, "methods", None)
    methods = [m for m in METHODS if m == "plain" or not chosen or m in chosen]
    rows, checks, profiles_out, loader = [], [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        data = synthesize(Path(tmp) / "synth", scenario="synth-easy", per_class=32, size=96, seed=0,
                          workers=1)
        for name in args.configs:
            cfg = CONFIGS[name]
            batch = max(1, int(round(cfg.batch * args.batch_scale)))
            if args.smoke:
                batch = 4
            cfg = BenchConfig(**{**cfg.__dict__, "batch": batch})
            crows: list[dict[str, Any]] = []
            plain_train = None
            for method in methods:
                if method in SHARED_PASS_VARIANTS and not cfg.uniform_blocks:
                    continue  # class attention / side networks need a ViT (equal-cost blocks)
                kw = dict(device=device, repeats=args.repeats, warmup=args.warmup, amp=amp,
                          train=not args.no_train, plain_train_s=plain_train,
                          min_time=0.0 if args.smoke else args.min_time)
                if args.smoke:  # pipeline check: in-process, the memory column is not per method
                    res = measure_method(cfg, method, tasks, backbone=build_backbone(cfg).eval(), **kw)
                else:
                    res = _in_child(cfg, method, tasks, **kw)
                if method == "plain" and res["rows"][0]["train_ms_per_image"] != "":
                    r0 = res["rows"][0]  # the fine-tuning step in plain-pass units
                    plain_train = float(r0["train_ms_per_image"]) / float(r0["infer_ms_per_image"])
                crows += res["rows"]
                last = res["rows"][-1]
                echo(f"[speed] {name:<18} {method:<15} T={last['T']:<3} inference x{last['infer_ratio']:.2f}"
                     f"  train x{_fmt(last['train_ratio'])}  peak {last['train_peak_rss_mb']:.0f} MB "
                     f"(+{last['train_peak_rss_growth_mb']:.0f})")
                crows[-1]["_profiles"] = res["profiles"]
            cchecks = check_targets(crows, cfg)
            for c in cchecks:
                echo(c.line())
                if not c.ok:
                    prof = next((r.get("_profiles") for r in crows if r["method"] == c.method
                                 and "_profiles" in r), None)
                    if prof:
                        kind = "train" if "training" in c.name else "infer"
                        text = prof.get(kind, "")
                        profiles_out.append(f"{c.config} {c.method} ({kind}, T={max(tasks)}), "
                                            f"where the time goes:\n{text}")
                        echo(profiles_out[-1])
            checks += cchecks
            for r in crows:
                r.pop("_profiles", None)
            rows += crows
            deep = [r for r in crows if r["method"] == f"lorax-deep-k{DEEP_KS[-1]}" and int(r["T"]) == max(tasks)]
            workers = 0 if args.smoke else args.loader_workers
            lt = loader_throughput(cfg, data, workers=workers, pin=device.type == "cuda",
                                   batches=2 if args.smoke else 6)
            loader[name] = {"workers": workers, "images_per_s": lt,
                            "model_images_per_s": float(deep[0]["infer_images_per_s"]) if deep else float("nan")}
            echo(f"[speed] {name:<18} loader ({workers} workers) {lt:.0f} img/s")
    old_meta: dict[str, Any] = {}
    if chosen and (out / "speed.csv").is_file():  # keep the rows this run did not measure
        fresh = {(r["config"], r["method"]) for r in rows}
        kept = [r for r in _read_csv(out / "speed.csv") if (r["config"], r["method"]) not in fresh]
        if kept:
            echo(f"[speed] kept {len(kept)} rows of {out / 'speed.csv'} not measured by this run")
            rows = kept + rows
            if (out / "speed.json").is_file():
                old_meta = json.loads((out / "speed.json").read_text())
    _write_csv(out / "speed.csv", rows, FIELDS)
    md = markdown_table(rows)
    md += "\n\nData loader (training pipeline alone, generated images):\n\n" + "\n".join(
        f"- {c}: {v['images_per_s']:.0f} img/s with {v['workers']} workers "
        f"(model, lorax-deep k=3 at T={max(tasks)}: {v['model_images_per_s']:.0f} img/s)" for c, v in loader.items())
    (out / "speed.md").write_text(md + "\n\nTargets:\n\n" + "\n".join(f"- {c.line()}" for c in checks) + "\n")
    plot(rows, out / "speed.png")
    (out / "profiles.txt").write_text("\n\n".join(profiles_out) or "no target missed\n")
    commit = git_commit(Path.cwd())
    meta = {"command": command, "machine": machine_info(), "device": str(device), "amp": amp,
            "repeats": args.repeats,
            "warmup": args.warmup, "min_time": args.min_time, "max_T": max(tasks), "date": time.strftime("%Y-%m-%d"),
            "commit": commit, "checks": [c.line() for c in checks], "loader": loader,
            "configs": {n: f"{CONFIGS[n].backbone}, {CONFIGS[n].img_size} px, batch "
                           f"{next(r['batch'] for r in rows if r['config'] == n)}, LoRA rank "
                           f"{CONFIGS[n].lora_r} on '{CONFIGS[n].targets}'" for n in args.configs},
            "methods": methods,
            "profile_note": ("Missed targets: the profiles of the methods concerned are in "
                             "`profiles.txt` next to the CSV and summarised below.\n\n```\n"
                             + "\n\n".join(p[:3000] for p in profiles_out) + "\n```") if profiles_out else ""}
    if old_meta:  # rows of earlier commands were kept: say so, and keep their descriptions
        meta["command"] = f"{old_meta.get('command', '?')}; then {command}"
        meta["configs"] = {**old_meta.get("configs", {}), **meta["configs"]}
        meta["loader"] = {**old_meta.get("loader", {}), **meta["loader"]}
        meta["checks"] = old_meta.get("checks", []) + meta["checks"]
    (out / "speed.json").write_text(json.dumps(meta, indent=2))
    echo(f"wrote {out / 'speed.csv'}, {out / 'speed.md'}, {out / 'speed.png'}")
