"""Multi-file steps are made whole by the next run, and links inside the dataset survive (issue 18, 8-9).

A kill between the files of one step (image, mask, sidecar; a new image and the removal of the
old one; a duplicate and its companions) must not leave a state the next run skips or refuses:
the re-run ends with exactly the files an uninterrupted run writes. `rename -r` keeps symlinks
inside the dataset pointing at the renamed files, and `dedup` never moves a link's target away.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import corpus
from crashkit import kill_at, sdprep
from PIL import Image

from sdprep import fileops


def png(colour: tuple[int, int, int], size=(40, 32)) -> bytes:
    """A smooth random picture per colour: distinct perceptual hashes, so no accidental duplicates."""
    import numpy as np

    rng = np.random.default_rng(list(colour))
    im = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


# -- item 8: symlinks inside the dataset ---------------------------------------------------------


def linked_dataset(root: Path) -> Path:
    raw, concept = root / "raw", root / "10_tok"
    raw.mkdir(parents=True)
    concept.mkdir()
    for i, name in enumerate(["kiwi.png", "apple.png", "mango.png"]):
        (raw / name).write_bytes(png((40 * i, 90, 20)))
        (raw / name.replace(".png", ".txt")).write_text(f"fruit{i}\n")
    (concept / "apple.png").symlink_to("../raw/apple.png")  # relative, as the README shows
    (concept / "zz.png").symlink_to(raw / "kiwi.png")  # absolute
    (concept / "apple.txt").symlink_to("../raw/apple.txt")
    (concept / "own.png").write_bytes(png((200, 10, 10)))
    return root


def test_rename_keeps_links_inside_the_dataset_pointing_at_the_renamed_files(tmp_path):
    data = linked_dataset(tmp_path / "data")
    before = corpus.snapshot(data)
    done = sdprep("rename", str(data), "-r")
    assert done.returncode == 0, done.stderr
    after = corpus.snapshot(data)
    # raw: apple 001, kiwi 002, mango 003; 10_tok: apple.png 001 (link), own 002, zz 003 (link)
    assert after["10_tok/001.png"] == "link:../raw/001.png"
    assert after["10_tok/001.txt"] == "link:../raw/001.txt"
    assert after["10_tok/003.png"] == f"link:{os.path.realpath(data / 'raw')}/002.png"
    for link in ("10_tok/001.png", "10_tok/001.txt", "10_tok/003.png"):
        assert (data / link).exists(), f"{link} dangles"
    assert (data / "10_tok/001.png").read_bytes() == (data / "raw/001.png").read_bytes()
    assert sdprep("undo", str(data)).returncode == 0
    assert corpus.snapshot(data) == before


def test_dedup_never_moves_a_links_only_target_away(tmp_path):
    data = linked_dataset(tmp_path / "data")
    (data / "raw" / "apple-copy.png").write_bytes(
        (data / "raw" / "apple.png").read_bytes()
    )  # a real duplicate
    done = sdprep("dedup", str(data), "-r")
    assert done.returncode == 0, done.stderr
    assert (data / "raw" / "apple.png").is_file() and (data / "10_tok" / "apple.png").exists()
    assert (data / "raw" / "kiwi.png").is_file() and (data / "10_tok" / "zz.png").exists()
    assert (data / "duplicates" / "raw" / "apple-copy.png").is_file()
    assert not (data / "raw" / "apple-copy.png").exists()


def test_dedup_keeps_the_linked_copy_and_moves_the_other(tmp_path):
    data = linked_dataset(tmp_path / "data")
    bigger = Image.open(data / "raw" / "apple.png").resize((80, 64), Image.NEAREST)
    bigger.save(data / "raw" / "apple-big.png")  # larger: kept, were apple.png not a link's target
    done = sdprep("dedup", str(data), "-r")
    assert done.returncode == 0, done.stderr
    assert "1 groups" in done.stdout and "symlink" not in done.stdout  # the link is not a duplicate
    assert (data / "10_tok" / "apple.png").exists() and (data / "raw" / "apple.png").is_file()
    assert (data / "duplicates" / "raw" / "apple-big.png").is_file()


def test_dedup_leaves_two_linked_duplicates_in_place(tmp_path):
    data = linked_dataset(tmp_path / "data")
    shutil.copyfile(data / "raw" / "apple.png", data / "raw" / "kiwi.png")  # kiwi: a link's target too
    done = sdprep("dedup", str(data), "-r")
    assert done.returncode == 0, done.stderr
    assert (
        "kept 2 duplicates in place, a symlink in the dataset points at them: kiwi.png, zz.png" in done.stdout
    )
    assert not (data / "duplicates").exists()
    assert all((data / "10_tok" / n).exists() for n in ("apple.png", "zz.png"))


# -- item 9 and beyond: kills between the files of one step ---------------------------------------


def kill_everywhere(zygote, data: Path, args: list[str], kinds=("any",)) -> None:
    """Kill `sdprep ARGS` at each pause point in turn; every re-run must end as the uninterrupted run
    and leave no temporary file behind."""
    pristine = data.with_name("pristine")
    shutil.copytree(data, pristine, symlinks=True)
    code, output, _ = zygote.run(args)
    assert code == 0, output
    expected = corpus.snapshot(data)
    for kind in kinds:
        n = 1
        while True:
            shutil.rmtree(data)
            shutil.copytree(pristine, data, symlinks=True)
            if not zygote.kill_at(args, n, kind):
                break  # the run ended before point n: every point was tried
            code, output, _ = zygote.run(args)
            assert code == 0, f"kill at {kind} {n}: {output}"
            assert corpus.snapshot(data) == expected, f"kill at {kind} {n}: the re-run did not converge"
            n += 1
        assert n > 2


def test_upscale_killed_between_image_mask_and_sidecar_converges(fast_tmp, zygote):
    data = fast_tmp / "data"
    (data / "masks").mkdir(parents=True)
    (data / "a.png").write_bytes(png((10, 120, 200)))
    (data / "a.png.json").write_text(json.dumps({"id": 1}) + "\n")
    Image.new("L", (40, 32), 255).save(data / "masks" / "a.png")
    kill_everywhere(zygote, data, ["upscale", str(data), "--min-side", "64"])
    assert Image.open(data / "masks" / "a.png").size == Image.open(data / "a.png").size == (80, 64)


def test_convert_killed_after_writing_the_new_file_removes_the_old_one(fast_tmp, zygote):
    data = fast_tmp / "data"
    data.mkdir()
    Image.open(io.BytesIO(png((10, 120, 200)))).save(data / "a.jpg", quality=95)
    (data / "a.jpg.json").write_text(json.dumps({"id": 1}) + "\n")
    (data / "a.txt").write_text("fruit\n")
    kill_everywhere(zygote, data, ["convert", str(data), "--format", "png"])
    assert sorted(p.name for p in data.iterdir()) == [".sdprep", "a.png", "a.png.json", "a.txt"]


def test_mask_killed_before_its_record_adopts_its_own_mask(fast_tmp, zygote):
    data = fast_tmp / "data"
    data.mkdir()
    for i in range(2):
        im = Image.new("RGB", (40, 32), (255, 255, 255))
        im.paste((200, 20, 20), (10, 8, 30, 24))
        im.save(data / f"m{i}.png")
    kill_everywhere(zygote, data, ["mask", str(data), "--method", "color"])


def test_a_users_own_mask_is_still_refused(tmp_path):
    data = tmp_path / "data"
    (data / "masks").mkdir(parents=True)
    Image.new("RGB", (40, 32), (255, 255, 255)).save(data / "m.png")
    Image.new("L", (40, 32), 77).save(data / "masks" / "m.png")
    done = sdprep("mask", str(data), "--method", "color", "--fallback", "full")
    assert done.returncode == 1 and "masks/m.png exists and was not made by sdprep mask" in done.stdout
    assert Image.open(data / "masks" / "m.png").getpixel((0, 0)) == 77


def test_rename_killed_anywhere_is_finished_by_the_next_rename(fast_tmp, zygote):
    data = linked_dataset(fast_tmp / "data")
    kill_everywhere(zygote, data, ["rename", str(data), "-r"])


def test_rename_after_a_killed_rename_that_is_not_the_newest_operation_still_refuses(tmp_path):
    data = linked_dataset(tmp_path / "data")
    kill_at(["rename", str(data), "-r"], "change", 3, tmp_path)
    with fileops.Journal(data).begin("other", []) as op:
        op.write_text(data / "note.txt", "later\n")
    done = sdprep("rename", str(data), "-r")
    assert done.returncode == 1 and "an interrupted rename left" in done.stderr
    assert "undo back to the interrupted rename" in done.stderr
    assert sdprep("undo", str(data)).returncode == 0  # "other"
    assert sdprep("rename", str(data), "-r").returncode == 0  # the killed rename is the newest again
    shutil.rmtree(data)
    data = linked_dataset(tmp_path / "data")
    kill_at(["rename", str(data), "-r"], "change", 3, tmp_path)
    assert sdprep("gc", str(data)).returncode == 0
    done = sdprep("rename", str(data), "-r")
    assert done.returncode == 1 and "the journal no longer holds their old names" in done.stderr


def test_dedup_killed_anywhere_is_finished_by_the_next_dedup(fast_tmp, zygote):
    data = fast_tmp / "data"
    (data / "masks").mkdir(parents=True)
    for name, size in (("big.png", (80, 64)), ("small.png", (40, 32))):
        Image.open(io.BytesIO(png((10, 120, 200)))).resize(size).save(data / name)
        (data / name.replace(".png", ".txt")).write_text("same\n")
        Image.new("L", size, 255).save(data / "masks" / name)
    kill_everywhere(zygote, data, ["dedup", str(data)])
    assert sorted(p.name for p in (data / "duplicates").rglob("*")) == [
        "masks",
        "small.png",
        "small.png",
        "small.png.json",
        "small.txt",
    ]


def test_dedup_then_undo_leaves_no_duplicates_folder(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.png"):
        (data / name).write_bytes(png((10, 120, 200)))
    (data / "c.png").write_bytes(png((10, 120, 200), (80, 64)))
    before = corpus.snapshot(data)
    done = sdprep("dedup", str(data), "-r")
    assert done.returncode == 0 and (data / "duplicates" / "sub" / "b.png").is_file()
    assert sdprep("undo", str(data)).returncode == 0
    assert corpus.snapshot(data) == before  # duplicates/ and duplicates/sub/ are gone too
