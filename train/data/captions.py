"""Per-sample caption processing for training, compatible with kohya sd-scripts' `process_caption`.

Order of operations (kohya's): prefix/suffix are joined with a space; caption dropout (a rate, or
every N-th epoch) empties the caption; otherwise the first line is used (or, with
`enable_wildcard`, a random line and `{a|b}` alternatives); then, when shuffling or tag dropout is
on, the caption is split on `caption_separator` into fixed tokens (the first `keep_tokens`, or
everything before `keep_tokens_separator`, plus anything after a second `keep_tokens_separator`)
and flexible tokens (shuffled, then each dropped with `caption_tag_dropout_rate`), re-joined with
", "; finally `secondary_separator` is replaced by `caption_separator`.

Randomness comes only from the `numpy.random.Generator` passed in, so a sample's caption is a
pure function of (seed, epoch, image, repeat) and a resumed run reproduces it exactly. Epochs are
counted from 1 here, as kohya does: `caption_dropout_every_n_epochs = 2` empties captions in
epochs 2, 4, 6...
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CaptionOptions:
    """The caption keys of one kohya subset (same names and defaults as sd-scripts)."""

    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_separator: str = ","
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0

    @property
    def is_fixed(self) -> bool:
        """True when every epoch sees the same caption (text-encoder outputs can then be cached)."""
        return not (
            self.shuffle_caption
            or self.enable_wildcard
            or self.caption_dropout_rate > 0
            or self.caption_dropout_every_n_epochs > 0
            or self.caption_tag_dropout_rate > 0
        )

    def randomness(self) -> list[str]:
        """The options that make captions change between epochs (for error messages)."""
        names = ["shuffle_caption", "enable_wildcard"]
        out = [n for n in names if getattr(self, n)]
        rates = ["caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate"]
        return out + [n for n in rates if getattr(self, n) > 0]


_WILDCARD = re.compile(r"\{([^}]+)\}")


def _apply_wildcards(caption: str, rng: np.random.Generator) -> str:
    """kohya's wildcard: a random line, then each `{a|b|c}` replaced by one choice (`{{`/`}}` escape)."""
    if "\n" in caption:
        lines = caption.split("\n")
        caption = lines[int(rng.integers(len(lines)))]
    open_mark, close_mark = "\u2985", "\u2986"
    while open_mark in caption or close_mark in caption:
        open_mark += "\u2985"
        close_mark += "\u2986"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)

    def choose(match: re.Match[str]) -> str:
        options: list[str] = match.group(1).split("|")
        return options[int(rng.integers(len(options)))]

    caption = _WILDCARD.sub(choose, caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def _split(text: str, sep: str) -> list[str]:
    return [t.strip() for t in text.split(sep) if t.strip()]


def _fixed_and_flex(caption: str, opts: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """Split into (fixed prefix tokens, flexible tokens, fixed suffix tokens) as kohya does."""
    sep, keep_sep = opts.caption_separator, opts.keep_tokens_separator
    if keep_sep and keep_sep in caption:
        fixed_part, flex_part = caption.split(keep_sep, 1)
        suffix: list[str] = []
        if keep_sep in flex_part:
            flex_part, suffix_part = flex_part.split(keep_sep, 1)
            suffix = _split(suffix_part, sep)
        return _split(fixed_part, sep), _split(flex_part, sep), suffix
    tokens = _split(caption, sep)
    keep = max(0, opts.keep_tokens)
    return tokens[:keep], tokens[keep:], []


def process_caption(caption: str, opts: CaptionOptions, rng: np.random.Generator, epoch: int = 1) -> str:
    """The caption one sample trains with in `epoch` (1-based), drawing randomness from `rng` only."""
    if opts.caption_prefix:
        caption = opts.caption_prefix + " " + caption
    if opts.caption_suffix:
        caption = caption + " " + opts.caption_suffix
    dropped = opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate
    every = opts.caption_dropout_every_n_epochs
    if dropped or (every > 0 and epoch % every == 0):
        return ""
    if opts.enable_wildcard:
        caption = _apply_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]
    if opts.shuffle_caption or opts.caption_tag_dropout_rate > 0:
        fixed, flex, suffix = _fixed_and_flex(caption, opts)
        if opts.shuffle_caption:
            flex = [flex[i] for i in rng.permutation(len(flex))]
        if opts.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= opts.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + suffix)
    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, opts.caption_separator)
    return caption


def tag_frequency(captions: list[str], separator: str = ",") -> dict[str, int]:
    """Tag counts as kohya records them for `ss_tag_frequency` (split on ",", stripped, lower-cased)."""
    freq: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(separator):
            tag = tag.strip().lower()
            if tag:
                freq[tag] = freq.get(tag, 0) + 1
    return freq
