"""Training methods by name; each lives in its own module and is imported only when used."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from sdprep.errors import unknown_choice

if TYPE_CHECKING:
    from sdprep.train.config.schema import TrainConfig
    from sdprep.train.methods.base import TrainMethod

# name -> "module:class"; textual inversion and fine-tune register here the same way.
METHODS: dict[str, str] = {
    "lora": "sdprep.train.methods.lora:LoraMethod",
    "ti": "sdprep.train.methods.ti:TextualInversionMethod",
    "finetune": "sdprep.train.methods.finetune:FinetuneMethod",
}


def method_class(name: str) -> type[TrainMethod]:
    """The TrainMethod subclass for `name` ("lora", "ti", "finetune")."""
    if name not in METHODS:
        raise unknown_choice("training method", name, METHODS)
    module, attr = METHODS[name].split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        from sdprep.errors import ConfigError

        raise ConfigError(f'training method "{name}" is not available in this version of sdprep') from exc
    from sdprep.train.methods.base import TrainMethod

    cls = getattr(mod, attr)
    if not (isinstance(cls, type) and issubclass(cls, TrainMethod)):
        raise TypeError(f"{METHODS[name]} is not a TrainMethod")  # a wrong entry in METHODS
    return cls


def make_method(name: str, cfg: TrainConfig) -> TrainMethod:
    """Instantiate the method `name` for config `cfg` (LoRA with network_module "lycoris.kohya" is
    a LyCORIS network)."""
    if name == "lora" and cfg.network_module == "lycoris.kohya":
        from sdprep.train.methods.lycoris import LycorisMethod, require_lycoris

        require_lycoris()
        return LycorisMethod(cfg)
    return method_class(name)(cfg)
