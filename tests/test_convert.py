import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdprep import fileops
from sdprep.cli import cli
from sdprep.errors import ConfigError
from sdprep.images import parse_color
from sdprep.prep import convert
from sdprep.prep.convert import ConvertOptions, run_convert


def tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".sdprep" not in p.parts
    }


def rotated_jpeg(path: Path, size=(40, 20)) -> None:
    """A JPEG stored 40x20 with EXIF orientation 6 (displayed 20x40, rotated 90 degrees)."""
    im = Image.new("RGB", size, "white")
    im.paste((255, 0, 0), (0, 0, 10, 20))  # the stored left part is red
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, "JPEG", exif=exif.tobytes(), quality=95)


def test_options_and_colours():
    assert parse_color("white") == (255, 255, 255)
    assert parse_color("#102030") == (16, 32, 48)
    assert parse_color("1,2,3") == (1, 2, 3)
    with pytest.raises(ConfigError, match='cannot read the colour "nocolour"'):
        parse_color("nocolour")
    with pytest.raises(ConfigError, match="JPEG cannot keep an alpha channel"):
        ConvertOptions(format="jpg", keep_alpha=True)
    with pytest.raises(ConfigError, match='unknown format "gif"'):
        ConvertOptions(format="gif")


def test_to_png_sidecars_follow_masks_stay_paired_undo(sample_dataset):
    mask = sample_dataset / "masks" / "a_landscape.png"
    mask.parent.mkdir()
    Image.new("L", (768, 512), 255).save(mask)
    (sample_dataset / "a_landscape.txt").write_text("sky\n")
    before = tree(sample_dataset)
    result = run_convert(sample_dataset, ConvertOptions(format="png"))
    assert (result.changed, result.skipped, result.failed) == (4, 4, [])
    assert not list(sample_dataset.glob("*.jpg")) and not list(sample_dataset.glob("*.webp"))
    assert '"id": 1001' in (sample_dataset / "a_landscape.png.json").read_text()
    assert not (sample_dataset / "a_landscape.jpg.json").exists()
    assert (sample_dataset / "a_landscape.txt").read_text() == "sky\n"
    with Image.open(sample_dataset / "a_landscape.png") as im, Image.open(mask) as m:
        assert im.format == "PNG" and im.size == m.size
    with Image.open(sample_dataset / "f_transparent.png") as im:
        assert im.mode == "RGBA"  # alpha kept by default
    again = run_convert(sample_dataset, ConvertOptions(format="png"))
    assert (again.changed, again.skipped) == (0, 8)
    fileops.undo(sample_dataset)
    assert tree(sample_dataset) == before


def test_to_jpg_flattens_transparency(sample_dataset):
    with Image.open(sample_dataset / "f_transparent.png") as im:
        corner_alpha = im.getpixel((0, 0))[3]
    assert corner_alpha == 0
    run_convert(sample_dataset, ConvertOptions(format="jpg", flatten=(0, 0, 0)))
    with Image.open(sample_dataset / "f_transparent.jpg") as im:
        assert im.mode == "RGB"
        assert max(im.getpixel((0, 0))) < 8  # flattened onto black


def test_animation_exif_rotation_and_modes(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    rotated_jpeg(tmp_path / "rot.jpg")
    (tmp_path / "masks").mkdir()
    Image.new("L", (20, 40), 255).save(tmp_path / "masks" / "rot.png")  # masks match the displayed size
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("RGB", (8, 8), "green").save(tmp_path / "plain.jpg")
    result = run_convert(tmp_path, ConvertOptions())
    assert (result.changed, result.skipped) == (3, 1)
    assert "re-encoded for: animated 1, format 1, mode 1, orientation 1" in result.summary()
    with Image.open(tmp_path / "anim.png") as im:
        assert getattr(im, "n_frames", 1) == 1 and im.convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    with Image.open(tmp_path / "rot.jpg") as im:
        assert im.size == (20, 40) and im.getexif().get(0x0112) is None
        assert Image.open(tmp_path / "masks" / "rot.png").size == im.size  # still paired
        r, g, b = im.getpixel((10, 2))  # the red band is now at the top
        assert r > 200 and g < 60
    with Image.open(tmp_path / "cmyk.jpg") as im:
        assert im.mode == "RGB"
    assert run_convert(tmp_path, ConvertOptions()).changed == 0


def test_name_conflict_is_a_per_file_failure(tmp_path, cli_runner):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.gif")
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "a.png")  # another picture
    Image.new("RGB", (8, 8)).save(tmp_path / "b.bmp")
    res = cli_runner.invoke(cli, ["-q", "convert", str(tmp_path)])
    assert res.exit_code == 1
    assert res.output == (
        "convert: 1 changed, 1 skipped, 1 failed\n"
        "  re-encoded for: format 1\n"
        "  originals are kept in the journal: `sdprep undo` restores, `sdprep gc` frees\n"
        f"  failed: {tmp_path / 'a.gif'}: cannot convert to png: a.png already exists\n"
    )
    assert (tmp_path / "b.png").exists() and (tmp_path / "a.gif").exists()


