"""What a training run writes: verified weights, training states, pruning of old saves, samples.

A mixin of `sdprep.train.loop.trainer.Trainer` (it uses the trainer's config, method, position, optimizer
and accelerator); kept apart so the loop module reads as the loop.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Any

from sdprep.errors import TrainingError
from sdprep.train.save.weights import config_hash

HASH_NOTE_BYTES = 1 << 30  # say so when the base model hashed for the metadata is bigger


class TrainerOutputs:
    """Saving, state and sampling for `Trainer`; every file is verified before it is reported."""

    def _mark_started(self) -> None:
        """Remember when the first optimizer step of this process began (`ss_training_started_at`)."""
        if getattr(self, "_started_at", None) is None:
            self._started_at = time.time()

    def _run_facts(self, label: str | None) -> dict[str, Any]:
        """What the metadata records about this run; `label` None is the final save."""
        from sdprep.train.save.metadata import file_hashes, kohya_optimizer_name

        cfg = self.cfg
        if not hasattr(self, "_session_id"):
            self._session_id = random.SystemRandom().randint(0, 2**32)  # kohya: a random integer
        self._mark_started()  # a save before any step (none today) still gets a time
        if not hasattr(self, "_hashes") and not cfg.no_metadata:  # once per run, as kohya at start
            src = Path(self.model.source).expanduser()
            if src.is_file() and src.stat().st_size > HASH_NOTE_BYTES:  # 7 GB take a while to read
                self.cb.note(f"hashing {src.name} for ss_sd_model_hash (as kohya)")
            self._hashes = (file_hashes(self.model.source), file_hashes(cfg.vae) if cfg.vae else None)
        hashes = getattr(self, "_hashes", (None, None))
        return {
            "started": self._started_at,
            "session_id": self._session_id,
            "name": self.name,
            "label": label,
            "seed": self.seed,
            "steps": self.pos.step,
            # kohya: the 0-based epoch at a step save, the epoch number at an epoch save, and the
            # number of epochs at the end
            "epoch": self.num_epochs if label is None else self.pos.epoch,
            "num_epochs": self.num_epochs,
            "batches_per_epoch": self.batches_per_epoch,
            "total_steps": self.total_steps,
            "total_batch_size": cfg.train_batch_size * cfg.gradient_accumulation_steps * self.num_processes,
            "optimizer": kohya_optimizer_name(self.optimizer, self.optimizer_desc),
            "model_source": self.model.source,
            "model_hashes": hashes[0],
            "vae_hashes": hashes[1],
        }

    def _save(
        self, *, step: int | None = None, epoch: int | None = None, final: bool = False, state: bool = False
    ) -> None:
        """Write, verify and report the weights (and the state when asked); main process only."""
        from sdprep.train.loop.optim import eval_mode

        with eval_mode(self.optimizer):  # a schedule-free optimizer's averaged weights are the ones saved
            self._save_now(step=step, epoch=epoch, final=final, state=state)

    def _save_now(self, *, step: int | None, epoch: int | None, final: bool, state: bool) -> None:
        from sdprep.train.save.weights import save_dtype, save_weights, weights_name

        cfg = self.cfg
        self.accelerator.wait_for_everyone()
        want_state = state or cfg.save_state or (final and cfg.save_state_on_train_end)
        rngs = self._gather_rng() if want_state else None  # a collective: every process calls it
        if self.accelerator.is_main_process:
            suffix = self.method.output_suffix()
            fname = weights_name(
                self.name, suffix=suffix, **({} if final else {"step": step, "epoch": epoch})
            )
            path = self.output_dir / fname
            label = None if final else (f"epoch {epoch}" if epoch is not None else f"step {step}")
            meta = self._metadata(label)
            report = save_weights(
                self.method, path, meta, save_dtype(cfg.save_precision), trained=self.pos.step > 0
            )
            self.result.saved.append(path)
            if final:
                self.result.output = path
                self.result.saved += self.method.extra_outputs(path)
            self.cb.saved(report)
            if want_state:
                self._save_state(step=step, epoch=epoch, final=final, rngs=rngs)
            self._prune(step=step, epoch=epoch)
        self.accelerator.wait_for_everyone()

    def _rescue(self, why: str, hint: str) -> TrainingError:
        """Save weights and state at the last finished step, then say how to go on (a run stopped by a
        bad file or Ctrl-C keeps its progress). One process only: others would wait in collectives."""
        step = self.pos.step
        if step == 0 or self.num_processes > 1:
            return TrainingError(why, hint)
        self._save(step=step, state=True)
        state = self.result.states[-1].name
        return TrainingError(
            f"{why}; stopped after step {step} of {self.total_steps}, progress saved ({state})",
            f"{hint}, then run the same command with --resume latest",
        )

    def _metadata(self, label: str | None) -> dict[str, str]:
        from sdprep.train.save.metadata import kohya_metadata, minimum_metadata

        meta = kohya_metadata(self._run_facts(label), self.method, self.dataset, self.cfg)
        return minimum_metadata(meta) if self.cfg.no_metadata else meta

    def _gather_rng(self) -> list[dict]:
        """Every process's global RNG state, in rank order (dropout streams differ per process)."""
        from sdprep.train.save.weights import rng_state

        if self.num_processes == 1:
            return [rng_state()]
        from accelerate.utils import gather_object

        return gather_object([rng_state()])

    def _save_state(self, *, step: int | None, epoch: int | None, final: bool, rngs: list[dict]) -> None:
        from sdprep.train.save.weights import TrainState, save_state, state_dir_name

        kw = {} if final else {"step": step, "epoch": epoch}
        folder = self.output_dir / state_dir_name(self.name, **kw)
        cfg_dict = self._config_dict()
        state = TrainState(
            step=self.pos.step,
            epoch=self.pos.epoch,
            epoch_step=self.pos.epoch_step,
            method=self.method_name,
            config=cfg_dict,
            config_hash=config_hash(cfg_dict),
            dataset_batches=self.batches_per_epoch,
        )
        extra = {"noise": self.noise_generator.get_state(), "ranks": rngs}
        save_state(folder, state, self.method, self.optimizer, self.lr_scheduler, extra_rng=extra)
        self.result.states.append(folder)
        self.cb.note(f"saved training state {folder.name} (step {self.pos.step})")

    def _prune(self, *, step: int | None, epoch: int | None) -> None:
        from sdprep.train.save.weights import remove_saves, stale_saves

        suffix = self.method.output_suffix()
        for part, states in (("weights", False), ("state", True)):
            old = stale_saves(self.cfg, step=step, epoch=epoch, states=states)
            remove_saves(self.output_dir, self.name, suffix, old, parts=(part,))

    def _validate(self, kind: str, at: int) -> None:
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
                    batches = self.dataset.validation.batches(0)
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
