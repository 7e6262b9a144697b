"""LoRAX inside a plain Avalanche script.

Builds the class-incremental stream of a generator-folder scenario, creates the expandable
network, and trains the ``LoRAX`` strategy with Avalanche's own loop, evaluation plugin and
loggers. Runs on the embedded synthetic data in about a minute on 2 CPU cores:

    python examples/lorax_avalanche.py --backbone vit-test
    python examples/lorax_avalanche.py --backbone efficientnet-lite0   # pretrained, offline
"""

from __future__ import annotations

import argparse

from avalanche.evaluation.metrics import loss_metrics
from avalanche.logging import InteractiveLogger, TextLogger
from avalanche.training.plugins import EvaluationPlugin

from lorax_cil.benchmarks.scenarios import resolve_scenario
from lorax_cil.benchmarks.streams import build_cil_benchmark
from lorax_cil.benchmarks.synth import synthesize
from lorax_cil.benchmarks.transforms import TransformConfig
from lorax_cil.models.backbones import create_backbone
from lorax_cil.models.expandable import ExpandableNet
from lorax_cil.models.lora import LoraSpec
from lorax_cil.training.avalanche_metrics import attribution_metrics
from lorax_cil.training.strategy import LoRAX


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/example-synth-hard-48px")
    p.add_argument("--backbone", default="vit-test")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args()

    # 1. Data: five generator tasks in CDDB layout, streamed from disk.
    synthesize(args.data, scenario="synth-hard", per_class=40, val_per_class=20, size=48, seed=0)
    scenario = resolve_scenario("synth-hard", data_path=args.data)
    backbone = create_backbone(args.backbone, pretrained=args.backbone == "efficientnet-lite0")
    spec = backbone.spec
    # CNNs take any input size; ViTs expect their configured one.
    crop = 48 if spec.family == "efficientnet-lite" else spec.input_size
    bench = build_cil_benchmark(
        scenario, transform_config=TransformConfig(size=crop, mean=spec.mean, std=spec.std)
    )

    # 2. Model: frozen backbone, one LoRA extractor per task, expanding head.
    targets = "pointwise" if spec.family == "efficientnet-lite" else "attn"
    net = ExpandableNet(backbone=backbone, extractor="lora",
                        lora=LoraSpec(r=8, alpha=16, dropout=0.0, targets=targets))

    # 3. Avalanche evaluation: attribution metrics (multi-real, binary, strict, AP) + loggers.
    metrics = attribution_metrics(class_is_fake=scenario.class_is_fake,
                                  class_task=scenario.class_task,
                                  task_names=scenario.task_names)
    loggers = [TextLogger(open("/dev/null", "w"))] if args.quiet else [InteractiveLogger()]
    evaluator = EvaluationPlugin(*metrics, loss_metrics(epoch=True), loggers=loggers)

    strategy = LoRAX(model=net, lr_first=1e-3, lr=1e-3, warmup_epochs=0, memory_size=50,
                     train_mb_size=16, train_epochs=args.epochs, eval_mb_size=64,
                     evaluator=evaluator)

    # 4. The usual Avalanche loop.
    for exp in bench.train_stream:
        strategy.train(exp)
        strategy.eval(bench.test_stream[: exp.current_experience + 1])

    R = metrics[0].accuracy_matrix("multi_real")
    print(R.to_frame().round(3))
    print("summary:", {k: round(v, 4) for k, v in R.summary().items()})
    print("exemplars per class:", strategy.memory.per_class())


if __name__ == "__main__":
    main()
