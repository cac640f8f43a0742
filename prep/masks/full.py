"""`full`: an all-white mask (full loss everywhere), for the unmasked part of a mixed dataset."""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdprep.dataset import Item
from sdprep.prep.masks.base import MaskMethod, register


@register
class FullMask(MaskMethod):
    """Every pixel learned: kohya needs a mask for every image of a masked subset."""

    name = "full"

    def make(self, image: Image.Image, item: Item) -> np.ndarray:
        w, h = image.size
        return np.ones((h, w), dtype=np.float32)
