"""kohya's `weighted_captions`: A1111 attention syntax in captions, `(word)` x1.1, `[word]` / 1.1,
`(word:1.3)` x1.3, `\\(` for a literal bracket. Each caption is split into (text, weight) runs, each run
tokenized on its own, and every token's text-encoder output multiplied by its weight (BOS, EOS and
padding keep 1), as kohya's TokenizeStrategy / SdxlTextEncodingStrategy do. The pooled embedding is
not weighted.

    ids, weights = weighted_tokenize(["1girl, (red hair:1.3)"], tokenizer, max_token_length=None)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

ROUND, SQUARE = 1.1, 1 / 1.1
_TOKEN = re.compile(
    r"\\\(|\\\)|\\\[|\\]|\\\\|\\|"  # escapes, and a lone backslash
    r"\(|\[|:([+-]?[.\d]+)\)|\)|]|"  # brackets; ":1.3)" closes a round bracket with that weight
    r"[^\\()\[\]:]+|:"  # text, and a colon that is text
)


@dataclass
class _Run:
    """A piece of caption text and its attention weight (scaled in place as brackets close)."""

    text: str
    weight: float


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """`"a (b:1.3) [c]"` -> `[("a ", 1.0), ("b", 1.3), (" ", 1.0), ("c", 1/1.1)]`: text runs and their
    attention weights; unclosed brackets apply to the end, runs of equal weight are merged."""
    runs: list[_Run] = []
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run.weight *= factor

    for match in _TOKEN.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            runs.append(_Run(piece[1:], 1.0))
        elif piece == "(":
            rounds.append(len(runs))
        elif piece == "[":
            squares.append(len(runs))
        elif weight is not None and rounds:
            scale(rounds.pop(), float(weight))
        elif piece == ")" and rounds:
            scale(rounds.pop(), ROUND)
        elif piece == "]" and squares:
            scale(squares.pop(), SQUARE)
        else:
            runs.append(_Run(piece, 1.0))
    for start in rounds:
        scale(start, ROUND)
    for start in squares:
        scale(start, SQUARE)
    merged: list[_Run] = []
    for run in runs or [_Run("", 1.0)]:
        if merged and merged[-1].weight == run.weight:
            merged[-1].text += run.text
        else:
            merged.append(_Run(run.text, run.weight))
    return [(r.text, r.weight) for r in merged]


def _weighted_ids(
    text: str, tokenizer: PreTrainedTokenizerBase, length: int
) -> tuple[list[int], list[float]]:
    """One caption's ids and weights, `length` long with BOS, EOS and padding (weight 1)."""
    ids: list[int] = []
    weights: list[float] = []
    for run, weight in parse_prompt_attention(text):
        tokens: list[int] = tokenizer(run).input_ids[1:-1]
        ids += tokens
        weights += [weight] * len(tokens)
        if len(ids) > length - 2:
            break
    ids, weights = ids[: length - 2], weights[: length - 2]
    pad = length - 2 - len(ids)
    return (
        [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id, *[tokenizer.pad_token_id] * pad],
        [1.0, *weights, *[1.0] * (pad + 1)],
    )


def weighted_tokenize(
    captions: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_token_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, weights), each [B, chunks, 77], with kohya's 75-token chunks (sdprep.train.data.text.tokenize)."""
    import torch

    from sdprep.train.data.text import CHUNK, _chunks, split_chunks

    n = _chunks(max_token_length)
    length = tokenizer.model_max_length if n == 1 else n * CHUNK + 2
    rows = [_weighted_ids(c, tokenizer, length) for c in captions]
    ids = torch.tensor([r[0] for r in rows])
    weights = torch.tensor([r[1] for r in rows])
    if n == 1:
        return ids.unsqueeze(1), weights.unsqueeze(1)
    chunked = split_chunks(ids, tokenizer, n)
    per_chunk = torch.ones(chunked.shape)
    for c in range(n):
        per_chunk[:, c, 1 : CHUNK + 1] = weights[:, 1 + c * CHUNK : 1 + (c + 1) * CHUNK]
    return chunked, per_chunk


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Multiply re-joined hidden states [B, L, h] by per-token weights [B, chunks, 77] (kohya's
    encode_tokens_with_weights: all 77 positions for one chunk; each chunk's 75 tokens otherwise)."""
    weights = weights.to(hidden.device, hidden.dtype)
    chunks = weights.shape[1]
    if chunks == 1:
        return hidden * weights[:, 0].unsqueeze(-1)
    out = hidden.clone()
    for c in range(chunks):
        span = slice(c * 75 + 1, c * 75 + 76)
        out[:, span] = hidden[:, span] * weights[:, c, 1:-1].unsqueeze(-1)
    return out
