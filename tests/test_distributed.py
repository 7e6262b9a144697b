"""Distributed training on CPU with gloo: 2 processes started by the tests (torchrun).

Tolerance of the end-to-end comparison: every cell of the final accuracy matrices of the
2-process and the 1-process run differs by at most one evaluation image (1/12 here). The two
runs draw the same global batches; only the order of floating-point sums differs (measured: the
matrices are equal and the weights differ by < 1e-3 after 3 tasks), and LoRA dropout is 0 so that
no per-rank random mask enters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from lorax_cil.distributed import GlobalBatchSampler, gather_ordered, shard_bounds

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")

TASKS = ("nn-upsample", "spectral-peaks", "tconv-checker")
VAL_PER_CLASS = 6
BUDGET = 10
RUN_ARGS = ["--scenario", "custom", "--tasks", *TASKS, "--backbone", "vit-test",
            "--no-pretrained", "--epochs", "2", "--batch-size", "8",
            "--memory-size", str(BUDGET), "--device", "cpu",
            "--set", "train.warmup_epochs=1", "--set", "train.min_steps_per_task=0",
            "--set", "model.lora_r=4",
            "--set", "model.lora_alpha=8", "--set", "model.lora_dropout=0.0"]


def torchrun(args: list[str], *, nproc: int = 2, timeout: int = 240) -> str:
    """Run ``python -m torch.distributed.run --standalone`` with one thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from lorax_cil.benchmarks.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("synth"), scenario="synth-easy", per_class=12,
                      val_per_class=VAL_PER_CLASS, size=32, seed=0, workers=1)


# --- pieces (one process) -----------------------------------------------------------------------
@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (5, 2), (12, 3), (7, 4)])
def test_shards_tile_the_dataset_without_padding(n, world):
    bounds = [shard_bounds(n, rank_=r, world=world) for r in range(world)]
    covered = [i for lo, hi in bounds for i in range(lo, hi)]
    assert covered == list(range(n))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("n,batch,world", [(27, 8, 2), (17, 8, 3), (9, 4, 2), (10, 5, 4)])
def test_global_batches_are_the_single_process_batches_split_over_ranks(n, batch, world):
    single = GlobalBatchSampler(n, batch, rank_=0, world=1)
    single.set_seed(1234)
    expected = list(single)
    # a single-process DataLoader(shuffle=True) with that seed draws the same batches
    gen = torch.Generator()
    gen.manual_seed(1234)
    perm = torch.randperm(n, generator=gen).tolist()
    assert expected == [perm[i:i + batch] for i in range(0, n, batch)]
    parts, counts = [], []
    for r in range(world):
        s = GlobalBatchSampler(n, batch, rank_=r, world=world)
        s.set_seed(1234)
        parts.append(list(s))
        counts.append(s.local_counts)
        assert len(parts[-1]) == len(single)  # every rank runs the same number of steps
    for step, b in enumerate(expected):
        real = [parts[r][step][:counts[r][step]] for r in range(world)]
        assert [i for part in real for i in part] == b  # union in order, each sample once
        assert sum(counts[r][step] for r in range(world)) == len(b)


def test_gather_ordered_single_process_checks_the_count():
    cols = gather_ordered(3, 0, [[10, 11, 12], ["a", "b", "c"]])
    assert cols == [[10, 11, 12], ["a", "b", "c"]]
    with pytest.raises(RuntimeError, match="hold 2 samples, the dataset 3"):
        gather_ordered(3, 0, [[10, 11]])


def test_run_fails_when_the_memory_exceeds_its_budget():
    from types import SimpleNamespace

    from lorax_cil.training.runner import Run

    class Memory:
        def unique_exemplars(self, paths_of):
            return {(c, f"img{i}.png") for c in range(2) for i in range(6)}  # 12 distinct

    fake = SimpleNamespace(strategy=SimpleNamespace(memory=Memory()),
                           bench=SimpleNamespace(paths_of=None),
                           cfg=SimpleNamespace(train=SimpleNamespace(memory_size=11)))
    with pytest.raises(RuntimeError, match="12 distinct samples over 1 process.*memory_size=11"):
        Run.check_memory(fake)
    fake.cfg.train.memory_size = 12
    assert Run.check_memory(fake) == 12


