"""The trainer's data pipeline: images, captions, masks, aspect-ratio buckets and batches.

Public API (everything else is internal):

    dataset = build_dataset(cfg, report=reporter)   # TrainConfig (kohya names) -> TrainDataset
    print(dataset.summary())                         # bucket table, dropped/upscaled, masks, steps
    for batch in dataset.batches(epoch, skip=k):     # epoch counts from 0; skip = batches done
        ...
    cache_latents(dataset, vae, device, dtype, report)          # sdprep.train.data.cache
    cache_text_encoder_outputs(dataset, encode_fn, report, encoder_id=...)

Sources (sdprep.train.config.datasets): a kohya dataset TOML (`dataset_config`), `in_json` with
`train_data_dir`, or DreamBooth folders `<N>_<class tokens>` in `train_data_dir` / `reg_data_dir`
(an `sdprep bucket` output folder works as either). Nothing is dropped silently: every image left
out is in `summary().dropped` with its reason, and notes say what was ignored or assumed.

A batch is a dict:
- `pixels` [B,3,H,W] float in [-1, 1], or None when latents are cached;
- `latents` [B,4,H/8,W/8]: RAW VAE samples (not multiplied by `vae.config.scaling_factor`;
  the training loop scales them, as kohya does), or None;
- `mask` [B,1,H,W] in [0, 1] (white = full loss), or None when no sample of the batch has one
  (samples without a mask in a batch that has some get all ones);
- `captions` (list of str, after shuffle/dropout for this epoch), `prompt_embeds` [B,L,2048] and
  `pooled_prompt_embeds` [B,1280] when text-encoder outputs are cached (else None);
- `original_size`, `crop_top_left`, `target_size` as LongTensors [B,2] in (h, w) / (top, left)
  order, and `time_ids` [B,6] (their concatenation, SDXL's add_time_ids);
- `loss_weight` [B] (prior_loss_weight for regularisation images, else 1), `is_reg` [B] bool,
  `flipped`, `paths`, `slots` ((image index, repeat) per sample).

Determinism: every random choice (batch order, bucket shuffles, flips, random crops, captions) is
drawn from numpy generators seeded by (seed, epoch, image, repeat), so `batches(e, skip=s)` yields
exactly the batches an uninterrupted run sees after its first s batches of epoch e, and
`batches(e, num_shards=n, shard=i)` gives process i its part of the same global batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import numpy as np
import torch

from sdprep.errors import DatasetError
from sdprep.progress import NullReporter, Reporter
from sdprep.train.config.datasets import DatasetSpec, Findings, SubsetSpec, load_sources
from sdprep.train.data.captions import process_caption, tag_frequency
from sdprep.train.data.scan import ImageRecord, scan_sources
from sdprep.train.data.summary import DataSummary, summarize
from sdprep.train.data.transforms import (
    color_aug,
    crop_offsets,
    fit_to_bucket,
    load_mask,
    load_rgb,
    size_conditioning,
)

if TYPE_CHECKING:
    from sdprep.train.config.schema import TrainConfig

CaptionTransform = Callable[[str, np.random.Generator], str]
Slot = tuple[int, int]  # (image index, repeat)
__all__ = ["Batch", "ImageRecord", "TrainDataset", "build_dataset", "sample_rng"]


class Batch(TypedDict):
    """One batch (see the module docstring for shapes and meaning)."""

    pixels: torch.Tensor | None
    latents: torch.Tensor | None
    mask: torch.Tensor | None
    captions: list[str]
    prompt_embeds: torch.Tensor | None
    pooled_prompt_embeds: torch.Tensor | None
    original_size: torch.Tensor
    crop_top_left: torch.Tensor
    target_size: torch.Tensor
    time_ids: torch.Tensor
    loss_weight: torch.Tensor
    is_reg: torch.Tensor
    flipped: list[bool]
    paths: list[Path]
    slots: list[Slot]


class _Sample(TypedDict):
    """One sample of a batch, before stacking."""

    pixels: torch.Tensor | None
    latents: torch.Tensor | None
    mask: torch.Tensor | None
    te: tuple[torch.Tensor, torch.Tensor] | None  # cached text-encoder outputs
    caption: str
    cond: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # SDXL size conditioning
    flipped: bool


def sample_rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator that depends only on (seed, keys): the root of all data-pipeline randomness."""
    return np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, *keys])


_RNG_PLAN, _RNG_BUCKET, _RNG_AUG, _RNG_CAPTION, _RNG_COLOR = 1, 2, 3, 4, 5


