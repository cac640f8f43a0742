"""The trainer's data pipeline: sources, captions, buckets, masks, size conditioning, batches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdprep.buckets import BucketSettings, assign_bucket, make_buckets
from sdprep.errors import ConfigError, DatasetError
from sdprep.images import image_size
from sdprep.train.config.schema import TrainConfig
from sdprep.train.data.captions import CaptionOptions, process_caption
from sdprep.train.data.pipeline import build_dataset, sample_rng
from sdprep.train.data.transforms import kohya_crop_ltrb, size_conditioning

torch.set_num_threads(1)
SMALL = dict(resolution=(512, 512), min_bucket_reso=256, max_bucket_reso=1024, seed=7)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**SMALL, **kw})


def _img(path: Path, size: tuple[int, int], color=(120, 80, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture
def db_root(tmp_path: Path, sample_dataset: Path) -> Path:
    """train/10_mytoken (5 sample images, one caption), train/junk, a stray image, reg/1_person (3 images)."""
    root = tmp_path / "train"
    concept = root / "10_mytoken"
    concept.mkdir(parents=True)
    for name in ["a_landscape.jpg", "b_portrait.png", "c_square.webp", "f_transparent.png", "g_tiny.png"]:
        shutil.copy(sample_dataset / name, concept / name)
    (concept / "a_landscape.txt").write_text("1girl, blue sky, tree\n")
    (root / "junk").mkdir()
    shutil.copy(sample_dataset / "e_sepia.jpg", root / "stray.jpg")
    reg = tmp_path / "reg" / "1_person"
    reg.mkdir(parents=True)
    for name in ["d_greyscale.png", "e_sepia.jpg", "h_wide.jpg"]:
        shutil.copy(sample_dataset / name, reg / name)
    return tmp_path


# -- sources -----------------------------------------------------------------------------------


def test_repeat_folders_class_tokens_and_warnings(db_root: Path):
    ds = build_dataset(_cfg(train_data_dir=db_root / "train"))
    by_name = {r.path.name: r for r in ds.records}
    assert set(by_name) == {
        "a_landscape.jpg",
        "b_portrait.png",
        "c_square.webp",
        "f_transparent.png",
        "g_tiny.png",
    }
    assert all(r.num_repeats == 10 and not r.is_reg for r in ds.records)
    # class tokens only when the image has no caption file (never prepended)
    assert by_name["a_landscape.jpg"].caption == "1girl, blue sky, tree"
    assert by_name["b_portrait.png"].caption == "mytoken"
    notes = "\n".join(ds.findings.notes)
    assert (
        f'warning: ignored folder {db_root / "train" / "junk"}: its name is not "<repeats>_<class tokens>"'
        in notes
    )
    assert "4 of 5 images have no .txt caption file: they train with the class tokens" in notes
    assert (
        db_root / "train" / "stray.jpg",
        "directly in train_data_dir: images must be inside a <repeats>_<tokens> folder",
    ) in ds.findings.dropped


def test_reg_rebalancing_matches_kohya(db_root: Path):
    ds = build_dataset(_cfg(train_data_dir=db_root / "train", reg_data_dir=db_root / "reg"))
    train = sum(r.num_repeats for r in ds.records if not r.is_reg)
    reg = [r.num_repeats for r in ds.records if r.is_reg]
    assert train == 50 and sum(reg) == 50 and reg == [17, 17, 16]
    assert ds.summary().samples_per_epoch == 100


def test_reg_images_beyond_the_training_count_are_listed(tmp_path: Path):
    _img(tmp_path / "t" / "2_tok" / "a.png", (512, 512))
    for i in range(3):
        _img(tmp_path / "r" / "1_cls" / f"r{i}.png", (512, 512))
    ds = build_dataset(_cfg(train_data_dir=tmp_path / "t", reg_data_dir=tmp_path / "r"))
    assert [r.path.name for r in ds.records if r.is_reg] == ["r0.png", "r1.png"]
    assert ds.findings.dropped == [
        (
            tmp_path / "r" / "1_cls" / "r2.png",
            "regularisation image not needed: reg samples already match the training samples",
        )
    ]


def test_repeat_folder_given_directly_and_bare_number(tmp_path: Path):
    _img(tmp_path / "40_tok" / "a.png", (512, 512))
    ds = build_dataset(_cfg(train_data_dir=tmp_path / "40_tok"))
    assert ds.records[0].num_repeats == 40 and ds.records[0].caption == "tok"
    assert "is itself a repeat folder; using it as one subset (40 repeats)" in "\n".join(ds.findings.notes)
    _img(tmp_path / "root" / "3" / "b.png", (512, 512))
    ds = build_dataset(_cfg(train_data_dir=tmp_path / "root"))
    assert ds.records[0].num_repeats == 3 and ds.records[0].caption == ""


def test_no_repeat_folders_is_a_clear_error(tmp_path: Path):
    _img(tmp_path / "images" / "plain" / "a.png", (512, 512))
    with pytest.raises(ConfigError, match="no <repeats>_<class tokens> folders found"):
        build_dataset(_cfg(train_data_dir=tmp_path / "images"))


def _toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_dataset_toml_typo_suggests_the_key(db_root: Path):
    toml = _toml(
        db_root / "ds.toml",
        f'[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "{db_root / "train" / "10_mytoken"}"\nnum_repeat = 3\n',
    )
    with pytest.raises(ConfigError) as err:
        build_dataset(_cfg(dataset_config=toml))
    assert err.value.message == f'{toml}: unknown key "datasets[0].subsets[0].num_repeat"'
    assert err.value.hint == 'did you mean "num_repeats"?'


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "[general]\nimage_dir = 'x'\n[[datasets]]\n",
            '"image_dir" is only valid in [[datasets.subsets]], not in general',
        ),
        ("[genral]\n[[datasets]]\n", 'unknown table "genral"'),
        (
            "[general]\nflip_aug = 'maybe'\n[[datasets]]\n",
            "general.flip_aug: expected true or false, got 'maybe'",
        ),
        (
            "[[datasets]]\nresolution = -5\n[[datasets.subsets]]\nimage_dir = 'x'\n",
            "datasets[0]: resolution must be positive, got -5x-5",
        ),
        (
            "[[datasets]]\nbatch_size = 0\n[[datasets.subsets]]\nimage_dir = 'x'\n",
            "datasets[0]: batch_size must be at least 1, got 0",
        ),
    ],
)
def test_dataset_toml_strictness(tmp_path: Path, text: str, message: str):
    toml = _toml(tmp_path / "ds.toml", text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_dataset(_cfg(dataset_config=toml))


def test_dataset_toml_unsupported_and_mixed(tmp_path: Path):
    _img(tmp_path / "imgs" / "a.png", (512, 512))
    (tmp_path / "meta.json").write_text("{}")
    color = _toml(
        tmp_path / "c.toml", "[[datasets]]\ncolor_aug = true\n[[datasets.subsets]]\nimage_dir = 'imgs'\n"
    )
    assert build_dataset(_cfg(dataset_config=color)).subsets[0].color_aug  # implemented: accepted
    warm = _toml(
        tmp_path / "w.toml", "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'imgs'\ntoken_warmup_step = 5\n"
    )
    with pytest.raises(ConfigError, match="token_warmup_step is not supported by sdprep"):
        build_dataset(_cfg(dataset_config=warm))
    mixed = _toml(
        tmp_path / "m.toml",
        f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'imgs'}'\n"
        f"[[datasets.subsets]]\nmetadata_file = '{tmp_path / 'meta.json'}'\n",
    )
    with pytest.raises(ConfigError, match="mixes fine-tuning subsets"):
        build_dataset(_cfg(dataset_config=mixed))


def test_value_lookup_order_subset_dataset_general_config(tmp_path: Path):
    for d in ("s1", "s2", "s3"):
        _img(tmp_path / d / "a.png", (512, 512))
        (tmp_path / d / "a.txt").write_text("x")
        (tmp_path / d / "a.cap").write_text("y")
    toml = _toml(
        tmp_path / "ds.toml",
        "[general]\ncaption_extension = '.cap'\nflip_aug = true\n"
        "[[datasets]]\nresolution = [512, 512]\nbatch_size = 3\nkeep_tokens = 2\n"
        "[[datasets.subsets]]\nimage_dir = 's1'\nnum_repeats = 4\ncaption_extension = '.txt'\n"
        "[[datasets.subsets]]\nimage_dir = 's2'\nkeep_tokens = 5\n"
        "[[datasets.subsets]]\nimage_dir = 's3'\n",
    )
    ds = build_dataset(_cfg(dataset_config=toml, train_batch_size=9, shuffle_caption=True))
    s1, s2, s3 = ds.subsets
    assert (s1.num_repeats, s2.num_repeats) == (4, 1)  # subset, then kohya's default (config has none)
    assert (s1.caption_extension, s2.caption_extension) == (".txt", ".cap")  # subset beats general
    assert (s1.captions.keep_tokens, s2.captions.keep_tokens) == (2, 5)  # dataset value, subset override
    assert all(s.flip_aug for s in ds.subsets) and all(s.captions.shuffle_caption for s in ds.subsets)
    assert ds.datasets[0].batch_size == 3  # dataset beats a train_batch_size the config did not set
    assert [r.caption for r in ds.records] == ["x", "y", "y"]
    assert s3.image_dir == tmp_path / "s3"  # relative paths: from the TOML's folder when not from the cwd


def test_metadata_json_key_resolution(tmp_path: Path):
    imgs = tmp_path / "imgs"
    for name in ["full.png", "rel.png", "stem.png", "unlisted.png"]:
        _img(imgs / name, (512, 512))
    meta = {
        str(imgs / "full.png"): {"caption": "a full", "tags": "t1, t2"},
        "rel.png": {"tags": "only tags"},
        "stem": {"caption": "by stem"},
        "gone.png": {"caption": "missing"},
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    toml = _toml(
        tmp_path / "ds.toml",
        f"[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = '{imgs}'\nmetadata_file = '{tmp_path / 'meta.json'}'\n",
    )
    ds = build_dataset(_cfg(dataset_config=toml))
    got = {r.path.name: r.caption for r in ds.records}
    assert got == {"full.png": "a full,t1, t2", "rel.png": "only tags", "stem.png": "by stem"}
    dropped = {p.name: why for p, why in ds.findings.dropped}
    assert dropped["unlisted.png"] == "not listed in metadata_file meta.json"
    assert dropped["gone.png"].startswith("listed in meta.json but no such image")
    assert "1 keys are stem-only" in "\n".join(ds.findings.notes)


def test_in_json_with_train_data_dir(tmp_path: Path):
    _img(tmp_path / "imgs" / "a.png", (512, 512))
    (tmp_path / "m.json").write_text(json.dumps({"a.png": {"caption": "hello"}}))
    ds = build_dataset(_cfg(train_data_dir=tmp_path / "imgs", in_json=tmp_path / "m.json", dataset_repeats=3))
    assert [(r.caption, r.num_repeats) for r in ds.records] == [("hello", 3)]


def test_sdprep_bucket_output_is_read_through_its_toml(tmp_path: Path):
    out = tmp_path / "out"
    concept = out / "img" / "5_tok"
    _img(concept / "a.png", (512, 512))
    (concept / "a.txt").write_text("tok, cat")
    Image.new("L", (512, 512), 255).save((concept / "masks").mkdir() or concept / "masks" / "a.png")
    (out / "dataset.toml").write_text(
        "[general]\ncaption_extension = '.txt'\n[[datasets]]\nresolution = [512, 512]\nenable_bucket = true\n"
        f"[[datasets.subsets]]\nimage_dir = '{concept}'\nnum_repeats = 5\nconditioning_data_dir = '{concept / 'masks'}'\n"
    )
    ds = build_dataset(_cfg(train_data_dir=out, masked_loss=True))
    (rec,) = ds.records
    assert rec.num_repeats == 5 and rec.caption == "tok, cat" and rec.mask_path == concept / "masks" / "a.png"
    assert "is an `sdprep bucket` output" in "\n".join(ds.findings.notes)


# -- nothing dropped silently ------------------------------------------------------------------


def test_every_image_is_used_or_listed_with_a_reason(tmp_path: Path, sample_dataset: Path):
    concept = tmp_path / "t" / "2_tok"
    concept.mkdir(parents=True)
    for p in sample_dataset.glob("*"):
        if p.suffix != ".json":
            shutil.copy(p, concept / p.name)
    (concept / "broken.png").write_bytes(b"not an image")
    _img(concept / "speck.png", (40, 40))
    (concept / "bad_caption.png").write_bytes((concept / "c_square.webp").read_bytes())
    (concept / "bad_caption.txt").write_bytes(b"\xff\xfe bad")
    (concept / "c_square.txt").write_text("\n")
    ds = build_dataset(_cfg(train_data_dir=tmp_path / "t", bucket_no_upscale=True))
    used = {r.path for r in ds.records}
    dropped = dict(ds.findings.dropped)
    assert used | set(dropped) == {p for p in concept.iterdir() if p.suffix != ".txt"}
    assert not used & set(dropped)
    assert dropped[concept / "speck.png"] == "40x40 is smaller than one bucket step (64 px) on a side"
    assert dropped[concept / "broken.png"] == "not an image, or an unsupported format"
    assert dropped[concept / "bad_caption.png"].startswith("caption unreadable: not UTF-8 text")
    assert f"note: {concept}: 1 caption files are empty: those images train uncaptioned" in ds.findings.notes
    text = str(ds.summary())
    assert f"dropped: 3 images not used:\n  {concept / 'bad_caption.png'}: caption unreadable" in text


# -- captions ----------------------------------------------------------------------------------


def test_caption_processing_matches_kohya_rules():
    rng = np.random.default_rng(0)
    plain = CaptionOptions(caption_prefix="pre", caption_suffix="suf")
    assert process_caption("a, b\nsecond line", plain, rng) == "pre a, b"
    keep = CaptionOptions(shuffle_caption=True, keep_tokens=2, caption_tag_dropout_rate=1.0)
    assert process_caption("tok, 1girl, a, b, c", keep, rng) == "tok, 1girl"
    sep = CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||", caption_tag_dropout_rate=1.0)
    assert process_caption("tok, style ||| a, b ||| end, last", sep, rng) == "tok, style, end, last"
    every = CaptionOptions(caption_dropout_every_n_epochs=2)
    assert [process_caption("x", every, rng, e) for e in (1, 2, 3, 4)] == ["x", "", "x", ""]
    sec = CaptionOptions(shuffle_caption=True, secondary_separator=";;;", keep_tokens=1)
    out = process_caption("a, b;;;c, d", sec, np.random.default_rng(1))
    assert out.startswith("a, ") and "b,c" in out and sorted(out.split(", ")) == ["a", "b,c", "d"]
    wild = CaptionOptions(enable_wildcard=True)
    assert process_caption("{red|red} hair, {{x}}", wild, rng) == "red hair, {x}"


def test_captions_are_deterministic_per_seed_epoch_and_repeat(db_root: Path):
    cfg = _cfg(
        train_data_dir=db_root / "train", shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.3
    )
    ds1, ds2 = build_dataset(cfg), build_dataset(cfg)
    i = next(i for i, r in enumerate(ds1.records) if r.path.name == "a_landscape.jpg")
    seq1 = [ds1.caption(i, k, e) for e in range(4) for k in range(10)]
    assert seq1 == [ds2.caption(i, k, e) for e in range(4) for k in range(10)]
    assert set(seq1) == {"", "1girl, blue sky, tree", "1girl, tree, blue sky"}  # both orders, and dropout
    assert all(c == "" or c.startswith("1girl, ") for c in seq1)
    ds3 = build_dataset(cfg, seed=8)
    assert seq1 != [ds3.caption(i, k, e) for e in range(4) for k in range(10)]


# -- buckets, crops, masks ----------------------------------------------------------------------


def test_bucket_assignment_equals_sdprep_buckets(db_root: Path):
    cfg = _cfg(train_data_dir=db_root / "train", resolution=(512, 512), max_bucket_reso=1024)
    ds = build_dataset(cfg)
    settings = BucketSettings(resolution=(512, 512), step=64, min_side=256, max_side=1024)
    buckets = make_buckets(settings)
    for r in ds.records:
        assert r.assignment == assign_bucket(*image_size(r.path), settings, buckets)
    ds_fixed = build_dataset(_cfg(train_data_dir=db_root / "train", enable_bucket=False))
    assert {r.assignment.bucket for r in ds_fixed.records} == {(512, 512)}


def test_size_conditioning_for_a_known_image(tmp_path: Path):
    # 600x512 at 512x512 area: bucket 576x448 (closest aspect ratio), scaled by 0.96 to 576x492
    _img(tmp_path / "t" / "1_tok" / "a.png", (600, 512))
    ds = build_dataset(_cfg(train_data_dir=tmp_path / "t"))
    (rec,) = ds.records
    assert rec.assignment.bucket == (576, 448) and rec.assignment.resized == (576, 492)
    batch = next(ds.batches(0))
    assert batch["original_size"].tolist() == [[512, 600]]
    # kohya's get_crop_ltrb: fitted inside the bucket the image is 525 wide: left (576-525)//2 = 25
    assert batch["crop_top_left"].tolist() == [[0, 25]]
    assert batch["target_size"].tolist() == [[448, 576]]
    assert batch["time_ids"].tolist() == [[512, 600, 0, 25, 448, 576]]
    assert kohya_crop_ltrb((576, 448), (600, 512)) == (25.0, 0.0, 550.0, 448.0)
    assert size_conditioning((600, 512), (576, 448), flipped=True) == ((512, 600), (0, 26), (448, 576))
    assert batch["pixels"].shape == (1, 3, 448, 576) and batch["mask"] is None


def _rect_image(folder: Path, mask_dir: Path, size=(600, 400), rect=(250, 100, 400, 300)) -> None:
    """An image with a red rectangle on grey, and a mask that is white exactly on that rectangle."""
    arr = np.full((size[1], size[0], 3), 128, np.uint8)
    mask = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = rect
    arr[y0:y1, x0:x1] = (255, 0, 0)
    mask[y0:y1, x0:x1] = 255
    folder.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(folder / "rect.png")
    Image.fromarray(mask).save(mask_dir / "rect.png")


def test_mask_is_resized_cropped_and_flipped_exactly_like_its_image(tmp_path: Path):
    concept = tmp_path / "t" / "4_tok"
    _rect_image(concept, concept / "masks")
    ds = build_dataset(_cfg(train_data_dir=tmp_path / "t", masked_loss=True, flip_aug=True, random_crop=True))
    assert ds.records[0].mask_path == concept / "masks" / "rect.png"
    seen_flips = set()
    for epoch in range(3):
        for batch in ds.batches(epoch):
            red = batch["pixels"][:, 0] > 0.9
            green_low = batch["pixels"][:, 1] < -0.9
            inside = batch["mask"][:, 0] > 0.99
            outside = batch["mask"][:, 0] < 0.01
            assert inside.sum() > 1000
            assert (red & green_low)[inside].all() and not (red & green_low)[outside].any()
            seen_flips.update(batch["flipped"])
    assert seen_flips == {True, False}
    summary = ds.summary()
    assert summary.masked == 1 and summary.mask_coverage == pytest.approx(150 * 200 / (600 * 400), abs=1e-6)


def test_alpha_mask_and_unused_mask_notes(db_root: Path, tmp_path: Path):
    ds = build_dataset(_cfg(train_data_dir=db_root / "train", alpha_mask=True))
    rec = next(r for r in ds.records if r.path.name == "f_transparent.png")
    assert rec.alpha_mask and rec.coverage == pytest.approx(0.2904, abs=1e-3)
    assert "masks: 5 of 5 images have masks" in str(ds.summary())
    concept = tmp_path / "m" / "1_tok"
    _rect_image(concept, concept / "masks")
    ds = build_dataset(_cfg(train_data_dir=tmp_path / "m"))
    assert not ds.has_masks
    assert "warning: 1 images have mask files but masked_loss is off: the masks are NOT used" in "\n".join(
        ds.findings.notes
    )


def test_wrong_size_mask_is_an_error_naming_the_file(tmp_path: Path):
    concept = tmp_path / "t" / "1_tok"
    _img(concept / "a.png", (512, 512))
    (concept / "masks").mkdir()
    Image.new("L", (256, 256), 255).save(concept / "masks" / "a.png")
    with pytest.raises(DatasetError) as err:
        build_dataset(_cfg(train_data_dir=tmp_path / "t", masked_loss=True))
    assert (
        f"{concept / 'masks' / 'a.png'}: mask is 256x256 but its image a.png is 512x512" in err.value.message
    )


def test_conditioning_dir_without_matching_masks_is_an_error(tmp_path: Path):
    _img(tmp_path / "imgs" / "a.png", (512, 512))
    (tmp_path / "cond").mkdir()
    toml = _toml(
        tmp_path / "ds.toml",
        "[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = 'imgs'\nconditioning_data_dir = 'cond'\n",
    )
    with pytest.raises(ConfigError, match="no mask in .* matches any image"):
        build_dataset(_cfg(dataset_config=toml, masked_loss=True))


# -- batches ------------------------------------------------------------------------------------


def _fingerprint(batch: dict) -> tuple:
    return (
        tuple(batch["slots"]),
        tuple(batch["captions"]),
        tuple(batch["flipped"]),
        float(batch["pixels"].sum()),
    )


def test_resume_skip_gives_the_same_remaining_batches(db_root: Path):
    cfg = _cfg(
        train_data_dir=db_root / "train",
        reg_data_dir=db_root / "reg",
        train_batch_size=3,
        shuffle_caption=True,
        flip_aug=True,
        caption_tag_dropout_rate=0.2,
        resolution=(256, 256),
        min_bucket_reso=128,
        max_bucket_reso=512,
    )
    full = [_fingerprint(b) for b in build_dataset(cfg).batches(1)]
    resumed = [_fingerprint(b) for b in build_dataset(cfg).batches(1, skip=5)]  # a new process
    assert resumed == full[5:]
    prefetched = [_fingerprint(b) for b in build_dataset(cfg).batches(1, skip=5, prefetch=2)]
    assert prefetched == full[5:]
    other_epoch = [_fingerprint(b) for b in build_dataset(cfg).batches(2)]
    assert other_epoch != full


def test_plan_groups_by_bucket_covers_every_sample_and_shards_split_global_batches(db_root: Path):
    ds = build_dataset(
        _cfg(train_data_dir=db_root / "train", reg_data_dir=db_root / "reg", train_batch_size=2)
    )
    plan = ds.plan(0)
    assert len(plan) == ds.steps_per_epoch() == ds.summary().steps_per_epoch
    flat = sorted(s for b in plan for s in b)
    assert flat == sorted((i, k) for i, r in enumerate(ds.records) for k in range(r.num_repeats))
    assert all(len({ds.records[i].assignment.bucket for i, _ in b}) == 1 for b in plan)
    assert all(len(b) <= 2 for b in plan)
    # two processes at batch 1 see, step by step, the halves of the one-process batch-2 plan
    ds1 = build_dataset(
        _cfg(train_data_dir=db_root / "train", reg_data_dir=db_root / "reg", train_batch_size=1)
    )
    p0, p1 = ds1.plan(0, num_shards=2, shard=0), ds1.plan(0, num_shards=2, shard=1)
    assert len(p0) == len(p1) == len(plan)
    for whole, a, b in zip(plan, p0, p1):
        assert a + b == whole or (len(whole) == 1 and a == b == whole)


def test_batch_fields_loss_weight_and_reg(db_root: Path):
    cfg = _cfg(
        train_data_dir=db_root / "train",
        reg_data_dir=db_root / "reg",
        prior_loss_weight=0.25,
        train_batch_size=4,
    )
    ds = build_dataset(cfg)
    for batch in ds.batches(0):
        assert batch["loss_weight"].tolist() == [0.25 if r else 1.0 for r in batch["is_reg"].tolist()]
        assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1
        assert batch["pixels"].shape[0] == len(batch["captions"]) == len(batch["paths"])
    freq = ds.tag_frequency()
    assert freq["10_mytoken"]["1girl"] == 1 and freq["10_mytoken"]["mytoken"] == 4
    assert ds.dataset_dirs()["1_person"] == {"n_repeats": 1, "img_count": 3}


def test_sample_rng_depends_only_on_its_keys():
    a = sample_rng(7, 1, 2, 3).random(4)
    assert np.array_equal(a, sample_rng(7, 1, 2, 3).random(4))
    assert not np.array_equal(a, sample_rng(7, 1, 2, 4).random(4))
    assert sample_rng(-1, 0).random() == sample_rng(2**64 - 1, 0).random()


def test_seed_001_dataset_tomls_are_accepted_as_written(tmp_path: Path):
    """Seed 001's fine-tune and masked-LoRA dataset TOMLs, with only the /mnt/g prefix moved."""
    mnt = tmp_path / "mnt" / "g"
    final = mnt / "grabber" / "zhuoyue" / "final"
    config = mnt / "loraimages" / "zhuoyueai" / "config"
    config.mkdir(parents=True)
    for i, name in enumerate(["1010_BMT", "1010_SCS", "1200_yuai", "1200_zhuoyue"], 1):
        img = _img(final / name / "p.png", (1024, 1024))
        meta = config / f"{name}{i}.json"
        meta.write_text(json.dumps({str(img): {"caption": "zhuoyue", "tags": "1boy"}}))
    finetune = (
        "[general]\nshuffle_caption = false\nenable_bucket = true\n\n[[datasets]]\nresolution = 1024\n"
        '[[datasets.subsets]]\nimage_dir = "/mnt/g/grabber/zhuoyue/final/1010_BMT"\n'
        'metadata_file = "/mnt/g/loraimages/zhuoyueai/config/1010_BMT1.json"\nnum_repeats = 10\n\n'
        '[[datasets.subsets]]\nimage_dir = "/mnt/g/grabber/zhuoyue/final/1010_SCS"\n'
        'metadata_file = "/mnt/g/loraimages/zhuoyueai/config/1010_SCS2.json"\nnum_repeats = 10\n\n'
        '[[datasets.subsets]]\nimage_dir = "/mnt/g/grabber/zhuoyue/final/1200_yuai"\n'
        'metadata_file = "/mnt/g/loraimages/zhuoyueai/config/1200_yuai3.json"\nnum_repeats = 200\n\n'
        '[[datasets.subsets]]\nimage_dir = "/mnt/g/grabber/zhuoyue/final/1200_zhuoyue"\n'
        'metadata_file = "/mnt/g/loraimages/zhuoyueai/config/1200_zhuoyue4.json"\nnum_repeats = 200\n'
    )
    toml = _toml(tmp_path / "ft.toml", finetune.replace("/mnt/g", str(mnt)))
    ds = build_dataset(TrainConfig(dataset_config=toml, seed=1))
    assert [r.num_repeats for r in ds.records] == [10, 10, 200, 200]
    assert {r.caption for r in ds.records} == {"zhuoyue,1boy"}
    assert ds.datasets[0].resolution == (1024, 1024) and ds.datasets[0].enable_bucket

    cond = final / "1200_zhuoyue" / "conditioning"
    cond.mkdir()
    Image.new("L", (1024, 1024), 255).save(cond / "p.png")
    masked = (
        "[general]\nshuffle_caption = false\nenable_bucket = true\n\n[[datasets]]\nresolution = 1024\n\n"
        "[[datasets.subsets]]\n"
        'image_dir = "/mnt/g/grabber/zhuoyue/final/1200_zhuoyue"\n'
        "caption_extension = '.txt'\n"
        'conditioning_data_dir = "/mnt/g/grabber/zhuoyue/final/1200_zhuoyue/conditioning"\n'
        "num_repeats = 100\n"
    )
    toml = _toml(tmp_path / "mask.toml", masked.replace("/mnt/g", str(mnt)))
    ds = build_dataset(TrainConfig(dataset_config=toml, masked_loss=True, seed=1))
    (rec,) = ds.records
    assert rec.mask_path == cond / "p.png" and rec.num_repeats == 100
    assert str(ds.summary()).count("masks: 1 of 1 images have masks, mean coverage 100.0%") == 1