def test_cli_errors(tmp_path, cli_runner):
    res = cli_runner.invoke(cli, ["convert", str(tmp_path), "--format", "jpg", "--keep-alpha"])
    assert res.exit_code == 1
    assert res.output == (
        "Error: JPEG cannot keep an alpha channel\nHint: use --format png or webp, or --flatten COLOR\n"
    )
    res = cli_runner.invoke(cli, ["convert", str(tmp_path), "--format", "gif"])
    assert res.exit_code == 2


def noise_image(seed: int, size=(48, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def kept_and_broken(tmp_path: Path) -> Path:
    """Images already in a kept format: two good ones, and three cut short (no re-encoding needed)."""
    noise_image(1).save(tmp_path / "good.png")
    noise_image(2).save(tmp_path / "good.jpg", quality=90)
    for name, seed in [("trunc.png", 3), ("trunc.jpg", 4), ("no_iend.png", 5)]:
        noise_image(seed).save(tmp_path / name, quality=90)
    for name, keep in [("trunc.png", 0.5), ("trunc.jpg", 0.5)]:
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: int(len(data) * keep)])
    no_iend = tmp_path / "no_iend.png"
    no_iend.write_bytes(no_iend.read_bytes()[:-12])  # every pixel is there; the file ends early
    return tmp_path


def test_kept_images_are_decoded_to_the_end(kept_and_broken, cli_runner):
    root = kept_and_broken
    before = tree(root)
    res = cli_runner.invoke(cli, ["-q", "convert", str(root)])
    assert res.exit_code == 1
    lines = res.output.splitlines()
    assert lines[0] == "convert: 0 changed, 2 skipped, 3 failed"
    assert lines[1] == f"  failed: {root / 'no_iend.png'}: truncated or corrupt PNG (truncated PNG file)"
    assert lines[2].startswith(
        f"  failed: {root / 'trunc.jpg'}: truncated or corrupt image data (image file is"
    )
    assert lines[3].startswith(f"  failed: {root / 'trunc.png'}: truncated or corrupt image data (")
    assert len(lines) == 4
    assert tree(root) == before  # nothing written, the broken files untouched


def test_verified_images_are_not_decoded_again_until_they_change(kept_and_broken, monkeypatch):
    root = kept_and_broken
    first = run_convert(root, ConvertOptions())
    assert (first.skipped, len(first.failed)) == (2, 3)
    cache = json.loads((root / ".sdprep" / "convert-verified.json").read_text())
    assert sorted(cache["files"]) == ["good.jpg", "good.png"]  # failures are not remembered

    decoded: list[str] = []
    real = convert.load_image
    monkeypatch.setattr(
        convert, "load_image", lambda p, *a, **k: decoded.append(Path(p).name) or real(p, *a, **k)
    )
    again = run_convert(root, ConvertOptions(workers=2))
    assert (again.skipped, len(again.failed)) == (2, 3)
    assert sorted(decoded) == ["no_iend.png", "trunc.jpg", "trunc.png"]  # the good ones come from the cache

    # the good PNG is cut short after it was verified: its size changed, so it is decoded again
    decoded.clear()
    data = (root / "good.png").read_bytes()
    (root / "good.png").write_bytes(data[: len(data) // 2])
    third = run_convert(root, ConvertOptions())
    assert "good.png" in decoded and "good.jpg" not in decoded
    assert {f.path.name for f in third.failed} == {"good.png", "no_iend.png", "trunc.jpg", "trunc.png"}
    assert (root / "good.png").read_bytes() == data[: len(data) // 2]


def test_converted_output_is_remembered_as_verified(tmp_path, monkeypatch):
    noise_image(1).save(tmp_path / "a.bmp")
    noise_image(2).save(tmp_path / "b.png")
    assert run_convert(tmp_path, ConvertOptions()).changed == 1
    monkeypatch.setattr(convert, "load_image", lambda *a, **k: pytest.fail("decoded an image"))
    again = run_convert(tmp_path, ConvertOptions())
    assert (again.changed, again.skipped, again.failed) == (0, 2, [])


def test_webp_side_limit_is_a_per_file_failure_before_anything_is_written(tmp_path):
    """WebP stores at most 16,383 px per side: a 20000x1 image fails alone, named, nothing written."""
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (20000, 1), (10, 20, 30)).save(data / "b_long.png")
    for name in ("a.png", "c.png"):
        Image.new("RGB", (40, 30), (200, 10, 10) if name == "a.png" else (0, 90, 0)).save(data / name)
    long_bytes = (data / "b_long.png").read_bytes()
    result = convert.run_convert(data, convert.ConvertOptions(format="webp"))
    assert result.changed == 2
    assert [(f.path.name, f.reason) for f in result.failed] == [
        ("b_long.png", "20000x1 does not fit in WebP, which stores at most 16,383 px per side")
    ]
    assert (data / "b_long.png").read_bytes() == long_bytes
    assert not (data / "b_long.webp").exists()
    assert sorted(p.name for p in data.iterdir() if not p.name.startswith(".")) == [
        "a.webp",
        "b_long.png",
        "c.webp",
    ]


def test_an_encoder_error_is_the_files_failure(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (40, 30)).save(data / "a.bmp")

    def refuse(*args, **kwargs):
        raise ValueError("encoder says no")

    monkeypatch.setattr(convert, "save_bytes", refuse)
    result = convert.run_convert(data, convert.ConvertOptions())
    assert [(f.path.name, f.reason) for f in result.failed] == [
        ("a.bmp", "cannot encode as PNG: encoder says no")
    ]
