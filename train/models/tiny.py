"""A tiny random model with SDXL's exact architecture layout, built offline in well under a second.

It is what tests, the demo and `sdprep train --preflight` use in place of the real 6.6 GB SDXL: the
U-Net keeps SDXL's block structure (so key names map to the original SGM names exactly as on the
real model), both CLIP text encoders and their tokenizers are real transformers classes, and the
VAE has four levels so latents are 1/8 of the image. The weights are random: it is a DEMO model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TINY_H1 = 32  # CLIP-L stand-in hidden size
TINY_H2 = 64  # CLIP-G stand-in hidden size
TIME_EMBED = 8
MARKER = "SDPREP_TINY_DEMO_MODEL.txt"

# Words given their own BPE token so captions in tests tokenise to realistic lengths.
_WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "girl",
    "boy",
    "1girl",
    "solo",
    "hair",
    "eyes",
    "blue",
    "pink",
    "red",
    "black",
    "white",
    "long",
    "short",
    "smile",
    "looking",
    "at",
    "viewer",
    "background",
    "simple",
    "greyscale",
    "monochrome",
    "sky",
    "cloud",
    "tree",
    "cat",
    "dog",
    "dress",
    "shirt",
    "portrait",
    "woman",
    "man",
    "person",
    "style",
    "high",
    "quality",
    "low",
    "mytoken",
    "sks",
    "toy",
    "landscape",
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> int:
    """Write a small CLIP-style byte-level BPE tokenizer (vocab.json, merges.txt); returns its size."""
    chars = list(bytes_to_unicode().values())
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    known = set(vocab)
    for word in _WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            a, b = symbols[0], symbols[1]
            merged = a + b
            if (a, b) not in merges:
                merges.append((a, b))
            if merged not in known:
                vocab.append(merged)
                known.add(merged)
            symbols = [merged, *symbols[2:]]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return write_tokenizer_files(folder, vocab, merges, pad_token)


def write_tokenizer_files(
    folder: Path, vocab: list[str], merges: list[tuple[str, str]], pad_token: str = "<|endoftext|>"
) -> int:
    """Write a CLIP BPE tokenizer folder `CLIPTokenizer.from_pretrained` reads; returns the vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(
        json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False)
    )
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    config = {
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")})
    )
    return len(vocab)


def build_tiny_sdxl_components(
    seed: int = 0, tokenizer_dir: Path | None = None
) -> tuple[Any, Any, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, CLIPTokenizer, Any]:
    """Build the tiny pipeline's components in memory: (unet, vae, te1, te2, tok1, tok2, scheduler)."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdprep.train.models.fullsize import SCHEDULER

    torch.manual_seed(seed)
    tmp = Path(tokenizer_dir or tempfile.mkdtemp(prefix="sdprep-tok-"))
    size = write_clip_tokenizer(tmp / "tokenizer")
    write_clip_tokenizer(tmp / "tokenizer_2", pad_token="!")  # SDXL's tokenizer 2 pads with id 0 ("!")
    tok1 = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(tmp / "tokenizer_2")
    eos = tok1.convert_tokens_to_ids("<|endoftext|>")
    bos = tok1.convert_tokens_to_ids("<|startoftext|>")

    def te_config(hidden: int, act: str, projection: int | None = None) -> CLIPTextConfig:
        kw = dict(
            vocab_size=size,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=3,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act=act,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=1,
        )
        if projection:
            kw["projection_dim"] = projection
        return CLIPTextConfig(**kw)

    te1 = CLIPTextModel(te_config(TINY_H1, "quick_gelu"))
    te2 = CLIPTextModelWithProjection(te_config(TINY_H2, "gelu", projection=TINY_H2))
    unet = UNet2DConditionModel(
        sample_size=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        norm_num_groups=8,
        use_linear_projection=True,
        cross_attention_dim=TINY_H1 + TINY_H2,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=6 * TIME_EMBED + TINY_H2,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.13025,
    )
    scheduler = EulerDiscreteScheduler(**SCHEDULER)  # SDXL base's
    return unet, vae, te1, te2, tok1, tok2, scheduler


def build_tiny_sdxl(out_dir: Path | str, seed: int = 0) -> Path:
    """Save a tiny SDXL-architecture diffusers pipeline folder (about 14 MB) and return its path."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # no torchvision fallback notices for a demo build
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    # the module itself: mypy reads `diffusers.X` as the no-torch placeholder classes
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline

    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").exists() and (out_dir / MARKER).exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    unet, vae, te1, te2, tok1, tok2, scheduler = build_tiny_sdxl_components(
        seed, tokenizer_dir=out_dir / ".tok"
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tok1,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / MARKER).write_text(
        "A tiny SDXL-architecture model with RANDOM weights, made by sdprep for tests and demos.\n"
        "It produces noise. Pass a real SDXL model (diffusers folder or .safetensors) for real training.\n"
    )
    import shutil

    shutil.rmtree(out_dir / ".tok", ignore_errors=True)
    return out_dir


def is_tiny_model(path: Path | str) -> bool:
    return (Path(path) / MARKER).exists()
