"""Aspect-ratio buckets: kohya's algorithm as pure functions, shared by `sdprep bucket` and the trainer.

`make_buckets` reproduces sd-scripts' `make_bucket_resolutions`; `assign_bucket` reproduces its
`BucketManager.select_bucket` (closest aspect ratio, scale to cover, centre crop), including the
`bucket_no_upscale` path. Defaults are SDXL-sensible: max area 1024x1024, step 64, sides 256-2048.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sdprep.errors import ConfigError

SDXL_MAX_AREA = (1024, 1024)
SDXL_STEP = 64
SDXL_MIN_SIDE = 256
SDXL_MAX_SIDE = 2048


@dataclass(frozen=True)
class BucketSettings:
    resolution: tuple[int, int] = SDXL_MAX_AREA  # (width, height); max area = width * height
    step: int = SDXL_STEP
    min_side: int = SDXL_MIN_SIDE
    max_side: int = SDXL_MAX_SIDE
    no_upscale: bool = False

    def __post_init__(self) -> None:
        w, h = self.resolution
        if w < 1 or h < 1 or self.step < 1 or self.min_side < 1:
            raise ConfigError(
                f"bucket sizes must be positive: resolution {w}x{h}, step {self.step}, min side {self.min_side}"
            )
        if self.min_side > self.max_side:
            raise ConfigError(
                f"the smallest bucket side ({self.min_side}) is larger than the largest ({self.max_side})",
                "lower min_side / --min-side or raise max_side / --max-side",
            )

    @property
    def max_area(self) -> int:
        return self.resolution[0] * self.resolution[1]


@dataclass(frozen=True)
class Assignment:
    """Where one image lands: bucket (w, h), resized size, crop box in resized pixels, and why not."""

    bucket: tuple[int, int]
    resized: tuple[int, int]
    crop_ltrb: tuple[int, int, int, int]
    scale: float
    ar_error: float
    dropped: str | None = None  # reason when the image cannot be used

    @property
    def upscaled(self) -> bool:
        return self.scale > 1.0 + 1e-9

    @property
    def cropped_fraction(self) -> float:
        """Share of the resized image's area cut away by the crop."""
        rw, rh = self.resized
        bw, bh = self.bucket
        return 0.0 if rw * rh == 0 else 1.0 - (bw * bh) / (rw * rh)


def make_buckets(settings: BucketSettings = BucketSettings()) -> list[tuple[int, int]]:
    """The sorted list of (width, height) buckets for a max area, step and side limits (kohya's rule)."""
    d, area = settings.step, settings.max_area
    resos = set()
    side = int(math.sqrt(area) // d) * d
    resos.add((side, side))
    width = settings.min_side
    while width <= settings.max_side:
        height = min(settings.max_side, int((area // width) // d) * d)
        if height >= settings.min_side:
            resos.add((width, height))
            resos.add((height, width))
        width += d
    return sorted(resos)


def _round_to_steps(x: float, step: int) -> int:
    x = int(x + 0.5)
    return x - x % step


def assign_bucket(
    width: int,
    height: int,
    settings: BucketSettings = BucketSettings(),
    buckets: list[tuple[int, int]] | None = None,
) -> Assignment:
    """Choose the bucket for an image of `width` x `height` exactly as kohya's BucketManager does."""
    step = settings.step
    aspect = width / height
    if not settings.no_upscale:
        buckets = buckets or make_buckets(settings)
        if (width, height) in buckets:
            reso = (width, height)
        else:
            reso = min(buckets, key=lambda b: abs(b[0] / b[1] - aspect))
        ar_reso = reso[0] / reso[1]
        scale = reso[1] / height if aspect > ar_reso else reso[0] / width
        resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    else:
        if width * height > settings.max_area:
            rw = math.sqrt(settings.max_area * aspect)
            rh = settings.max_area / rw
            bw_r = _round_to_steps(rw, step)
            bh_in_wr = _round_to_steps(bw_r / aspect, step)
            bh_r = _round_to_steps(rh, step)
            bw_in_hr = _round_to_steps(bh_r * aspect, step)
            ar_w = bw_r / bh_in_wr if bh_in_wr else float("inf")
            ar_h = bw_in_hr / bh_r if bh_r else float("inf")
            if abs(ar_w - aspect) < abs(ar_h - aspect):
                resized = (bw_r, int(bw_r / aspect + 0.5))
            else:
                resized = (int(bh_r * aspect + 0.5), bh_r)
        else:
            resized = (width, height)
        scale = resized[0] / width
        reso = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
    ar_error = reso[0] / reso[1] - aspect if reso[1] else float("inf")
    left = (resized[0] - reso[0]) // 2
    top = (resized[1] - reso[1]) // 2
    dropped = None
    if reso[0] < step or reso[1] < step:
        dropped = f"{width}x{height} is smaller than one bucket step ({step} px) on a side"
    return Assignment(reso, resized, (left, top, left + reso[0], top + reso[1]), scale, ar_error, dropped)
