"""Pure caption rules (sdprep.prep.rules): each rule alone, their combination, the TOML schema."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import pytest

from sdprep.errors import ConfigError
from sdprep.prep.monochrome import MonochromeSettings
from sdprep.prep.rules import (
    CleanRules,
    Placement,
    RuleSet,
    TagInfo,
    clean_tags,
    combine,
    core_tags,
    folder_tags,
    format_tag,
    load_rules,
    parse_pairs,
    placement_for,
    read_tag_file,
    remove_matching,
    replace_tags,
    sidecar_info,
    sidecar_tags,
    sort_tags,
)
from sdprep.tags import TagMatcher, TagPattern


def clean(tags, *, label=None, folder="data", info=None, pruned=frozenset(), count=None, **rules):
    rs = RuleSet(CleanRules(**rules))
    return clean_tags(tags, rs, placement_for(rs, folder, label), info, pruned=pruned, count_tokens=count)


def test_remove_is_whole_tag_exact_glob_regex():
    tags = ["light blue eyes", "blue eyes", "Blue_Eyes", "braided hair", "braid", "long hair", "red_eyes"]
    assert remove_matching(tags, TagMatcher(["blue eyes", "braid"])) == [
        "light blue eyes",
        "braided hair",
        "long hair",
        "red_eyes",
    ]
    assert remove_matching(tags, TagMatcher(["*hair"])) == [
        "light blue eyes",
        "blue eyes",
        "Blue_Eyes",
        "braid",
        "red_eyes",
    ]
    assert remove_matching(tags, TagMatcher(["re:^(red|blue) eyes$"])) == [
        "light blue eyes",
        "braided hair",
        "braid",
        "long hair",
    ]


def test_replace_alias_several_and_removal_and_regex_groups():
    reps = [
        (TagPattern("1girl"), ("girl", "solo")),
        (TagPattern("meme"), ()),
        (TagPattern(r"re:^(\w+) eyes$"), (r"\1 pupils",)),
    ]
    assert replace_tags(["1girl", "meme", "blue eyes", "smile"], reps) == [
        "girl",
        "solo",
        "blue pupils",
        "smile",
    ]


def test_sort_modes():
    tags = ["b", "a", "c", "d"]
    info = TagInfo({"a": 0.5, "b": 0.9, "c": 0.7}, {"a": "general", "b": "meta", "c": "character"})
    assert sort_tags(tags, "as_tagged", info) == tags
    assert sort_tags(tags, "alphabetical", info) == ["a", "b", "c", "d"]
    assert sort_tags(tags, "score", info) == ["b", "c", "a", "d"]  # unscored last
    assert sort_tags(tags, "category", info) == ["c", "a", "b", "d"]  # character, general, meta, unknown
    with pytest.raises(ConfigError, match='unknown sort "size"'):
        sort_tags(tags, "size", info)


def test_format_tag_underscores_and_parentheses():
    assert format_tag("long_hair", "space", False) == "long hair"
    assert format_tag("^_^", "space", False) == "^_^"  # kohya: 3 characters or fewer keep "_"
    assert format_tag("long hair", "underscore", False) == "long_hair"
    assert format_tag("star (sky)", "keep", True) == r"star \(sky\)"
    assert format_tag(r"star \(sky\)", "keep", True) == r"star \(sky\)"


def test_folder_tags_exact_and_glob():
    mapping = {"10_low quality": ("low quality",), "*_high*": ("high quality", "best quality")}
    assert folder_tags(mapping, "10_low quality") == ["low quality"]
    assert folder_tags(mapping, "5_high quality") == ["high quality", "best quality"]
    assert folder_tags(mapping, "1_nazuna") == []


def test_trigger_first_and_moved_and_idempotent():
    out = clean(["1girl", "nazuna", "smile"], trigger=("nazuna",)).tags
    assert out == ["nazuna", "1girl", "smile"]
    assert clean(out, trigger=("nazuna",)).tags == out


def test_seed_rules_combined():
    """Seed 003: trigger first, character tags removed, label appended, nothing else touched."""
    tags = ["1girl", "solo", "pink hair", "blue eyes", "braided hair rings", "braids", "smile"]
    out = clean(
        tags,
        label="monochrome",
        trigger=("nazuna",),
        remove=("braided hair rings", "blue eyes", "pink hair", "1girl", "braids"),
    ).tags
    assert out == ["nazuna", "solo", "smile", "monochrome"]


def test_label_only_added_when_missing_and_goes_after_suffix():
    assert clean(["greyscale", "solo"], label="greyscale").tags == ["greyscale", "solo"]
    rules = {"suffix": {"data": ("low quality",)}}
    once = clean(["solo"], label="greyscale", **rules).tags
    assert once == ["solo", "low quality", "greyscale"]
    assert clean(once, label="greyscale", **rules).tags == once


def test_prefix_keep_first_sort_dedupe_and_placement_order():
    rules = {
        "trigger": ("tok",),
        "prefix": {"10_*": ("high quality",)},
        "suffix": {"10_*": ("end",)},
        "keep_first": 1,
        "sort": "alphabetical",
    }
    tags = ["zeta", "end", "Beta", "alpha", "beta", "high_quality"]
    out = clean(tags, folder="10_best", **rules).tags
    assert out == ["tok", "high quality", "zeta", "alpha", "Beta", "end"]
    assert clean(out, folder="10_best", **rules).tags == out


def test_no_dedupe_keeps_repeats():
    assert clean(["a", "a", "b"], dedupe=False).tags == ["a", "a", "b"]
    assert clean(["a", "A", "b"]).tags == ["a", "b"]


def test_core_tags_threshold_and_protection():
    counts = Counter({"1girl": 10, "pink hair": 7, "smile": 5, "tok": 10, "monochrome": 9})
    rs = RuleSet(CleanRules(trigger=("tok",), keep=("1girl",)))
    assert core_tags(counts, 10, 60, rs.protected) == [("pink hair", 0.7)]
    assert core_tags(counts, 10, 50, lambda k: False)[:2] == [("1girl", 1.0), ("tok", 1.0)]
    assert core_tags(Counter(), 0, 60, rs.protected) == []


def test_pruned_tags_removed_but_not_fixed_ones():
    out = clean(
        ["pink hair", "smile", "pink_hair"], trigger=("tok",), keep_first=0, pruned={"pink hair"}
    ).tags
    assert out == ["tok", "smile"]
    out = clean(["pink hair", "smile"], trigger=("tok",), keep_first=1, pruned={"pink hair"}).tags
    assert out == ["tok", "pink hair", "smile"]


def words(text: str) -> int:
    """A stand-in token counter for pure tests: one token per word and per comma."""
    return len(text.replace(",", " , ").split())


def test_max_tokens_trims_lowest_score_first_never_protected():
    info = TagInfo({"a b": 0.9, "c d": 0.4, "e f": 0.6})
    tags = ["a b", "c d", "e f", "g h"]
    res = clean(tags, info=info, count=words, trigger=("tok",), keep=("g h",), max_tokens=9)
    # full: "tok, a b, c d, e f, g h" = 13 -> drop c d (0.4) = 10 -> drop e f (0.6) = 7
    assert res.tags == ["tok", "a b", "g h"]
    assert res.trimmed == ["c d", "e f"]
    assert res.tokens == 7


def test_max_tokens_without_scores_trims_from_the_end():
    res = clean(["a", "b", "c", "d"], count=words, max_tokens=5, label="greyscale")
    assert res.tags == ["a", "b", "greyscale"]
    assert res.trimmed == ["c", "d"]


def test_max_tokens_not_reached_reports_count():
    res = clean(["a"], count=words, max_tokens=10)
    assert res.tags == ["a"] and res.tokens == 1 and res.trimmed == []


def test_trigger_from_folder():
    rs = RuleSet(CleanRules(trigger_from_folder=True))
    assert placement_for(rs, "40_nazuna", None) == Placement(("nazuna",))
    assert placement_for(rs, "plain", None) == Placement()


def test_toml_schema_strict_with_did_you_mean(tmp_path: Path):
    good = tmp_path / "rules.toml"
    good.write_text(
        'trigger = "nazuna"\nremove = ["blue eyes", "re:.*_eyes$"]\nsort = "score"\nprune_core = 60\n'
        '[replace]\n"1girl" = "girl, solo"\n[prefix]\n"10_low quality" = "low quality"\n'
        "[monochrome]\nhue_threshold = 0.05\n"
    )
    rules = load_rules(good)
    assert rules.trigger == ("nazuna",)
    assert rules.remove == ("blue eyes", "re:.*_eyes$")
    assert rules.replace == {"1girl": ("girl", "solo")}
    assert rules.prefix == {"10_low quality": ("low quality",)}
    assert rules.monochrome == MonochromeSettings(hue_threshold=0.05)
    bad = tmp_path / "bad.toml"
    bad.write_text('triger = "x"\n')
    with pytest.raises(ConfigError) as exc:
        load_rules(bad)
    assert str(exc.value) == f'{bad}: unknown key "triger"\nHint: did you mean "trigger"?'
    bad.write_text('sort = "scores"\n')
    with pytest.raises(ConfigError, match="invalid value 'scores'"):
        load_rules(bad)
    bad.write_text("prune_core = 150\n")
    with pytest.raises(ConfigError, match=r"prune_core must be a percentage in \(0, 100\], got 150.0"):
        load_rules(bad)


def test_combine_extends_lists_and_merges_tables():
    base = CleanRules(trigger=("a",), remove=("x",), replace={"p": ("q",)}, sort="score")
    out = combine(base, {"remove": ("y",), "replace": {"r": ()}, "sort": None, "trigger": None})
    assert out.remove == ("x", "y")
    assert out.replace == {"p": ("q",), "r": ()}
    assert out.sort == "score" and out.trigger == ("a",)


def test_parse_pairs_and_errors():
    assert parse_pairs(["1girl=girl, solo", "meme="], "--replace") == {"1girl": ("girl", "solo"), "meme": ()}
    with pytest.raises(ConfigError) as exc:
        parse_pairs(["nonsense"], "--replace")
    assert str(exc.value) == '--replace "nonsense" is not of the form A=B\nHint: write e.g. --replace "a=b"'


def test_read_tag_file(tmp_path: Path):
    f = tmp_path / "remove.txt"
    f.write_text("# character tags\nblue eyes, pink hair\n\nre:.*_eyes$\n")
    assert read_tag_file(f) == ["blue eyes", "pink hair", "re:.*_eyes$"]
    with pytest.raises(ConfigError, match="no such file"):
        read_tag_file(tmp_path / "missing.txt")


def test_sidecar_sources():
    gallery_dl = {
        "tag_string_general": "1girl pink_hair ^_^",
        "tag_string_character": "nazuna_(yofukashi_no_uta)",
        "tag_string_meta": "highres",
    }
    rules = CleanRules()
    assert sidecar_tags(gallery_dl, rules) == (
        ["nazuna (yofukashi no uta)", "1girl", "pink hair", "^_^"],
        "booru",
    )
    assert sidecar_info(gallery_dl).categories["highres"] == "meta"
    wd14 = {
        "sdprep": {
            "wd14": {
                "model": "m",
                "scores": {"solo": 0.9, "smile": 0.4, "long_hair": 0.3, "nazuna": 0.95, "other": 0.5},
                "categories": {
                    "solo": "general",
                    "smile": "general",
                    "long_hair": "general",
                    "nazuna": "character",
                },
                "rating": {"general": 0.9},
            },
            "booru": {"tags": {"general": ["x"]}},
        }
    }
    # what `sdprep tag` writes from these scores (taggers/rules.py score_tags): general (>= 0.35)
    # then character (>= 0.85), each in vocabulary (stored) order; an uncategorised tag is general
    assert sidecar_tags(wd14, rules) == (["solo", "smile", "other", "nazuna"], "wd14")
    first = dataclasses.replace(rules, character_first=True, rating="last", general_threshold=0.45)
    assert sidecar_tags(wd14, first) == (["nazuna", "solo", "other", "general"], "wd14")
    assert sidecar_tags(wd14, rules, "booru") == (["x"], "booru")
    assert sidecar_info(wd14).scores["long hair"] == 0.3
    assert sidecar_tags({}, rules) is None