# --- collectives with 2 processes ---------------------------------------------------------------
COLLECTIVES = textwrap.dedent("""
    import json, sys, torch
    from lorax_cil import distributed as d

    with d.distributed_session("cpu", import_avalanche=False) as info:
        r = info.rank
        # gradients of a mean loss over n_r samples; rank 1 has an empty part of the batch
        counts = [3, 0]
        a = torch.nn.Parameter(torch.zeros(4))
        b = torch.nn.Parameter(torch.zeros(2))  # no gradient on rank 1
        c = torch.nn.Parameter(torch.zeros(1))  # no gradient anywhere
        a.grad = torch.full((4,), float(r + 1))
        b.grad = torch.full((2,), 5.0) if r == 0 else None
        total = d.allreduce_gradients([a, b, c], counts[r], bucket_bytes=8)
        # evaluation: 5 items over 2 ranks, gathered in order
        lo, hi = d.shard_bounds(5)
        cols = d.gather_ordered(5, lo, [list(range(lo, hi)), [10 * i for i in range(lo, hi)]])
        obj = d.broadcast_object({"from": r})
        p = torch.nn.Parameter(torch.full((3,), float(r)))
        d.broadcast_parameters([p])
        json.dump({"total": total, "a": a.grad.tolist(), "b": b.grad.tolist(),
                   "c": c.grad is None, "cols": cols, "obj": obj, "p": p.tolist(),
                   "world": d.world_size(), "main": d.is_main()},
                  open(sys.argv[1] + f".{r}.json", "w"))
""")


def run_script_on_two_processes(tmp_path, text: str) -> list:
    """Run ``text`` under torchrun with 2 processes; each writes ``<argv[1]>.<rank>.json``:
    the loaded results, in rank order."""
    script, out = tmp_path / "script.py", tmp_path / "out"
    script.write_text(text)
    torchrun([str(script), str(out)])
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(2)]


def test_collectives_with_two_gloo_processes(tmp_path):
    res = run_script_on_two_processes(tmp_path, COLLECTIVES)
    for r, x in enumerate(res):
        assert x["world"] == 2 and x["main"] == (r == 0) and x["total"] == 3
        # weighted mean: (3 * 1 + 0 * 2) / 3 on a; b had a gradient on rank 0 only
        assert x["a"] == [1.0] * 4 and x["b"] == [5.0] * 2 and x["c"] is True
        assert x["cols"] == [[0, 1, 2, 3, 4], [0, 10, 20, 30, 40]]
        assert x["obj"] == {"from": 0} and x["p"] == [0.0] * 3


BALANCED_STAGE = textwrap.dedent("""
    import json, sys, torch
    from torch import nn
    from lorax_cil import distributed as d
    from lorax_cil.training.head_balance import HeadBalancer, HeadOptions

    with d.distributed_session("cpu", import_avalanche=False) as info:
        torch.manual_seed(7)
        net = type("N", (), {})()
        net.head, net.num_classes, net.num_tasks = nn.Linear(8, 4), 4, 2
        gen = torch.Generator().manual_seed(0)
        new_x, mem_x = torch.randn(20, 8, generator=gen), torch.randn(4, 8, generator=gen)
        torch.rand(1 + 50 * info.rank)  # the processes' training consumed different draws
        HeadBalancer(HeadOptions(balanced_steps=7, balanced_batch=3)).balanced_finetune(
            net, new_x, torch.tensor([2, 3] * 10), mem_x, torch.tensor([0, 0, 1, 1]), 2,
            device="cpu")
        json.dump(net.head.weight.tolist(), open(sys.argv[1] + f".{info.rank}.json", "w"))
""")


def test_balanced_head_stage_leaves_one_head_on_every_process(tmp_path):
    heads = run_script_on_two_processes(tmp_path, BALANCED_STAGE)
    assert heads[0] == heads[1]


# --- a LoRAX run with 2 processes -----------------------------------------------------------------
def _single_process_run(synth_root, out):
    from lorax_cil.cli import main

    assert main(["train", "--data-path", str(synth_root), *RUN_ARGS, "--out", str(out)]) == 0
    return out


def _matrix(run_dir, name: str = "accuracy_multi_real.csv") -> np.ndarray:
    from lorax_cil.evaluation.metrics import AccuracyMatrix

    return AccuracyMatrix.from_csv(Path(run_dir) / name).matrix


