"""SDXL prompt encoding on the tiny model: equals diffusers' encode_prompt at 75 tokens, and
kohya's chunked layout at 150 / 225 tokens."""

from __future__ import annotations

import pytest
import torch

from sdprep.train.data.text import encode_prompts, hidden_layer_index, token_count, tokenize

torch.set_num_threads(1)

SHORT = ["a photo of the girl, long hair, blue eyes", "simple background"]
LONG_CAPTION = ", ".join(["1girl solo long hair looking at viewer smile"] * 14)  # well over 75 tokens


@pytest.fixture(scope="module")
def pipe(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)


def parts(pipe):
    return (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2)


def diffusers_encode(pipe, prompts, clip_skip=None):
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts,
            device="cpu",
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            clip_skip=clip_skip,
        )
    return embeds, pooled


def test_75_tokens_equals_diffusers_encode_prompt(pipe):
    toks, tes = parts(pipe)
    with torch.no_grad():
        embeds, pooled = encode_prompts(SHORT + [LONG_CAPTION], toks, tes)
    want_embeds, want_pooled = diffusers_encode(pipe, SHORT + [LONG_CAPTION])
    assert embeds.shape == (3, 77, 32 + 64) and pooled.shape == (3, 64)
    assert torch.allclose(embeds, want_embeds, atol=1e-6)
    assert torch.allclose(pooled, want_pooled, atol=1e-6)
    with torch.no_grad():
        explicit, _ = encode_prompts(SHORT, toks, tes, max_token_length=75)
    assert torch.equal(explicit, embeds[:2])


def test_clip_skip_goes_further_back_like_diffusers(pipe):
    toks, tes = parts(pipe)
    with torch.no_grad():
        skip2, _ = encode_prompts(SHORT, toks, tes, clip_skip=2)
        skip1, _ = encode_prompts(SHORT, toks, tes, clip_skip=1)
        plain, _ = encode_prompts(SHORT, toks, tes)
    want, _ = diffusers_encode(pipe, SHORT, clip_skip=1)
    assert torch.allclose(skip2, want, atol=1e-6)
    assert torch.equal(skip1, plain)
    assert not torch.allclose(skip2, plain)
    assert [hidden_layer_index(c) for c in (None, 1, 2, 3)] == [-2, -2, -3, -4]


@pytest.mark.parametrize(("max_len", "positions"), [(150, 152), (225, 227)])
def test_long_captions_use_kohya_chunks(pipe, max_len, positions):
    toks, tes = parts(pipe)
    assert token_count(LONG_CAPTION, pipe.tokenizer) > 100
    with torch.no_grad():
        embeds, pooled = encode_prompts([LONG_CAPTION, SHORT[0]], toks, tes, max_token_length=max_len)
    assert embeds.shape == (2, positions, 96)
    want, want_pooled = diffusers_encode(pipe, [LONG_CAPTION, SHORT[0]])  # diffusers truncates to 77
    # the first chunk (BOS + 75 tokens) is the truncated 77-token encoding; pooled comes from it
    assert torch.allclose(embeds[:, :76], want[:, :76], atol=1e-6)
    assert torch.allclose(pooled, want_pooled, atol=1e-6)
    # the long caption's second chunk carries its tokens 76..150: not the truncated encoding
    assert not torch.allclose(embeds[0, 76:152], embeds[0, :76], atol=1e-3)


def test_second_chunk_is_encoded_as_its_own_77_token_sequence(pipe):
    tok1, tok2 = pipe.tokenizer, pipe.tokenizer_2
    toks, tes = parts(pipe)
    ids1 = tokenize([LONG_CAPTION], tok1, 150)[0]
    ids2 = tokenize([LONG_CAPTION], tok2, 150)[0]
    with torch.no_grad():
        embeds, _ = encode_prompts([LONG_CAPTION], toks, tes, max_token_length=150)
        h1 = pipe.text_encoder(ids1[1:2], output_hidden_states=True).hidden_states[-2]
        h2 = pipe.text_encoder_2(ids2[1:2], output_hidden_states=True).hidden_states[-2]
    chunk = torch.cat([h1, h2], dim=-1)[0]
    assert torch.allclose(embeds[0, 76:151], chunk[1:76], atol=1e-6)  # its 75 tokens
    assert torch.allclose(embeds[0, 151], chunk[76], atol=1e-6)  # the last chunk's final token


def test_tokenize_chunks_have_bos_and_eos(pipe):
    tok2 = pipe.tokenizer_2  # pads with "!" (id 0) as SDXL's tokenizer 2
    bos, eos, pad = tok2.bos_token_id, tok2.eos_token_id, tok2.pad_token_id
    assert pad != eos
    ids = tokenize([LONG_CAPTION, "a photo"], tok2, 225)
    assert ids.shape == (2, 3, 77)
    assert torch.all(ids[:, :, 0] == bos)
    # a chunk full of caption tokens ends with EOS instead of the cut-off token
    assert ids[0, 0, -1] == eos and ids[0, 0, -2] not in (eos, pad)
    # an empty chunk of a short caption is BOS EOS PAD ... (kohya's fix-up)
    assert ids[1, 2, 1] == eos and torch.all(ids[1, 2, 2:] == pad)
    assert ids[1, 0].tolist() == tok2(["a photo"], padding="max_length", max_length=77).input_ids[0]
    tok1 = pipe.tokenizer  # pads with EOS: chunks are BOS + 75 ids + last id
    ids1 = tokenize(["a photo"], tok1, 150)
    assert ids1[0, 1, 0] == tok1.bos_token_id and torch.all(ids1[0, 1, 1:] == tok1.eos_token_id)


def test_bad_max_token_length(pipe):
    with pytest.raises(ValueError, match="max_token_length must be 75, 150 or 225, got 100"):
        tokenize(["a"], pipe.tokenizer, 100)


def test_gradients_reach_the_embeddings(pipe):
    """Textual inversion and TE LoRA train through encode_prompts."""
    toks, tes = parts(pipe)
    emb = pipe.text_encoder_2.get_input_embeddings().weight
    emb.requires_grad_(True)
    try:
        embeds, pooled = encode_prompts(["a photo of sks"], toks, tes, max_token_length=150)
        (embeds.sum() + pooled.sum()).backward()
        sks = pipe.tokenizer_2.convert_tokens_to_ids("sks</w>")
        assert emb.grad[sks].abs().sum() > 0
    finally:
        emb.requires_grad_(False)
        emb.grad = None


def test_clip_skip_beyond_the_encoders_depth_is_a_config_error(tiny_sdxl, tmp_path) -> None:
    """The tiny encoders have 3 layers: clip_skip 3 reaches the embeddings, 4 does not exist."""
    from train_support import lora_cfg, make_dataset

    from sdprep.errors import ConfigError
    from sdprep.train.loop.trainer import train

    data = make_dataset(tmp_path / "data", images=["a_landscape.jpg"])
    with pytest.raises(ConfigError, match="clip_skip = 4, but the text encoders have only 3 layers"):
        train(lora_cfg(tiny_sdxl, data, tmp_path / "out", clip_skip=4))
    assert train(lora_cfg(tiny_sdxl, data, tmp_path / "ok", clip_skip=3, max_train_steps=1)).steps == 1
