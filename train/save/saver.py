"""What a training run writes: verified weights, training states, pruning of old saves.

`Saver` is built by `sdprep.train.loop.trainer.Trainer` once the run is set up, with everything it
needs (config, accelerator, method, output folder and name, result, callbacks, run facts); the trainer
calls it with the position (steps, epoch) at each save.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdprep.errors import TrainingError
from sdprep.train.save.weights import Resumable, config_hash

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from sdprep.train.config.schema import TrainConfig
    from sdprep.train.data.pipeline import TrainDataset
    from sdprep.train.loop.callbacks import TrainCallbacks, TrainResult
    from sdprep.train.loop.trainer import Position
    from sdprep.train.methods.base import TrainMethod

HASH_NOTE_BYTES = 1 << 30  # say so when the base model hashed for the metadata is bigger


@dataclass(frozen=True)
class RunFacts:
    """What is fixed about a run once it is set up (recorded in the metadata and states)."""

    seed: int
    num_epochs: int
    batches_per_epoch: int
    total_steps: int
    num_processes: int
    optimizer_desc: str


class Saver:
    """Saving and training states for one run; every file is verified before it is reported."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        accelerator: Accelerator,
        method: TrainMethod,
        method_name: str,
        model_source: str,
        dataset: TrainDataset,
        output_dir: Path,
        name: str,
        result: TrainResult,
        callbacks: TrainCallbacks,
        facts: RunFacts,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Resumable,
        noise_generator: torch.Generator,
    ) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.method = method
        self.method_name = method_name
        self.model_source = model_source
        self.dataset = dataset
        self.output_dir = output_dir
        self.name = name
        self.result = result
        self.cb = callbacks
        self.facts = facts
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.noise_generator = noise_generator
        self.started_at: float | None = None
        self.session_id = random.SystemRandom().randint(0, 2**32)  # kohya: a random integer
        self._hashes: tuple[tuple[str, str] | None, tuple[str, str] | None] | None = None

    def mark_started(self) -> None:
        """Remember when the first optimizer step of this process began (`ss_training_started_at`)."""
        if self.started_at is None:
            self.started_at = time.time()

    def run_facts(self, pos: Position, label: str | None) -> dict[str, Any]:
        """What the metadata records about this run at `pos`; `label` None is the final save."""
        from sdprep.train.save.metadata import file_hashes, kohya_optimizer_name

        cfg, facts = self.cfg, self.facts
        self.mark_started()  # a save before any step (none today) still gets a time
        if self._hashes is None and not cfg.no_metadata:  # once per run, as kohya at start
            src = Path(self.model_source).expanduser()
            if src.is_file() and src.stat().st_size > HASH_NOTE_BYTES:  # 7 GB take a while to read
                self.cb.note(f"hashing {src.name} for ss_sd_model_hash (as kohya)")
            self._hashes = (file_hashes(self.model_source), file_hashes(cfg.vae) if cfg.vae else None)
        hashes = self._hashes or (None, None)
        return {
            "started": self.started_at,
            "session_id": self.session_id,
            "name": self.name,
            "label": label,
            "seed": facts.seed,
            "steps": pos.step,
            # kohya: the 0-based epoch at a step save, the epoch number at an epoch save, and the
            # number of epochs at the end
            "epoch": facts.num_epochs if label is None else pos.epoch,
            "num_epochs": facts.num_epochs,
            "batches_per_epoch": facts.batches_per_epoch,
            "total_steps": facts.total_steps,
            "total_batch_size": cfg.train_batch_size * cfg.gradient_accumulation_steps * facts.num_processes,
            "optimizer": kohya_optimizer_name(self.optimizer, facts.optimizer_desc),
            "model_source": self.model_source,
            "model_hashes": hashes[0],
            "vae_hashes": hashes[1],
        }

    def save(
        self,
        pos: Position,
        *,
        step: int | None = None,
        epoch: int | None = None,
        final: bool = False,
        state: bool = False,
    ) -> None:
        """Write, verify and report the weights (and the state when asked); main process only."""
        from sdprep.train.loop.optim import eval_mode

        with eval_mode(self.optimizer):  # a schedule-free optimizer's averaged weights are the ones saved
            self._save_now(pos, step=step, epoch=epoch, final=final, state=state)

    def _save_now(
        self, pos: Position, *, step: int | None, epoch: int | None, final: bool, state: bool
    ) -> None:
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
            meta = self.metadata(pos, label)
            report = save_weights(
                self.method, path, meta, save_dtype(cfg.save_precision), trained=pos.step > 0
            )
            self.result.saved.append(path)
            if final:
                self.result.output = path
                self.result.saved += self.method.extra_outputs(path)
            self.cb.saved(report)
            if want_state:
                self._save_state(pos, step=step, epoch=epoch, final=final, rngs=rngs)
            self._prune(step=step, epoch=epoch)
        self.accelerator.wait_for_everyone()

    def rescue(self, pos: Position, why: str, hint: str) -> TrainingError:
        """Save weights and state at the last finished step, then say how to go on (a run stopped by a
        bad file or Ctrl-C keeps its progress). One process only: others would wait in collectives."""
        step = pos.step
        if step == 0 or self.facts.num_processes > 1:
            return TrainingError(why, hint)
        self.save(pos, step=step, state=True)
        state = self.result.states[-1].name
        return TrainingError(
            f"{why}; stopped after step {step} of {self.facts.total_steps}, progress saved ({state})",
            f"{hint}, then run the same command with --resume latest",
        )

    def metadata(self, pos: Position, label: str | None) -> dict[str, str]:
        from sdprep.train.save.metadata import kohya_metadata, minimum_metadata

        meta = kohya_metadata(self.run_facts(pos, label), self.method, self.dataset, self.cfg)
        return minimum_metadata(meta) if self.cfg.no_metadata else meta

    def _gather_rng(self) -> list[dict[str, Any]]:
        """Every process's global RNG state, in rank order (dropout streams differ per process)."""
        from sdprep.train.save.weights import rng_state

        if self.facts.num_processes == 1:
            return [rng_state()]
        from accelerate.utils import gather_object

        gathered: list[dict[str, Any]] = gather_object([rng_state()])
        return gathered

    def _save_state(
        self,
        pos: Position,
        *,
        step: int | None,
        epoch: int | None,
        final: bool,
        rngs: list[dict[str, Any]] | None,
    ) -> None:
        from sdprep.config import to_dict
        from sdprep.train.save.weights import TrainState, save_state, state_dir_name

        kw = {} if final else {"step": step, "epoch": epoch}
        folder = self.output_dir / state_dir_name(self.name, **kw)
        cfg_dict = to_dict(self.cfg)
        state = TrainState(
            step=pos.step,
            epoch=pos.epoch,
            epoch_step=pos.epoch_step,
            method=self.method_name,
            config=cfg_dict,
            config_hash=config_hash(cfg_dict),
            dataset_batches=self.facts.batches_per_epoch,
        )
        extra = {"noise": self.noise_generator.get_state(), "ranks": rngs}
        save_state(folder, state, self.method, self.optimizer, self.lr_scheduler, extra_rng=extra)
        self.result.states.append(folder)
        self.cb.note(f"saved training state {folder.name} (step {pos.step})")

    def _prune(self, *, step: int | None, epoch: int | None) -> None:
        from sdprep.train.save.weights import remove_saves, stale_saves

        suffix = self.method.output_suffix()
        for part, states in (("weights", False), ("state", True)):
            old = stale_saves(self.cfg, step=step, epoch=epoch, states=states)
            remove_saves(self.output_dir, self.name, suffix, old, parts=(part,))
