"""`color`: a plain background colour is ignored (0), everything else is the subject (1).

The background colour is given (`--color "#ffffff"`, a name, or "r,g,b") or estimated as the median
colour of the image's outer frame. A pixel is background when its RGB distance to that colour is at
most `--tolerance` (0..441). With `--border-only`, only background regions that touch the image
border count, so a white shirt inside a white-background picture stays learned.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from PIL import Image

from sdprep.dataset import Item
from sdprep.errors import ConfigError
from sdprep.images import parse_color
from sdprep.prep.masks.base import MaskMethod, MethodSettings, register

RGB = tuple[int, int, int]


def border_color(rgb: np.ndarray, width: int = 2) -> RGB:
    """The median colour of the outer `width` pixels of an [H, W, 3] image."""
    h, w = rgb.shape[:2]
    width = max(1, min(width, h // 2 or 1, w // 2 or 1))
    frame = np.concatenate(
        [
            rgb[:width].reshape(-1, 3),
            rgb[-width:].reshape(-1, 3),
            rgb[:, :width].reshape(-1, 3),
            rgb[:, -width:].reshape(-1, 3),
        ]
    )
    r, g, b = (int(v) for v in np.median(frame, axis=0))
    return r, g, b


def background(rgb: np.ndarray, color: RGB, tolerance: float, border_only: bool = False) -> np.ndarray:
    """Boolean [H, W]: pixels within `tolerance` (RGB distance) of `color`."""
    diff = rgb.astype(np.int32) - np.asarray(color, dtype=np.int32)
    bg: np.ndarray = np.einsum("hwc,hwc->hw", diff, diff) <= tolerance * tolerance
    if border_only and bg.any():
        n, labels = cv2.connectedComponents(bg.astype(np.uint8), connectivity=8)
        edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        keep = np.zeros(n, dtype=bool)
        keep[np.unique(edge)] = True
        keep[0] = False  # label 0 is the subject
        bg = keep[labels]
    return bg


@register
class ColorMask(MaskMethod):
    """Background colour -> 0, subject -> 1."""

    name = "color"

    def __init__(self, settings: MethodSettings) -> None:
        super().__init__(settings)
        self.color = parse_color(settings.color) if settings.color else None
        if settings.tolerance < 0:
            raise ConfigError(f"--tolerance must be 0 or more, got {settings.tolerance}")

    def make(self, image: Image.Image, item: Item) -> np.ndarray:
        rgb = np.asarray(image.convert("RGB"))
        color = self.color or border_color(rgb)
        bg = background(rgb, color, self.settings.tolerance, self.settings.border_only)
        return (~bg).astype(np.float32)

    def options(self) -> dict[str, Any]:
        return {
            "color": "#{:02x}{:02x}{:02x}".format(*self.color) if self.color else "border",
            "tolerance": self.settings.tolerance,
            "border_only": self.settings.border_only,
        }
