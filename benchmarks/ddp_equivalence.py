"""Same LoRAX run with 1, 2 and 3 processes (torchrun, gloo, CPU): how far apart are the results?

Trains one small LoRAX configuration (random ``vit-test`` backbone, 3 tasks of the embedded
synthetic data) with ``lorax-cil train`` in one process and with
``torchrun --nproc_per_node N -m lorax_cil train`` for every N, once with LoRA dropout 0 and once
with the default 0.1, then compares every N > 1 with the single process: the final multi-real
accuracy matrix, the learned weights of the last checkpoint, and the exemplar memory. It writes
the table into ``docs/distributed.md`` (between the ``ddp-equivalence`` markers) with the exact
commands, so the page's numbers are this script's output:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ddp_equivalence.py
    .venv/bin/python benchmarks/ddp_equivalence.py --worlds 2 --doc ''   # print only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("nn-upsample", "spectral-peaks", "tconv-checker")
START, END = "<!-- ddp-equivalence:start -->", "<!-- ddp-equivalence:end -->"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 3], help="process counts > 1")
    p.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1])
    p.add_argument("--per-class", type=int, default=16)
    p.add_argument("--val-per-class", type=int, default=8)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate of every task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--memory-size", type=int, default=10)
    p.add_argument("--work", default="runs/ddp-equivalence", help="data and run folders")
    p.add_argument("--doc", default=str(ROOT / "docs" / "distributed.md"),
                   help="page to update ('' = print only)")
    return p.parse_args(argv)


def train_args(a: argparse.Namespace, data: Path, dropout: float, out: Path) -> list[str]:
    return ["train", "--scenario", "custom", "--data-path", str(data), "--tasks", *TASKS,
            "--backbone", "vit-test", "--no-pretrained", "--epochs", str(a.epochs),
            "--batch-size", str(a.batch_size), "--memory-size", str(a.memory_size),
            "--lr-first", str(a.lr), "--lr", str(a.lr),
            "--device", "cpu", "--set", "train.warmup_epochs=1",
            "--set", "train.min_steps_per_task=0", "--set", "model.lora_r=4",
            "--set", "model.lora_alpha=8", "--set", f"model.lora_dropout={dropout}",
            "--out", str(out)]


def command(world: int, args: list[str]) -> list[str]:
    if world == 1:
        return [sys.executable, "-m", "lorax_cil", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={world}", "-m", "lorax_cil", *args]


def run(cmd: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {shlex.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def load(run_dir: Path) -> dict:
    import numpy as np
    from safetensors.torch import load_file

    from lorax_cil.evaluation.metrics import AccuracyMatrix

    ck = run_dir / "checkpoints" / f"exp_{len(TASKS) - 1:03d}"
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"R": AccuracyMatrix.from_csv(run_dir / "accuracy_multi_real.csv").matrix,
            "w": load_file(str(ck / "tensors.safetensors")),
            "memory": json.loads((ck / "meta.json").read_text())["memory"],
            "summary": summary, "nan": np.nan}


def compare(ref: dict, other: dict) -> dict:
    import numpy as np

    dR = np.nanmax(np.abs(other["R"] - ref["R"]))
    dw = max(float((other["w"][k].float() - ref["w"][k].float()).abs().max()) for k in ref["w"])
    same = sum(len(set(ref["memory"][c]) & set(other["memory"].get(c, []))) for c in ref["memory"])
    return {"dR": 100 * dR, "dw": dw, "same_exemplars": same,
            "AA": 100 * other["summary"]["multi_real_aa"],
            "exemplars": other["summary"]["memory_exemplars"],
            "world": other["summary"]["world_size"]}


def render(a: argparse.Namespace, rows: list[dict], cmds: list[str]) -> str:
    lines = [START, "",
             f"Measured by `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ddp_equivalence.py` on "
             f"{platform.machine()} CPU, {os.cpu_count()} cores, one thread per process, gloo "
             f"(torch {__import__('torch').__version__}). Data: tasks {', '.join(TASKS)} of "
             f"`synth-easy` ({a.per_class} train and {a.val_per_class} val images per class, "
             f"32 px); `vit-test` backbone (random), LoRA r=4, {a.epochs} epochs per task, "
             f"learning rate {a.lr}, global batch {a.batch_size}, memory {a.memory_size}.", "",
             "| LoRA dropout | processes | AA (multi-real %) | max abs. diff. of the final matrix vs 1 "
             "process (pp) | max abs. weight diff. | exemplars (distinct) | exemplars shared "
             "with 1 process |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dropout']} | {r['world']} | {r['AA']:.2f} | {r['dR']:.2f} | "
                     f"{r['dw']:.2e} | {r['exemplars']} | {r['same_exemplars']} |")
    lines += ["", f"Commands (`DATA`: the folder the script synthesizes, `WORLD`: "
              f"{', '.join(map(str, a.worlds))}, `model.lora_dropout` set to each of "
              f"{', '.join(map(str, a.dropouts))}):", "", "```bash",
              *cmds, "```", "", END]
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from lorax_cil.benchmarks.synth import synthesize

    work = Path(a.work)
    data = synthesize(work / "data", scenario="synth-easy", per_class=a.per_class,
                      val_per_class=a.val_per_class, size=32, seed=0, workers=1)
    rows, cmds = [], []
    for dropout in a.dropouts:
        runs = {}
        for world in [1, *a.worlds]:
            out = work / f"d{dropout}-w{world}"
            if not (out / "summary.json").is_file():
                cmd = command(world, train_args(a, data, dropout, out))
                print("$", shlex.join(cmd), flush=True)
                run(cmd)
            runs[world] = load(out)
            row = compare(runs[1], runs[world])
            rows.append({"dropout": dropout, **row})
            print(f"dropout {dropout}, {world} process(es): AA {row['AA']:.2f}, "
                  f"max |dR| {row['dR']:.2f} pp, max |dw| {row['dw']:.2e}, "
                  f"{row['exemplars']} exemplars, {row['same_exemplars']} shared", flush=True)
        if not cmds:
            base = train_args(a, Path("DATA"), dropout, Path("OUT"))
            cmds = ["lorax-cil " + shlex.join(base),
                    "torchrun --standalone --nproc_per_node WORLD -m lorax_cil " + shlex.join(base)]
    text = render(a, rows, cmds)
    if a.doc:
        doc = Path(a.doc)
        page = doc.read_text(encoding="utf-8")
        if START not in page or END not in page:
            sys.exit(f"{doc} has no {START} ... {END} block")
        head, rest = page.split(START, 1)
        doc.write_text(head + text + rest.split(END, 1)[1], encoding="utf-8")
        print(f"updated {doc}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
