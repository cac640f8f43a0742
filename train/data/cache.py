"""Latent and text-encoder output caches, keyed on everything that changes them.

Latents: `cache_latents(dataset, vae, device, dtype, report)` encodes each image once at its bucket
(centre crop; the flipped version too when `flip_aug`), with its processed mask. The entry is kept
in memory, or with `cache_latents_to_disk` written to one safetensors file per image:
`<image folder>/.sdprep/latents/<image name>.safetensors` (under `cache_dir/latents/<folder hash>/`
when `cache_dir` is set). Each entry records a key over the cache format, the VAE (hash of its
config and weights, and the encode dtype), the image file (path, size, mtime), its bucket, resize,
crop offset and interpolation, and the mask file; a file whose key differs is stale and is
re-encoded, never reused (a changed resolution or a retouched image is picked up).

Latents are RAW samples of the VAE's latent distribution (`mean + std * noise`, the noise seeded
from the entry's key, so a cache is reproducible); they are NOT multiplied by
`vae.config.scaling_factor`: the training loop does that, for cached and uncached latents alike
(`encode_latents` gives the same raw values for a batch of pixels).

Text-encoder outputs: `cache_text_encoder_outputs(dataset, encode_fn, report, encoder_id=...)`
encodes each distinct caption once (only when captions are fixed: no shuffle / dropout / wildcard)
and keeps `(prompt_embeds [L, 2048], pooled [1280])` per image, in memory or in
`.sdprep/te/<image name>.safetensors`, keyed on caption text, `encoder_id`, max_token_length and
clip_skip.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from sdprep import state
from sdprep.errors import ConfigError, DatasetError, SdprepError
from sdprep.fileops import atomic_write_bytes
from sdprep.progress import NullReporter, Reporter
from sdprep.train.data.pipeline import TrainDataset
from sdprep.train.data.scan import ImageRecord, LatentEntry
from sdprep.train.data.transforms import crop_offsets

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import (
        AutoencoderKL,
    )  # not diffusers.X (a placeholder to mypy)
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from transformers import PreTrainedTokenizerBase

CACHE_VERSION = 1
EncodeFn = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]
Loaded = tuple[np.ndarray, np.ndarray | None]  # an image (HxWx3 uint8) and its mask (HxW uint8)


@dataclass
class CacheStats:
    """What a cache pass did."""

    kind: str
    encoded: int = 0
    reused: int = 0
    stale: int = 0  # disk entries whose key no longer matched (re-encoded)
    skipped: int = 0  # left to other processes (num_shards > 1)
    bad: list[tuple[Path, str]] = field(default_factory=list)  # images that could not be loaded

    def summary(self) -> str:
        stale = f" ({self.stale} stale, rebuilt)" if self.stale else ""
        return f"{self.kind} cache: {self.encoded} encoded{stale}, {self.reused} reused"


# -- identities --------------------------------------------------------------------------------


def _digest(obj: object) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def module_fingerprint(*modules: torch.nn.Module) -> str:
    """A hash of modules' class, config and every weight (bytes, dtype, shape): their identity."""
    h = hashlib.blake2b(digest_size=16)
    for module in modules:
        h.update(type(module).__name__.encode())
        config = getattr(module, "config", None)
        if config is not None:
            as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            h.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def text_encoder_fingerprint(
    tokenizers: Sequence[PreTrainedTokenizerBase], text_encoders: Sequence[torch.nn.Module]
) -> str:
    """Identity of a pair of SDXL text encoders and their tokenizers (for `encoder_id`)."""
    vocab = [sorted(t.get_vocab().items()) for t in tokenizers]
    return _digest([module_fingerprint(*text_encoders), vocab])


def _cache_path(rec: ImageRecord, kind: str, cache_dir: Path | None) -> Path:
    if cache_dir is None:  # sdprep's own state beside the images: no symlink followed on the way
        return state.file(rec.path.parent, kind, rec.path.name + ".safetensors")
    folder = hashlib.blake2b(str(rec.path.parent.resolve()).encode(), digest_size=6).hexdigest()
    return Path(cache_dir) / kind / folder / (rec.path.name + ".safetensors")


