"""The tagger / captioner protocols and the registry that names them.

A Tagger turns images into raw `{tag: score}` dicts plus a category per tag; a Captioner turns
images (and a prompt per image) into natural-language text. Heavy imports (onnxruntime, torch,
transformers) happen inside `load()`, never at module import, so the CLI starts fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from PIL import Image

from sdprep.errors import ConfigError, unknown_choice

# WD14 / booru tag categories as in selected_tags.csv
CATEGORY_GENERAL = "general"
CATEGORY_CHARACTER = "character"
CATEGORY_RATING = "rating"
CATEGORY_COPYRIGHT = "copyright"
CATEGORY_ARTIST = "artist"
CATEGORY_META = "meta"

T = TypeVar("T")  # what a registry's factories make


@dataclass
class TagScores:
    """Raw model output for one image: every kept tag's score and category, and what produced them."""

    scores: dict[str, float]
    categories: dict[str, str]
    model: str
    extra: dict[str, Any] = field(default_factory=dict)  # more of the sidecar record (rating, mcut...)


@runtime_checkable
class Tagger(Protocol):
    name: str  # a stable id recorded with the scores, e.g. "wd14:SmilingWolf/wd-swinv2-tagger-v3"

    def load(self) -> None: ...
    def tag(self, images: list[Image.Image]) -> list[TagScores]: ...


@runtime_checkable
class Captioner(Protocol):
    name: str  # e.g. "hf:llava-hf/llava-1.5-7b-hf" or "openai:http://127.0.0.1:11434/v1#llava"

    def load(self) -> None: ...
    def caption(self, images: list[Image.Image], prompts: list[str]) -> list[str]: ...


class Registry(Generic[T]):
    """Factories keyed by a scheme name (`wd14`, `hf`, `openai`); duplicate names raise."""

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str, factory: Callable[..., T]) -> None:
        if name in self._factories:
            raise ConfigError(f"{self.kind} {name!r} is already registered")
        self._factories[name] = factory

    def names(self) -> list[str]:
        return sorted(self._factories)

    def create(self, spec: str, **kwargs: Any) -> T:
        """Create from `scheme:argument` (e.g. `hf:llava-hf/llava-1.5-7b-hf`)."""
        scheme, _, arg = spec.partition(":")
        if scheme not in self._factories:
            raise unknown_choice(self.kind, scheme, self._factories)
        return self._factories[scheme](arg, **kwargs)


TAGGERS: Registry[Tagger] = Registry("tagger")
CAPTIONERS: Registry[Captioner] = Registry("captioner")
