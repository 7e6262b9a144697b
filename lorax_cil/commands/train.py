"""`lorax-cil train` and `lorax-cil eval`.

Configuration precedence: command-line flags > ``--config`` file > strategy preset > defaults.
A key set by a flag or in the config file is never replaced by the preset: where the strategy
fixes that key to another value (``finetune`` has no memory), the command stops (exit 2) and
names the setting, the strategy and the strategies that accept it. The resolved configuration
is saved as ``config.yaml`` in the run directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lorax_cil.training.config import READOUTS, RESCORE_READOUTS  # torch-free

__all__ = ["register", "config_from_args", "explicit_settings", "parse_set"]

#: flag name -> (section, key, type)
FLAGS: dict[str, tuple[str, str, Any]] = {
    "scenario": ("data", "scenario", str),
    "data_path": ("data", "data_path", str),
    "eval_split": ("data", "eval_split", str),
    "crop": ("data", "crop", int),
    "calib_fraction": ("data", "calib_fraction", float),
    "backbone": ("model", "backbone", str),
    "weights": ("model", "weights", str),
    "img_size": ("model", "img_size", int),
    "adapt_blocks": ("model", "adapt_blocks", int),
    "lora_r": ("model", "lora_r", int),
    "lora_alpha": ("model", "lora_alpha", float),
    "lora_targets": ("model", "lora_targets", str),
    "strategy": ("train", "strategy", str),
    "epochs": ("train", "epochs", int),
    "batch_size": ("train", "batch_size", int),
    "lr_first": ("train", "lr_first", float),
    "lr": ("train", "lr", float),
    "memory_size": ("train", "memory_size", int),
    "seed": ("train", "seed", int),
    "device": ("train", "device", str),
    "num_workers": ("train", "num_workers", int),
}


def add_run_flags(p: argparse.ArgumentParser, *, exclude: tuple[str, ...] = ()) -> None:
    """The flags shared by `train` and `compare` (each maps onto one config key); ``exclude``
    names flags of :data:`FLAGS` the command replaces."""
    p.add_argument("--config", help="YAML config file (flags override it)")
    for flag, (section, key, typ) in FLAGS.items():
        if flag in exclude:
            continue
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=typ, default=None,
                       help=f"sets {section}.{key}")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="for --scenario custom: task names or name=path pairs")
    p.add_argument("--no-pretrained", action="store_true", help="random backbone weights")
    p.add_argument("--strict-data", action="store_true", help="fail on unreadable images")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="set any config key, e.g. --set train.warmup_epochs=1 or "
                        "--set baselines.ewc_lambda=100 (repeatable)")
    add_plugin_flag(p)
    add_quiet_flag(p)
    p.add_argument("--logger", action="append", default=[], type=_logger_spec,
                   metavar="KIND[:DIR]",
                   help="experiment logger: tensorboard[:DIR], csv[:DIR] or wandb[:PROJECT] "
                        "(repeatable; default folders inside the run directory)")


def _logger_spec(text: str):
    from lorax_cil.training.loggers import parse_logger_spec

    try:
        return parse_logger_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check_loggers(args: argparse.Namespace) -> list:
    """The ``--logger`` specs, after checking that their packages import (before any work)."""
    from lorax_cil.training.loggers import check_logger_packages

    specs = list(getattr(args, "logger", None) or [])
    check_logger_packages(specs)
    return specs


def add_plugin_flag(p: argparse.ArgumentParser) -> None:
    """``--plugin MODULE`` (repeatable): a module or ``.py`` file registering strategies,
    backbones, scenarios or merge methods (see :mod:`lorax_cil.plugins`)."""
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import a plugin module (dotted name or .py path) that registers "
                        "strategies, backbones, scenarios or merge methods (repeatable; "
                        "recorded in the run's config.yaml)")


def load_cli_plugins(args: argparse.Namespace) -> list[str]:
    """Load the ``--plugin`` modules (and the installed entry-point plugins)."""
    from lorax_cil.plugins import load_plugins

    return load_plugins(getattr(args, "plugin", None) or [])


def add_quiet_flag(p: argparse.ArgumentParser) -> None:
    """``-q/--quiet``: no per-epoch progress (also accepted before the command)."""
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no per-epoch progress bar or lines (and only warnings in the log)")


def progress_display(args: argparse.Namespace) -> str:
    """``off`` with ``-q``; else ``auto`` (a bar on a terminal, one line per epoch otherwise)."""
    return "off" if getattr(args, "quiet", False) else "auto"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a class-incremental run (LoRAX or a baseline)")
    add_run_flags(p)
    p.add_argument("--out", help="run directory (default: runs/<strategy>-<scenario>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--add-task", action="append", default=[], metavar="NAME=PATH",
                   help="with --resume: append a new generator task (repeatable)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="with --add-task: a peft LoRA adapter folder (same backbone and LoRA "
                        "targets) the new task's extractor starts from; NAME= picks the task "
                        "when several are added")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many tasks")
    p.add_argument("--allow-protocol-change", action="store_true",
                   help="with --resume: accept flags that change the run's protocol (backbone, "
                        "seed, memory size, ...) and changed training data of trained tasks; "
                        "both are recorded in the checkpoints, summary.json and "
                        "data_manifest.json (without it a resume refuses them)")
    p.add_argument("--cache-trunk", action="store_true",
                   help="sets train.cache_trunk: compute the frozen trunk once per training image "
                        "(needs a deterministic training transform)")
    p.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a trained run on a scenario")
    e.add_argument("--run", required=True, help="run directory")
    e.add_argument("--scenario", default=None, help="scenario (default: the run's own)")
    e.add_argument("--data-path", default=None)
    e.add_argument("--tasks", nargs="+", default=None)
    e.add_argument("--eval-split", default=None, help="split to evaluate (default: the run's)")
    e.add_argument("--out", default=None, help="JSON file for the results")
    e.add_argument("--rescore", choices=[*RESCORE_READOUTS, "all"], default=None,
                   help="instead: the run's accuracy matrices, AA and BWT read with this "
                        "read-out, whichever it trained with (exact, no training: ncm-frozen and "
                        "ncm-relative from the last checkpoint and the training data, head from "
                        "the checkpoint of every task; --data-path if the data moved); all: "
                        "one table of every read-out the run can be read with")
    e.add_argument("--readout", choices=READOUTS, default=None,
                   help="read the classes this way instead of the run's own (head: the linear "
                        "head of a run that reads by class means)")
    add_plugin_flag(e)
    e.set_defaults(func=cmd_eval)


def parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["train.epochs=3", ...]`` -> ``{"train": {"epochs": 3}}`` (values parsed as YAML)."""
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = _scalar(yaml.safe_load(value))
    return out


