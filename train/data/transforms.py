"""Image geometry for training samples, as kohya sd-scripts does it, applied identically to masks.

- Resize to the bucket assignment's `resized` size: cv2 INTER_AREA when shrinking (both sides),
  Pillow Lanczos otherwise (kohya's `resize_image`), or the subset's `resize_interpolation`.
- Crop the bucket out of the resized image: centred (`(resized - bucket) // 2`), or at a random
  offset with `random_crop`. The mask goes through the same resize and the same crop offsets.
- `flip_aug` mirrors image and mask together.
- SDXL size conditioning exactly as kohya computes it: original size = the image's own size,
  target size = the bucket, and crop top/left from kohya's `get_crop_ltrb` (where the image would
  sit if fitted inside the bucket; for a flipped sample, left = bucket width - right). All (h, w).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, overload

import cv2
import numpy as np
from PIL import Image

from sdprep.buckets import Assignment
from sdprep.errors import ImageError
from sdprep.images import load_image

_PIL_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
_CV2_FLAGS = {
    "area": cv2.INTER_AREA,
    "nearest": cv2.INTER_NEAREST_EXACT,
    "bilinear": cv2.INTER_LINEAR,
    "linear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "cubic": cv2.INTER_CUBIC,
}


def resize(arr: np.ndarray, size: tuple[int, int], interpolation: str | None = None) -> np.ndarray:
    """Resize an HxW or HxWxC uint8 array to `size` (w, h) with kohya's interpolation choice."""
    h, w = arr.shape[:2]
    target = (int(size[0]), int(size[1]))
    if (w, h) == target:
        return arr
    if interpolation is None:
        interpolation = "area" if w >= size[0] and h >= size[1] else "lanczos"
    if interpolation in _PIL_FILTERS:
        out = Image.fromarray(arr).resize(target, resample=_PIL_FILTERS[interpolation])
        return np.asarray(out)
    return cv2.resize(arr, target, interpolation=_CV2_FLAGS[interpolation])


def crop_offsets(a: Assignment, rng: np.random.Generator | None = None) -> tuple[int, int]:
    """(left, top) of the bucket inside the resized image: centred, or random when `rng` is given."""
    trim_w = max(0, a.resized[0] - a.bucket[0])
    trim_h = max(0, a.resized[1] - a.bucket[1])
    if rng is None:
        return trim_w // 2, trim_h // 2
    return int(rng.integers(0, trim_w + 1)), int(rng.integers(0, trim_h + 1))


def fit_to_bucket(
    arr: np.ndarray, a: Assignment, offset: tuple[int, int], interpolation: str | None = None
) -> np.ndarray:
    """Resize to `a.resized` and cut the bucket out at `offset` (left, top)."""
    arr = resize(arr, a.resized, interpolation)
    left, top = offset
    bw, bh = a.bucket
    out = arr[top : top + bh, left : left + bw]
    if out.shape[0] != bh or out.shape[1] != bw:  # pragma: no cover - Assignment guarantees cover
        raise ValueError(f"internal error: crop {out.shape[:2]} is not the bucket {a.bucket}")
    return np.require(out, requirements=["C", "W"])


def kohya_crop_ltrb(bucket: tuple[int, int], original: tuple[int, int]) -> tuple[float, float, float, float]:
    """kohya's `BucketManager.get_crop_ltrb(bucket_reso, image_size)` (floats, as there)."""
    bucket_ar = bucket[0] / bucket[1]
    image_ar = original[0] / original[1]
    rw: float
    rh: float
    if bucket_ar > image_ar:
        rw, rh = bucket[1] * image_ar, bucket[1]
    else:
        rw, rh = bucket[0], bucket[0] / image_ar
    left = (bucket[0] - rw) // 2
    top = (bucket[1] - rh) // 2
    return left, top, left + rw, top + rh


def size_conditioning(
    original: tuple[int, int], bucket: tuple[int, int], flipped: bool
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """SDXL's (original_size (h, w), crop_top_left (top, left), target_size (h, w)) for one sample."""
    left, top, right, _ = kohya_crop_ltrb(bucket, original)
    if flipped:
        left = bucket[0] - right
    return (int(original[1]), int(original[0])), (int(top), int(left)), (int(bucket[1]), int(bucket[0]))


@overload
def load_rgb(path: Path, with_alpha: Literal[True]) -> tuple[np.ndarray, np.ndarray]: ...
@overload
def load_rgb(path: Path, with_alpha: bool) -> tuple[np.ndarray, np.ndarray | None]: ...
def load_rgb(path: Path, with_alpha: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The image as HxWx3 uint8 and, when asked, its alpha channel as the loss mask.

    Without alpha, transparency is composited on white. With alpha (kohya's `alpha_mask`) the
    colour channels are kept as stored, as kohya does: the alpha is a loss weight, not coverage
    (`sdprep bucket` bakes grey partial-loss masks into alpha over the full image).
    """
    if not with_alpha:
        return np.asarray(load_image(path, "RGB")), None
    rgba = np.asarray(load_image(path, "RGBA"))
    return np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3])


def load_mask(path: Path, expected: tuple[int, int] | None = None) -> np.ndarray:
    """A mask image as HxW uint8: its red channel (kohya), white = full loss. Checks its size."""
    arr = np.asarray(load_image(path, "RGB", background=(0, 0, 0)))[..., 0]
    if expected is not None and (arr.shape[1], arr.shape[0]) != tuple(expected):
        raise ImageError(
            path,
            f"mask is {arr.shape[1]}x{arr.shape[0]} but its image is {expected[0]}x{expected[1]}",
            "masks must have their image's pixel size: see `sdprep mask --check`",
        )
    return np.ascontiguousarray(arr)


def color_aug(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """kohya's weak colour augmentation: with p=0.33, a hue shift of up to 8 (of 180) or a gamma in [0.95, 1.05]."""
    if rng.random() > 0.33:
        return rgb
    if rng.random() > 0.5:
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
        shift = rng.uniform(-8.0, 8.0) % 180.0
        hsv[..., 0] = ((hsv[..., 0].astype(np.float32) + shift) % 180.0).astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    gamma = rng.uniform(0.95, 1.05)
    out: np.ndarray = np.clip(rgb.astype(np.float32) ** gamma, 0, 255).astype(np.uint8)
    return out
