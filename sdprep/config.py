"""Strict configuration: TOML or dicts into frozen dataclasses, with typed, located error messages.

- Unknown keys are errors with a "did you mean" suggestion.
- Values are coerced where the intent is unambiguous ("5e-6" -> float, 1 -> 1.0, "1024,1536" ->
  (1024, 1536)) and otherwise rejected with the key's dotted path.
- `layer(...)` merges defaults < preset < file < `--set key=value` overrides.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union, get_args, get_origin

from sdprep.errors import ConfigError, did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def load_toml(path: Path | str) -> dict[str, Any]:
    """Read a TOML file; a syntax error names the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file", "check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from exc
    return parse_toml(text, f"{path}: ")


def parse_toml(text: str, where: str = "") -> dict[str, Any]:
    """TOML text already read (a file's, prefixed `where` in errors, or a page's) -> its tables."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"{where}invalid TOML: {exc}", "check quotes, commas and brackets on that line"
        ) from exc
    except RecursionError:
        raise ConfigError(f"{where}invalid TOML: arrays or tables nested too deeply") from None


def parse_value(text: str) -> Any:
    """Parse the value of a `--set key=value` as TOML when it is valid TOML, else as a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> `{"a": {"b": 1}, "c": "x"}`."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(
                f'--set "{pair}" is not of the form key=value', "write e.g. --set learning_rate=1e-4"
            )
        key, value = pair.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = parse_value(value.strip())
    return out


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `top` over `base` (tables merge, other values replace)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def layer(*layers: dict[str, Any] | None) -> dict[str, Any]:
    """Merge config layers, lowest priority first."""
    out: dict[str, Any] = {}
    for item in layers:
        if item:
            out = merge(out, item)
    return out


# -- coercion --------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert `value` to type `tp` or raise a ConfigError naming `where`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(exc)
        raise (
            errors[0]
            if len(errors) == 1
            else ConfigError(
                f"{where}: expected {' or '.join(_type_name(a) for a in args if a is not type(None))}, got {value!r}"
            )
        )
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        if isinstance(value, str) and value.lower() in choices:
            return value.lower()
        hint = did_you_mean(str(value), [str(c) for c in choices])
        listing = "valid: " + ", ".join(str(c) for c in choices)
        raise ConfigError(f"{where}: invalid value {value!r}", f"{hint} {listing}" if hint else listing)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value.strip())
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):  # nan / inf would only show up later, as a NaN loss
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value).expanduser()
        raise ConfigError(f"{where}: expected a path, got {value!r}")
    if origin in (list, tuple):
        args = get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            value = [value]
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
            return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {coerce(k, kt, where): coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return from_dict(tp, value, where=where)
    if isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def from_dict(
    cls: type[T], data: dict[str, Any], *, where: str = "", aliases: dict[str, str] | None = None
) -> T:
    """Build dataclass `cls` from `data`, strictly: unknown keys and wrong types are ConfigErrors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    aliases = aliases or {}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = aliases.get(key, key)
        dotted = f"{where}.{key}" if where else key
        if name not in fields:
            hint = did_you_mean(key, list(fields) + list(aliases))
            raise ConfigError(f'unknown key "{dotted}"', hint or "valid keys: " + ", ".join(sorted(fields)))
        kwargs[name] = coerce(value, hints[name], dotted)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


# -- ranges of option values ---------------------------------------------------------------


def bounded(default: Any, low: float | None = None, high: float | None = None, option: str = "") -> Any:
    """A dataclass field whose value (when not None) must lie in [low, high]; None: no bound.

    The options class checks it in `__post_init__` (`check_bounds`), so a command, a project file
    and a caller of the library meet the same rule, with the same message. `option`: the
    command-line name when it is not `--<field-name>`.
    """
    return dataclasses.field(default=default, metadata={"range": (low, high), "option": option})


def _range_text(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        whole = isinstance(low, int) and isinstance(high, int)
        return f"{low}-{high}" if whole else f"between {low:g} and {high:g}"
    if low is not None:
        return "0 or more" if low == 0 else f"at least {low:g}"
    return f"at most {high:g}"


def check_bounds(obj: DataclassInstance) -> None:
    """A ConfigError for the first `bounded` field of the dataclass `obj` outside its range
    (named as its command-line option: `--batch-size must be at least 1, got 0`)."""
    for f in dataclasses.fields(obj):
        low, high = f.metadata.get("range", (None, None))
        value = getattr(obj, f.name)
        if value is None or (low is None and high is None):
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            option = f.metadata.get("option") or "--" + f.name.replace("_", "-")
            raise ConfigError(f"{option} must be {_range_text(low, high)}, got {value}")


def to_dict(obj: Any) -> Any:
    """A dataclass as plain TOML/JSON-friendly values (paths as strings, tuples as lists).

    Fields marked `metadata={"internal": True}` (bookkeeping, not settings) are left out."""
    if dataclasses.is_dataclass(obj):
        return {
            f.name: to_dict(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not f.metadata.get("internal")
        }
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj
