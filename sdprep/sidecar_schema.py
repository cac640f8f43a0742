"""The types of what sdprep stores under a sidecar's "sdprep" key, checked when a sidecar is read.

A sidecar is a file anyone may edit (or another tool may write), so `"sdprep": {"monochrome": 7}`
is possible. `read_sidecar` checks the records described here and turns a value of the wrong type
into a per-file error naming the sidecar and the key, so no stage meets a number where it reads an
object. Keys are optional and records may hold more keys than listed (older or newer versions);
only the types of what is there are checked, and a record that is null counts as absent.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Record:
    """A JSON object with these (optional) keys."""

    fields: dict[str, Any]


@dataclass(frozen=True)
class MapOf:
    """A JSON object with any string keys, each value of `value`."""

    value: Any


@dataclass(frozen=True)
class ListOf:
    item: Any
    length: int | None = None


@dataclass(frozen=True)
class OneOf:
    choices: tuple[Any, ...]


@dataclass(frozen=True)
class Hex:
    """A string of hexadecimal digits (a stored hash)."""


NUMBER = (int, float)
SIZE = ListOf(int, 2)
MASK = Record({"path": str, "method": str, "options": dict, "image_sha1": str, "coverage": NUMBER})
SCHEMA: dict[str, Any] = {
    "size": SIZE,
    "upscale": Record({"from": SIZE, "to": SIZE, "method": str}),
    "mask": MASK,  # and every `masks_<name>` key (`sdprep mask --out masks_<name>`)
    "wd14": Record(
        {
            "model": str,
            "preprocess": str,
            "floor": NUMBER,
            "rating": MapOf(NUMBER),
            "scores": MapOf(NUMBER),
            "categories": MapOf(str),
            "mcut": MapOf(NUMBER),
        }
    ),
    "caption": Record({"text": str, "model": str, "prompt": str, "settings": dict}),
    "tag": Record({"settings": dict, "written": str, "base": str}),
    "monochrome": OneOf(
        (
            str,  # older sidecars hold the label alone
            Record(
                {
                    "label": str,
                    "saturation": NUMBER,
                    "hue_std": NUMBER,
                    "version": str,
                    "thresholds": MapOf(NUMBER),
                    "measured": str,
                    "measured_size": SIZE,
                    "image": dict,
                }
            ),
        )
    ),
    "dedup": Record({"algo": str, "phash": Hex(), "size": SIZE, "sharpness": NUMBER, "file": list}),
    "duplicate_of": str,
    "booru": Record({"tags": MapOf(ListOf(str)), "rating": OneOf((str, type(None)))}),
    "scrape": Record({"url": str}),
    "rejected": str,
}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, NUMBER):
        return "a number"
    names: dict[type, str] = {str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _expected(spec: Any) -> str:
    if isinstance(spec, (Record, MapOf)) or spec is dict:
        return "an object"
    if isinstance(spec, ListOf):
        return f"a list of {spec.length} items" if spec.length else "a list"
    if isinstance(spec, OneOf):
        return " or ".join(_expected(c) for c in spec.choices)
    if isinstance(spec, Hex):
        return "a hexadecimal string"
    return {str: "a string", int: "a whole number", list: "a list", type(None): "null"}.get(spec, "a number")


def _check(value: Any, spec: Any, where: str) -> str | None:
    """The first type problem of `value` against `spec`, as 'WHERE is X, expected Y', or None."""
    if isinstance(spec, OneOf):
        problems = [_check(value, c, where) for c in spec.choices]
        if None in problems:
            return None
        shallow = f"{where} is {_kind(value)}, expected "
        deeper = [
            p for p in problems if p is not None and not p.startswith(shallow)
        ]  # the right kind, a wrong part
        return deeper[0] if deeper else shallow + _expected(spec)
    if isinstance(spec, Hex):
        ok = isinstance(value, str) and value != "" and all(c in "0123456789abcdefABCDEF" for c in value)
    elif isinstance(spec, (Record, MapOf)):
        ok = isinstance(value, dict)
    elif isinstance(spec, ListOf):
        ok = isinstance(value, list) and (spec.length is None or len(value) == spec.length)
    else:
        ok = isinstance(value, spec) and not (isinstance(value, bool) and bool not in _types(spec))
    if not ok:
        return f"{where} is {_kind(value)}, expected {_expected(spec)}"
    inner: Iterator[tuple[str, Any, Any]]  # (key, value, its spec)
    if isinstance(spec, Record):
        inner = ((k, v, spec.fields[k]) for k, v in value.items() if k in spec.fields)
    elif isinstance(spec, MapOf):
        inner = ((k, v, spec.value) for k, v in value.items())
    elif isinstance(spec, ListOf):
        inner = ((str(i), v, spec.item) for i, v in enumerate(value))
    else:
        return None
    for key, item, item_spec in inner:
        problem = _check(item, item_spec, f"{where}.{key}")
        if problem:
            return problem
    return None


def _types(spec: Any) -> tuple[type, ...]:
    return spec if isinstance(spec, tuple) else (spec,)


def sidecar_problem(sidecar: dict[str, Any], key: str = "sdprep", mask_prefix: str = "masks_") -> str | None:
    """What is wrong with the types of sdprep's part of `sidecar` (the first problem), or None."""
    meta = sidecar.get(key)
    if meta is None:
        return None
    if not isinstance(meta, dict):
        return f"{key} is {_kind(meta)}, expected an object"
    for name, value in meta.items():
        spec = SCHEMA.get(name) or (MASK if name.startswith(mask_prefix) else None)
        # null stands for "no record" (every stage reads a record with .get and checks its type)
        problem = _check(value, spec, f"{key}.{name}") if spec is not None and value is not None else None
        if problem:
            return problem
    return None
