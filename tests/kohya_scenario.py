"""One dataset that exercises what kohya must read back from `sdprep bucket`, built the same way by the
tests and by tests/assets/kohya_oracle.py (which recorded what kohya's own loader makes of it).

- DATA/ (the root concept, token "tok"): six images; three have masks in DATA/masks/ (one of them an
  EXIF-rotated JPEG, its mask at the displayed size), one has a transparent background and no mask,
  one caption has two lines, two images have no caption;
- DATA/5_style/: a pre-named kohya folder (its repeats and class token are kept);
- REG/person/: three regularisation images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SETTINGS = {"resolution": (256, 256), "step": 64, "min_side": 64, "max_side": 512}
CLI_SETTINGS = ["--resolution", "256", "--step", "64", "--min-side", "64", "--max-side", "512"]


def _pattern(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(base, np.ones((8, 8, 1), np.uint8))[:h, :w])


def _mask(w: int, h: int, level: int) -> Image.Image:
    mask = Image.new("L", (w, h), 0)
    mask.paste(level, (0, 0, w // 2, h))
    return mask


def make_scenario(root: Path) -> tuple[Path, Path]:
    """Write the dataset under `root`; returns (DATA, REG/person)."""
    data, reg = root / "data", root / "reg" / "person"
    (data / "masks").mkdir(parents=True)
    reg.mkdir(parents=True)
    sizes = {"a": (320, 200), "b": (200, 300), "c": (256, 256), "d": (400, 160)}
    for i, (stem, (w, h)) in enumerate(sizes.items()):
        _pattern(w, h, i).save(data / f"{stem}.png")
    _pattern(300, 180, 9).save(data / "e.jpg", quality=95)  # no EXIF: stays a hard link
    stored = _pattern(240, 160, 7)  # stored landscape, displayed portrait (orientation 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(data / "rot.jpg", quality=95, exif=exif.tobytes())
    clear = _pattern(200, 200, 5).convert("RGBA")
    clear.putalpha(_mask(200, 200, 255))  # right half transparent, no mask file
    clear.save(data / "f.png")
    _mask(320, 200, 255).save(data / "masks" / "a.png")
    _mask(200, 300, 128).save(data / "masks" / "b.png")
    _mask(160, 240, 200).save(data / "masks" / "rot.png")  # the displayed size of rot.jpg
    (data / "a.txt").write_text("tok, 1girl, smile\n", encoding="utf-8")
    (data / "b.txt").write_text("tok, 1girl,\nblue hair, outdoors\n", encoding="utf-8")
    (data / "c.txt").write_text("tok, solo\n", encoding="utf-8")
    (data / "rot.txt").write_text("tok, rotated\n", encoding="utf-8")
    style = data / "5_style"
    style.mkdir()
    for i in range(2):
        _pattern(256, 192, 20 + i).save(style / f"s{i}.png")
    (style / "s0.txt").write_text("style, flowers\n", encoding="utf-8")
    for i in range(3):
        _pattern(192, 192, 30 + i).save(reg / f"r{i}.png")
    return data, reg
