"""Project files: one TOML describing a whole chain, run by `sdprep run`, written by `sdprep init`.

    [project]
    dataset = "data"              # the working dataset folder (relative to the project file)
    source = "raw"                # optional: copied into `dataset` on the first run (originals untouched)
    executor = "ray"              # optional: convert, dedup, upscale, mask, tag, clean on a Ray cluster
    ray_address = "auto"          #   (with ray_workers = N); `sdprep run --executor` overrides

    [stages.rename]               # stages run in the order written; each table holds the stage's
    pattern = "{n:03d}"           # options, exactly the fields of its options dataclass

    [stages.tag]
    ...
    [rules]                       # optional: caption rules every caption-writing stage applies
    remove = ["pink hair"]        # tag leaves them out (undesired), clean removes them
    replace = { "1girl" = "girl" }

    [train]                       # optional: kohya/sdprep training keys (or config = "train.toml")

Each stage is `sdprep.prep.<name>.run_<name>(dataset, <Name>Options(...))`. Stages skip work already
done with the same options, so re-running after changing one option redoes only what it affects.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdprep import state
from sdprep.config import from_dict, load_toml
from sdprep.errors import ConfigError, did_you_mean
from sdprep.executors import ExecutorSettings, make_executor
from sdprep.fileops import atomic_write_text
from sdprep.hub import is_path_like
from sdprep.progress import NullReporter, Reporter
from sdprep.stage import StageResult

if TYPE_CHECKING:
    from sdprep.prep.rules import CleanRules

STAGES = ("scrape", "convert", "rename", "dedup", "upscale", "mask", "tag", "clean", "bucket", "report")
FOLDER_KEYS = ("dataset", "source", "demo_models")
EXECUTOR_KEYS = ("executor", "ray_address", "ray_workers")  # sdprep.executors.ExecutorSettings
PROJECT_KEYS = (*FOLDER_KEYS, *EXECUTOR_KEYS)
EXECUTOR_STAGES = frozenset({"convert", "dedup", "upscale", "mask", "tag", "clean"})  # take executor=
SECTIONS = ("project", "rules", "stages", "train")
MAYBE_PATH_KEYS = {"model", "tokenizer", "cascade"}  # a hub id, or a local path relative to the project


@dataclass(frozen=True)
class SharedRules:
    """`[rules]`: caption rules listed once for `tag` and `clean` (same meaning in both, as
    `clean --remove` / `--replace`); a stage's own rules come after them and win a replacement."""

    remove: tuple[str, ...] = ()
    replace: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def apply(self, name: str, opts: Any) -> Any:
        """`opts` (a tag or clean options object) with these rules put before the stage's own."""
        if name not in ("tag", "clean"):
            return opts
        rules = opts.rules
        if name == "tag":
            rules = dataclasses.replace(
                rules, undesired=(*self.remove, *rules.undesired), replace={**self.replace, **rules.replace}
            )
        else:
            rules = self.before_clean(rules)
        return dataclasses.replace(opts, rules=rules)

    def before_clean(self, rules: CleanRules) -> CleanRules:
        """`clean`'s rules with these put before them (a replacement of the stage's own wins)."""
        return dataclasses.replace(
            rules, remove=(*self.remove, *rules.remove), replace={**self.replace, **rules.replace}
        )


@dataclass(frozen=True)
class Project:
    path: Path
    dataset: Path
    source: Path | None = None
    demo_models: Path | None = None
    stages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    train: dict[str, Any] | None = None
    rules: SharedRules = field(default_factory=SharedRules)
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)

    @property
    def base(self) -> Path:
        return self.path.parent


