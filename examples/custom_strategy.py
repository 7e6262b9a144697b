"""Add your own strategy to the registry and compare it (Avalanche's MAS, in under 60 lines).

    python examples/custom_strategy.py
"""

from __future__ import annotations

import argparse

import torch
from avalanche.training.supervised import MAS

from lorax_cil.benchmarks.synth import synthesize
from lorax_cil.training.avalanche_baselines import (
    ProtocolOptimizer, optimizer_settings, template_kwargs)
from lorax_cil.training.compare import run_comparison
from lorax_cil.training.config import RunConfig, merge_config
from lorax_cil.training.registry import register_strategy
from lorax_cil.training.run_protocol import NoMemory
from lorax_cil.training.strategy import ExpandableModel


class MASStrategy(ProtocolOptimizer, MAS):  # the run's AdamW + schedule, then Avalanche's MAS
    def __init__(self, *, protocol, **kwargs):
        super().__init__(optimizer=torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]),
                         criterion=torch.nn.CrossEntropyLoss(), **kwargs)
        self.memory = NoMemory(strategy="mas", resume_error="MAS importances are not saved")
        self.setup_protocol(**protocol)


@register_strategy("mas", description="Fine-tuning with Avalanche MAS (no memory)",
                   model={"extractor": "finetune", "divergence_head": False},
                   train={"memory_size": 0, "head_div": 0.0}, resumable=False)
def build_mas(cfg, net, device, evaluator, plugins):
    return MASStrategy(model=ExpandableModel(net), lambda_reg=1.0, protocol=optimizer_settings(cfg),
                       **template_kwargs(cfg, device, evaluator, plugins))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/example-synth-hard-32px")
    p.add_argument("--out", default="runs/compare-custom")
    args = p.parse_args()
    synthesize(args.data, scenario="synth-hard", per_class=12, val_per_class=6, size=32, seed=0)
    cfg = merge_config(RunConfig(), {
        "data": {"scenario": "synth-hard", "data_path": args.data, "crop": 32},
        "model": {"backbone": "vit-test", "pretrained": False},
        "train": {"epochs": 1, "batch_size": 16, "lr_first": 1e-3, "lr": 1e-3,
                  "warmup_epochs": 0, "memory_size": 50},
    }, source="example")
    result = run_comparison(cfg, strategies=["finetune", "mas"], seeds=[0], out=args.out,
                            timing_images=16)
    print(f"{result.caption}\n\n{result.table_markdown}")


if __name__ == "__main__":
    main()
