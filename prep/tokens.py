"""CLIP token counts with the target model's real tokenizer, and the 75 / 150 / 225 audit.

SDXL's first text encoder is CLIP ViT-L/14; its BPE tokenizer sees 75 caption tokens per chunk
(77 with start/end), and kohya's `max_token_length` allows 150 or 225 (2 or 3 chunks). A count here
is the number of caption tokens without start/end. transformers is imported only when a tokenizer
is loaded, so commands that do not count tokens never import it.
"""

from __future__ import annotations

import heapq
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdprep.errors import ModelError
from sdprep.hub import hub_offline, hub_reachable, is_hub_id

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_TOKENIZER = "stabilityai/stable-diffusion-xl-base-1.0"
LIMITS = (75, 150, 225)
# CLIP's byte-level BPE has at least 512 byte symbols; transformers 5 returns a 2-3 token tokenizer
# (every word -> end-of-text) for a folder without vocab files instead of failing.
MIN_VOCAB = 512
_VOCAB_FILES = ("vocab.json", "tokenizer.json")
_HINT = (
    "pass --tokenizer with a local folder: an SDXL diffusers model (its tokenizer/ subfolder is used) "
    "or a folder holding vocab.json and merges.txt (or tokenizer.json)"
)


class TokenCounter:
    """Counts caption tokens (no start/end tokens) with a loaded CLIP tokenizer; thread-safe."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, source: str) -> None:
        self.tokenizer = tokenizer
        self.source = source
        self._lock = threading.Lock()

    def __call__(self, text: str) -> int:
        with self._lock:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _has_vocab(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _VOCAB_FILES)


def _check(tokenizer: PreTrainedTokenizerBase, source: str) -> TokenCounter:
    size = len(tokenizer)
    if size < MIN_VOCAB:
        raise ModelError(
            f"{source}: the tokenizer loaded has only {size} tokens, so it is not a CLIP tokenizer "
            "(vocab.json / merges.txt missing?)",
            _HINT,
        )
    return TokenCounter(tokenizer, source)


def load_tokenizer(spec: str | Path | None = None) -> TokenCounter:
    """Load the CLIP tokenizer of a model: a local folder (or its `tokenizer/`), or a hub repo id.

    Offline (HF_HUB_OFFLINE=1) a repo id is looked up in the local Hugging Face cache only; a
    missing one is a ModelError saying how to pass a local folder.
    """
    spec = str(spec or DEFAULT_TOKENIZER)
    try:
        from transformers import CLIPTokenizer
    except ImportError as exc:
        raise ModelError(
            "counting CLIP tokens needs transformers", "install it: pip install 'sdprep[train]'"
        ) from exc
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            raise ModelError(f"{path}: a file holds no tokenizer", _HINT)
        folder = path / "tokenizer" if _has_vocab(path / "tokenizer") else path
        if not _has_vocab(folder):
            raise ModelError(f"{path}: no CLIP tokenizer in it or in its tokenizer/ folder", _HINT)
        try:
            return _check(CLIPTokenizer.from_pretrained(str(folder), local_files_only=True), str(folder))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{folder}: cannot load the tokenizer ({exc})", _HINT) from exc
    if not is_hub_id(spec):
        raise ModelError(f"{spec}: no such folder (and not a hub repo id such as {DEFAULT_TOKENIZER})", _HINT)
    offline = hub_offline()
    unreachable = not offline and not hub_reachable()  # look in the cache only: no ~23 s of retries
    errors = []
    for sub in ("tokenizer", None):
        kwargs: dict[str, Any] = {"subfolder": sub} if sub else {}
        try:
            tok = CLIPTokenizer.from_pretrained(spec, local_files_only=offline or unreachable, **kwargs)
        except Exception as exc:  # noqa: BLE001 - hub, HTTP and parsing errors of many kinds
            errors.append(exc)
            continue
        if len(tok) >= MIN_VOCAB:
            return TokenCounter(tok, spec if not sub else f"{spec}/{sub}")
        # transformers 5 answers a missing repo with a 2-3 token tokenizer instead of an error
        errors.append(ValueError(f"only {len(tok)} tokens loaded: no vocabulary files"))
    where = "not found"
    if offline or unreachable:
        why = "offline (HF_HUB_OFFLINE=1)" if offline else "the hub cannot be reached"
        where = f"{why} and not in the local Hugging Face cache"
    detail = f" ({errors[-1]})" if errors and not (offline or unreachable) else ""
    raise ModelError(f'cannot load the CLIP tokenizer "{spec}": {where}{detail}', _HINT)


@dataclass
class TokenAudit:
    """Caption token lengths: how many are over each CLIP limit, and the longest few (memory is flat)."""

    limits: tuple[int, ...] = LIMITS
    captions: int = 0
    total: int = 0
    over: dict[int, int] = field(default_factory=dict)
    longest: list[tuple[int, str]] = field(default_factory=list)  # a min-heap of the top `keep`
    keep: int = 5

    def add(self, path: Path | str, tokens: int) -> None:
        self.captions += 1
        self.total += tokens
        for limit in self.limits:
            if tokens > limit:
                self.over[limit] = self.over.get(limit, 0) + 1
        entry = (tokens, str(path))
        if len(self.longest) < self.keep:
            heapq.heappush(self.longest, entry)
        elif entry > self.longest[0]:
            heapq.heapreplace(self.longest, entry)

    def lines(self) -> list[str]:
        """The audit as short summary lines."""
        if not self.captions:
            return ["tokens: no captions"]
        over = ", ".join(f"{self.over.get(limit, 0)} over {limit}" for limit in self.limits)
        top = sorted(self.longest, reverse=True)
        lines = [
            f"tokens: {self.captions} captions, mean {self.total / self.captions:.1f}, max {top[0][0]}; {over}"
        ]
        if self.over.get(self.limits[0]):
            lines += [f"  {n} tokens: {p}" for n, p in top if n > self.limits[0]]
        return lines

    def as_dict(self) -> dict[str, Any]:
        return {
            "captions": self.captions,
            "over": {str(k): self.over.get(k, 0) for k in self.limits},
            "longest": sorted(self.longest, reverse=True),
        }
