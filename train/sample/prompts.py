"""Sample prompts for images during training: kohya's prompt files and sampler names.

A prompt file has one prompt per line with options after it, as in kohya sd-scripts:
`a photo of mytoken --n lowres, blurry --w 832 --h 1216 --d 1 --l 7 --s 28 --ss euler_a`
(`--n` negative prompt, `--w`/`--h` size, `--d` seed, `--l` CFG scale, `--s` steps, `--ss`
sampler). `#` lines and blank lines are skipped. kohya's `.toml` and `.json` prompt files work too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdprep.dataset import loads_json
from sdprep.errors import ConfigError, did_you_mean, unknown_choice

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

# kohya sampler name -> (diffusers scheduler class, extra config)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    # diffusers refuses final_sigmas_type "zero" (its default) with the first-order dpmsolver
    "dpmsolver": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
    ),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}

OPTIONS = {
    "n": "negative prompt",
    "w": "width",
    "h": "height",
    "d": "seed",
    "l": "CFG scale",
    "s": "steps",
    "ss": "sampler",
}


@dataclass(frozen=True)
class SamplePrompt:
    """One sample image to generate; `sampler` None means the run's sample_sampler."""

    prompt: str
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    seed: int | None = None
    scale: float = 7.5
    steps: int = 30
    sampler: str | None = None
    line: int = 0  # 1-based line in the prompt file (0: not from a text file)


def check_sampler(name: str) -> str:
    """The canonical (lower-case) sampler name, or a ConfigError listing the valid ones."""
    key = name.strip().lower()
    if key not in SAMPLERS:
        raise unknown_choice("sampler", name, SAMPLERS)
    return key


def _size(value: int) -> int:
    return max(64, value - value % 8)  # kohya: at least 64, floored to a multiple of 8


def parse_prompt_line(line: str, *, lineno: int = 0, defaults: SamplePrompt | None = None) -> SamplePrompt:
    """Parse one kohya prompt line (options are split at " --", as kohya does)."""
    base = defaults or SamplePrompt(prompt="")
    parts = (" " + line.strip()).split(" --")  # the leading space lets a line start with an option
    values: dict[str, Any] = {"prompt": parts[0].strip(), "line": lineno}
    where = f"prompt line {lineno}" if lineno else "prompt"
    for part in parts[1:]:
        m = re.match(r"(\w+)(?:\s+(.*))?$", part.strip(), re.DOTALL)
        opt = m.group(1).lower() if m else part
        arg = (m.group(2) or "").strip() if m else ""
        if opt not in OPTIONS:
            hint = did_you_mean(f"--{opt}", [f"--{o}" for o in OPTIONS])
            listing = "valid: " + ", ".join(f"--{o} ({d})" for o, d in OPTIONS.items())
            raise ConfigError(f'{where}: unknown option "--{opt}"', f"{hint} {listing}" if hint else listing)
        if not arg:
            raise ConfigError(f"{where}: --{opt} needs a value ({OPTIONS[opt]})")
        try:
            if opt == "n":
                values["negative_prompt"] = arg
            elif opt == "w":
                values["width"] = _size(int(arg))
            elif opt == "h":
                values["height"] = _size(int(arg))
            elif opt == "d":
                values["seed"] = int(arg)
            elif opt == "l":
                values["scale"] = float(arg)
            elif opt == "s":
                values["steps"] = max(1, min(1000, int(arg)))
            else:
                values["sampler"] = check_sampler(arg)
        except ValueError:
            raise ConfigError(f'{where}: --{opt} expects a number ({OPTIONS[opt]}), got "{arg}"') from None
    if not values["prompt"]:
        raise ConfigError(f"{where}: the prompt text is empty", "write the prompt before the --options")
    return _with(base, values)


def _with(base: SamplePrompt, values: dict[str, Any]) -> SamplePrompt:
    import dataclasses

    return dataclasses.replace(base, **values)


def parse_prompt_text(text: str, *, defaults: SamplePrompt | None = None) -> list[SamplePrompt]:
    """All prompts of a kohya .txt prompt file; `#` comments and blank lines are skipped."""
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        out.append(parse_prompt_line(stripped, lineno=lineno, defaults=defaults))
    return out


_DICT_KEYS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "width": "width",
    "height": "height",
    "seed": "seed",
    "scale": "scale",
    "sample_steps": "steps",
    "steps": "steps",
    "sample_sampler": "sampler",
    "sampler": "sampler",
}


def _from_dict(item: dict[str, Any], where: str, defaults: SamplePrompt) -> SamplePrompt:
    values: dict[str, Any] = {}
    for key, value in item.items():
        if key not in _DICT_KEYS:
            if key == "subset":
                continue
            hint = did_you_mean(key, _DICT_KEYS)
            raise ConfigError(f'{where}: unknown key "{key}"', hint or "valid: " + ", ".join(_DICT_KEYS))
        values[_DICT_KEYS[key]] = value
    if not values.get("prompt"):
        raise ConfigError(f"{where}: no prompt")
    try:
        for key in ("width", "height"):
            if key in values:
                values[key] = _size(int(values[key]))
        if values.get("seed") is not None:
            values["seed"] = int(values["seed"])
        if "scale" in values:
            values["scale"] = float(values["scale"])
        if "steps" in values:
            values["steps"] = max(1, min(1000, int(values["steps"])))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if values.get("sampler"):
        values["sampler"] = check_sampler(str(values["sampler"]))
    return _with(defaults, values)


def load_prompts(path: Path | str, *, defaults: SamplePrompt | None = None) -> list[SamplePrompt]:
    """Read a kohya prompt file (.txt lines, or kohya's .toml `[prompt]` + `[[prompt.subset]]` / .json list)."""
    path = Path(path)
    defaults = defaults or SamplePrompt(prompt="")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{path}: prompt file not found", "check sample_prompts") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the prompt file ({exc})") from exc
    suffix = path.suffix.lower()
    if suffix == ".toml":
        from sdprep.config import parse_toml

        data = parse_toml(text, f"{path}: ").get("prompt")
        if not isinstance(data, dict) or not isinstance(data.get("subset"), list):
            raise ConfigError(f"{path}: expected a [prompt] table with [[prompt.subset]] entries")
        common = {k: v for k, v in data.items() if k != "subset"}
        return [
            _from_dict({**common, **sub}, f"{path} subset {i + 1}", defaults)
            for i, sub in enumerate(data["subset"])
        ]
    if suffix == ".json":
        try:
            items = loads_json(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON: {exc}") from None
        if not isinstance(items, list):
            raise ConfigError(f"{path}: expected a JSON list of prompts")
        return [
            parse_prompt_line(it, defaults=defaults)
            if isinstance(it, str)
            else _from_dict(it, f"{path} item {i + 1}", defaults)
            for i, it in enumerate(items)
        ]
    try:
        return parse_prompt_text(text, defaults=defaults)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}", exc.hint) from None


def make_scheduler(name: str, base_scheduler_config: Mapping[str, Any]) -> SchedulerMixin:
    """A diffusers scheduler for kohya sampler `name`, configured like the model's own scheduler.

    `base_scheduler_config` is the model scheduler's `.config` (or a dict); its betas, timestep
    spacing and prediction type carry over.
    """
    import diffusers

    cls_name, extra = SAMPLERS[check_sampler(name)]
    cls = getattr(diffusers, cls_name)
    # extras go as keyword arguments: diffusers ignores some keys of a config dict made by
    # another scheduler class (final_sigmas_type stayed "zero" when passed in the dict)
    scheduler: SchedulerMixin = cls.from_config(dict(base_scheduler_config), **extra)
    return scheduler