class TrainDataset:
    """The resolved dataset: records, summary, deterministic batches. Built by `build_dataset`."""

    def __init__(
        self,
        cfg: TrainConfig,
        datasets: list[DatasetSpec],
        subsets: list[SubsetSpec],
        records: list[ImageRecord],
        findings: Findings,
        seed: int,
        caption_transform: CaptionTransform | None = None,
    ) -> None:
        self.cfg = cfg
        self.datasets = datasets
        self.subsets = subsets
        self.records = records
        self.findings = findings
        self.seed = seed
        self.caption_transform = caption_transform
        self.prior_loss_weight = float(cfg.prior_loss_weight)
        self._summary: DataSummary | None = None
        self.validation: TrainDataset | None = None  # the held-out images (validation_split)

    # -- facts -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.records)

    @property
    def has_masks(self) -> bool:
        return any(r.has_mask for r in self.records)

    @property
    def captions_fixed(self) -> bool:
        """True when no subset changes captions between epochs (text-encoder outputs are cacheable)."""
        return self.caption_transform is None and all(s.captions.is_fixed for s in self.subsets)

    def summary(self) -> DataSummary:
        """What the CLI prints at start (see sdprep.train.data.summary.DataSummary)."""
        if self._summary is None:
            self._summary = summarize(self)
        return self._summary

    def leave_out(self, dropped: list[tuple[Path, str]]) -> None:
        """Remove these images (path, reason) from training; the summary lists them as dropped."""
        gone = {path for path, _ in dropped}
        self.records = [r for r in self.records if r.path not in gone]
        self.findings.dropped += dropped
        if self._summary is not None:  # already printed-to-be (e.g. before a preflight filter)
            self._summary.dropped += dropped

    def steps_per_epoch(self, num_shards: int = 1) -> int:
        """Batches per epoch for each process (optimizer steps before gradient accumulation)."""
        return len(self.plan(0, num_shards=num_shards))

    def by_subset(self) -> list[list[ImageRecord]]:
        """The records of each subset (index-aligned with `subsets`)."""
        out: list[list[ImageRecord]] = [[] for _ in self.subsets]
        for r in self.records:
            out[r.subset].append(r)
        return out

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's `ss_tag_frequency`: per subset folder name, tag -> count (raw captions, no repeats)."""
        out: dict[str, dict[str, int]] = {}
        for spec, recs in zip(self.subsets, self.by_subset()):
            merged = out.setdefault(spec.name, {})
            for tag, n in tag_frequency([r.caption for r in recs]).items():
                merged[tag] = merged.get(tag, 0) + n
        return out

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """kohya's `ss_dataset_dirs`: per subset folder name, repeats and image count."""
        return {
            spec.name: {"n_repeats": spec.num_repeats, "img_count": len(recs)}
            for spec, recs in zip(self.subsets, self.by_subset())
        }

    # -- captions and samples ------------------------------------------------------------------------

    def caption(self, index: int, repeat: int, epoch: int) -> str:
        """The caption image `index` trains with in its `repeat`-th occurrence of `epoch` (0-based)."""
        rec = self.records[index]
        rng = sample_rng(self.seed, _RNG_CAPTION, epoch, index, repeat)
        text = process_caption(rec.caption, self.subsets[rec.subset].captions, rng, epoch + 1)
        if self.caption_transform is not None:
            text = self.caption_transform(text, rng)
        return text

    def fixed_caption(self, index: int) -> str:
        """The caption when captions are fixed (what text-encoder caching encodes)."""
        return self.caption(index, 0, 0)

    def _augment(self, index: int, repeat: int, epoch: int) -> tuple[bool, tuple[int, int]]:
        rec = self.records[index]
        spec = self.subsets[rec.subset]
        rng = sample_rng(self.seed, _RNG_AUG, epoch, index, repeat)
        flipped = bool(spec.flip_aug and rng.random() < 0.5)
        offset = crop_offsets(rec.assignment, rng if spec.random_crop else None)
        return flipped, offset

    def load_sample(self, index: int, offset: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
        """Image (HxWx3 uint8) and mask (HxW uint8 or None) cut to the bucket at `offset`, unflipped."""
        rec = self.records[index]
        spec = self.subsets[rec.subset]
        rgb, alpha = load_rgb(rec.path, rec.alpha_mask and rec.mask_path is None)
        if (rgb.shape[1], rgb.shape[0]) != rec.size:
            raise DatasetError(
                f"{rec.path}: image is {rgb.shape[1]}x{rgb.shape[0]} now, was {rec.size[0]}x{rec.size[1]}",
                "the file changed during training; restart the run",
            )
        interp = spec.resize_interpolation
        pixels = fit_to_bucket(rgb, rec.assignment, offset, interp)
        mask = load_mask(rec.mask_path, rec.size) if rec.mask_path is not None else alpha
        if mask is not None:
            mask = fit_to_bucket(mask, rec.assignment, offset, interp)
        return pixels, mask

    def _sample(self, slot: Slot, epoch: int) -> _Sample:
        index, repeat = slot
        rec = self.records[index]
        flipped, offset = self._augment(index, repeat, epoch)
        pixels_t: torch.Tensor | None = None
        latents: torch.Tensor | None = None
        mask_t: torch.Tensor | None = None
        cached = _cached_latents(rec, flipped)
        if cached is not None:
            latents, mask_t = cached
        else:
            pixels, mask = self.load_sample(index, offset)
            if self.subsets[rec.subset].color_aug:
                pixels = color_aug(pixels, sample_rng(self.seed, _RNG_COLOR, epoch, index, repeat))
            if flipped:
                pixels, mask = pixels[:, ::-1], None if mask is None else mask[:, ::-1]
            pixels_t = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 127.5 - 1.0
            if mask is not None:
                mask_t = torch.from_numpy(np.ascontiguousarray(mask)).float().div_(255.0)
        te = _cached_te(rec)
        return {
            "pixels": pixels_t,
            "latents": latents,
            "mask": mask_t,
            "te": te,
            "caption": self.fixed_caption(index) if te is not None else self.caption(index, repeat, epoch),
            "cond": size_conditioning(rec.size, rec.assignment.bucket, flipped),
            "flipped": flipped,
        }

    def collate(self, slots: list[Slot], epoch: int) -> Batch:
        """Build the batch dict for these (image index, repeat) slots."""
        samples = [self._sample(s, epoch) for s in slots]
        return _stack(samples, slots, self)

    # -- planning ----------------------------------------------------------------------------------

    def plan(self, epoch: int, *, num_shards: int = 1, shard: int = 0) -> list[list[Slot]]:
        """This process's batches of `epoch` as lists of (image index, repeat) slots, in order.

        Samples are grouped by dataset and bucket into global batches of `batch_size * num_shards`
        (bucket contents shuffled), the global batches are shuffled, and each is split into
        `num_shards` contiguous parts of `batch_size` (a short last part is padded by repeating
        its last sample, so every process runs the same number of steps).
        """
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} is not in 0..{num_shards - 1}")
        batches: list[list[Slot]] = []
        for d, spec in enumerate(self.datasets):
            by_bucket: dict[tuple[int, int], list[Slot]] = {}
            for i, rec in enumerate(self.records):
                if rec.dataset == d:
                    slots = by_bucket.setdefault(rec.assignment.bucket, [])
                    slots.extend((i, k) for k in range(rec.num_repeats))
            size = spec.batch_size * num_shards
            for b, bucket in enumerate(sorted(by_bucket)):
                slots = by_bucket[bucket]
                order = sample_rng(self.seed, _RNG_BUCKET, epoch, d, b).permutation(len(slots))
                shuffled = [slots[j] for j in order]
                batches += [shuffled[j : j + size] for j in range(0, len(shuffled), size)]
        order = sample_rng(self.seed, _RNG_PLAN, epoch).permutation(len(batches))
        return [_shard_part(batches[j], num_shards, shard) for j in order]

    def batches(
        self, epoch: int, skip: int = 0, *, num_shards: int = 1, shard: int = 0, prefetch: int = 0
    ) -> Iterator[Batch]:
        """Yield the batch dicts of `epoch` (0-based) after skipping the first `skip` batches.

        `prefetch` > 0 loads that many batches ahead in background threads (decode and resize
        release the GIL); the order and content are the same either way.
        """
        plan = self.plan(epoch, num_shards=num_shards, shard=shard)[skip:]
        if prefetch <= 0:
            for slots in plan:
                yield self.collate(slots, epoch)
            return
        with ThreadPoolExecutor(max_workers=prefetch) as pool:
            window: list[Future[Batch]] = []
            for slots in plan:
                window.append(pool.submit(self.collate, slots, epoch))
                if len(window) > prefetch:
                    yield window.pop(0).result()
            for fut in window:
                yield fut.result()


