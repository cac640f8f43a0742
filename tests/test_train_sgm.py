"""SGM / kohya names checked against real external code: diffusers' from_single_file, its LDM
converter and load_lora_weights, on the tiny SDXL-layout model and the real SDXL architecture."""

from __future__ import annotations

import copy

import pytest
import torch

from sdprep.train.save.sgm import (
    TE1_PREFIX,
    TE2_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    UnetLayout,
    kohya_lora_name,
    kohya_lora_names,
    pipeline_to_sgm,
    sgm_to_unet_diffusers,
    te2_to_sgm,
    unet_diffusers_to_sgm,
    unet_key_to_sgm,
)

torch.set_num_threads(1)

TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@pytest.fixture(scope="module")
def sdxl_meta():
    """The real SDXL U-Net and text encoders (fullsize.FULL), on the meta device (no memory, no download)."""
    from accelerate import init_empty_weights

    from sdprep.train.models.fullsize import FULL, build_text_encoders, build_unet

    with init_empty_weights():
        unet = build_unet(FULL.unet)
        te1, te2 = build_text_encoders(FULL)
    return unet, te1, te2


@pytest.fixture(scope="module")
def pipe(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)


# -- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "prefix", "expected"),
    [
        (
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "lora_unet",
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        ),
        ("mid_block.attentions.0.proj_in", "lora_unet", "lora_unet_middle_block_1_proj_in"),
        (
            "up_blocks.0.attentions.0.transformer_blocks.9.ff.net.0.proj",
            "lora_unet",
            "lora_unet_output_blocks_0_1_transformer_blocks_9_ff_net_0_proj",
        ),
        (
            "up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_out.0",
            "lora_unet",
            "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_out_0",
        ),
        (
            "encoder.layers.0.self_attn.q_proj",
            "lora_te1",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        ),
        ("text_model.encoder.layers.31.mlp.fc2", "lora_te2", "lora_te2_text_model_encoder_layers_31_mlp_fc2"),
    ],
)
def test_kohya_lora_names(module, prefix, expected):
    assert kohya_lora_name(module, prefix) == expected


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("conv_in.weight", "input_blocks.0.0.weight"),
        ("time_embedding.linear_2.bias", "time_embed.2.bias"),
        ("add_embedding.linear_1.weight", "label_emb.0.0.weight"),
        ("down_blocks.0.resnets.1.norm1.weight", "input_blocks.2.0.in_layers.0.weight"),
        ("down_blocks.0.downsamplers.0.conv.weight", "input_blocks.3.0.op.weight"),
        ("down_blocks.1.resnets.0.conv_shortcut.bias", "input_blocks.4.0.skip_connection.bias"),
        ("mid_block.resnets.1.time_emb_proj.weight", "middle_block.2.emb_layers.1.weight"),
        ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.2.conv.weight"),
        ("up_blocks.2.resnets.2.conv2.weight", "output_blocks.8.0.out_layers.3.weight"),
        ("conv_norm_out.bias", "out.0.bias"),
    ],
)
def test_unet_key_names(key, expected):
    assert unet_key_to_sgm(key) == expected


def test_upsampler_slot_follows_attention():
    # an up block without attention puts its upsampler in slot 1
    layout = UnetLayout(layers_per_block=2, up_attention=(False, True, False))
    assert unet_key_to_sgm("up_blocks.0.upsamplers.0.conv.weight", layout) == "output_blocks.2.1.conv.weight"


def test_bad_names_fail():
    with pytest.raises(ValueError, match="no SGM name for U-Net key 'foo.weight'"):
        unet_key_to_sgm("foo.weight")
    with pytest.raises(ValueError, match="unknown kohya LoRA prefix"):
        kohya_lora_name("conv_in", "lora_vae")


def test_real_sdxl_architecture(sdxl_meta):
    """Every SDXL U-Net weight maps; diffusers' LDM converter maps the names back; kohya's
    default target sets have 722 U-Net and 72 + 192 text-encoder modules."""
    unet, te1, te2 = sdxl_meta
    sd = unet.state_dict()
    assert len(sd) == 1680
    sgm = unet_diffusers_to_sgm(sd)
    assert len(sgm) == 1680
    for key in (
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
        "input_blocks.6.0.op.weight",
        "middle_block.1.transformer_blocks.9.ff.net.2.weight",
        "output_blocks.5.2.conv.weight",
        "output_blocks.8.0.skip_connection.weight",
        "label_emb.0.2.bias",
    ):
        assert UNET_PREFIX + key in sgm, key
    back = sgm_to_unet_diffusers(sgm, unet.config)
    assert set(back) == set(sd)
    assert all(back[k] is sd[k] for k in sd)  # the converter moves the same tensors back

    layout = UnetLayout.from_config(unet.config)
    unet_targets = [
        n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and ".attentions." in n
    ]
    names = kohya_lora_names(unet_targets, "lora_unet", layout)
    assert len(names) == 722
    for prefix, te in (("lora_te1", te1), ("lora_te2", te2)):
        targets = [
            n
            for n, m in te.named_modules()
            if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in TE_TARGETS
        ]
        assert len(kohya_lora_names(targets, prefix)) == {"lora_te1": 72, "lora_te2": 192}[prefix]

    te2_sgm = te2_to_sgm(te2.state_dict())
    assert te2_sgm[TE2_PREFIX + "transformer.resblocks.9.attn.in_proj_weight"].shape == (3840, 1280)
    assert TE2_PREFIX + "transformer.resblocks.9.mlp.c_proj.bias" in te2_sgm  # diffusers' SDXL detection key


