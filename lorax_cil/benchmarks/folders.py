"""Scanning image folders laid out as CDDB, UnivFD/CNNDetection or GenImage test sets.

CDDB layout: ``<root>/<task>/<split>/[<subclass>/]{0_real,1_fake}/<image>``. Subclass folders are
detected automatically: a split folder either holds the two class folders directly, or only
subclass folders that each hold them. Listings are sorted, so every scan is deterministic.

This module is pure Python (no torch) so that `lorax-cil data verify` stays light.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from lorax_cil.errors import printable

__all__ = [
    "IMAGE_EXTENSIONS",
    "CDDB_CLASS_DIRS",
    "GENIMAGE_CLASS_DIRS",
    "DataLayoutError",
    "ImageRecord",
    "is_image_file",
    "list_subdirs",
    "list_images",
    "scan_class_folders",
    "scan_task_split",
    "scan_genimage",
]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
#: (real folder, fake folder) names of the CDDB / CNNDetection / UnivFD layout.
CDDB_CLASS_DIRS = ("0_real", "1_fake")
#: (real folder, fake folder) names of the GenImage layout.
GENIMAGE_CLASS_DIRS = ("nature", "ai")


class DataLayoutError(FileNotFoundError):
    """A folder does not follow the expected layout. The message names the path."""


@dataclass(frozen=True)
class ImageRecord:
    """One image file found by a scan.

    Attributes:
        path: absolute path of the image file.
        is_fake: 1 for a generated image, 0 for a real one.
        subclass: object subclass folder name, or ``""`` when the split has none.
    """

    path: str
    is_fake: int
    subclass: str = ""


def is_image_file(name: str) -> bool:
    """True when ``name`` has an image extension (matched case-insensitively)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _scandir(folder: str | os.PathLike) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except PermissionError as exc:
        raise DataLayoutError(f"cannot read folder {printable(os.fspath(folder))}: permission "
                              "denied (check its permissions)") from exc
    except NotADirectoryError as exc:
        raise DataLayoutError(f"not a folder: {printable(os.fspath(folder))}") from exc
    except OSError as exc:
        raise DataLayoutError(f"cannot read folder {printable(os.fspath(folder))}: "
                              f"{exc.strerror or exc}") from exc


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a symlink loop, or a link into a folder that cannot be read
        return False


def list_subdirs(folder: str | os.PathLike) -> list[str]:
    """Sorted names of the sub-folders of ``folder`` (hidden ones skipped)."""
    return sorted(e.name for e in _scandir(folder) if not e.name.startswith(".") and _is_dir(e))


def list_images(folder: str | os.PathLike) -> list[str]:
    """Sorted absolute paths of the entries with an image extension directly inside ``folder``.

    Every such entry that is not a folder is listed, including dangling links, symlink loops,
    FIFOs and unreadable files: the readers (:func:`~lorax_cil.benchmarks.images.probe_image`)
    then report each one as unreadable, by name, instead of it vanishing from the counts.
    """
    names = sorted(e.name for e in _scandir(folder) if is_image_file(e.name) and not _is_dir(e))
    base = os.path.abspath(folder)
    return [os.path.join(base, n) for n in names]


def _describe(folder: Path) -> str:
    if not folder.parent.is_dir():
        return f"(parent {folder.parent} does not exist either)"
    found = list_subdirs(folder.parent)
    return f"existing folders in {folder.parent}: {', '.join(found) if found else '(none)'}"


def _require_dir(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise DataLayoutError(f"missing {what} folder: {folder}; {_describe(folder)}")


def _scan_pair(folder: Path, class_dirs: Sequence[str], subclass: str) -> list[ImageRecord]:
    records: list[ImageRecord] = []
    for is_fake, cname in enumerate(class_dirs):
        cdir = folder / cname
        _require_dir(cdir, f"class '{cname}'")
        paths = list_images(cdir)
        if not paths:
            raise DataLayoutError(
                f"empty class folder: {cdir} holds no images with extensions "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))}"
            )
        records.extend(ImageRecord(p, is_fake, subclass) for p in paths)
    return records


def scan_class_folders(
    folder: str | os.PathLike, *, class_dirs: Sequence[str] = CDDB_CLASS_DIRS
) -> list[ImageRecord]:
    """Scan ``folder/[<subclass>/]{real,fake}/`` and return its records, sorted.

    Subclass folders are detected automatically: when ``folder`` holds the class folders
    directly there are none; otherwise every sub-folder must hold both class folders.

    Raises:
        DataLayoutError: a folder is missing, a class folder is empty, or the layout is mixed.
    """
    folder = Path(folder)
    _require_dir(folder, "image")
    subdirs = list_subdirs(folder)
    present = [c for c in class_dirs if c in subdirs]
    if present:
        others = [d for d in subdirs if d not in class_dirs]
        if others:
            raise DataLayoutError(
                f"{folder} mixes class folders {present} with other folders {others[:5]}; "
                f"expected either {list(class_dirs)} or subclass folders that each hold them"
            )
        return _scan_pair(folder, class_dirs, "")
    if not subdirs:
        raise DataLayoutError(
            f"{folder} holds neither class folders {list(class_dirs)} nor subclass folders"
        )
    records: list[ImageRecord] = []
    for sub in subdirs:
        records.extend(_scan_pair(folder / sub, class_dirs, sub))
    return records


def scan_task_split(task_dir: str | os.PathLike, split: str) -> list[ImageRecord]:
    """Scan one CDDB task's split: ``<task_dir>/<split>/[<subclass>/]{0_real,1_fake}``."""
    return scan_class_folders(_split_dir(Path(task_dir), split, "task"))


def scan_genimage(gen_dir: str | os.PathLike, split: str = "val") -> list[ImageRecord]:
    """Scan one GenImage generator: ``<gen_dir>/<split>/{nature,ai}``."""
    return scan_class_folders(_split_dir(Path(gen_dir), split, "GenImage generator"),
                              class_dirs=GENIMAGE_CLASS_DIRS)


def _split_dir(folder: Path, split: str, what: str) -> Path:
    """``folder/split``, or an error naming the folder and the splits it does have."""
    _require_dir(folder, what)
    split_dir = folder / split
    if not split_dir.is_dir():
        found = list_subdirs(folder)
        raise DataLayoutError(f"missing split '{split}' in {what} folder {folder}; existing "
                              f"splits: {', '.join(found) if found else '(none)'}")
    return split_dir


def count_by(records: Iterable[ImageRecord]) -> dict[tuple[str, int], int]:
    """Counts of records per (subclass, is_fake)."""
    out: dict[tuple[str, int], int] = {}
    for r in records:
        key = (r.subclass, r.is_fake)
        out[key] = out.get(key, 0) + 1
    return out
