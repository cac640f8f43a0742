"""Full fine-tune of SDXL: the U-Net, optionally both text encoders (each with its own learning rate).

As kohya's `sdxl_train.py`: the U-Net trains at `learning_rate` (0 freezes it); with
`train_text_encoder` text encoder 1 trains at `learning_rate_te1` and 2 at `learning_rate_te2`
(each defaulting to `learning_rate`; 0 freezes that encoder). Trainable weights are fp32 master
weights under mixed precision, or bf16 with `full_bf16` (with Adafactor / 8-bit Adam the 24 GB
recipe). An optional EMA (`ema`, `ema_decay`) is saved instead of the raw weights.

The output is ONE single-file SDXL checkpoint with the original (SGM) key names, which A1111,
Forge and ComfyUI load, cast to `save_precision`; `save_model_as = "diffusers"` (or
`save_diffusers_copy`) also writes a diffusers folder `<output_dir>/<name>/` at the end. Each saved
file is reloaded and checked: all keys and shapes, finite, and different from the starting weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sdprep.errors import ConfigError
from sdprep.train.methods.base import TrainMethod, allreduce_gradients, restore_tensors
from sdprep.train.save.checkpoint import Fingerprint, fingerprint, tensor_digest

if TYPE_CHECKING:
    from sdprep.train.config.schema import TrainConfig
    from sdprep.train.methods.ema import EMA
    from sdprep.train.models.load import SDXLModel

COMPONENTS = ("unet", "te1", "te2")


class FinetuneMethod(TrainMethod):
    name = "finetune"
    architecture = "stable-diffusion-xl-v1-base"
    title = "full fine-tune"

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        base = cfg.learning_rate
        lrs = {"unet": base}
        if cfg.train_text_encoder:
            lrs["te1"] = base if cfg.learning_rate_te1 is None else cfg.learning_rate_te1
            lrs["te2"] = base if cfg.learning_rate_te2 is None else cfg.learning_rate_te2
        elif cfg.learning_rate_te1 or cfg.learning_rate_te2:
            self.notes.append("learning_rate_te1 / learning_rate_te2 are ignored: train_text_encoder is off")
        self.lrs = {k: float(v) for k, v in lrs.items() if v and v > 0}
        frozen = sorted(set(lrs) - set(self.lrs))
        if frozen:
            self.notes.append(f"learning rate 0: {', '.join(frozen)} stays frozen (as kohya)")
        if not self.lrs:
            raise ConfigError("every learning rate is 0: nothing would train", "set learning_rate > 0")
        self.ema: EMA | None = None
        self._initial: dict[str, tuple[int, int, int]] = {}
        self._expected: dict[str, tuple[int, ...]] = {}
        self._vae_print: Fingerprint = {}

    # -- setup -----------------------------------------------------------------------------

    def _modules(self) -> dict[str, Any]:
        m = self.model
        return {"unet": m.unet, "te1": m.text_encoder, "te2": m.text_encoder_2}

    def trained(self) -> dict[str, Any]:
        """The modules that train, by component name."""
        return {k: v for k, v in self._modules().items() if k in self.lrs}

    def setup(self, model: SDXLModel, weight_dtype: torch.dtype) -> None:
        from sdprep.train.methods.ema import ema_of

        self.model = model
        vae: torch.nn.Module = model.vae  # diffusers' `.to` is @wraps(Module.to), which mypy misreads
        vae.requires_grad_(False)
        vae.to(dtype=weight_dtype)
        full = self.cfg.full_bf16 or self.cfg.full_fp16
        for key, module in self._modules().items():
            trains = key in self.lrs
            module.requires_grad_(trains)
            # trainable weights: fp32 master weights unless full_bf16/full_fp16 asks for half weights
            module.to(dtype=weight_dtype if (full or not trains) else torch.float32)
        if self.cfg.ema:
            self.ema = ema_of(self.trained(), self.cfg.ema_decay)
            if full and self.cfg.ema_decay > 0.999:
                self.notes.append(
                    f"ema with {'full_bf16' if self.cfg.full_bf16 else 'full_fp16'}: the average is kept in "
                    f"half precision, where ema_decay {self.cfg.ema_decay} is too close to 1 for updates to "
                    "register; use ema_decay <= 0.999 or train without full_bf16"
                )
        allreduce_gradients([p for key, m in self.trained().items() if key != "unet" for p in m.parameters()])
        self._initial = {k: tensor_digest(t) for k, t in self._saved_weights().items()}
        self._vae_print = fingerprint({"vae": model.vae}, set())

    def param_groups(self) -> list[dict[str, Any]]:
        return [
            {"params": [p for p in module.parameters() if p.requires_grad], "lr": self.lrs[key], "name": key}
            for key, module in self.trained().items()
        ]

    @property
    def trains_text_encoders(self) -> bool:
        return "te1" in self.lrs or "te2" in self.lrs

    @property
    def trains_unet(self) -> bool:
        return "unet" in self.lrs

    def train_modules(self) -> list[Any]:
        return list(self.trained().values())

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.step()

    # -- state for resume ------------------------------------------------------------------

    def trainable_state(self) -> dict[str, Any]:
        # no copies: a full SDXL U-Net is 10 GB in fp32; save_state moves each tensor to the CPU
        out = {
            f"{key}/{name}": p.detach()
            for key, module in self.trained().items()
            for name, p in module.named_parameters()
            if p.requires_grad
        }
        if self.ema is not None:
            out.update(self.ema.state_dict())
        return out

    def load_trainable_state(self, state: dict[str, Any]) -> None:
        restore_tensors(
            state,
            self.trainable_state(),
            what="fine-tune",
            hint="resume with the same train_text_encoder, learning rates (0 freezes a part) and ema settings",
            skip=("ema/",),  # the EMA copy is restored by the EMA
        )
        if self.ema is not None:
            self.ema.load_state_dict(state)

    # -- outputs ---------------------------------------------------------------------------

    def _saved_weights(self) -> dict[str, Any]:
        """The trained weights as they are saved: the EMA average when enabled, else the parameters
        (names `<component>/<parameter>`, no copies)."""
        if self.ema is not None:
            return dict(self.ema.averaged())
        return {
            f"{key}/{name}": p.detach()
            for key, module in self.trained().items()
            for name, p in module.named_parameters()
            if p.requires_grad
        }

    def export_tensors(self, dtype: torch.dtype) -> dict[str, Any]:
        from sdprep.train.save.checkpoint import model_tensors, prediction_markers

        replace: dict[str, dict[str, Any]] = {}
        if self.ema is not None:
            for name, t in self.ema.averaged().items():
                key, _, pname = name.partition("/")
                replace.setdefault(key, {})[pname] = t
        tensors = model_tensors(self.model, dtype, replace)
        tensors.update(prediction_markers(self.model.scheduler_config, self.cfg.v_parameterization))
        self._expected = {k: tuple(t.shape) for k, t in tensors.items()}
        return tensors

    def _unfaithful(self, tensors: dict[str, Any], weights: dict[str, Any]) -> list[str]:
        """File names whose tensor is not the trained weight in the file's dtype (U-Net and text
        encoder 1, whose names map one-to-one)."""
        from sdprep.train.save.sgm import (
            TE1_PREFIX,
            UNET_PREFIX,
            UnetLayout,
            unet_key_to_sgm,
            with_text_model,
        )

        layout = UnetLayout.from_config(self.model.unet.config)
        wrong = []
        for name, t in weights.items():
            key, _, pname = name.partition("/")
            if key == "unet":
                fname = UNET_PREFIX + unet_key_to_sgm(pname, layout)
            elif key == "te1":
                fname = TE1_PREFIX + with_text_model(pname)
            else:
                continue
            saved = tensors.get(fname)
            if saved is None or tensor_digest(saved) != tensor_digest(t.to(saved.dtype)):
                wrong.append(fname)
        return wrong

    def verify_tensors(self, tensors: dict[str, Any], trained: bool) -> list[str]:
        from sdprep.train.save.checkpoint import verify_checkpoint

        problems = verify_checkpoint(tensors, self._expected)
        weights = self._saved_weights()
        if not problems:
            wrong = self._unfaithful(tensors, weights)
            if wrong:
                problems.append(
                    f"{len(wrong)} tensors in the file differ from the trained weights (e.g. {wrong[0]})"
                )
        # in memory and full precision: early in a warmup a bf16 file may still round to the start values
        if trained and all(tensor_digest(t) == self._initial[k] for k, t in weights.items()):
            problems.append(
                "every trained weight equals its starting value: the model has not learned anything"
                + (" (the EMA average has not moved: lower ema_decay)" if self.ema is not None else "")
            )
        if fingerprint({"vae": self.model.vae}, set()) != self._vae_print:
            problems.append("the VAE changed during training (it must stay frozen)")
        return problems

    def metadata(self) -> dict[str, str]:
        return {
            "ss_train_text_encoder": str(self.trains_text_encoders),
            "ss_learning_rate_te1": str(self.lrs.get("te1")),
            "ss_learning_rate_te2": str(self.lrs.get("te2")),
            "ss_ema": str(bool(self.cfg.ema)),
            "ss_ema_decay": str(self.cfg.ema_decay) if self.cfg.ema else "None",
        }

    def extra_outputs(self, final_path: Path) -> list[Path]:
        cfg = self.cfg
        if cfg.save_model_as not in ("diffusers", "diffusers_safetensors") and not cfg.save_diffusers_copy:
            return []
        from sdprep.train.save.checkpoint import write_diffusers
        from sdprep.train.save.weights import save_dtype

        folder = final_path.with_suffix("")
        if self.ema is not None:
            with self.ema.swapped():
                return [write_diffusers(folder, self.model, save_dtype(cfg.save_precision))]
        return [write_diffusers(folder, self.model, save_dtype(cfg.save_precision))]
