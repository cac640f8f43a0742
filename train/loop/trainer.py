"""The training loop: accelerate, noise, SDXL conditioning, masked loss, periodic save/sample/log.

`train(cfg)` is the composition root: it loads the model, builds the method (LoRA, TI, fine-tune),
the dataset and its caches, the optimizer and scheduler, then steps. Progress goes to injected
`TrainCallbacks` (the CLI shows a bar, tests record). Periodic work is decided by the small pure
predicates `should_save`, `should_sample`, `should_log`. A NaN/inf loss stops the run with a
TrainingError naming the step; files saved before it stay valid (every save was verified).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdprep.errors import ConfigError, DatasetError, SdprepError, TrainingError
from sdprep.stage import chunked
from sdprep.train.config.precheck import precheck
from sdprep.train.loop.callbacks import RecordingCallbacks, TrainCallbacks, TrainResult
from sdprep.train.loop.interrupt import StopRequest
from sdprep.train.loop.optim import schedule_free_mode
from sdprep.train.loop.validation import should_validate
from sdprep.train.save.saver import RunFacts, Saver
from sdprep.train.save.weights import changed_settings

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from torch.optim.lr_scheduler import LRScheduler
    from transformers import PreTrainedModel

    from sdprep.progress import Reporter
    from sdprep.train.config.datasets import DatasetSpec
    from sdprep.train.config.schema import TrainConfig
    from sdprep.train.data.pipeline import Batch, TrainDataset
    from sdprep.train.data.scan import ImageRecord
    from sdprep.train.models.load import SDXLModel

    ModelArg = SDXLModel | str | Path | None  # a loaded model, or where to load one from

__all__ = [
    "RecordingCallbacks",
    "TrainCallbacks",
    "TrainResult",
    "Trainer",
    "schedule",
    "should_log",
    "should_sample",
    "should_save",
    "train",
]

# -- predicates ----------------------------------------------------------------------------


def should_save(cfg: TrainConfig, *, step: int | None = None, epoch: int | None = None, total: int) -> bool:
    """Save after optimizer step `step` (or at the end of epoch `epoch`, 1-based) but not at the very end
    (the final `<name>` file covers that)."""
    if step is not None:
        n = cfg.save_every_n_steps
        return n is not None and n != 0 and step % n == 0 and step < total
    n = cfg.save_every_n_epochs
    return n is not None and n != 0 and epoch is not None and epoch % n == 0 and epoch < total


def should_sample(cfg: TrainConfig, *, step: int | None = None, epoch: int | None = None) -> bool:
    """kohya's rule: sample_every_n_epochs wins over sample_every_n_steps; step 0 only with sample_at_first."""
    if not cfg.sample_prompts:
        return False
    if step == 0 and epoch is None:
        return bool(cfg.sample_at_first)
    if cfg.sample_every_n_epochs:
        return epoch is not None and epoch % cfg.sample_every_n_epochs == 0
    if cfg.sample_every_n_steps and step is not None and epoch is None:
        return step % cfg.sample_every_n_steps == 0
    return False


def should_log(step: int, every: int = 1) -> bool:
    return step % max(1, every) == 0


def schedule(num_batches: int, cfg: TrainConfig, num_processes: int = 1) -> tuple[int, int, int]:
    """(steps per epoch, total optimizer steps, epochs) as kohya computes them."""
    per_process = math.ceil(num_batches / num_processes)
    steps_per_epoch = max(1, math.ceil(per_process / cfg.gradient_accumulation_steps))
    if cfg.max_train_epochs:
        total = cfg.max_train_epochs * steps_per_epoch
    else:
        total = cfg.max_train_steps
    epochs = math.ceil(total / steps_per_epoch)
    return steps_per_epoch, total, epochs


def check_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise TrainingError(
            f"the loss became {loss} at step {step}: training stopped",
            "lower learning_rate, use mixed_precision bf16 instead of fp16, set no_half_vae, or check the "
            "data; the files saved before this step were verified and are kept",
        )


# -- the run -------------------------------------------------------------------------------


def _dtype(name: str) -> torch.dtype:
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(name, torch.float32)


def make_accelerator(mixed_precision: str, notes: list[str]) -> Accelerator:
    """An Accelerator for this process (CPU when no GPU); resets accelerate's process-wide singleton."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cpu = not torch.cuda.is_available()
    if cpu and mixed_precision == "fp16":
        notes.append("mixed_precision fp16 needs a GPU: training in float32 on this CPU")
        mixed_precision = "no"
    AcceleratorState._reset_state()
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision)


@dataclass
class Position:
    """Where the run is: optimizer steps done, current epoch (0-based), steps done in that epoch."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0


