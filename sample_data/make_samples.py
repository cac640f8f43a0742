"""Regenerate sample_data/images: small synthetic images with gallery-dl-style Danbooru sidecars.

Run `python sample_data/make_samples.py` to rebuild them; the output is deterministic. The set covers
what the stages must handle: varied aspect ratios, one greyscale, one near-monochrome tinted, one
with transparency, one too small for SDXL, JPEG / PNG / WebP.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

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


def build() -> list[Path]:
    OUT.mkdir(parents=True, exist_ok=True)
    specs = []

    im = _gradient(768, 512, (120, 170, 240), (60, 140, 60))
    _figure(im, 0.5, 0.35, 1.0, (240, 150, 190), (240, 240, 250))
    specs.append(
        (
            "a_landscape.jpg",
            im,
            "1girl solo pink_hair blue_eyes smile outdoors sky dress",
            "nazuna_(yofukashi_no_uta)",
            "yofukashi_no_uta",
            "artist_one",
            "g",
        )
    )

    im = _gradient(512, 768, (250, 250, 250), (220, 220, 230))
    _figure(im, 0.5, 0.3, 1.2, (240, 150, 190), (30, 30, 40))
    specs.append(
        (
            "b_portrait.png",
            im,
            "1girl solo pink_hair blue_eyes looking_at_viewer simple_background white_background shirt upper_body",
            "nazuna_(yofukashi_no_uta)",
            "yofukashi_no_uta",
            "artist_two",
            "s",
        )
    )

    im = _gradient(640, 640, (200, 60, 60), (250, 200, 120))
    _figure(im, 0.45, 0.4, 1.0, (240, 150, 190), (200, 40, 40))
    specs.append(
        (
            "c_square.webp",
            im,
            "1girl solo pink_hair blue_eyes red_theme smile open_mouth",
            "nazuna_(yofukashi_no_uta)",
            "yofukashi_no_uta",
            "artist_one",
            "g",
        )
    )

    im = _gradient(512, 640, (240, 240, 240), (90, 90, 90))
    _figure(im, 0.5, 0.35, 1.0, (60, 60, 60), (180, 180, 180))
    im = im.convert("L").convert("RGB")
    specs.append(
        (
            "d_greyscale.png",
            im,
            "1girl solo long_hair greyscale monochrome simple_background",
            "nazuna_(yofukashi_no_uta)",
            "yofukashi_no_uta",
            "artist_two",
            "g",
            "sketch",
        )
    )

    base = _gradient(600, 600, (230, 230, 230), (60, 60, 60))
    _figure(base, 0.5, 0.4, 1.1, (90, 90, 90), (200, 200, 200))
    grey = np.asarray(base.convert("L"), dtype=np.float64)[..., None] / 255.0
    sepia = grey * np.array([255.0, 204.0, 153.0])  # one hue (and saturation), varying value: monochrome
    im = Image.fromarray(np.clip(sepia, 0, 255).astype(np.uint8), "RGB")
    specs.append(
        (
            "e_sepia.jpg",
            im,
            "1girl solo monochrome brown_theme portrait",
            "nazuna_(yofukashi_no_uta)",
            "yofukashi_no_uta",
            "artist_one",
            "g",
        )
    )

    rgba = Image.new("RGBA", (512, 512), (0, 0, 0, 0))
    fig = Image.new("RGB", (512, 512), (255, 255, 255))
    _figure(fig, 0.5, 0.35, 1.1, (240, 150, 190), (60, 120, 200))
    mask = Image.new("L", (512, 512), 0)
    md = ImageDraw.Draw(mask)
    md.ellipse([150, 40, 362, 300], fill=255)
    md.rectangle([180, 220, 332, 500], fill=255)
    rgba.paste(fig, (0, 0), mask)
    specs.append(
        (
            "f_transparent.png",
            rgba,
            "1girl solo pink_hair blue_eyes no_background transparent_background",
            "nazuna_(yofukashi_no_uta)",
            "yofukashi_no_uta",
            "artist_two",
            "g",
        )
    )

    im = _gradient(200, 150, (100, 100, 200), (200, 100, 100))
    _figure(im, 0.5, 0.4, 1.0, (240, 150, 190), (80, 160, 80))
    specs.append(
        (
            "g_tiny.png",
            im,
            "1girl solo pink_hair chibi",
            "nazuna_(yofukashi_no_uta)",
            "yofukashi_no_uta",
            "artist_one",
            "q",
            "lowres",
        )
    )

    im = _gradient(900, 400, (20, 20, 60), (120, 60, 160))
    d = ImageDraw.Draw(im)
    for i in range(30):
        x, y = (i * 97) % 900, (i * 53) % 200
        d.ellipse([x, y, x + 4, y + 4], fill=(255, 255, 220))
    _figure(im, 0.3, 0.45, 0.9, (240, 150, 190), (40, 40, 40))
    specs.append(
        (
            "h_wide.jpg",
            im,
            "1girl solo pink_hair night night_sky star_(sky) outdoors",
            "nazuna_(yofukashi_no_uta)",
            "yofukashi_no_uta",
            "artist_one",
            "s",
        )
    )

    paths = []
    for post_id, spec in enumerate(specs, start=1001):
        name, im, general, character, copyright_, artist, rating, *meta = spec
        path = OUT / name
        kwargs = {"quality": 90} if name.endswith((".jpg", ".webp")) else {}
        if name.endswith(".png"):
            kwargs = {"optimize": False}
        im.save(path, **kwargs)
        data = path.read_bytes()
        sidecar = _sidecar(
            name,
            data,
            im.size,
            post_id,
            general,
            character,
            copyright_,
            artist,
            rating,
            meta[0] if meta else "",
        )
        (OUT / (name + ".json")).write_text(json.dumps(sidecar, indent=2) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in build():
        print(p.relative_to(OUT.parent.parent))