def _file_id(path: Path) -> list[str | int]:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def latent_key(ds: TrainDataset, rec: ImageRecord, vae_id: str, with_flip: bool) -> str:
    """The cache key of one image's latent entry (see the module docstring)."""
    a = rec.assignment
    spec = ds.subsets[rec.subset]
    return _digest(
        {
            "v": CACHE_VERSION,
            "vae": vae_id,
            "image": _file_id(rec.path),
            "size": rec.size,
            "bucket": a.bucket,
            "resized": a.resized,
            "offset": crop_offsets(a),
            "interp": spec.resize_interpolation,
            "flip": with_flip,
            "mask": _file_id(rec.mask_path)
            if rec.mask_path
            else ("alpha-stored-rgb" if rec.alpha_mask else None),
        }
    )


# -- files -------------------------------------------------------------------------------------


def _read_key(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("sdprep_key")
    except Exception:  # noqa: BLE001 - a truncated or foreign file is simply stale
        return None


def _valid_file(
    rec: ImageRecord, kind: str, cache_dir: Path | None, key: str, stats: CacheStats
) -> Path | None:
    """The cache file of `rec` when its key matches (counted as reused); stale ones are counted."""
    path = _cache_path(rec, kind, cache_dir)
    found = _read_key(path) if path.exists() else None
    if found == key:
        stats.reused += 1
        return path
    stats.stale += found is not None
    return None


def _write(path: Path, tensors: dict[str, torch.Tensor | None], key: str) -> None:
    from safetensors.torch import save

    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items() if v is not None}
    atomic_write_bytes(
        path, save(data, metadata={"sdprep_key": key, "format": f"sdprep-cache-{CACHE_VERSION}"})
    )


def read_latent_file(path: Path) -> LatentEntry:
    """A latent cache entry: latents, latents_flipped (when flip_aug), mask (uint8 HxW, optional)."""
    from safetensors.torch import load_file

    entry = load_file(str(path))
    return {
        "latents": entry["latents"],
        "latents_flipped": entry.get("latents_flipped"),
        "mask": entry.get("mask"),
    }


def read_te_file(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    entry = load_file(str(path))
    return entry["prompt_embeds"], entry["pooled_prompt_embeds"]


# -- latents -----------------------------------------------------------------------------------


def encode_latents(
    vae: AutoencoderKL, pixels: torch.Tensor, generators: list[torch.Generator] | None = None
) -> torch.Tensor:
    """Raw (unscaled) latents of pixels in [-1, 1]: a sample of the VAE's latent distribution."""
    param = next(vae.parameters())
    with torch.no_grad():
        dist: DiagonalGaussianDistribution = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
        if generators is None:
            return dist.sample().float().cpu()
        noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in generators])
        return (dist.mean.float() + dist.std.float() * noise.to(dist.mean.device)).cpu()


def _generator(key: str, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(key[:15], 16) + salt) & 0x7FFFFFFFFFFFFFFF)


def _check_latent_cacheable(ds: TrainDataset) -> None:
    moving = sorted({n for s in ds.subsets for n in ("random_crop", "color_aug") if getattr(s, n)})
    if moving:
        raise ConfigError(
            f"latents cannot be cached with {', '.join(moving)} (the cache holds one version per image)",
            "turn off cache_latents, or the augmentation (flip_aug works with caching)",
        )


def _load_group(
    ds: TrainDataset, group: list[tuple[int, str]], bad: list[tuple[Path, str]]
) -> tuple[list[tuple[int, str]], list[Loaded]]:
    """Load the images of a group; one that cannot be loaded goes to `bad` (all are listed at the end)."""
    kept: list[tuple[int, str]] = []
    loaded: list[Loaded] = []
    for i, key in group:
        try:
            loaded.append(ds.load_sample(i, crop_offsets(ds.records[i].assignment)))
        except SdprepError as exc:
            bad.append((ds.records[i].path, getattr(exc, "reason", exc.message)))
            continue
        kept.append((i, key))
    return kept, loaded


