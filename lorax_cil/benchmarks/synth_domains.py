"""Procedural "real" image domains of the synthetic embedded dataset.

Every task of :mod:`lorax_cil.benchmarks.synth` draws its real images (and the source images
its generator family corrupts into fakes) from one domain registered here. A domain is a
function ``render(rng, size, category) -> float32 array (size, size, 3) in [0, 1]``. All domains
colour their structure with palettes drawn from one shared distribution (:func:`palette`), so
global colour statistics overlap between tasks and only the *structure* (gradients, fractal
terrain, cells, faces, ...) tells the domains apart. Images are finished with a random tone
curve and camera-like sensor noise (:func:`finish`).

Only NumPy is used; every random draw comes from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

__all__ = ["RealDomain", "DOMAINS", "register_domain", "palette", "finish", "fractal_noise"]

Render = Callable[[np.random.Generator, int, int], np.ndarray]


@dataclass(frozen=True)
class RealDomain:
    """A procedural family of natural-looking images.

    Attributes:
        name: registry key.
        description: one line for documentation.
        render: ``render(rng, size, category) -> (size, size, 3) float32`` in ``[0, 1]``,
            before :func:`finish` (tone curve + sensor noise).
        categories: object categories (subclass folder names); empty when the domain has none.
    """

    name: str
    description: str
    render: Render
    categories: tuple[str, ...] = ()


DOMAINS: dict[str, RealDomain] = {}


def register_domain(name: str, description: str, categories: tuple[str, ...] = ()):
    """Decorator registering a render function as a :class:`RealDomain`."""

    def deco(fn: Render) -> Render:
        if name in DOMAINS:
            raise ValueError(f"domain {name!r} is already registered")
        DOMAINS[name] = RealDomain(name, description, fn, tuple(categories))
        return fn

    return deco


# ----------------------------------------------------------------------------- helpers
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1): ``(yy, xx)``, each ``(n, n)`` float32."""
    c = (np.arange(n, dtype=np.float32) + 0.5) / n
    return c[:, None].repeat(n, 1), c[None, :].repeat(n, 0)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB for arrays of equal shape; returns ``(..., 3)``."""
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([np.stack(c, -1) for c in
                      ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return np.take_along_axis(table, i[None, ..., None].repeat(3, -1), 0)[0]


def palette(rng: np.random.Generator, k: int) -> np.ndarray:
    """``k`` RGB colours from the distribution shared by every domain: ``(k, 3)`` float32."""
    h = rng.random(k)
    s = rng.uniform(0.1, 0.75, k)
    v = rng.uniform(0.2, 0.95, k)
    return _hsv_to_rgb(h, s, v).astype(np.float32)


def _colormap(field: np.ndarray, pal: np.ndarray) -> np.ndarray:
    """Map a scalar field in [0, 1] through a palette by piecewise-linear interpolation."""
    k = len(pal)
    pos = np.clip(field, 0.0, 1.0) * (k - 1)
    lo = np.minimum(pos.astype(np.int64), k - 2)
    t = (pos - lo)[..., None]
    return (pal[lo] * (1 - t) + pal[lo + 1] * t).astype(np.float32)


def _normalise(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return ((x - lo) / (hi - lo + 1e-8)).astype(np.float32)


@lru_cache(maxsize=8)
def _radial_freq(n: int) -> np.ndarray:
    """Radial frequency (cycles/pixel) of the ``rfft2`` grid of an ``n x n`` image."""
    fy = np.fft.fftfreq(n).astype(np.float32)
    fx = np.fft.rfftfreq(n).astype(np.float32)
    return np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)


def _filtered_noise(rng: np.random.Generator, n: int, gain: np.ndarray) -> np.ndarray:
    """White noise shaped by an ``rfft2``-grid gain, normalised to [0, 1]."""
    white = rng.standard_normal((n, n), dtype=np.float32)
    return _normalise(np.fft.irfft2(np.fft.rfft2(white) * gain, s=(n, n)))


def fractal_noise(rng: np.random.Generator, n: int, beta: float) -> np.ndarray:
    """1/f^beta noise (power spectrum), normalised to [0, 1]."""
    r = _radial_freq(n)
    return _filtered_noise(rng, n, np.where(r > 0, np.maximum(r, 1e-6) ** (-beta / 2.0), 0.0))


def _window(cy: float, cx: float, r: float, n: int, margin: int = 3):
    """Slices of the pixels within ``r`` (unit coordinates) of a centre, plus a margin."""
    y0, y1 = max(0, int((cy - r) * n) - margin), min(n, int(np.ceil((cy + r) * n)) + margin)
    x0, x1 = max(0, int((cx - r) * n) - margin), min(n, int(np.ceil((cx + r) * n)) + margin)
    return (slice(y0, y1), slice(x0, x1)) if y1 > y0 and x1 > x0 else None


def _soft(d: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased coverage of a signed distance ``d`` (in pixels, negative inside)."""
    return np.clip(0.5 - d / width, 0.0, 1.0).astype(np.float32)


