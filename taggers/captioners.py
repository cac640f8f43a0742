"""Entry point for the tag stage: `load_captioner("hf:REPO_OR_DIR" | "openai:URL[#model]", **options)`.

The backend modules are imported here, on first use (they are cheap: torch and transformers wait
for `load()`), and register their factories in `CAPTIONERS`.

Options (None values are ignored, so a CLI can pass every flag it has):
- both: `max_new_tokens`, `temperature` (0 = greedy), `top_p`, `system_prompt`
- hf: `device`, `dtype`, `load_in_4bit`, `trust_remote_code`, `revision`
- openai: `model`, `api_key_env`, `concurrency`, `timeout`, `retries`, `backoff`, `max_side`,
  `jpeg_quality`
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, TypeVar

from sdprep.config import from_dict
from sdprep.errors import ConfigError, did_you_mean
from sdprep.taggers.base import CAPTIONERS, Captioner

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

SCHEMES = {"hf": "hf:REPO_ID or hf:/path/to/model-folder", "openai": "openai:http://HOST:PORT/v1[#model]"}


def _register_backends() -> None:
    import sdprep.taggers.openai_compat  # noqa: F401  (registers "openai")
    import sdprep.taggers.vlm  # noqa: F401  (registers "hf")


def load_captioner(spec: str, **options: Any) -> Captioner:
    """A captioner (not yet loaded; call `.load()` or just `.caption()`) for `spec`."""
    scheme, sep, arg = spec.partition(":")
    if not sep or scheme not in SCHEMES:
        hint = "write " + " or ".join(SCHEMES.values())
        if scheme in ("http", "https"):
            hint = f"for an OpenAI-compatible server write openai:{spec}"
        elif not sep:
            hint = f"for a transformers model write hf:{spec}, for a server openai:URL"
        raise ConfigError(f'unknown captioner "{spec}"', hint)
    _register_backends()
    given = {k: v for k, v in options.items() if v is not None}
    return CAPTIONERS.create(spec, **given)


def option_names() -> dict[str, list[str]]:
    """The option names each captioner scheme accepts, e.g. for CLI help."""
    from sdprep.taggers.openai_compat import OpenAIOptions
    from sdprep.taggers.vlm import HFOptions

    return {
        scheme: [f.name for f in dataclasses.fields(cls)]
        for scheme, cls in (("hf", HFOptions), ("openai", OpenAIOptions))
    }


def parse_options(cls: type[T], options: dict[str, Any], scheme: str) -> T:
    """Strictly build an options dataclass; an option of the other backend gets a clear message."""
    names = [f.name for f in dataclasses.fields(cls)]
    known = {name for names_ in option_names().values() for name in names_}
    for key in options:
        if key in names:
            continue
        valid = f"{scheme}: options are " + ", ".join(names)
        if key in known:
            raise ConfigError(f'option "{key}" does not apply to {scheme}: captioners', valid)
        close = did_you_mean(key, names)
        raise ConfigError(f'unknown captioner option "{key}"', f"{close} {valid}" if close else valid)
    return from_dict(cls, options, where=f"{scheme} captioner")
