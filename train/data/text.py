"""SDXL caption encoding exactly as kohya sd-scripts trains it.

- Both tokenizers pad/truncate to 77 tokens, or to max_token_length + 2 (150/225 + BOS/EOS) split
  into chunks of 75 with their own BOS and EOS (kohya's `get_input_ids`).
- Each chunk goes through both encoders; TE1's and TE2's penultimate hidden states (or further
  back with clip_skip) are re-joined as kohya does: BOS, the 75 tokens of every chunk, then the
  last token of the last chunk, i.e. 77, 152 or 227 positions (not 77 * chunks).
- The pooled embedding is TE2's text projection of the first EOS of the FIRST chunk (kohya's
  `pool_workaround`, robust to textual-inversion token ids above EOS).

    embeds, pooled = encode_prompts(["a photo of sks"], (tok1, tok2), (te1, te2), max_token_length=225)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerBase

    TextEncoders = tuple[CLIPTextModel, CLIPTextModelWithProjection]  # SDXL's (TE1, TE2)

CHUNK = 75


def _chunks(max_token_length: int | None) -> int:
    if max_token_length in (None, CHUNK):
        return 1
    if max_token_length not in (150, 225):
        raise ValueError(f"max_token_length must be 75, 150 or 225, got {max_token_length}")
    return max_token_length // CHUNK


def tokenize(
    captions: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_token_length: int | None = None
) -> torch.Tensor:
    """Token ids [B, chunks, 77] for one tokenizer, kohya's way (BOS/EOS per 75-token chunk)."""
    n = _chunks(max_token_length)
    ids: torch.Tensor = tokenizer(
        list(captions), padding="max_length", truncation=True, max_length=n * CHUNK + 2, return_tensors="pt"
    ).input_ids
    if n == 1:
        return ids.unsqueeze(1)
    return split_chunks(ids, tokenizer, n)


def split_chunks(ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase, n: int) -> torch.Tensor:
    """[B, n*75 + 2] ids -> [B, n, 77]: each chunk its own BOS and EOS (kohya's get_input_ids)."""
    width = tokenizer.model_max_length  # 77
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out = []
    for row in ids:
        chunks = []
        for i in range(1, n * CHUNK + 2 - width + 2, width - 2):
            chunk = torch.cat([row[:1], row[i : i + width - 2], row[-1:]])
            if pad != eos:  # SDXL tokenizer 2 pads with "!" (id 0): restore EOS where kohya does
                if chunk[-2] != eos and chunk[-2] != pad:
                    chunk[-1] = eos
                if chunk[1] == pad:
                    chunk[1] = eos
            chunks.append(chunk)
        out.append(torch.stack(chunks))
    return torch.stack(out)


def tokenize_sdxl(
    captions: Sequence[str],
    tokenizers: Sequence[PreTrainedTokenizerBase],
    max_token_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids1, ids2), each [B, chunks, 77], for SDXL's two tokenizers."""
    return tokenize(captions, tokenizers[0], max_token_length), tokenize(
        captions, tokenizers[1], max_token_length
    )


def hidden_layer_index(clip_skip: int | None) -> int:
    """Index into `hidden_states`: SDXL uses the penultimate layer (-2) for clip_skip None or 1;
    clip_skip n >= 2 goes n - 1 layers further back (diffusers' clip_skip = n - 1)."""
    if clip_skip is None or clip_skip <= 1:
        return -2
    return -(clip_skip + 1)


def _rejoin(hidden: torch.Tensor, batch: int, chunks: int) -> torch.Tensor:
    """[B*n, 77, h] -> [B, 77 (n=1) or 75n + 2, h]: kohya's re-joining of the chunk outputs."""
    hidden = hidden.reshape(batch, -1, hidden.shape[-1])
    if chunks == 1:
        return hidden
    width = hidden.shape[1] // chunks
    parts = [hidden[:, :1]]
    for i in range(1, chunks * CHUNK, width):
        parts.append(hidden[:, i : i + width - 2])
    parts.append(hidden[:, -1:])
    return torch.cat(parts, dim=1)


def pooled_from_eos(
    text_encoder: CLIPTextModelWithProjection,
    last_hidden_state: torch.Tensor,
    ids: torch.Tensor,
    eos_token_id: int,
) -> torch.Tensor:
    """Text projection of the hidden state at each row's first EOS token (kohya's pool_workaround)."""
    index = torch.argmax((ids == eos_token_id).int(), dim=1).to(last_hidden_state.device)
    pooled = last_hidden_state[
        torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device), index
    ]
    proj = text_encoder.text_projection
    projected: torch.Tensor = proj(pooled.to(proj.weight.dtype))
    return projected.to(last_hidden_state.dtype)


def encode_tokens(
    ids1: torch.Tensor,
    ids2: torch.Tensor,
    text_encoders: TextEncoders,
    *,
    eos_token_id: int,
    clip_skip: int | None = None,
    weights: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode [B, chunks, 77] ids -> (prompt_embeds [B, L, h1+h2], pooled [B, h2]).

    Gradients flow when the encoders are trainable (textual inversion, TE LoRA); `eos_token_id` is
    tokenizer 2's end-of-text id; `weights` (per token, from sdprep.train.data.prompt_weights) scale
    each encoder's hidden states, not the pooled embedding.
    """
    te1, te2 = text_encoders
    batch, chunks, width = ids1.shape
    layer = hidden_layer_index(clip_skip)
    flat1 = ids1.reshape(-1, width).to(te1.device)
    flat2 = ids2.reshape(-1, ids2.shape[-1]).to(te2.device)
    out1 = te1(flat1, output_hidden_states=True, return_dict=True)
    out2 = te2(flat2, output_hidden_states=True, return_dict=True)
    hidden1 = _rejoin(out1.hidden_states[layer], batch, chunks)
    hidden2 = _rejoin(out2.hidden_states[layer], batch, chunks)
    pooled = pooled_from_eos(te2, out2.last_hidden_state, flat2, eos_token_id)[::chunks]
    if weights is not None:
        from sdprep.train.data.prompt_weights import apply_weights

        hidden1, hidden2 = apply_weights(hidden1, weights[0]), apply_weights(hidden2, weights[1])
    return torch.cat([hidden1, hidden2.to(hidden1.device, hidden1.dtype)], dim=-1), pooled


def encode_prompts(
    captions: Sequence[str],
    tokenizers: Sequence[PreTrainedTokenizerBase],
    text_encoders: TextEncoders,
    max_token_length: int | None = None,
    clip_skip: int | None = None,
    weighted: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (prompt_embeds [B, 77 | 152 | 227, h1+h2], pooled [B, h2]), as kohya trains SDXL;
    `weighted`: kohya's weighted_captions (A1111 attention syntax, sdprep.train.data.prompt_weights)."""
    weights = None
    if weighted:
        from sdprep.train.data.prompt_weights import weighted_tokenize

        (ids1, w1), (ids2, w2) = (weighted_tokenize(captions, t, max_token_length) for t in tokenizers)
        weights = (w1, w2)
    else:
        ids1, ids2 = tokenize_sdxl(captions, tokenizers, max_token_length)
    return encode_tokens(
        ids1,
        ids2,
        text_encoders,
        eos_token_id=tokenizers[1].eos_token_id,
        clip_skip=clip_skip,
        weights=weights,
    )


def token_count(caption: str, tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens a caption uses, without BOS/EOS (for "over 75 / 225 tokens" reports)."""
    return len(tokenizer(caption, add_special_tokens=False, truncation=False).input_ids)