def _ellipse_sd(yy, xx, cy, cx, ry, rx, theta, n) -> np.ndarray:
    """Approximate signed distance (pixels) to a rotated ellipse."""
    c, s = np.cos(theta), np.sin(theta)
    u = ((xx - cx) * c + (yy - cy) * s) / rx
    v = (-(xx - cx) * s + (yy - cy) * c) / ry
    return (np.sqrt(u * u + v * v) - 1.0) * min(rx, ry) * n


def _gradient(rng: np.random.Generator, n: int, pal: np.ndarray) -> np.ndarray:
    yy, xx = _grid(n)
    a = rng.uniform(0, 2 * np.pi)
    t = _normalise(np.cos(a) * xx + np.sin(a) * yy)
    return _colormap(t, pal[:2] if len(pal) >= 2 else np.repeat(pal, 2, 0))


def _paint(img: np.ndarray, alpha: np.ndarray, colour) -> None:
    """Alpha-composite a colour (or colour image) onto ``img`` in place."""
    a = alpha[..., None]
    img *= 1 - a
    img += a * colour


def finish(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Random tone curve plus camera-like sensor noise (luma-dominated, some chroma)."""
    gamma = rng.uniform(0.8, 1.25)
    img = np.clip(img, 0.0, 1.0) ** gamma
    sigma = rng.uniform(1.5, 3.0) / 255.0
    n = img.shape[0]
    luma = rng.standard_normal((n, n, 1), dtype=np.float32) * sigma
    chroma = rng.standard_normal((n, n, 3), dtype=np.float32) * (0.5 * sigma)
    return np.clip(img + luma + chroma, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- domains
@register_domain("landscape", "1/f fractal terrain mapped through a 4-colour palette")
def _landscape(rng, n, category):
    f = fractal_noise(rng, n, rng.uniform(2.2, 3.0))
    yy, _ = _grid(n)
    f = _normalise(f + rng.uniform(-0.4, 0.4) * yy)
    return _colormap(f, palette(rng, 4))


@register_domain("gradient-blobs", "smooth colour gradient with textured Gaussian blobs")
def _gradient_blobs(rng, n, category):
    pal = palette(rng, 2 + 6)
    img = _gradient(rng, n, pal[:2])
    yy, xx = _grid(n)
    tex = 0.75 + 0.5 * fractal_noise(rng, n, 1.4)
    for col in pal[2: 2 + rng.integers(3, 7)]:
        cy, cx = rng.random(2)
        sy, sx = rng.uniform(0.06, 0.2, 2)
        g = np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))
        shifted = np.roll(tex, tuple(rng.integers(0, n, 2)), axis=(0, 1))
        _paint(img, (g * rng.uniform(0.5, 0.95)).astype(np.float32), col * shifted[..., None])
    return img


@register_domain("shapes", "solid or zebra-striped ellipses on a gradient", ("discs", "stripes"))
def _shapes(rng, n, category):
    pal = palette(rng, 10)
    img = _gradient(rng, n, pal[:2])
    yy, xx = _grid(n)
    for i in range(rng.integers(2, 5)):
        cy, cx = rng.uniform(0.2, 0.8, 2)
        ry, rx = rng.uniform(0.08, 0.28, 2)
        th = rng.uniform(0, np.pi)
        freq = rng.uniform(8, 16)
        win = _window(cy, cx, max(ry, rx), n)
        y, x = yy[win], xx[win]
        alpha = _soft(_ellipse_sd(y, x, cy, cx, ry, rx, th, n), 1.2)
        shade = (1.1 - 0.4 * np.hypot(y - cy + 0.3 * ry, x - cx + 0.3 * rx) / max(rx, ry))
        col = pal[2 + 2 * i: 4 + 2 * i]
        if category == 1:  # stripes
            phase = 2 * np.pi * freq * (x * np.cos(th) + y * np.sin(th))
            s = 0.5 + 0.5 * np.tanh(4 * np.sin(phase))
            fill = col[0] * (1 - s[..., None]) + col[1] * s[..., None]
        else:
            fill = col[0]
        _paint(img[win], alpha, fill * np.clip(shade, 0.5, 1.2)[..., None])
    return img


@register_domain("cells", "Voronoi cells with membranes and nuclei, like microscopy")
def _cells(rng, n, category):
    yy, xx = _grid(n)
    k = int(rng.integers(10, 30))
    pts = rng.random((k, 2)).astype(np.float32)
    d = (yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2
    part = np.partition(d, 1, axis=-1)
    d1, d2 = np.sqrt(part[..., 0]), np.sqrt(part[..., 1])
    label = np.argmin(d, -1)
    pal = palette(rng, 3)
    cell_cols = _colormap(rng.random(k).astype(np.float32), pal)
    img = cell_cols[label]
    mem = _soft((d2 - d1) * n - rng.uniform(1.0, 2.5), 1.0)
    _paint(img, mem * rng.uniform(0.5, 0.9), palette(rng, 1)[0])
    nucleus = _soft(d1 * n - rng.uniform(2.0, 5.0), 1.5)
    _paint(img, nucleus * 0.7, palette(rng, 1)[0])
    return img


@register_domain("portrait", "face-like head: skin ellipse, eyes, mouth, hair, blurred background")
def _portrait(rng, n, category):
    pal = palette(rng, 6)
    bg = fractal_noise(rng, n, 3.0)
    img = _colormap(bg, pal[:2])
    yy, xx = _grid(n)
    cy, cx = 0.5 + rng.uniform(-0.06, 0.06, 2)
    ry, rx = rng.uniform(0.3, 0.4), rng.uniform(0.22, 0.3)
    th = rng.uniform(-0.2, 0.2)
    hair = _soft(_ellipse_sd(yy, xx, cy - 0.08, cx, ry * 1.05, rx * 1.15, th, n), 2.0)
    _paint(img, hair, pal[2] * (0.7 + 0.6 * fractal_noise(rng, n, 1.2))[..., None])
    face = _soft(_ellipse_sd(yy, xx, cy + 0.05, cx, ry * 0.9, rx, th, n), 1.5)
    shade = np.clip(1.15 - 0.6 * np.hypot(yy - cy, xx - cx - 0.05), 0.6, 1.2)
    _paint(img, face, pal[3] * shade[..., None])
    for side in (-1, 1):
        ey, ex = cy - 0.02, cx + side * rx * 0.42
        win = _window(ey, ex, 0.06, n)
        y, x = yy[win], xx[win]
        _paint(img[win], _soft(_ellipse_sd(y, x, ey, ex, 0.03, 0.055, th, n), 1.0), pal[4])
        _paint(img[win], _soft(_ellipse_sd(y, x, ey, ex, 0.018, 0.018, 0, n), 1.0), pal[5] * 0.3)
    my = cy + ry * 0.55
    win = _window(my, cx, rx * 0.4, n)
    mouth = _soft(_ellipse_sd(yy[win], xx[win], my, cx, 0.025, rx * 0.4, th, n), 1.0)
    _paint(img[win], mouth, pal[4] * 0.6)
    return img


@register_domain("horizon", "sky gradient over a fractal terrain silhouette, with a sun")
def _horizon(rng, n, category):
    pal = palette(rng, 5)
    yy, xx = _grid(n)
    img = _colormap(yy, pal[:2])
    prof = fractal_noise(rng, n, 2.5)[0]  # 1-D profile from one row
    line = rng.uniform(0.4, 0.7) + (prof - 0.5) * rng.uniform(0.15, 0.4)
    sy, sx = rng.uniform(0.1, 0.35), rng.uniform(0.1, 0.9)
    sun = _soft(_ellipse_sd(yy, xx, sy, sx, 0.06, 0.06, 0, n), 2.0)
    _paint(img, sun, pal[2])
    ground = _soft((line[None, :] - yy) * n, 1.2)
    _paint(img, ground, _colormap(fractal_noise(rng, n, 1.8), pal[3:5]))
    return img


@register_domain("clutter", "many overlapping rectangles and discs, like a cluttered scene")
def _clutter(rng, n, category):
    pal = palette(rng, 4)
    img = _colormap(fractal_noise(rng, n, 2.0), pal[:2])
    yy, xx = _grid(n)
    for _ in range(rng.integers(10, 24)):
        cy, cx = rng.random(2)
        hy, hx = rng.uniform(0.03, 0.15, 2)
        rect = rng.random() < 0.5
        colour = _colormap(np.float32(rng.random()), pal)
        win = _window(cy, cx, max(hy, hx), n)
        if win is None:
            continue
        y, x = yy[win], xx[win]
        if rect:
            d = np.maximum(np.abs(y - cy) - hy, np.abs(x - cx) - hx) * n
        else:
            d = _ellipse_sd(y, x, cy, cx, hy, hx, 0.0, n)
        _paint(img[win], _soft(d, 1.0), colour)
    return img


@register_domain("bokeh", "soft translucent out-of-focus discs on a dark gradient")
def _bokeh(rng, n, category):
    pal = palette(rng, 5)
    img = _gradient(rng, n, pal[:2]) * 0.6
    yy, xx = _grid(n)
    for _ in range(rng.integers(8, 20)):
        cy, cx = rng.random(2)
        r = rng.uniform(0.04, 0.14)
        width, opacity = rng.uniform(2.0, 6.0), rng.uniform(0.25, 0.6)
        colour = pal[2 + rng.integers(0, 3)]
        win = _window(cy, cx, r, n, margin=4)
        if win is None:
            continue
        d = _ellipse_sd(yy[win], xx[win], cy, cx, r, r, 0.0, n)
        _paint(img[win], _soft(d, width) * opacity, colour)
    return img


@register_domain("marble", "turbulent sinusoidal veins (marble / wood grain)")
def _marble(rng, n, category):
    yy, xx = _grid(n)
    th = rng.uniform(0, np.pi)
    freq = rng.uniform(2.0, 6.0)
    turb = fractal_noise(rng, n, 2.8) * rng.uniform(3.0, 8.0)
    v = np.sin(2 * np.pi * freq * (xx * np.cos(th) + yy * np.sin(th)) + turb)
    v = 0.5 + 0.5 * np.tanh(rng.uniform(1.0, 6.0) * v)  # crisper veins
    return _colormap(v, palette(rng, 3))


@register_domain("fibres", "oriented streaks like hair, grass or brushed metal")
def _fibres(rng, n, category):
    fy = np.fft.fftfreq(n).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(n).astype(np.float32)[None, :]
    img = _gradient(rng, n, palette(rng, 2))
    for _ in range(2):
        th = rng.uniform(0, np.pi)
        along = fx * np.cos(th) + fy * np.sin(th)
        across = -fx * np.sin(th) + fy * np.cos(th)
        filt = np.exp(-(along / 0.012) ** 2) * np.exp(-(np.abs(across) - 0.12) ** 2 / 0.006)
        s = _filtered_noise(rng, n, filt)
        s = 0.5 + 0.5 * np.tanh(6 * (s - 0.5))
        _paint(img, s * rng.uniform(0.4, 0.8), palette(rng, 1)[0])
    return img


@register_domain("petals", "flowers with round petals or spiky stars", ("flower", "star"))
def _petals(rng, n, category):
    pal = palette(rng, 6)
    img = _colormap(fractal_noise(rng, n, 2.6), pal[:2])
    yy, xx = _grid(n)
    for i in range(rng.integers(1, 3)):
        cy, cx = rng.uniform(0.3, 0.7, 2)
        r0 = rng.uniform(0.15, 0.3)
        k = int(rng.integers(5, 9))
        ang = np.arctan2(yy - cy, xx - cx) + rng.uniform(0, np.pi)
        rr = np.hypot(yy - cy, xx - cx)
        if category == 1:  # star: triangular spikes
            edge = r0 * (0.45 + 0.55 * np.abs(((ang * k / np.pi) % 2.0) - 1.0))
        else:
            edge = r0 * (0.7 + 0.3 * np.abs(np.cos(ang * k / 2)))
        alpha = _soft((rr - edge) * n, 1.2)
        fill = _colormap(np.clip(rr / r0, 0, 1), pal[2 + 2 * i: 4 + 2 * i])
        _paint(img, alpha, fill)
        _paint(img, _soft((rr - 0.2 * r0) * n, 1.2), pal[4 + i] * 0.8)
    return img


@register_domain("spots", "leopard-like spots and rosettes from band-pass noise")
def _spots(rng, n, category):
    r = _radial_freq(n)
    f0 = rng.uniform(0.05, 0.1)
    s = _filtered_noise(rng, n, np.exp(-((r - f0) / (0.35 * f0)) ** 2))
    pal = palette(rng, 3)
    t1, t2 = rng.uniform(0.55, 0.65), rng.uniform(0.7, 0.8)
    lvl = 0.5 * np.clip((s - t1) * 30, 0, 1) + 0.5 * np.clip((s - t2) * 30, 0, 1)
    return _colormap(lvl, pal)
