"""weighted_captions as kohya: A1111 attention syntax parsed, tokenized and chunked exactly as kohya's
TokenizeStrategy (tests/assets/kohya_weighted_captions.json, from running it), and each token's
text-encoder output scaled by its weight at kohya's positions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdprep.train.data.prompt_weights import apply_weights, parse_prompt_attention, weighted_tokenize

torch.set_num_threads(1)
KOHYA = json.loads((Path(__file__).parent / "assets" / "kohya_weighted_captions.json").read_text())


@pytest.mark.parametrize("text", sorted(KOHYA["parse"]))
def test_attention_syntax_is_parsed_as_kohya(text: str) -> None:
    want = KOHYA["parse"][text]
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want], rel=1e-6)


@pytest.mark.parametrize("length", ["None", "150", "225"])
def test_ids_and_weights_are_kohyas(tiny_sdxl: Path, length: str) -> None:
    from sdprep.train.models.load import load_sdxl

    want = KOHYA["tokens"][length]
    max_len = None if length == "None" else int(length)
    for n, tok in enumerate(load_sdxl(tiny_sdxl).tokenizers, start=1):  # tokenizer 2 pads with id 0
        ids, weights = weighted_tokenize(want["captions"], tok, max_len)
        assert ids.tolist() == want[f"ids{n}"]
        assert torch.allclose(weights, torch.tensor(want[f"w{n}"]))


def test_weights_scale_kohyas_positions() -> None:
    hidden = torch.ones(1, 152, 3)
    weights = torch.ones(1, 2, 77)
    weights[0, 0, 5] = 2.0  # chunk 0, token 5 -> position 5
    weights[0, 1, 1] = 3.0  # chunk 1, first token -> position 76
    weights[0, 1, 76] = 9.0  # a chunk's EOS slot: never applied
    out = apply_weights(hidden, weights)
    scaled = {i: float(out[0, i, 0]) for i in range(152) if out[0, i, 0] != 1}
    assert scaled == {5: 2.0, 76: 3.0}
    single = apply_weights(torch.ones(1, 77, 3), torch.full((1, 1, 77), 0.5))
    assert torch.all(single == 0.5)  # one chunk: every position, as kohya


def test_weighted_encoding_scales_the_hidden_states_not_the_pooled(tiny_sdxl: Path) -> None:
    from sdprep.train.data.text import encode_prompts
    from sdprep.train.models.load import load_sdxl

    model = load_sdxl(tiny_sdxl)
    with torch.no_grad():
        plain, pooled = encode_prompts(["red hair, blue eyes"], model.tokenizers, model.text_encoders)
        weighted, wpooled = encode_prompts(
            ["(red hair:2), blue eyes"], model.tokenizers, model.text_encoders, weighted=True
        )
        neutral, _ = encode_prompts(
            ["red hair, blue eyes"], model.tokenizers, model.text_encoders, weighted=True
        )
    n = len(model.tokenizer("red hair", add_special_tokens=False).input_ids)
    assert torch.allclose(weighted[:, 1 : 1 + n], 2 * neutral[:, 1 : 1 + n], atol=1e-6)
    assert torch.allclose(weighted[:, 1 + n :], neutral[:, 1 + n :], atol=1e-6)
    assert torch.allclose(wpooled, pooled, atol=1e-6)  # the pooled embedding is not weighted
    assert torch.allclose(neutral, plain, atol=1e-5)  # no syntax: the plain encoding


def test_a_training_step_encodes_captions_with_weights(tiny_sdxl: Path) -> None:
    from diffusers import DDPMScheduler

    from sdprep.train.config.schema import load_train_config
    from sdprep.train.data.text import encode_prompts
    from sdprep.train.loop.step import StepContext, text_conditioning
    from sdprep.train.models.load import load_sdxl

    model = load_sdxl(tiny_sdxl)
    captions = ["(red hair:1.5), [blue eyes]"]
    for weighted in (True, False):
        cfg, _ = load_train_config(None, overrides={"weighted_captions": weighted})
        ctx = StepContext(cfg, model, model.unet, DDPMScheduler(), "cpu", torch.float32, torch.float32, False)
        embeds, _ = text_conditioning(ctx, {"captions": captions})
        with torch.no_grad():
            want, _ = encode_prompts(captions, model.tokenizers, model.text_encoders, weighted=weighted)
        assert torch.equal(embeds, want)
