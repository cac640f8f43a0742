"""One caption rule: `sdprep tag` and `sdprep clean` write the same caption from the same stored
WD14 scores and the same rules (taggers/rules.py `score_tags` + the tag functions of sdprep/tags.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sdprep.cli import cli
from sdprep.dataset import discover
from sdprep.prep.clean import CleanOptions, run_clean
from sdprep.prep.monochrome import MonochromeSettings
from sdprep.prep.rules import CleanRules
from sdprep.prep.tag import TagOptions, run_tag
from sdprep.taggers.rules import CaptionRules


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory, tiny_wd14: Path) -> Path:
    """The sample images with WD14 scores in their sidecars (the tiny model ran once)."""
    root = Path(
        shutil.copytree(
            Path(__file__).parents[1] / "sample_data" / "images", tmp_path_factory.mktemp("s") / "d"
        )
    )
    run_tag(root, TagOptions(model=str(tiny_wd14)))
    return root


def _copy_without_captions(src: Path, dst: Path) -> Path:
    """The images and their sidecars (scores kept, tag's record dropped), no captions, no journal."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".sdprep", "*.txt"))
    for side in dst.glob("*.json"):
        data = json.loads(side.read_text())
        data.get("sdprep", {}).pop("tag", None)
        side.write_text(json.dumps(data))
    return dst


def _captions(root: Path) -> dict[str, bytes]:
    return {it.caption_path.name: it.caption_path.read_bytes() for it in discover(root)}


# (shared rules, tag-only spelling, clean-only spelling)
CASES = {
    "defaults": ({}, {}, {}),
    "low thresholds, characters first, rating first": (
        {"general_threshold": 0.2, "character_threshold": 0.3, "character_first": True, "rating": "first"},
        {},
        {},
    ),
    "mcut": ({"mcut": True}, {}, {}),
    "replace and remove (globs, regex, several targets)": (
        {"general_threshold": 0.1, "character_threshold": 0.2, "escape_parentheses": True},
        {
            "undesired": ("*hair*", "re:^(blue|red) eyes$"),
            "replace": {"1girl": ("girl", "solo"), "smile": ()},
        },
        {"remove": ("*hair*", "re:^(blue|red) eyes$"), "replace": {"1girl": ("girl", "solo"), "smile": ()}},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tag_and_clean_write_identical_captions_from_the_same_scores_and_rules(
    scored, tmp_path, case, tiny_wd14
):
    shared, tag_only, clean_only = CASES[case]
    by_tag = _copy_without_captions(scored, tmp_path / "tag")
    by_clean = _copy_without_captions(scored, tmp_path / "clean")
    result = run_tag(by_tag, TagOptions(model=str(tiny_wd14), rules=CaptionRules(**shared, **tag_only)))
    assert result.details["inferred"] == 0 and not result.failed  # from the stored scores only
    off = MonochromeSettings(enabled=False)
    rules = CleanRules(source="wd14", monochrome=off, **shared, **clean_only)
    assert not run_clean(by_clean, CleanOptions(rules)).failed
    tagged = _captions(by_tag)
    assert len(tagged) == 8 and len(set(tagged.values())) > 1  # real, differing captions
    assert _captions(by_clean) == tagged


def test_the_command_lines_agree_too_and_the_old_replace_form_still_reads(
    scored, tmp_path, cli_runner, tiny_wd14
):
    by_tag = _copy_without_captions(scored, tmp_path / "tag")
    by_clean = _copy_without_captions(scored, tmp_path / "clean")
    rules = ["--general-threshold", "0.15", "--replace", "1girl=girl, solo"]
    res = cli_runner.invoke(
        cli, ["-q", "tag", str(by_tag), "--model", str(tiny_wd14), *rules, "--undesired", "*hair*"]
    )
    assert res.exit_code == 0, res.output
    res = cli_runner.invoke(
        cli,
        ["-q", "clean", str(by_clean), "--source", "wd14", "--no-monochrome", *rules, "--remove", "*hair*"],
    )
    assert res.exit_code == 0, res.output
    assert _captions(by_clean) == _captions(by_tag)
    assert any(b"girl, solo" in c for c in _captions(by_tag).values())
    # kohya's SRC,DST form: the caption "A=B" gives, and a note saying what to write instead
    old, new = (
        _copy_without_captions(scored, tmp_path / "old"),
        _copy_without_captions(scored, tmp_path / "new"),
    )
    args = ["tag", "--model", str(tiny_wd14), "--general-threshold", "0.15"]
    res = cli_runner.invoke(cli, [*args, str(old), "--replace", "1girl,girl;long_hair,"])
    assert res.exit_code == 0, res.output
    assert (
        'note: --replace "1girl,girl;long_hair," (SRC,DST) is deprecated: write --replace "A=B"' in res.output
    )
    res = cli_runner.invoke(cli, [*args, str(new), "--replace", "1girl=girl", "--replace", "long_hair="])
    assert res.exit_code == 0 and "deprecated" not in res.output, res.output
    assert _captions(old) == _captions(new)


def test_the_shared_score_options_default_to_the_rule_s_own_defaults():
    from sdprep.prep.cli.scores import DEFAULTS, RATINGS
    from sdprep.taggers.rules import RATING_PLACES, ScoreRules

    assert {name: getattr(ScoreRules(), name) for name in DEFAULTS} == DEFAULTS
    assert RATINGS == RATING_PLACES


def test_tag_rules_read_clean_s_replace_table_and_the_older_pairs_alike():
    from sdprep.config import from_dict

    table = from_dict(CaptionRules, {"replace": {"1girl": "girl, solo", "smile": ""}})
    pairs = from_dict(CaptionRules, {"replace": [["1girl", "girl, solo"], ["smile", ""]]})
    assert table.replace == pairs.replace == {"1girl": ("girl", "solo"), "smile": ()}
    # recorded as the pairs earlier runs recorded, so their settings still match (no re-derivation)
    assert table.to_dict()["replace"] == [["1girl", "girl, solo"], ["smile", ""]]
    assert CaptionRules().to_dict()["replace"] == []


def test_a_regex_in_a_comma_separated_tag_list_is_kept_whole():
    """`tag --undesired "smile, re:(blue|red) eyes{1,2}"` reads as clean --remove does: the regex
    holds a comma and stays one pattern (it was cut into `re:...{1` and `2}`)."""
    from sdprep.prep.cli.scores import tag_list

    assert tag_list(("smile, re:^(blue|red) eyes{1,2}$", "solo,1girl")) == (
        "smile",
        "re:^(blue|red) eyes{1,2}$",
        "solo",
        "1girl",
    )
    assert tag_list(("a,b", " , ")) == ("a", "b")


def test_tag_undesired_with_a_comma_regex_removes_what_clean_remove_does(
    scored, tmp_path, cli_runner, tiny_wd14
):
    by_tag = _copy_without_captions(scored, tmp_path / "tag")
    by_clean = _copy_without_captions(scored, tmp_path / "clean")
    pattern = "re:^.{1,6} hair$"
    res = cli_runner.invoke(
        cli,
        [
            "-q",
            "tag",
            str(by_tag),
            "--model",
            str(tiny_wd14),
            "--general-threshold",
            "0.15",
            "--undesired",
            f"solo, {pattern}",
        ],
    )
    assert res.exit_code == 0, res.output
    res = cli_runner.invoke(
        cli,
        [
            "-q",
            "clean",
            str(by_clean),
            "--source",
            "wd14",
            "--no-monochrome",
            "--general-threshold",
            "0.15",
            "--remove",
            "solo",
            "--remove",
            pattern,
        ],
    )
    assert res.exit_code == 0, res.output
    assert _captions(by_clean) == _captions(by_tag)
