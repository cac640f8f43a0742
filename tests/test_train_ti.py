"""Textual inversion: only the token's vectors train, the file loads in diffusers, bad saves are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from train_support import (
    assert_untrained_save_refused,
    lora_settings,
    make_dataset,
    run_trainer,
    set_up_method,
)

from sdprep.errors import ConfigError, ModelError

torch.set_num_threads(1)
TOKEN = "zork"


def ti_cfg(model: Path, data: Path, out: Path, **over):
    from sdprep.train.config.schema import load_train_config

    settings = lora_settings(model, data, out)
    for key in ("network_module", "network_dim", "network_alpha"):
        del settings[key]
    settings.update(token_string=TOKEN, init_word="woman", num_vectors_per_token=2, learning_rate=1e-2)
    settings.update(over)
    cfg, _ = load_train_config(None, overrides=settings)
    return cfg


@pytest.fixture(scope="module")
def trained(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory):
    """One short 2-vector TI run (gradient checkpointing, a save at step 2 and at the end)."""
    root = tmp_path_factory.mktemp("ti")
    data = make_dataset(
        root / "data", images=["c_square.webp", "b_portrait.png"], repeats=1, side=64, token=TOKEN
    )
    cfg = ti_cfg(
        tiny_sdxl, data, root / "out", max_train_steps=3, save_every_n_steps=2, gradient_checkpointing=True
    )
    return run_trainer(cfg)


def fresh_pipeline(model: Path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_saved_embedding_has_both_tensors_and_modelspec(trained) -> None:
    result = trained.result
    assert [p.name for p in result.saved] == ["tiny-step00000002.safetensors", "tiny.safetensors"]
    sd = load_file(result.output)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {"clip_l": (2, 32), "clip_g": (2, 64)}
    with safe_open(str(result.output), framework="pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"
    assert meta["ss_token_string"] == TOKEN and meta["ss_num_vectors_per_token"] == "2"
    assert all(v.ok for v in trained.cb.saves)
    # every vector moved away from init_word's embedding
    for key in ("clip_l", "clip_g"):
        assert (sd[key] - trained.method.initial[key]).abs().amax(dim=1).min() > 0


def test_diffusers_load_textual_inversion_gives_the_trained_embeddings(trained, tiny_sdxl: Path) -> None:
    sd = load_file(trained.result.output)
    pipe = fresh_pipeline(tiny_sdxl)
    pipe.load_textual_inversion(
        sd["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        sd["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    model = trained.model
    for te in model.text_encoders:
        te.eval()
    ours = model.pipeline()
    prompt = f"a photo of {TOKEN}, smile"
    expanded = trained.method.expand_prompt(prompt)
    assert expanded == f"a photo of {TOKEN} {TOKEN}1, smile"  # prompts name only the base token
    with torch.no_grad():
        theirs = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
        mine = ours.encode_prompt(expanded, do_classifier_free_guidance=False)
        base = pipe.encode_prompt("a photo of woman, smile", do_classifier_free_guidance=False)
    for a, b, c in zip(theirs, mine, base):
        if a is None:
            continue
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)  # the token is not just init_word any more


def test_only_the_new_rows_changed(trained, tiny_sdxl: Path) -> None:
    from sdprep.train.save.checkpoint import fingerprint

    pipe = fresh_pipeline(tiny_sdxl)
    model = trained.model
    for te, ref in ((model.text_encoder, pipe.text_encoder), (model.text_encoder_2, pipe.text_encoder_2)):
        layer = te.get_input_embeddings()
        old = ref.get_input_embeddings().weight
        assert layer.first_id == old.shape[0]  # the tokens were appended
        assert torch.equal(layer.weight[: old.shape[0]], old)
        rest = {n: p for n, p in te.named_parameters() if "token_embedding" not in n}
        assert all(torch.equal(p, ref.state_dict()[n]) for n, p in rest.items())
    assert fingerprint({"u": model.unet}) == fingerprint({"u": pipe.unet})
    assert [p for g in trained.optimizer.param_groups for p in g["params"]] == [
        layer.vectors for layer in trained.method.layers
    ]
    assert all(g["weight_decay"] == 0.0 for g in trained.optimizer.param_groups)


def test_an_untrained_or_empty_save_is_refused(tiny_sdxl: Path, tmp_path: Path) -> None:
    """Seed 000's failure: an empty or unchanged embedding must never be reported as a result."""
    from sdprep.train.methods.ti import TextualInversionMethod

    data = make_dataset(tmp_path / "data", images=["c_square.webp"], repeats=1, side=64, token=TOKEN)
    method = set_up_method(TextualInversionMethod, ti_cfg(tiny_sdxl, data, tmp_path / "out"), tiny_sdxl)
    assert_untrained_save_refused(
        method, tmp_path / "out" / "emb.safetensors", "every vector still equal their initial value"
    )
    assert method.verify_tensors({}, trained=True) == ["the file has no tensors (an empty embedding)"]
    vectors = method.export_tensors(torch.float32)
    wrong = {"clip_l": torch.zeros(2, 32), "clip_g": vectors["clip_g"]}
    assert method.verify_tensors(wrong, trained=False) == [
        "clip_l in the file differs from the trained vectors"
    ]
    bad = {"clip_l": torch.full((2, 32), float("nan")), "clip_g": torch.ones(3, 64)}
    assert method.verify_tensors(bad, trained=False) == [
        "clip_l has NaN or infinite values",
        "clip_g has shape (3, 64), expected (2, 64)",
    ]
    with torch.no_grad():
        method.layers[0].vectors[1] += 0.1  # only the second clip_l vector moved
    assert method.verify_tensors(method.export_tensors(torch.float32), trained=True) == [
        "clip_l: vector(s) [0] still equal their initial value: the embedding has not trained",
        "clip_g: every vector still equal their initial value: the embedding has not trained",
    ]
    with torch.no_grad():
        for layer in method.layers:
            layer.vectors += 1e-7  # trained a little, early in a warmup: a bf16 file mostly rounds to init
    small = method.export_tensors(torch.bfloat16)
    assert (small["clip_g"] != method.initial["clip_g"].to(torch.bfloat16)).float().mean() < 0.05
    assert method.verify_tensors(small, trained=True) == []
    with torch.no_grad():
        method.model.unet.conv_in.bias[0] += 1.0  # a frozen weight changes: caught at the next save
    problems = method.verify_tensors(small, trained=False)
    assert problems == ["weights outside the new token rows changed during training"]


