"""Images whose WD14 preprocessing was checked against kohya's tagger (sd-scripts 48d368fa).

`make_cases(folder)` writes them; tests/assets/kohya_wd14_preprocess.json holds the sha256 of the
uint8 [448, 448, 3] array kohya's `preprocess_image` returned for each (and for sample_data/images),
computed by running kohya's own function on exactly these files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _pattern(w: int, h: int, channels: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    planes = [((x * (7 + 4 * c) + y * (13 + 2 * c) + 31 * c) % 256) for c in range(channels)]
    return np.stack(planes, axis=-1).astype(np.uint8)


def make_cases(folder: Path) -> dict[str, Path]:
    """Colour keys (tRNS on RGB, greyscale and palette PNGs), partial alpha, and a 300x200 image."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    rgb = _pattern(96, 64, 3)
    rgb[10:40, 20:60] = (12, 34, 56)  # the keyed colour: transparent
    Image.fromarray(rgb, "RGB").save(folder / "key_rgb.png", transparency=(12, 34, 56))
    grey = _pattern(64, 96, 1)[..., 0]
    grey[30:70, 5:50] = 77
    Image.fromarray(grey, "L").save(folder / "key_grey.png", transparency=77)
    pal = Image.fromarray(_pattern(80, 80, 3), "RGB").quantize(16)
    pal.save(folder / "key_palette.png", transparency=3)
    rgba = _pattern(120, 90, 4)
    Image.fromarray(rgba, "RGBA").save(folder / "alpha_partial.png")
    Image.fromarray(_pattern(300, 200, 3), "RGB").save(folder / "small_300x200.png")
    Image.fromarray(_pattern(900, 500, 3), "RGB").save(folder / "large_900x500.png")
    for p in sorted(folder.iterdir()):
        out[p.name] = p
    return out
