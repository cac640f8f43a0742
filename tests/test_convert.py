import hashlib
from pathlib import Path

import pytest
from PIL import Image

from sdprep import fileops
from sdprep.cli import cli
from sdprep.errors import ConfigError
from sdprep.prep.convert import ConvertOptions, parse_color, run_convert


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
    with pytest.raises(ConfigError, match="unknown colour 'nocolour'"):
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
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
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
