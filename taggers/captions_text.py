"""Pure text functions for VLM captions: prompt templates, boilerplate removal, caption-file templates.

The VLM's raw answer is kept in the sidecar (`caption_record`); cleaning and combining are applied
when the caption file is written, so a changed filter list or template needs no new inference.

Templates use `{name}` placeholders (`{{` and `}}` for literal braces). When a placeholder's value
is empty, the punctuation around it is dropped: `{trigger}, {tags}. {caption}` becomes
`tags. caption` without a trigger and `trigger, tags` without a caption.
"""

from __future__ import annotations

import re
import string
from typing import Any

from sdprep.errors import ConfigError, did_you_mean

PROMPT_FIELDS = ("tags", "trigger")
CAPTION_FIELDS = ("trigger", "tags", "caption")

DEFAULT_PROMPT = (
    "Write one detailed paragraph describing this image as a caption for training an image "
    "generator: the subject, clothing, pose, expression, background, lighting and art style. "
    "Do not start with phrases like 'The image shows'. Tags that may help: {tags}"
)
DEFAULT_CAPTION_TEMPLATE = "{trigger}, {tags}. {caption}"

# Phrases removed from the start of a VLM answer (case-insensitive, repeatedly); "re:" = regex.
DEFAULT_BOILERPLATE = (
    "The image shows",
    "The image depicts",
    "The image features",
    "The image presents",
    "The image displays",
    "The image captures",
    "The image portrays",
    "The image is",
    "This image shows",
    "This image depicts",
    "This image features",
    "This image is",
    "In this image,",
    "In the image,",
    "In this picture,",
    "The picture shows",
    "The photo shows",
    "This is an image of",
    "This is a picture of",
    "This is a photo of",
    "Here is",
    "Caption:",
)

# a literal made only of these is a separator, dropped next to an empty value
_SEPARATOR = re.compile(r"[\s,.;:!?|/\-]*")
_LEADING_SEPARATOR = re.compile(r"^[\s,.;:!?|/\-]+")


