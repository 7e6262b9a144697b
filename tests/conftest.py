"""Shared fixtures: small CDDB-shaped trees written by the tests themselves."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")


def write_image(path: Path, *, size=(40, 40), mode="RGB", seed=0, fmt="PNG") -> Path:
    """Write a small random image in ``mode``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if mode == "L":
        img = Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8), mode="L")
    elif mode == "RGBA":
        img = Image.fromarray(rng.integers(0, 255, (h, w, 4), dtype=np.uint8), mode="RGBA")
    elif mode == "P":
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert("P")
    elif mode == "CMYK":
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert("CMYK")
        fmt = "JPEG"
    else:
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    img.save(path, format=fmt)
    return path


def make_cddb_tree(root: Path, *, tasks=("alpha", "beta"), n=4, size=(40, 40),
                   subclass_tasks=("beta",), splits=("train", "val")) -> Path:
    """A CDDB-layout tree: ``root/<task>/<split>/[<sub>/]{0_real,1_fake}/*.png``."""
    seed = 0
    for task in tasks:
        for split in splits:
            subs = ("cat", "dog") if task in subclass_tasks else ("",)
            for sub in subs:
                for cls in ("0_real", "1_fake"):
                    folder = root / task / split / sub / cls if sub else root / task / split / cls
                    for i in range(n):
                        seed += 1
                        write_image(folder / f"{i:03d}.png", size=size, seed=seed)
    return root


@pytest.fixture
def cddb_tree(tmp_path: Path) -> Path:
    """Two tasks (one with subclass folders) plus bad and odd files in task alpha/train."""
    root = make_cddb_tree(tmp_path / "cddb")
    real = root / "alpha" / "train" / "0_real"
    fake = root / "alpha" / "train" / "1_fake"
    (real / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (real / "notes.txt").write_text("not an image")
    write_image(real / "yy_rgba.PNG", mode="RGBA", seed=101)
    write_image(fake / "yy_gray.png", mode="L", seed=102)
    write_image(fake / "yy_small.png", size=(12, 10), seed=103)
    write_image(fake / "yy_palette.bmp", mode="P", seed=104, fmt="BMP")
    return root


def assert_same_training_result(full, resumed) -> dict:
    """A resumed run ends exactly as the uninterrupted one: equal accuracy matrices and learned
    tensors. Returns the learned state of ``full`` for further checks."""
    import torch

    for m in ("multi_real", "binary", "strict"):
        np.testing.assert_array_equal(full.matrices[m].matrix, resumed.matrices[m].matrix)
    sa, sb = full.net.learned_state_dict(), resumed.net.learned_state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    return sa
