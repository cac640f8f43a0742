"""`import`: masks painted by hand (or made by another tool), matched to images by file stem.

`--from DIR` holds one mask per image with the image's stem and any image extension
(`a.png` for `a.jpg`). The value taken is the RED channel, as kohya reads it: a greyscale mask is
used as it is; in a colour mask only red counts; transparent pixels count as black (no loss). A mask
of another size but the same aspect ratio (within 1%) is resized to the image and listed in the
summary; another aspect ratio is a per-file failure, since stretching would move the masked areas.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from sdprep.dataset import Item, is_image
from sdprep.errors import ConfigError, ImageError
from sdprep.prep.masks.base import MaskMethod, MaskNotFound, MethodSettings, read_mask_image, register

ASPECT_TOLERANCE = 0.01


def index_masks(folder: Path) -> dict[str, list[Path]]:
    """stem -> mask files in `folder` (not recursive), sorted by name."""
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and is_image(path):
            found.setdefault(path.stem, []).append(path)
    return found


def fit_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an 8-bit mask to `size` (w, h): area averaging when shrinking, linear when enlarging."""
    w, h = size
    shrinking = mask.shape[1] > w
    return cv2.resize(mask, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def same_aspect(a: tuple[int, int], b: tuple[int, int], tolerance: float = ASPECT_TOLERANCE) -> bool:
    ra, rb = a[0] / a[1], b[0] / b[1]
    return abs(ra - rb) <= tolerance * rb


@register
class ImportMask(MaskMethod):
    """User masks from a folder, validated and fitted to each image."""

    name = "import"

    def __init__(self, settings: MethodSettings) -> None:
        super().__init__(settings)
        if settings.source is None:
            raise ConfigError("--method import needs --from DIR, the folder of painted masks")
        self.source = Path(settings.source)
        if not self.source.is_dir():
            raise ConfigError(f"{self.source}: no such folder of masks", "pass --from DIR with your masks")
        self._index: dict[str, list[Path]] | None = None

    def load(self) -> None:
        if self._index is None:
            self._index = index_masks(self.source)

    def find(self, item: Item) -> Path:
        self.load()  # also needed while planning, before the stage calls load()
        assert self._index is not None
        matches = self._index.get(item.path.stem, [])
        if not matches:
            raise MaskNotFound(
                item.path,
                f"no mask named {item.path.stem}.* in {self.source}",
                "add one with the image's file name (any image format), or use --fallback full",
            )
        if len(matches) > 1:
            names = ", ".join(p.name for p in matches)
            raise ImageError(item.path, f"several masks for this image in {self.source}: {names}", "keep one")
        return matches[0]

    def make(self, image: Image.Image, item: Item) -> np.ndarray:
        path = self.find(item)
        mask = read_mask_image(path)
        msize, isize = (mask.shape[1], mask.shape[0]), image.size
        if msize != isize:
            if not same_aspect(msize, isize):
                raise ImageError(
                    item.path,
                    f"mask {path.name} is {msize[0]}x{msize[1]} but the image is {isize[0]}x{isize[1]} "
                    f"(aspect ratio {msize[0] / msize[1]:.3f} vs {isize[0] / isize[1]:.3f})",
                    "paint the mask on the image as it is (same size), or crop it to the same shape",
                )
            mask = fit_mask(mask, isize)
            self.notes.append(
                f"{item.path.name}: {path.name} resized {msize[0]}x{msize[1]} -> {isize[0]}x{isize[1]}"
            )
        return mask.astype(np.float32) / 255.0

    def options(self) -> dict[str, Any]:
        return {"from": str(self.source.resolve())}

    def inputs(self, item: Item) -> dict[str, Any]:
        try:
            path = self.find(item)
        except ImageError:
            return {}
        digest = hashlib.sha1(path.read_bytes()).hexdigest()
        return {"source": path.name, "source_sha1": digest}
