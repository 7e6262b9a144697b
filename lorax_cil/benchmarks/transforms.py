"""Train and evaluation transforms.

Train: resize-if-smaller, optional Gaussian blur and JPEG re-compression (each with probability
``p``, as in CNNDetection's "Blur+JPEG (0.1)"), RandomCrop, optional horizontal flip, tensor,
normalise. Eval: resize-if-smaller, CenterCrop, tensor, normalise. Images smaller than the crop
are resized (shorter side to the crop size) rather than zero-padded.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Any, Callable

__all__ = [
    "TransformConfig",
    "ResizeIfSmaller",
    "RandomGaussianBlur",
    "RandomJPEG",
    "build_transform",
    "degrade",
]


@dataclass(frozen=True)
class TransformConfig:
    """Image pre-processing options.

    Attributes:
        size: crop size in pixels (the backbone's input size).
        mean: normalisation mean per channel.
        std: normalisation std per channel.
        resize: when set, resize the shorter side to this before cropping (``None``: no resize,
            except for images smaller than ``size``).
        blur_prob: probability of a Gaussian blur at train time.
        blur_sigma: (min, max) sigma of the train-time blur, drawn uniformly.
        jpeg_prob: probability of a JPEG re-compression at train time.
        jpeg_quality: (min, max) JPEG quality of the train-time re-compression.
        hflip: random horizontal flips at train time.
        interpolation: resize interpolation (``bilinear`` or ``bicubic``).
    """

    size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize: int | None = None
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.0, 3.0)
    jpeg_prob: float = 0.0
    jpeg_quality: tuple[int, int] = (30, 100)
    hflip: bool = False
    interpolation: str = "bilinear"

    @classmethod
    def for_backbone(cls, spec: Any, data: Any = None, *, augment: bool = True, crop: int | None = None,
                     resize: int | None = None) -> "TransformConfig":
        """The pre-processing of a backbone (``spec``: its ``BackboneSpec``): its input size and
        normalisation. ``data`` (a configuration section with ``crop``, ``resize`` and, with
        ``augment``, ``blur_prob``, ``jpeg_prob``, ``hflip``) or ``crop`` / ``resize`` override
        the size and resize."""
        opts: dict[str, Any] = {}
        if data is not None:
            crop, resize = data.crop, data.resize
            if augment:
                opts = dict(blur_prob=data.blur_prob, jpeg_prob=data.jpeg_prob, hflip=data.hflip)
        return cls(size=crop or spec.input_size, mean=tuple(spec.mean), std=tuple(spec.std),
                   resize=resize, **opts)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"transform size must be positive, got {self.size}")
        for name in ("blur_prob", "jpeg_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(
                f"interpolation must be bilinear, bicubic or nearest, got {self.interpolation!r}"
            )


def _pil_resample(name: str) -> Any:
    from PIL import Image

    return {
        "bilinear": Image.BILINEAR,
        "bicubic": Image.BICUBIC,
        "nearest": Image.NEAREST,
    }[name]


@dataclass
class ResizeIfSmaller:
    """Resize so that the shorter side is at least ``size`` (never shrinks)."""

    size: int
    interpolation: str = "bilinear"

    def __call__(self, img: Any) -> Any:
        w, h = img.size
        short = min(w, h)
        if short >= self.size:
            return img
        scale = self.size / short
        new = (max(self.size, round(w * scale)), max(self.size, round(h * scale)))
        return img.resize(new, _pil_resample(self.interpolation))


@dataclass
class RandomGaussianBlur:
    """With probability ``p``, blur with sigma drawn uniformly from ``sigma``."""

    p: float
    sigma: tuple[float, float] = (0.0, 3.0)

    def __call__(self, img: Any) -> Any:
        if self.p <= 0 or random.random() >= self.p:
            return img
        from PIL import ImageFilter

        s = random.uniform(*self.sigma)
        return img.filter(ImageFilter.GaussianBlur(radius=s)) if s > 0 else img


@dataclass
class RandomJPEG:
    """With probability ``p``, re-compress as JPEG with a quality drawn from ``quality``."""

    p: float
    quality: tuple[int, int] = (30, 100)

    def __call__(self, img: Any) -> Any:
        if self.p <= 0 or random.random() >= self.p:
            return img
        return _jpeg(img, random.randint(*self.quality))


def _jpeg(img: Any, quality: int) -> Any:
    from PIL import Image

    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def degrade(img: Any, *, blur_sigma: float = 0.0, jpeg_quality: int | None = None) -> Any:
    """Deterministic degradation for robustness sweeps: blur then JPEG."""
    if blur_sigma > 0:
        from PIL import ImageFilter

        img = img.filter(ImageFilter.GaussianBlur(radius=blur_sigma))
    if jpeg_quality is not None:
        img = _jpeg(img, jpeg_quality)
    return img


def build_transform(cfg: TransformConfig, *, train: bool, extra: list[Callable] | None = None):
    """Build the train or eval transform for ``cfg`` (a torchvision ``Compose``).

    ``extra`` callables (PIL -> PIL) run right after the resize, before cropping; the
    robustness sweeps use it to degrade evaluation images.
    """
    from torchvision import transforms as T

    ops: list[Callable] = []
    if cfg.resize is not None:
        ops.append(T.Resize(cfg.resize, interpolation=_tv_interp(cfg.interpolation)))
    ops.append(ResizeIfSmaller(cfg.size, cfg.interpolation))
    ops.extend(extra or [])
    if train:
        ops.append(RandomGaussianBlur(cfg.blur_prob, cfg.blur_sigma))
        ops.append(RandomJPEG(cfg.jpeg_prob, cfg.jpeg_quality))
        ops.append(T.RandomCrop(cfg.size))
        if cfg.hflip:
            ops.append(T.RandomHorizontalFlip())
    else:
        ops.append(T.CenterCrop(cfg.size))
    ops.append(T.ToTensor())
    ops.append(T.Normalize(mean=list(cfg.mean), std=list(cfg.std)))
    return T.Compose(ops)


def _tv_interp(name: str) -> Any:
    from torchvision.transforms import InterpolationMode

    return {
        "bilinear": InterpolationMode.BILINEAR,
        "bicubic": InterpolationMode.BICUBIC,
        "nearest": InterpolationMode.NEAREST,
    }[name]