def test_conditioning_data_dir_in_the_training_config_is_used_not_ignored(tmp_path: Path):
    """kohya silently ignores a mask folder given beside train_data_dir; sdprep uses it."""
    concept = tmp_path / "t" / "2_tok"
    _rect_image(concept, tmp_path / "cond")
    ds = build_dataset(
        _cfg(train_data_dir=tmp_path / "t", conditioning_data_dir=tmp_path / "cond", masked_loss=True)
    )
    assert ds.records[0].mask_path == tmp_path / "cond" / "rect.png"
    assert next(ds.batches(0))["mask"].shape == (1, 1, 384, 640)


def test_one_precedence_rule_config_over_dataset_toml(tmp_path: Path):
    """command line > config > dataset TOML > defaults for the run's settings (resolution, batch,
    buckets), each override noted; an image folder's settings (captions, repeats) stay the dataset
    TOML's, the more specific place (kohya's lookup)."""
    from sdprep.train.config.schema import load_train_config

    _img(tmp_path / "s1" / "a.png", (512, 512))
    _img(tmp_path / "f" / "1_tok" / "a.png", (512, 512))
    (tmp_path / "s1" / "a.cap").write_text("from the cap file")
    toml = _toml(
        tmp_path / "ds.toml",
        "[general]\nbatch_size = 3\n[[datasets]]\nresolution = 1024\nmax_bucket_reso = 2048\n"
        "[[datasets.subsets]]\nimage_dir = 's1'\ncaption_extension = '.cap'\nnum_repeats = 4\n",
    )
    config = _toml(
        tmp_path / "train.toml", f"dataset_config = '{toml}'\nresolution = 768\ncaption_extension = '.txt'\n"
    )
    cfg, _ = load_train_config(config, overrides={"train_batch_size": 2})
    ds = build_dataset(cfg)
    spec = ds.datasets[0]
    assert spec.resolution == (768, 768) and spec.batch_size == 2 and spec.max_bucket_reso == 2048
    notes = "\n".join(ds.findings.notes)
    assert (
        f"note: resolution = 768x768 from {config} overrides ds.toml: datasets[0]'s resolution = 1024x1024 "
        "(command line > config > dataset TOML > defaults; kohya would use the dataset TOML's)" in notes
    )
    assert (
        "train_batch_size = 2 from the command line overrides ds.toml: datasets[0]'s batch_size = 3" in notes
    )
    assert (
        "note: sdprep defaults where kohya's differ (set them to choose): enable_bucket = true (kohya: false)"
        in notes
    )
    assert ds.subsets[0].caption_extension == ".cap" and ds.subsets[0].num_repeats == 4
    assert ds.records[0].caption == "from the cap file"
    # unset in the config: the dataset TOML's values, nothing noted
    quiet = build_dataset(load_train_config(None, overrides={"dataset_config": str(toml)})[0])
    assert quiet.datasets[0].resolution == (1024, 1024) and quiet.datasets[0].batch_size == 3
    assert not any("overrides" in n for n in quiet.findings.notes)
    assert (  # the subset sets caption_extension: only enable_bucket falls to sdprep's default
        "note: sdprep defaults where kohya's differ (set them to choose): enable_bucket = true (kohya: false)"
        in quiet.findings.notes
    )
    folders = build_dataset(load_train_config(None, overrides={"train_data_dir": str(tmp_path / "f")})[0])
    assert (
        "note: sdprep defaults where kohya's differ (set them to choose): enable_bucket = true (kohya: false); "
        'max_bucket_reso = 2048 (kohya: 1024); caption_extension = ".txt" (kohya: ".caption")'
        in folders.findings.notes
    )


