"""Few-shot ablation: LoRAX head options vs prototype and replay baselines at 14/50/200 images.

For every training-set size (images per class), the embedded synthetic scenario is synthesized
(``<scenario>-fewshot`` at 10-30 images, the base scenario above; the same number of evaluation
images at every size) and every variant is trained with the same memory of
``--memory-per-class`` exemplars per class (``fewshot_memory_size``), for every seed. Writes
``fewshot.csv`` (one row per variant and size: mean and std over seeds) and ``fewshot.md``
(the table, the command and the settings) under ``--out``; finished runs are reused.

    OMP_NUM_THREADS=1 python benchmarks/fewshot.py --per-class 14 50 200 --seeds 0 1 2

Variants (``--variants``, comma-separated): ``lorax`` with the strategy's current defaults, and
``lorax+OPT[+OPT...]``: every head option off, then OPT, one of ``proto`` (prototype
initialisation of new head rows),
``wa`` (weight aligning), ``bal`` (balanced head fine-tuning, ``--balanced-steps`` steps),
``ncm`` (nearest-class-mean read-out), ``ncmf`` (the ``ncm-frozen`` read-out: each class on
the feature blocks of its own time), ``ncmr`` (the ``ncm-relative`` read-out: ``ncm-frozen``
with each block's cosine minus the block's baseline similarity), ``cbl`` (class-balanced
training loss), ``official`` (every head option off), ``epochs`` (no minimum step count:
``train.min_steps_per_task=0``);
and the baselines ``simplecil``, ``finetune-replay``, ``der-expandable``, ``icarl`` (any
registered strategy name works), which train the whole network; ``NAME@kN`` trains
``finetune``, ``finetune-replay`` or ``icarl`` on the last ``N`` blocks only, as LoRAX (e.g.
``icarl@k3``); ``memo`` is DER on the last ``--adapt-blocks`` blocks.

``--rescore ncm-relative,head`` also reads every finished run of a LoRAX-family variant with
those read-outs (exact, no training: :func:`lorax_cil.training.evaluate.readout_matrices`) and
adds a row ``VARIANT:READOUT`` per read-out, so one training gives every read-out's row (the
``train s`` cell is the shared training's). Read-outs a run cannot be read with are refused,
naming the run; a run's own read-out gives no extra row. Cached in ``<run>/rescore-<readout>.json``.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VARIANTS = ("lorax+official,lorax+official+epochs,lorax+proto,lorax+wa,lorax+bal,"
                    "lorax+ncm,lorax+proto+wa,lorax+proto+bal+wa,simplecil,finetune-replay")
METRICS = (("aa", "multi_real_aa", "AA multi-real %"), ("bwt", "multi_real_bwt", "BWT %"),
           ("binary", "binary_aa", "binary AA %"), ("strict", "strict_aa", "strict AA %"),
           ("train_s", "train_seconds", "train s"))
#: baselines that train the whole network unless the variant says ``@kN``
WHOLE_NETWORK = ("finetune", "finetune-replay", "icarl", "der-expandable")
OPTIONS = {
    "official": {"head_init": "random", "head_wa": False, "head_balanced_steps": 0,
                 "readout": "head", "head_balanced_loss": False},
    "proto": {"head_init": "prototype"},
    "wa": {"head_wa": True},
    "bal": {"head_balanced_steps": None},  # --balanced-steps
    "ncm": {"readout": "ncm"},
    "ncmf": {"readout": "ncm-frozen"},
    "ncmr": {"readout": "ncm-relative"},
    "cbl": {"head_balanced_loss": True},
    "epochs": {"min_steps_per_task": 0},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", default="synth-hard", help="synth-easy, synth-hard or synth-long")
    p.add_argument("--per-class", type=int, nargs="+", default=[14, 50, 200],
                   help="training images per class (one table block per value)")
    p.add_argument("--val-per-class", type=int, default=50)
    p.add_argument("--tasks", type=int, default=None, help="use only the first N tasks")
    p.add_argument("--size", type=int, default=32, help="image size (px) and crop")
    p.add_argument("--backbone", default="efficientnet-lite0",
                   help="efficientnet-lite0, dinov2-vits14 (with --img-size = --size), ...")
    p.add_argument("--img-size", type=int, default=None,
                   help="backbone input size (a ViT's crop must equal it)")
    p.add_argument("--no-pretrained", action="store_true", help="random backbone weights")
    p.add_argument("--adapt-blocks", type=int, default=3,
                   help="LoRAX extractors on the last k blocks (0: every block)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--memory-per-class", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3, help="lr and lr_first")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--balanced-steps", type=int, default=100)
    p.add_argument("--no-cache-trunk", dest="cache_trunk", action="store_false",
                   help="recompute the frozen trunk every epoch (results are the same)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra config for every run (e.g. train.min_steps_per_task=100)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--rescore", default="", metavar="READOUT[,READOUT]",
                   help="also read the LoRAX runs with these read-outs (ncm-frozen, "
                        "ncm-relative, head): one VARIANT:READOUT row each, no training")
    p.add_argument("--table-only", action="store_true",
                   help="only tabulate finished runs under --out (missing runs are left out)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--data", default=None, help="data root (default: data/fewshot-<size>px)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fewshot"))
    return p.parse_args(argv)


def variant_blocks(name: str) -> tuple[str, int | None]:
    """``(variant, adapt_blocks)`` of ``NAME@kN`` (a baseline trained on the last ``N`` blocks,
    as LoRAX; plain names give ``None``: the whole network)."""
    base, at, k = name.partition("@k")
    if not at:
        return name, None
    if base == "der-expandable":
        raise SystemExit(f"variant {name!r}: DER on the last blocks is the variant 'memo' "
                         "(on --adapt-blocks blocks)")
    if not k.isdigit() or int(k) < 1 or base not in WHOLE_NETWORK:
        raise SystemExit(f"variant {name!r}: '@kN' takes a positive block count after one of "
                         f"{[w for w in WHOLE_NETWORK if w != 'der-expandable']} (e.g. icarl@k3; "
                         "LoRAX variants use --adapt-blocks)")
    return base, int(k)


def variant_config(name: str, args: argparse.Namespace) -> tuple[str, dict]:
    """(strategy, train overrides) of a variant name."""
    name, _ = variant_blocks(name)
    strategy, *opts = name.split("+")
    # lorax+OPT...: every head option off, then OPT (plain "lorax": the strategy's defaults)
    train: dict = dict(OPTIONS["official"]) if opts else {}
    for opt in opts:
        if opt not in OPTIONS:
            raise SystemExit(f"unknown variant option {opt!r} in {name!r}; valid: {sorted(OPTIONS)}")
        values = dict(OPTIONS[opt])
        if opt == "bal":
            values["head_balanced_steps"] = args.balanced_steps
        train.update(values)
    return strategy, train


def dataset(args: argparse.Namespace, per_class: int) -> tuple[str, Path]:
    from lorax_cil.benchmarks.synth import FEWSHOT, FEWSHOT_RANGE, synthesize

    fewshot = {base: name for name, base in FEWSHOT.items()}
    lo, hi = FEWSHOT_RANGE
    scenario = fewshot[args.scenario] if lo <= per_class <= hi else args.scenario
    root = Path(args.data or ROOT / "data" / f"fewshot-{args.size}px") / f"{scenario}-{per_class}"
    synthesize(root, scenario=scenario, per_class=per_class, val_per_class=args.val_per_class,
               size=args.size, seed=0)
    return scenario, root


def parse_sets(items) -> dict:
    import yaml

    out: dict = {}
    for item in items:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name] = yaml.safe_load(value)
    return out


def run_one(args, variant: str, scenario: str, root: Path, per_class: int, seed: int) -> dict:
    from lorax_cil.benchmarks.scenarios import resolve_scenario
    from lorax_cil.training.config import RunConfig, merge_config
    from lorax_cil.training.runner import Run

    out = Path(args.out) / "runs" / f"{per_class}" / variant / f"seed{seed}"
    strategy, train = variant_config(variant, args)
    tasks = resolve_scenario(scenario, data_path=root).task_names[: args.tasks]
    # the budget that leaves --memory-per-class exemplars per class after the last task
    memory = 2 * len(tasks) * args.memory_per_class
    base = {
        "data": {"scenario": "custom", "crop": args.size, "tasks": list(tasks)},
        "model": {"backbone": args.backbone, "pretrained": not args.no_pretrained,
                  "img_size": args.img_size,
                  "lora_r": args.lora_r, "lora_alpha": float(args.lora_r), "lora_dropout": 0.0,
                  "adapt_blocks": args.adapt_blocks or None},
        "train": {"strategy": strategy, "epochs": args.epochs, "batch_size": args.batch_size,
                  "eval_batch_size": 128, "lr_first": args.lr, "lr": args.lr, "min_lr": 1e-5,
                  "memory_size": 0 if strategy == "simplecil" else memory, "seed": seed,
                  "device": "cpu", "checkpoint_every_task": False, **train},
    }
    cfg = merge_config(RunConfig(), base, source=variant)
    cfg = merge_config(cfg, parse_sets(args.set), source="--set")
    if strategy == "simplecil":
        cfg.model.adapt_blocks = None  # no training: the frozen backbone's feature
    elif strategy in WHOLE_NETWORK:
        cfg.model.adapt_blocks = variant_blocks(variant)[1]  # None: the whole network
    elif cfg.model.adapt_blocks and args.cache_trunk:
        cfg.train.cache_trunk = True  # deterministic transform at crop = image size
    if (out / "summary.json").is_file():
        check_same_config(out, cfg)
        return json.loads((out / "summary.json").read_text())
    if args.table_only:
        return {}
    kwargs = {"display": "off"} if "display" in inspect.signature(Run).parameters else {}
    run = Run(cfg, run_dir=out, progress=lambda m: print(f"    {m}", flush=True), **kwargs)
    run.setup(resolve_scenario("custom", data_path=root, tasks=tasks))
    return run.train()


#: keys a finished run may differ in without being another experiment
_RUN_ONLY = {"device", "num_workers", "eval_batch_size", "cache_trunk"}


def _same(a, b) -> bool:
    """Equal settings. ``None`` (the strategy's default, which is off wherever a preset sets
    none) counts as the same as an explicit off, ``False`` or ``0`` (runs saved before
    ``train.head_balanced_steps`` could be ``None`` record ``0``)."""
    return a == b or (a in (None, False) and b in (None, False))


def check_same_config(run: Path, cfg) -> None:
    """Stop when the finished run in ``run`` was trained with another model or training
    configuration than ``cfg`` would give now (after the strategy's preset, e.g. a default
    that changed since): its row would be reported under a setting it did not have. Keys the
    run's ``config.yaml`` lacks (added since) are not compared."""
    import dataclasses

    from lorax_cil.training.config import load_config
    from lorax_cil.training.registry import apply_preset

    saved = load_config(run / "config.yaml")
    now = apply_preset(cfg)
    differ = []
    for section in ("model", "train"):
        mine = dataclasses.asdict(getattr(now, section))
        for key, value in (saved.get(section) or {}).items():
            if key in mine and key not in _RUN_ONLY and not _same(mine[key], value):
                differ.append(f"{section}.{key}: {value!r} in the run, {mine[key]!r} now")
    if differ:
        raise SystemExit(f"{run}: this finished run was trained with another configuration than "
                         f"this command gives ({'; '.join(differ)}); use another --out, or move "
                         "the run away to train it again")


def rescored(args, variant: str, per_class: int, row: dict, readout: str, data: Path) -> dict | None:
    """``row`` (a finished run's summary) read again with ``readout``; ``None`` when that is
    the run's own read-out. Cached beside the run, keyed by the run's recorded AA and training
    time (a run trained again is read again)."""
    from lorax_cil.training.evaluate import readout_matrices

    if row.get("readout") == readout:
        return None
    run = Path(args.out) / "runs" / f"{per_class}" / variant / f"seed{row['seed']}"
    cache = run / f"rescore-{readout}.json"
    if cache.is_file():
        hit = json.loads(cache.read_text())
        if [hit.get("as_trained_aa"), hit.get("train_seconds")] == [row["multi_real_aa"],
                                                                    row.get("train_seconds")]:
            return hit
    try:  # the head: the matrices the run recorded while training (on the run's own data)
        summary = readout_matrices(run, readout, data_path=None if readout == "head" else data)["summary"]
    except ValueError as exc:
        raise SystemExit(f"--rescore {readout}: {exc}") from None
    out = {"seed": row["seed"], "readout": readout, "as_trained_aa": row["multi_real_aa"],
           "train_seconds": row.get("train_seconds"),
           "multi_real_aa": summary["multi_real"]["aa"], "multi_real_bwt": summary["multi_real"]["bwt"],
           "binary_aa": summary["binary"]["aa"], "strict_aa": summary["strict"]["aa"]}
    cache.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return out


def parse_rescore(text: str) -> list[str]:
    from lorax_cil.training.config import RESCORE_READOUTS

    readouts = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in readouts if r not in RESCORE_READOUTS]
    if bad:
        raise SystemExit(f"--rescore: unknown read-out(s) {bad}; valid: {list(RESCORE_READOUTS)}")
    return readouts


def aggregate(rows: list[dict]) -> dict:
    out: dict = {"seeds": len(rows)}
    for key, field, _ in METRICS:
        vals = [float(r[field]) for r in rows if r.get(field) is not None]
        vals = [v * (100.0 if key not in ("train_s",) else 1.0) for v in vals]
        mean = sum(vals) / len(vals) if vals else math.nan
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        out[f"{key}_mean"], out[f"{key}_std"] = mean, std
    return out


def main(argv=None) -> int:
    from lorax_cil.training.builtin_strategies import lorax_family_strategies

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        variant_config(v, args)
    readouts = parse_rescore(args.rescore)
    table: list[dict] = []
    t0 = time.perf_counter()
    for per_class in args.per_class:
        scenario, root = dataset(args, per_class)
        for variant in variants:
            rows = []
            for seed in args.seeds:
                print(f"[{time.perf_counter() - t0:7.0f} s] {per_class}/class {variant} seed {seed}",
                      flush=True)
                rows.append(run_one(args, variant, scenario, root, per_class, seed))
            rows = [r for r in rows if r]
            if not rows:
                continue
            table.append({"per_class": per_class, "variant": variant,
                          "seed_list": sorted(r["seed"] for r in rows), **aggregate(rows)})
            strategy = variant_config(variant, args)[0]
            for readout in readouts if strategy in lorax_family_strategies() else ():
                again = [x for x in (rescored(args, variant, per_class, r, readout, root)
                                     for r in rows) if x]
                if again:
                    table.append({"per_class": per_class, "variant": f"{variant}:{readout}",
                                  "seed_list": sorted(r["seed"] for r in again), **aggregate(again)})
            write_outputs(args, table, argv)
    return 0


