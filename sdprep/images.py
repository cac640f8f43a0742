"""The one image loader every stage uses: EXIF orientation, size limits, modes, typed errors."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import numpy as np
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngImageFile

from sdprep.dataset import UNSAFE_HINT, unsafe_reason
from sdprep.errors import ConfigError, ImageError

# The decompression-bomb guard: refuse images above this many pixels (about 16k x 16k) unless raised.
DEFAULT_MAX_PIXELS = int(os.environ.get("SDPREP_MAX_PIXELS", 268_435_456))

Mode = Literal["RGB", "RGBA", "L", "keep"]

# The largest side each format can store (libwebp: 16,383; JPEG's header: 65,535; PNG: 2^31-1).
FORMAT_MAX_SIDE = {"WEBP": ("WebP", 16383), "JPEG": ("JPEG", 65535)}

# We check sizes ourselves, before decoding; Pillow's own guard would raise an untyped error.
Image.MAX_IMAGE_PIXELS = None


def _open(path: Path, max_pixels: int, root: Path | str | None) -> Image.Image:
    problem = unsafe_reason(path, root)
    if problem:
        raise ImageError(path, problem, UNSAFE_HINT)
    try:
        im = Image.open(path)
    except FileNotFoundError as exc:
        raise ImageError(path, "file not found") from exc
    except PermissionError as exc:
        raise ImageError(path, "permission denied", "make the file readable (chmod +r)") from exc
    except UnidentifiedImageError as exc:
        size = path.stat().st_size if path.exists() else 0
        reason = "empty file (0 bytes)" if size == 0 else "not an image, or an unsupported format"
        raise ImageError(path, reason, "delete or replace the file") from exc
    except OSError as exc:
        raise ImageError(path, f"cannot open ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - a malformed file can make any plugin raise anything
        # e.g. ValueError for a zTXt chunk that inflates past Pillow's limit (a text bomb)
        raise ImageError(path, f"corrupt image header ({exc})", "re-download or delete the file") from exc
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageError(path, f"invalid size {w}x{h}")
    if w * h > max_pixels:
        im.close()
        raise ImageError(
            path,
            f"{w}x{h} is over the decompression limit of {max_pixels:,} pixels",
            "resize it, or raise the limit with SDPREP_MAX_PIXELS if you trust the file",
        )
    return im


def unwritable_size(size: tuple[int, int], pil_format: str) -> str | None:
    """Why sdprep must not write an image of `size` as `pil_format` ("does not fit in WebP, ..."), or
    None: the format cannot store it, or sdprep's own loader would refuse to read it back."""
    w, h = size
    name, limit = FORMAT_MAX_SIDE.get(pil_format, (pil_format, None))
    if limit is not None and max(w, h) > limit:
        return f"does not fit in {name}, which stores at most {limit:,} px per side"
    if w * h > DEFAULT_MAX_PIXELS:
        return f"is {w * h:,} pixels, over the {DEFAULT_MAX_PIXELS:,} sdprep reads (SDPREP_MAX_PIXELS)"
    return None


def open_image(
    path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS, *, root: Path | str | None = None
) -> Image.Image:
    """Open (header only, nothing decoded) with every check of `load_image`: links, size limit, errors."""
    return _open(Path(path), max_pixels, root)


