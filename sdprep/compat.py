"""Which package versions sdprep supports: the lock's tested versions and the known-bad combinations.

`sdprep doctor` reports both; `sdprep train` refuses, before loading a model, a combination known to
break training. The lock is `constraints.txt` at the top of a source checkout (written by
`make lock`); an installed wheel has no lock, and then only the known-bad table applies.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

LOCK_FILE = Path(__file__).resolve().parent.parent / "constraints.txt"
# the packages whose versions decide whether sdprep works; others in the lock are their dependencies
CHECKED = (
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "huggingface_hub",
    "onnxruntime",
    "onnx",
    "numpy",
    "pillow",
    "opencv-python-headless",
    "gallery_dl",
)


@dataclass(frozen=True)
class BadPair:
    """Two releases that do not work together, what breaks, and what to install instead."""

    package: str
    versions: str  # a specifier set, e.g. ">=5.25"
    other: str
    other_versions: str
    what: str
    fix: str
    breaks_training: bool  # True: `sdprep train` refuses to start


KNOWN_BAD = (
    BadPair(
        "transformers",
        ">=5.25",
        "peft",
        "<0.22",
        "transformers' PEFT integration refuses this peft (`add_adapter`, `load_adapter`: "
        "'The version of PEFT you are using is not compatible, please use a version >= 0.22.0')",
        "pip install 'transformers<5.25' (or install from the lock: pip install -c constraints.txt 'sdprep[all]')",
        # sdprep's LoRA injects adapters with peft's own API, which this pair does not affect
        breaks_training=False,
    ),
)


@dataclass(frozen=True)
class Problem:
    """A known-bad combination found installed."""

    pair: BadPair
    installed: dict[str, str]

    def message(self) -> str:
        names = " + ".join(f"{name} {v}" for name, v in self.installed.items())
        return f"{names}: {self.pair.what}"


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _matches(version: str, spec: str) -> bool:
    try:
        return Version(version) in SpecifierSet(spec, prereleases=True)
    except InvalidVersion:
        return False


Versions = Callable[[str], "str | None"]


def known_problems(version: Versions | None = None) -> list[Problem]:
    """Every known-bad pair that is installed (or that `version(name)` reports)."""
    version = version or installed_version
    found = []
    for pair in KNOWN_BAD:
        a, b = version(pair.package), version(pair.other)
        if a and b and _matches(a, pair.versions) and _matches(b, pair.other_versions):
            found.append(Problem(pair, {pair.package: a, pair.other: b}))
    return found


def read_lock(path: Path = LOCK_FILE) -> dict[str, str]:
    """{normalised package name: version} from a constraints file; {} when there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, _, ver = line.partition("==")
            pins[normalise(name)] = ver.strip()
    return pins


def normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def untested(lock: dict[str, str], version: Versions | None = None) -> list[tuple[str, str, str]]:
    """(package, installed, locked) for checked packages whose installed version is not the lock's."""
    version = version or installed_version
    out = []
    for name in CHECKED:
        want, have = lock.get(normalise(name)), version(name)
        if want and have and Version(have).public != Version(want).public:
            out.append((name, have, want))
    return out


def check_training_stack(version: Versions | None = None) -> None:
    """Raise before any model loads when the installed packages are known not to train."""
    from sdprep.errors import InstallError

    bad = [p for p in known_problems(version) if p.pair.breaks_training]
    if bad:
        raise InstallError(
            "; ".join(p.message() for p in bad),
            " and ".join(p.pair.fix for p in bad) + " (see `sdprep doctor`)",
        )