def write_outputs(args, table: list[dict], argv) -> None:
    out = Path(args.out)
    keys = ["per_class", "variant", "seeds"] + [f"{k}_{s}" for k, *_ in METRICS for s in ("mean", "std")]
    with open(out / "fewshot.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for row in table:
            w.writerow({k: (round(row[k], 3) if isinstance(row[k], float) else row[k]) for k in keys})
    lines = ["Mean ± sample std over the seeds (no ± with one seed).", "",
             "| images/class | variant | seeds | " + " | ".join(t for *_, t in METRICS) + " |",
             "|---:|---|---:|" + "---:|" * len(METRICS)]
    for row in table:
        cells = [f"{row[f'{k}_mean']:.1f}" + (f" ± {row[f'{k}_std']:.1f}" if row["seeds"] > 1 else "")
                 for k, *_ in METRICS]
        seeds = ",".join(str(s) for s in row["seed_list"])
        lines.append(f"| {row['per_class']} | {row['variant']} | {seeds} | " + " | ".join(cells) + " |")
    threads = os.environ.get("OMP_NUM_THREADS")
    command = (f"OMP_NUM_THREADS={threads} " if threads else "") + "python benchmarks/fewshot.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    header = [
        "# Few-shot ablation", "",
        f"Command: `{command}`", "",
        f"Scenario {args.scenario} (few-shot variant at 10-30 images per class), "
        f"{args.tasks or 'all'} tasks, {args.val_per_class} evaluation images per class, "
        f"{args.size} px, backbone {args.backbone}, LoRAX on the last {args.adapt_blocks or 'all'} "
        f"blocks, LoRA r={args.lora_r}, {args.epochs} epochs (raised to train.min_steps_per_task "
        f"unless the variant says 'epochs'), batch {args.batch_size}, lr {args.lr}, memory "
        f"{args.memory_per_class} exemplars per class, seeds {args.seeds}; extra: {args.set or 'none'}. "
        f"Machine: {platform.processor() or platform.machine()}, CPU.", "",
    ]
    (out / "fewshot.md").write_text("\n".join(header + lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