def _scalar(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string; accept it as the number a user means."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def flag_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The config updates named by explicit command-line flags."""
    out: dict[str, dict[str, Any]] = {}
    for flag, (section, key, _) in FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            out.setdefault(section, {})[key] = value
    if getattr(args, "tasks", None):
        out.setdefault("data", {})["tasks"] = list(args.tasks)
        out["data"].setdefault("scenario", "custom")
    if getattr(args, "no_pretrained", False):
        out.setdefault("model", {})["pretrained"] = False
    if getattr(args, "strict_data", False):
        out.setdefault("data", {})["strict_data"] = True
    if getattr(args, "cache_trunk", False):
        out.setdefault("train", {})["cache_trunk"] = True
    for section, values in parse_set(getattr(args, "set", [])).items():
        out.setdefault(section, {}).update(values)
    if getattr(args, "plugin", None):
        out["plugins"] = load_cli_plugins(args)
    return out


def explicit_settings(args: argparse.Namespace) -> dict[str, str]:
    """``section.key`` of every setting made on the command line or in ``--config``, mapped to
    how it was made (for error messages)."""
    from lorax_cil.training.config import load_config

    out: dict[str, str] = {}
    if getattr(args, "config", None):
        for section, values in load_config(args.config).items():
            if isinstance(values, dict):
                out.update({f"{section}.{k}": f"{section}.{k}: {v!r} in {args.config}"
                            for k, v in values.items()})
    for item in getattr(args, "set", []) or []:
        out[item.split("=", 1)[0].strip()] = f"--set {item}"
    for flag, (section, key, _) in FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            out[f"{section}.{key}"] = f"--{flag.replace('_', '-')} {value}"
    for attr, where, how in (("no_pretrained", "model.pretrained", "--no-pretrained"),
                             ("strict_data", "data.strict_data", "--strict-data"),
                             ("cache_trunk", "train.cache_trunk", "--cache-trunk")):
        if getattr(args, attr, False):
            out[where] = how
    if getattr(args, "tasks", None):
        out["data.tasks"] = "--tasks"
    return out


def config_from_args(args: argparse.Namespace):
    """Defaults, then the config file, then flags."""
    from lorax_cil.plugins import load_plugins
    from lorax_cil.training.config import RunConfig, load_config, merge_config

    cfg = RunConfig()
    if getattr(args, "config", None):
        cfg = merge_config(cfg, load_config(args.config), source=args.config)
        cfg.plugins = load_plugins(cfg.plugins, needed_by=args.config)
    overrides = flag_overrides(args)
    if "plugins" in overrides:  # --plugin adds to the config file's plugins
        overrides["plugins"] = cfg.plugins + [p for p in overrides["plugins"]
                                              if p not in cfg.plugins]
    cfg = merge_config(cfg, overrides, source="command line")
    cfg.plugins = load_plugins(cfg.plugins)
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or resume) a run; under torchrun every process runs this, rank 0 reports."""
    from lorax_cil.distributed import distributed_session, is_main

    with distributed_session(run_device(args)):
        run, summary = _train(args)
        if is_main():
            print_run_report(run, summary)
    return 0


def run_device(args: argparse.Namespace) -> str:
    """``train.device`` of the run about to start (picks the torchrun backend): the flag, else
    the config file (or the resumed run's config.yaml), else ``auto``."""

    if getattr(args, "device", None):
        return args.device
    forced = parse_set(getattr(args, "set", []) or []).get("train", {}).get("device")
    if forced:
        return str(forced)
    source = None
    if getattr(args, "resume", None):
        source = Path(args.resume) / "config.yaml"
    elif getattr(args, "config", None):
        source = Path(args.config)
    if source is not None and source.is_file():
        from lorax_cil.training.config import load_config

        data = load_config(source)  # names the file when it is not UTF-8 or not YAML
        device = (data.get("train") or {}).get("device") if isinstance(data, dict) else None
        if device:
            return str(device)
    return "auto"


def _train(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from lorax_cil.benchmarks.scenarios import resolve_scenario
    from lorax_cil.training.integrity import check_out_dir
    from lorax_cil.training.registry import apply_preset
    from lorax_cil.training.runner import Run, resume_run

    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(f"--stop-after must be >= 1, got {args.stop_after}")
    if args.resume:
        if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            raise ValueError(f"--out {args.out} differs from --resume {args.resume}: a resumed run "
                             "writes to its own folder; leave out --out")
        run = resume_run(args.resume, add_tasks=args.add_task, overrides=flag_overrides(args),
                         allow_protocol_change=args.allow_protocol_change,
                         progress=_progress, explicit=explicit_settings(args),
                         display=progress_display(args), loggers=check_loggers(args),
                         adapters=_adapters(args))
    else:
        if args.add_task:
            raise ValueError("--add-task needs --resume RUN_DIR (a finished or partial run)")
        if getattr(args, "adapter", None):
            raise ValueError("--adapter needs --resume RUN_DIR --add-task NAME=PATH (it starts "
                             "an added task's extractor)")
        if args.allow_protocol_change:
            raise ValueError("--allow-protocol-change only applies with --resume RUN_DIR")
        cfg = config_from_args(args)
        explicit = explicit_settings(args)
        apply_preset(cfg, explicit)  # a flag the strategy cannot honour stops before any work
        check_loggers(args)
        out = args.out or f"runs/{cfg.train.strategy}-{cfg.data.scenario}"
        if (Path(out) / "checkpoints").is_dir():
            raise ValueError(f"run directory {out} already holds checkpoints: use --resume {out} "
                             "to continue it, or choose another --out")
        d = cfg.data
        scenario = resolve_scenario(d.scenario, data_path=d.data_path, tasks=d.tasks)
        check_out_dir(out, data_paths=[d.data_path, *(t.path for t in scenario.tasks)])
        cfg.out = out
        run = Run(cfg, run_dir=out, progress=_progress, explicit=explicit,
                  display=progress_display(args), loggers=check_loggers(args))
        run.setup(scenario)
    return run, run.train(stop_after=args.stop_after)


def _adapters(args: argparse.Namespace) -> dict[str, str]:
    """``--adapter [NAME=]DIR`` -> {task name: folder} for the tasks added by ``--add-task``."""
    items = list(getattr(args, "adapter", None) or [])
    if not items:
        return {}
    added = [spec.split("=", 1)[0] for spec in args.add_task]
    out: dict[str, str] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep:
            if len(added) != 1:
                raise ValueError(f"--adapter {item}: give NAME=DIR when --add-task adds "
                                 f"{len(added)} tasks")
            name, folder = added[0], item
        out[name] = folder
    return out


def _progress(msg: str) -> None:
    print(f"[train] {msg}", flush=True)


def print_run_report(run: Any, summary: dict[str, Any]) -> None:
    """Accuracy matrix and headline numbers of a run, for the terminal."""
    from lorax_cil.evaluation.reports import format_matrix

    names = run.scenario.task_names
    readout = f", read-out {summary['readout']}" if summary.get("readout") else ""
    print(f"\n{summary['strategy']} on {summary['scenario']}: multi-real accuracy matrix "
          f"(row = after training task, column = evaluated task{readout})")
    print(format_matrix(run.matrices["multi_real"].matrix, names, scale=100.0, floatfmt=".1f"))
    print(_headline(summary))
    if summary.get("head_readout"):
        print(f"read with the linear head (same passes, accuracy_multi_real-head.csv): "
              f"{_headline(summary['head_readout'])}")
    print(f"outputs: {run.run_dir}", file=sys.stdout)


def _headline(s: dict[str, Any]) -> str:
    return (f"AA {100 * s['multi_real_aa']:.2f}  step-average "
            f"{100 * s['multi_real_step_average_accuracy']:.2f}  BWT "
            f"{100 * s['multi_real_bwt']:.2f}  forgetting "
            f"{100 * s['multi_real_forgetting']:.2f}  (multi-real, %)")


def cmd_eval(args: argparse.Namespace) -> int:
    from lorax_cil.training.evaluate import evaluate_run

    load_cli_plugins(args)
    if args.rescore:
        return _rescore(args)
    result = evaluate_run(args.run, scenario=args.scenario, data_path=args.data_path,
                          tasks=args.tasks, eval_split=args.eval_split, out=args.out,
                          readout=args.readout)
    if result["readout"]:
        print(f"read-out: {result['readout']}")
    for task, r in result["per_task"].items():
        print(f"{task:<24} multi-real {100 * r['multi_real']:6.2f}  binary "
              f"{100 * r['binary']:6.2f}  strict {100 * r['strict']:6.2f}  AP {r['ap']:.3f}  "
              f"n={r['n']}")
    print(f"mean multi-real accuracy: {100 * result['mean_multi_real']:.2f}")
    issues = result.get("data_issues") or {}
    if issues.get("unreadable") or issues.get("substituted_files"):
        from lorax_cil.errors import printable

        print(f"data issues: {issues['unreadable']} unreadable file(s) skipped, "
              f"{len(issues['substituted_files'])} that failed to decode left out of n")
        for path in [*issues.get("unreadable_files", []), *issues["substituted_files"]][:10]:
            print(f"  {printable(path)}")
    return 0


#: where ``eval --rescore`` matrices come from (``readout_matrices(...)["source"]``)
RESCORE_SOURCES = {"recorded": "recorded during training",
                   "checkpoints": "computed from the checkpoints and the data"}


def _rescore(args: argparse.Namespace) -> int:
    """``eval --rescore READOUT``: the run's matrices under that read-out."""
    import numpy as np

    from lorax_cil.errors import UserError
    from lorax_cil.training.evaluate import readout_matrices
    from lorax_cil.utils import write_json

    other = [f for f, v in (("--scenario", args.scenario), ("--tasks", args.tasks),
                            ("--eval-split", args.eval_split), ("--readout", args.readout)) if v]
    if other:
        raise UserError(f"--rescore names the read-out and reads the run on its own tasks and "
                        f"evaluation split; {', '.join(other)} cannot be used with it "
                        "(--data-path can)")
    if args.rescore == "all":
        return _rescore_all(args)
    got = readout_matrices(args.run, args.rescore, data_path=args.data_path)
    names = got["task_names"]
    R = got["multi_real"]
    source = RESCORE_SOURCES[got["source"]]
    print(f"multi-real accuracy (%) with the {args.rescore} read-out ({source}): row = after "
          "task, column = evaluated task")
    width = max(len(n) for n in names)
    print(" " * (width + 2) + "  ".join(f"{j:>6d}" for j in range(len(names))))
    for i, name in enumerate(names):
        row = "  ".join("      " if np.isnan(v) else f"{100 * v:6.2f}" for v in R[i])
        print(f"{name:<{width}}  {row}")
    for kind in ("multi_real", "binary", "strict"):
        sm = got["summary"][kind]
        print(f"{kind:<10} AA {100 * sm['aa']:6.2f}  BWT {100 * sm['bwt']:6.2f}  "
              f"forgetting {100 * sm['forgetting']:6.2f}")
    if args.out:
        write_json(args.out, {"run": str(args.run), "readout": args.rescore,
                              **_rescore_record(got)})
    return 0


def _rescore_record(got: dict) -> dict:
    """The JSON form of one :func:`readout_matrices` result (NaN written as null)."""
    from lorax_cil.training.runner import rows_from_matrix

    return {"source": got["source"], "task_names": got["task_names"], "summary": got["summary"],
            **{k: rows_from_matrix(got[k]) for k in ("multi_real", "binary", "strict")}}


def _rescore_all(args: argparse.Namespace) -> int:
    """``eval --rescore all``: one line per read-out the run can be read with."""
    import json

    from lorax_cil.errors import UserError
    from lorax_cil.training.evaluate import all_readout_matrices
    from lorax_cil.utils import write_json

    got = all_readout_matrices(args.run, data_path=args.data_path)
    if all("error" in r for r in got.values()):
        raise UserError(f"run {args.run} cannot be read with another read-out: "
                        + "; ".join(f"{k}: {r['error']}" for k, r in got.items()))
    own = None  # the run's own read-out, to mark it (a run stopped early has no summary yet)
    try:
        own = json.loads((Path(args.run) / "summary.json").read_text(encoding="utf-8")).get("readout")
    except (OSError, ValueError, AttributeError):
        pass
    print(f"{args.run}: every read-out, exact, no training (multi-real AA, BWT and forgetting; "
          "binary and strict AA; %)")
    print(f"{'read-out':<14} {'AA':>6} {'BWT':>7} {'forget':>7} {'binary':>7} {'strict':>7}  source")
    for readout, r in got.items():
        if "error" in r:
            print(f"{readout:<14} not available: {r['error']}")
            continue
        m, b, st = (r["summary"][k] for k in ("multi_real", "binary", "strict"))
        mark = " (the run's own)" if readout == own else ""
        print(f"{readout:<14} {100 * m['aa']:6.2f} {100 * m['bwt']:7.2f} "
              f"{100 * m['forgetting']:7.2f} {100 * b['aa']:7.2f} {100 * st['aa']:7.2f}  "
              f"{RESCORE_SOURCES[r['source']]}{mark}")
    if args.out:
        write_json(args.out, {"run": str(args.run), "own_readout": own,
                              "readouts": {k: r if "error" in r else _rescore_record(r)
                                           for k, r in got.items()}})
    return 0
