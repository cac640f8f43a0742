from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from sdprep.config import from_dict, layer, load_toml, parse_overrides
from sdprep.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    rate: float = 1e-4
    mode: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    steps: int = 10
    size: tuple[int, int] = (1024, 1024)
    args: list[str] = field(default_factory=list)
    out: Path | None = None
    inner: Inner = field(default_factory=Inner)


def test_coercion_and_nesting():
    cfg = from_dict(Outer, {"steps": "20", "size": "832,1216", "args": "a=1, b=2", "inner": {"rate": "5e-6"}})
    assert cfg.steps == 20 and cfg.size == (832, 1216) and cfg.args == ["a=1", "b=2"]
    assert cfg.inner.rate == 5e-6 and cfg.out is None


def test_unknown_key_suggests():
    with pytest.raises(ConfigError, match='unknown key "stpes"') as exc:
        from_dict(Outer, {"stpes": 3})
    assert 'did you mean "steps"?' in str(exc.value)
    with pytest.raises(ConfigError, match='unknown key "inner.rat"'):
        from_dict(Outer, {"inner": {"rat": 1}})


def test_type_errors_name_the_key():
    with pytest.raises(ConfigError, match="inner.mode: invalid value 'c'"):
        from_dict(Outer, {"inner": {"mode": "c"}})
    with pytest.raises(ConfigError, match="steps: expected an integer, got 'many'"):
        from_dict(Outer, {"steps": "many"})


def test_layering_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("steps = 5\n[inner]\nrate = 0.1\n")
    merged = layer({"steps": 1, "name": "d"}, load_toml(p), parse_overrides(["inner.mode=b", "name=cli"]))
    cfg = from_dict(Outer, merged)
    assert (cfg.steps, cfg.name, cfg.inner.rate, cfg.inner.mode) == (5, "cli", 0.1, "b")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.toml", "x = = 1\n", "bad.toml: invalid TOML"),
        (
            "bomb.toml",
            "a = " + "[" * 100_000 + "]" * 100_000 + "\n",
            "bomb.toml: invalid TOML: arrays or tables nested too deeply",
        ),
    ],
    ids=["syntax", "nested-too-deeply"],
)
def test_bad_toml_is_a_config_error_naming_the_file(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_toml(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "-inf", "nan"])
def test_non_finite_numbers_are_refused(bad):
    with pytest.raises(ConfigError, match=r"inner.rate: expected a finite number"):
        from_dict(Outer, {"inner": {"rate": bad}})
    assert from_dict(Outer, {"inner": {"rate": "2e-3"}}).inner.rate == 2e-3
