"""`lorax-cil detect train | eval | info`: transferable binary detectors (MoLE, LoRA, probe).

Configuration precedence for ``detect train``: command-line flags > ``--config`` file > defaults.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["register", "detect_config_from_args"]

#: flag -> (section, key, type)
TRAIN_FLAGS: dict[str, tuple[str, str, Any]] = {
    "data_path": ("data", "data_path", str),
    "train_split": ("data", "train_split", str),
    "calib_fraction": ("data", "calib_fraction", float),
    "crop": ("data", "crop", int),
    "resize": ("data", "resize", int),
    "blur_prob": ("data", "blur_prob", float),
    "jpeg_prob": ("data", "jpeg_prob", float),
    "backbone": ("model", "backbone", str),
    "weights": ("model", "weights", str),
    "img_size": ("model", "img_size", int),
    "adapter": ("model", "adapter", str),
    "blocks": ("model", "blocks", int),
    "targets": ("model", "targets", str),
    "shared_rank": ("model", "shared_rank", int),
    "lora_rank": ("model", "lora_rank", int),
    "alpha": ("model", "alpha", float),
    "epochs": ("train", "epochs", int),
    "max_steps": ("train", "max_steps", int),
    "batch_size": ("train", "batch_size", int),
    "lr": ("train", "lr", float),
    "weight_decay": ("train", "weight_decay", float),
    "balance_weight": ("train", "balance_weight", float),
    "threshold_rule": ("train", "threshold_rule", str),
    "seed": ("train", "seed", int),
    "device": ("train", "device", str),
    "num_workers": ("train", "num_workers", int),
}


def register(sub: argparse._SubParsersAction) -> None:
    from lorax_cil.commands.train import add_quiet_flag

    p = sub.add_parser("detect", help="binary real/fake detectors: MoLE, LoRA, linear probe")
    dsub = p.add_subparsers(dest="detect_command", metavar="ACTION")
    dsub.required = True

    t = dsub.add_parser("train", help="train a detector on source generators; calibrate its threshold")
    t.add_argument("--config", help="YAML config file with sections data/model/train (flags override it)")
    t.add_argument("--source", action="append", default=None, metavar="NAME=PATH",
                   help="a source generator folder (repeatable); NAME alone resolves under --data-path")
    for flag, (section, key, typ) in TRAIN_FLAGS.items():
        t.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=typ, default=None,
                       help=f"sets {section}.{key}")
    t.add_argument("--expert-ranks", type=int, nargs="*", default=None, metavar="R",
                   help="MoLE expert ranks (sets model.expert_ranks; none = shared only)")
    t.add_argument("--backbone-option", action="append", default=None, metavar="KEY=VALUE",
                   help="backbone factory option, e.g. global_pool=avg (repeatable; sets "
                        "model.backbone_options)")
    t.add_argument("--no-pretrained", action="store_true", help="random backbone weights")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="set any config key, e.g. --set data.hflip=false (repeatable)")
    t.add_argument("--out", help="detector folder (default: detectors/<adapter>-<sources>)")
    add_quiet_flag(t)
    t.set_defaults(func=cmd_train)

    e = dsub.add_parser("eval", help="cross-generator evaluation (+ blur/JPEG robustness)")
    e.add_argument("--detector", required=True, help="detector folder written by 'detect train'")
    e.add_argument("--data", required=True, help="evaluation root: one folder per generator")
    e.add_argument("--layout", default="auto", help="auto, univfd, genimage or cddb")
    e.add_argument("--split", default="val", help="split folder for the genimage / cddb layouts")
    e.add_argument("--generators", nargs="+", default=None, help="only these generator folders")
    e.add_argument("--groups", nargs="+", default=None, metavar="GEN=GROUP|FILE",
                   help="generator groups: GEN=GROUP pairs or a YAML/JSON mapping file")
    e.add_argument("--robustness", action="store_true", help="also sweep Gaussian blur and JPEG")
    e.add_argument("--blur", type=float, nargs="+", default=None, metavar="SIGMA",
                   help="blur sigmas of the sweep (default 1 2 3 4)")
    e.add_argument("--jpeg", type=int, nargs="+", default=None, metavar="QUALITY",
                   help="JPEG qualities of the sweep (default 90 80 70 60 50 40 30)")
    e.add_argument("--max-per-class", type=int, default=None,
                   help="explicitly subsample each class (recorded); default: every image")
    e.add_argument("--crop", type=int, default=None, help="crop size (default: the detector's)")
    e.add_argument("--resize", type=int, default=None, help="shorter-side resize (default: the detector's)")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--device", default="auto")
    e.add_argument("--num-workers", type=int, default=0)
    e.add_argument("--out", required=True, help="output folder for tables, scores and curves")
    e.set_defaults(func=cmd_eval)

    i = dsub.add_parser("info", help="print a detector's metadata (no tensors are loaded)")
    i.add_argument("detector", help="detector folder")
    i.set_defaults(func=cmd_info)


def detect_config_from_args(args: argparse.Namespace):
    """Defaults, then the ``--config`` file, then flags (``--set`` last)."""
    from lorax_cil.commands.train import parse_set
    from lorax_cil.detection.train import DetectConfig, merge_detect_config
    from lorax_cil.training.config import load_config

    cfg, file_out = DetectConfig(), False
    if getattr(args, "config", None):
        data = load_config(args.config)
        file_out = "out" in data
        cfg = merge_detect_config(cfg, data, source=args.config)
    upd: dict[str, dict[str, Any]] = {}
    for flag, (section, key, _) in TRAIN_FLAGS.items():
        if getattr(args, flag, None) is not None:
            upd.setdefault(section, {})[key] = getattr(args, flag)
    if args.source:
        upd.setdefault("data", {})["sources"] = list(args.source)
    if args.expert_ranks is not None:
        upd.setdefault("model", {})["expert_ranks"] = list(args.expert_ranks)
    if args.no_pretrained:
        upd.setdefault("model", {})["pretrained"] = False
    if args.backbone_option:
        upd.setdefault("model", {})["backbone_options"] = _parse_options(args.backbone_option)
    for section, values in parse_set(args.set).items():
        upd.setdefault(section, {}).update(values)
    if args.out:
        upd["out"] = args.out
    cfg = merge_detect_config(cfg, upd, source="command line")
    if not args.out and not file_out and "out" not in upd:
        names = "+".join(s.split("=", 1)[0] for s in (cfg.data.sources or [])) or "none"
        cfg.out = f"detectors/{cfg.model.adapter}-{names}"
    return cfg


def _parse_options(items: list[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--backbone-option expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _say(msg: str) -> None:
    print(f"[detect] {msg}", flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    """Train a detector; under torchrun every process trains, rank 0 writes and reports."""
    from lorax_cil.commands.train import progress_display
    from lorax_cil.detection.train import train_detector
    from lorax_cil.distributed import distributed_session, is_main

    cfg = detect_config_from_args(args)
    _check_detect_out(cfg)
    with distributed_session(cfg.train.device):
        _, summary = train_detector(cfg, progress=_say, display=progress_display(args))
        main = is_main()
    if not main:
        return 0
    p = summary["parameters"]
    print(f"trainable parameters: {p['trainable']:,} of {p['total']:,} "
          f"({100 * p['fraction_with_head']:.4f} % with head, {100 * p['fraction_without_head']:.4f} % without)")
    print(f"threshold {summary['threshold']:.4f}; detector saved to {summary['out']}")
    return 0


def _check_detect_out(cfg: Any) -> None:
    """--out of `detect train`: a writable folder outside the source data."""
    from lorax_cil.training.integrity import check_out_dir

    d = cfg.data
    paths = [d.data_path, *(s.split("=", 1)[1] for s in (d.sources or []) if "=" in s)]
    check_out_dir(cfg.out, data_paths=paths)


def _parse_groups(items: list[str] | None) -> dict[str, str]:
    import os

    import yaml

    out: dict[str, str] = {}
    for item in items or []:
        if "=" in item:
            gen, group = item.split("=", 1)
            out[gen.strip()] = group.strip()
        elif os.path.isfile(item):
            with open(item, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
            if not isinstance(data, dict):
                raise ValueError(f"--groups file {item} must map generator names to group names")
            out.update({str(k): str(v) for k, v in data.items()})
        else:
            raise ValueError(f"--groups expects GEN=GROUP pairs or a mapping file, got {item!r}")
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    from lorax_cil.detection.model import load_detector, read_detector_meta
    from lorax_cil.detection.protocol import BLUR_SIGMAS, JPEG_QUALITIES, evaluate_detector
    from lorax_cil.detection.train import resolve_device
    from lorax_cil.training.integrity import check_out_dir

    check_out_dir(args.out, data_paths=[args.data])
    meta = read_detector_meta(args.detector)
    tf = meta.get("training", {}).get("transform", {})
    device = resolve_device(args.device)
    det = load_detector(args.detector, device=device)
    res = evaluate_detector(
        det, args.data, layout=args.layout, split=args.split, generators=args.generators,
        groups=_parse_groups(args.groups), batch_size=args.batch_size, device=device,
        num_workers=args.num_workers, crop=args.crop or tf.get("size"),
        resize=args.resize if args.resize is not None else tf.get("resize"),
        max_per_class=args.max_per_class, robustness=args.robustness,
        blur_sigmas=tuple(args.blur or BLUR_SIGMAS), jpeg_qualities=tuple(args.jpeg or JPEG_QUALITIES),
        out=args.out, progress=_say,
    )
    print(f"{'generator':<22}{'group':<18}{'AP':>7}{'acc@.5':>8}{'acc@thr':>8}{'real':>7}{'fake':>7}"
          f"{'N real':>8}{'N fake':>8}")
    for r in res["per_generator"] + [res["mean_generators"], res["mean_groups"]]:
        print(f"{r['generator'][:21]:<22}{str(r['group'])[:17]:<18}{r['ap']:7.4f}{r['acc@0.5']:8.4f}"
              f"{r['acc@thr']:8.4f}{r['real_acc@thr']:7.3f}{r['fake_acc@thr']:7.3f}"
              f"{r['n_real']:8d}{r['n_fake']:8d}")
    how = ((meta.get("merge") or {}).get("threshold") or {}).get("description", "calibrated on source training data")
    print(f"threshold {res['threshold']:.4f} ({how}); outputs in {args.out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from lorax_cil.detection.model import read_detector_meta

    meta = read_detector_meta(args.detector)
    keep = {k: meta[k] for k in ("backbone", "adapter", "threshold", "calibration", "parameters", "targets")
            if k in meta}
    keep["sources"] = meta.get("training", {}).get("sources")
    print(json.dumps(keep, indent=2, sort_keys=True))
    return 0