def image_size(
    path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS, *, root: Path | str | None = None
) -> tuple[int, int]:
    """(width, height) as displayed (EXIF rotation applied), read from the header only."""
    return image_header(path, max_pixels, root=root).size


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, nothing decoded: size as displayed, EXIF orientation, transparency."""

    size: tuple[int, int]  # (width, height) as displayed (EXIF rotation applied)
    orientation: int  # EXIF orientation tag, 1 = stored as displayed
    has_alpha: bool  # an alpha channel or a colour key (the pixels may still be all opaque)

    @property
    def rotated(self) -> bool:
        """Whether the stored pixels differ from the displayed image (kohya trains the stored ones)."""
        return self.orientation in range(2, 9)


def image_header(
    path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS, *, root: Path | str | None = None
) -> ImageHeader:
    """Size as displayed, EXIF orientation and whether the image has transparency, from the header."""
    path = Path(path)
    with _open(path, max_pixels, root) as im:
        w, h = im.size
        orientation: object  # what the EXIF block holds (a broken one may hold anything)
        try:
            if isinstance(im, PngImageFile) and im.fp is not None and "exif" not in im.info:
                orientation = _png_orientation(im.fp)  # Pillow's getexif would decode every pixel
            else:
                orientation = im.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - broken EXIF blocks are common; the pixels may be fine
            orientation = 1
        has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
    if not isinstance(orientation, int):
        orientation = 1
    size = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    return ImageHeader(size, orientation, has_alpha)


def _png_orientation(fp: IO[bytes]) -> object:
    """The EXIF orientation of a PNG whose eXIf chunk may come after the pixel data: chunk headers
    are read and the data skipped, so nothing is decompressed (a few seeks instead of a decode)."""
    fp.seek(8)  # after the signature
    while len(head := fp.read(8)) == 8:
        length, kind = int.from_bytes(head[:4], "big"), head[4:]
        if kind == b"eXIf":
            exif = Image.Exif()
            exif.load(fp.read(length))
            return exif.get(0x0112, 1)
        if kind == b"IEND":
            break
        fp.seek(length + 4, os.SEEK_CUR)  # data and CRC
    return 1


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale to 8-bit by scaling, not by clipping (Pillow's convert clips)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return im


def load_image(
    path: Path | str,
    mode: Mode = "RGB",
    *,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: tuple[int, int] | None = None,
    root: Path | str | None = None,
) -> Image.Image:
    """Decode an image fully, EXIF orientation applied, first frame of animations.

    mode "RGB" composites transparency onto `background`; "RGBA" keeps alpha (opaque images get
    a full alpha); "L" is greyscale; "keep" returns the decoded mode (16-bit scaled to 8-bit).
    `draft=(w, h)` lets a JPEG decode at 1/2, 1/4 or 1/8 scale (DCT scaling, much faster), never
    below that size (before EXIF rotation); other formats decode at full size.
    `root`: the dataset folder the image was listed from (`Item.root`), for the symlink rule
    (`sdprep.dataset.unsafe_reason`). Any failure is an ImageError naming the file.
    """
    path = Path(path)
    im = _open(path, max_pixels, root)
    if draft is not None and im.format == "JPEG":
        im.draft(None, draft)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im) or im
    except Exception as exc:  # noqa: BLE001 - OSError, SyntaxError, ValueError, EOFError... from any plugin
        raise ImageError(
            path, f"truncated or corrupt image data ({exc})", "re-download or delete the file"
        ) from exc
    im = _to_8bit(im)
    if im.mode == "CMYK":
        im = im.convert("RGB")
    # an alpha channel, or a colour key (PNG tRNS on an RGB, greyscale or palette image)
    has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
    if mode == "keep":
        return im
    if mode == "L":
        if has_alpha:
            im = _flatten(im.convert("RGBA"), background)
        return im.convert("L")
    if mode == "RGBA":
        return im.convert("RGBA")
    # RGB
    if has_alpha:
        return _flatten(im.convert("RGBA"), background)
    return im.convert("RGB")


def _flatten(rgba: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def has_transparency(im: Image.Image) -> bool:
    """True when the image has an alpha channel with at least one pixel not fully opaque."""
    if im.mode in ("P", "L", "RGB") and "transparency" in im.info:  # a colour key
        im = im.convert("RGBA")
    if im.mode not in ("RGBA", "LA", "PA"):
        return False
    lowest = im.getchannel("A").getextrema()[0]  # one band: (lowest, highest) numbers
    return isinstance(lowest, (int, float)) and lowest < 255


def parse_color(text: str) -> tuple[int, int, int]:
    """A colour as the user writes it ('#fff', '#ffffff', 'white' or '255,255,255') -> (r, g, b):
    the one reading of `convert --flatten` and the colour mask method."""
    value = text.strip()
    parts = [p.strip() for p in value.split(",")]
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        r, g, b = (int(p) for p in parts)
        if all(0 <= c <= 255 for c in (r, g, b)):
            return r, g, b
    else:
        try:
            rgba = ImageColor.getrgb(value)
            return rgba[0], rgba[1], rgba[2]
        except ValueError:
            pass
    raise ConfigError(
        f'cannot read the colour "{text}"',
        'give "#rrggbb", "#rgb", a colour name such as "white", or "r,g,b" with values 0-255',
    )