def template_fields(template: str, allowed: tuple[str, ...] | list[str], what: str = "template") -> list[str]:
    """The placeholders of `template`; unknown or malformed ones raise a ConfigError naming them."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(
            f'{what} "{template}" is malformed ({exc})', "write {{ and }} for literal braces"
        ) from None
    fields = [name for _, name, _, _ in parsed if name is not None]
    unknown = [name for name in fields if name not in allowed]
    if unknown:
        names = ", ".join("{" + n + "}" for n in dict.fromkeys(unknown))
        valid = "valid placeholders: " + ", ".join("{" + a + "}" for a in allowed)
        close = did_you_mean(unknown[0], allowed)
        raise ConfigError(
            f'unknown placeholder {names} in {what} "{template}"', f"{close} {valid}" if close else valid
        )
    for _, name, spec, conv in parsed:
        if name is not None and (spec or conv):
            raise ConfigError(
                f'placeholder {{{name}}} in {what} "{template}" has a format spec or conversion',
                "write plain placeholders such as {tags}",
            )
    return fields


def fill_template(
    template: str, values: dict[str, str], allowed: tuple[str, ...] | list[str], what: str
) -> str:
    """Fill `template`, dropping separators (literals of only punctuation) next to empty values.

    A separator is kept only between two non-empty values, and of several separators left between
    them (because values in between are empty) the last one wins. Literals with words are kept.
    Values are inserted verbatim (tags like `...` or `:3` are never touched).
    """
    template_fields(template, allowed, what)
    segments: list[tuple[str, str]] = []  # (literal before a field, field); "{{" splits literals
    tail = ""
    for text, name, _, _ in string.Formatter().parse(template):
        tail += text
        if name is not None:
            segments.append((tail, name))
            tail = ""
    out: list[str] = []
    pending = ""  # separator waiting for the next non-empty value
    after_value = False  # the last thing written is a value, so a separator may follow
    previous_filled = False
    for literal, name in segments:
        if not literal:
            pass
        elif _SEPARATOR.fullmatch(literal):
            pending = literal if after_value else ""
        else:
            out.append(literal if after_value else _LEADING_SEPARATOR.sub("", literal))
            pending, after_value = "", False
        value = (values.get(name) or "").strip()
        previous_filled = bool(value)
        if value:
            if pending:
                out.append(_join_separator(out[-1], pending))
            out.append(value)
            pending, after_value = "", True
    if tail and not _SEPARATOR.fullmatch(tail):
        out.append(tail if after_value else _LEADING_SEPARATOR.sub("", tail))
    elif tail and previous_filled:  # e.g. the "." of "{tags}." after a non-empty value
        out.append(_join_separator(out[-1], tail))
    return re.sub(r"[ \t]{2,}", " ", "".join(out)).strip()


def _join_separator(previous: str, separator: str) -> str:
    """Avoid doubled punctuation: "A cat." + ". " -> "A cat." + " " (also after "!" and "?")."""
    stripped = separator.lstrip()
    end = previous.rstrip()[-1:]
    if stripped[:1] in (".", ",", ";", ":") and (end == stripped[0] or end in (".", "!", "?")):
        return separator[: len(separator) - len(stripped)] + stripped[1:]
    return separator


def render_prompt(template: str, *, tags: str = "", trigger: str = "") -> str:
    """The prompt for one image: `{tags}` (e.g. the WD14 tags) and `{trigger}` filled in."""
    return fill_template(template, {"tags": tags, "trigger": trigger}, PROMPT_FIELDS, "prompt")


def check_prompt(template: str) -> None:
    """Validate a prompt template up front (unknown placeholders -> ConfigError)."""
    template_fields(template, PROMPT_FIELDS, "prompt")


def check_caption_template(template: str) -> None:
    """Validate a caption-file template up front (unknown placeholders -> ConfigError)."""
    template_fields(template, CAPTION_FIELDS, "caption template")


def combine_caption(
    template: str = DEFAULT_CAPTION_TEMPLATE, *, trigger: str = "", tags: str = "", caption: str = ""
) -> str:
    """The caption-file text from a template such as `{trigger}, {tags}. {caption}`."""
    values = {"trigger": trigger, "tags": tags, "caption": caption}
    return fill_template(template, values, CAPTION_FIELDS, "caption template")


def _filter_pattern(item: str) -> re.Pattern[str]:
    if item.startswith("re:"):
        try:
            return re.compile(r"\s*(?:" + item[3:] + r")[\s,:;]*", re.IGNORECASE)
        except re.error as exc:
            raise ConfigError(f'boilerplate filter "{item}" is not a valid regex ({exc})') from None
    words = r"\s+".join(re.escape(w) for w in item.split())
    boundary = r"\b" if item[-1:].isalnum() else ""
    return re.compile(r"\s*" + words + boundary + r"[\s,:;]*", re.IGNORECASE)


def strip_boilerplate(text: str, filters: tuple[str, ...] | list[str] = DEFAULT_BOILERPLATE) -> str:
    """Remove filter phrases from the start of `text` (repeatedly), then capitalise the first letter.

    "The image shows a girl with blue hair." -> "A girl with blue hair."
    """
    patterns = [_filter_pattern(f) for f in filters if f.strip()]
    text = _LEADING_SEPARATOR.sub("", text)
    changed = True
    while changed and text:
        changed = False
        for pattern in patterns:
            match = pattern.match(text)
            if match and match.end() > 0:
                text = _LEADING_SEPARATOR.sub("", text[match.end() :])
                changed = True
    return text[:1].upper() + text[1:]


def clean_caption(text: str, filters: tuple[str, ...] | list[str] = DEFAULT_BOILERPLATE) -> str:
    """A VLM answer made fit for a one-line caption file: no wrapping quotes, no newlines, no boilerplate."""
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return strip_boilerplate(text, filters)


def caption_record(
    text: str, model: str, prompt: str, settings: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What the tag stage stores in `sdprep_meta(sidecar)["caption"]`: the raw VLM answer and its origin."""
    record: dict[str, Any] = {"text": text, "model": model, "prompt": prompt}
    if settings:
        record["settings"] = dict(settings)
    return record


def caption_matches(record: object, model: str, prompt: str, settings: dict[str, Any] | None = None) -> bool:
    """True when a stored record was produced by this model and prompt (and settings), so skip it."""
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        return False
    if record.get("model") != model or record.get("prompt") != prompt:
        return False
    return settings is None or record.get("settings", {}) == dict(settings)