class Trainer:
    """One training run, from a config to verified files. Use `train(cfg, ...)` unless you need parts."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        method: str | None = None,
        callbacks: TrainCallbacks | None = None,
        resume: str | Path | None = None,
        model: ModelArg = None,
        model_config: str | Path | None = None,
        sample_max_area: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.cb = callbacks or TrainCallbacks()
        self.method_name = method or cfg.method or _detect(cfg)
        self.resume_arg = resume if resume is not None else cfg.resume
        self.model_arg = model
        self.model_config = model_config
        self.sample_max_area = sample_max_area
        self.notes: list[str] = []
        self.pos = Position()
        self.result = TrainResult(method=self.method_name, output=None)
        self.stop = StopRequest()
        self._rng_to_restore: dict[str, Any] | None = None
        # preflight: train on a subset of the images
        self.record_filter: Callable[[list[ImageRecord]], list[ImageRecord]] | None = None
        # preflight: scale every dataset's resolution down
        self.datasets_transform: Callable[[list[DatasetSpec]], list[DatasetSpec]] | None = None

    # -- setup -----------------------------------------------------------------------------

    def setup(self) -> None:
        """Load everything and check the settings; raises before any training step is taken."""
        import torch

        from sdprep.compat import check_training_stack
        from sdprep.train.loop.optim import require_optimizer

        check_training_stack()  # before a model loads: a known-bad package pair is one clear error
        cfg = self.cfg
        require_optimizer(cfg.optimizer_type)  # a missing optim package too
        if cfg.network_module == "lycoris.kohya":
            from sdprep.train.methods.lycoris import require_lycoris

            require_lycoris()  # and a missing lycoris-lora
        for key in ("fp8_base", "fp8_base_unet"):
            if getattr(cfg, key):  # fp8 storage needs a CUDA GPU
                from sdprep.train.models.fp8 import check_fp8

                device = "cuda" if torch.cuda.is_available() else "cpu"
                check_fp8(key, device, cfg.mixed_precision, self.method_name)
        if cfg.output_dir is None:
            raise ConfigError("output_dir is not set", "set output_dir = the folder for the trained files")
        self.output_dir = Path(cfg.output_dir).expanduser()
        self.name = cfg.output_name or "last"
        # what can fail without the model fails now, not after it has loaded
        self.resume_folder = precheck(
            cfg, method=self.method_name, resume=self.resume_arg, output_dir=self.output_dir, name=self.name
        )
        self.seed = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item())
        if cfg.seed is None:
            self.notes.append(f"seed is not set: using {self.seed} (recorded in the outputs)")
        _seed_everything(self.seed)
        self.accelerator = make_accelerator(cfg.mixed_precision, self.notes)
        if not self.accelerator.is_main_process:
            self.cb = TrainCallbacks()  # one process reports
        self.device: torch.device = self.accelerator.device
        self.weight_dtype = _dtype(self.accelerator.mixed_precision)
        self.vae_dtype = torch.float32 if cfg.no_half_vae else self.weight_dtype
        self.noise_generator = torch.Generator().manual_seed(self.seed)
        self._load_model()
        self._build_data()
        self._build_optimizer()
        self._prepare()
        if self.resume_arg:
            self._resume(self.resume_arg)
        if cfg.initial_step or cfg.initial_epoch:
            self._start_at_initial_step()
        self._open_outputs()
        self.saver = Saver(
            cfg,
            accelerator=self.accelerator,
            method=self.method,
            method_name=self.method_name,
            model_source=self.model.source,
            dataset=self.dataset,
            output_dir=self.output_dir,
            name=self.name,
            result=self.result,
            callbacks=self.cb,
            facts=RunFacts(
                seed=self.seed,
                num_epochs=self.num_epochs,
                batches_per_epoch=self.batches_per_epoch,
                total_steps=self.total_steps,
                num_processes=self.num_processes,
                optimizer_desc=self.optimizer_desc,
            ),
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            noise_generator=self.noise_generator,
        )

    def _load_model(self) -> None:
        from sdprep.train.methods import make_method
        from sdprep.train.models.load import SDXLModel, load_sdxl

        cfg = self.cfg
        if isinstance(self.model_arg, SDXLModel):
            self.model = self.model_arg
        else:
            source = self.model_arg or cfg.pretrained_model_name_or_path
            if not source:
                raise ConfigError(
                    "pretrained_model_name_or_path is not set",
                    "set it to a diffusers SDXL folder, a .safetensors checkpoint or a hub id",
                )
            self.model = load_sdxl(
                source,
                vae=cfg.vae,
                model_config=self.model_config or cfg.model_config,
                trust_pickle=cfg.trust_pickle,
            )
        self.notes += self.model.notes  # what loading found (v-prediction markers...)
        layers = min(te.config.num_hidden_layers for te in self.model.text_encoders)
        if cfg.clip_skip is not None and cfg.clip_skip > layers:
            raise ConfigError(
                f"clip_skip = {cfg.clip_skip}, but the text encoders have only {layers} layers",
                f"use a clip_skip from 1 to {layers} (SDXL is trained with 1, kohya ignores it for SDXL)",
            )
        self.method = make_method(self.method_name, cfg)
        self.method.setup(self.model, self.weight_dtype)
        if cfg.fp8_base or cfg.fp8_base_unet:
            from sdprep.train.models.fp8 import cast_frozen_to_fp8

            cast = cast_frozen_to_fp8(self.model.unet)
            if not cfg.fp8_base_unet:  # as kohya: the text encoders too, their embeddings excepted
                for te in self.model.text_encoders:
                    cast += cast_frozen_to_fp8(te, keep=("embeddings.", "text_model.embeddings."))
            self.notes.append(f"fp8_base: {cast} frozen weights stored as float8_e4m3fn")
        _to(self.device, self.model.vae, dtype=self.vae_dtype)
        _to(self.device, self.model.unet, self.model.text_encoder, self.model.text_encoder_2)
        self.method.move_to(self.device)
        self.method.load_initial_weights()
        self.notes += self.method.notes
        if cfg.gradient_checkpointing:
            self.model.unet.enable_gradient_checkpointing()  # also saves memory when only TEs train
            if self.method.trains_text_encoders:
                for te in self.model.text_encoders:
                    _checkpoint_text_encoder(te)

    def _build_data(self) -> None:
        from sdprep.train.data.pipeline import build_dataset

        cfg = self.cfg
        self.dataset = build_dataset(
            cfg,
            report=self.cb_reporter(),
            seed=self.seed,
            caption_transform=self.method.caption_transform(),
            datasets_transform=self.datasets_transform,
        )
        self.method.check_dataset(self.dataset)
        if self.record_filter is not None:
            self.dataset.summary()  # the banner shows the whole dataset
            self.dataset.records = self.record_filter(self.dataset.records)
        if cfg.masked_loss and not self.dataset.has_masks:
            raise ConfigError(
                "masked_loss is on but no training image has a mask",
                "give mask images (conditioning_data_dir in the dataset TOML, or masks/<stem>.png beside "
                "the images) or set alpha_mask = true for images with transparency; or turn masked_loss off",
            )
        self._cache()

    def cb_reporter(self) -> Reporter:
        return self.cb.reporter()

    def _cache(self) -> None:
        cfg = self.cfg
        if cfg.cache_latents or cfg.cache_latents_to_disk:
            from sdprep.train.data.cache import cache_latents

            # one process leaves unloadable images out (listed with the scan's drops); several
            # processes stop instead: each sees only its share, and their datasets must stay equal
            alone = self.accelerator.num_processes == 1
            stats = cache_latents(
                self.dataset, self.model.vae, self.device, self.vae_dtype, self.cb_reporter(), drop_bad=alone
            )
            self.notes.append(stats.summary())
            if stats.bad:
                self._leave_out(stats.bad)
            if self.dataset.validation is not None:
                cache_latents(
                    self.dataset.validation, self.model.vae, self.device, self.vae_dtype, self.cb_reporter()
                )
        if cfg.cache_text_encoder_outputs or cfg.cache_text_encoder_outputs_to_disk:
            if self.method.trains_text_encoders:
                raise ConfigError(
                    "cache_text_encoder_outputs cannot be used while text encoders train",
                    "turn it off, or set network_train_unet_only = true",
                )
            if not self.dataset.captions_fixed:
                raise ConfigError(
                    "cache_text_encoder_outputs needs fixed captions, but shuffle_caption / caption dropout "
                    "/ wildcards change them every step",
                    "turn those off or turn cache_text_encoder_outputs off",
                )
            from sdprep.train.data.cache import cache_text_encoder_outputs, text_encoder_fingerprint

            encoder_id = None
            if cfg.cache_text_encoder_outputs_to_disk:
                encoder_id = text_encoder_fingerprint(self.model.tokenizers, self.model.text_encoders)
                if cfg.weighted_captions:  # the same caption encodes differently with weights
                    encoder_id += "+weighted"
            stats = cache_text_encoder_outputs(
                self.dataset, self._encode_fixed, self.cb_reporter(), encoder_id=encoder_id
            )
            self.notes.append(stats.summary())
            if self.dataset.validation is not None:
                cache_text_encoder_outputs(
                    self.dataset.validation, self._encode_fixed, self.cb_reporter(), encoder_id=encoder_id
                )
        self._offload_cached()

    def _offload_cached(self) -> None:
        """Move what the caches replace to the CPU, as kohya does: saves 1.6 GB (text encoders) and
        0.2 GB (VAE) of GPU memory in bf16. Samples bring them back while they run."""
        if self.device.type == "cpu":
            return
        parts = offloaded_parts(self.cfg, self.method.trains_text_encoders)
        if "text_encoders" in parts:
            _to("cpu", *self.model.text_encoders)
        if "vae" in parts:
            _to("cpu", self.model.vae)

    def _leave_out(self, bad: list[tuple[Path, str]]) -> None:
        """Drop images that cannot be loaded: listed like the scan's drops, the rest trains."""
        self.dataset.leave_out([(path, f"cannot be loaded: {why}") for path, why in bad])
        if not self.dataset.records:
            raise DatasetError(
                "no training image can be loaded", "re-download or fix the images (`sdprep convert DIR`)"
            )
        n = len(bad)
        self.notes.append(
            f"{n} image{'s' if n > 1 else ''} cannot be loaded: left out (listed under dropped)"
        )

    def _encode_fixed(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        from sdprep.train.data.text import encode_prompts

        with torch.no_grad():
            return encode_prompts(
                captions,
                self.model.tokenizers,
                self.model.text_encoders,
                self.cfg.max_token_length,
                self.cfg.clip_skip,
                weighted=self.cfg.weighted_captions,
            )

    def _build_optimizer(self) -> None:
        from sdprep.train.config.kohya import parse_kv_args
        from sdprep.train.loop.optim import (
            build_optimizer,
            build_scheduler,
            is_schedule_free,
            relative_adafactor,
            warmup_steps,
        )

        cfg = self.cfg
        self.num_processes = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        batches = self.dataset.steps_per_epoch(num_shards=self.num_processes)
        self.steps_per_epoch, self.total_steps, self.num_epochs = schedule(batches, cfg)
        if self.total_steps <= 0:
            raise ConfigError(
                f"nothing to train: max_train_steps is {cfg.max_train_steps}",
                "set max_train_steps (or max_train_epochs) to 1 or more",
            )
        self.batches_per_epoch = batches
        self.group_names = [g.get("name", f"group{i}") for i, g in enumerate(self.method.param_groups())]
        self.epoch_losses: list[float] = []
        self.optimizer, self.optimizer_desc = build_optimizer(
            cfg.optimizer_type,
            self.method.param_groups(),
            cfg.learning_rate,
            parse_kv_args(cfg.optimizer_args),
        )
        warmup = warmup_steps(cfg.lr_warmup_steps, self.total_steps)
        scheduler, sched_args = cfg.lr_scheduler, parse_kv_args(cfg.lr_scheduler_args)
        if relative_adafactor(self.optimizer):
            scheduler, sched_args = "adafactor", {"initial_lr": cfg.learning_rate}
            self.notes.append(
                "Adafactor with relative_step (kohya's default): it sets its own learning rate, "
                f"learning_rate {cfg.learning_rate:g} is only its initial value and lr_scheduler is "
                "ignored; for a fixed lr use optimizer_args relative_step=False scale_parameter=False"
            )
        elif is_schedule_free(self.optimizer):
            if (scheduler or "constant") != "constant" or warmup:
                self.notes.append(
                    f"{type(self.optimizer).__name__} is schedule-free: lr_scheduler and lr_warmup_steps are "
                    "ignored (as kohya); give its own warmup as optimizer_args warmup_steps=N"
                )
            scheduler, sched_args, warmup = "constant", {}, 0
        elif warmup and (scheduler or "constant") == "constant":
            self.notes.append(
                "lr_warmup_steps is ignored by lr_scheduler constant (use constant_with_warmup)"
            )
        self.lr_scheduler = build_scheduler(
            scheduler,
            self.optimizer,
            warmup_steps=warmup,
            total_steps=self.total_steps,
            num_cycles=cfg.lr_scheduler_num_cycles,
            power=cfg.lr_scheduler_power,
            args=sched_args,
            min_lr_ratio=cfg.lr_scheduler_min_lr_ratio,
            timescale=cfg.lr_scheduler_timescale,
            decay_steps=cfg.lr_decay_steps,
            scheduler_type=None if scheduler == "adafactor" else cfg.lr_scheduler_type,
        )

    def _prepare(self) -> None:
        from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

        from sdprep.train.loop.step import StepContext

        # Only a trained U-Net goes through accelerate (DDP when distributed). Text encoders run
        # unwrapped (their code reads attributes a DDP wrapper hides); methods that train them
        # average those gradients across processes themselves (methods.base.allreduce_gradients).
        modules = self.method.train_modules()
        wrap_unet = self.method.trains_unet and any(m is self.model.unet for m in modules)
        if wrap_unet:
            unet, self.optimizer = self.accelerator.prepare(self.model.unet, self.optimizer)
        else:
            unet, self.optimizer = self.model.unet, self.accelerator.prepare(self.optimizer)
        self.train_modules = [unet if m is self.model.unet else m for m in modules]
        if self.cfg.fused_backward_pass:
            from sdprep.train.loop.fused import check_fused, register_fused_step

            cfg = self.cfg
            check_fused(
                cfg.optimizer_type,
                cfg.gradient_accumulation_steps,
                self.method_name,
                self.accelerator.mixed_precision,
                self.num_processes,
            )
            register_fused_step(self.optimizer, cfg.max_grad_norm)
            if cfg.max_grad_norm:
                self.notes.append(
                    f"fused_backward_pass: max_grad_norm {cfg.max_grad_norm:g} clips each weight's gradient "
                    "on its own (as kohya), not their total norm"
                )
        config = self.model.scheduler_config
        prediction = (
            "v_prediction" if self.cfg.v_parameterization else config.get("prediction_type", "epsilon")
        )
        if self.cfg.zero_terminal_snr:
            if prediction != "v_prediction":
                raise ConfigError(
                    "zero_terminal_snr needs a v-prediction model: at zero SNR an epsilon model has "
                    "nothing to learn from (and min-SNR weights divide by zero)",
                    "set v_parameterization = true (for a v-pred model), or turn zero_terminal_snr off",
                )
            # kohya's fix_noise_scheduler_betas_for_zero_terminal_snr is diffusers' rescale; the
            # model's own config carries it so samples and saved checkpoints (ztsnr key) agree
            config["rescale_betas_zero_snr"] = True
        self.noise_scheduler: DDPMScheduler = DDPMScheduler.from_config(dict(config), clip_sample=False)
        self.ctx = StepContext(
            cfg=self.cfg,
            model=self.model,
            unet=unet,
            noise_scheduler=self.noise_scheduler,
            device=self.device,
            weight_dtype=self.weight_dtype,
            vae_dtype=self.vae_dtype,
            train_text=self.method.trains_text_encoders,
            prediction_type=prediction,
            generator=self.noise_generator,
            rank=self.rank,
            world=self.num_processes,
        )
        self.params = self.method.trainable_parameters()

    def _config_dict(self) -> dict[str, Any]:
        from sdprep.config import to_dict

        values: dict[str, Any] = to_dict(self.cfg)
        return values

    def _resume(self, resume: str | Path) -> None:
        from sdprep.train.save.weights import load_state, resolve_resume

        folder = self.resume_folder or resolve_resume(resume, self.output_dir, self.name)
        state, rng = load_state(folder, self.method, self.optimizer, self.lr_scheduler)
        if state.step >= self.total_steps:
            raise TrainingError(
                f"{folder.name} is at step {state.step}, and this run ends at step {self.total_steps}: "
                "nothing left to train",
                "raise max_train_steps (or max_train_epochs) to continue training",
            )
        changed = changed_settings(state.config, self._config_dict())
        if changed:
            self.notes.append("resuming with changed settings: " + "; ".join(changed[:8]))
        if state.dataset_batches and state.dataset_batches != self.batches_per_epoch:
            self.notes.append(
                f"the dataset changed since the state was saved ({state.dataset_batches} -> "
                f"{self.batches_per_epoch} batches per epoch): the resumed order differs"
            )
        self.pos = Position(state.step, state.epoch, state.epoch_step)
        if self.pos.epoch_step >= self.steps_per_epoch:
            self.pos = Position(state.step, state.epoch + 1, 0)
        _sync_scheduler_lr(self.lr_scheduler, self.optimizer)
        self._rng_to_restore = rng
        self.result.first_step = state.step
        self.notes.append(f"resumed from {folder} at step {state.step} (epoch {state.epoch + 1})")

    def _start_at_initial_step(self) -> None:
        """kohya's initial_step (or initial_epoch): the step count starts there (over a resumed
        state's own); the data starts at that epoch's beginning, or with skip_until_initial_step at
        exactly the batch an uninterrupted run would train next. The lr schedule is not moved (as
        kohya: it starts from 0 unless a state is resumed)."""
        cfg = self.cfg
        if cfg.initial_step is not None:
            n = cfg.initial_step
        elif cfg.initial_epoch is not None:
            n = (cfg.initial_epoch - 1) * self.steps_per_epoch
        else:
            return
        if n >= self.total_steps:
            raise ConfigError(
                f"initial_step {n} is not below the run's {self.total_steps} steps: nothing to train",
                "raise max_train_steps (or max_train_epochs), or lower initial_step",
            )
        if self.resume_arg:
            self.notes.append(
                f"initial_step {n} replaces the resumed state's step count {self.pos.step} (as kohya)"
            )
        epoch, within = divmod(n, self.steps_per_epoch)
        self.pos = Position(n, epoch, within if cfg.skip_until_initial_step else 0)
        self.result.first_step = n
        where = (
            "skipping the batches before it"
            if cfg.skip_until_initial_step
            else f"epoch {epoch + 1} from its start"
        )
        self.notes.append(f"starting at step {n} ({where})")

    def _open_outputs(self) -> None:
        from sdprep.train.loop.logs import NullLog, open_log
        from sdprep.train.sample.generate import read_prompts

        cfg = self.cfg
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.accelerator.is_main_process:  # one TensorBoard writer per run
            self.log, notes = open_log(cfg.logging_dir, cfg.log_with, cfg.log_prefix)
            self.notes += notes
        else:
            self.log = NullLog()
        self.result.log_dir = self.log.folder
        self.prompts = (
            read_prompts(Path(cfg.sample_prompts), cfg.sample_sampler) if cfg.sample_prompts else []
        )
        self.sample_dir = Path(cfg.sample_dir).expanduser() if cfg.sample_dir else self.output_dir / "sample"

    # -- banner ----------------------------------------------------------------------------

    def banner(self) -> list[str]:
        """What the run is about to do, printed before the first step."""
        cfg = self.cfg
        m = self.method
        lines = [
            f"method: {m.title} ({self.method_name})",
            f"model: {self.model.source}" + (" (tiny demo model)" if self.model.is_tiny else ""),
            f"trainable parameters: {m.count_trainable():,}",
            f"device: {self.device}, mixed precision: {self.accelerator.mixed_precision}, "
            f"processes: {self.num_processes}, attention: PyTorch SDPA, gradient checkpointing: "
            f"{'on' if cfg.gradient_checkpointing else 'off'}",
        ]
        lines += str(self.dataset.summary()).splitlines()
        lines.append(
            f"optimizer: {self.optimizer_desc}, lr {cfg.learning_rate:g}, scheduler {cfg.lr_scheduler}"
        )
        lines.append(
            f"steps: {self.total_steps} ({self.num_epochs} epochs x {self.steps_per_epoch} steps, batch "
            f"{cfg.train_batch_size} x accumulation {cfg.gradient_accumulation_steps})"
        )
        lines.append(f"output: {self.output_dir / (self.name + m.output_suffix())}")
        notes = self.notes + [n for n in self.method.notes if n not in self.notes]  # later method notes too
        return lines + [f"note: {n}" for n in notes]

    # -- training --------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train to the end and return what was written. Call after `setup()`.

        Ctrl-C stops at the end of the current step and saves the state (a second Ctrl-C stops at
        once); a file that cannot be loaded mid-run also stops with the progress saved.
        """
        started = time.perf_counter()
        try:
            with self.stop.catch_interrupt(enabled=self.num_processes == 1):
                self._loop()
            self._finish()
        finally:
            self.log.close()
        self.result.seconds = time.perf_counter() - started
        self.cb.end(self.result)
        return self.result

    def _loop(self) -> None:
        from sdprep.train.loop.optim import is_schedule_free
        from sdprep.train.save.weights import set_rng_state

        if is_schedule_free(self.optimizer):
            schedule_free_mode(self.optimizer, "train")  # a resumed state was saved in eval mode
        self.cb.start(self.total_steps, self.pos.step, self.steps_per_epoch)
        if self.pos.step == 0 and should_sample(self.cfg, step=0):
            self._sample(step=0, epoch=None)
        if self._rng_to_restore is not None:
            ranks = self._rng_to_restore.get("ranks") or []
            same_layout = len(ranks) == self.num_processes
            set_rng_state(ranks[self.rank] if same_layout else self._rng_to_restore["global"])
            if "noise" in self._rng_to_restore:
                self.noise_generator.set_state(self._rng_to_restore["noise"])
        elif self.num_processes > 1:
            _seed_everything(self.seed + self.rank)  # different noise on every process
        for module in self.train_modules:
            module.train()
        accum = self.cfg.gradient_accumulation_steps
        for epoch in range(self.pos.epoch, self.num_epochs):
            skip = self.pos.epoch_step * accum if epoch == self.pos.epoch else 0
            self.pos.epoch, self.pos.epoch_step = epoch, skip // accum
            batches = self.dataset.batches(
                epoch, skip=skip, num_shards=self.num_processes, shard=self.rank, prefetch=self._prefetch()
            )
            groups = chunked(batches, accum)  # one optimizer step each
            while self.pos.step < self.total_steps:
                if self.stop.requested:
                    raise self.saver.rescue(self.pos, "interrupted (Ctrl-C)", "nothing was lost")
                try:
                    group = next(groups)  # loads the images: a file may be bad or gone
                except StopIteration:
                    break
                except SdprepError as exc:
                    raise self.saver.rescue(
                        self.pos, exc.message, exc.hint or "fix or remove the file"
                    ) from exc
                loss = self._step(group)
                self._after_step(loss)
            if self.pos.epoch_step < self.steps_per_epoch:
                if self.pos.step < self.total_steps:
                    raise TrainingError(
                        f"epoch {epoch + 1} gave only {self.pos.epoch_step} of {self.steps_per_epoch} steps",
                        "the dataset changed while training; the files saved so far were verified",
                    )
                break  # max_train_steps reached mid-epoch
            self.pos.epoch, self.pos.epoch_step = epoch + 1, 0
            self._after_epoch(epoch + 1)
            if self.pos.step >= self.total_steps:
                break

    def _prefetch(self) -> int:
        workers = self.cfg.max_data_loader_n_workers
        cached = all(r.latents is not None or r.latents_file is not None for r in self.dataset.records)
        return 0 if cached else min(max(workers, 0), 4)

    def _step(self, group: list[Batch]) -> float:
        import contextlib

        from sdprep.train.loop.step import batch_loss

        self.saver.mark_started()
        total = 0.0
        for i, batch in enumerate(group):
            last = i == len(group) - 1
            sync = contextlib.ExitStack()
            if not last and self.num_processes > 1:
                for module in self.train_modules:
                    sync.enter_context(self.accelerator.no_sync(module))
            with sync:
                with self.accelerator.autocast():
                    loss = batch_loss(self.ctx, batch)
                value = float(loss.detach())
                check_finite(value, self.pos.step + 1)
                self.accelerator.backward(loss / len(group))
            total += value
        if not self.cfg.fused_backward_pass:  # fused: each weight was stepped during backward
            if self.cfg.max_grad_norm:
                self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.method.after_step()
        return total / len(group)

    def _after_step(self, loss: float) -> None:
        self.pos.step += 1
        self.pos.epoch_step += 1
        step = self.pos.step
        lrs = [float(lr) for lr in self.lr_scheduler.get_last_lr()]
        self.result.last_loss = loss
        self.epoch_losses.append(loss)
        if self.accelerator.is_main_process:
            values = {"loss/current": loss, "loss/average": sum(self.epoch_losses) / len(self.epoch_losses)}
            values.update({f"lr/{name}": lr for name, lr in zip(self.group_names, lrs)})
            values.update(self.method.step_logs())
            self.log.scalars(step, values)
        self.cb.step(step, self.pos.epoch + 1, loss, lrs[0])
        if should_save(self.cfg, step=step, total=self.total_steps):
            self.saver.save(self.pos, step=step)
        if should_sample(self.cfg, step=step):
            self._sample(step=step, epoch=None)
        if self.dataset.validation is not None and should_validate(self.cfg, step=step):
            self._validate(self.dataset.validation, "step", step)

    def _after_epoch(self, epoch: int) -> None:
        if self.accelerator.is_main_process and self.epoch_losses:
            self.log.scalars(epoch, {"loss/epoch": sum(self.epoch_losses) / len(self.epoch_losses)})
        if self.dataset.validation is not None and should_validate(self.cfg, epoch=epoch):
            self._validate(self.dataset.validation, "epoch", epoch)
        self.epoch_losses = []
        if should_save(self.cfg, epoch=epoch, total=self.num_epochs):
            self.saver.save(self.pos, epoch=epoch)
        if should_sample(self.cfg, epoch=epoch):
            self._sample(step=self.pos.step, epoch=epoch)

    def _finish(self) -> None:
        self.result.steps = self.pos.step
        self.result.epochs = self.pos.epoch
        self.saver.save(self.pos, final=True)

    def _validate(self, validation: TrainDataset, kind: str, at: int) -> None:
        """The validation loss now ("step" after step `at`, "epoch" after epoch `at`): logged as
        kohya's loss/validation/<kind>_average and _divergence (minus the epoch's training loss)."""
        from sdprep.train.loop.optim import eval_mode
        from sdprep.train.loop.validation import validation_loss

        cfg = self.cfg
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            for module in self.train_modules:
                module.eval()  # no dropout
            ctx = dataclasses.replace(self.ctx, unet=self.accelerator.unwrap_model(self.ctx.unet))
            seed = cfg.validation_seed if cfg.validation_seed is not None else self.seed
            try:
                with eval_mode(self.optimizer), self.accelerator.autocast():
                    batches = validation.batches(0)
                    loss = validation_loss(ctx, batches, max_batches=cfg.max_validation_steps, seed=seed)
            finally:
                for module in self.train_modules:
                    module.train()
            train = sum(self.epoch_losses) / len(self.epoch_losses) if self.epoch_losses else loss
            self.log.scalars(
                at,
                {f"loss/validation/{kind}_average": loss, f"loss/validation/{kind}_divergence": loss - train},
            )
            self.result.validation.append((kind, at, loss))
        self.accelerator.wait_for_everyone()

    def _sample(self, *, step: int, epoch: int | None) -> None:
        from sdprep.train.loop.optim import eval_mode

        if not self.prompts:
            return
        with eval_mode(self.optimizer):
            self._sample_now(step=step, epoch=epoch)

    def _sample_now(self, *, step: int, epoch: int | None) -> None:
        from sdprep.train.sample.generate import generate_samples

        self.accelerator.wait_for_everyone()
        for module in self.train_modules:
            module.eval()  # no dropout in samples (a LyCORIS network is not inside the models)
        if self.accelerator.is_main_process:
            unet = self.accelerator.unwrap_model(self.ctx.unet)
            prompts = [
                dataclasses.replace(
                    p,
                    prompt=self.method.expand_prompt(p.prompt),
                    negative_prompt=self.method.expand_prompt(p.negative_prompt),
                )
                for p in self.prompts
            ]
            paths = generate_samples(
                self.model,
                unet,
                prompts,
                self.sample_dir,
                name=self.name,
                step=step,
                epoch=epoch,
                base_seed=self.seed,
                autocast=self.accelerator.autocast(),
                log=self.log,
                max_area=self.sample_max_area,
            )
            self.result.samples += paths
            self.cb.sampled(paths)
        self.accelerator.wait_for_everyone()
        for module in self.train_modules:
            module.train()


def offloaded_parts(cfg: TrainConfig, trains_text: bool) -> tuple[str, ...]:
    """What a run moves off the accelerator after caching: the text encoders when their outputs are
    cached (they cannot be while they train), the VAE when latents are cached."""
    parts = []
    if (cfg.cache_text_encoder_outputs or cfg.cache_text_encoder_outputs_to_disk) and not trains_text:
        parts.append("text_encoders")
    if cfg.cache_latents or cfg.cache_latents_to_disk:
        parts.append("vae")
    return tuple(parts)


def _to(device: torch.device | str, *modules: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
    """Move modules (and cast them when `dtype` is given). diffusers' and transformers' own `.to`
    are `@wraps(nn.Module.to)`, whose signature mypy misreads; as `nn.Module`s they check."""
    for module in modules:
        if dtype is None:
            module.to(device)
        else:
            module.to(device, dtype=dtype)


def _checkpoint_text_encoder(te: PreTrainedModel) -> None:
    """Activation checkpointing for a transformers text encoder (non-reentrant: LoRA grads flow)."""
    kwargs = {"use_reentrant": False}
    if hasattr(te, "activation_checkpointing_enable"):  # transformers 5
        te.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        te.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _sync_scheduler_lr(lr_scheduler: LRScheduler, optimizer: torch.optim.Optimizer) -> None:
    """After a resume, set each group's lr from THIS run's schedule at the restored step (the saved
    optimizer holds the lr of the old schedule, which differs when max_train_steps changed)."""
    lambdas = getattr(lr_scheduler, "lr_lambdas", None)
    if not lambdas or type(lr_scheduler).__name__ == "AdafactorSchedule":
        return
    lrs = [base * fn(lr_scheduler.last_epoch) for fn, base in zip(lambdas, lr_scheduler.base_lrs)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    lr_scheduler._last_lr = lrs


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _detect(cfg: TrainConfig) -> str:
    from sdprep.train.config.schema import detect_method

    return detect_method(cfg)


def train(
    cfg: TrainConfig,
    *,
    method: str | None = None,
    callbacks: TrainCallbacks | None = None,
    resume: str | Path | None = None,
    model: ModelArg = None,
    model_config: str | Path | None = None,
    sample_max_area: int | None = None,
) -> TrainResult:
    """Train `cfg` to the end: set up, print the banner through `callbacks.note`, step, save, verify."""
    cb = callbacks or TrainCallbacks()
    trainer = Trainer(
        cfg,
        method=method,
        callbacks=cb,
        resume=resume,
        model=model,
        model_config=model_config,
        sample_max_area=sample_max_area,
    )
    trainer.setup()
    for line in trainer.banner():
        trainer.cb.note(line)
    return trainer.run()
