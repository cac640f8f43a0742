"""`alpha`: the mask is the image's own transparency (opaque = full loss, transparent = none)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdprep.dataset import Item
from sdprep.prep.masks.base import MaskMethod, NoTransparency, register


@register
class AlphaMask(MaskMethod):
    """Copy the alpha channel: what kohya's `alpha_mask` uses, as a separate mask file."""

    name = "alpha"
    image_mode = "RGBA"

    def make(self, image: Image.Image, item: Item) -> np.ndarray:
        if image.mode != "RGBA":
            image = image.convert("RGBA")
        alpha = np.asarray(image.getchannel("A"), dtype=np.float32) / 255.0
        if alpha.size and float(alpha.min()) >= 1.0:
            raise NoTransparency(
                item.path,
                "no transparency (no alpha channel, or every pixel is opaque)",
                "use another --method for such images, or --fallback full to train on the whole image",
            )
        return alpha
