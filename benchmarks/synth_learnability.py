"""Is the synthetic dataset learnable but not trivial?

Generates a synthetic scenario (or reuses an existing output folder), then fits

* a logistic regression on per-channel colour histograms (16 bins per channel, normalised), and
* a small CNN trained from scratch on all tasks jointly (torch, CPU by default),

and prints a Markdown table of strict attribution accuracy (``2 * n_tasks``-way: real_t = 2t,
fake_t = 2t + 1) and binary real/fake accuracy on the val split, plus the generation time.

Example (the numbers in docs/synthetic-data.md)::

    python benchmarks/synth_learnability.py --per-class 200 --val-per-class 100 --size 96 \
        --seed 0 --epochs 8 --out /tmp/synth-easy-demo
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lorax_cil.benchmarks.synth import CLASS_DIRS, synthesize


def load_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All images of ``split`` as uint8 ``(N, H, W, 3)`` and strict labels ``2 * task + fake``."""
    tasks = json.loads((root / "synth.json").read_text())["tasks"]
    images, labels = [], []
    for t, task in enumerate(tasks):
        for path in sorted((root / task / split).rglob("*.png")):
            fake = CLASS_DIRS.index(path.parent.name)
            images.append(np.asarray(Image.open(path).convert("RGB")))
            labels.append(2 * t + fake)
    return np.stack(images), np.asarray(labels)


def colour_histograms(images: np.ndarray, bins: int = 16) -> np.ndarray:
    """Per-channel colour histograms, each normalised to sum 1: ``(N, 3 * bins)``."""
    q = (images.astype(np.int64) * bins) >> 8
    n_pix = images.shape[1] * images.shape[2]
    feats = [np.bincount(img[..., c].ravel(), minlength=bins) / n_pix
             for img in q for c in range(3)]
    return np.asarray(feats, dtype=np.float64).reshape(len(images), 3 * bins)


def fit_histogram_lr(xtr, ytr, xva) -> np.ndarray:
    """Standardised logistic regression on colour histograms; returns val predictions."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, C=1.0))
    clf.fit(colour_histograms(xtr), ytr)
    return clf.predict(colour_histograms(xva))


def small_cnn(n_classes: int):
    """Four stride-2 3x3 conv layers (BN + ReLU), global average pooling, linear head."""
    import torch.nn as nn

    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]

    return nn.Sequential(*block(3, 32, 2), *block(32, 64, 2), *block(64, 96, 2), *block(96, 128, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, n_classes))


def fit_cnn(xtr, ytr, xva, *, epochs: int, seed: int, device: str, batch: int = 64) -> np.ndarray:
    """Train :func:`small_cnn` from scratch with AdamW + one-cycle; returns val predictions."""
    import torch

    torch.manual_seed(seed)
    def to_t(x: np.ndarray):
        return torch.from_numpy(x).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)

    xtr_t, xva_t = to_t(xtr), to_t(xva)
    ytr_t = torch.from_numpy(ytr).long()
    model = small_cnn(int(ytr.max()) + 1).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    steps = epochs * ((len(xtr_t) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr_t), generator=gen)
        total = 0.0
        for i in range(0, len(perm), batch):
            idx = perm[i: i + batch]
            xb = xtr_t[idx].to(device)
            flip = torch.rand(len(idx), generator=gen) < 0.5  # horizontal flips
            xb[flip.to(device)] = xb[flip.to(device)].flip(-1)
            loss = torch.nn.functional.cross_entropy(model(xb), ytr_t[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        print(f"  epoch {epoch + 1}/{epochs}: train loss {total / len(perm):.3f}", file=sys.stderr)
    model.eval()
    with torch.no_grad():
        return torch.cat([model(xva_t[i: i + 256].to(device)).argmax(1).cpu()
                          for i in range(0, len(xva_t), 256)]).numpy()


def print_per_task(root: Path, pred: np.ndarray, y: np.ndarray) -> None:
    """Per-task val accuracy of one model: strict, and real/fake among that task's images."""
    tasks = json.loads((root / "synth.json").read_text())["tasks"]
    print("\nsmall CNN per task (val):\n")
    print("| task | strict acc. | real/fake acc. |")
    print("|---|---|---|")
    for t, task in enumerate(tasks):
        m = y // 2 == t
        print(f"| {task} | {100 * np.mean(pred[m] == y[m]):.1f} % "
              f"| {100 * np.mean(pred[m] % 2 == y[m] % 2):.1f} % |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="synth-easy")
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--val-per-class", type=int, default=100)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="dataset folder (default: a temporary folder)")
    args = p.parse_args(argv)
    shown = sys.argv[1:] if argv is None else argv
    print("command: python benchmarks/synth_learnability.py " + shlex.join(shown))

    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="synth-learnability-")
    out = Path(args.out or tmp.name)
    cached = (out / "synth.json").is_file()
    t0 = time.perf_counter()
    synthesize(out, scenario=args.scenario, per_class=args.per_class,
               val_per_class=args.val_per_class, size=args.size, seed=args.seed)
    gen_s = time.perf_counter() - t0
    xtr, ytr = load_split(out, "train")
    xva, yva = load_split(out, "val")

    t0 = time.perf_counter()
    lr_pred = fit_histogram_lr(xtr, ytr, xva)
    lr_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cnn_pred = fit_cnn(xtr, ytr, xva, epochs=args.epochs, seed=args.seed, device=args.device)
    cnn_s = time.perf_counter() - t0

    n_cls = int(ytr.max()) + 1
    print(f"\n{args.scenario}: {len(xtr)} train / {len(xva)} val images, {n_cls} classes, "
          f"size {args.size}, seed {args.seed}, {os.cpu_count()} CPU cores")
    gen_note = "reused existing folder" if cached and gen_s < 1.0 else f"{gen_s:.1f} s"
    print(f"generation time: {gen_note}\n")
    print(f"| model | strict {n_cls}-way acc. (val) | binary real/fake acc. (val) | fit time |")
    print("|---|---|---|---|")
    rows = (("logistic regression on colour histograms (3x16 bins)", lr_pred, lr_s),
            (f"small CNN (4 conv, from scratch, {args.epochs} epochs)", cnn_pred, cnn_s))
    for name, pred, secs in rows:
        strict = float(np.mean(pred == yva))
        binary = float(np.mean(pred % 2 == yva % 2))
        print(f"| {name} | {100 * strict:.1f} % | {100 * binary:.1f} % | {secs:.0f} s |")
    print(f"| chance | {100 / n_cls:.1f} % | 50.0 % | |")
    print_per_task(out, cnn_pred, yva)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
