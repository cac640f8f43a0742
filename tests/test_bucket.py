"""sdprep bucket: layout, repeats, TOML/metadata interop checked by a loader written from kohya's documented format."""

import json
import os
from pathlib import Path

import pytest
import tomllib
from PIL import Image

from sdprep.buckets import BucketSettings, assign_bucket
from sdprep.cli import cli
from sdprep.errors import ConfigError
from sdprep.prep.bucket import BucketOptions, run_bucket
from sdprep.prep.repeats import balance_reg_repeats, compute_repeats

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}

# kohya sd-scripts library/config_util.py accepts exactly these keys (kohya-formats.md, "Dataset TOML")
KOHYA_GENERAL_DATASET_KEYS = {
    "resolution",
    "batch_size",
    "enable_bucket",
    "min_bucket_reso",
    "max_bucket_reso",
    "bucket_reso_steps",
    "bucket_no_upscale",
    "validation_split",
    "validation_seed",
}
KOHYA_SUBSET_KEYS = {
    "image_dir",
    "num_repeats",
    "caption_extension",
    "class_tokens",
    "is_reg",
    "alpha_mask",
    "metadata_file",
    "conditioning_data_dir",
    "shuffle_caption",
    "keep_tokens",
    "keep_tokens_separator",
    "caption_prefix",
    "caption_suffix",
    "caption_separator",
    "secondary_separator",
    "enable_wildcard",
    "flip_aug",
    "color_aug",
    "random_crop",
    "caption_dropout_rate",
    "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate",
    "token_warmup_min",
    "token_warmup_step",
    "face_crop_aug_range",
}


def kohya_load(train_data_dir: Path) -> list[dict]:
    """A DreamBooth-folder reader written from kohya's documented rules, independent of sdprep's code."""
    out = []
    for sub in sorted(p for p in train_data_dir.iterdir() if p.is_dir()):
        head, _, rest = sub.name.partition("_")
        try:
            repeats = int(head)
        except ValueError:
            continue  # kohya ignores folders without an integer prefix
        for img in sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_EXTS):
            cap = img.with_suffix(".txt")
            out.append(
                {
                    "image": img,
                    "repeats": repeats,
                    "tokens": rest,
                    "caption": cap.read_text(encoding="utf-8").strip() if cap.exists() else rest,
                }
            )
    return out


def _files(root: Path) -> dict[Path, bytes]:
    """The dataset's files, without sdprep's state folder."""
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and ".sdprep" not in p.parts}


def test_bucket_builds_kohya_layout(sample_dataset, tmp_path):
    masks = sample_dataset / "masks"
    masks.mkdir()
    w, h = Image.open(sample_dataset / "a_landscape.jpg").size
    Image.new("L", (w, h), 128).save(masks / "a_landscape.png")
    (sample_dataset / "b_portrait.txt").write_text("nazuna, 1girl, smile\n")
    before = _files(sample_dataset)

    out = tmp_path / "out"
    res = run_bucket(sample_dataset, BucketOptions(out=out, token="nazuna", repeats=40))
    assert res.changed == 8 and not res.failed

    loaded = kohya_load(out / "img")
    assert (
        len(loaded) == 8
        and {r["repeats"] for r in loaded} == {40}
        and {r["tokens"] for r in loaded} == {"nazuna"}
    )
    caps = {r["image"].name: r["caption"] for r in loaded}
    assert caps["b_portrait.png"] == "nazuna, 1girl, smile" and caps["c_square.webp"] == "nazuna"
    # unmasked images are hard links of the originals; originals untouched
    assert os.path.samefile(out / "img/40_nazuna/b_portrait.png", sample_dataset / "b_portrait.png")
    assert (
        _files(sample_dataset) == before
    )  # the dataset's state folder records how it was bucketed (for the report)
    # the masked image is a PNG copy: the original pixels, its mask as alpha (no masks/ folder)
    baked = Image.open(out / "img/40_nazuna/a_landscape.png")
    assert baked.mode == "RGBA" and baked.getchannel("A").getextrema() == (128, 128)
    original = Image.open(sample_dataset / "a_landscape.jpg").convert("RGB")
    assert baked.convert("RGB").tobytes() == original.tobytes()
    assert not (out / "img/40_nazuna/a_landscape.jpg").exists() and not (out / "img/40_nazuna/masks").exists()

    cfg = tomllib.loads((out / "dataset.toml").read_text())
    assert set(cfg) <= {"general", "datasets"}
    assert cfg["general"]["caption_extension"] == ".txt"
    for ds in cfg["datasets"]:
        assert set(ds) - {"subsets"} <= KOHYA_GENERAL_DATASET_KEYS
        for sub in ds["subsets"]:
            assert set(sub) <= KOHYA_SUBSET_KEYS
            assert sub["image_dir"] == "img/40_nazuna" and sub["num_repeats"] == 40  # relative to OUT
            assert sub["alpha_mask"] is True and sub["class_tokens"] == "nazuna"
    assert "batch_size" not in cfg["datasets"][0]  # only when --batch-size is given

    meta = json.loads((out / "metadata.json").read_text())
    assert len(meta) == 8
    for key, entry in meta.items():
        assert not Path(key).is_absolute() and (out / key).is_file() and Path(key).suffix  # never stem-only
        assert set(entry) >= {"caption", "tags", "image_size"}
        assert tuple(entry["image_size"]) == Image.open(out / key).size
        assert tuple(entry["train_resolution"]) == assign_bucket(*Image.open(out / key).size).bucket

    preview = json.loads((out / "buckets.json").read_text())
    assert len(preview["images"]) == 8 and preview["dropped"] == []


