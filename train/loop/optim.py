"""Optimizers and learning-rate schedulers by kohya's names.

`optimizer_type`: AdamW, Adafactor (transformers), SGDNesterov, the bitsandbytes family (AdamW8bit,
PagedAdamW(8bit/32bit), Lion8bit, PagedLion8bit, SGDNesterov8bit, AdEMAMix8bit), Prodigy
(prodigyopt), Lion (lion-pytorch), DAdaptation/DAdapt* (dadaptation), the schedule-free ones
(AdamWScheduleFree, RAdamScheduleFree, SGDScheduleFree), CAME (came-pytorch), any `torch.optim`
class by name (case-insensitive), or a dotted path `package.module.Class`. The optional packages are
sdprep's `optim` extra; each is imported only when chosen, and a missing one is one error naming the
extra (`require_optimizer`, checked before any model loads). `optimizer_args` are kohya's `k=v`
strings.
`lr_scheduler`: diffusers' schedulers (constant, constant_with_warmup, linear, cosine,
cosine_with_restarts, polynomial, piecewise_constant), transformers' cosine_with_min_lr,
warmup_stable_decay and inverse_sqrt, plus `adafactor` (Adafactor's own lr).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, cast

from sdprep.errors import ConfigError, InstallError, unknown_choice

if TYPE_CHECKING:
    import torch
    from torch.optim.lr_scheduler import LRScheduler

    SchedulerFactory = Callable[..., LRScheduler]  # (optimizer, **kwargs) -> scheduler

SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "piecewise_constant",
    "adafactor",
    # transformers' schedulers (kohya passes unknown names to transformers too)
    "cosine_with_min_lr",
    "warmup_stable_decay",
    "inverse_sqrt",
)


# kohya optimizer_type (lower case) -> (module, pip package, class, default kwargs)
_NESTEROV = {"nesterov": True, "momentum": 0.9}
OPTIONAL: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "adamw8bit": ("bitsandbytes.optim", "bitsandbytes", "AdamW8bit", {}),
    "pagedadamw8bit": ("bitsandbytes.optim", "bitsandbytes", "PagedAdamW8bit", {}),
    "pagedadamw": ("bitsandbytes.optim", "bitsandbytes", "PagedAdamW", {}),
    "pagedadamw32bit": ("bitsandbytes.optim", "bitsandbytes", "PagedAdamW32bit", {}),
    "lion8bit": ("bitsandbytes.optim", "bitsandbytes", "Lion8bit", {}),
    "pagedlion8bit": ("bitsandbytes.optim", "bitsandbytes", "PagedLion8bit", {}),
    "sgdnesterov8bit": ("bitsandbytes.optim", "bitsandbytes", "SGD8bit", _NESTEROV),
    "ademamix8bit": ("bitsandbytes.optim", "bitsandbytes", "AdEMAMix8bit", {}),
    "pagedademamix8bit": ("bitsandbytes.optim", "bitsandbytes", "PagedAdEMAMix8bit", {}),
    "prodigy": ("prodigyopt", "prodigyopt", "Prodigy", {}),
    "lion": ("lion_pytorch", "lion-pytorch", "Lion", {}),
    # kohya: "DAdaptation" is the preprint version of D-Adapt Adam, not DAdaptAdam
    "dadaptation": ("dadaptation.experimental", "dadaptation", "DAdaptAdamPreprint", {}),
    "dadaptadampreprint": ("dadaptation.experimental", "dadaptation", "DAdaptAdamPreprint", {}),
    "dadaptadam": ("dadaptation", "dadaptation", "DAdaptAdam", {}),
    "dadaptadagrad": ("dadaptation", "dadaptation", "DAdaptAdaGrad", {}),
    "dadaptadan": ("dadaptation", "dadaptation", "DAdaptAdan", {}),
    "dadaptadanip": ("dadaptation.experimental", "dadaptation", "DAdaptAdanIP", {}),
    "dadaptlion": ("dadaptation", "dadaptation", "DAdaptLion", {}),
    "dadaptsgd": ("dadaptation", "dadaptation", "DAdaptSGD", {}),
    "adamwschedulefree": ("schedulefree", "schedulefree", "AdamWScheduleFree", {}),
    "radamschedulefree": ("schedulefree", "schedulefree", "RAdamScheduleFree", {}),
    "sgdschedulefree": ("schedulefree", "schedulefree", "SGDScheduleFree", {}),
    "came": ("came_pytorch", "came-pytorch", "CAME", {}),  # sdprep name (kohya: came_pytorch.CAME)
}
# top-level module -> pip package of sdprep's `optim` extra (also for dotted optimizer_type paths)
EXTRA_PACKAGES = {
    "bitsandbytes": "bitsandbytes",
    "prodigyopt": "prodigyopt",
    "dadaptation": "dadaptation",
    "lion_pytorch": "lion-pytorch",
    "schedulefree": "schedulefree",
    "came_pytorch": "came-pytorch",
}


def _missing(optimizer: str, package: str) -> InstallError:
    return InstallError(
        f"optimizer_type {optimizer} needs the `{package}` package, which is not installed: "
        "install sdprep's optim extra (pip install 'sdprep[optim]')",
        "or choose optimizer_type = AdamW",
    )


def _optional(module: str, package: str, optimizer: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if getattr(exc, "name", None) not in (module, module.split(".")[0]):
            raise InstallError(
                f"optimizer_type {optimizer}: the `{package}` package is installed but cannot be imported ({exc})",
                f"reinstall it: pip install --force-reinstall {package}",
            ) from exc
        raise _missing(optimizer, package) from exc


def optimizer_module(name: str | None) -> tuple[str, str] | None:
    """(top-level module, pip package) an optimizer_type needs from the `optim` extra, else None."""
    key = (name or "AdamW").strip().lower()
    if key in OPTIONAL:
        module, package = OPTIONAL[key][0].split(".")[0], OPTIONAL[key][1]
        return module, package
    top = (name or "").strip().split(".")[0]
    if "." in (name or "") and top in EXTRA_PACKAGES:
        return top, EXTRA_PACKAGES[top]
    return None


def require_optimizer(name: str | None) -> None:
    """Raise InstallError now if `optimizer_type` needs a package that is not installed (cheap: no
    import), so a missing package stops the run before any model loads."""
    import importlib.util

    need = optimizer_module(name)
    if need is None:
        return
    try:
        found = importlib.util.find_spec(need[0]) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise _missing(str(name).strip(), need[1])


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """True for the schedule-free optimizers: they set their own schedule (kohya's dummy scheduler)
    and must be in eval mode while weights are saved or sampled."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    return "ScheduleFree" in type(inner).__name__ and callable(getattr(inner, "eval", None))


def schedule_free_mode(optimizer: torch.optim.Optimizer, mode: Literal["train", "eval"]) -> None:
    """Call a schedule-free optimizer's `train()` or `eval()` (`mode`): their own API, not torch's."""
    getattr(optimizer, mode)()


def _torch_optimizer(name: str) -> type[torch.optim.Optimizer]:
    import torch

    by_lower = {
        n.lower(): getattr(torch.optim, n)
        for n in dir(torch.optim)
        if isinstance(getattr(torch.optim, n), type)
        and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
    }
    if name.lower() in by_lower:
        found: type[torch.optim.Optimizer] = by_lower[name.lower()]
        return found
    if "." in name:
        module, _, attr = name.rpartition(".")
        try:
            dotted: type[torch.optim.Optimizer] = getattr(importlib.import_module(module), attr)
            return dotted
        except ImportError as exc:
            top = module.split(".")[0]
            if top in EXTRA_PACKAGES and getattr(exc, "name", None) in (top, module):
                raise _missing(name, EXTRA_PACKAGES[top]) from exc
            raise ConfigError(f'optimizer_type "{name}": cannot import it ({exc})') from exc
        except AttributeError as exc:
            raise ConfigError(f'optimizer_type "{name}": cannot import it ({exc})') from exc
    known = ["AdamW", "Adafactor", "SGDNesterov", *(k for k in OPTIONAL), *by_lower]
    raise unknown_choice("optimizer_type", name, known)


def build_optimizer(
    name: str | None, groups: list[dict[str, Any]], lr: float, args: dict[str, Any]
) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer for `groups` and a one-line description (name and arguments)."""
    import torch

    name = (name or "AdamW").strip()
    key = name.lower()
    kwargs = dict(args)
    fixed: dict[str, Any] = {}
    groups = [{k: v for k, v in g.items() if k != "name"} for g in groups]
    cls: type[torch.optim.Optimizer]
    rate: float | None = lr  # None: the optimizer sets its own
    if key == "adamw":
        cls = torch.optim.AdamW
    elif key in OPTIONAL:
        module, package, attr, defaults = OPTIONAL[key]
        cls = getattr(_optional(module, package, name), attr)
        for k, v in defaults.items():
            (fixed if k == "nesterov" else kwargs).setdefault(k, v)
    elif key == "adafactor":
        from transformers.optimization import Adafactor

        cls = Adafactor
        kwargs.setdefault("relative_step", True)  # kohya's default (transformers' too)
        if kwargs.get("warmup_init") and not kwargs["relative_step"]:
            kwargs["relative_step"] = True  # as kohya: warmup_init needs relative_step
        if kwargs["relative_step"]:
            rate = None  # Adafactor computes its own learning rate; see relative_adafactor()
            for g in groups:
                g.pop("lr", None)
    elif key == "sgdnesterov":
        cls = torch.optim.SGD
        fixed["nesterov"] = True  # as kohya: passed apart, so not among the described arguments
        kwargs.setdefault("momentum", 0.9)
    else:
        cls = _torch_optimizer(name)
    make: Callable[..., torch.optim.Optimizer] = cls  # each class has its own keyword arguments
    try:
        optimizer = (
            make(groups, lr=rate, **fixed, **kwargs) if rate is not None else make(groups, **fixed, **kwargs)
        )
    except TypeError as exc:
        raise ConfigError(
            f"optimizer_args do not fit {cls.__name__}: {exc}", "check the names in optimizer_args"
        ) from exc
    if is_schedule_free(optimizer):
        schedule_free_mode(
            optimizer, "train"
        )  # as kohya: train mode while stepping, eval mode to save and sample
    described = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    return optimizer, f"{cls.__name__}({described})" if described else cls.__name__


@contextlib.contextmanager
def eval_mode(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Put a schedule-free optimizer in eval mode (the weights become its average, the ones to save
    and sample, as kohya) for the block, and back in train mode after it; a no-op for the others."""
    if not is_schedule_free(optimizer):
        yield
        return
    schedule_free_mode(optimizer, "eval")
    try:
        yield
    finally:
        schedule_free_mode(optimizer, "train")


def relative_adafactor(optimizer: torch.optim.Optimizer) -> bool:
    """True for Adafactor with relative_step: its lr is its own and the schedule is kohya's `adafactor`."""
    return type(optimizer).__name__ == "Adafactor" and bool(optimizer.defaults.get("relative_step"))


def build_scheduler(
    name: str | None,
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    num_cycles: int | None = None,
    power: float | None = None,
    args: dict[str, Any] | None = None,
    min_lr_ratio: float | None = None,
    timescale: int | None = None,
    decay_steps: int | float = 0,
    scheduler_type: str | None = None,
) -> LRScheduler:
    """A learning-rate scheduler stepped once per optimizer step, built as kohya's get_scheduler_fix:
    `scheduler_type` (a class) with `args` as its keyword arguments; otherwise the schedule
    function of `name` with `args` added (e.g. polynomial's lr_end), cosine_with_min_lr and
    warmup_stable_decay at `min_lr_ratio` (sdprep: 0.1 / 0 when unset), warmup_stable_decay over
    `decay_steps` (a count, or below 1 a fraction of all steps)."""
    extra = dict(args or {})
    if scheduler_type:
        return _call_scheduler(scheduler_class(scheduler_type), scheduler_type, optimizer, extra)
    name = (name or "constant").strip().lower()
    if name not in SCHEDULERS:
        raise unknown_choice("lr_scheduler", name, SCHEDULERS)
    if name == "adafactor":
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer, initial_lr=extra.get("initial_lr", 0.0))
    if name == "piecewise_constant":
        if not extra.get("step_rules"):
            raise ConfigError(
                "lr_scheduler piecewise_constant needs step_rules",
                'e.g. lr_scheduler_args = ["step_rules=1:100,0.1:200,0.01"] (multiplier:until_step,...,final)',
            )
        from diffusers.optimization import get_piecewise_constant_schedule

        return _call_scheduler(get_piecewise_constant_schedule, name, optimizer, extra)
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType

    # transformers' table is untyped; its schedule functions return LambdaLR (documented)
    fn = cast("SchedulerFactory", TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)])
    steps: dict[str, float | None] = {"num_warmup_steps": warmup_steps, "num_training_steps": total_steps}
    if name == "constant":
        steps = {}
    elif name in ("constant_with_warmup", "inverse_sqrt"):
        steps = {"num_warmup_steps": warmup_steps}
        if name == "inverse_sqrt":
            steps["timescale"] = timescale
    elif name == "cosine_with_restarts":
        steps["num_cycles"] = num_cycles or 1
    elif name == "polynomial":
        steps["power"] = power if power is not None else 1.0
    elif name == "cosine_with_min_lr":
        steps["num_cycles"] = (num_cycles or 1) / 2
        if not {"min_lr", "min_lr_rate"} & set(extra):
            steps["min_lr_rate"] = 0.1 if min_lr_ratio is None else min_lr_ratio
    elif name == "warmup_stable_decay":
        decay = (
            int(decay_steps * total_steps)
            if isinstance(decay_steps, float) and decay_steps < 1
            else int(decay_steps)
        )
        steps = {
            "num_warmup_steps": warmup_steps,
            "num_stable_steps": max(0, total_steps - warmup_steps - decay),
            "num_decay_steps": decay,
            "num_cycles": (num_cycles or 1) / 2,
            "min_lr_ratio": min_lr_ratio or 0.0,
        }
    return _call_scheduler(fn, name, optimizer, {**steps, **extra})


def scheduler_class(name: str) -> SchedulerFactory:
    """kohya's lr_scheduler_type: a torch.optim.lr_scheduler class by name, or module.Class."""
    import torch

    module_name, _, attr = name.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else torch.optim.lr_scheduler
        cls = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f'lr_scheduler_type "{name}": cannot import it ({exc})',
            "a class of torch.optim.lr_scheduler (e.g. CosineAnnealingLR) or a full module.Class path",
        ) from None
    if not callable(cls):
        raise ConfigError(f'lr_scheduler_type "{name}" is not a class')
    factory: SchedulerFactory = cls
    return factory


def _call_scheduler(
    fn: SchedulerFactory, name: str, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any]
) -> LRScheduler:
    try:
        return fn(optimizer, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"lr_scheduler {name}: {exc}", "check lr_scheduler_args") from exc


def warmup_steps(value: float | int | None, total_steps: int) -> int:
    """kohya's lr_warmup_steps: a count, or a float < 1 meaning a fraction of all steps."""
    if not value:
        return 0
    if isinstance(value, float) and value < 1:
        return int(value * total_steps)
    return int(value)
