"""Robust image reading: RGB conversion, header probes and a tally of data problems."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from dataclasses import dataclass, field
from typing import Any

from lorax_cil.errors import printable

__all__ = ["ImageLoadError", "ImageInfo", "DataIssues", "load_rgb", "probe_image", "to_rgb"]

logger = logging.getLogger(__name__)


class ImageLoadError(OSError):
    """An image file could not be read or decoded. The message names the file; ``reason``
    says why in a few words ("Permission denied", "a FIFO (named pipe), not an image file")."""

    reason: str = ""


def load_error(message: str, cause: BaseException) -> ImageLoadError:
    exc = ImageLoadError(f"{message}: {_reason(cause)}")
    exc.reason = _reason(cause)
    return exc


@dataclass(frozen=True)
class ImageInfo:
    """What a header probe learns about an image file."""

    path: str
    width: int
    height: int
    format: str
    mode: str


def to_rgb(img: Any) -> Any:
    """Convert any PIL mode (L, LA, P, RGBA, CMYK, I;16, ...) to RGB."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        # Palette images may carry transparency; go through RGBA so it is honoured.
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        from PIL import Image

        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        import numpy as np
        from PIL import Image

        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0, 0, 255).astype("uint8")
        return Image.fromarray(arr, mode="L").convert("RGB")
    return img.convert("RGB")


def _errors() -> tuple[type[BaseException], ...]:
    from PIL import Image, UnidentifiedImageError

    # DecompressionBombError: a header announcing more than 2 x Image.MAX_IMAGE_PIXELS pixels
    # (a "decompression bomb") is refused before any pixel is decoded.
    return (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def _check_regular_file(path: str) -> None:
    """Refuse what must never be opened as an image: FIFOs and devices (opening one can block
    forever), folders, dangling links and symlink loops. Raises OSError naming the reason."""
    st = os.stat(path)  # follows links: a loop raises ELOOP, a dangling link ENOENT
    if not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO (named pipe)"
                if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "not a regular file")
        raise OSError(f"{kind}, not an image file")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror  # "Permission denied", "Too many levels of symbolic links", ...
    return str(exc) or type(exc).__name__


def load_rgb(path: str) -> Any:
    """Fully decode ``path`` and return an RGB ``PIL.Image``.

    Raises:
        ImageLoadError: the file is missing, not a regular file (FIFO, device, folder, dangling
            or looping link), not an image, a decompression bomb, truncated or otherwise
            unreadable.
    """
    from PIL import Image

    try:
        _check_regular_file(path)
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except _errors() as exc:
        raise load_error(f"cannot read image {printable(path)}", exc) from exc


def probe_image(path: str) -> ImageInfo:
    """Read only the header of ``path`` (cheap): size, format and mode.

    Raises:
        ImageLoadError: the header cannot be parsed.
    """
    from PIL import Image

    try:
        _check_regular_file(path)
        with Image.open(path) as img:
            return ImageInfo(path, int(img.width), int(img.height), str(img.format), img.mode)
    except _errors() as exc:
        raise load_error(f"cannot read image header of {printable(path)}", exc) from exc


@dataclass
class DataIssues:
    """Thread-safe tally of data problems met while scanning or loading.

    Attributes:
        unreadable: files that could not be read (path -> reason); they are skipped.
        small: files smaller than the crop (path -> (width, height)); they are resized first.
        substituted: loads that failed at training time and were replaced by another sample.
        substituted_files: the files that failed at load time (path -> the file used instead).
        spool: a file through which DataLoader worker processes report what they meet (their
            own copy of the tally dies with them); :meth:`collect` merges it. ``None``: loads
            happen in this process only.
    """

    unreadable: dict[str, str] = field(default_factory=dict)
    small: dict[str, tuple[int, int]] = field(default_factory=dict)
    substituted: int = 0
    substituted_files: dict[str, str] = field(default_factory=dict)
    spool: str | None = None
    _spool_read: int = field(default=0, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def _reported_by_worker(self, kind: str, path: str | None, other: str | None) -> bool:
        """In a DataLoader worker with a spool: append the event to it (merged and logged by
        the main process) and return True."""
        if self.spool is None:
            return False
        from torch.utils.data import get_worker_info

        if get_worker_info() is None:
            return False
        line = json.dumps({"kind": kind, "path": path, "other": other}) + "\n"
        try:
            with open(self.spool, "a", encoding="utf-8") as f:  # one short append per event
                f.write(line)
        except OSError:
            return False  # cannot report: the worker at least logs it
        return True

    def collect(self) -> None:
        """Merge the events DataLoader workers appended to :attr:`spool` since the last call."""
        if self.spool is None or not os.path.isfile(self.spool):
            return
        with self._lock:
            with open(self.spool, "rb") as f:
                f.seek(self._spool_read)
                data = f.read()
            end = data.rfind(b"\n") + 1  # complete lines only
            self._spool_read += end
        for raw in data[:end].splitlines():
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if event.get("kind") == "unreadable":
                self.add_unreadable(event["path"], event.get("other") or "")
            elif event.get("kind") == "substituted":
                self.add_substituted(event.get("path"), event.get("other"))

    def add_unreadable(self, path: str, reason: str) -> None:
        with self._lock:
            first = path not in self.unreadable
            self.unreadable[path] = reason
        if first and not self._reported_by_worker("unreadable", path, reason):
            logger.warning("skipping unreadable image %s (%s)", printable(path), printable(reason))

    def add_small(self, path: str, size: tuple[int, int]) -> None:
        with self._lock:
            self.small[path] = size

    def add_substituted(self, path: str | None = None, replacement: str | None = None) -> None:
        if self._reported_by_worker("substituted", path, replacement):
            return  # counted, like every load, by the main process when it collects
        with self._lock:
            self.substituted += 1
            if path is not None:
                first = path not in self.substituted_files
                self.substituted_files[path] = replacement or ""
            else:
                first = False
        if first:
            logger.warning("image %s failed to decode; %s was used in its place", printable(path),
                           printable(replacement or "another sample"))

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable counts plus the first few offending paths (non-UTF-8 bytes of file
        names shown as ``\\xNN``)."""
        self.collect()
        with self._lock:
            return {
                "unreadable": len(self.unreadable),
                "unreadable_files": [printable(p) for p in sorted(self.unreadable)[:50]],
                "smaller_than_crop": len(self.small),
                "smaller_than_crop_files": [printable(p) for p in sorted(self.small)[:20]],
                "substituted_at_load": self.substituted,
                "substituted_files": {printable(p): printable(r) for p, r in
                                      sorted(self.substituted_files.items())[:50]},
            }

    def total(self) -> int:
        """Unreadable plus substituted files (small images are not an issue of correctness)."""
        self.collect()
        with self._lock:
            return len(self.unreadable.keys() | self.substituted_files.keys())
