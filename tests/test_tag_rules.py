"""Captions as a pure function of stored scores (taggers/rules.py): kohya's rules, MCut, merging."""

import numpy as np
import pytest

from sdprep.errors import ConfigError
from sdprep.taggers.rules import (
    CaptionRules,
    caption_from_scores,
    caption_tags,
    mcut_threshold,
    merge_caption,
    rating_tag,
)


def make_record(general: dict, character: dict | None = None, rating: dict | None = None, mcut=None) -> dict:
    """A record as taggers/wd14.py stores it: scores in vocabulary order (general, then character)."""
    character = character or {}
    scores = {**general, **character}
    categories = {**dict.fromkeys(general, "general"), **dict.fromkeys(character, "character")}
    record = {
        "scores": scores,
        "categories": categories,
        "rating": rating or {"general": 0.9, "sensitive": 0.2, "questionable": 0.05, "explicit": 0.01},
    }
    if mcut is not None:
        record["mcut"] = mcut
    return record


RECORD = make_record(
    {"1girl": 0.99, "long_hair": 0.8, "^_^": 0.6, "blue_eyes": 0.4, "smile": 0.35, "sky": 0.2},
    {"hatsune_miku": 0.95, "nazuna_(yofukashi_no_uta)": 0.5},
)


def test_defaults_are_kohyas_thresholds_with_underscores_removed_in_vocabulary_order():
    assert caption_from_scores(RECORD, CaptionRules()) == (
        "1girl, long hair, ^_^, blue eyes, smile, hatsune miku"
    )


def test_threshold_is_inclusive_in_float32_like_kohya():
    # 0.35 stored as the shortest float32 repr equals float32(0.35): kohya's `p >= thresh` keeps it
    rec = make_record({"a_tag": float(np.float32(0.35)), "b_tag": float(np.nextafter(np.float32(0.35), 0))})
    assert caption_tags(rec, CaptionRules(general_threshold=0.35)) == ["a tag"]


def test_threshold_above_one_disables_a_category():
    assert caption_tags(RECORD, CaptionRules(character_threshold=1.01)) == [
        "1girl",
        "long hair",
        "^_^",
        "blue eyes",
        "smile",
    ]
    assert caption_tags(RECORD, CaptionRules(general_threshold=2)) == ["hatsune miku"]


def test_character_tags_pass_and_can_go_first():
    rules = CaptionRules(character_threshold=0.5, character_first=True, general_threshold=0.7)
    assert caption_tags(RECORD, rules) == [
        "hatsune miku",
        "nazuna (yofukashi no uta)",
        "1girl",
        "long hair",
    ]


def test_rating_first_last_none_is_the_argmax():
    rec = make_record(
        {"solo": 0.9}, rating={"general": 0.1, "sensitive": 0.7, "questionable": 0.7, "explicit": 0}
    )
    assert rating_tag(rec) == "sensitive"  # first of equal maxima, as numpy's argmax
    assert caption_tags(rec, CaptionRules(rating="first")) == ["sensitive", "solo"]
    assert caption_tags(rec, CaptionRules(rating="last")) == ["solo", "sensitive"]
    assert caption_tags(rec, CaptionRules(rating="none")) == ["solo"]


def test_keep_underscore_and_kohyas_three_character_rule():
    rules = CaptionRules(remove_underscore=False, general_threshold=0.5)
    assert caption_tags(RECORD, rules) == ["1girl", "long_hair", "^_^", "hatsune_miku"]
    rec = make_record({"o_o": 0.9, "x_x_x": 0.9})
    assert caption_tags(rec, CaptionRules()) == ["o_o", "x x x"]


def test_undesired_are_matched_after_underscore_replacement_whatever_the_spelling():
    for spelling in ("long hair", "long_hair", "Long Hair", "*hair"):
        rules = CaptionRules(undesired=(spelling, "1girl"))
        assert caption_tags(RECORD, rules) == ["^_^", "blue eyes", "smile", "hatsune miku"], spelling
    rules = CaptionRules(undesired=("general",), rating="first")
    assert caption_tags(RECORD, rules)[0] == "1girl"  # the rating tag is undesired too


