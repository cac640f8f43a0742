"""CLIP's real 49408-token tokenizer, built offline from the BPE file OpenAI CLIP and open_clip ship.

`assets/bpe_simple_vocab_16e6.txt.gz` is that file byte for byte (as in open_clip_torch 3.3.0;
MIT licence, see assets/CLIP_BPE_LICENSE.txt). CLIP's vocabulary is derived from it: the 256
byte characters, the same with `</w>`, every merge of lines 1..48894 joined, then
`<|startoftext|>` (49406) and `<|endoftext|>` (49407). Both SDXL tokenizers use it; the second
pads with "!" (id 0). No download: the topology-true test model and the benchmark use it.
"""

from __future__ import annotations

import gzip
from pathlib import Path

BPE_FILE = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894


def clip_bpe(path: Path = BPE_FILE) -> tuple[list[str], list[tuple[str, str]]]:
    """(vocabulary in id order, merges in rank order) of CLIP's tokenizer, read from the BPE file."""
    from sdprep.train.models.tiny import bytes_to_unicode

    lines = gzip.decompress(Path(path).read_bytes()).decode("utf-8").split("\n")
    pairs = [line.split() for line in lines[1 : NUM_MERGES + 1]]
    if len(pairs) != NUM_MERGES or any(len(m) != 2 for m in pairs):
        raise ValueError(f"{path}: not CLIP's BPE file (expected {NUM_MERGES} merge lines)")
    merges = [(a, b) for a, b in pairs]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return vocab, merges


def write_real_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> int:
    """Write CLIP's real tokenizer as `vocab.json` + `merges.txt` into `folder`; returns 49408."""
    from sdprep.train.models.tiny import write_tokenizer_files

    vocab, merges = clip_bpe()
    return write_tokenizer_files(Path(folder), vocab, merges, pad_token)
