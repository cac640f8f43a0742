"""SDXL's base configuration, shipped with sdprep so a standard single file loads offline.

A single-file checkpoint (A1111/ComfyUI `.safetensors`: SDXL base, Pony, Illustrious, NoobAI...)
holds only weights; diffusers needs the component configs and tokenizers to build the pipeline and
otherwise fetches them from the hub. `sdxl_base/` holds SDXL 1.0's configs (model_index, U-Net,
VAE, both text encoders, scheduler, tokenizer settings) and CLIP's BPE merges (gzip); the
vocabulary is derived from the merges exactly as CLIP builds it. `base_config()` writes a complete
diffusers config folder (no weights) to pass as `config=`.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import shutil
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path

BASE_DIR = Path(__file__).parent / "sdxl_base"
MERGES_FILE = BASE_DIR / "clip_merges.txt.gz"
CLIP_VOCAB_SIZE = 49408
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def byte_chars() -> list[str]:
    """CLIP's (GPT-2's) reversible byte -> printable character table, in byte-symbol id order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = [chr(b) for b in printable]
    extra = 0
    for b in range(256):
        if b not in printable:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


@cache
def clip_merges() -> tuple[tuple[str, str], ...]:
    """CLIP's 48,894 BPE merges in rank order."""
    lines = gzip.decompress(MERGES_FILE.read_bytes()).decode("utf-8").splitlines()
    return tuple(tuple(line.split(" ")) for line in lines if line)  # type: ignore[misc]


def clip_vocab() -> dict[str, int]:
    """CLIP's vocabulary: 256 byte symbols, the same with `</w>`, every merge, then the two specials."""
    chars = byte_chars()
    tokens = [*chars, *(c + "</w>" for c in chars), *(a + b for a, b in clip_merges()), *SPECIAL_TOKENS]
    return {tok: i for i, tok in enumerate(tokens)}


def write_base_config(folder: Path) -> Path:
    """Write SDXL base's diffusers config folder (configs + tokenizer files, no weights) to `folder`."""
    shutil.copytree(BASE_DIR, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.gz", "*.txt"))
    vocab = json.dumps(clip_vocab(), ensure_ascii=False)
    merges = "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in clip_merges()) + "\n"
    for sub in ("tokenizer", "tokenizer_2"):
        (folder / sub / "vocab.json").write_text(vocab, encoding="utf-8")
        (folder / sub / "merges.txt").write_text(merges, encoding="utf-8")
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