def test_rerun_does_nothing_and_undo_removes_build(sample_dataset, tmp_path, cli_runner):
    out = tmp_path / "out"
    args = ["bucket", str(sample_dataset), "-o", str(out), "--token", "tok", "--repeats", "3"]
    first = cli_runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert first.output.startswith("bucket: 8 changed, 0 skipped, 0 failed\n")
    assert "3_tok: 8 images x 3 repeats = 24 samples/epoch" in first.output
    second = cli_runner.invoke(cli, args)
    assert second.output.startswith("bucket: 0 changed, 8 skipped, 0 failed\n")
    assert cli_runner.invoke(cli, ["undo", str(out)]).exit_code == 0
    assert not (out / "img" / "3_tok").exists() or not any((out / "img" / "3_tok").iterdir())
    assert len(list(sample_dataset.glob("*.jpg"))) == 3  # originals still there


def test_tiers_reg_and_balance(tmp_path):
    data = tmp_path / "data"
    for folder, n in (("high quality", 2), ("low quality", 4)):
        (data / folder).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (512, 768), (i * 40, 0, 0)).save(data / folder / f"{i}.png")
    reg = tmp_path / "reg" / "woman"
    reg.mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (512, 512), (0, i * 40, 0)).save(reg / f"r{i}.png")
    out = tmp_path / "out"
    opts = BucketOptions(out=out, token="tok", tiers={"high quality": 40, "low quality": 10}, reg=(reg,))
    res = run_bucket(data, opts)
    assert not res.failed
    names = sorted(p.name for p in (out / "img").iterdir())
    assert names == ["10_tok low quality", "40_tok high quality"]
    # reg repeats balance: 2*40 + 4*10 = 120 train samples over 5 reg images -> 24 repeats
    assert [p.name for p in (out / "reg").iterdir()] == ["24_woman"]
    cfg = tomllib.loads((out / "dataset.toml").read_text())
    subs = [s for ds in cfg["datasets"] for s in ds["subsets"]]
    assert [s.get("is_reg", False) for s in subs].count(True) == 1


def test_repeat_maths():
    assert compute_repeats([10, 40], repeats=5, target_steps=None, batch_size=1, balance=False) == [5, 5]
    assert compute_repeats([10, 40], repeats=5, target_steps=None, batch_size=1, balance=True) == [20, 5]
    assert compute_repeats([10], repeats=None, target_steps=400, batch_size=2, balance=False) == [80]
    assert compute_repeats(
        [10, 20], repeats=None, target_steps=100, batch_size=1, balance=False, fixed=[3, None]
    ) == [3, 4]
    assert balance_reg_repeats(120, [5]) == [24]


