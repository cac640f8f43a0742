"""sdprep bucket writes what kohya trains: mask forms, reg balancing, EXIF rotation, captions, paths,
re-runs that replace the previous output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import tomllib
from PIL import Image

from sdprep.cli import cli
from sdprep.errors import ConfigError
from sdprep.fileops import undo
from sdprep.prep.bucket import BucketOptions, run_bucket
from sdprep.prep.repeats import balance_reg_repeats, kohya_reg_use


def _images(folder: Path, n: int, size=(512, 512), prefix="i") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (i * 30 % 256, 60, 90)).save(folder / f"{prefix}{i}.png")


def _files(folder: Path) -> list[str]:
    """The files under `folder` (undo leaves emptied folders: not compared), sdprep's state excluded."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and ".sdprep" not in p.parts
    )


# -- reg balancing: DreamBoothDataset's loop as read in kohya's source (run: test_bucket_oracle) --


@pytest.mark.parametrize(
    "train, reg, want",
    [
        (120, [(5, 24)], [(5, 120)]),  # exact
        (99, [(4, 24)], [(4, 99)]),  # registered all, then +1 repeat for 3 images
        (4, [(3, 2)], [(2, 4)]),  # the 2nd image reaches 4 samples: the 3rd is never registered
        (2, [(4, 1)], [(2, 2)]),  # fewer training samples than reg images
        (0, [(4, 1)], [(0, 0)]),  # a dataset without training images registers no reg image
        (10, [(2, 3), (3, 1)], [(2, 7), (3, 3)]),  # two subsets: 6+3 = 9, then +1 on the first image
    ],
)
def test_kohya_reg_use(train, reg, want):
    assert kohya_reg_use(train, reg) == want


def test_reg_repeats_let_kohya_use_every_reg_image():
    for train, n in [(4, 3), (99, 4), (120, 5), (7, 7), (1000, 3)]:
        (per,) = balance_reg_repeats(train, [n])
        assert kohya_reg_use(train, [(n, per)]) == [(n, train)]


def test_summary_prints_the_reg_numbers_kohya_registers(tmp_path):
    _images(tmp_path / "data", 2)
    _images(tmp_path / "reg" / "woman", 5, prefix="r")
    res = run_bucket(
        tmp_path / "data", BucketOptions(out=tmp_path / "out", token="tok", reg=(tmp_path / "reg/woman",))
    )
    assert "  1_woman (reg): 2 of 5 images used x 1 repeats = 2 samples/epoch" in "\n".join(res.notes)
    _images(tmp_path / "data2", 7)
    _images(tmp_path / "reg2" / "woman", 3, prefix="r")
    res = run_bucket(
        tmp_path / "data2", BucketOptions(out=tmp_path / "out2", token="tok", reg=(tmp_path / "reg2/woman",))
    )
    assert "  2_woman (reg): 3 images x 2-3 repeats = 7 samples/epoch" in "\n".join(res.notes)


# -- masks ---------------------------------------------------------------------------------------


def test_conditioning_form_with_reg_is_refused_with_the_way_out(tmp_path):
    _images(tmp_path / "data", 2)
    (tmp_path / "data" / "masks").mkdir()
    Image.new("L", (512, 512), 0).save(tmp_path / "data" / "masks" / "i0.png")
    _images(tmp_path / "reg" / "woman", 2, prefix="r")
    opts = BucketOptions(
        out=tmp_path / "out", token="t", reg=(tmp_path / "reg/woman",), mask_form="conditioning"
    )
    with pytest.raises(ConfigError) as err:
        run_bucket(tmp_path / "data", opts)
    assert "--mask-form conditioning cannot be used with --reg" in err.value.message
    assert "leave out --mask-form" in err.value.hint
    with pytest.raises(ConfigError, match="unknown mask form 'x'"):
        BucketOptions(out=tmp_path, mask_form="x")


def test_transparent_image_in_an_alpha_mask_subset_is_written_opaque(tmp_path):
    """kohya would read its own transparency as a loss mask: written with a full alpha instead."""
    data = tmp_path / "data"
    _images(data, 1)
    Image.new("RGBA", (512, 512), (200, 0, 0, 0)).save(data / "clear.png")
    (data / "masks").mkdir()
    Image.new("L", (512, 512), 0).save(data / "masks" / "i0.png")
    run_bucket(data, BucketOptions(out=tmp_path / "out", token="t"))
    clear = Image.open(tmp_path / "out/img/1_t/clear.png")
    assert clear.mode == "RGBA" and clear.getchannel("A").getextrema() == (255, 255)
    assert clear.getpixel((0, 0))[:3] == (255, 255, 255)  # transparency on white, as sdprep shows it


