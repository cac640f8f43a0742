"""SDXL's base configuration, shipped with sdprep so a standard single file loads offline.

A single-file checkpoint (A1111/ComfyUI `.safetensors`: SDXL base, Pony, Illustrious, NoobAI...)
holds only weights; diffusers needs the component configs and tokenizers to build the pipeline and
otherwise fetches them from the hub. `sdxl_base/` holds SDXL 1.0's configs (model_index, U-Net,
VAE, both text encoders, scheduler, tokenizer settings); the tokenizers' vocabulary and merges are
CLIP's, from the BPE file `clip_vocab` reads. `base_config()` writes a complete diffusers config
folder (no weights) to pass as `config=`.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

BASE_DIR = Path(__file__).parent / "sdxl_base"
TOKENIZER_PADS = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}  # SDXL's second pads with id 0


def write_base_config(folder: Path) -> Path:
    """Write SDXL base's diffusers config folder (configs + tokenizer files, no weights) to `folder`."""
    from sdprep.train.models.clip_vocab import clip_bpe
    from sdprep.train.models.tiny import write_tokenizer_files

    vocab, merges = clip_bpe()
    for sub, pad in TOKENIZER_PADS.items():
        write_tokenizer_files(folder / sub, vocab, merges, pad)
    # SDXL's own tokenizer settings replace the generic ones written above
    shutil.copytree(BASE_DIR, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.txt"))
    return folder


# (key, shape) pairs that fix SDXL 1.0's sizes: U-Net width, cross-attention width (CLIP-L + bigG),
# size-conditioning input, and both text encoders' widths
STANDARD_SHAPES = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
    "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
    "conditioner.embedders.1.model.ln_final.weight": (1280,),
}


def nonstandard_reason(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why a single file's `{key: shape}` is not SDXL 1.0's architecture (what the shipped config
    builds), or None when its marker tensors have SDXL's sizes."""
    for key, want in STANDARD_SHAPES.items():
        got = shapes.get(key)
        if got is None:
            return f"it has no {key}"
        if tuple(got) != want:
            return f"{key} is {list(got)}, SDXL's is {list(want)}"
    return None


@contextlib.contextmanager
def base_config() -> Iterator[Path]:
    """A temporary SDXL base config folder for `from_single_file(config=...)`, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="sdprep-sdxl-config-") as tmp:
        yield write_base_config(Path(tmp))
