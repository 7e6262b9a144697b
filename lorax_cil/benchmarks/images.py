"""Robust image reading: RGB conversion, header probes and a tally of data problems."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ImageLoadError", "ImageInfo", "DataIssues", "load_rgb", "probe_image"]

logger = logging.getLogger(__name__)


class ImageLoadError(OSError):
    """An image file could not be read or decoded. The message names the file."""


@dataclass(frozen=True)
class ImageInfo:
    """What a header probe learns about an image file."""

    path: str
    width: int
    height: int
    format: str
    mode: str


def _to_rgb(img: Any) -> Any:
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


def load_rgb(path: str) -> Any:
    """Fully decode ``path`` and return an RGB ``PIL.Image``.

    Raises:
        ImageLoadError: the file is missing, not an image, truncated or otherwise unreadable.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb(img)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise ImageLoadError(f"cannot read image {path}: {exc}") from exc


def probe_image(path: str) -> ImageInfo:
    """Read only the header of ``path`` (cheap): size, format and mode.

    Raises:
        ImageLoadError: the header cannot be parsed.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return ImageInfo(path, int(img.width), int(img.height), str(img.format), img.mode)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise ImageLoadError(f"cannot read image header of {path}: {exc}") from exc


@dataclass
class DataIssues:
    """Thread-safe tally of data problems met while scanning or loading.

    Attributes:
        unreadable: files that could not be read (path -> reason); they are skipped.
        small: files smaller than the crop (path -> (width, height)); they are resized first.
        substituted: loads that failed at training time and were replaced by another sample.
    """

    unreadable: dict[str, str] = field(default_factory=dict)
    small: dict[str, tuple[int, int]] = field(default_factory=dict)
    substituted: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_unreadable(self, path: str, reason: str) -> None:
        with self._lock:
            first = path not in self.unreadable
            self.unreadable[path] = reason
        if first:
            logger.warning("skipping unreadable image %s (%s)", path, reason)

    def add_small(self, path: str, size: tuple[int, int]) -> None:
        with self._lock:
            self.small[path] = size

    def add_substituted(self) -> None:
        with self._lock:
            self.substituted += 1

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable counts plus the first few offending paths."""
        with self._lock:
            return {
                "unreadable": len(self.unreadable),
                "unreadable_files": sorted(self.unreadable)[:50],
                "smaller_than_crop": len(self.small),
                "smaller_than_crop_files": sorted(self.small)[:20],
                "substituted_at_load": self.substituted,
            }
