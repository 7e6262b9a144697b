"""Your own strategy as a plugin: Avalanche's MAS, registered here, used from the command line.

This file is a plugin module: importing it registers the strategy ``mas``. Any `lorax-cil`
command can use it with ``--plugin``:

    lorax-cil compare --plugin examples/custom_strategy.py --strategies finetune,mas ...
    lorax-cil predict --model runs/compare-custom/mas/seed0 images/   # plugin recorded by the run

Run directly, it makes a small synthetic dataset and runs that comparison:

    python examples/custom_strategy.py
"""

from __future__ import annotations

import argparse

import torch
from avalanche.training.supervised import MAS

from lorax_cil.training.avalanche_baselines import (
    ProtocolOptimizer,
    optimizer_settings,
    template_kwargs,
)
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


def main() -> int:
    from lorax_cil.benchmarks.synth import synthesize
    from lorax_cil.cli import main as lorax_cil

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/example-synth-hard-32px")
    p.add_argument("--out", default="runs/compare-custom")
    args = p.parse_args()
    synthesize(args.data, scenario="synth-hard", per_class=12, val_per_class=6, size=32, seed=0)
    return lorax_cil([  # the same as typing `lorax-cil compare --plugin <this file> ...`
        "compare", "--plugin", __file__, "--strategies", "finetune,mas", "--seeds", "0",
        "--scenario", "synth-hard", "--data-path", args.data, "--crop", "32",
        "--backbone", "vit-test", "--no-pretrained", "--epochs", "1", "--batch-size", "16",
        "--lr-first", "1e-3", "--lr", "1e-3", "--memory-size", "50",
        "--set", "train.warmup_epochs=0", "--set", "train.min_steps_per_task=0",
        "--timing-images", "16", "--out", args.out])


if __name__ == "__main__":
    raise SystemExit(main())