def _resolve(base: Path, value: str | Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def load_project(path: Path | str) -> Project:
    """Read and check a project file (unknown sections, keys and stage names are errors)."""
    path = Path(path).absolute()
    doc = load_toml(path)
    for key in doc:
        if key not in SECTIONS:
            hint = did_you_mean(key, SECTIONS)
            raise ConfigError(
                f"{path}: unknown section [{key}]",
                hint or "sections: [project], [rules], [stages.NAME], [train]",
            )
    proj = doc.get("project", {})
    for key in proj:
        if key not in PROJECT_KEYS:
            raise ConfigError(
                f'{path}: unknown key "project.{key}"',
                did_you_mean(key, PROJECT_KEYS) or f"keys: {', '.join(PROJECT_KEYS)}",
            )
    if not isinstance(proj, dict):
        raise ConfigError(f"{path}: [project] must be a table")
    if "dataset" not in proj:
        raise ConfigError(f'{path}: [project] needs dataset = "FOLDER"', "the folder the stages work on")
    for key in FOLDER_KEYS:
        if key in proj and not isinstance(proj[key], str):
            raise ConfigError(f"{path}: project.{key} must be a folder name in quotes, got {proj[key]!r}")
    if not all(isinstance(doc.get(key, {}), dict) for key in ("stages", "train", "rules")):
        raise ConfigError(f"{path}: [rules], [stages] and [train] must be tables")
    try:
        rules = from_dict(SharedRules, doc.get("rules", {}), where="rules")
        executor = from_dict(
            ExecutorSettings, {k: proj[k] for k in EXECUTOR_KEYS if k in proj}, where="project"
        )
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}", exc.hint) from None
    base = path.parent
    stages = []
    for name, table in doc.get("stages", {}).items():
        if name not in STAGES:
            hint = did_you_mean(name, STAGES)
            raise ConfigError(
                f"{path}: unknown stage [stages.{name}]", hint or f"stages: {', '.join(STAGES)}"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [stages.{name}] must be a table")
        stages.append((name, table))
    return Project(
        path=path,
        dataset=_resolve(base, proj["dataset"]),
        source=_resolve(base, proj["source"]) if proj.get("source") else None,
        demo_models=_resolve(base, proj["demo_models"]) if proj.get("demo_models") else None,
        stages=stages,
        train=doc.get("train"),
        rules=rules,
        executor=executor,
    )


def _resolve_paths(cls: type, table: dict[str, Any], base: Path) -> dict[str, Any]:
    """Resolve every path-typed value of `table` (nested tables too) relative to `base`."""
    hints = typing.get_type_hints(cls)
    out = dict(table)
    for key, value in table.items():
        tp = hints.get(key)
        if tp is None:
            continue  # unknown keys are reported by from_dict
        inner = [a for a in typing.get_args(tp) if isinstance(a, type) and dataclasses.is_dataclass(a)]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(value, dict):
            out[key] = _resolve_paths(tp, value, base)
        elif inner and isinstance(value, dict):
            out[key] = _resolve_paths(inner[0], value, base)
        elif key in MAYBE_PATH_KEYS and isinstance(value, str):
            if (base / value).exists() or is_path_like(value):  # a local folder (maybe not built yet)
                out[key] = str(_resolve(base, value))
        elif "Path" in str(tp):
            if isinstance(value, list):
                out[key] = [str(_resolve(base, v)) for v in value]
            elif isinstance(value, str) and value:
                out[key] = str(_resolve(base, value))
    return out


def stage_options(name: str, table: dict[str, Any], base: Path) -> tuple[Callable[..., StageResult], Any]:
    """(run function, options instance) for a stage table; paths are relative to `base`."""
    module = importlib.import_module(f"sdprep.prep.{name}")
    run = getattr(module, f"run_{name}")
    cls = getattr(module, f"{name.capitalize()}Options")
    return run, from_dict(cls, _resolve_paths(cls, table, base), where=f"stages.{name}")


def import_source(project: Project) -> int:
    """Copy the source folder into the dataset on the first run; later runs leave the dataset alone."""
    if project.source is None:
        return 0
    marker = state.file(project.dataset, "imported.json")
    if os.path.lexists(marker):
        return 0
    project.dataset.mkdir(parents=True, exist_ok=True)
    copied = 0
    for src in sorted(project.source.rglob("*")):
        if src.is_file() and not any(part.startswith(".") for part in src.relative_to(project.source).parts):
            dst = project.dataset / src.relative_to(project.source)
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
                copied += 1
    atomic_write_text(
        state.file(project.dataset, "imported.json", create_parent=True),
        json.dumps({"source": str(project.source), "files": copied}) + "\n",
    )
    return copied


def build_demo_models(folder: Path) -> None:
    """The tiny demo models (random weights) the sample project refers to."""
    from sdprep.taggers.tiny import build_tiny_wd14

    if not (folder / "wd14-demo" / "model.onnx").exists():
        build_tiny_wd14(folder / "wd14-demo")
    from sdprep.train.models.tiny import build_tiny_sdxl

    build_tiny_sdxl(folder / "sdxl-demo")


def check_only(project: Project, only: list[str] | None) -> None:
    """`--only` names: stages of this project (or train when it has [train]), with a suggestion."""
    names = [n for n, _ in project.stages] + (["train"] if project.train is not None else [])
    for name in only or []:
        if name in names:
            continue
        if name in (*STAGES, "train"):
            what = "[train]" if name == "train" else f"[stages.{name}]"
            raise ConfigError(
                f"--only {name}: {project.path} has no {what}", f"stages here: {', '.join(names)}"
            )
        hint = did_you_mean(name, names) or did_you_mean(name, (*STAGES, "train"))
        listing = f"stages here: {', '.join(names)}"
        raise ConfigError(f"--only {name}: no such stage", f"{hint} {listing}" if hint else listing)


def check_project(
    project: Project, *, only: list[str] | None = None, train: bool = True
) -> list[tuple[str, Callable[..., StageResult], Any]]:
    """Everything about the project file that can be checked before a file changes: `--only`, every
    stage's options, the source and dataset folders, and the [train] settings when training runs.

    Returns (name, run function, options) of the stages to run, in order.
    """
    check_only(project, only)
    prepared = []
    for name, table in project.stages:
        run, opts = stage_options(name, table, project.base)
        prepared.append((name, run, project.rules.apply(name, opts)))
    if project.source is not None and not project.source.is_dir():
        raise ConfigError(
            f"{project.source}: source folder not found", "fix [project] source in the project file"
        )
    if project.source is None and not project.dataset.is_dir():
        raise ConfigError(
            f"{project.dataset}: dataset folder not found", "set [project] source, or create the folder"
        )
    if train and project.train is not None and (not only or "train" in only):
        from sdprep.train.api import check_train  # no torch: reads and validates the settings only

        check_train(project)
    return [p for p in prepared if not only or p[0] in only]


def run_project(
    project: Project,
    *,
    echo: Callable[[str], None] = print,
    reporter: Callable[[], Reporter] = NullReporter,
    only: list[str] | None = None,
    train: bool = True,
    executor: ExecutorSettings | None = None,
) -> list[StageResult]:
    """Run the project's stages in order (then training), printing each stage's summary.

    The whole project is checked first (`check_project`): a typo fails before anything is built,
    imported or changed. `executor` (default: the project's `[project] executor`) runs the
    per-image work of the stages in EXECUTOR_STAGES; the others run here.
    """
    prepared = check_project(project, only=only, train=train)
    if project.demo_models:
        echo(f"demo models (tiny, random weights: for the demo only): {project.demo_models}")
        build_demo_models(project.demo_models)
    copied = import_source(project)
    if copied:
        echo(f"import: {copied} files copied from {project.source} into {project.dataset}")
    from sdprep.prep.lineage import WRITERS

    # the caption writers learn their chain, so a re-run rebuilds captions as a fresh run would
    chain = tuple(name for name, _ in project.stages if name in WRITERS)
    results = []
    with make_executor(executor or project.executor) as ex:
        for name, run, opts in prepared:
            extra: dict[str, Any] = {"chain": chain} if name in WRITERS else {}
            if name in EXECUTOR_STAGES:
                extra["executor"] = ex
            result = run(project.dataset, opts, report=reporter(), **extra)
            results.append(result)
            echo(result.summary())
    if train and project.train is not None and (not only or "train" in only):
        from sdprep.train.api import train_from_project  # heavy imports only when training

        result = train_from_project(project, echo=echo, reporter=reporter)
        results.append(result)
        echo(result.summary())
    return results


def run_summary(results: list[StageResult]) -> str:
    """The last line of `sdprep run`: `run: 7 stages and training, 43 changed, 0 failed`."""
    stages = sum(r.stage != "train" for r in results)
    what = f"{stages} stage{'s' if stages != 1 else ''}"
    if any(r.stage == "train" for r in results):
        what += " and training"
    failed = sum(len(r.failed) for r in results)
    return f"run: {what}, {sum(r.changed for r in results)} changed, {failed} failed"


INIT_TEMPLATE = """# sdprep project file. Run it with:  sdprep run {name}
# Every stage skips work already done with the same options: re-run after changing anything.
# Undo the last change a stage made to the dataset with:  sdprep undo {dataset}

[project]
dataset = "{dataset}"          # the folder the stages work on (your images, captions, sidecars)
# source = "raw_images"        # optional: copied into `dataset` on the first run; originals untouched

# Stages run in the order written here. Remove the ones you do not need.
# [stages.scrape]
# urls = ["https://danbooru.donmai.us/posts?tags=your_character"]
# limit = 200

[stages.rename]
pattern = "{{n:03d}}"            # 001.png, 002.jpg, ...; captions, sidecars and masks follow

[stages.upscale]
min_side = 768                 # bring small images up (Lanczos; model = "4x.safetensors" for ESRGAN)

# [stages.mask]
# method = "face"              # alpha | face | clipseg | color | import | full

[stages.tag]
# model = "SmilingWolf/wd-swinv2-tagger-v3"   # or a local folder with model.onnx + selected_tags.csv
merge = "replace"              # replace | append | keep (existing captions)
[stages.tag.rules]
general_threshold = 0.35
character_threshold = 0.85

[stages.clean]
[stages.clean.rules]
trigger = ["mytoken"]          # always first
remove = []                    # tags characteristic of the subject: the trigger absorbs them
underscores = "space"          # keep | space | underscore
[stages.clean.rules.monochrome]
enabled = true                 # append greyscale / monochrome (the HSV test)

[stages.bucket]
out = "train_set"              # kohya layout: train_set/img/<N>_<token>/, dataset.toml, metadata.json
token = "mytoken"
repeats = 10

[stages.report]
out = "report.html"

# [train]                      # kohya training keys (or config = "train.toml")
# pretrained_model_name_or_path = "stabilityai/stable-diffusion-xl-base-1.0"
# network_module = "networks.lora"
# network_dim = 16
# network_alpha = 16
# learning_rate = 1e-4
# max_train_steps = 1500
# output_dir = "output"
# output_name = "mytoken"
"""


def write_init(
    folder: Path | str, name: str = "project.toml", dataset: str = "data", force: bool = False
) -> Path:
    """Write a commented starting project file into `folder`; refuses to overwrite unless `force`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists", "pass --force to overwrite it, or choose another --name")
    atomic_write_text(path, INIT_TEMPLATE.format(name=path, dataset=dataset))
    return path
