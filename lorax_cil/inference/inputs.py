"""Turning command-line PATH arguments into a stream of image files to predict.

A PATH is a file, a folder (searched recursively) or a glob pattern (``**`` matches any depth).
Inside folders and glob matches, files without an image extension are skipped silently; a file
named explicitly is always reported, with an error when it is not an image. Nothing is decoded
here: the stream holds paths (and errors) only, so listing a large folder is cheap.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from lorax_cil.benchmarks.folders import IMAGE_EXTENSIONS, is_image_file

__all__ = ["InputItem", "iter_input_paths", "walk_images"]

_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class InputItem:
    """One entry of the prediction stream.

    Attributes:
        path: the file (or, for a pattern that matched nothing, the pattern itself).
        error: why this entry cannot be predicted (``None``: try to read it).
    """

    path: str
    error: str | None = None


def walk_images(folder: str | os.PathLike) -> Iterator[str]:
    """Image files under ``folder``, recursively, in sorted order (hidden entries skipped)."""
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and is_image_file(name):
                yield os.path.join(root, name)


def _not_an_image(path: str) -> str:
    ext = os.path.splitext(path)[1] or "(none)"
    return (f"not an image file (extension {ext}); supported extensions: "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}")


def _expand_glob(pattern: str) -> Iterator[InputItem]:
    matches = sorted(glob.glob(pattern, recursive=True))
    found = False
    for match in matches:
        if os.path.isdir(match):
            for path in walk_images(match):
                found = True
                yield InputItem(path)
        elif is_image_file(match):
            found = True
            yield InputItem(match)
    if not found:
        yield InputItem(pattern, f"the pattern matched no image file "
                                 f"({len(matches)} non-image match(es))")


def iter_input_paths(specs: Iterable[str | os.PathLike]) -> Iterator[InputItem]:
    """Expand files, folders and glob patterns into :class:`InputItem` entries, in order.

    Args:
        specs: the PATH arguments. An existing path is used as it is even if its name contains
            glob characters; otherwise a name with ``*``, ``?`` or ``[`` is a glob pattern.

    Yields:
        One item per image file; explicitly named non-image files, missing paths, folders and
        patterns without images come as items with an ``error`` (they never stop the stream).
    """
    for spec in specs:
        text = os.fspath(spec)
        path = Path(text)
        if path.is_dir():
            n = 0
            for n, image in enumerate(walk_images(path), start=1):
                yield InputItem(image)
            if n == 0:
                yield InputItem(text, "the folder holds no image files")
        elif path.is_file():
            yield InputItem(text, None if is_image_file(text) else _not_an_image(text))
        elif _GLOB_CHARS & set(text):
            yield from _expand_glob(text)
        else:
            yield InputItem(text, "no such file or directory")
