"""Greyscale / monochrome detection: seed 003's HSV rule, fast on a reduced copy, exact near thresholds.

The rule (the user's `tag.py`): convert to HSV as OpenCV does (hue 0..179, saturation 0..255);
mean saturation / 255 below 0.001 -> `greyscale`; else hue standard deviation / 179 below 0.03 ->
`monochrome`; else no tag.

Speed: the statistics are measured on a reduced copy: JPEGs decode at 1/2 or 1/4 scale (DCT
scaling, `Image.draft`; never 1/8, whose 8x8 block averages hide pixel noise and flip labels of
noisy greyscale scans), then every k-th pixel is taken so about 256 px remain on the short side.
Point sampling keeps the pixel statistics unbiased; DCT scaling averages a little (chroma is
already half resolution in 4:2:0 JPEGs), which moves the statistics by up to ~15% on noisy
near-grey images. So a reduced measurement within 25% of a threshold is discarded and the image
is measured again at full resolution, exactly as the seed did. Labels then match the seed's
full-resolution method except on images whose reduced statistics land more than 25% away from a
threshold while the full ones are on its other side (none in the tests or the benchmark).

Known limits of the rule itself (kept as the default for compatibility, thresholds configurable):
grey pixels have hue 0, so a tinted image with large black/white areas has a large hue spread;
hue is not treated as circular, so red tints (hues near 0 and 179) count as colour.
Transparent pixels count as white (sdprep composites alpha on white; the seed dropped alpha).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdprep.images import image_size, load_image

VERSION = "hsv-1"
LABELS = ("greyscale", "monochrome")
COLOUR = "colour"
REDUCED_SIDE = 256
MAX_DRAFT_SCALE = 4
BAND = 0.25


@dataclass(frozen=True)
class MonochromeSettings:
    """The `[monochrome]` rules: on/off and the seed's two thresholds."""

    enabled: bool = True
    saturation_threshold: float = 0.001
    hue_threshold: float = 0.03


@dataclass(frozen=True)
class HsvStats:
    """Mean saturation (0..1) and hue standard deviation (0..1), and how they were measured."""

    saturation: float
    hue_std: float
    measured: str  # "reduced" | "full"
    size: tuple[int, int]  # the analysed pixel size (width, height)


def hsv_stats(rgb: np.ndarray) -> tuple[float, float]:
    """(mean saturation / 255, std of hue / 179) of an RGB uint8 array, as the seed computes them."""
    import cv2

    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)
    mean, std = cv2.meanStdDev(hsv)
    return float(mean[1, 0]) / 255.0, float(std[0, 0]) / 179.0


def classify(saturation: float, hue_std: float, settings: MonochromeSettings) -> str | None:
    """The seed's rule: `greyscale`, `monochrome` or None (colour)."""
    if saturation < settings.saturation_threshold:
        return "greyscale"
    if hue_std < settings.hue_threshold:
        return "monochrome"
    return None


def _near(value: float, threshold: float) -> bool:
    return threshold * (1 - BAND) <= value <= threshold * (1 + BAND)


def needs_full_resolution(stats: HsvStats, settings: MonochromeSettings) -> bool:
    """True when reduced statistics are too close to a threshold to trust the label."""
    if stats.measured == "full":
        return False
    if _near(stats.saturation, settings.saturation_threshold):
        return True
    grey = stats.saturation < settings.saturation_threshold
    return not grey and _near(stats.hue_std, settings.hue_threshold)


def measure_full(path: Path, root: Path | str | None = None) -> HsvStats:
    """The seed's method: HSV statistics of every pixel at full resolution (`root`: the dataset
    folder, for the symlink rule)."""
    arr = np.asarray(load_image(path, "RGB", root=root))
    sat, hue = hsv_stats(arr)
    return HsvStats(sat, hue, "full", (arr.shape[1], arr.shape[0]))