def test_images_sharing_a_stem_are_left_out_with_the_reason(tmp_path: Path):
    """kohya would train a.png and a.jpg with the one a.txt: both are listed, as sdprep bucket does."""
    folder = tmp_path / "2_tok"
    _img(folder / "a.png", (512, 512), (200, 10, 10))
    _img(folder / "a.jpg", (512, 512), (10, 10, 200))
    _img(folder / "b.png", (512, 512))
    (folder / "a.txt").write_text("tok, red\n")
    ds = build_dataset(_cfg(train_data_dir=tmp_path))
    assert [r.path.name for r in ds.records] == ["b.png"]
    reason = (
        'a.jpg and a.png share the stem "a", so they would share one caption file and one mask; '
        "rename one of them (sdprep rename)"
    )
    assert ds.findings.dropped == [(folder / "a.jpg", reason), (folder / "a.png", reason)]


def test_sdprep_defaults_are_train_configs_and_kohyas_table_only_names_where_they_differ():
    """One table of sdprep defaults (TrainConfig's); kohya's dataset-TOML defaults only fill keys
    TrainConfig lacks and name where the two differ, in TrainConfig's order."""
    import dataclasses

    from sdprep.train.config.datasets import CFG_NAMES, KOHYA_DEFAULTS, _lookup, sdprep_defaults

    assert sdprep_defaults() == {"enable_bucket": True, "max_bucket_reso": 2048, "caption_extension": ".txt"}
    assert list(sdprep_defaults()) == ["enable_bucket", "max_bucket_reso", "caption_extension"]
    cfg = TrainConfig()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, kohya in KOHYA_DEFAULTS.items():
        name = CFG_NAMES.get(key, key)
        expected = getattr(cfg, name) if name in fields else kohya
        assert _lookup(key, [], cfg) == expected, key
        assert _lookup(key, [{key: "from the TOML"}], cfg) == "from the TOML"  # a dataset TOML beats defaults


def test_a_subset_without_image_dir_or_metadata_file_is_a_config_error():
    """Only a programmatic spec can lack both (the TOML loader requires image_dir): a named error,
    not an AttributeError on None."""
    from sdprep.progress import NullReporter
    from sdprep.train.config.datasets import DatasetSpec, Findings, SubsetSpec
    from sdprep.train.data.scan import scan_sources

    spec = DatasetSpec(subsets=(SubsetSpec(image_dir=None, origin="subset 1"),), resolution=(64, 64))
    with pytest.raises(ConfigError, match="subset 1: image_dir is required"):
        scan_sources([spec], TrainConfig(), Findings(), NullReporter())
