import io

import numpy as np
import pytest
from PIL import Image

from sdprep.errors import ImageError
from sdprep.images import has_transparency, image_size, load_image


def half_a_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(
        buf, "JPEG"
    )
    return buf.getvalue()[: len(buf.getvalue()) // 2]


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("empty.png", b"", "empty.png: empty file"),
        ("notes.png", b"this is not an image", "notes.png: not an image"),
        ("cut.jpg", half_a_jpeg(), "cut.jpg: truncated or corrupt"),
    ],
    ids=["zero-byte", "text-named-png", "truncated-jpeg"],
)
def test_a_bad_file_is_an_image_error_naming_it(tmp_path, name, data, message):
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(ImageError, match=message) as exc:
        load_image(p)
    assert exc.value.path == p


def test_decompression_bomb_refused_before_decoding(tmp_path):
    p = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(p)
    assert p.stat().st_size < 1_000_000
    with pytest.raises(ImageError, match="bomb.png: 20000x20000 is over the decompression limit"):
        load_image(p)
    with pytest.raises(ImageError, match="bomb.png"):
        image_size(p)
    assert load_image(p, max_pixels=400_000_000, mode="L").size == (20000, 20000)


def test_exif_orientation_applied(tmp_path):
    p = tmp_path / "rot.jpg"
    im = Image.new("RGB", (60, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    im.save(p, exif=exif)
    assert image_size(p) == (20, 60)
    assert load_image(p).size == (20, 60)


def test_sixteen_bit_png_scaled_not_clipped(tmp_path):
    p = tmp_path / "deep.png"
    arr = np.full((8, 8), 32768, dtype=np.uint16)
    Image.fromarray(arr).save(p)
    px = load_image(p, mode="L").getpixel((0, 0))
    assert 127 <= px <= 129


def test_cmyk_and_palette_alpha(tmp_path):
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(cmyk)
    r, g, b = load_image(cmyk).getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60

    pal = tmp_path / "pal.png"
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((0, 0), 1)
    im.info["transparency"] = 0
    im.save(pal, transparency=0)
    assert has_transparency(Image.open(pal))
    rgb = load_image(pal)  # transparent pixels composited on white
    assert rgb.getpixel((1, 1)) == (255, 255, 255)
    assert rgb.getpixel((0, 0)) == (255, 0, 0)
    assert load_image(pal, mode="RGBA").getpixel((1, 1))[3] == 0


def test_animated_gif_first_frame(tmp_path):
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(p, save_all=True, append_images=frames[1:])
    assert load_image(p).getpixel((0, 0))[0] > 200


def _png_with_exif_chunk(path, orientation, where):
    """A 40x20 PNG whose eXIf chunk (orientation) sits before or after the pixel data."""
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (40, 20), (200, 10, 10)).save(buf, "PNG")
    data = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes()
    chunk = len(payload).to_bytes(4, "big") + b"eXIf" + payload
    chunk += zlib.crc32(b"eXIf" + payload).to_bytes(4, "big")
    at = data.index(b"IDAT") - 4 if where == "before" else data.index(b"IEND") - 4
    path.write_bytes(data[:at] + chunk + data[at:])
    return path


@pytest.mark.parametrize("where", ["before", "after"])
def test_png_exif_orientation_read_without_decoding(tmp_path, monkeypatch, where):
    path = _png_with_exif_chunk(tmp_path / "r.png", 6, where)
    assert load_image(path).size == (20, 40)  # Pillow's reading of the same file

    def no_decode(self, *a, **k):
        raise AssertionError("image_size decoded the pixels")

    from PIL import PngImagePlugin

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decode)
    assert image_size(path) == (20, 40)
    assert image_size(_png_with_exif_chunk(tmp_path / "n.png", 1, where)) == (40, 20)


def test_a_text_chunk_bomb_is_a_bad_image_not_a_crash(tmp_path):
    """A zTXt chunk inflating to 50 MB makes Pillow raise ValueError while opening."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, "PNG")
    data = buf.getvalue()
    body = b"Comment\x00\x00" + zlib.compress(b"A" * (50 << 20))
    chunk = struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body))
    at = data.index(b"IDAT") - 4
    path = tmp_path / "ztxt.png"
    path.write_bytes(data[:at] + chunk + data[at:])
    for read in (image_size, load_image):
        with pytest.raises(ImageError, match="corrupt image header .*Decompressed data too large"):
            read(path)


@pytest.mark.parametrize("mode, key", [("RGB", (12, 34, 56)), ("L", 77)])
def test_colour_key_transparency_is_composited_like_an_alpha_channel(tmp_path, mode, key):
    """A PNG tRNS colour key on an RGB or greyscale image is transparency (kohya composites it too)."""
    im = Image.new(mode, (2, 1), key)
    im.putpixel((1, 0), (200, 100, 0) if mode == "RGB" else 200)
    im.save(tmp_path / "k.png", transparency=key)
    rgb = load_image(tmp_path / "k.png", "RGB")
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == ((200, 100, 0) if mode == "RGB" else (200, 200, 200))
    assert load_image(tmp_path / "k.png", "RGBA").getpixel((0, 0))[3] == 0
    assert has_transparency(Image.open(tmp_path / "k.png"))