def test_always_first_moves_present_tags_in_the_given_order_and_adds_none():
    rules = CaptionRules(always_first=("smile", "hatsune_miku", "absent_tag"))
    assert caption_tags(RECORD, rules) == ["smile", "hatsune miku", "1girl", "long hair", "^_^", "blue eyes"]


def test_escape_parentheses_and_separator():
    rules = CaptionRules(
        character_threshold=0.5, general_threshold=0.9, escape_parentheses=True, separator="; "
    )
    assert caption_from_scores(RECORD, rules) == r"1girl; hatsune miku; nazuna \(yofukashi no uta\)"


def reference_mcut(probs):
    """imgutils' _mcut_threshold, written out from its definition."""
    probs = np.asarray(probs)
    sorted_probs = probs[probs.argsort()[::-1]]
    difs = sorted_probs[:-1] - sorted_probs[1:]
    t = difs.argmax()
    return (sorted_probs[t] + sorted_probs[t + 1]) / 2


def test_mcut_threshold_matches_the_reference_on_random_vectors():
    rng = np.random.default_rng(1)
    for _ in range(20):
        probs = rng.beta(0.3, 2.0, 500).astype(np.float32)
        assert mcut_threshold(probs) == pytest.approx(float(reference_mcut(probs)), abs=1e-7)
    assert mcut_threshold(np.array([0.9, 0.85, 0.3, 0.25, 0.2], dtype=np.float32)) == pytest.approx(0.575)


def test_mcut_rules_use_the_stored_cut_and_the_character_floor():
    rec = make_record(
        {"a_tag": 0.9, "b_tag": 0.85, "c_tag": 0.3, "d_tag": 0.1},
        {"char_one": 0.12, "char_two": 0.05},
        mcut={"general": 0.575, "character": 0.085},
    )
    # general: strictly above 0.575; character: max(0.15, 0.085) keeps nobody
    assert caption_tags(rec, CaptionRules(mcut=True)) == ["a tag", "b tag"]
    # without a stored cut the stored scores are used
    del rec["mcut"]
    assert caption_tags(rec, CaptionRules(mcut=True)) == ["a tag", "b tag"]
    # a disabled category stays disabled under MCut
    assert caption_tags(rec, CaptionRules(mcut=True, general_threshold=1.5)) == []


def test_rules_reject_bad_values():
    with pytest.raises(ConfigError, match='unknown rating place "top"'):
        CaptionRules(rating="top")
    with pytest.raises(ConfigError, match="general-threshold must be a number >= 0"):
        CaptionRules(general_threshold=float("nan"))
    with pytest.raises(ConfigError, match="separator cannot be blank"):
        CaptionRules(separator=" ")


def test_rules_to_dict_is_json_ready_and_distinguishes_rules():
    import json

    a = CaptionRules(undesired=("x",)).to_dict()
    assert json.loads(json.dumps(a)) == a
    assert a != CaptionRules().to_dict()


def test_merge_policies():
    assert merge_caption("old, tags", "new, tags", "replace") == "new, tags"
    assert merge_caption("old, long_hair", "long hair, smile", "append") == "old, long_hair, smile"
    assert merge_caption("mine", "new", "keep") == "mine"
    assert merge_caption(None, "new", "keep") == "new"
    assert merge_caption("  ", "new", "append") == "new"
    with pytest.raises(ConfigError, match='unknown merge policy "merge"'):
        merge_caption("a", "b", "merge")


def test_replacements_work_after_underscore_removal_unlike_kohyas():
    rules = CaptionRules(
        character_threshold=0.5,
        replace=(("hatsune_miku", "mytoken"), ("long hair", "very long hair"), ("smile", "")),
    )
    assert caption_tags(RECORD, rules) == [
        "1girl",
        "very long hair",
        "^_^",
        "blue eyes",
        "mytoken",
        "nazuna (yofukashi no uta)",
    ]
    # undesired and always-first see the replaced names
    rules = CaptionRules(
        replace=(("hatsune_miku", "mytoken"),), always_first=("mytoken",), undesired=("1girl",)
    )
    assert caption_tags(RECORD, rules)[:2] == ["mytoken", "long hair"]
