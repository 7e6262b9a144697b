"""Generator families of the synthetic embedded dataset: artifact fingerprints.

A generator family turns a sample of its task's real domain (see
:mod:`lorax_cil.benchmarks.synth_domains`) into a "fake" by applying a fingerprint that resembles
an artifact of real image generators: transposed-convolution checkerboards, upsampling traces,
spectral peaks, blending seams, compression blocks, fixed noise residuals, ... Each family is a
small function ``apply(img, rng) -> img`` on float32 ``(H, W, 3)`` images in ``[0, 1]``,
registered in :data:`FAMILIES` with a one-line description, the real generator it imitates and
the real domain its task draws from.

Strengths are deliberately subtle (a few grey levels, a fraction of the spectrum): a colour
histogram cannot tell real from fake, a small CNN can. Fixed fingerprints (spectral phases, noise
residual tiles) depend on the family name only, like the weights of a real generator.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

__all__ = ["GeneratorFamily", "FAMILIES", "register_family", "family_names"]

Apply = Callable[[np.ndarray, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class GeneratorFamily:
    """An artifact fingerprint standing in for one image generator.

    Attributes:
        name: registry key; also the name of the task that uses this family.
        description: one line: what the artifact is.
        imitates: the real generator (CDDB task) whose artifacts it resembles.
        domain: name of the real domain (``synth_domains.DOMAINS``) of this family's task.
        apply: ``apply(img, rng) -> img`` on float32 ``(H, W, 3)`` images in ``[0, 1]``.
    """

    name: str
    description: str
    imitates: str
    domain: str
    apply: Apply


FAMILIES: dict[str, GeneratorFamily] = {}


def register_family(name: str, *, description: str, imitates: str, domain: str):
    """Decorator registering an artifact function as a :class:`GeneratorFamily`."""

    def deco(fn: Apply) -> Apply:
        if name in FAMILIES:
            raise ValueError(f"generator family {name!r} is already registered")
        FAMILIES[name] = GeneratorFamily(name, description, imitates, domain, fn)
        return fn

    return deco


def family_names() -> list[str]:
    """Sorted names of the registered generator families."""
    return sorted(FAMILIES)


# ----------------------------------------------------------------------------- helpers
def _fixed_rng(name: str) -> np.random.Generator:
    """Generator seeded by a family name only: the family's fixed fingerprint."""
    return np.random.default_rng(zlib.crc32(name.encode("utf-8")))


