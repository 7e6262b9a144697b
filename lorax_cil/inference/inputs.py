"""Turning command-line PATH arguments into a stream of image files to predict.

A PATH is a file, a folder (searched recursively) or a glob pattern (``**`` matches any depth).
Inside folders and glob matches, files without an image extension are skipped silently; a file
named explicitly is always reported, with an error when it is not an image. Nothing is decoded
here: the stream holds paths (and errors) only, so listing a large folder is cheap.
"""

from __future__ import annotations

import glob
import os
import stat
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
    """Image files under ``folder``, recursively, in sorted order (hidden entries skipped).

    Links to folders are followed, each real folder at most once: a symlink loop (a link to
    the folder itself or to a parent) can neither repeat images nor make the walk endless.
    Entries that are not regular files (FIFOs, devices, dangling links) are listed too; reading
    them gives an error row instead of blocking.
    """
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        try:
            st = os.stat(root)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and is_image_file(name):
                yield os.path.join(root, name)


def _not_an_image(path: str) -> str:
    ext = os.path.splitext(path)[1] or "(none)"
    return (f"not an image file (extension {ext}); supported extensions: "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}")


def _not_readable(path: str) -> str:
    """Why an existing path that is neither a regular file nor a folder cannot be predicted."""
    try:
        st = os.stat(path)
    except OSError as exc:  # dangling link, symlink loop, no permission
        return f"cannot read: {exc.strerror or exc}"
    if stat.S_ISFIFO(st.st_mode):
        return "a FIFO (named pipe), not an image file"
    return "not a regular file (device or socket), not an image file"


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
        elif os.path.lexists(text):
            yield InputItem(text, _not_readable(text))
        elif _GLOB_CHARS & set(text):
            yield from _expand_glob(text)
        else:
            yield InputItem(text, "no such file or directory")
