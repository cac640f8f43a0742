"""Where a caption came from (prep/lineage.py): re-runs start from the source; hand edits and
stages run on their own build on the caption file as it is."""

from __future__ import annotations

import json
from pathlib import Path

from sdprep.dataset import split_tags
from sdprep.prep.clean import CleanOptions, run_clean
from sdprep.prep.lineage import derived_from, kept_head, written_by
from sdprep.prep.monochrome import MonochromeSettings
from sdprep.prep.rules import CleanRules
from sdprep.prep.tag import TagOptions, run_tag


def _rules(**kw) -> CleanOptions:
    return CleanOptions(CleanRules(monochrome=MonochromeSettings(enabled=False), **kw))


def test_derived_from_follows_later_stages_only():
    meta = {"clean": {"base": None, "written": "t, a"}, "tag": {"base": "t, a", "written": "t, a, w"}}
    assert derived_from(meta, "clean", "t, a\n")
    assert not derived_from(meta, "clean", "t, a, w")  # on its own, clean builds on tag's output
    assert derived_from(meta, "clean", "t, a, w", later=("tag",))
    assert not derived_from(meta, "clean", "t, a, w, hand", later=("tag",))
    assert written_by(meta, "t, a, w") == "tag" and written_by(meta, "x") is None
    meta["clean"]["head"] = 1
    assert kept_head(meta, ["t", "b"]) == 1 and kept_head(meta, ["b", "t"]) == 0


def test_rerunning_clean_with_other_rules_starts_from_the_source(sample_dataset: Path):
    run_clean(sample_dataset, _rules(trigger=("nazuna",), remove=("pink hair",)))
    run_clean(sample_dataset, _rules(trigger=("nzn",)))
    fresh = sample_dataset.parent / "fresh"
    sample_dataset.rename(fresh)
    # the same images, sidecars untouched: what a fresh clean with the second rules writes
    for sidecar in fresh.glob("*.json"):
        data = json.loads(sidecar.read_text())
        data.get("sdprep", {}).pop("clean", None)
        sidecar.write_text(json.dumps(data))
    want = {p.name: p.read_text() for p in fresh.glob("*.txt")}
    for p in fresh.glob("*.txt"):
        p.unlink()
    run_clean(fresh, _rules(trigger=("nzn",)))
    assert {p.name: p.read_text() for p in fresh.glob("*.txt")} == want
    assert sum("pink hair" in c for c in want.values()) == 6
    assert all(c.startswith("nzn, ") and "nazuna, " not in c for c in want.values())


def test_a_hand_edit_is_the_new_source(sample_dataset: Path):
    run_clean(sample_dataset, _rules(trigger=("nazuna",)))
    (sample_dataset / "a_landscape.txt").write_text("nazuna, my own words, smile\n")
    run_clean(sample_dataset, _rules(trigger=("nazuna",), remove=("smile",)))
    assert (sample_dataset / "a_landscape.txt").read_text() == "nazuna, my own words\n"


def test_on_their_own_clean_after_tag_cleans_the_tagged_caption(sample_dataset: Path, tiny_wd14: Path):
    """clean, tag --merge append, clean --remove X: X (added by tag) goes, the other tags stay."""
    image = sample_dataset / "a_landscape.txt"
    run_clean(sample_dataset, _rules(trigger=("nazuna",)))
    cleaned = split_tags(image.read_text())
    run_tag(sample_dataset, TagOptions(model=str(tiny_wd14), merge="append"))
    added = [t for t in split_tags(image.read_text()) if t not in cleaned]
    assert len(added) >= 2
    run_clean(sample_dataset, _rules(trigger=("nazuna",), remove=(added[0],)))
    assert split_tags(image.read_text()) == cleaned + added[1:]
    # tag again with the same settings: the cleaned caption is left alone
    again = run_tag(sample_dataset, TagOptions(model=str(tiny_wd14), merge="append"))
    assert again.changed == 0 and split_tags(image.read_text()) == cleaned + added[1:]
