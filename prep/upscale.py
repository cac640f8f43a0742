"""Bring small images up to a training size (SDXL: 1024x1024 of area), never down.

Lanczos by default; `--model FILE` runs an AI upscaler from a local weights file (see
upscale_models: spandrel when it imports, else sdprep's ESRGAN / Real-ESRGAN loader), tiled, on the
GPU when there is one, then Lanczos to the exact target size. Masks are resized with the image
(nearest for hard masks, bilinear for soft ones) and the new size is recorded in the sidecar. Each
image is rewritten in its own format through the journal (`sdprep undo` restores the originals).
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from sdprep.config import bounded, check_bounds
from sdprep.dataset import (
    Item,
    dump_sidecar,
    read_sidecar,
    sdprep_meta,
    shares_stem,
)
from sdprep.errors import ConfigError, ImageError, ModelError
from sdprep.executors import Executor
from sdprep.fileops import Journal
from sdprep.images import image_size, load_image, open_image, unwritable_size
from sdprep.prep.convert import GREY_MODES, save_bytes
from sdprep.prep.rename import mask_dirs
from sdprep.progress import NullReporter, Reporter
from sdprep.stage import MAX_WORKERS, StageResult, dataset_items, each_item, worker_count

if TYPE_CHECKING:
    from sdprep.images import Mode
    from sdprep.prep.upscale_models import Upscaler

DEFAULT_MIN_AREA = 1024 * 1024
WRITABLE = {"PNG", "JPEG", "WEBP", "BMP", "TIFF"}
MODEL_PASS_MIN_FACTOR = 1.5  # below this remaining factor, finish with Lanczos instead of another pass


@dataclass(frozen=True)
class UpscaleOptions:
    """min_area: pixels an image must have (default 1024x1024); min_side, when given, replaces it
    with a shortest-side rule. model: a local upscaler weights file (None = Lanczos)."""

    min_area: int = bounded(DEFAULT_MIN_AREA, 1)
    min_side: int | None = bounded(None, 1)
    model: Path | None = None
    tile: int = bounded(256, 0)
    overlap: int = bounded(16, 0, option="--tile-overlap")
    device: str = "auto"
    quality: int = bounded(95, 1, 100)
    recursive: bool = False
    workers: int = bounded(1, 0, MAX_WORKERS)  # Lanczos only: a model runs on one thread
    trust_pickle: bool = False  # unpickle a .pth that holds more than tensors (can run code)

    def __post_init__(self) -> None:
        check_bounds(self)


def parse_pixels(text: str) -> int:
    """`1048576` or `1024x1024` as a pixel count."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[x*]\s*(\d+))?\s*", str(text))
    if not m:
        raise ConfigError(f"invalid pixel count {text!r}", "use a number (1048576) or WxH (1024x1024)")
    return int(m[1]) * int(m[2] or 1)


def target_size(width: int, height: int, opts: UpscaleOptions) -> tuple[int, int] | None:
    """The size to upscale to (aspect ratio kept), or None when the image is already large enough."""
    if opts.min_side is not None:
        if min(width, height) >= opts.min_side:
            return None
        factor = opts.min_side / min(width, height)
    else:
        if width * height >= opts.min_area:
            return None
        factor = math.sqrt(opts.min_area / (width * height))
    return math.ceil(width * factor - 1e-9), math.ceil(height * factor - 1e-9)