def _unloadable(bad: list[tuple[Path, str]], to_disk: bool) -> DatasetError:
    listing = "\n".join(f"  {path}: {reason}" for path, reason in bad[:50])
    more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
    kept = "; the latents encoded so far are kept on disk" if to_disk else ""
    return DatasetError(
        f"{len(bad)} training image{'s' if len(bad) > 1 else ''} cannot be loaded:\n{listing}{more}",
        f"re-download, fix or delete them (`sdprep convert DIR` lists truncated files){kept}, then run again",
    )


def _encode_group(
    ds: TrainDataset, vae: AutoencoderKL, group: list[tuple[int, str]], loaded: list[Loaded]
) -> list[LatentEntry]:
    """Encode records of one bucket: latents, flipped latents when flip_aug, processed mask."""
    pixels = torch.stack([torch.from_numpy(np.ascontiguousarray(p)).permute(2, 0, 1) for p, _ in loaded])
    pixels = pixels.float() / 127.5 - 1.0
    latents = encode_latents(vae, pixels, [_generator(key, 0) for _, key in group])
    flips = [ds.subsets[ds.records[i].subset].flip_aug for i, _ in group]
    flipped = None
    if any(flips):
        flipped = encode_latents(vae, pixels.flip(-1), [_generator(key, 1) for _, key in group])
    out: list[LatentEntry] = []
    for j, (_, mask) in enumerate(loaded):
        out.append(
            {
                "latents": latents[j].clone(),
                "latents_flipped": flipped[j].clone() if flipped is not None and flips[j] else None,
                "mask": None if mask is None else torch.from_numpy(np.ascontiguousarray(mask)),
            }
        )
    return out


def cache_latents(
    dataset: TrainDataset,
    vae: AutoencoderKL,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    report: Reporter | None = None,
    *,
    to_disk: bool | None = None,
    vae_id: str | None = None,
    batch_size: int = 1,
    num_shards: int = 1,
    shard: int = 0,
    drop_bad: bool = False,
) -> CacheStats:
    """Encode every image's latents once (see the module docstring); returns what was done.

    The VAE is moved to `device` and `dtype` (float32 when `no_half_vae`). `vae_id` skips hashing
    the VAE's weights when the caller knows its identity. With `num_shards` > 1 and disk caching,
    this process encodes only its share: call again after a barrier to pick up the others' files.
    Images that cannot be loaded are all listed in one DatasetError, or with `drop_bad` returned in
    `stats.bad` for the caller to leave out (the rest is encoded either way).
    """
    report = report or NullReporter()
    cfg = dataset.cfg
    _check_latent_cacheable(dataset)
    to_disk = cfg.cache_latents_to_disk if to_disk is None else to_disk
    if cfg.no_half_vae:
        dtype = torch.float32
    param = next(vae.parameters())
    if param.dtype != dtype or param.device != torch.device(device):
        module: torch.nn.Module = vae  # ModelMixin.to is @wraps(Module.to), which mypy misreads
        module.to(device=device, dtype=dtype)
    vae_id = f"{vae_id or module_fingerprint(vae)}:{dtype}"
    cache_dir = cfg.cache_dir
    stats = CacheStats("latents")
    todo: list[tuple[int, str]] = []
    for i, rec in enumerate(dataset.records):
        key = latent_key(dataset, rec, vae_id, dataset.subsets[rec.subset].flip_aug)
        if to_disk:
            path = _valid_file(rec, "latents", cache_dir, key, stats)
            if path is not None:
                rec.latents, rec.latents_file = None, path
                continue
            if num_shards > 1 and i % num_shards != shard:
                stats.skipped += 1
                continue
        elif rec.latents is not None and rec.latents.get("key") == key:
            stats.reused += 1
            continue
        todo.append((i, key))
    todo.sort(key=lambda t: (dataset.records[t[0]].assignment.bucket, t[0]))
    report.start(len(todo), "caching latents")
    vae_was_training = vae.training
    vae.eval()
    bad: list[tuple[Path, str]] = []
    j = 0
    while j < len(todo):
        bucket = dataset.records[todo[j][0]].assignment.bucket
        group = [todo[j]]
        while len(group) < batch_size and j + len(group) < len(todo):
            nxt = todo[j + len(group)]
            if dataset.records[nxt[0]].assignment.bucket != bucket:
                break
            group.append(nxt)
        j += len(group)
        report.advance(len(group))
        group, loaded = _load_group(dataset, group, bad)
        if not group:
            continue
        for (i, key), entry in zip(group, _encode_group(dataset, vae, group, loaded)):
            rec = dataset.records[i]
            if to_disk:
                path = _cache_path(rec, "latents", cache_dir)
                flipped = entry["latents_flipped"]
                _write(
                    path,
                    {"latents": entry["latents"], "latents_flipped": flipped, "mask": entry["mask"]},
                    key,
                )
                rec.latents, rec.latents_file = None, path
            else:
                rec.latents = {**entry, "key": key}
            stats.encoded += 1
    report.finish()
    vae.train(vae_was_training)
    if bad and not drop_bad:
        raise _unloadable(bad, to_disk)
    stats.bad = bad
    return stats


