"""Create taggers and captioners from a spec string, importing their modules only when asked.

`create_tagger("wd14:SmilingWolf/wd-swinv2-tagger-v3")` (a bare repo id or folder means WD14) and
`load_captioner("hf:REPO_OR_DIR" | "openai:URL[#model]", **options)`. The modules register their
factories in `sdprep.taggers.base` registries on import; nothing heavy loads before `load()`.
"""

from __future__ import annotations

import importlib
from typing import Any

from sdprep.taggers.base import TAGGERS, Captioner, Tagger

TAGGER_MODULES = {"wd14": "sdprep.taggers.wd14"}


def create_tagger(spec: str, **options: Any) -> Tagger:
    """A tagger (not loaded yet) for `scheme:argument`; a spec without a known scheme is a WD14 model."""
    scheme, sep, _ = spec.partition(":")
    if not sep or scheme not in TAGGER_MODULES:
        spec = f"wd14:{spec}"
        scheme = "wd14"
    importlib.import_module(TAGGER_MODULES[scheme])
    return TAGGERS.create(spec, **options)


def load_captioner(spec: str, **options: Any) -> Captioner:
    """A captioner (not loaded yet) for `hf:REPO_OR_DIR` or `openai:URL[#model]`."""
    from sdprep.taggers.captioners import load_captioner as load

    return load(spec, **options)