def test_dropped_images_are_listed_never_silent(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    Image.new("RGB", (40, 40)).save(data / "speck.png")
    Image.new("RGB", (512, 512)).save(data / "ok.png")
    (data / "broken.png").write_bytes(b"not an image")
    opts = BucketOptions(out=tmp_path / "o", token="t", settings=BucketSettings(no_upscale=True))
    res = run_bucket(data, opts)
    reasons = {f.path.name: f.reason for f in res.failed}
    assert set(reasons) == {"speck.png", "broken.png"}
    assert "smaller than one bucket step" in reasons["speck.png"] and "not an image" in reasons["broken.png"]
    assert res.changed == 1


def test_mask_of_wrong_size_drops_its_image_with_the_reason(sample_dataset, tmp_path):
    (sample_dataset / "masks").mkdir()
    Image.new("L", (10, 10), 255).save(sample_dataset / "masks" / "a_landscape.png")
    res = run_bucket(sample_dataset, BucketOptions(out=tmp_path / "o", token="t"))
    assert [(f.path.name, f.reason) for f in res.failed] == [
        (
            "a_landscape.jpg",
            f"{sample_dataset / 'masks' / 'a_landscape.png'}: mask is 10x10 but its image a_landscape.jpg is 768x512",
        )
    ]
    assert res.changed == 7 and not (tmp_path / "o" / "img" / "1_t" / "a_landscape.jpg").exists()


def test_cli_errors(sample_dataset, tmp_path, cli_runner):
    res = cli_runner.invoke(cli, ["bucket", str(sample_dataset), "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and "no class token" in res.output and "--token" in res.output
    res = cli_runner.invoke(
        cli, ["bucket", str(sample_dataset), "-o", str(sample_dataset / "o"), "--token", "t"]
    )
    assert res.exit_code == 1 and "inside the dataset" in res.output
    res = cli_runner.invoke(
        cli, ["bucket", str(sample_dataset), "-o", str(tmp_path / "o"), "--token", "t", "--step", "48"]
    )
    assert res.exit_code == 1 and "not a multiple of 32" in res.output


def test_two_folders_never_merge_into_one_output_folder(tmp_path):
    """a/good and b/good both become `1_tok good`: same-named images would overwrite each other."""
    data = tmp_path / "data"
    for folder, colour in (("a/good", (200, 0, 0)), ("b/good", (0, 200, 0)), ("c", (0, 0, 200))):
        (data / folder).mkdir(parents=True)
        Image.new("RGB", (512, 512), colour).save(data / folder / "001.png")
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as err:
        run_bucket(data, BucketOptions(out=out, token="tok"))
    assert (
        f"{data / 'a' / 'good'} and {data / 'b' / 'good'} would both become {out / 'img' / '1_tok good'}"
        in str(err.value)
    )
    assert "different names" in err.value.hint
    assert not out.exists()


def test_same_name_in_two_subfolders_of_a_reg_folder_is_listed_not_overwritten(tmp_path):
    data, reg = tmp_path / "data", tmp_path / "reg" / "woman"
    data.mkdir()
    Image.new("RGB", (512, 512)).save(data / "x.png")
    for sub, colour in (("a", (10, 10, 10)), ("b", (250, 250, 250))):
        (reg / sub).mkdir(parents=True)
        Image.new("RGB", (512, 512), colour).save(reg / sub / "r.png")
    Image.new("RGB", (512, 512)).save(reg / "b" / "s.png")
    out = tmp_path / "out"
    res = run_bucket(data, BucketOptions(out=out, token="tok", reg=(reg,)))
    assert [(f.path, f.reason) for f in res.failed] == [
        (
            reg / "b" / "r.png",
            f"another image of {reg} (in another subfolder) is also named r.png and both would land in "
            f"{next((out / 'reg').iterdir()).name}/: rename one",
        )
    ]
    (placed,) = (out / "reg").iterdir()
    assert sorted(p.name for p in placed.glob("*.png")) == ["r.png", "s.png"]
    assert Image.open(placed / "r.png").getpixel((0, 0)) == (10, 10, 10)  # the first one, kept