def test_two_process_run_resumed_matches_one_process_run(synth_root, tmp_path):
    """2 processes train 2 tasks, stop, resume (2 processes) for task 3; the result matches one
    process within one evaluation image per cell, and the memory is one global selection."""
    ddp = tmp_path / "ddp"
    torchrun(["-m", "lorax_cil", "train", "--data-path", str(synth_root), *RUN_ARGS,
              "--out", str(ddp), "--stop-after", "2"])
    ck = sorted(p.name for p in (ddp / "checkpoints").glob("exp_*"))
    assert ck == ["exp_000", "exp_001"]
    assert not list((ddp / "checkpoints").rglob("*.tmp"))  # written once, renamed into place
    out = torchrun(["-m", "lorax_cil", "train", "--resume", str(ddp)])
    assert out.count("multi-real accuracy matrix") == 1  # only rank 0 reports

    single = _single_process_run(synth_root, tmp_path / "single")
    R2, R1 = _matrix(ddp), _matrix(single)
    assert R2.shape == R1.shape == (3, 3)
    assert np.array_equal(np.isnan(R2), np.isnan(R1))
    tol = 1.0 / (2 * VAL_PER_CLASS) + 1e-9  # one evaluation image of a task
    assert np.nanmax(np.abs(R2 - R1)) <= tol
    # the LoRAX default on a ViT: the head, balanced after each task on every process alike
    for run in (ddp, single):
        config = (run / "config.yaml").read_text()
        assert "readout: head" in config and "head_balanced_steps: 100" in config

    steps = [json.loads(line) for line in (ddp / "steps.jsonl").read_text().splitlines()]
    assert [s["world_size"] for s in steps] == [2, 2, 2]
    for s in steps:
        assert s["memory_exemplars"] == sum(s["memory_per_class"].values()) <= BUDGET
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["memory_exemplars"] <= BUDGET
    assert summary["completed_tasks"] == 3
    # the same class-balanced split of the budget as one process (measured: the same images)
    assert steps[-1]["memory_per_class"] == json.loads(
        (single / "steps.jsonl").read_text().splitlines()[-1])["memory_per_class"]
    one = json.loads((single / "summary.json").read_text())
    assert one["world_size"] == 1 and one["memory_exemplars"] == summary["memory_exemplars"]


def test_torchrun_refusals_name_every_strategy_that_can_train_distributed():
    """The refusal lists the registered LoRAX-class strategies (lorax-ca included), not a
    hand-kept list."""
    from lorax_cil.training.builtin_strategies import lorax_family_strategies
    from lorax_cil.training.compare import _check_distributed
    from lorax_cil.training.runner import _check_distributed_strategy

    family = lorax_family_strategies()
    assert {"lorax", "lorax-deep", "lorax-ca", "lorax-mole", "finetune", "finetune-replay"} <= set(family)
    assert "icarl" not in family and "simplecil" not in family
    with pytest.raises(ValueError, match="lorax-ca") as err:
        _check_distributed(["lorax-ca", "icarl"])
    assert "['icarl']" in str(err.value)
    with pytest.raises(ValueError, match="lorax-ca"):
        _check_distributed_strategy("icarl", object())
    _check_distributed(["lorax-ca", "finetune"])  # every one of them is accepted


@pytest.mark.parametrize("strategy", ["lorax-ca", "lorax-side", "lorax-distill"])
def test_shared_pass_strategies_train_under_torchrun_as_in_one_process(synth_root, tmp_path, strategy):
    """The kinds whose tasks read one shared frozen pass (class-attention tokens, side networks,
    side networks distilled from LoRA teachers) train under torchrun: after 2 tasks every stored
    tensor matches a one-process run (the sums of the gradient all-reduce in another order), and
    the second task's module did train (its zero-initialised output is no longer zero)."""
    from safetensors.torch import load_file

    from lorax_cil.cli import main

    args = [a for a in RUN_ARGS if a != TASKS[2]] + ["--strategy", strategy]  # 2 tasks
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    torchrun(["-m", "lorax_cil", "train", "--data-path", str(synth_root), *args, "--out", str(ddp)])
    assert main(["train", "--data-path", str(synth_root), *args, "--out", str(single)]) == 0
    a, b = (load_file(str(r / "checkpoints" / "exp_001" / "tensors.safetensors")) for r in (ddp, single))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=2e-3), key
    zero_init = {"lorax-ca": ".B", "lorax-side": "up.weight", "lorax-distill": "up.weight"}[strategy]
    trained = [k for k in a if k.startswith("extractor.1.") and k.endswith(zero_init)]
    assert trained and all(float(a[k].abs().max()) > 0 for k in trained)
    steps = [json.loads(line) for line in (ddp / "steps.jsonl").read_text().splitlines()]
    assert [s["world_size"] for s in steps] == [2, 2]
