"""Where the training images come from: kohya dataset TOMLs, DreamBooth folders, metadata JSON.

Three sources, decided by the training config (kohya's rules):
- `dataset_config`: a kohya dataset TOML (`[general]`, `[[datasets]]`, `[[datasets.subsets]]`),
  read strictly: exactly kohya's keys, each at a level where kohya accepts it; a typo is a
  ConfigError with a "did you mean". A value is looked up subset -> dataset -> general -> training
  config -> kohya's default. Relative paths are resolved from the TOML's folder (what `sdprep
  bucket` writes, so its output trains wherever it is moved), else from the working directory
  (kohya's rule, for TOMLs written for kohya).
- `in_json` (+ `train_data_dir`): one fine-tuning subset reading captions from the metadata JSON.
- `train_data_dir` (+ `reg_data_dir`): kohya DreamBooth folders `<N>_<class tokens>`. Folders
  without an integer prefix are ignored with a note; an `sdprep bucket` output folder (with its
  `dataset.toml`) is read through that TOML; a repeat folder given directly is used as one subset.

Features kohya has and sdprep does not (face_crop_aug_range, token_warmup_step,
network_multiplier) are errors when set to a non-default value, never ignored.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdprep.config import coerce, load_toml
from sdprep.dataset import RepeatFolder, is_image, parse_repeat_folder
from sdprep.errors import ConfigError, did_you_mean
from sdprep.train.data.captions import CaptionOptions

if TYPE_CHECKING:
    from sdprep.train.config.schema import TrainConfig

# -- kohya's schema (library/config_util.py), by level -------------------------------------------

SUBSET_ASCENDABLE: dict[str, Any] = {
    "color_aug": bool,
    "face_crop_aug_range": tuple[float, float],
    "flip_aug": bool,
    "num_repeats": int,
    "random_crop": bool,
    "shuffle_caption": bool,
    "keep_tokens": int,
    "keep_tokens_separator": str,
    "caption_separator": str,
    "secondary_separator": str,
    "enable_wildcard": bool,
    "token_warmup_min": int,
    "token_warmup_step": float,
    "caption_prefix": str,
    "caption_suffix": str,
    "alpha_mask": bool,
    "resize_interpolation": str,
    "caption_dropout_every_n_epochs": int,
    "caption_dropout_rate": float,
    "caption_tag_dropout_rate": float,
    "caption_extension": str,
    "class_tokens": str,
    "cache_info": bool,
}
SUBSET_DISTINCT: dict[str, Any] = {
    "image_dir": str,
    "is_reg": bool,
    "metadata_file": str,
    "conditioning_data_dir": str,
}
DATASET_ASCENDABLE: dict[str, Any] = {
    "batch_size": int,
    "bucket_no_upscale": bool,
    "bucket_reso_steps": int,
    "enable_bucket": bool,
    "max_bucket_reso": int,
    "min_bucket_reso": int,
    "resolution": tuple[int, int],
    "network_multiplier": float,
    "validation_split": float,
    "validation_seed": int,
}
GENERAL_KEYS = {**DATASET_ASCENDABLE, **SUBSET_ASCENDABLE}
DATASET_KEYS = {**DATASET_ASCENDABLE, **SUBSET_ASCENDABLE}
SUBSET_KEYS = {**SUBSET_ASCENDABLE, **SUBSET_DISTINCT}
FINETUNE_FORBIDDEN = ("is_reg", "class_tokens", "caption_extension", "conditioning_data_dir")

# Training-config names of the dataset keys that kohya renames on the command line.
CFG_NAMES = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}

# kohya sd-scripts' own defaults for the dataset TOML keys. Deliberately kohya's, not sdprep's: sdprep's
# defaults are TrainConfig's field defaults (the one table of them), and a key the training config has
# always resolves to its value (command line > config > dataset TOML > defaults). This table serves
# only (1) the keys TrainConfig has no field for (token_warmup_*, network_multiplier, cache_info) and
# (2) the note that names where sdprep's default differs from kohya's (sdprep_defaults()).
KOHYA_DEFAULTS: dict[str, Any] = {
    "num_repeats": 1,
    "caption_extension": ".caption",
    "caption_separator": ",",
    "keep_tokens": 0,
    "keep_tokens_separator": "",
    "shuffle_caption": False,
    "enable_wildcard": False,
    "flip_aug": False,
    "color_aug": False,
    "random_crop": False,
    "alpha_mask": False,
    "caption_dropout_rate": 0.0,
    "caption_dropout_every_n_epochs": 0,
    "caption_tag_dropout_rate": 0.0,
    "token_warmup_min": 1,
    "token_warmup_step": 0.0,
    "batch_size": 1,
    "enable_bucket": False,
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "bucket_reso_steps": 64,
    "bucket_no_upscale": False,
    "network_multiplier": 1.0,
    "validation_split": 0.0,
    "cache_info": False,
}
INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")
# one lookup layer of a dataset TOML (a [[datasets.subsets]], [[datasets]] or [general] table, its
# keys checked against the table of allowed keys and coerced): key -> value
Layer = dict[str, Any]


@dataclass
class Findings:
    """What building the dataset noticed: notes to print, and images left out with the reason."""

    notes: list[str] = field(default_factory=list)
    dropped: list[tuple[Path, str]] = field(default_factory=list)
    kohya_defaults: dict[str, str] = field(default_factory=dict)  # sdprep default used -> kohya's

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)

    def drop(self, path: Path, reason: str) -> None:
        self.dropped.append((Path(path), reason))


@dataclass(frozen=True)
class SubsetSpec:
    """One kohya subset, every value resolved."""

    image_dir: Path | None
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    metadata_file: Path | None = None
    conditioning_data_dir: Path | None = None
    alpha_mask: bool = False
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    resize_interpolation: str | None = None
    captions: CaptionOptions = CaptionOptions()
    origin: str = ""  # where it was defined, for messages

    @property
    def is_finetune(self) -> bool:
        return self.metadata_file is not None

    @property
    def name(self) -> str:
        """The folder name kohya records in `ss_dataset_dirs` / `ss_tag_frequency`."""
        if self.metadata_file is not None:
            return self.metadata_file.name
        return self.image_dir.name if self.image_dir is not None else self.origin


@dataclass(frozen=True)
class DatasetSpec:
    """One kohya dataset: its subsets and bucket settings."""

    subsets: tuple[SubsetSpec, ...]
    resolution: tuple[int, int]
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    validation_split: float = 0.0  # share of each subset's images held out (sdprep.train.loop.validation)
    validation_seed: int | None = None
    origin: str = ""


# -- value lookup ---------------------------------------------------------------------------------


# Settings of the whole run: a value the training config sets (file or command line) wins over the
# dataset TOML's [general] / [[datasets]] one (command line > config > dataset TOML > defaults).
# Settings of an image folder (captions, repeats, augmentation) stay the dataset TOML's, the more
# specific place (kohya's lookup: subset > dataset > general > training config > default).
RUN_KEYS = tuple(
    k for k in DATASET_ASCENDABLE if k not in ("network_multiplier", "validation_split", "validation_seed")
)


def origin_of(cfg: TrainConfig, key: str) -> str | None:
    """Where training-config `key` was set (a config file's path, or "the command line"); None:
    a default (or a config built in code)."""
    return dict(cfg.origins).get(key)


def cfg_value(cfg: TrainConfig, key: str, default: Any = None) -> Any:
    """A training-config value by its kohya dataset key (None-valued fields count as unset)."""
    value = getattr(cfg, CFG_NAMES.get(key, key), None)
    return default if value is None else value


@functools.cache
def sdprep_defaults() -> dict[str, Any]:
    """The dataset keys whose sdprep default (TrainConfig's field default) differs from kohya's
    (KOHYA_DEFAULTS), with sdprep's value, in TrainConfig's order: derived, so the two tables cannot
    drift apart unnoticed."""
    from sdprep.train.config.schema import TrainConfig  # schema imports this module

    kohya_key = {cfg_name: key for key, cfg_name in CFG_NAMES.items()}
    out = {}
    for f in dataclasses.fields(TrainConfig):
        key = kohya_key.get(f.name, f.name)
        if key in KOHYA_DEFAULTS and f.default != KOHYA_DEFAULTS[key]:
            out[key] = f.default
    return out


def _lookup(key: str, layers: list[Layer], cfg: TrainConfig, findings: Findings | None = None) -> Any:
    for layer in layers:
        if layer.get(key) is not None:
            return layer[key]
    value = cfg_value(cfg, key, KOHYA_DEFAULTS.get(key))
    if (
        findings is not None
        and key in sdprep_defaults()
        and origin_of(cfg, key) is None
        and value != KOHYA_DEFAULTS[key]
    ):
        findings.kohya_defaults[key] = f"{key} = {_toml(value)} (kohya: {_toml(KOHYA_DEFAULTS[key])})"
    return value


def _toml(value: Any) -> str:
    return (
        str(value).lower()
        if isinstance(value, bool)
        else f'"{value}"'
        if isinstance(value, str)
        else str(value)
    )


def _run_setting(
    key: str, layers: list[Layer], cfg: TrainConfig, where: str, findings: Findings | None
) -> Any:
    """A run-level setting: the training config's when it set it, else the dataset TOML's (noted when
    the two differ: kohya would take the dataset TOML's)."""
    name = CFG_NAMES.get(key, key)
    source = origin_of(cfg, name)
    theirs = next((layer[key] for layer in layers if layer.get(key) is not None), None)
    if source is None or theirs is None:
        return _lookup(key, layers, cfg, findings)
    ours = cfg_value(cfg, key)
    if key == "resolution":
        ours, theirs = tuple(ours), _resolution(theirs, key)
    if ours != theirs and findings is not None:
        shown, their_shown = (
            ("{}x{}".format(*ours), "{}x{}".format(*(theirs or ())))
            if key == "resolution"
            else (ours, theirs)
        )
        findings.note(
            f"note: {name} = {shown} from {source} overrides {where}'s {key} = {their_shown} (command line > "
            "config > dataset TOML > defaults; kohya would use the dataset TOML's)"
        )
    return ours


def _resolution(value: Any, where: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, str) and "," not in value:
        value = [value, value]
    res: tuple[int, int] = coerce(value, tuple[int, int], where)
    return res


def _check_keys(table: Any, allowed: dict[str, Any], where: str, source: Path) -> Layer:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: {where} must be a table")
    out: Layer = {}
    for key, value in table.items():
        dotted = f"{where}.{key}"
        if key not in allowed:
            if key in SUBSET_DISTINCT:
                raise ConfigError(
                    f'{source}: "{key}" is only valid in [[datasets.subsets]], not in {where}',
                    "move it into the subset it belongs to",
                )
            hint = did_you_mean(key, allowed)
            raise ConfigError(
                f'{source}: unknown key "{dotted}"', hint or "valid keys here: " + ", ".join(sorted(allowed))
            )
        out[key] = _resolution(value, dotted) if key == "resolution" else coerce(value, allowed[key], dotted)
    return out


def _path(value: str | None, base: Path, where: str) -> Path | None:
    """A TOML path: absolute, else from the TOML's folder, else from the working directory (kohya)."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    beside = base / path
    return beside if beside.exists() or not path.exists() else path


def _caption_options(layers: list[Layer], cfg: TrainConfig) -> CaptionOptions:
    def get(k: str) -> Any:
        return _lookup(k, layers, cfg)

    return CaptionOptions(
        shuffle_caption=bool(get("shuffle_caption")),
        keep_tokens=int(get("keep_tokens")),
        keep_tokens_separator=get("keep_tokens_separator") or "",
        caption_separator=get("caption_separator") or ",",
        secondary_separator=get("secondary_separator") or None,
        enable_wildcard=bool(get("enable_wildcard")),
        caption_prefix=get("caption_prefix") or None,
        caption_suffix=get("caption_suffix") or None,
        caption_dropout_rate=float(get("caption_dropout_rate")),
        caption_dropout_every_n_epochs=int(get("caption_dropout_every_n_epochs")),
        caption_tag_dropout_rate=float(get("caption_tag_dropout_rate")),
    )


def _check_unsupported(layers: list[Layer], cfg: TrainConfig, where: str, findings: Findings) -> None:
    """kohya features sdprep does not implement: an error when set, never silently ignored."""
    checks: dict[str, Callable[[Any], bool]] = {
        "face_crop_aug_range": lambda v: v is not None,
        "token_warmup_step": lambda v: float(v) > 0,
    }
    for key, is_set in checks.items():
        if is_set(_lookup(key, layers, cfg)):
            raise ConfigError(
                f"{where}: {key} is not supported by sdprep", f"remove {key} (kohya's default is off)"
            )
    if _lookup("cache_info", layers, cfg):
        findings.note(
            "note: cache_info is not needed by sdprep (image sizes come from file headers): ignored"
        )


def make_subset(
    layers: list[Layer], cfg: TrainConfig, *, base: Path, where: str, findings: Findings, **fixed: Any
) -> SubsetSpec:
    """Resolve one subset from its lookup layers (subset, dataset, general) and the training config."""
    _check_unsupported(layers, cfg, where, findings)

    def get(k: str) -> Any:
        return fixed[k] if k in fixed else _lookup(k, layers, cfg, findings)

    ext = get("caption_extension") or ".caption"
    if not ext.startswith("."):
        ext = "." + ext
    interp = get("resize_interpolation")
    if interp is not None and interp not in INTERPOLATIONS:
        raise ConfigError(
            f"{where}: invalid resize_interpolation {interp!r}", "valid: " + ", ".join(INTERPOLATIONS)
        )
    repeats = int(get("num_repeats"))
    return SubsetSpec(
        image_dir=_path(get("image_dir"), base, where) if get("image_dir") else None,
        num_repeats=repeats,
        is_reg=bool(get("is_reg") or False),
        class_tokens=get("class_tokens"),
        caption_extension=ext,
        metadata_file=_path(get("metadata_file"), base, where),
        conditioning_data_dir=_path(get("conditioning_data_dir"), base, where),
        alpha_mask=bool(get("alpha_mask")),
        flip_aug=bool(get("flip_aug")),
        color_aug=bool(get("color_aug")),
        random_crop=bool(get("random_crop")),
        resize_interpolation=interp,
        captions=_caption_options(layers, cfg),
        origin=where,
    )


def make_dataset(
    subsets: list[SubsetSpec],
    layers: list[Layer],
    cfg: TrainConfig,
    where: str,
    findings: Findings | None = None,
) -> DatasetSpec:
    """Resolve one dataset's bucket settings and check them as kohya does (plus SDXL's multiple of 32)."""

    def get(k: str) -> Any:
        if k in RUN_KEYS:
            return _run_setting(k, layers, cfg, where, findings)
        return _lookup(k, layers, cfg, findings)

    res = _resolution(get("resolution"), f"{where}.resolution")
    if res is None:
        raise ConfigError(f"{where}: resolution is not set", 'set resolution = 1024 (or "1024,1024")')
    from sdprep.train.loop.validation import check_split

    split = float(get("validation_split") or 0)
    check_split(split, where)
    seed = get("validation_seed")
    if float(get("network_multiplier")) != 1.0:
        raise ConfigError(f"{where}: network_multiplier is not supported by sdprep", "remove it")
    spec = DatasetSpec(
        subsets=tuple(subsets),
        resolution=res,
        batch_size=int(get("batch_size")),
        enable_bucket=bool(get("enable_bucket")),
        min_bucket_reso=int(get("min_bucket_reso")),
        max_bucket_reso=int(get("max_bucket_reso")),
        bucket_reso_steps=int(get("bucket_reso_steps")),
        bucket_no_upscale=bool(get("bucket_no_upscale")),
        validation_split=split,
        validation_seed=None if seed is None else int(seed),
        origin=where,
    )
    _check_dataset(spec, where)
    return spec


def _check_dataset(spec: DatasetSpec, where: str) -> None:
    w, h = spec.resolution
    if spec.batch_size < 1:
        raise ConfigError(f"{where}: batch_size must be at least 1, got {spec.batch_size}")
    if w < 1 or h < 1:
        raise ConfigError(
            f"{where}: resolution must be positive, got {w}x{h}", 'e.g. resolution = "1024,1024"'
        )
    if spec.enable_bucket:
        if min(w, h) < spec.min_bucket_reso:
            raise ConfigError(
                f"{where}: min_bucket_reso {spec.min_bucket_reso} is larger than the resolution {w}x{h}",
                "lower min_bucket_reso or raise resolution",
            )
        if max(w, h) > spec.max_bucket_reso:
            raise ConfigError(
                f"{where}: max_bucket_reso {spec.max_bucket_reso} is smaller than the resolution {w}x{h}",
                "raise max_bucket_reso (2048 gives the usual SDXL buckets) or lower resolution",
            )
        if spec.bucket_reso_steps % 32:
            raise ConfigError(
                f"{where}: bucket_reso_steps = {spec.bucket_reso_steps} is not a multiple of 32 (SDXL needs it)",
                "use 32 or 64",
            )
    elif w % 32 or h % 32:
        raise ConfigError(
            f"{where}: resolution {w}x{h} is not a multiple of 32 (SDXL needs it)", "use e.g. 1024,1024"
        )


# -- the dataset TOML ----------------------------------------------------------------------------


def load_dataset_toml(path: Path, cfg: TrainConfig, findings: Findings) -> list[DatasetSpec]:
    """Read a kohya dataset TOML strictly into resolved datasets."""
    path = Path(path)
    doc = load_toml(path)
    for key in doc:
        if key not in ("general", "datasets"):
            hint = did_you_mean(key, ["general", "datasets"])
            raise ConfigError(
                f'{path}: unknown table "{key}"', hint or "a dataset TOML has [general] and [[datasets]]"
            )
    general = _check_keys(doc.get("general", {}), GENERAL_KEYS, "general", path)
    datasets_doc = doc.get("datasets", [])
    if not isinstance(datasets_doc, list) or not datasets_doc:
        raise ConfigError(
            f"{path}: no [[datasets]]", "add [[datasets]] with at least one [[datasets.subsets]]"
        )
    base = path.parent
    out = []
    for i, ds in enumerate(datasets_doc):
        where = f"datasets[{i}]"
        if not isinstance(ds, dict):
            raise ConfigError(f"{path}: {where} must be a table")
        subsets_doc = ds.get("subsets", [])
        dataset = _check_keys({k: v for k, v in ds.items() if k != "subsets"}, DATASET_KEYS, where, path)
        if not isinstance(subsets_doc, list) or not subsets_doc:
            raise ConfigError(f"{path}: {where} has no [[datasets.subsets]]", "add at least one subset")
        subsets_raw = [
            _check_keys(s, SUBSET_KEYS, f"{where}.subsets[{j}]", path) for j, s in enumerate(subsets_doc)
        ]
        finetune = [s.get("metadata_file") is not None for s in subsets_raw]
        if any(finetune) and not all(finetune):
            raise ConfigError(
                f"{path}: {where} mixes fine-tuning subsets (metadata_file) with DreamBooth subsets",
                "put them in separate [[datasets]] (kohya's rule)",
            )
        subsets = []
        for j, raw in enumerate(subsets_raw):
            sw = f"{path.name}: {where}.subsets[{j}]"
            if raw.get("metadata_file") is not None:
                bad = [k for k in FINETUNE_FORBIDDEN if k in raw]
                if bad:
                    raise ConfigError(
                        f"{sw}: {', '.join(bad)} cannot be used in a fine-tuning subset (metadata_file)",
                        "captions come from the metadata JSON; use a DreamBooth subset for the rest",
                    )
            elif raw.get("image_dir") is None:
                raise ConfigError(f"{sw}: image_dir is required", 'add image_dir = "path/to/images"')
            subsets.append(make_subset([raw, dataset, general], cfg, base=base, where=sw, findings=findings))
        out.append(make_dataset(subsets, [dataset, general], cfg, f"{path.name}: {where}", findings))
    return out


# -- DreamBooth folders ---------------------------------------------------------------------------


def parse_folder(name: str) -> RepeatFolder | None:
    """kohya's `<N>_<class tokens>` rule; a bare `<N>` is N repeats with no class tokens (kohya too)."""
    parsed = parse_repeat_folder(name)
    if parsed is None and name.isdigit() and int(name) >= 1:
        return RepeatFolder(int(name), "")
    return parsed


def _subdirs(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise ConfigError(f"{root}: cannot list folder ({exc.strerror})") from exc


def _stray_images(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_file() and is_image(p))


def folder_subsets(root: Path, cfg: TrainConfig, *, is_reg: bool, findings: Findings) -> list[SubsetSpec]:
    """Subsets for a kohya DreamBooth folder of `<N>_<class tokens>` subfolders."""
    key = "reg_data_dir" if is_reg else "train_data_dir"
    if not root.is_dir():
        raise ConfigError(f"{key} {root}: no such folder", "check the path")
    subsets = []
    for sub in _subdirs(root):
        parsed = parse_folder(sub.name)
        if parsed is None:
            if sub.name not in ("masks", "__pycache__"):
                findings.note(
                    f'warning: ignored folder {sub}: its name is not "<repeats>_<class tokens>" (e.g. 10_{sub.name})'
                )
            continue
        subsets.append(
            make_subset(
                [],
                cfg,
                base=root,
                where=f"{key}/{sub.name}",
                findings=findings,
                image_dir=str(sub),
                num_repeats=parsed.repeats,
                class_tokens=parsed.tokens or None,
                is_reg=is_reg,
            )
        )
    parsed = parse_folder(root.name)
    if not subsets and parsed and _stray_images(root):
        findings.note(
            f"note: {key} {root} is itself a repeat folder; using it as one subset "
            f"({parsed.repeats} repeats). kohya expects its parent folder here."
        )
        one = dict(image_dir=str(root), num_repeats=parsed.repeats, class_tokens=parsed.tokens or None)
        return [make_subset([], cfg, base=root, where=key, findings=findings, is_reg=is_reg, **one)]
    for stray in _stray_images(root):
        findings.drop(stray, f"directly in {key}: images must be inside a <repeats>_<tokens> folder")
    return subsets


def _is_bucket_output(root: Path) -> bool:
    return (root / "dataset.toml").is_file() and (root / "img").is_dir()


def load_sources(cfg: TrainConfig, findings: Findings) -> list[DatasetSpec]:
    """The datasets the training config describes (dataset_config, in_json or train_data_dir), with
    one note listing the sdprep defaults used where kohya's differ."""
    specs = _load_sources(cfg, findings)
    if findings.kohya_defaults:
        findings.note(
            "note: sdprep defaults where kohya's differ (set them to choose): "
            + "; ".join(findings.kohya_defaults[k] for k in sdprep_defaults() if k in findings.kohya_defaults)
        )
    return specs


def _load_sources(cfg: TrainConfig, findings: Findings) -> list[DatasetSpec]:
    dataset_config = cfg_value(cfg, "dataset_config")
    train_dir = cfg_value(cfg, "train_data_dir")
    reg_dir = cfg_value(cfg, "reg_data_dir")
    in_json = cfg_value(cfg, "in_json")
    if dataset_config:
        ignored = [
            k
            for k, v in (("train_data_dir", train_dir), ("reg_data_dir", reg_dir), ("in_json", in_json))
            if v
        ]
        if ignored:
            findings.note(f"note: {', '.join(ignored)} ignored because dataset_config is set (kohya's rule)")
        return load_dataset_toml(Path(dataset_config), cfg, findings)
    if not train_dir:
        raise ConfigError(
            "no training images: neither dataset_config nor train_data_dir is set",
            "set train_data_dir to a folder of <repeats>_<token> subfolders, or dataset_config to a dataset TOML",
        )
    train_dir = Path(train_dir).expanduser()
    if in_json:
        subset = make_subset(
            [],
            cfg,
            base=Path.cwd(),
            where="in_json",
            findings=findings,
            image_dir=str(train_dir),
            metadata_file=str(in_json),
        )
        return [make_dataset([subset], [], cfg, "training config", findings)]
    if _is_bucket_output(train_dir) and not any(parse_folder(p.name) for p in _subdirs(train_dir)):
        findings.note(f"note: {train_dir} is an `sdprep bucket` output: reading {train_dir / 'dataset.toml'}")
        if reg_dir:
            findings.note(
                "note: reg_data_dir ignored: the bucket output's dataset.toml lists its own reg folders"
            )
        return load_dataset_toml(train_dir / "dataset.toml", cfg, findings)
    subsets = folder_subsets(train_dir, cfg, is_reg=False, findings=findings)
    if reg_dir:
        subsets += folder_subsets(Path(reg_dir).expanduser(), cfg, is_reg=True, findings=findings)
    if not subsets:
        raise ConfigError(
            f"train_data_dir {train_dir}: no <repeats>_<class tokens> folders found",
            f"put the images in a subfolder such as {train_dir / '10_mytoken'} (10 = repeats per epoch)",
        )
    return [make_dataset(subsets, [], cfg, "training config", findings)]