def measure_reduced(path: Path, root: Path | str | None = None) -> HsvStats:
    """HSV statistics of a reduced copy (JPEG DCT scaling at most 1/4, then point sampling)."""
    w, h = image_size(path, root=root)
    side = max(REDUCED_SIDE, math.ceil(min(w, h) / MAX_DRAFT_SCALE))
    arr = np.asarray(load_image(path, "RGB", draft=(side, side), root=root))
    stride = max(1, min(arr.shape[:2]) // REDUCED_SIDE)
    if stride > 1:
        arr = arr[::stride, ::stride]
    sat, hue = hsv_stats(arr)
    return HsvStats(sat, hue, "reduced", (arr.shape[1], arr.shape[0]))


def measure(path: Path, settings: MonochromeSettings, root: Path | str | None = None) -> HsvStats:
    """Reduced statistics, or full-resolution ones when the reduced ones are near a threshold."""
    stats = measure_reduced(path, root)
    return measure_full(path, root) if needs_full_resolution(stats, settings) else stats


# -- the sidecar record ------------------------------------------------------------------------


def _file_key(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def stats_from_record(record: Any, path: Path) -> HsvStats | None:
    """Statistics stored by an earlier run, if they were measured on this very file by this version."""
    if not isinstance(record, dict) or record.get("version") != VERSION:
        return None
    if record.get("image") != _file_key(path):
        return None
    try:
        size = record.get("measured_size") or (0, 0)
        return HsvStats(
            float(record["saturation"]),
            float(record["hue_std"]),
            str(record["measured"]),
            (int(size[0]), int(size[1])),
        )
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def make_record(stats: HsvStats, settings: MonochromeSettings, path: Path) -> dict[str, Any]:
    """What goes to `sdprep_meta(sidecar)["monochrome"]`."""
    label = classify(stats.saturation, stats.hue_std, settings)
    return {
        "label": label or COLOUR,
        "saturation": stats.saturation,
        "hue_std": stats.hue_std,
        "version": VERSION,
        "thresholds": {"saturation": settings.saturation_threshold, "hue": settings.hue_threshold},
        "measured": stats.measured,
        "measured_size": list(stats.size),
        "image": _file_key(path),
    }


def detect(
    path: Path, previous: Any, settings: MonochromeSettings, root: Path | str | None = None
) -> tuple[str | None, dict[str, Any], bool]:
    """(label, sidecar record, measured now?) for an image, reusing `previous` statistics when valid;
    `root`: the dataset folder, for the symlink rule."""
    stats = stats_from_record(previous, path)
    measured = stats is None or needs_full_resolution(stats, settings)
    if stats is None or measured:
        stats = measure(path, settings, root)
    record = make_record(stats, settings, path)
    return classify(stats.saturation, stats.hue_std, settings), record, measured


# -- synthetic images for tests and benchmarks ---------------------------------------------------

SYNTHETIC_KINDS = ("colour", "grey", "sepia", "blue", "pastel", "grey_accent", "grey_noise", "red_tint")


def synthetic_image(kind: str, seed: int, size: tuple[int, int] = (1024, 1536)) -> np.ndarray:
    """A deterministic illustration-like RGB image of one kind (greyscale, tinted or colour)."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    w, h = size
    top, bottom = rng.uniform(30, 225, 2)
    ramp = top + (bottom - top) * (0.6 * np.linspace(0, 1, h)[:, None] + 0.4 * np.linspace(0, 1, w)[None, :])
    canvas = Image.fromarray(np.stack([ramp] * 3, -1).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    for _ in range(20):
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(w // 20, w // 4))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline=(0, 0, 0), width=3)
    rgb = np.asarray(canvas.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float64)
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    if kind == "colour":
        out = rgb
    elif kind == "pastel":  # low saturation colour: 85% grey
        out = 0.85 * grey[..., None] + 0.15 * rgb
    elif kind == "grey":
        out = np.repeat(grey[..., None], 3, -1)
    elif kind == "grey_noise":  # a scan: equal noise in every channel stays grey
        out = np.repeat((grey + rng.normal(0, 4, grey.shape))[..., None], 3, -1)
    elif kind == "grey_accent":  # greyscale with one small blue patch
        out = np.repeat(grey[..., None], 3, -1)
        out[h // 3 : h // 3 + h // 12, w // 3 : w // 3 + w // 12] = (40, 60, 220)
    elif kind == "sepia":
        out = grey[..., None] * np.array([1.0, 0.82, 0.62]) + np.array([18.0, 12.0, 4.0])
    elif kind == "blue":
        out = grey[..., None] * np.array([0.55, 0.75, 1.0]) + 12.0
    elif kind == "red_tint":
        out = grey[..., None] * np.array([1.0, 0.7, 0.7])
    else:
        raise ValueError(f"unknown synthetic image kind {kind!r}; valid: {', '.join(SYNTHETIC_KINDS)}")
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