# -- against diffusers' loaders --------------------------------------------------------------


def test_single_file_round_trip_through_diffusers(tiny_sdxl, tmp_path, pipe):
    """Models with other weights (seed 1) -> single file -> from_single_file: every weight identical."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from sdprep.train.models.tiny import build_tiny_sdxl_components

    unet, vae, te1, te2, *_ = build_tiny_sdxl_components(seed=1, tokenizer_dir=tmp_path / "tok")
    sd = pipeline_to_sgm(unet, te1, te2, vae)
    assert {k.split(".")[0] for k in sd} == {"model", "conditioner", "first_stage_model"}
    assert any(k.startswith(TE1_PREFIX + "text_model.encoder.layers.0.") for k in sd)
    assert any(k.startswith(VAE_PREFIX + "encoder.mid.attn_1.q.") for k in sd)
    path = tmp_path / "single.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, path)

    loaded = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(tiny_sdxl), local_files_only=True
    )
    for name, model in (("unet", unet), ("text_encoder", te1), ("text_encoder_2", te2), ("vae", vae)):
        want, got = model.state_dict(), getattr(loaded, name).state_dict()
        assert set(got) == set(want), name
        bad = [k for k in want if not torch.equal(want[k], got[k])]
        assert bad == [], (name, bad[:3])
    # the file, not the config folder, supplied the weights
    assert not torch.equal(pipe.unet.conv_in.weight, loaded.unet.conv_in.weight)


def _kohya_lora(model, prefix, pick, layout, gen, rank=2, alpha=1.0):
    tensors, merged = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and pick(name):
            kname = kohya_lora_name(name, prefix, layout)
            down = torch.randn(rank, module.in_features, generator=gen) * 0.1
            up = torch.randn(module.out_features, rank, generator=gen) * 0.1
            tensors.update(
                {
                    f"{kname}.lora_down.weight": down,
                    f"{kname}.lora_up.weight": up,
                    f"{kname}.alpha": torch.tensor(alpha),
                }
            )
            merged[name] = (alpha / rank) * up @ down
    return tensors, merged


def test_kohya_named_lora_loads_in_diffusers_and_applies_to_every_module(pipe, tmp_path):
    from safetensors.torch import save_file

    pipe = copy.deepcopy(pipe)
    layout = UnetLayout.from_config(pipe.unet.config)
    gen = torch.Generator().manual_seed(0)
    parts = {
        "unet": _kohya_lora(pipe.unet, "lora_unet", lambda n: ".attentions." in n, layout, gen),
        "text_encoder": _kohya_lora(
            pipe.text_encoder, "lora_te1", lambda n: n.split(".")[-1] in TE_TARGETS, layout, gen
        ),
        "text_encoder_2": _kohya_lora(
            pipe.text_encoder_2, "lora_te2", lambda n: n.split(".")[-1] in TE_TARGETS, layout, gen, alpha=0.5
        ),
    }
    base = {name: copy.deepcopy(getattr(pipe, name)) for name in parts}
    reference = {name: copy.deepcopy(getattr(pipe, name)) for name in parts}
    with torch.no_grad():
        for name, (_, merged) in parts.items():
            for module, delta in merged.items():
                reference[name].get_submodule(module).weight += delta
    path = tmp_path / "kohya_lora.safetensors"
    save_file({k: v for _, (tensors, _) in parts.items() for k, v in tensors.items()}, path)
    assert len(parts["unet"][1]) > 100

    pipe.load_lora_weights(str(path))

    x = torch.randn(1, 4, 16, 16, generator=gen)
    cond = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=gen)
    added = {"text_embeds": torch.randn(1, 64, generator=gen), "time_ids": torch.randn(1, 6, generator=gen)}
    ids = torch.randint(0, pipe.tokenizer.vocab_size, (1, 77), generator=gen)
    with torch.no_grad():
        got = pipe.unet(x, torch.tensor([500]), cond, added_cond_kwargs=added).sample
        want = reference["unet"](x, torch.tensor([500]), cond, added_cond_kwargs=added).sample
        plain = base["unet"](x, torch.tensor([500]), cond, added_cond_kwargs=added).sample
        assert (got - want).abs().max() < 1e-5
        assert (plain - want).abs().max() > 1e-3  # the LoRA changes the output: the check can fail
        for name in ("text_encoder", "text_encoder_2"):
            got = getattr(pipe, name)(ids, output_hidden_states=True).hidden_states[-2]
            want = reference[name](ids, output_hidden_states=True).hidden_states[-2]
            plain = base[name](ids, output_hidden_states=True).hidden_states[-2]
            assert (got - want).abs().max() < 1e-5, name
            assert (plain - want).abs().max() > 1e-3, name


def test_names_map_is_invertible_on_tiny_model(pipe):
    layout = UnetLayout.from_config(pipe.unet.config)
    modules = [n for n, m in pipe.unet.named_modules() if list(m.parameters(recurse=False))]
    names = kohya_lora_names(modules, "lora_unet", layout)
    assert len(names) == len(modules)  # one kohya name per module, no collisions
    assert (
        names["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"]
        == "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    )