# -- EXIF orientation, captions ------------------------------------------------------------------


def _rotated_jpeg(path: Path) -> None:
    """Stored 120x80 (left half red), EXIF orientation 6: displayed 80x120 (top half red)."""
    im = Image.new("RGB", (120, 80), (0, 0, 250))
    im.paste((250, 0, 0), (0, 0, 60, 80))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, quality=95, exif=exif.tobytes())


def test_exif_rotated_images_are_exported_rotated_with_their_mask(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _rotated_jpeg(data / "rot.jpg")
    (data / "masks").mkdir()
    Image.new("L", (80, 120), 100).save(data / "masks" / "rot.png")  # made at the displayed size
    for form, name in (("alpha", "out"), ("conditioning", "outc")):
        res = run_bucket(data, BucketOptions(out=tmp_path / name, token="t", mask_form=form))
        assert not res.failed
        img = Image.open(tmp_path / name / "img/1_t/rot.png")
        assert img.size == (80, 120) and "exif" not in img.info  # kohya sees what sdprep shows
        r, _, b = img.convert("RGB").getpixel((40, 20))
        assert r > 200 and b < 50  # top is red: rotated
        assert not (tmp_path / name / "img/1_t/rot.jpg").exists()
        assert any(
            "EXIF-rotated, written as rotated PNG copies (1" in n and "rot.jpg" in n for n in res.notes
        )
    assert Image.open(tmp_path / "out/img/1_t/rot.png").getchannel("A").getextrema() == (100, 100)
    assert Image.open(tmp_path / "outc/img/1_t/masks/rot.png").size == (80, 120)


def test_a_png_copy_never_overwrites_another_image(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _rotated_jpeg(data / "a.jpg")
    Image.new("RGB", (80, 120)).save(data / "a.png")
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    res = run_bucket(data, BucketOptions(out=tmp_path / "out", token="t"))
    # a.png is where a.jpg's rotated copy would go: the stem clash leaves both out before any copy
    clash = 'a.jpg and a.png share the stem "a", so they would share one caption file and one mask'
    assert sorted(f.path.name for f in res.failed) == ["a.jpg", "a.png"]
    assert all(f.reason.startswith(clash) for f in res.failed)
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()} == before
    assert not list((tmp_path / "out").rglob("a.*"))  # no copy written anywhere


def test_multi_line_captions_are_written_as_kohya_trains_them_and_reported(tmp_path):
    data = tmp_path / "data"
    _images(data, 2)
    (data / "i0.txt").write_text("tok, 1girl,\n\nsmile, outdoors\n", encoding="utf-8")
    (data / "i1.txt").write_text("tok, solo\n", encoding="utf-8")
    res = run_bucket(data, BucketOptions(out=tmp_path / "out", token="tok"))
    assert (tmp_path / "out/img/1_tok/i0.txt").read_text() == "tok, 1girl, smile, outdoors\n"
    assert (tmp_path / "out/img/1_tok/i1.txt").read_text() == "tok, solo\n"
    assert (
        "captions on several lines (1; kohya trains only the first line): written as one line joined with ', ': i0.png"
        in res.notes
    )
    meta = json.loads((tmp_path / "out/metadata.json").read_text())
    assert meta["img/1_tok/i0.png"]["caption"] == "tok, 1girl, smile, outdoors"


# -- paths, batch size ---------------------------------------------------------------------------


def test_paths_are_relative_to_out_or_under_root_and_batch_size_only_when_given(tmp_path, cli_runner):
    _images(tmp_path / "data", 1)
    args = ["bucket", str(tmp_path / "data"), "-o", str(tmp_path / "out"), "--token", "t"]
    assert cli_runner.invoke(cli, args).exit_code == 0
    toml = tomllib.loads((tmp_path / "out/dataset.toml").read_text())
    assert toml["datasets"][0]["subsets"][0]["image_dir"] == "img/1_t"
    assert "batch_size" not in toml["datasets"][0]
    assert list(json.loads((tmp_path / "out/metadata.json").read_text())) == ["img/1_t/i0.png"]
    res = cli_runner.invoke(cli, [*args, "--root", "/workspace/set/", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    toml = tomllib.loads((tmp_path / "out/dataset.toml").read_text())
    assert toml["datasets"][0]["subsets"][0]["image_dir"] == "/workspace/set/img/1_t"
    assert toml["datasets"][0]["batch_size"] == 4
    assert list(json.loads((tmp_path / "out/metadata.json").read_text())) == ["/workspace/set/img/1_t/i0.png"]
    assert "# paths are under /workspace/set/ (--root)" in (tmp_path / "out/dataset.toml").read_text()


# -- re-bucketing replaces the previous output ----------------------------------------------------


def test_rebucketing_with_other_repeats_replaces_the_old_folder_and_undo_restores_it(tmp_path, cli_runner):
    data, out = tmp_path / "data", tmp_path / "out"
    _images(data, 3)
    run_bucket(data, BucketOptions(out=out, token="tok", repeats=1))
    (out / "img" / "1_tok" / "mine.txt").write_text("a file sdprep did not write")
    first = _files(out)
    res = run_bucket(data, BucketOptions(out=out, token="tok", repeats=10))
    assert sorted(p.name for p in (out / "img").iterdir()) == ["10_tok", "1_tok"]
    assert _files(out / "img" / "1_tok") == ["mine.txt"]  # only what sdprep did not write is left
    assert any(
        n.startswith("removed 6 files an earlier bucket run wrote and this one does not") for n in res.notes
    )
    again = run_bucket(data, BucketOptions(out=out, token="tok", repeats=10))
    assert again.changed == 0 and not any(n.startswith("removed") for n in again.notes)
    undo(out)  # the no-op run recorded nothing: undo reverts the change of repeats
    assert _files(out) == first
    # a dropped image's files go too: kohya would still train them
    os.unlink(data / "i2.png")
    res = run_bucket(data, BucketOptions(out=out, token="tok", repeats=1))
    assert not (out / "img/1_tok/i2.png").exists() and not (out / "img/1_tok/i2.txt").exists()
    assert (out / "img/1_tok/mine.txt").exists()


def test_rebucketing_an_out_without_a_record_uses_the_journal(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    _images(data, 2)
    run_bucket(data, BucketOptions(out=out, token="tok"))
    (out / ".sdprep" / "bucket-files.txt").unlink()  # as an OUT bucketed before records existed
    run_bucket(data, BucketOptions(out=out, token="tok", repeats=3))
    assert sorted(p.name for p in (out / "img").iterdir()) == ["3_tok"]


# -- a bucketed folder moved elsewhere trains with sdprep --------------------------------------------


@pytest.mark.parametrize("form", ["alpha", "conditioning"])
def test_a_masked_bucket_output_moved_elsewhere_trains(form, cli_runner, tiny_sdxl, tmp_path, monkeypatch):
    """Paths relative to the TOML's folder: the folder trains after a move, from any working folder."""
    from train_support import make_dataset

    data = make_dataset(
        tmp_path / "src",
        images=["c_square.webp", "b_portrait.png", "e_sepia.jpg"],
        masks={"b_portrait.png": "left"},
    )
    concept = data / "2_mytoken"
    reg = []
    if form == "alpha":
        _images(tmp_path / "reg" / "person", 2, size=(96, 96), prefix="r")
        reg = ["--reg", str(tmp_path / "reg" / "person")]
    built = tmp_path / "built"
    args = ["bucket", str(concept), "-o", str(built), "--token", "mytoken", "--mask-form", form, *reg]
    args += ["--resolution", "128", "--min-side", "64", "--max-side", "256"]
    res = cli_runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    moved = tmp_path / "elsewhere" / "set"
    moved.parent.mkdir()
    os.rename(built, moved)
    monkeypatch.chdir(tmp_path / "elsewhere")  # neither the old place nor OUT itself
    args = ["train", "--model", str(tiny_sdxl), "--steps", "2", "--output-dir", str(tmp_path / "model")]
    args += ["--dataset-config", "set/dataset.toml", "--", "--network_module=networks.lora", "--masked_loss"]
    result = cli_runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    shown = " ".join(result.output.split())  # the banner wraps at the terminal width
    images = 5 if form == "alpha" else 3
    # the same masks in both forms (baked alpha = mask file): same coverage
    assert f"masks: 3 of {images} images have masks, mean coverage 83.1%" in shown
    assert "set/img/1_mytoken: 3 images, 1 repeats, 3 with masks" in shown
    if form == "alpha":  # the reg numbers bucket printed are the ones training registers
        assert "1_person (reg): 2 images x 1-2 repeats = 3 samples/epoch" in res.output
        assert "data: 5 images (2 regularisation), 6 samples per epoch" in shown
    assert str(built) not in result.output
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "model").iterdir())