def test_captions_templates_and_prompts(tiny_sdxl: Path, tmp_path: Path) -> None:
    from sdprep.train.methods.templates import OBJECT_TEMPLATES, STYLE_TEMPLATES
    from sdprep.train.methods.ti import TextualInversionMethod

    data = tmp_path / "data"
    cfg = ti_cfg(tiny_sdxl, data, tmp_path / "out", num_vectors_per_token=3)
    method = TextualInversionMethod(cfg)
    transform = method.caption_transform()
    rng = np.random.default_rng(0)
    assert transform("Zork, 1girl, zorkish", rng) == "zork zork1 zork2, 1girl, zorkish"
    assert method.expand_prompt("a photo of zork --n bad") == "a photo of zork zork1 zork2 --n bad"
    obj = TextualInversionMethod(ti_cfg(tiny_sdxl, data, tmp_path / "out", use_object_template=True))
    captions = {obj.caption_transform()("ignored caption", np.random.default_rng(i)) for i in range(40)}
    assert captions <= {t.format("zork zork1") for t in OBJECT_TEMPLATES} and len(captions) > 5
    style = TextualInversionMethod(ti_cfg(tiny_sdxl, data, tmp_path / "out", use_style_template=True))
    assert style.caption_transform()("x", np.random.default_rng(1)) in {
        t.format("zork zork1") for t in STYLE_TEMPLATES
    }


