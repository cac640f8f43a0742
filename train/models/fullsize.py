"""SDXL's real architecture, and a topology-true test model that real clients recognise as SDXL.

`FULL` holds the configs of stabilityai/stable-diffusion-xl-base-1.0 (U-Net 2.57 B parameters,
CLIP-L 123 M, OpenCLIP bigG 695 M, VAE 84 M): the memory planner builds it on meta/fake tensors
and the full-size benchmark with random weights.

`TOPOLOGY` is the smallest model with SDXL's exact topology: every block, layer and key of the
real model (the single-file key set is the real one), transformer depths [0, 2, 10], context
2048, adm 2816, 320 model channels, head width 64, CLIP-L's 12 and bigG's 32 layers at their real
hidden sizes (768, 1280: TI vectors have real shapes) and CLIP's real 49408-token tokenizer.
Only widths that ComfyUI's SDXL detection does not look at are narrow: the level channels
(320, 640, 320 instead of 320, 640, 1280; ComfyUI reads them as channel_mult 1, 2, 1), the text
encoders' MLP width and the VAE's channels. About 750 M parameters (3 GB in fp32); it builds in
seconds and trains on 2 CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdprep.train.models.clip_vocab import VOCAB_SIZE

if TYPE_CHECKING:
    from sdprep.train.models.load import SDXLModel

BOS, EOS = VOCAB_SIZE - 2, VOCAB_SIZE - 1
MARKER = "SDPREP_TOPOLOGY_TEST_MODEL.txt"

_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),  # diffusers' name for the number of heads (64 wide each)
    "cross_attention_dim": 2048,
    "norm_num_groups": 32,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
_TE1 = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "pad_token_id": EOS,
}
_TE2 = {**_TE1, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32}
_TE2.update(num_attention_heads=20, hidden_act="gelu", projection_dim=1280, pad_token_id=0)
_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}


@dataclass(frozen=True)
class SdxlSpec:
    """The constructor arguments of the four SDXL models (diffusers / transformers configs)."""

    name: str
    unet: dict[str, Any] = field(default_factory=dict)
    te1: dict[str, Any] = field(default_factory=dict)
    te2: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: SDXLModel, name: str = "model") -> SdxlSpec:
        """The spec of a loaded `SDXLModel` (its modules' configs)."""

        def public(config: Any) -> dict[str, Any]:
            items = config.items() if hasattr(config, "items") else config.to_dict().items()
            return {k: v for k, v in items if not k.startswith("_")}

        return cls(
            name,
            unet=public(model.unet.config),
            te1=public(model.text_encoder.config),
            te2=public(model.text_encoder_2.config),
            vae=public(model.vae.config),
        )


FULL = SdxlSpec("SDXL 1.0 (full size)", unet=_UNET, te1=_TE1, te2=_TE2, vae=_VAE)
TOPOLOGY = replace(
    FULL,
    name="topology-true SDXL (narrow)",
    unet={**_UNET, "block_out_channels": (320, 640, 320), "attention_head_dim": (5, 10, 5)},
    te1={**_TE1, "intermediate_size": 64},
    te2={**_TE2, "intermediate_size": 64},
    vae={**_VAE, "block_out_channels": (32, 64, 128, 128)},
)


def build_unet(config: dict[str, Any]) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(config)


def build_text_encoders(spec: SdxlSpec) -> tuple[Any, Any]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    known = set(CLIPTextConfig().to_dict())

    def config(values: dict[str, Any]) -> Any:
        return CLIPTextConfig(**{k: v for k, v in values.items() if k in known})

    return CLIPTextModel(config(spec.te1)), CLIPTextModelWithProjection(config(spec.te2))


def build_vae(config: dict[str, Any]) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(config)


def build_components(spec: SdxlSpec, seed: int = 0) -> tuple[Any, Any, Any, Any]:
    """(unet, vae, te1, te2) with random weights, built on torch's current default device
    (wrap in `with torch.device("meta"):` for shapes only)."""
    import torch

    torch.manual_seed(seed)
    te1, te2 = build_text_encoders(spec)
    return build_unet(spec.unet), build_vae(spec.vae), te1, te2


def build_topology_sdxl(out_dir: Path | str, seed: int = 0, spec: SdxlSpec = TOPOLOGY) -> Path:
    """Save the topology-true SDXL as a diffusers folder (about 3 GB in fp32) and return its path.

    Built once: a folder that already holds a finished build is returned as it is.
    """
    from diffusers import EulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
        StableDiffusionXLPipeline,  # not diffusers.X (a placeholder to mypy)
    )
    from transformers import CLIPTokenizer

    from sdprep.train.models.clip_vocab import write_real_clip_tokenizer
    from sdprep.train.models.load import quiet_libraries

    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").exists() and (out_dir / MARKER).exists():
        return out_dir
    quiet_libraries()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_real_clip_tokenizer(out_dir / ".tok" / "tokenizer")
    write_real_clip_tokenizer(out_dir / ".tok" / "tokenizer_2", pad_token="!")  # SDXL's pads with id 0
    unet, vae, te1, te2 = build_components(spec, seed)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=CLIPTokenizer.from_pretrained(out_dir / ".tok" / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(out_dir / ".tok" / "tokenizer_2"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER),  # type: ignore[arg-type]  # diffusers annotates it as an enum
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / MARKER).write_text(
        f"{spec.name}: SDXL's topology with RANDOM weights, made by sdprep for tests. It produces noise.\n"
    )
    import shutil

    shutil.rmtree(out_dir / ".tok", ignore_errors=True)
    return out_dir
