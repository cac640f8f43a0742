import pytest

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
