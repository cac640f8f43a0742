"""Pure functions over masks: float32 arrays [H, W] in 0..1 (1 = full loss, 0 = none).

Every mask method's output goes through `postprocess` with the same options, in this order:
threshold (on the method's raw score), invert, grow, shrink, feather, combine with an existing
mask, floor. So `--grow`, `--shrink` and `--feather` always act on the white (learned) area of the
mask that is written, and `--floor` is the last word on the smallest weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from sdprep.config import bounded

COMBINE_MODES = ("union", "intersection")


def as_mask(arr: np.ndarray) -> np.ndarray:
    """A float32 [H, W] mask in 0..1 from a float or uint8 array (uint8 is scaled by 1/255)."""
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise ValueError(f"a mask is a 2-D array, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def to_uint8(mask: np.ndarray) -> np.ndarray:
    """The 8-bit greyscale pixels written to the mask PNG (rounded, 0..255)."""
    return np.clip(np.rint(mask * 255.0), 0, 255).astype(np.uint8)


def threshold(mask: np.ndarray, t: float) -> np.ndarray:
    """Binarise: values >= t become 1, the rest 0."""
    return (mask >= t).astype(np.float32)


def invert(mask: np.ndarray) -> np.ndarray:
    return (1.0 - mask).astype(np.float32)


def _disk(n: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * n + 1, 2 * n + 1))


def grow(mask: np.ndarray, n: int) -> np.ndarray:
    """Dilate by `n` pixels (a disk of radius n): white areas widen, grey values take the local max."""
    if n <= 0:
        return mask
    return cv2.dilate(mask, _disk(n), borderType=cv2.BORDER_REPLICATE)


def shrink(mask: np.ndarray, n: int) -> np.ndarray:
    """Erode by `n` pixels (a disk of radius n): white areas narrow, grey values take the local min."""
    if n <= 0:
        return mask
    return cv2.erode(mask, _disk(n), borderType=cv2.BORDER_REPLICATE)


def feather(mask: np.ndarray, radius: float) -> np.ndarray:
    """Soften edges with a Gaussian blur: sigma = radius / 2, so an edge fades over about `radius` px
    on each side. Image borders are replicated, so an all-white mask stays all white."""
    if radius <= 0:
        return mask
    sigma = radius / 2.0
    k = 2 * int(np.ceil(radius)) + 1
    # float64 so that flat areas stay exactly 0 or 1 (float32 kernels sum to 0.9999999)
    out = cv2.GaussianBlur(
        mask.astype(np.float64), (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE
    )
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def floor(mask: np.ndarray, value: float) -> np.ndarray:
    """Raise every value to at least `value` (OneTrainer's unmasked weight: ignored areas still teach a bit)."""
    if value <= 0:
        return mask
    out: np.ndarray = np.maximum(mask, np.float32(value))
    return out


def combine(mask: np.ndarray, existing: np.ndarray, mode: str) -> np.ndarray:
    """Merge with an existing mask of the same size: union = max, intersection = min."""
    if mask.shape != existing.shape:
        raise ValueError(f"cannot combine masks of shapes {mask.shape} and {existing.shape}")
    if mode in ("union", "intersection"):
        out: np.ndarray = (np.maximum if mode == "union" else np.minimum)(mask, existing)
        return out
    raise ValueError(f"unknown combine mode {mode!r}; valid: {', '.join(COMBINE_MODES)}")


def coverage(mask: np.ndarray) -> float:
    """The mean mask value: the fraction of the image that is learned (grey counts partly)."""
    return float(np.mean(mask, dtype=np.float64)) if mask.size else 0.0


@dataclass(frozen=True)
class PostOptions:
    """The post-processing shared by every mask method (see the module docstring for the order)."""

    threshold: float | None = bounded(None, 0.0, 1.0)
    invert: bool = False
    grow: int = bounded(0, 0)
    shrink: int = bounded(0, 0)
    feather: float = bounded(0.0, 0.0)
    combine: str | None = None  # "union" | "intersection" with the mask already on disk
    floor: float = bounded(0.0, 0.0, 1.0)

    def record(self) -> dict[str, float | str | None]:
        """The non-default settings, as recorded in the sidecar (so a change redoes the mask)."""
        defaults = PostOptions()
        return {k: v for k, v in self.__dict__.items() if v != getattr(defaults, k)}


def postprocess(mask: np.ndarray, opts: PostOptions, existing: np.ndarray | None = None) -> np.ndarray:
    """Apply the shared options to a method's raw mask; `existing` is needed only for `combine`."""
    out = as_mask(mask)
    if opts.threshold is not None:
        out = threshold(out, opts.threshold)
    if opts.invert:
        out = invert(out)
    out = grow(out, opts.grow)
    out = shrink(out, opts.shrink)
    out = feather(out, opts.feather)
    if opts.combine and existing is not None:
        out = combine(out, as_mask(existing), opts.combine)
    return floor(out, opts.floor).astype(np.float32)
