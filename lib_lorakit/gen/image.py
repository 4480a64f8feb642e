"""Image diagnostics: is an image usable, and how far is it from a baseline.

All measures work on 8-bit RGB images scaled to 0–1. Luminance is Rec. 709
(0.2126 R + 0.7152 G + 0.0722 B). The thresholds that decide *black*, *blank* and
*blown-out* are module constants, documented in the README, and every verdict carries
the numbers it was made from, so a badge can always say why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

# Post-check thresholds (fractions of full scale).
BLACK_MEAN = 0.04  # mean luminance below this ...
BLACK_P99 = 0.12  # ... and 99th percentile below this: black (a NaN/overflow image, or a safety-filter blackout)
BLANK_SPREAD = 0.015  # luminance standard deviation below this: a flat image of one colour
CLIP_LOW = 2 / 255  # a pixel counts as clipped when its luminance is at or below this ...
CLIP_HIGH = 253 / 255  # ... or at or above this
BLOWN_CLIPPED = 0.35  # more than this fraction of pixels clipped: blown out
BLOWN_WHITE_MEAN = 0.92  # or a mean luminance above this: washed to white

STATUSES = ("ok", "black", "blank", "blown-out")


def to_array(img: Image.Image | np.ndarray) -> np.ndarray:
    """An image as float64 RGB in 0–1, shape (H, W, 3)."""
    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    a = np.asarray(img, dtype=np.float64)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.max(initial=0.0) > 1.0 + 1e-9:
        a = a / 255.0
    return a[..., :3]


def luminance(a: np.ndarray) -> np.ndarray:
    return a[..., 0] * 0.2126 + a[..., 1] * 0.7152 + a[..., 2] * 0.0722


def saturation(a: np.ndarray) -> float:
    """Mean HSV saturation (0 grey – 1 fully saturated)."""
    mx = a.max(axis=2)
    mn = a.min(axis=2)
    s = np.where(mx > 1e-6, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    return float(s.mean())


@dataclass
class ImageCheck:
    status: str  # one of STATUSES
    luminance: float  # mean
    spread: float  # standard deviation of luminance
    clipped: float  # fraction of pixels at the ends of the range
    saturation: float
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def check_image(img: Image.Image | np.ndarray) -> ImageCheck:
    """Classify an image as ok / black / blank / blown-out, with its numbers."""
    a = to_array(img)
    y = luminance(a)
    mean = float(y.mean())
    spread = float(y.std())
    p99 = float(np.percentile(y, 99))
    clipped = _clipped(a)
    sat = saturation(a)
    if mean < BLACK_MEAN and p99 < BLACK_P99:
        status, why = "black", f"mean luminance {mean:.3f} < {BLACK_MEAN} and 99th percentile {p99:.3f} < {BLACK_P99}"
    elif spread < BLANK_SPREAD:
        status, why = "blank", f"luminance spread {spread:.4f} < {BLANK_SPREAD}: one flat colour"
    elif clipped > BLOWN_CLIPPED:
        status, why = "blown-out", f"{clipped:.0%} of pixels clipped (> {BLOWN_CLIPPED:.0%})"
    elif mean > BLOWN_WHITE_MEAN:
        status, why = "blown-out", f"mean luminance {mean:.3f} > {BLOWN_WHITE_MEAN}"
    else:
        status, why = "ok", f"luminance {mean:.2f}, spread {spread:.3f}, clipped {clipped:.1%}"
    return ImageCheck(status, round(mean, 5), round(spread, 5), round(clipped, 5), round(sat, 5), why)


def mean_abs_diff(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """Mean absolute difference over pixels and channels, 0–1."""
    x, y = to_array(a), to_array(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {x.shape[:2]} vs {y.shape[:2]}")
    return float(np.abs(x - y).mean())


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering with a 1-D kernel along both axes."""
    k = len(g)
    h, w = x.shape
    rows = sum(g[i] * x[i : h - k + 1 + i, :] for i in range(k))
    return sum(g[i] * rows[:, i : w - k + 1 + i] for i in range(k))


def ssim(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """Structural similarity of the luminance (Wang et al. 2004: 11×11 Gaussian window, σ 1.5,
    K1 0.01, K2 0.03, data range 1), averaged over the valid window positions. 1 = identical.
    Images smaller than the window are compared with a window of their size."""
    x, y = luminance(to_array(a)), luminance(to_array(b))
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {x.shape} vs {y.shape}")
    size = min(11, *x.shape)
    if size % 2 == 0:
        size -= 1
    g = _gaussian_window(size, 1.5)
    c1, c2 = 0.01**2, 0.03**2
    n = size * size  # sample covariance, as in the reference implementation
    cov_norm = n / (n - 1) if n > 1 else 1.0
    mx, my = _filter(x, g), _filter(y, g)
    sxx = cov_norm * (_filter(x * x, g) - mx * mx)
    syy = cov_norm * (_filter(y * y, g) - my * my)
    sxy = cov_norm * (_filter(x * y, g) - mx * my)
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def edge_energy(a: Image.Image | np.ndarray) -> float:
    """Mean absolute difference between neighbouring pixels' luminance (high-frequency content:
    over-trained LoRAs add noise, crunchy texture and hard edges)."""
    y = luminance(to_array(a))
    return float((np.abs(np.diff(y, axis=0)).mean() + np.abs(np.diff(y, axis=1)).mean()) / 2)


def _clipped(a: np.ndarray) -> float:
    y = luminance(a)
    return float(((y <= CLIP_LOW) | (y >= CLIP_HIGH)).mean())


def compare(img: Image.Image | np.ndarray, baseline: Image.Image | np.ndarray) -> dict[str, float]:
    """Every measure of ``img`` against ``baseline``."""
    a, b = to_array(img), to_array(baseline)
    return {
        "mad": round(mean_abs_diff(a, b), 5),
        "ssim": round(ssim(a, b), 5),
        "saturation": round(saturation(a), 5),
        "saturation_baseline": round(saturation(b), 5),
        "clipped": round(_clipped(a), 5),
        "clipped_baseline": round(_clipped(b), 5),
        "edges": round(edge_energy(a), 5),
        "edges_baseline": round(edge_energy(b), 5),
    }


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TEXT_CHUNKS = {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"}


def strip_png_text(data: bytes) -> bytes:
    """The PNG without its text, EXIF and time chunks (the infotext names the model and the LoRAs), pixels untouched.

    Raises ValueError on a file that is not a well-formed PNG.
    """
    import struct

    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError("not a PNG file")
    out, pos = [_PNG_SIGNATURE], len(_PNG_SIGNATURE)
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError("truncated PNG chunk")
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        end = pos + 12 + n
        if end > len(data):
            raise ValueError("truncated PNG chunk")
        if data[pos + 4 : pos + 8] not in _TEXT_CHUNKS:
            out.append(data[pos:end])
        pos = end
    return b"".join(out)