# -- text-encoder outputs ----------------------------------------------------------------------


def cache_text_encoder_outputs(
    dataset: TrainDataset,
    encode_fn: EncodeFn,
    report: Reporter | None = None,
    *,
    encoder_id: str | None = None,
    to_disk: bool | None = None,
    batch_size: int = 8,
) -> CacheStats:
    """Encode each distinct fixed caption once with `encode_fn(captions) -> (embeds, pooled)`.

    `encoder_id` identifies the text encoders and tokenizers (e.g. `text_encoder_fingerprint`);
    it is required for the disk cache, whose entries are keyed on it.
    """
    report = report or NullReporter()
    cfg = dataset.cfg
    if not dataset.captions_fixed:
        moving = sorted({n for s in dataset.subsets for n in s.captions.randomness()})
        if dataset.caption_transform is not None:
            moving.append("a caption transform (textual inversion templates)")
        raise ConfigError(
            f"text-encoder outputs cannot be cached: {', '.join(moving)} changes captions between epochs",
            "turn off cache_text_encoder_outputs or the caption augmentation",
        )
    to_disk = cfg.cache_text_encoder_outputs_to_disk if to_disk is None else to_disk
    if to_disk and not encoder_id:
        raise ValueError(
            "cache_text_encoder_outputs(to_disk=True) needs encoder_id (see text_encoder_fingerprint)"
        )
    settings = [encoder_id or "in-memory", cfg.max_token_length, cfg.clip_skip]
    cache_dir = cfg.cache_dir
    stats = CacheStats("text-encoder")
    pending: dict[str, list[tuple[int, str]]] = {}  # caption -> [(record, key)]
    for i, rec in enumerate(dataset.records):
        caption = dataset.fixed_caption(i)
        key = _digest({"v": CACHE_VERSION, "te": settings, "caption": caption})
        if to_disk:
            path = _valid_file(rec, "te", cache_dir, key, stats)
            if path is not None:
                rec.te, rec.te_file = None, path
                continue
        elif rec.te is not None and rec.te_key == key:
            stats.reused += 1
            continue
        pending.setdefault(caption, []).append((i, key))
    captions = list(pending)
    report.start(len(captions), "caching text-encoder outputs")
    for j in range(0, len(captions), batch_size):
        chunk = captions[j : j + batch_size]
        with torch.no_grad():
            embeds, pooled = encode_fn(chunk)
        for c, caption in enumerate(chunk):
            e, p = embeds[c].detach().to("cpu").clone(), pooled[c].detach().to("cpu").clone()
            for i, key in pending[caption]:
                rec = dataset.records[i]
                if to_disk:
                    path = _cache_path(rec, "te", cache_dir)
                    _write(path, {"prompt_embeds": e, "pooled_prompt_embeds": p}, key)
                    rec.te, rec.te_file = None, path
                else:
                    rec.te = (e, p)
                    rec.te_key = key
                stats.encoded += 1
        report.advance(len(chunk))
    report.finish()
    return stats
