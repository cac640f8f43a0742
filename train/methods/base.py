"""The contract every training method (LoRA, textual inversion, fine-tune) fulfils for the loop.

A method decides which parameters train, how they are saved in the format other tools load, how a
saved file is checked, and how its trainable state is captured for resume. The loop never looks
inside: it asks the method for parameter groups, a forward-ready model, and files.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sdprep.errors import ConfigError, TrainingError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from sdprep.train.config.schema import TrainConfig
    from sdprep.train.data.pipeline import TrainDataset
    from sdprep.train.models.load import SDXLModel


def key_differences(have: Iterable[str], want: Iterable[str]) -> tuple[list[str], list[str]]:
    """(missing, extra): the keys of `want` not in `have`, and those of `have` not in `want`, sorted."""
    have, want = set(have), set(want)
    return sorted(want - have), sorted(have - want)


def key_problems(tensors: Mapping[str, Any], expected: Iterable[str]) -> list[str]:
    """A reloaded file's missing and unexpected tensor names, as verification problems."""
    missing, extra = key_differences(tensors, expected)
    problems = []
    if missing:
        problems.append(f"{len(missing)} expected tensors missing (e.g. {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} unexpected tensors (e.g. {extra[0]})")
    return problems


def restore_tensors(
    state: Mapping[str, Any],
    mine: Mapping[str, Any],
    *,
    what: str,
    hint: str,
    shape_hint: str | None = None,
    skip: tuple[str, ...] = (),
) -> None:
    """Copy a saved training state into this run's tensors `mine` by name (resume): the names must
    be the same sets and every shape equal, else a TrainingError about "this `what`" with `hint`
    (and `shape_hint` for a shape). Names starting with a `skip` prefix are checked, not copied."""
    import torch

    missing, extra = key_differences(state, mine)
    if missing or extra:
        raise TrainingError(
            f"the saved training state does not match this {what} ({len(missing)} missing, "
            f"{len(extra)} unexpected tensors, e.g. {(missing or extra)[0]})",
            hint,
        )
    with torch.no_grad():
        for key, target in mine.items():
            if key.startswith(skip):
                continue
            if tuple(state[key].shape) != tuple(target.shape):
                raise TrainingError(
                    f"training state {key}: shape {tuple(state[key].shape)} != {tuple(target.shape)}",
                    shape_hint,
                )
            target.copy_(state[key])  # copy_ casts to the target's dtype


@dataclass
class Verification:
    """What a reloaded output file was checked for; `problems` empty means it passed."""

    path: Path
    tensors: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        state = "ok" if self.ok else "FAILED: " + "; ".join(self.problems[:5])
        return f"{self.path.name}: {self.tensors} tensors, {self.bytes / 1e6:.1f} MB, {state}"


def allreduce_gradients(params: list[Any]) -> None:
    """Average these parameters' gradients across processes after each backward pass.

    The loop runs text encoders unwrapped (no DistributedDataParallel), so a method that trains
    text-encoder weights registers them here; a no-op in a single process.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return

    def hook(param: torch.Tensor) -> None:
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad.div_(dist.get_world_size())

    for p in params:
        p.register_post_accumulate_grad_hook(hook)


class TrainMethod(ABC):
    """One way of training SDXL. Subclasses set `name`, `architecture` and implement the hooks."""

    name: ClassVar[str]
    architecture: ClassVar[str]  # modelspec.architecture, e.g. "stable-diffusion-xl-v1-base/lora"
    title: str  # for the start banner (LyCORIS names its algorithm per instance)

    LORA_ONLY = ("scale_weight_norms",)  # settings only LoRA training reads

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.model: Any = None
        self.notes: list[str] = []
        if self.name != "lora":
            for key in self.LORA_ONLY:
                if getattr(cfg, key):
                    raise ConfigError(
                        f"{key} applies to LoRA training only, not {self.title}", f"remove {key}"
                    )

    # -- setup -----------------------------------------------------------------------------

    @abstractmethod
    def setup(self, model: SDXLModel, weight_dtype: torch.dtype) -> None:
        """Freeze what does not train, add/unfreeze what does; frozen parts cast to `weight_dtype`."""

    def move_to(self, device: torch.device) -> None:  # noqa: B027 - optional hook
        """Move trainable modules that live outside the SDXL models (e.g. a LyCORIS network)."""

    @abstractmethod
    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups with their learning rates (`{"params": [...], "lr": x}`)."""

    @property
    def trains_text_encoders(self) -> bool:
        """True when any text-encoder weight trains (then text-encoder outputs cannot be cached)."""
        return False

    @property
    def trains_unet(self) -> bool:
        return True

    def train_modules(self) -> list[Any]:
        """Modules to put in train mode (dropout on) during steps; the rest stay in eval mode."""
        return [self.model.unet]

    def trainable_parameters(self) -> list[Any]:
        return [p for group in self.param_groups() for p in group["params"]]

    def count_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    # -- state for resume ------------------------------------------------------------------

    @abstractmethod
    def trainable_state(self) -> dict[str, Any]:
        """Every trainable tensor under a stable name, full precision (for `save_state`)."""

    @abstractmethod
    def load_trainable_state(self, state: dict[str, Any]) -> None:
        """Put back what `trainable_state` returned (names and shapes must match)."""

    # -- outputs ---------------------------------------------------------------------------

    @abstractmethod
    def export_tensors(self, dtype: torch.dtype) -> dict[str, Any]:
        """The user-facing file's tensors (e.g. kohya LoRA names), cast to the save precision."""

    @abstractmethod
    def verify_tensors(self, tensors: dict[str, Any], trained: bool) -> list[str]:
        """Problems found in reloaded tensors (expected keys, shapes, finite, trained); [] if fine."""

    def output_suffix(self) -> str:
        return ".safetensors"

    def extra_outputs(self, final_path: Path) -> list[Path]:
        """Optional extra copies (e.g. a diffusers-format LoRA) written after the main file."""
        return []

    def metadata(self) -> dict[str, str]:
        """Method-specific `ss_*` metadata (network dim/alpha, token string...)."""
        return {}

    def load_initial_weights(self) -> None:  # noqa: B027 - optional hook
        """Start from existing weights when the config says so (network_weights, weights)."""

    # -- optional hooks the loop calls -----------------------------------------------------

    def caption_transform(self) -> Callable[[str, np.random.Generator], str] | None:
        """A function (caption, rng) -> caption applied after kohya's caption processing, or None."""
        return None

    def check_dataset(self, dataset: TrainDataset) -> None:  # noqa: B027 - optional hook
        """Refuse a dataset this method cannot learn from (raise ConfigError), before any caching."""

    def after_step(self) -> None:  # noqa: B027 - optional hook
        """Called after every optimizer step (e.g. to update an EMA copy)."""

    def step_logs(self) -> dict[str, float]:
        """Extra TensorBoard scalars for the step just taken (e.g. LoRA norms); {} by default."""
        return {}

    def expand_prompt(self, prompt: str) -> str:
        """A sample prompt as the trained text encoders must see it (e.g. multi-vector tokens)."""
        return prompt
