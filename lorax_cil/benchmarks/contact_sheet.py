"""A contact sheet PNG: a few real and fake images per task, one row per task."""

from __future__ import annotations

import os
from pathlib import Path

from lorax_cil.benchmarks.folders import scan_task_split
from lorax_cil.benchmarks.images import ImageLoadError, load_rgb
from lorax_cil.benchmarks.scenarios import Scenario
from lorax_cil.utils import atomic_write_bytes

__all__ = ["contact_sheet"]


def _pick(paths: list[str], k: int) -> list[str]:
    if len(paths) <= k:
        return paths
    step = len(paths) / k
    return [paths[int(i * step)] for i in range(k)]


def contact_sheet(
    scenario: Scenario,
    out: str | os.PathLike,
    *,
    split: str = "train",
    pairs: int = 3,
    thumb: int = 96,
) -> Path:
    """Write a grid with ``pairs`` real then ``pairs`` fake thumbnails per task.

    Rows are labelled with the task name; unreadable files are drawn as grey tiles.
    """
    import io

    from PIL import Image, ImageDraw

    label_w, pad = 150, 4
    cols = 2 * pairs
    width = label_w + cols * (thumb + pad) + pad
    height = 24 + scenario.num_tasks * (thumb + pad) + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((label_w + pad, 6), "real", fill=(0, 110, 0))
    draw.text((label_w + pad + pairs * (thumb + pad), 6), "fake", fill=(170, 0, 0))
    for row, task in enumerate(scenario.tasks):
        y = 24 + row * (thumb + pad)
        draw.text((pad, y + thumb // 2 - 6), f"{row}: {task.name}", fill=(0, 0, 0))
        records = scan_task_split(task.path, split)
        real = _pick([r.path for r in records if not r.is_fake], pairs)
        fake = _pick([r.path for r in records if r.is_fake], pairs)
        for col, path in enumerate(real + fake):
            try:
                img = load_rgb(path).resize((thumb, thumb), Image.NEAREST)
            except ImageLoadError:
                img = Image.new("RGB", (thumb, thumb), (128, 128, 128))
            x = label_w + pad + col * (thumb + pad)
            sheet.paste(img, (x, y))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return atomic_write_bytes(out, buf.getvalue())
