"""Weight names between diffusers and the ORIGINAL (SGM/LDM) SDXL layout that A1111/ComfyUI use.

- Single-file checkpoints: U-Net under `model.diffusion_model.` (input_blocks / middle_block /
  output_blocks), CLIP-L under `conditioner.embedders.0.transformer.text_model.` (Hugging Face
  names), OpenCLIP bigG under `conditioner.embedders.1.model.` (fused in_proj q/k/v, transposed
  text_projection), VAE under `first_stage_model.` (LDM names, 1x1-conv attention).
- kohya LoRA module names: the SGM module path with "." -> "_" after `lora_unet_`, and the
  Hugging Face text-model path after `lora_te1_` / `lora_te2_`.

Mappings are derived from the block layout (layers_per_block, which up blocks have attention),
so they hold for SDXL and for the tiny SDXL-shaped test model alike. Tests check them against
diffusers' own loaders (`from_single_file`, `load_lora_weights`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    # the modules themselves: mypy reads `diffusers.X` as the no-torch placeholder classes
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

UNET_PREFIX = "model.diffusion_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."
VAE_PREFIX = "first_stage_model."
LORA_PREFIXES = {"unet": "lora_unet", "te1": "lora_te1", "te2": "lora_te2"}


@dataclass(frozen=True)
class UnetLayout:
    """What the U-Net key mapping depends on (SDXL: 2 resnets per down block, attention in the
    first two up blocks)."""

    layers_per_block: int = 2
    up_attention: tuple[bool, ...] = (True, True, False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UnetLayout:
        lpb = config["layers_per_block"]
        lpb = lpb if isinstance(lpb, int) else lpb[0]
        return cls(lpb, tuple("CrossAttn" in t for t in config["up_block_types"]))

    @classmethod
    def from_keys(cls, keys: Iterable[str]) -> UnetLayout:
        keys = list(keys)
        down = {int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))}
        ups = {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.", k))}
        attn = {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
        if not down or not ups:
            raise ValueError("not a diffusers UNet2DConditionModel state dict (no down_blocks / up_blocks)")
        return cls(max(down) + 1, tuple(i in attn for i in range(max(ups) + 1)))


SDXL_LAYOUT = UnetLayout()

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_BLOCK = re.compile(
    r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$"
)
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")


def _join(*parts: str | None) -> str:
    return ".".join(p for p in parts if p)


def _resnet_rest(rest: str | None) -> str | None:
    if not rest:
        return rest
    head, _, tail = rest.partition(".")
    return _join(_RESNET.get(head, head), tail)


def unet_key_to_sgm(key: str, layout: UnetLayout = SDXL_LAYOUT) -> str:
    """One diffusers U-Net parameter or module name -> its SGM name (without `model.diffusion_model.`)."""
    for src, dst in _UNET_TOP.items():
        if key == src or key.startswith(src + "."):
            return dst + key[len(src) :]
    n = layout.layers_per_block + 1
    if m := _BLOCK.match(key):
        kind, i, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if kind == "down_blocks":
            if part == "resnets":
                return _join(f"input_blocks.{1 + i * n + j}.0", _resnet_rest(rest))
            if part == "attentions":
                return _join(f"input_blocks.{1 + i * n + j}.1", rest)
            return _join(
                f"input_blocks.{(i + 1) * n}.0.op", (rest or "").removeprefix("conv").lstrip(".") or None
            )
        if part == "resnets":
            return _join(f"output_blocks.{i * n + j}.0", _resnet_rest(rest))
        if part == "attentions":
            return _join(f"output_blocks.{i * n + j}.1", rest)
        slot = 2 if i < len(layout.up_attention) and layout.up_attention[i] else 1
        return _join(f"output_blocks.{i * n + n - 1}.{slot}", rest)
    if m := _MID.match(key):
        part, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if part == "resnets":
            return _join(f"middle_block.{2 * j}", _resnet_rest(rest))
        return _join("middle_block.1", rest)
    raise ValueError(f"no SGM name for U-Net key {key!r}")


def unet_diffusers_to_sgm(state_dict: Mapping[str, Any], layout: UnetLayout | None = None) -> dict[str, Any]:
    """A diffusers U-Net state dict -> `model.diffusion_model.*` keys (tensors are not copied)."""
    layout = layout or UnetLayout.from_keys(state_dict)
    return {UNET_PREFIX + unet_key_to_sgm(k, layout): v for k, v in state_dict.items()}


def sgm_to_unet_diffusers(state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """SGM U-Net keys (with or without `model.diffusion_model.`) -> diffusers keys, by diffusers'
    own converter; `config` is the diffusers U-Net config (`unet.config`)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    sd = {k if k.startswith(UNET_PREFIX) else UNET_PREFIX + k: v for k, v in state_dict.items()}
    out: dict[str, Any] = convert_ldm_unet_checkpoint(sd, dict(config))
    return out


# -- text encoders ---------------------------------------------------------------------------


def with_text_model(key: str) -> str:
    """transformers 5 CLIPTextModel drops the `text_model.` level; put it back (idempotent)."""
    if key.startswith("text_model.") or key.startswith("text_projection") or key == "logit_scale":
        return key
    return "text_model." + key


