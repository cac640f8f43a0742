"""Regenerate sample_data/images: small synthetic images with gallery-dl-style Danbooru sidecars.

Run `python sample_data/make_samples.py` to rebuild them; the output is deterministic. The set covers
what the stages must handle: varied aspect ratios, one greyscale, one near-monochrome tinted, one
with transparency, one too small for SDXL, JPEG / PNG / WebP.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent / "images"


def _gradient(w: int, h: int, top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    t = np.linspace(0, 1, h)[:, None, None]
    arr = (np.array(top)[None, None, :] * (1 - t) + np.array(bottom)[None, None, :] * t).repeat(w, axis=1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def _figure(im: Image.Image, cx: float, cy: float, scale: float, hair: tuple, body: tuple) -> None:
    d = ImageDraw.Draw(im)
    w, h = im.size
    r = int(min(w, h) * 0.12 * scale)
    x, y = int(w * cx), int(h * cy)
    d.ellipse([x - r * 1.3, y - r * 1.4, x + r * 1.3, y + r * 2.2], fill=hair)  # hair
    d.ellipse([x - r, y - r, x + r, y + r], fill=(250, 220, 200))  # face
    d.ellipse([x - r // 2 - 4, y - 4, x - r // 2 + 4, y + 4], fill=(40, 80, 200))  # eyes
    d.ellipse([x + r // 2 - 4, y - 4, x + r // 2 + 4, y + 4], fill=(40, 80, 200))
    d.arc([x - r // 2, y + r // 4, x + r // 2, y + r // 1.5], 0, 180, fill=(150, 40, 40), width=3)
    d.rectangle([x - r * 1.2, y + r * 1.1, x + r * 1.2, y + r * 4], fill=body)  # body


def _sidecar(
    name: str,
    im_bytes: bytes,
    size: tuple[int, int],
    post_id: int,
    general: str,
    character: str,
    copyright_: str,
    artist: str,
    rating: str,
    meta: str = "",
) -> dict:
    stem, ext = name.rsplit(".", 1)
    tag_string = " ".join(t for t in (general, character, copyright_, artist, meta) if t)
    return {
        "id": post_id,
        "md5": hashlib.md5(im_bytes).hexdigest(),
        "rating": rating,
        "image_width": size[0],
        "image_height": size[1],
        "file_ext": ext,
        "file_url": f"https://danbooru.example/data/{post_id}.{ext}",
        "tag_string": tag_string,
        "tag_string_general": general,
        "tag_string_character": character,
        "tag_string_copyright": copyright_,
        "tag_string_artist": artist,
        "tag_string_meta": meta,
        "tags": tag_string.split(" "),
        "tags_general": general.split(" ") if general else [],
        "tags_character": character.split(" ") if character else [],
        "tags_copyright": copyright_.split(" ") if copyright_ else [],
        "tags_artist": artist.split(" ") if artist else [],
        "tags_meta": meta.split(" ") if meta else [],
        "category": "danbooru",
        "subcategory": "post",
        "filename": stem,
        "extension": ext,
    }


CHARACTER = "nazuna_(yofukashi_no_uta)"
COPYRIGHT = "yofukashi_no_uta"
PINK = (240, 150, 190)


class Sample(NamedTuple):
    """One sample image and the Danbooru tags its sidecar lists (all show the same character)."""

    name: str
    image: Image.Image
    general: str
    artist: str
    rating: str
    meta: str = ""


def _drawn(
    size: tuple[int, int], top: tuple, bottom: tuple, at: tuple[float, float, float], hair: tuple, body: tuple
) -> Image.Image:
    """A gradient background with one figure at (cx, cy, scale)."""
    im = _gradient(*size, top, bottom)
    _figure(im, *at, hair, body)
    return im


def _greyscale() -> Image.Image:
    im = _drawn((512, 640), (240, 240, 240), (90, 90, 90), (0.5, 0.35, 1.0), (60, 60, 60), (180, 180, 180))
    return im.convert("L").convert("RGB")


def _sepia() -> Image.Image:
    base = _drawn((600, 600), (230, 230, 230), (60, 60, 60), (0.5, 0.4, 1.1), (90, 90, 90), (200, 200, 200))
    grey = np.asarray(base.convert("L"), dtype=np.float64)[..., None] / 255.0
    sepia = grey * np.array([255.0, 204.0, 153.0])  # one hue (and saturation), varying value: monochrome
    return Image.fromarray(np.clip(sepia, 0, 255).astype(np.uint8), "RGB")


def _transparent() -> Image.Image:
    rgba = Image.new("RGBA", (512, 512), (0, 0, 0, 0))
    fig = Image.new("RGB", (512, 512), (255, 255, 255))
    _figure(fig, 0.5, 0.35, 1.1, PINK, (60, 120, 200))
    mask = Image.new("L", (512, 512), 0)
    md = ImageDraw.Draw(mask)
    md.ellipse([150, 40, 362, 300], fill=255)
    md.rectangle([180, 220, 332, 500], fill=255)
    rgba.paste(fig, (0, 0), mask)
    return rgba


def _night() -> Image.Image:
    im = _gradient(900, 400, (20, 20, 60), (120, 60, 160))
    d = ImageDraw.Draw(im)
    for i in range(30):
        x, y = (i * 97) % 900, (i * 53) % 200
        d.ellipse([x, y, x + 4, y + 4], fill=(255, 255, 220))
    _figure(im, 0.3, 0.45, 0.9, PINK, (40, 40, 40))
    return im


def samples() -> list[Sample]:
    return [
        Sample(
            "a_landscape.jpg",
            _drawn((768, 512), (120, 170, 240), (60, 140, 60), (0.5, 0.35, 1.0), PINK, (240, 240, 250)),
            "1girl solo pink_hair blue_eyes smile outdoors sky dress",
            "artist_one",
            "g",
        ),
        Sample(
            "b_portrait.png",
            _drawn((512, 768), (250, 250, 250), (220, 220, 230), (0.5, 0.3, 1.2), PINK, (30, 30, 40)),
            "1girl solo pink_hair blue_eyes looking_at_viewer simple_background white_background shirt upper_body",
            "artist_two",
            "s",
        ),
        Sample(
            "c_square.webp",
            _drawn((640, 640), (200, 60, 60), (250, 200, 120), (0.45, 0.4, 1.0), PINK, (200, 40, 40)),
            "1girl solo pink_hair blue_eyes red_theme smile open_mouth",
            "artist_one",
            "g",
        ),
        Sample(
            "d_greyscale.png",
            _greyscale(),
            "1girl solo long_hair greyscale monochrome simple_background",
            "artist_two",
            "g",
            "sketch",
        ),
        Sample("e_sepia.jpg", _sepia(), "1girl solo monochrome brown_theme portrait", "artist_one", "g"),
        Sample(
            "f_transparent.png",
            _transparent(),
            "1girl solo pink_hair blue_eyes no_background transparent_background",
            "artist_two",
            "g",
        ),
        Sample(
            "g_tiny.png",
            _drawn((200, 150), (100, 100, 200), (200, 100, 100), (0.5, 0.4, 1.0), PINK, (80, 160, 80)),
            "1girl solo pink_hair chibi",
            "artist_one",
            "q",
            "lowres",
        ),
        Sample(
            "h_wide.jpg",
            _night(),
            "1girl solo pink_hair night night_sky star_(sky) outdoors",
            "artist_one",
            "s",
        ),
    ]


def build() -> list[Path]:
    OUT.mkdir(parents=True, exist_ok=True)
    paths = []
    for post_id, s in enumerate(samples(), start=1001):
        path = OUT / s.name
        kwargs = {"quality": 90} if s.name.endswith((".jpg", ".webp")) else {}
        if s.name.endswith(".png"):
            kwargs = {"optimize": False}
        s.image.save(path, **kwargs)
        data = path.read_bytes()
        sidecar = _sidecar(
            s.name, data, s.image.size, post_id, s.general, CHARACTER, COPYRIGHT, s.artist, s.rating, s.meta
        )
        (OUT / (s.name + ".json")).write_text(json.dumps(sidecar, indent=2) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in build():
        print(p.relative_to(OUT.parent.parent))
