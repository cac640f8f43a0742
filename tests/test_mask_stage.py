"""The mask stage end to end on sample_data copies: files, sidecars, idempotency, undo, check, CLI."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdprep import fileops
from sdprep.cli import cli
from sdprep.dataset import Item, discover
from sdprep.errors import ConfigError
from sdprep.images import image_size
from sdprep.prep.mask import MaskOptions, run_mask
from sdprep.prep.mask_check import check_masks
from sdprep.prep.masks import MethodSettings
from sdprep.prep.masks.postprocess import PostOptions

ASTRONAUT = Path(__file__).resolve().parent / "assets" / "astronaut_256.jpg"


def mask_of(path: Path, out: str = "masks") -> np.ndarray:
    return np.asarray(Image.open(path.parent / out / (path.stem + ".png")))


def meta(path: Path) -> dict:
    return json.loads(Item(path).sidecar_path.read_text())["sdprep"]["mask"]


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".sdprep" not in p.parts
    }


def test_alpha_masks_sidecars_and_opaque_images_skipped(sample_dataset, cli_runner):
    """Opaque images get no mask and are not failures: kohya and OneTrainer train them whole."""
    res = run_mask(sample_dataset, MaskOptions("alpha"))
    assert (res.changed, res.skipped, len(res.failed)) == (1, 7, 0)
    assert res.notes[0] == (
        "no transparency in 7 of 8 images: no mask written, they are trained on the whole image: "
        "a_landscape.jpg, b_portrait.png, c_square.webp, d_greyscale.png, e_sepia.jpg, g_tiny.png, "
        "h_wide.jpg"
    )
    assert sorted(p.name for p in (sample_dataset / "masks").iterdir()) == ["f_transparent.png"]
    image = sample_dataset / "f_transparent.png"
    mask = mask_of(image)
    assert mask.dtype == np.uint8 and mask.shape == (512, 512)
    assert Image.open(sample_dataset / "masks" / "f_transparent.png").mode == "L"
    assert np.array_equal(mask, np.asarray(Image.open(image).getchannel("A")))
    record = meta(image)
    assert record["path"] == "masks/f_transparent.png" and record["method"] == "alpha"
    assert record["options"] == {} and record["coverage"] == pytest.approx(mask.mean() / 255, abs=1e-4)
    # gallery-dl's own keys are preserved
    assert json.loads(Item(image).sidecar_path.read_text())["tag_string_artist"] == "artist_two"
    assert res.notes[1].startswith("coverage: mean 0.29 over 1 new masks")


def test_fallback_full_masks_every_image_at_its_size(sample_dataset):
    res = run_mask(sample_dataset, MaskOptions("alpha", fallback="full"))
    assert (res.changed, len(res.failed)) == (8, 0)
    for item in discover(sample_dataset):
        w, h = image_size(item.path)
        assert mask_of(item.path).shape == (h, w)
    assert mask_of(sample_dataset / "h_wide.jpg").min() == 255
    assert meta(sample_dataset / "h_wide.jpg")["fallback_used"] == "full"
    assert "fallback_used" not in meta(sample_dataset / "f_transparent.png")
    assert any(n.startswith("fallback (full mask) for 7: a_landscape.jpg, ") for n in res.notes)


def test_rerun_skips_force_redoes_and_option_change_redoes(sample_dataset):
    opts = MaskOptions("full")
    assert run_mask(sample_dataset, opts).changed == 8
    journal = fileops.Journal(sample_dataset)
    before = snapshot(sample_dataset)
    again = run_mask(sample_dataset, opts)
    assert (again.changed, again.skipped) == (0, 8)
    assert snapshot(sample_dataset) == before and len(journal.operations()) == 1
    assert run_mask(sample_dataset, MaskOptions("full", force=True)).changed == 8
    changed = run_mask(sample_dataset, MaskOptions("full", post=PostOptions(floor=0.5)))
    assert changed.changed == 8 and meta(sample_dataset / "g_tiny.png")["options"] == {"floor": 0.5}
    # a changed image is redone; a deleted mask is rewritten
    Image.new("RGB", (64, 48), (1, 2, 3)).save(sample_dataset / "g_tiny.png")
    (sample_dataset / "masks" / "a_landscape.png").unlink()
    res = run_mask(sample_dataset, MaskOptions("full", post=PostOptions(floor=0.5)))
    assert (res.changed, res.skipped) == (2, 6)
    assert mask_of(sample_dataset / "g_tiny.png").shape == (48, 64)


def test_undo_removes_generated_masks_and_restores_sidecars(sample_dataset):
    before = snapshot(sample_dataset)
    run_mask(sample_dataset, MaskOptions("color", settings=MethodSettings(tolerance=40)))
    assert (sample_dataset / "masks").is_dir()
    fileops.undo(sample_dataset)
    assert snapshot(sample_dataset) == before
    assert not (sample_dataset / "masks").exists()


def test_existing_foreign_mask_is_kept_unless_forced_or_combined(sample_dataset):
    image = sample_dataset / "b_portrait.png"
    (sample_dataset / "masks").mkdir()
    painted = np.zeros((768, 512), dtype=np.uint8)
    painted[:100] = 255
    Image.fromarray(painted, "L").save(sample_dataset / "masks" / "b_portrait.png")
    res = run_mask(sample_dataset, MaskOptions("full"))
    assert res.changed == 7
    assert [f.reason for f in res.failed] == [
        "masks/b_portrait.png exists and was not made by sdprep mask; pass --force to replace it, "
        "--combine union|intersection to merge with it, or import it with --method import"
    ]
    assert np.array_equal(mask_of(image), painted)
    color = MethodSettings(tolerance=30)
    res = run_mask(sample_dataset, MaskOptions("color", settings=color, post=PostOptions(combine="union")))
    merged = mask_of(image)
    assert merged[:100].min() == 255 and merged[230, 256] == 255 and merged[760, 5] == 0
    inter = run_mask(
        sample_dataset, MaskOptions("color", settings=color, post=PostOptions(combine="intersection"))
    )
    assert inter.changed == 8 and mask_of(image)[230, 256] == 255 and mask_of(image)[50, 5] == 0


def test_face_stage_with_workers_and_out_dir(sample_dataset):
    shutil.copy(ASTRONAUT, sample_dataset / "astronaut.jpg")
    opts = MaskOptions("face", out="masks_face", fallback="full", workers=2, post=PostOptions(feather=6))
    res = run_mask(sample_dataset, opts)
    assert (res.changed, len(res.failed)) == (9, 0)
    face = mask_of(sample_dataset / "astronaut.jpg", "masks_face")
    assert face[57, 113] == 255 and face[5, 5] == 0
    assert np.any((face > 0) & (face < 255))  # feathered edges
    assert 0.05 < face.mean() / 255 < 0.3
    assert not (sample_dataset / "masks").exists()
    assert "masks_face" not in {p.parent.name for p in (i.path for i in discover(sample_dataset, True))}
    serial = run_mask(sample_dataset, MaskOptions("face", out="masks_face", fallback="full", force=True))
    assert serial.changed == 9
    hard = mask_of(sample_dataset / "astronaut.jpg", "masks_face")
    assert set(np.unique(hard).tolist()) == {0, 255}  # no feather this time
    assert abs(int(hard.astype(int).sum()) - int(face.astype(int).sum())) < 0.05 * hard.astype(int).sum()
    with pytest.raises(ConfigError, match='--out "faces": a mask folder is named "masks" or "masks_<name>"'):
        run_mask(sample_dataset, MaskOptions("face", out="faces"))


def test_exif_rotated_image_gets_the_displayed_size(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    im = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    im.save(root / "r.jpg", exif=exif)
    run_mask(root, MaskOptions("full"))
    assert mask_of(root / "r.jpg").shape == (40, 20)


def test_stem_clash_and_empty_mask_fail_per_file(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    Image.new("RGB", (8, 8), "white").save(root / "a.png")
    Image.new("RGB", (8, 8), "white").save(root / "a.jpg")
    Image.new("RGB", (8, 8), "white").save(root / "plain.png")
    res = run_mask(root, MaskOptions("color"))
    reasons = {f.path.name: f.reason for f in res.failed}
    assert reasons["a.jpg"] == (
        'a.jpg and a.png share the stem "a", so they would share one caption file and one mask; '
        "rename one of them (sdprep rename)"
    )
    assert reasons["plain.png"] == "the color mask is empty (all black): this image would teach nothing"
    assert res.changed == 0 and not (root / "masks").exists()


def test_invalid_options():
    for make, message in [  # refused as the options are built (clipseg's prompt: as the method is)
        (lambda: MaskOptions("full", post=PostOptions(threshold=2)), "--threshold must be between 0 and 1"),
        (lambda: MaskOptions("full", post=PostOptions(grow=-1)), "--grow must be 0 or more"),
        (lambda: MaskOptions("full", fallback="half"), 'unknown fallback "half"'),
        (lambda: MaskOptions("clipseg"), "--method clipseg needs at least one --prompt"),
    ]:
        with pytest.raises(ConfigError, match=message):
            run_mask(".", make())


def test_import_stage_notes_resized_masks(sample_dataset, tmp_path):
    painted = tmp_path / "painted"
    painted.mkdir()
    Image.new("L", (256, 384), 255).save(painted / "b_portrait.png")  # half size of 512x768
    Image.new("L", (300, 300), 255).save(painted / "a_landscape.jpg")  # wrong shape
    res = run_mask(sample_dataset, MaskOptions("import", settings=MethodSettings(source=painted)))
    assert res.changed == 1
    reasons = {f.path.name: f.reason for f in res.failed}
    assert reasons["a_landscape.jpg"].startswith("mask a_landscape.jpg is 300x300 but the image is 768x512")
    assert reasons["c_square.webp"].startswith("no mask named c_square.* in ")
    assert "b_portrait.png: b_portrait.png resized 256x384 -> 512x768" in res.notes
    assert mask_of(sample_dataset / "b_portrait.png").shape == (768, 512)
    assert meta(sample_dataset / "b_portrait.png")["inputs"]["source"] == "b_portrait.png"
    # repainting the source mask redoes it; an unchanged one is skipped
    again = run_mask(sample_dataset, MaskOptions("import", settings=MethodSettings(source=painted)))
    assert (again.changed, again.skipped) == (0, 1)
    Image.new("L", (512, 768), 128).save(painted / "b_portrait.png")
    again = run_mask(sample_dataset, MaskOptions("import", settings=MethodSettings(source=painted)))
    assert again.changed == 1 and mask_of(sample_dataset / "b_portrait.png").max() == 128


# -- check -----------------------------------------------------------------------------------


def test_check_good_masks_and_preview(sample_dataset, cli_runner):
    run_mask(sample_dataset, MaskOptions("alpha", fallback="full"))
    res = cli_runner.invoke(cli, ["mask", "--check", str(sample_dataset)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == "mask check: 8 images, 8 usable masks, 0 problems"
    assert lines[1] == "coverage: mean 0.911 (fraction of each image that is learned)"
    assert lines[2].startswith("lowest: f_transparent.png 0.290, a_landscape.jpg 1.000, ")
    preview = sample_dataset / ".sdprep" / "mask_preview.png"
    assert lines[3] == f"preview: {preview}"
    sheet = Image.open(preview)
    assert sheet.format == "PNG" and sheet.size == (3 * 206 + 6, 22 + 3 * 236 + 6)


def test_check_finds_wrong_size_empty_and_missing(sample_dataset, cli_runner, tmp_path):
    run_mask(sample_dataset, MaskOptions("full"))
    Image.new("L", (10, 10), 255).save(sample_dataset / "masks" / "a_landscape.png")
    Image.new("L", (512, 768), 0).save(sample_dataset / "masks" / "b_portrait.png")
    (sample_dataset / "masks" / "c_square.png").unlink()
    out = tmp_path / "sheet.png"
    res = cli_runner.invoke(cli, ["mask", "--check", str(sample_dataset), "--preview", str(out)])
    assert res.exit_code == 1
    assert "mask check: 8 images, 5 usable masks, 3 problems" in res.output
    assert (
        "  problem: a_landscape.jpg: mask masks/a_landscape.png is 10x10 but the image is 768x512"
        in res.output
    )
    assert (
        "  problem: b_portrait.png: mask masks/b_portrait.png is empty (all black): the image would teach nothing"
        in res.output
    )
    assert "  problem: c_square.webp: no mask (expected masks/c_square.png)" in res.output
    assert out.is_file()
    Image.new("L", (4, 4), 255).save(sample_dataset / "masks" / "gone.png")
    report = check_masks(sample_dataset, preview=False)
    assert report.preview is None and len(report.problems) == 3
    assert report.notes == ["1 masks have no image (harmless; delete them if unwanted): masks/gone.png"]


# -- command line ----------------------------------------------------------------------------


def test_cli_generate_skip_and_usage_errors(sample_dataset, cli_runner):
    res = cli_runner.invoke(cli, ["mask", str(sample_dataset), "--method", "full", "--floor", "0.1"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("mask: 8 changed, 0 skipped, 0 failed\ncoverage: mean 1.00 over 8 new masks")
    res = cli_runner.invoke(cli, ["mask", str(sample_dataset), "--method", "full", "--floor", "0.1"])
    assert res.output.startswith("mask: 0 changed, 8 skipped, 0 failed")
    res = cli_runner.invoke(cli, ["mask", str(sample_dataset)])
    assert (
        res.exit_code == 2
        and "give --method (alpha, face, clipseg, color, import, full) or --check" in res.output
    )
    res = cli_runner.invoke(cli, ["mask", str(sample_dataset), "--method", "alpha"])
    assert res.exit_code == 1 and "failed: " in res.output
    res = cli_runner.invoke(cli, ["mask", str(sample_dataset), "--method", "clipseg"])
    assert res.exit_code == 1
    assert res.output.startswith("Error: --method clipseg needs at least one --prompt\nHint: ")


def test_two_mask_folders_keep_separate_records(sample_dataset):
    run_mask(sample_dataset, MaskOptions("full"))
    run_mask(sample_dataset, MaskOptions("alpha", out="masks_alpha", fallback="full"))
    sidecar = json.loads((sample_dataset / "f_transparent.png.json").read_text())["sdprep"]
    assert sidecar["mask"]["path"] == "masks/f_transparent.png" and sidecar["mask"]["method"] == "full"
    assert sidecar["masks_alpha"]["path"] == "masks_alpha/f_transparent.png"
    assert run_mask(sample_dataset, MaskOptions("full")).skipped == 8
    assert run_mask(sample_dataset, MaskOptions("alpha", out="masks_alpha", fallback="full")).skipped == 8


def test_renamed_images_keep_their_masks(sample_dataset):
    from sdprep.prep.rename import RenameOptions, run_rename

    run_mask(sample_dataset, MaskOptions("alpha", fallback="full"))
    alpha = mask_of(sample_dataset / "f_transparent.png")
    assert run_rename(sample_dataset, RenameOptions()).ok
    renamed = sorted(p.name for p in (sample_dataset / "masks").iterdir())
    assert renamed == [f"{i:03d}.png" for i in range(1, 9)]
    res = run_mask(sample_dataset, MaskOptions("alpha", fallback="full"))
    assert (res.changed, res.skipped, len(res.failed)) == (0, 8, 0)
    assert "updated the mask path of 8 renamed images" in res.notes
    assert meta(sample_dataset / "006.png")["path"] == "masks/006.png"
    assert np.array_equal(mask_of(sample_dataset / "006.png"), alpha)
    again = run_mask(sample_dataset, MaskOptions("alpha", fallback="full"))
    assert (again.skipped, again.notes) == (8, [])


def test_alpha_on_a_mixed_folder_exits_0_and_face_suggests_the_fallback(sample_dataset, cli_runner):
    from sdprep.cli import cli

    res = cli_runner.invoke(cli, ["mask", str(sample_dataset), "--method", "alpha"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("mask: 1 changed, 7 skipped, 0 failed\n")
    assert (
        "no transparency in 7 of 8 images: no mask written, they are trained on the whole image" in res.output
    )
    face = cli_runner.invoke(cli, ["mask", str(sample_dataset), "--method", "face", "--out", "masks_face"])
    assert face.exit_code == 1  # no face is still a failure: a face mask was asked for
    failed = face.output.count("  failed: ")
    assert failed >= 1
    assert (
        f"nothing to mask in {failed} of 8 images (no face found (cascade haarcascade_frontalface_default.xml)): "
        "add --fallback full to train them on the whole image" in face.output
    )


def test_a_folder_where_a_mask_goes_is_that_images_failure(tmp_path):
    """masks/b.png being a folder: b fails (named), every other image gets its mask, nothing aborts."""
    for n in "abcd":
        Image.new("RGBA", (64, 48), (ord(n) * 2, 100, 50, 128)).save(tmp_path / f"{n}.png")
    (tmp_path / "masks" / "b.png").mkdir(parents=True)
    (tmp_path / "masks" / "b.png" / "keep.txt").write_text("mine")
    res = run_mask(tmp_path, MaskOptions("alpha"))
    assert res.changed == 3
    assert [(f.path.name, f.reason) for f in res.failed] == [
        (
            "b.png",
            "masks/b.png: not a regular file (a folder, FIFO or device); move it away, then run mask again",
        )
    ]
    assert (tmp_path / "masks" / "b.png" / "keep.txt").read_text() == "mine"
    assert all((tmp_path / "masks" / f"{n}.png").is_file() for n in "acd")


def test_mask_check_works_on_a_read_only_dataset(tmp_path):
    """--check only reads: on a folder it cannot write it checks all the same and writes nothing.

    Tests may run as root, which ignores permission bits: the CLI runs under corpus.reader_prefix()
    (setpriv without CAP_DAC_OVERRIDE), under which a mode-555 folder refuses root's writes too."""
    import corpus
    from test_reliability_corpus import run_cli

    if not corpus.can_drop_read_permission():
        pytest.skip("cannot take write permission away here (root without setpriv)")
    data = tmp_path / "data"
    data.mkdir()
    (data / "masks").mkdir()
    for n in "abc":
        Image.new("RGB", (40, 30), (ord(n), 90, 20)).save(data / f"{n}.png")
    Image.new("L", (40, 30), 255).save(data / "masks" / "a.png")
    Image.new("L", (40, 30), 0).save(data / "masks" / "b.png")
    before = corpus.snapshot(data, skip=())
    for folder in (data, data / "masks"):
        folder.chmod(0o555)
    try:
        done = run_cli(["mask", "--check", str(data)])
    finally:
        for folder in (data, data / "masks"):
            folder.chmod(0o755)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out  # b is empty, c has none: the check itself ran
    assert "mask check: 3 images, 1 usable masks, 2 problems" in out
    assert f"preview not written ({data}/.sdprep: Permission denied); pass --preview FILE" in out
    assert "Traceback" not in out and "Error:" not in out
    assert corpus.snapshot(data, skip=()) == before  # no lock, journal or preview: nothing written


def test_a_file_named_masks_fails_each_image_naming_it(tmp_path):
    for n in "ab":
        Image.new("RGB", (16, 16)).save(tmp_path / f"{n}.png")
    (tmp_path / "masks").write_text("mine")
    res = run_mask(tmp_path, MaskOptions("full"))
    assert res.changed == 0
    assert {(f.path.name, f.reason) for f in res.failed} == {
        (
            f"{n}.png",
            "masks: a file named masks is where sdprep keeps its masks folder; move it away, then run mask again",
        )
        for n in "ab"
    }
    assert (tmp_path / "masks").read_text() == "mine"
