"""Write the backward-compatibility fixtures of tests/test_compat_checkpoints.py.

    OMP_NUM_THREADS=1 python tests/data/make_compat_checkpoints.py

Two kinds of fixture under ``tests/data/compat/``, each with the outputs the writing code
produced on the fixed input ``input.safetensors`` (``x``, 3 images of 32 px) in
``expected.safetensors`` (``logits``, ``features``):

* ``net-<kind>/``: an ``ExpandableNet`` of every extractor kind on the random ``vit-test``
  backbone (seed 0), two tasks, its learned tensors perturbed so that every tensor matters,
  written with ``save_checkpoint(folder, net.learned_state_dict(), {"architecture": ...})``;
* ``run-<strategy>/``: a two-task run (``lorax``, ``memo`` with ``adapt_blocks: 1``) trained by
  ``Run`` on generated 32 px images; ``config.yaml`` and the last checkpoint are kept.

The committed files were written by the code at the commit recorded in ``written_by.json``
(before the extractor interface existed); re-running this script on later code would only
reproduce them if nothing changed, which is what the test checks.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import make_cddb_tree  # noqa: E402
from lorax_cil.models.backbones import create_backbone  # noqa: E402
from lorax_cil.models.expandable import ExpandableNet  # noqa: E402
from lorax_cil.models.lora import LoraSpec  # noqa: E402
from lorax_cil.models.mole import MoleSpec  # noqa: E402
from lorax_cil.training.checkpoint import save_checkpoint  # noqa: E402

OUT = ROOT / "tests" / "data" / "compat"

#: kind -> ExpandableNet keyword arguments (besides the backbone)
NETS = {
    "lora": dict(extractor="lora", lora=LoraSpec(r=2, alpha=4.0, dropout=0.0, targets="attn")),
    "lora-k2": dict(extractor="lora", adapt_blocks=2,
                    lora=LoraSpec(r=2, alpha=4.0, dropout=0.0, targets="attn+mlp")),
    "mole": dict(extractor="mole", mole=MoleSpec(shared_rank=2, expert_ranks=(1, 2), blocks=1)),
    "full": dict(extractor="full", adapt_blocks=1),
    "finetune": dict(extractor="finetune", adapt_blocks=1, divergence_head=False),
    "frozen": dict(extractor="frozen", divergence_head=False),
}


def fixed_input() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1234))


def outputs(net) -> dict[str, torch.Tensor]:
    net.eval()
    x = fixed_input()
    with torch.no_grad():
        out = net.forward_all(x)
    return {"logits": out.logits.contiguous(), "features": out.features.contiguous()}


def write_nets() -> None:
    for name, kwargs in NETS.items():
        torch.manual_seed(0)
        net = ExpandableNet(backbone=create_backbone("vit-test"), **kwargs)
        for n in (2, 3):
            net.add_task(n)
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():  # every learned tensor non-trivial (B of LoRA starts at zero)
            sd = net.learned_state_dict()
            sd = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in sd.items()}
            net.load_learned_state_dict(sd)
        folder = OUT / f"net-{name}"
        shutil.rmtree(folder, ignore_errors=True)
        save_checkpoint(folder / "checkpoint", net.learned_state_dict(),
                        {"architecture": net.architecture(), "backbone_seed": 0})
        save_file(outputs(net), str(folder / "expected.safetensors"))
        print(f"wrote {folder}")


def write_runs() -> None:
    from lorax_cil.benchmarks.scenarios import resolve_scenario
    from lorax_cil.training.config import RunConfig, merge_config
    from lorax_cil.training.evaluate import load_trained
    from lorax_cil.training.runner import Run

    with tempfile.TemporaryDirectory() as tmp:
        data = make_cddb_tree(Path(tmp) / "data", tasks=("a", "b"), n=3, size=(32, 32),
                              subclass_tasks=())
        for strategy, model in (("lorax", {"lora_r": 2, "lora_alpha": 4.0, "lora_targets": "attn"}),
                                ("memo", {"adapt_blocks": 1})):
            cfg = merge_config(RunConfig(), {
                "model": {"backbone": "vit-test", "pretrained": False, **model},
                "data": {"scenario": "custom"},
                "train": {"strategy": strategy, "epochs": 1, "batch_size": 4, "warmup_epochs": 0,
                          "memory_size": 4, "eval_batch_size": 8, "num_workers": 0, "seed": 3},
            }, source="compat fixture")
            run_dir = Path(tmp) / strategy
            run = Run(cfg, run_dir=run_dir)
            run.setup(resolve_scenario("custom", data_path=data, tasks=["a", "b"]))
            run.train()
            folder = OUT / f"run-{strategy}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            shutil.copyfile(run_dir / "config.yaml", folder / "config.yaml")
            shutil.copytree(run_dir / "checkpoints" / "exp_001", folder / "checkpoints" / "exp_001")
            (folder / "checkpoints" / "latest.json").write_text(json.dumps({"folder": "exp_001"}))
            net, *_ = load_trained(folder)
            save_file(outputs(net), str(folder / "expected.safetensors"))
            print(f"wrote {folder}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({"x": fixed_input()}, str(OUT / "input.safetensors"))
    write_nets()
    write_runs()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "lorax_cil"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    (OUT / "written_by.json").write_text(json.dumps(
        {"commit": commit, "lorax_cil_modified": bool(dirty), "torch": torch.__version__,
         "command": "OMP_NUM_THREADS=1 python tests/data/make_compat_checkpoints.py"}, indent=2) + "\n")