def _shard_part(batch: list[Slot], num_shards: int, shard: int) -> list[Slot]:
    if num_shards == 1:
        return batch
    parts = [list(p) for p in np.array_split(np.arange(len(batch)), num_shards)]
    idx = parts[shard] or [len(batch) - 1]
    return [batch[i] for i in idx]


def _cached_latents(rec: ImageRecord, flipped: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(latents, mask) from the latent cache, or None when this image is not cached."""
    entry = rec.latents
    if entry is None and rec.latents_file is not None:
        from sdprep.train.data.cache import read_latent_file

        entry = read_latent_file(rec.latents_file)
    if entry is None:
        return None
    latents = entry["latents_flipped"] if flipped else entry["latents"]
    if latents is None:  # pragma: no cover - a flip_aug entry is encoded flipped too (its key says so)
        raise DatasetError(f"{rec.path}: its latent cache entry has no flipped latents", "delete the cache")
    mask = entry.get("mask")
    if mask is not None:
        mask = mask.flip(-1) if flipped else mask
        mask = mask.float() / 255.0
    return latents, mask


def _cached_te(rec: ImageRecord) -> tuple[torch.Tensor, torch.Tensor] | None:
    if rec.te is not None:
        return rec.te
    if rec.te_file is not None:
        from sdprep.train.data.cache import read_te_file

        return read_te_file(rec.te_file)
    return None


def _stack(samples: list[_Sample], slots: list[Slot], ds: TrainDataset) -> Batch:
    recs = [ds.records[i] for i, _ in slots]
    cached = [s["latents"] for s in samples]
    images = [s["pixels"] for s in samples]
    latents: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    if all(t is not None for t in cached):
        latents = torch.stack([t for t in cached if t is not None])
    elif all(t is not None for t in images):
        pixels = torch.stack([t for t in images if t is not None])
    else:  # pragma: no cover - defensive
        raise DatasetError("internal error: a batch mixes cached latents and images")
    if any(s["mask"] is not None for s in samples):
        h, w = recs[0].assignment.bucket[1], recs[0].assignment.bucket[0]
        masks = [m if (m := s["mask"]) is not None else torch.ones(h, w) for s in samples]
        mask = torch.stack(masks).unsqueeze(1)
    te = [s["te"] for s in samples]
    embeds: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    if all(t is not None for t in te):
        embeds = torch.stack([t[0] for t in te if t is not None])
        pooled = torch.stack([t[1] for t in te if t is not None])
    conds = [s["cond"] for s in samples]
    original_size = torch.tensor([c[0] for c in conds], dtype=torch.long)
    crop_top_left = torch.tensor([c[1] for c in conds], dtype=torch.long)
    target_size = torch.tensor([c[2] for c in conds], dtype=torch.long)
    return {
        "pixels": pixels,
        "latents": latents,
        "mask": mask,
        "captions": [s["caption"] for s in samples],
        "prompt_embeds": embeds,
        "pooled_prompt_embeds": pooled,
        "original_size": original_size,
        "crop_top_left": crop_top_left,
        "target_size": target_size,
        "time_ids": torch.cat([original_size, crop_top_left, target_size], 1),
        "loss_weight": torch.tensor([ds.prior_loss_weight if r.is_reg else 1.0 for r in recs]),
        "is_reg": torch.tensor([r.is_reg for r in recs], dtype=torch.bool),
        "flipped": [s["flipped"] for s in samples],
        "paths": [r.path for r in recs],
        "slots": list(slots),
    }


def build_dataset(
    cfg: TrainConfig,
    *,
    report: Reporter | None = None,
    seed: int | None = None,
    caption_transform: CaptionTransform | None = None,
    datasets_transform: Callable[[list[DatasetSpec]], list[DatasetSpec]] | None = None,
) -> TrainDataset:
    """Resolve the config's sources into a TrainDataset; nothing left out without a listed reason.

    `seed` overrides `cfg.seed`; with neither, 0 is used (and noted). `caption_transform(caption,
    rng)` runs after kohya's caption processing (textual inversion uses it for its token/templates).
    `datasets_transform` changes the resolved datasets before images are scanned (preflight scales
    every resolution down with it).
    Raises ConfigError / DatasetError for a bad config, missing folders, wrong-size masks or when
    no image is usable.
    """
    report = report or NullReporter()
    findings = Findings()
    specs = load_sources(cfg, findings)
    if datasets_transform is not None:
        specs = datasets_transform(specs)
    scan = scan_sources(specs, cfg, findings, report)
    if seed is None:
        seed = cfg.seed
    if seed is None:
        seed = 0
        findings.note("note: seed is not set: the data order uses seed 0")
    records = scan.records
    held: list[ImageRecord] = []
    if any(d.validation_split > 0 for d in scan.datasets):
        from sdprep.train.loop.validation import split_records

        records, held = split_records(scan.records, scan.datasets, int(seed))
        findings.note(f"validation: {len(held)} images held out of training (validation_split)")
        if not records:
            raise DatasetError("validation_split leaves no training image", "lower validation_split")
    dataset = TrainDataset(cfg, scan.datasets, scan.subsets, records, findings, int(seed), caption_transform)
    if held:
        dataset.validation = TrainDataset(
            cfg, scan.datasets, scan.subsets, held, Findings(), int(seed), caption_transform
        )
    return dataset