def test_token_missing_from_every_caption_fails_before_training(tiny_sdxl: Path, tmp_path: Path) -> None:
    from sdprep.train.loop.trainer import Trainer

    data = make_dataset(tmp_path / "data", images=["c_square.webp"], repeats=1, side=64, token="other")
    trainer = Trainer(ti_cfg(tiny_sdxl, data, tmp_path / "out"))
    with pytest.raises(ConfigError, match='none of the 1 training captions contains token_string "zork"'):
        trainer.setup()


def test_bad_init_word_and_taken_token(tiny_sdxl: Path, tmp_path: Path) -> None:
    from sdprep.train.methods.ti import TextualInversionMethod
    from sdprep.train.models.load import load_sdxl

    model = load_sdxl(tiny_sdxl)
    data = tmp_path / "data"
    with pytest.raises(ConfigError, match='init_word "" is empty for tokenizer: it tokenises to nothing'):
        TextualInversionMethod(ti_cfg(tiny_sdxl, data, tmp_path, init_word="  ")).setup(model, torch.float32)
    with pytest.raises(ConfigError, match="already has 1 of the tokens"):
        TextualInversionMethod(ti_cfg(tiny_sdxl, data, tmp_path, token_string="<|endoftext|>")).setup(
            load_sdxl(tiny_sdxl), torch.float32
        )


def test_multi_token_init_word_fills_vectors_in_turn(tiny_sdxl: Path, tmp_path: Path) -> None:
    from sdprep.train.methods.ti import TextualInversionMethod
    from sdprep.train.models.load import load_sdxl

    model = load_sdxl(tiny_sdxl)
    reference = model.text_encoder.get_input_embeddings().weight.detach().clone()
    method = TextualInversionMethod(
        ti_cfg(tiny_sdxl, tmp_path, tmp_path, init_word="blue sky", num_vectors_per_token=3)
    )
    method.setup(model, torch.float32)
    ids = model.tokenizer("blue sky", add_special_tokens=False).input_ids
    assert len(ids) == 2
    expected = torch.stack([reference[ids[0]], reference[ids[1]], reference[ids[0]]])
    assert torch.equal(method.initial["clip_l"], expected)
    assert any("is 2 tokens but num_vectors_per_token is 3" in n for n in method.notes)


def test_weights_continue_from_an_embedding(trained, tiny_sdxl: Path, tmp_path: Path) -> None:
    from sdprep.train.loop.trainer import RecordingCallbacks, Trainer

    data = make_dataset(tmp_path / "data", images=["c_square.webp"], repeats=1, side=64, token=TOKEN)
    start = load_file(trained.result.output)
    cfg = ti_cfg(tiny_sdxl, data, tmp_path / "out", weights=str(trained.result.output), max_train_steps=1)
    trainer = Trainer(cfg, callbacks=RecordingCallbacks())
    trainer.setup()
    assert torch.equal(trainer.method.initial["clip_g"], start["clip_g"])
    assert any("started from the embedding tiny.safetensors" in n for n in trainer.notes)
    trainer.run()
    assert not torch.equal(load_file(trainer.result.output)["clip_g"], start["clip_g"])

    wrong = ti_cfg(
        tiny_sdxl, data, tmp_path / "out2", weights=str(trained.result.output), num_vectors_per_token=3
    )
    with pytest.raises(ConfigError, match=r"set num_vectors_per_token = 2"):
        Trainer(wrong).setup()
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    with pytest.raises(ModelError, match="the file is empty"):
        Trainer(ti_cfg(tiny_sdxl, data, tmp_path / "out3", weights=str(empty))).setup()


def test_resume_state_holds_the_vectors(trained) -> None:
    state = trained.method.trainable_state()
    assert set(state) == {"clip_l", "clip_g"}
    before = {k: v.clone() for k, v in state.items()}
    with torch.no_grad():
        for layer in trained.method.layers:
            layer.vectors.zero_()
    trained.method.load_trainable_state(before)
    assert all(torch.equal(v, before[k]) for k, v in trained.method.trainable_state().items())
    assert json.loads(json.dumps(trained.method.metadata()))["ss_init_word"] == "woman"
