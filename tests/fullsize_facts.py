"""Facts about the real SDXL that tests check sdprep's outputs against, written from
../shared/reference/sdxl-fullsize.md (measured by running kohya sd-scripts and ComfyUI), not
derived from sdprep's code: kohya's LoRA module names, ComfyUI's SDXL detection rule, and the key
set of SDXL's single-file checkpoint (tests/assets/sdxl_single_file_keys.txt.gz)."""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable, Iterable
from pathlib import Path

KEYS_FILE = Path(__file__).resolve().parent / "assets" / "sdxl_single_file_keys.txt.gz"

# SGM transformer positions and their depths: input blocks 4,5 (2) and 7,8 (10), the middle block
# (10), output blocks 0-2 (10) and 3-5 (2).
TRANSFORMERS = {
    "input_blocks_4_1": 2,
    "input_blocks_5_1": 2,
    "input_blocks_7_1": 10,
    "input_blocks_8_1": 10,
    "middle_block_1": 10,
    **{f"output_blocks_{i}_1": 10 for i in (0, 1, 2)},
    **{f"output_blocks_{i}_1": 2 for i in (3, 4, 5)},
}
BLOCK_LAYERS = [f"{a}_{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out_0")]
BLOCK_LAYERS += ["ff_net_0_proj", "ff_net_2"]
RESNETS = [f"input_blocks_{i}_0" for i in (1, 2, 4, 5, 7, 8)] + ["middle_block_0", "middle_block_2"]
RESNETS += [f"output_blocks_{i}_0" for i in range(9)]
SKIPS = ["input_blocks_4_0", "input_blocks_7_0"] + [f"output_blocks_{i}_0" for i in range(9)]
SAMPLERS = ["input_blocks_3_0_op", "input_blocks_6_0_op", "output_blocks_2_2_conv", "output_blocks_5_2_conv"]
TE_LAYERS = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj"]
TE_LAYERS += ["mlp_fc1", "mlp_fc2"]


def kohya_unet_names(conv: bool = False) -> set[str]:
    """kohya's SDXL U-Net LoRA module names: 722, or 788 with conv_dim (3x3 convs, the 1x1 skip
    convs and time_emb_proj of every ResnetBlock2D, the down- and upsamplers)."""
    names = set()
    for where, depth in TRANSFORMERS.items():
        names |= {f"lora_unet_{where}_proj_in", f"lora_unet_{where}_proj_out"}
        names |= {f"lora_unet_{where}_transformer_blocks_{b}_{x}" for b in range(depth) for x in BLOCK_LAYERS}
    if conv:
        for res in RESNETS:
            names |= {f"lora_unet_{res}_{x}" for x in ("in_layers_2", "out_layers_3", "emb_layers_1")}
        names |= {f"lora_unet_{s}_skip_connection" for s in SKIPS}
        names |= {f"lora_unet_{s}" for s in SAMPLERS}
    return names


def kohya_te_names() -> set[str]:
    """kohya's text-encoder LoRA module names: 72 for CLIP-L (te1), 192 for bigG (te2)."""
    return {
        f"lora_te{n}_text_model_encoder_layers_{i}_{x}"
        for n, layers in ((1, 12), (2, 32))
        for i in range(layers)
        for x in TE_LAYERS
    }


def lora_modules(keys: Iterable[str]) -> set[str]:
    """Module names of a kohya LoRA file (from its `.lora_down.weight` keys)."""
    return {k.removesuffix(".lora_down.weight") for k in keys if k.endswith(".lora_down.weight")}


def single_file_keys() -> set[str]:
    """The weight names of SDXL 1.0's single-file checkpoint (U-Net, CLIP-L, bigG, VAE)."""
    return set(gzip.decompress(KEYS_FILE.read_bytes()).decode().split())


def comfyui_detects_sdxl(shape: Callable[[str], tuple[int, ...] | None], keys: Iterable[str]) -> list[str]:
    """ComfyUI's SDXL detection (comfy/model_detection.py, 0.3.64) on a single file, given its keys
    and a `shape(key)` lookup; returns the reasons it would fail ([] = detected as SDXL).

    Detected when model_channels (input_blocks.0.0 out channels) is 320, transformer_depth per input
    block is [0, 0, 2, 2, 10, 10], context_dim (attn2.to_k in features) 2048, adm_in_channels
    (label_emb.0.0 in features) 2816 and the transformers use linear projections."""
    p = "model.diffusion_model."
    keys = list(keys)
    problems = []
    conv_in = shape(p + "input_blocks.0.0.weight")
    if conv_in is None or conv_in[0] != 320:
        problems.append(f"model_channels {conv_in and conv_in[0]} != 320")
    blocks = sorted(
        {int(m.group(1)) for k in keys if (m := re.match(re.escape(p) + r"input_blocks\.(\d+)\.", k))}
    )
    depth = []
    for i in blocks:
        if f"{p}input_blocks.{i}.0.in_layers.0.weight" not in keys:
            continue  # a downsampler or conv_in
        found = {
            int(m.group(1))
            for k in keys
            if (m := re.match(re.escape(f"{p}input_blocks.{i}.1.transformer_blocks.") + r"(\d+)\.", k))
        }
        depth.append(max(found) + 1 if found else 0)
    if depth != [0, 0, 2, 2, 10, 10]:
        problems.append(f"transformer_depth {depth} != [0, 0, 2, 2, 10, 10]")
    to_k = sorted(k for k in keys if k.endswith("transformer_blocks.0.attn2.to_k.weight"))
    context = shape(to_k[0])[1] if to_k else None
    if context != 2048:
        problems.append(f"context_dim {context} != 2048")
    adm = shape(p + "label_emb.0.0.weight")
    if adm is None or adm[1] != 2816:
        problems.append(f"adm_in_channels {adm and adm[1]} != 2816")
    proj_in = sorted(k for k in keys if k.endswith(".1.proj_in.weight"))
    if not proj_in or len(shape(proj_in[0])) != 2:
        problems.append("transformers do not use linear projections")
    return problems