def _down2(img: np.ndarray) -> np.ndarray:
    """2x2 area average (odd sizes are edge-padded first)."""
    h, w = img.shape[:2]
    img = np.pad(img, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return 0.25 * (img[0::2, 0::2] + img[1::2, 0::2] + img[0::2, 1::2] + img[1::2, 1::2])


def _up2_nearest(small: np.ndarray, h: int, w: int) -> np.ndarray:
    return small.repeat(2, 0).repeat(2, 1)[:h, :w]


def _sample_bilinear(img: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinear sampling at float pixel coordinates (clamped at the border)."""
    h, w = img.shape[:2]
    ys = np.clip(ys, 0, h - 1)
    xs = np.clip(xs, 0, w - 1)
    y0 = np.minimum(ys.astype(np.int64), h - 2)
    x0 = np.minimum(xs.astype(np.int64), w - 2)
    ty, tx = (ys - y0)[..., None], (xs - x0)[..., None]
    top = img[y0, x0] * (1 - tx) + img[y0, x0 + 1] * tx
    bot = img[y0 + 1, x0] * (1 - tx) + img[y0 + 1, x0 + 1] * tx
    return (top * (1 - ty) + bot * ty).astype(np.float32)


def _resize_bilinear(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Half-pixel-centred bilinear resize (``align_corners=False``)."""
    sh, sw = img.shape[:2]
    ys = (np.arange(h, dtype=np.float32) + 0.5) * (sh / h) - 0.5
    xs = (np.arange(w, dtype=np.float32) + 0.5) * (sw / w) - 0.5
    return _sample_bilinear(img, ys[:, None].repeat(w, 1), xs[None, :].repeat(h, 0))


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflected borders."""
    r = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    h, w = img.shape[:2]
    p = np.pad(img, ((r, r), (0, 0), (0, 0)), mode="reflect")
    out = sum(k[i] * p[i: i + h] for i in range(2 * r + 1))
    p = np.pad(out, ((0, 0), (r, r), (0, 0)), mode="reflect")
    return sum(k[i] * p[:, i: i + w] for i in range(2 * r + 1)).astype(np.float32)


def _lowpass(img: np.ndarray, cutoff: float, order: float) -> np.ndarray:
    """Butterworth low-pass in the Fourier domain (``cutoff`` in cycles/pixel)."""
    h, w = img.shape[:2]
    r = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :])
    gain = 1.0 / (1.0 + (r / cutoff) ** (2 * order))
    spec = np.fft.fft2(img, axes=(0, 1)) * gain[..., None]
    return np.fft.ifft2(spec, axes=(0, 1)).real.astype(np.float32)


_RGB2YCC = np.array([[0.299, 0.587, 0.114],
                     [-0.168736, -0.331264, 0.5],
                     [0.5, -0.418688, -0.081312]], dtype=np.float32)
_YCC2RGB = np.linalg.inv(_RGB2YCC).astype(np.float32)


def _to_ycc(img: np.ndarray) -> np.ndarray:
    return img @ _RGB2YCC.T


def _to_rgb(ycc: np.ndarray) -> np.ndarray:
    return ycc @ _YCC2RGB.T


@lru_cache(maxsize=None)
def _dct8() -> np.ndarray:
    k = np.arange(8)
    m = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / 16) * np.sqrt(2 / 8)
    m[0] /= np.sqrt(2)
    return m.astype(np.float32)


_JPEG_LUMA = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], np.float32)


def _finish(img: np.ndarray) -> np.ndarray:
    return np.clip(img, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- families
@register_family("nn-upsample", domain="landscape", imitates="GauGAN (SPADE nearest upsampling)",
                 description="nearest-neighbour 2x upsampling: 2x2 pixel blocks")
def _nn_upsample(img, rng):
    h, w = img.shape[:2]
    up = _up2_nearest(_down2(img), h, w)
    a = rng.uniform(0.6, 0.8)
    return _finish((1 - a) * img + a * up)


@register_family("spectral-peaks", domain="gradient-blobs", imitates="BigGAN",
                 description="fixed-phase periodic grid (4, 8 px): peaks in the Fourier spectrum")
def _spectral_peaks(img, rng):
    h, w = img.shape[:2]
    pat = _peak_pattern(h, w)
    amp = rng.uniform(1.5, 2.5) / 255.0
    return _finish(img + amp * pat[..., None] * (0.6 + 0.8 * img))


@lru_cache(maxsize=8)
def _peak_pattern(h: int, w: int) -> np.ndarray:
    frng = _fixed_rng("spectral-peaks")
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pat = np.zeros((h, w), np.float32)
    for fy, fx in ((0.25, 0.0), (0.0, 0.25), (0.125, 0.125), (0.25, 0.25), (0.125, 0.375)):
        pat += np.cos(2 * np.pi * (fy * yy + fx * xx) + frng.uniform(0, 2 * np.pi))
    return pat / pat.std()


@register_family("tconv-checker", domain="shapes", imitates="CycleGAN (transposed convolutions)",
                 description="2x2 checkerboard from uneven transposed-convolution kernel overlap")
def _tconv_checker(img, rng):
    h, w = img.shape[:2]
    tile = np.array([[1.0, 0.5], [0.5, 0.25]], np.float32)
    tile = (tile - tile.mean()) / tile.std()
    pat = np.tile(tile, ((h + 1) // 2, (w + 1) // 2))[:h, :w, None]
    amp = rng.uniform(0.025, 0.04)
    return _finish(img * (1 + amp * pat) + 0.3 * amp * pat)


@register_family("hf-suppress", domain="cells", imitates="IMLE",
                 description="missing high frequencies: Butterworth low-pass of the top spectrum")
def _hf_suppress(img, rng):
    return _finish(_lowpass(img, rng.uniform(0.2, 0.26), 3.0))


@register_family("blend-seam", domain="portrait", imitates="Deepfake face swaps",
                 description="pasted, smoothed, colour-mismatched ellipse with a feathered seam")
def _blend_seam(img, rng):
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h * rng.uniform(0.4, 0.6), w * rng.uniform(0.4, 0.6)
    ry, rx = h * rng.uniform(0.25, 0.35), w * rng.uniform(0.2, 0.3)
    d = (np.hypot((yy - cy) / ry, (xx - cx) / rx) - 1.0) * min(ry, rx)
    alpha = np.clip(0.5 - d / 3.0, 0.0, 1.0)[..., None]
    pasted = _blur(img, 0.9) * (1 + rng.normal(0.0, 0.03, 3).astype(np.float32))
    seam = np.exp(-0.5 * (d / 1.2) ** 2)[..., None] * rng.uniform(-0.04, -0.02)
    return _finish(alpha * pasted + (1 - alpha) * img + seam)


@register_family("bilinear-upsample", domain="horizon", imitates="CRN (bilinear refinement)",
                 description="bilinear 2x upsampling: blur and periodic inter-pixel correlation")
def _bilinear_upsample(img, rng):
    h, w = img.shape[:2]
    up = _resize_bilinear(_down2(img), h, w)
    a = rng.uniform(0.7, 0.9)
    return _finish((1 - a) * img + a * up)


@register_family("jpeg-blocks", domain="clutter", imitates="in-the-wild deepfakes (recompressed)",
                 description="8x8 block-DCT quantisation of luma, JPEG quality 40-60")
def _jpeg_blocks(img, rng):
    h, w = img.shape[:2]
    q = rng.uniform(40, 60)
    scale = (5000 / q if q < 50 else 200 - 2 * q) / 100.0
    table = np.maximum(np.floor(_JPEG_LUMA * scale + 0.5), 1.0) / 255.0
    ycc = _to_ycc(img)
    ph, pw = -h % 8, -w % 8
    y = np.pad(ycc[..., 0], ((0, ph), (0, pw)), mode="edge")
    blocks = y.reshape(y.shape[0] // 8, 8, y.shape[1] // 8, 8).transpose(0, 2, 1, 3)
    m = _dct8()
    coef = m @ blocks @ m.T
    coef = np.round(coef / table) * table
    y = (m.T @ coef @ m).transpose(0, 2, 1, 3).reshape(y.shape)
    ycc[..., 0] = y[:h, :w]
    return _finish(_to_rgb(ycc))


@register_family("noise-residual", domain="bokeh", imitates="Glow",
                 description="fixed PRNU-like residual: tiled 8x8 pattern plus column noise")
def _noise_residual(img, rng):
    h, w = img.shape[:2]
    pat = _residual_pattern(h, w)
    amp = rng.uniform(0.02, 0.03)
    return _finish(img * (1 + amp * pat) + 0.3 * amp * pat)


@lru_cache(maxsize=8)
def _residual_pattern(h: int, w: int) -> np.ndarray:
    frng = _fixed_rng("noise-residual")
    tile = frng.standard_normal((8, 8, 3)).astype(np.float32)
    cols = frng.standard_normal((1, w, 1)).astype(np.float32) * 0.5
    pat = np.tile(tile, ((h + 7) // 8, (w + 7) // 8, 1))[:h, :w] + cols
    return pat / pat.std()


@register_family("colour-shift", domain="marble", imitates="StarGAN (attribute editing)",
                 description="subtle hue rotation, saturation gain, 1-2 px chroma misregistration")
def _colour_shift(img, rng):
    ycc = _to_ycc(img)
    th = np.deg2rad(rng.uniform(4.0, 8.0))
    gain = rng.uniform(1.04, 1.1)
    cb, cr = ycc[..., 1].copy(), ycc[..., 2].copy()
    ycc[..., 1] = gain * (np.cos(th) * cb - np.sin(th) * cr)
    ycc[..., 2] = gain * (np.sin(th) * cb + np.cos(th) * cr)
    out = _to_rgb(ycc)
    out[..., 0] = np.concatenate([out[:, :2, 0], out[:, :-2, 0]], 1)  # red two pixels right
    out[..., 2] = np.concatenate([out[1:, :, 2], out[-1:, :, 2]], 0)  # blue one pixel up
    return _finish(out)


@register_family("aliasing", domain="fibres", imitates="StyleGAN (aliasing, texture sticking)",
                 description="non-integer nearest-neighbour rescale: duplicated rows/columns")
def _aliasing(img, rng):
    h, w = img.shape[:2]
    s = rng.uniform(0.7, 0.85, 2)
    oy, ox = rng.uniform(0, 1, 2)
    ys = np.minimum((np.arange(h) * s[0] + oy).astype(np.int64), h - 1)
    xs = np.minimum((np.arange(w) * s[1] + ox).astype(np.int64), w - 1)
    return _finish(img[ys][:, xs])


@register_family("chroma-subsample", domain="spots",
                 imitates="WhichFaceIsReal (JPEG 4:2:0 delivery)",
                 description="4:2:0 chroma subsampling: point-sampled half-resolution Cb/Cr")
def _chroma_subsample(img, rng):
    h, w = img.shape[:2]
    ycc = _to_ycc(img)
    ycc[..., 1:] = _up2_nearest(ycc[0::2, 0::2, 1:], h, w)  # point-sampled, no filter
    return _finish(_to_rgb(ycc))


@register_family("sr-ringing", domain="petals", imitates="SAN (super-resolution)",
                 description="Gibbs ringing and overshoot halos (sharp cut-off, over-sharpening)")
def _sr_ringing(img, rng):
    band = _lowpass(img, rng.uniform(0.3, 0.36), 8.0)
    amount = rng.uniform(0.5, 0.8)
    return _finish(band + amount * (band - _blur(band, 1.2)))


@register_family("warp-stretch", domain="landscape", imitates="flow / warping-based editors",
                 description="smooth random warp and anisotropic stretch, resampled bilinearly")
def _warp_stretch(img, rng):
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    k = rng.uniform(0, 2 * np.pi, 4)
    dy = 1.5 * np.sin(2 * np.pi * xx / w * 1.5 + k[0]) * np.cos(2 * np.pi * yy / h + k[1])
    dx = 1.5 * np.sin(2 * np.pi * yy / h * 1.5 + k[2]) * np.cos(2 * np.pi * xx / w + k[3])
    s = rng.uniform(0.9, 0.95)
    return _finish(_sample_bilinear(img, yy * s + dy + 1.5, xx + dx))
