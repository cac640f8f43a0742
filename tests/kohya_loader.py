"""A test-side reader of dataset TOMLs that applies kohya sd-scripts' rules, written from
shared/reference/kohya-formats.md ("Dataset TOML schema, exactly") and checked against kohya's own
loader (tests/assets/kohya_bucket_facts.json), independent of sdprep's code.

`kohya_load(toml, masked_loss=..., cwd=...)` returns what kohya registers per dataset (kind, counts and
per image: path, repeats, reg flag, caption, stored size, alpha_mask, mask file), or raises
KohyaRefuses with kohya's message for a TOML its schema refuses.
"""

from __future__ import annotations

import os
from pathlib import Path

import tomllib
from PIL import Image

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".JPG", ".JPEG", ".WEBP", ".BMP")

COMMON = {
    "color_aug",
    "face_crop_aug_range",
    "flip_aug",
    "num_repeats",
    "random_crop",
    "shuffle_caption",
    "keep_tokens",
    "keep_tokens_separator",
    "secondary_separator",
    "caption_separator",
    "enable_wildcard",
    "token_warmup_min",
    "token_warmup_step",
    "caption_prefix",
    "caption_suffix",
    "custom_attributes",
    "resize_interpolation",
    "caption_dropout_every_n_epochs",
    "caption_dropout_rate",
    "caption_tag_dropout_rate",
}
DREAMBOOTH = COMMON | {"image_dir", "is_reg", "alpha_mask", "caption_extension", "class_tokens", "cache_info"}
FINETUNE = COMMON | {"metadata_file", "image_dir", "alpha_mask"}
MASK = COMMON | {"image_dir", "conditioning_data_dir", "caption_extension", "cache_info"}
DATASET = {
    "batch_size",
    "bucket_no_upscale",
    "bucket_reso_steps",
    "enable_bucket",
    "max_bucket_reso",
    "min_bucket_reso",
    "validation_seed",
    "validation_split",
    "resolution",
    "network_multiplier",
    "resize_interpolation",
}
DISTINCT = {"image_dir", "metadata_file", "conditioning_data_dir", "is_reg"}


class KohyaRefuses(Exception):
    """kohya's schema (voluptuous) or loader refuses the TOML."""


def _extra(where: str, key: str) -> KohyaRefuses:
    return KohyaRefuses(f"extra keys not allowed @ data{where}['{key}']")


def _schema(subsets: list[dict], masked_loss: bool, i: int) -> tuple[str, set[str]]:
    if masked_loss and all("conditioning_data_dir" in s for s in subsets):
        return "ControlNetDataset", MASK
    if all("metadata_file" in s for s in subsets):
        return "FineTuningDataset", FINETUNE
    if not any("metadata_file" in s for s in subsets):
        return "DreamBoothDataset", DREAMBOOTH
    raise KohyaRefuses(f"dataset {i} mixes fine-tuning and DreamBooth subsets")


def _images(folder: Path) -> list[Path]:
    return sorted({p for ext in IMAGE_EXTS for p in folder.glob("*" + ext)}, key=str)


def _first_line(path: Path) -> str:
    with open(path, encoding="utf-8") as f:
        return f.readline().strip()


def kohya_load(toml: Path, *, masked_loss: bool, cwd: Path) -> list[dict]:
    doc = tomllib.loads(Path(toml).read_text(encoding="utf-8"))
    general = doc.get("general", {})
    general_keys = DATASET | ((DREAMBOOTH | FINETUNE | (MASK if masked_loss else set())) - DISTINCT)
    for key in general:
        if key not in general_keys:
            raise _extra("['general']", key)
    out = []
    for i, ds in enumerate(doc["datasets"]):
        subsets = ds["subsets"]
        kind, allowed = _schema(subsets, masked_loss, i)
        for key in ds:
            if key != "subsets" and key not in DATASET | (allowed - DISTINCT):
                raise _extra(f"['datasets'][{i}]", key)
        for j, sub in enumerate(subsets):
            for key in sub:
                if key not in allowed:
                    raise _extra(f"['datasets'][{i}]['subsets'][{j}]", key)
        out.append(_load_dataset(kind, subsets, general, ds, cwd))
    return out


def _value(key: str, sub: dict, ds: dict, general: dict, default=None):
    for layer in (sub, ds, general):
        if key in layer:
            return layer[key]
    return default


def _load_dataset(kind: str, subsets: list[dict], general: dict, ds: dict, cwd: Path) -> dict:
    train, reg, n_train, n_reg = [], [], 0, 0
    for sub in subsets:
        folder = cwd / sub["image_dir"]  # relative paths: from the working folder
        repeats = _value("num_repeats", sub, ds, general, 1)
        ext = _value("caption_extension", sub, ds, general, ".caption")
        tokens = sub.get("class_tokens") if kind == "DreamBoothDataset" else None
        is_reg = bool(sub.get("is_reg", False))
        alpha = bool(_value("alpha_mask", sub, ds, general, False)) and kind != "ControlNetDataset"
        found = _images(folder)
        for path in found:
            cap = path.with_suffix(ext)
            row = {
                "path": path,
                "repeats": repeats,
                "is_reg": is_reg,
                "caption": _first_line(cap) if cap.is_file() else (tokens or ""),
                "size": list(Image.open(path).size),  # stored pixels: EXIF orientation is not applied
                "alpha_mask": alpha,
                "mask": _mask_for(path, cwd / sub["conditioning_data_dir"])
                if kind == "ControlNetDataset"
                else None,
            }
            (reg if is_reg else train).append(row)
        if is_reg:
            n_reg += repeats * len(found)
        else:
            n_train += repeats * len(found)
        if kind == "ControlNetDataset":
            stems = {p.stem for p in found}
            extra = [p for p in _images(cwd / sub["conditioning_data_dir"]) if p.stem not in stems]
            if extra:
                raise KohyaRefuses(f"extra conditioning data for {len(extra)} images")
    n, first, used = 0, True, []
    while reg and n < n_train:  # DreamBoothDataset's reg balancing, as its loop does it
        for row in reg:
            if first:
                used.append(row)
                n += row["repeats"]
            else:
                row["repeats"] += 1
                n += 1
            if n >= n_train:
                break
        first = False
    images = sorted(train + used, key=lambda r: str(r["path"]))
    return {"kind": kind, "num_train_images": n_train, "num_reg_images": n_reg, "images": images}


def _mask_for(image: Path, folder: Path) -> Path:
    hits = [p for p in _images(folder) if p.stem == image.stem]
    if not hits:
        raise KohyaRefuses(f"missing conditioning data for {image.stem}")
    return hits[0]


def relative(rows: list[dict], out: Path) -> list[dict]:
    """The rows with paths relative to OUT, as the facts file records them."""
    res = []
    for r in rows:
        r = dict(r)
        r["path"] = Path(os.path.abspath(r["path"])).relative_to(out).as_posix()
        if r["mask"] is not None:
            r["mask"] = Path(os.path.abspath(r["mask"])).relative_to(out).as_posix()
        res.append(r)
    return res
