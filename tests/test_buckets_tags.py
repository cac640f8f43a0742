from pathlib import Path

import pytest
from PIL import Image

from sdprep.buckets import BucketSettings, assign_bucket, make_buckets
from sdprep.tags import TagMatcher, dedupe, escape_parentheses, remove_underscore, tag_key


def test_kohya_default_buckets_only_have_1024_sides():
    # kohya-formats.md: with max_bucket_reso 1024, SDXL gets only buckets with a 1024 side
    buckets = make_buckets(BucketSettings(max_side=1024))
    assert (1024, 1024) in buckets
    assert all(1024 in b for b in buckets if b != (1024, 1024))


def test_sdxl_buckets_with_2048_max():
    buckets = make_buckets(BucketSettings())
    for b in [(832, 1216), (896, 1152), (1216, 832), (1024, 1024), (768, 1280)]:
        assert b in buckets
    assert all(w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)


def test_assign_portrait_2_3():
    a = assign_bucket(1024, 1536)
    assert a.bucket == (832, 1216)
    assert a.resized[0] >= 832 and a.resized[1] >= 1216
    left, t, r, b = a.crop_ltrb
    assert (r - left, b - t) == a.bucket and not a.upscaled and a.dropped is None


def test_assign_small_image_is_upscaled_and_reported():
    a = assign_bucket(200, 150)
    assert a.upscaled and a.scale > 5


def test_no_upscale_keeps_small_images_floored_to_step():
    s = BucketSettings(no_upscale=True)
    a = assign_bucket(200, 150, s)
    assert a.bucket == (192, 128) and a.resized == (200, 150) and not a.upscaled
    big = assign_bucket(3000, 2000, s)
    assert big.bucket[0] * big.bucket[1] <= 1024 * 1024 and big.bucket[0] % 64 == 0
    assert assign_bucket(40, 40, s).dropped is not None


@pytest.mark.parametrize("tag, expected", [("long_hair", "long hair"), ("^_^", "^_^"), ("a_b", "a_b")])
def test_kohya_underscore_rule(tag, expected):
    assert remove_underscore(tag) == expected


def test_tag_keys_matching_and_dedupe():
    assert tag_key("Blue_Eyes") == tag_key("blue  eyes") == "blue eyes"
    assert escape_parentheses("nazuna (yofukashi)") == r"nazuna \(yofukashi\)"
    assert escape_parentheses(r"a \(b\)") == r"a \(b\)"
    m = TagMatcher(["blue eyes", "*hair*", "re:^braid"])
    assert m.matches("blue_eyes") and not m.matches("light blue eyes")
    assert m.matches("pink hair") and m.matches("braids") and not m.matches("smile")
    assert dedupe(["a", "A", "b", "a_", "c"]) == ["a", "b", "c"]


def test_an_invalid_regex_pattern_is_a_config_error(cli_runner, tmp_path):
    from sdprep.cli import cli
    from sdprep.errors import ConfigError

    with pytest.raises(ConfigError, match=r'invalid regular expression "re:\(\(": missing \)'):
        TagMatcher(["re:(("])
    res = cli_runner.invoke(cli, ["clean", str(tmp_path), "--remove", "re:(("])
    assert res.exit_code == 1 and res.output.startswith('Error: invalid regular expression "re:(("')
    res = cli_runner.invoke(cli, ["gc", str(tmp_path), "--keep", "-1"])
    assert res.exit_code == 2  # a negative count would have deleted every operation
    res = cli_runner.invoke(cli, ["captions", "replace", "", "x", str(tmp_path)])
    assert res.exit_code == 1 and "nothing to replace" in res.output
    res = cli_runner.invoke(cli, ["captions", "sort", str(tmp_path), "--keep-first", "-3"])
    assert res.exit_code == 2
    res = cli_runner.invoke(cli, ["clean", str(tmp_path), "--remove-file", str(tmp_path)])
    assert res.exit_code == 1 and f"{tmp_path}: a folder, not a file of tags" in res.output


def test_bucket_settings_are_checked():
    from sdprep.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"smallest bucket side \(4000\) is larger than the largest \(2048\)"
    ):
        BucketSettings(min_side=4000)
    with pytest.raises(ConfigError, match="bucket sizes must be positive"):
        BucketSettings(min_side=-5)
    with pytest.raises(ConfigError, match="bucket sizes must be positive"):
        BucketSettings(resolution=(0, 1024))


HIDDEN = {
    "nul": "sm\x00ile",
    "zero-width space": "smi\u200ble",
    "zero-width joiner": "smi\u200dle",
    "fullwidth": "\uff53\uff4d\uff49\uff4c\uff45",
    "bidi override": "\u202esmile\u202c",
    "bidi isolate": "\u2066smile\u2069",
    "bom inside": "\ufeffsmile",
    "tag characters": "smile\U000e0041\U000e0042",
    "soft hyphen": "smi\u00adle",
}


@pytest.mark.parametrize("spelling", list(HIDDEN.values()), ids=list(HIDDEN))
def test_a_tag_that_looks_like_another_is_that_tag(spelling: str) -> None:
    """Invisible and fullwidth characters no longer dodge --remove (or dedupe, or stats)."""
    from sdprep.dataset import split_tags

    assert tag_key(spelling) == "smile"
    assert TagMatcher(["smile"]).matches(spelling)
    assert split_tags(f"1girl, {spelling}, solo") == ["1girl", "smile", "solo"]


def test_normalise_text_keeps_what_is_visible() -> None:
    from sdprep.tags import normalise_text

    for text in ("1girl, solo", "café, 日本, ^_^, :3, \\(cosplay\\)", "👩‍💻"[0] + "x", "a\tb\nc"):
        assert normalise_text(text) == text
    assert normalise_text("ｈａｔ，　ｓｍｉｌｅ") == "hat, smile"  # fullwidth comma and ideographic space


@pytest.mark.parametrize("newline", ["\r\n", "\n", "\r", "\u2028"])
def test_line_breaks_separate_tags(newline: str) -> None:
    from sdprep.dataset import split_tags

    assert split_tags(f"1girl, solo{newline}smile, outdoors{newline}") == [
        "1girl",
        "solo",
        "smile",
        "outdoors",
    ]


def test_captions_remove_finds_every_spelling(tmp_path: Path) -> None:
    """`sdprep captions remove smile` over captions with each hidden spelling and a CRLF caption."""
    from sdprep.prep.captions import CaptionsOptions, make_edit, run_edit

    names = {}
    for n, (name, spelling) in enumerate(HIDDEN.items()):
        stem = f"img{n}"
        Image.new("RGB", (8, 8), (n, 0, 0)).save(tmp_path / f"{stem}.png")
        (tmp_path / f"{stem}.txt").write_text(f"1girl, {spelling}, solo\n", encoding="utf-8")
        names[stem] = name
    Image.new("RGB", (8, 8)).save(tmp_path / "crlf.png")
    (tmp_path / "crlf.txt").write_bytes(b"1girl, solo\r\nsmile, outdoors\r\n")
    result = run_edit([tmp_path], make_edit("remove", ("smile",)), CaptionsOptions())
    assert result.ok and result.changed == len(HIDDEN) + 1
    for stem, name in names.items():
        assert (tmp_path / f"{stem}.txt").read_text(encoding="utf-8") == "1girl, solo\n", name
    assert (tmp_path / "crlf.txt").read_bytes() == b"1girl, solo, outdoors\n"