def te1_to_sgm(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """CLIP-L (CLIPTextModel) state dict -> `conditioner.embedders.0.transformer.text_model.*`."""
    return {
        TE1_PREFIX + with_text_model(k): v for k, v in state_dict.items() if not k.endswith("position_ids")
    }


_TE2_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)$")
_TE2_RENAME = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_TE2_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def te2_to_sgm(state_dict: Mapping[str, Any], logit_scale: torch.Tensor | None = None) -> dict[str, Any]:
    """OpenCLIP bigG (CLIPTextModelWithProjection) -> `conditioner.embedders.1.model.*`: q/k/v fused
    into `attn.in_proj_*`, `text_projection` transposed (OpenCLIP multiplies x @ P)."""
    import torch

    sd = {with_text_model(k): v for k, v in state_dict.items() if not k.endswith("position_ids")}
    out: dict[str, Any] = {}
    qkv: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in sd.items():
        if key in _TE2_TOP:
            out[TE2_PREFIX + _TE2_TOP[key]] = value
        elif key == "text_projection.weight":
            out[TE2_PREFIX + "text_projection"] = value.T.contiguous()
        elif key == "logit_scale":
            out[TE2_PREFIX + "logit_scale"] = value
        elif m := _TE2_LAYER.match(key):
            layer, rest = m.group(1), m.group(2)
            if q := re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", rest):
                qkv.setdefault((layer, q.group(2)), {})[q.group(1)] = value
                continue
            head, _, leaf = rest.rpartition(".")
            if head not in _TE2_RENAME:
                raise ValueError(f"no OpenCLIP name for text encoder 2 key {key!r}")
            out[f"{TE2_PREFIX}transformer.resblocks.{layer}.{_TE2_RENAME[head]}.{leaf}"] = value
        else:
            raise ValueError(f"no OpenCLIP name for text encoder 2 key {key!r}")
    for (layer, leaf), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"text encoder 2 layer {layer}: q/k/v {leaf} incomplete")
        fused = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        out[f"{TE2_PREFIX}transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = fused
    if logit_scale is not None:
        out[TE2_PREFIX + "logit_scale"] = torch.as_tensor(logit_scale, dtype=torch.float32)
    return out


# -- VAE -------------------------------------------------------------------------------------

_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def vae_key_to_sgm(key: str, num_up_blocks: int) -> str:
    """One diffusers AutoencoderKL key -> its LDM name (without `first_stage_model.`)."""
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    if m := re.match(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", rest):
        i = int(m.group(2)) if m.group(1) == "down" else num_up_blocks - 1 - int(m.group(2))
        return f"{side}.{m.group(1)}.{i}.block.{m.group(3)}.{_vae_resnet(m.group(4))}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.(.+)$", rest):
        return f"{side}.down.{m.group(1)}.downsample.{m.group(2)}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)$", rest):
        return f"{side}.up.{num_up_blocks - 1 - int(m.group(1))}.upsample.{m.group(2)}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)$", rest):
        return f"{side}.mid.block_{int(m.group(1)) + 1}.{_vae_resnet(m.group(2))}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)$", rest):
        if m.group(1) not in _VAE_ATTN:
            raise ValueError(f"no LDM name for VAE key {key!r}")
        return f"{side}.mid.attn_1.{_VAE_ATTN[m.group(1)]}.{m.group(2)}"
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest.removeprefix('conv_norm_out.')}"
    if rest.startswith(("conv_in.", "conv_out.")):
        return key
    raise ValueError(f"no LDM name for VAE key {key!r}")


def vae_to_sgm(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers AutoencoderKL state dict -> `first_stage_model.*` (attention as 1x1 convs)."""
    ups = {int(m.group(1)) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
    num_up = max(ups) + 1 if ups else 0
    out = {}
    for key, value in state_dict.items():
        name = vae_key_to_sgm(key, num_up)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]
        out[VAE_PREFIX + name] = value
    return out


def pipeline_to_sgm(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModelWithProjection,
    vae: AutoencoderKL,
) -> dict[str, Any]:
    """The four SDXL models -> one single-file state dict as A1111 / ComfyUI load it."""
    sd: dict[str, Any] = {}
    sd.update(unet_diffusers_to_sgm(unet.state_dict(), UnetLayout.from_config(unet.config)))
    sd.update(te1_to_sgm(text_encoder.state_dict()))
    sd.update(te2_to_sgm(text_encoder_2.state_dict()))
    sd.update(vae_to_sgm(vae.state_dict()))
    return sd


# -- kohya LoRA names ------------------------------------------------------------------------


def kohya_lora_name(module_name: str, prefix: str = "lora_unet", layout: UnetLayout = SDXL_LAYOUT) -> str:
    """A diffusers / transformers module path -> kohya's LoRA module name.

    `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` with prefix lora_unet ->
    `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`; `encoder.layers.0.self_attn.q_proj`
    with prefix lora_te1 -> `lora_te1_text_model_encoder_layers_0_self_attn_q_proj`.
    """
    if prefix == "lora_unet":
        path = unet_key_to_sgm(module_name, layout)
    elif prefix in ("lora_te1", "lora_te2", "lora_te"):
        path = with_text_model(module_name)
    else:
        raise ValueError(f"unknown kohya LoRA prefix {prefix!r}; valid: lora_unet, lora_te1, lora_te2")
    return f"{prefix}_{path.replace('.', '_')}"


def kohya_lora_names(
    module_names: Iterable[str], prefix: str = "lora_unet", layout: UnetLayout = SDXL_LAYOUT
) -> dict[str, str]:
    """`{kohya name: module path}` for a model's modules (to load a kohya LoRA back into them)."""
    out: dict[str, str] = {}
    for name in module_names:
        kname = kohya_lora_name(name, prefix, layout)
        if kname in out and out[kname] != name:
            raise ValueError(f"kohya name {kname} is ambiguous: {out[kname]} and {name}")
        out[kname] = name
    return out
