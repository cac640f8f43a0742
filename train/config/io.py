"""The training config as text: `--output_config` (the resolved config as a TOML) and `--list-keys`.

flags, out = output_config_request(["--output_config", "--config_file", "resolved.toml"])
write_config(cfg, out)           # kohya's --output_config: write, then exit without training
for name, text in describe_keys(): print(name, text)
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdprep.config import to_dict
from sdprep.errors import ConfigError
from sdprep.fileops import atomic_write_text

if TYPE_CHECKING:
    from sdprep.train.config.schema import TrainConfig

HEADER = (
    "# The resolved training config, written by `sdprep train --output-config` (kohya's --output_config).\n"
    "# Every setting that is not unset is listed; `sdprep train --config` reads it back unchanged.\n"
)


def output_config_request(flags: list[str]) -> tuple[list[str], Path | None]:
    """kohya's form: `--output_config` makes `--config_file FILE` the file to WRITE (not read).

    Returns the flags without those two and the output path (None when not asked)."""
    if "--output_config" not in flags:
        return flags, None
    rest = [f for f in flags if f != "--output_config"]
    for i, tok in enumerate(rest):
        name, eq, value = tok.partition("=")
        if name in ("--config_file", "--config"):
            if eq:
                return rest[:i] + rest[i + 1 :], Path(value)
            if i + 1 < len(rest):
                return rest[:i] + rest[i + 2 :], Path(rest[i + 1])
    raise ConfigError(
        "--output_config needs --config_file FILE (kohya writes the config there)",
        "or use sdprep's form: sdprep train --config IN.toml --output-config OUT.toml",
    )


def config_values(cfg: TrainConfig) -> dict[str, Any]:
    """The config as TOML values, unset (None) keys left out; resolution as kohya's "w,h" string."""
    out: dict[str, Any] = {}
    for key, value in to_dict(cfg).items():
        if value is None:
            continue
        if key == "resolution":
            value = f"{value[0]},{value[1]}"
        out[key] = value
    return out


def write_config(cfg: TrainConfig, path: Path | str) -> Path:
    """Write the resolved config as a flat TOML (kohya refuses to overwrite; so does this)."""
    import tomli_w

    path = Path(path).expanduser()
    if path.exists():
        raise ConfigError(
            f"{path} already exists: --output_config does not overwrite (as kohya)",
            "delete it or choose another file name",
        )
    if path.suffix != ".toml":
        raise ConfigError(
            f"{path}: the output config must be a .toml file", f"e.g. {path.with_suffix('.toml')}"
        )
    atomic_write_text(path, HEADER + tomli_w.dumps(config_values(cfg)))
    return path


# -- --list-keys -------------------------------------------------------------------------------

_FIELD_LINE = re.compile(r"^    (\w+): .*?(?:#\s*(.*))?$")
_COMMENT_LINE = re.compile(r"^\s+(?:None|\(|\)|\"|')?.*#\s*(.*)$")


def _field_comments(cls: type) -> dict[str, str]:
    """The comment written after each field of a dataclass (its documentation in this project)."""
    comments: dict[str, str] = {}
    current: str | None = None
    for line in inspect.getsource(cls).splitlines():
        match = _FIELD_LINE.match(line)
        if match:
            current = match.group(1)
            if match.group(2):
                comments[current] = match.group(2).strip()
            continue
        if current and current not in comments:
            more = _COMMENT_LINE.match(line)
            if more:
                comments[current] = more.group(1).strip()
    return comments


def describe_keys() -> list[tuple[str, str]]:
    """Every key a training config may hold, with what sdprep does with it (for `--list-keys`)."""
    from sdprep.train.config.kohya import ACCEPTED_IGNORED, ALIASES, UNSUPPORTED
    from sdprep.train.config.schema import FIELDS, TrainConfig

    comments = _field_comments(TrainConfig)
    defaults = TrainConfig()
    rows: list[tuple[str, str]] = []
    for name in FIELDS:
        default = getattr(defaults, name)
        shown = "unset" if default is None else repr(default)
        rows.append((name, f"{comments.get(name, '')} [default: {shown}]".strip()))
    rows += [(name, f'another name of "{target}"') for name, target in ALIASES.items()]
    rows += [
        ("epoch", "the kohya GUI's field: ignored as kohya ignores it (alone: max_train_epochs)"),
        ("resume_from", "not a kohya key: read as weights / network_weights (a file) or resume (a folder)"),
        ("use_8bit_adam", 'read as optimizer_type = "AdamW8bit"'),
    ]
    rows += [(name, f"accepted, not used: {why}") for name, why in ACCEPTED_IGNORED.items()]
    rows += [(name, f"refused unless off: {why}") for name, (_, why) in UNSUPPORTED.items()]
    return sorted(rows)


def undocumented_fields() -> list[str]:
    """Fields without a comment (a test keeps this empty)."""
    from sdprep.train.config.schema import FIELDS, TrainConfig

    comments = _field_comments(TrainConfig)
    return [name for name in FIELDS if not comments.get(name)]
