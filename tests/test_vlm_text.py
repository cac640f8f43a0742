"""Pure caption-text functions: prompt templates, boilerplate removal, caption-file templates, records."""

from __future__ import annotations

import pytest

from sdprep.errors import ConfigError
from sdprep.taggers.captions_text import (
    DEFAULT_CAPTION_TEMPLATE,
    DEFAULT_PROMPT,
    caption_matches,
    caption_record,
    check_caption_template,
    check_prompt,
    clean_caption,
    combine_caption,
    render_prompt,
    strip_boilerplate,
)


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        ({"trigger": "zxc", "tags": "1girl, solo", "caption": "A girl."}, "zxc, 1girl, solo. A girl."),
        ({"tags": "1girl, solo", "caption": "A girl."}, "1girl, solo. A girl."),
        ({"trigger": "zxc", "caption": "A girl."}, "zxc. A girl."),
        ({"trigger": "zxc", "tags": "1girl"}, "zxc, 1girl"),
        ({"caption": "A girl."}, "A girl."),
        ({"trigger": "zxc"}, "zxc"),
        ({}, ""),
        ({"trigger": "  zxc ", "tags": " 1girl ", "caption": " A girl. "}, "zxc, 1girl. A girl."),
        ({"tags": ":3, ^_^, solo", "caption": "A cat"}, ":3, ^_^, solo. A cat"),  # tags verbatim
    ],
)
def test_combine_default_template(parts, expected):
    assert combine_caption(DEFAULT_CAPTION_TEMPLATE, **parts) == expected


@pytest.mark.parametrize(
    ("template", "parts", "expected"),
    [
        ("{caption} {tags}", {"tags": "solo"}, "solo"),
        ("{caption}, {tags}", {"tags": "solo", "caption": "A cat."}, "A cat. solo"),  # no ".,"
        ("{trigger}. {caption}", {"trigger": "zxc", "caption": "A cat."}, "zxc. A cat."),
        ("{tags}.", {"tags": "solo"}, "solo."),
        ("{tags}.", {}, ""),
        ("a photo of {trigger}, {tags}", {"tags": "solo"}, "a photo of solo"),
        ("{trigger}, in the style of {tags}", {"tags": "x"}, "in the style of x"),
        ("{trigger}, {tags}{caption}", {"trigger": "t", "caption": "c"}, "t, c"),
        ("{{{trigger}}}: {caption}", {"trigger": "t", "caption": "c"}, "{t}: c"),
    ],
)
def test_combine_other_templates(template, parts, expected):
    assert combine_caption(template, **parts) == expected


def test_render_prompt_fills_tags_and_trigger():
    assert render_prompt("Describe {trigger}. Tags: {tags}", tags="1girl, solo", trigger="zxc") == (
        "Describe zxc. Tags: 1girl, solo"
    )
    assert render_prompt("Describe the image. Tags: {tags}") == "Describe the image. Tags:"
    assert render_prompt(DEFAULT_PROMPT, tags="1girl").endswith("Tags that may help: 1girl")
    check_prompt(DEFAULT_PROMPT)
    check_caption_template(DEFAULT_CAPTION_TEMPLATE)


def test_unknown_placeholders_are_named():
    with pytest.raises(ConfigError) as err:
        render_prompt("Describe {tag} and {style} and {style}", tags="x")
    assert (
        err.value.message
        == 'unknown placeholder {tag}, {style} in prompt "Describe {tag} and {style} and {style}"'
    )
    assert err.value.hint == 'did you mean "tags"? valid placeholders: {tags}, {trigger}'
    with pytest.raises(ConfigError, match=r"unknown placeholder \{caption\} in prompt"):
        check_prompt("{caption}")
    with pytest.raises(ConfigError) as err:
        combine_caption("{trigger}, {tgas}", trigger="x")
    assert err.value.message == 'unknown placeholder {tgas} in caption template "{trigger}, {tgas}"'
    assert err.value.hint.startswith('did you mean "tags"?')
    with pytest.raises(ConfigError, match="malformed"):
        check_caption_template("{caption")
    with pytest.raises(ConfigError, match="has a format spec or conversion"):
        check_prompt("{tags!r}")
    with pytest.raises(ConfigError, match="unknown placeholder"):
        check_prompt("{0}")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The image shows a girl with blue hair.", "A girl with blue hair."),
        ("the IMAGE  shows a cat", "A cat"),
        ("In this image, a dog runs.", "A dog runs."),
        ("This image depicts: the image features a red sky.", "A red sky."),
        ("The image features two girls.", "Two girls."),
        ("This is an image of an anime girl", "An anime girl"),
        ("The imagery is bold.", "The imagery is bold."),  # whole words only
        ("A girl. The image shows a cat.", "A girl. The image shows a cat."),  # only at the start
        ("The image shows", ""),
        (", a cat", "A cat"),
    ],
)
def test_strip_boilerplate(raw, expected):
    assert strip_boilerplate(raw) == expected


def test_custom_filters_and_regex():
    assert strip_boilerplate("Sure! Here is a caption: a cat", ["Sure!", "Here is a caption:"]) == "A cat"
    assert strip_boilerplate("Certainly, a cat", [r"re:(sure|certainly)[!,.]"]) == "A cat"
    assert strip_boilerplate("The image shows a cat", []) == "The image shows a cat"
    with pytest.raises(ConfigError, match="not a valid regex"):
        strip_boilerplate("x", ["re:(unclosed"])


def test_clean_caption_makes_one_line():
    raw = '"The image shows a girl\n\nwith   blue hair."'
    assert clean_caption(raw) == "A girl with blue hair."
    assert clean_caption("  ") == ""


def test_caption_record_and_matches():
    record = caption_record("The image shows a cat.", "hf:llava", "Describe. Tags: cat")
    assert record == {"text": "The image shows a cat.", "model": "hf:llava", "prompt": "Describe. Tags: cat"}
    assert caption_matches(record, "hf:llava", "Describe. Tags: cat")
    assert not caption_matches(record, "hf:other", "Describe. Tags: cat")
    assert not caption_matches(record, "hf:llava", "Describe. Tags: dog")
    assert not caption_matches(None, "hf:llava", "Describe. Tags: cat")
    assert not caption_matches({"model": "hf:llava", "prompt": "p"}, "hf:llava", "p")
    with_settings = caption_record("x", "m", "p", {"max_new_tokens": 100})
    assert with_settings["settings"] == {"max_new_tokens": 100}
    assert caption_matches(with_settings, "m", "p", {"max_new_tokens": 100})
    assert not caption_matches(with_settings, "m", "p", {"max_new_tokens": 50})
    assert caption_matches(with_settings, "m", "p")  # settings not compared when not given