def resize_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Hard (0/255) masks stay hard (nearest); soft masks are resized smoothly (bilinear)."""
    colours = mask.getcolors(256) or []
    hard = all(value in (0, 255) for _, value in colours)
    return mask.resize(size, Image.Resampling.NEAREST if hard else Image.Resampling.BILINEAR)


def upscale_image(im: Image.Image, size: tuple[int, int], upscaler: Upscaler | None = None) -> Image.Image:
    """Resize `im` to `size`: Lanczos, or model passes then Lanczos to the exact size."""
    if upscaler is None:
        return im.resize(size, Image.Resampling.LANCZOS)
    alpha = im.getchannel("A") if im.mode == "RGBA" else None
    rgb = np.asarray(im.convert("RGB"))
    while True:
        rgb = upscaler.upscale(rgb)
        factor = min(size[0] / rgb.shape[1], size[1] / rgb.shape[0])
        if upscaler.scale <= 1 or factor < MODEL_PASS_MIN_FACTOR:
            break
    out = Image.fromarray(rgb)
    if out.size != size:
        out = out.resize(size, Image.Resampling.LANCZOS)
    if im.mode == "L":
        out = out.convert("L")
    if alpha is not None:
        out.putalpha(alpha.resize(size, Image.Resampling.LANCZOS))
    return out


@dataclass
class Prepared:
    """Everything to write for one image, computed before anything is written."""

    item: Item
    image: bytes
    masks: list[tuple[Path, bytes]]
    sidecar: str
    notes: list[str]


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def prepare(
    item: Item, opts: UpscaleOptions, upscaler: Callable[[], Upscaler | None], method: str
) -> Prepared | None:
    """Upscale one image (and its mask) in memory; None when it is already large enough."""
    w, h = image_size(item.path, root=item.root)
    size = target_size(w, h, opts)
    if size is None:
        return None
    sidecar = read_sidecar(item)  # a broken sidecar fails this file before anything is written
    with open_image(item.path, root=item.root) as probe:
        fmt, mode, icc = probe.format, probe.mode, probe.info.get("icc_profile")
        transparent = mode in ("RGBA", "LA", "PA") or "transparency" in probe.info
    if fmt not in WRITABLE:
        raise ImageError(item.path, f"sdprep does not write {fmt} files", "run `sdprep convert` first")
    too_large = unwritable_size(size, fmt)  # a 1x20000 strip to --min-side 128: 128x2,560,000
    if too_large:
        raise ImageError(
            item.path,
            f"upscaled, {w}x{h} would become {size[0]:,}x{size[1]:,}: that {too_large}",
            "crop the image (so thin a strip is rarely useful), or lower --min-side / --min-area",
        )
    load_mode: Mode = "RGBA" if transparent and fmt != "JPEG" else ("L" if mode in GREY_MODES else "RGB")
    out = upscale_image(load_image(item.path, load_mode, root=item.root), size, upscaler())
    data = save_bytes(out, fmt, opts.quality, icc)
    masks: list[tuple[Path, bytes]] = []
    notes: list[str] = []
    for folder in mask_dirs(item.path.parent):  # masks/ and any masks_<name>/ keep the image's size
        path = item.mask_path(folder)
        if path.exists():
            if shares_stem(item.path):  # a.png and a.jpg: whose size would the one mask take?
                raise ImageError(
                    item.path,
                    f"{folder}/{path.name} is the mask of another image with this stem too",
                    "rename one of them (sdprep rename), then upscale again",
                )
            mask = load_image(path, "L", root=item.root)
            if mask.size != (w, h):
                notes.append(f"  note: {folder}/{path.name} was {mask.width}x{mask.height}, not {w}x{h}")
            masks.append((path, _png(resize_mask(mask, size))))
    meta = sdprep_meta(sidecar)
    meta["upscale"] = {"from": [w, h], "to": list(size), "method": method}
    meta["size"] = list(size)
    return Prepared(item, data, masks, dump_sidecar(sidecar), notes)


class _LazyUpscaler:
    """Loads the model on the first image that needs it, so a run with nothing to do stays fast."""

    def __init__(self, opts: UpscaleOptions) -> None:
        self.opts = opts
        self.loaded: Upscaler | None = None
        self.method = "lanczos"
        if opts.model is not None:
            path = Path(opts.model)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "missing"
            self.method = f"model {path.name} sha256:{digest}"

    def __getstate__(self) -> dict[str, Any]:
        """Sent to a Ray worker without the loaded model: each worker loads its own, once."""
        return {**self.__dict__, "loaded": None}

    def __call__(self) -> Upscaler | None:
        o = self.opts
        if o.model is None:
            return None
        if self.loaded is None:
            from sdprep.prep.upscale_models import load_upscaler

            self.loaded = load_upscaler(
                o.model, device=o.device, tile=o.tile, overlap=o.overlap, trust_pickle=o.trust_pickle
            )
        return self.loaded


def run_upscale(
    root: Path | str,
    opts: UpscaleOptions,
    *,
    report: Reporter = NullReporter(),
    executor: Executor | None = None,
) -> StageResult:
    """Upscale every image of `root` below the target size; masks and sidecars follow.

    Images are upscaled through `executor` (threads, or a Ray cluster where each worker loads the
    model once); files are written here.
    """
    root, items = dataset_items(root, opts.recursive)
    lazy = _LazyUpscaler(opts)
    result = StageResult("upscale")
    workers = 1 if opts.model is not None else worker_count(opts.workers)  # one model, one stream of tiles
    with Journal(root).begin("upscale") as op:
        prepared = each_item(
            lambda i: prepare(i, opts, lazy, lazy.method),
            items,
            result,
            report,
            "upscale",
            workers=workers,
            stop=(ModelError,),  # the model, not this file, is the problem: stop
            executor=executor,
            gpu=opts.model is not None,
        )
        for item, out in prepared:
            if out is None:
                result.skipped += 1
            else:
                # the image last: a run killed before it finds the image still small and redoes all
                # three (the masks it resized already come out the same); after it, nothing is left
                for path, mask in out.masks:
                    op.write_bytes(path, mask)
                op.write_text(item.sidecar_path, out.sidecar)
                op.write_bytes(item.path, out.image)
                result.notes += out.notes
                result.changed += 1
    if lazy.loaded is not None:
        result.notes.append(f"  model: {lazy.loaded.name} on {lazy.loaded.device}")
    return result
