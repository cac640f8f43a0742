"""Latent and text-encoder output caches: reuse, invalidation, equality with the uncached pipeline."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdprep.errors import ConfigError
from sdprep.train.config.schema import TrainConfig
from sdprep.train.data.cache import (
    _generator,
    cache_latents,
    cache_text_encoder_outputs,
    encode_latents,
    module_fingerprint,
)
from sdprep.train.data.pipeline import build_dataset

torch.set_num_threads(1)
BASE = dict(resolution=(256, 256), min_bucket_reso=128, max_bucket_reso=512, seed=3, train_batch_size=2)


@pytest.fixture(scope="module")
def vae(tiny_sdxl: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_sdxl / "vae").eval()


@pytest.fixture
def data(tmp_path: Path, sample_dataset: Path) -> Path:
    concept = tmp_path / "train" / "2_tok"
    concept.mkdir(parents=True)
    for name in ["a_landscape.jpg", "b_portrait.png", "c_square.webp", "h_wide.jpg"]:
        shutil.copy(sample_dataset / name, concept / name)
    (concept / "a_landscape.txt").write_text("tok, sky")
    (concept / "b_portrait.txt").write_text("tok, sky")
    return tmp_path / "train"


def _cfg(train: Path, **kw) -> TrainConfig:
    return TrainConfig(train_data_dir=train, **{**BASE, **kw})


def _files(train: Path, kind: str = "latents") -> list[Path]:
    return sorted(train.glob(f"*/.sdprep/{kind}/*.safetensors"))


def test_disk_cache_is_reused_and_rebuilt_when_resolution_or_image_changes(data: Path, vae):
    cfg = _cfg(data, cache_latents=True, cache_latents_to_disk=True, flip_aug=True)
    ds = build_dataset(cfg)
    first = cache_latents(ds, vae)
    assert (first.encoded, first.reused) == (4, 0) and len(_files(data)) == 4
    batch = next(ds.batches(0))
    assert batch["pixels"] is None and batch["latents"].shape[1] == 4
    bucket = ds.records[ds.plan(0)[0][0][0]].assignment.bucket
    assert batch["latents"].shape[2:] == (bucket[1] // 8, bucket[0] // 8)

    again = cache_latents(build_dataset(cfg), vae)
    assert (again.encoded, again.reused, again.stale) == (0, 4, 0)

    bigger = dataclasses.replace(cfg, resolution=(320, 320))
    rebuilt = cache_latents(build_dataset(bigger), vae)
    assert (rebuilt.encoded, rebuilt.stale, rebuilt.reused) == (4, 4, 0)  # same files, new buckets

    img = data / "2_tok" / "c_square.webp"
    Image.new("RGB", (640, 640), (10, 200, 30)).save(img)
    os.utime(img, ns=(1, 1))  # a different mtime even on coarse clocks
    changed = cache_latents(build_dataset(bigger), vae)
    assert (changed.encoded, changed.stale, changed.reused) == (1, 1, 3)


def test_a_different_vae_invalidates_the_cache(data: Path, vae):
    from sdprep.train.models.tiny import build_tiny_sdxl_components

    other = build_tiny_sdxl_components(seed=1)[1].eval()
    assert module_fingerprint(other) != module_fingerprint(vae)
    cfg = _cfg(data, cache_latents_to_disk=True)
    cache_latents(build_dataset(cfg), vae)
    stats = cache_latents(build_dataset(cfg), other)
    assert (stats.encoded, stats.stale) == (4, 4)


def test_cached_latents_equal_the_uncached_pipeline(data: Path, vae):
    cfg = _cfg(data, flip_aug=True)
    plain = build_dataset(cfg)
    cached = build_dataset(cfg)
    cache_latents(cached, vae)
    assert all(r.latents is not None and r.latents_file is None for r in cached.records)
    flips = set()
    for b_plain, b_cached in zip(plain.batches(0), cached.batches(0)):
        assert b_plain["slots"] == b_cached["slots"] and b_plain["flipped"] == b_cached["flipped"]
        for j, (i, _) in enumerate(b_plain["slots"]):
            rec = plain.records[i]
            entry_key = cached.records[i].latents["key"]
            salt = 1 if b_plain["flipped"][j] else 0
            expect = encode_latents(vae, b_plain["pixels"][j : j + 1], [_generator(entry_key, salt)])[0]
            torch.testing.assert_close(b_cached["latents"][j], expect, atol=1e-5, rtol=1e-5)
            assert rec.path == cached.records[i].path
            flips.add(b_plain["flipped"][j])
    assert flips == {True, False}


def test_cached_masks_equal_uncached_masks(tmp_path: Path, vae):
    concept = tmp_path / "t" / "3_tok"
    concept.mkdir(parents=True)
    (concept / "masks").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 420, 3), dtype=np.uint8)).save(concept / "a.png")
    mask = np.zeros((300, 420), np.uint8)
    mask[50:200, 30:150] = 255
    Image.fromarray(mask).save(concept / "masks" / "a.png")
    cfg = TrainConfig(train_data_dir=tmp_path / "t", masked_loss=True, flip_aug=True, **BASE)
    plain, cached = build_dataset(cfg), build_dataset(cfg)
    cache_latents(cached, vae, to_disk=True)
    for b_plain, b_cached in zip(plain.batches(0), cached.batches(0)):
        assert b_cached["mask"].shape == b_plain["mask"].shape
        assert torch.equal(b_cached["mask"], b_plain["mask"])


def test_latents_cannot_be_cached_with_random_crop(data: Path, vae):
    with pytest.raises(ConfigError, match="latents cannot be cached with random_crop"):
        cache_latents(build_dataset(_cfg(data, random_crop=True)), vae)


def test_cache_dir_holds_the_files(data: Path, tmp_path: Path, vae):
    ds = build_dataset(_cfg(data, cache_dir=tmp_path / "cache"))
    cache_latents(ds, vae, to_disk=True)
    assert not _files(data) and len(list((tmp_path / "cache" / "latents").rglob("*.safetensors"))) == 4


class FakeEncoder:
    """encode_fn stand-in: deterministic embeddings from the caption text; counts what it encodes."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen += captions
        gens = [torch.Generator().manual_seed(sum(map(ord, c))) for c in captions]
        embeds = torch.stack([torch.randn(77, 16, generator=g) for g in gens])
        return embeds, embeds[:, 0, :8]


def test_text_encoder_outputs_cached_once_per_caption_and_keyed(data: Path):
    cfg = _cfg(data, cache_text_encoder_outputs=True, caption_prefix="photo of")
    ds = build_dataset(cfg)
    enc = FakeEncoder()
    stats = cache_text_encoder_outputs(ds, enc)
    assert sorted(enc.seen) == ["photo of tok", "photo of tok, sky"] and stats.encoded == 4
    batch = next(ds.batches(0))
    expect, pooled = FakeEncoder()(batch["captions"])
    assert torch.equal(batch["prompt_embeds"], expect) and torch.equal(batch["pooled_prompt_embeds"], pooled)

    disk = FakeEncoder()
    assert cache_text_encoder_outputs(build_dataset(cfg), disk, encoder_id="te-A", to_disk=True).encoded == 4
    assert len(_files(data, "te")) == 4
    again = FakeEncoder()
    assert cache_text_encoder_outputs(build_dataset(cfg), again, encoder_id="te-A", to_disk=True).reused == 4
    assert again.seen == []
    longer = dataclasses.replace(cfg, max_token_length=225)
    assert (
        cache_text_encoder_outputs(build_dataset(longer), again, encoder_id="te-A", to_disk=True).stale == 4
    )
    other = cache_text_encoder_outputs(build_dataset(longer), again, encoder_id="te-B", to_disk=True)
    assert (other.encoded, other.stale) == (4, 4)


def test_text_encoder_outputs_need_fixed_captions(data: Path):
    ds = build_dataset(_cfg(data, shuffle_caption=True, caption_dropout_rate=0.1))
    with pytest.raises(ConfigError) as err:
        cache_text_encoder_outputs(ds, FakeEncoder())
    assert err.value.message == (
        "text-encoder outputs cannot be cached: caption_dropout_rate, shuffle_caption changes captions between epochs"
    )


def test_disk_cache_split_across_processes(data: Path, vae):
    cfg = _cfg(data, cache_latents_to_disk=True)
    a = cache_latents(build_dataset(cfg), vae, num_shards=2, shard=0)
    b = cache_latents(build_dataset(cfg), vae, num_shards=2, shard=1)
    assert (a.encoded, a.skipped) == (2, 2) and (b.encoded, b.reused) == (2, 2)
    after_barrier = cache_latents(build_dataset(cfg), vae, num_shards=2, shard=0)
    assert (after_barrier.encoded, after_barrier.reused) == (0, 4)


def test_every_image_that_cannot_be_loaded_is_listed_and_the_good_ones_stay_cached(data: Path, vae):
    from sdprep.errors import DatasetError

    concept = data / "2_tok"
    for name in ("a_landscape.jpg", "b_portrait.png"):  # headers intact: the scan keeps them
        raw = (concept / name).read_bytes()
        (concept / name).write_bytes(raw[: len(raw) * 2 // 3])
    cfg = _cfg(data, cache_latents=True, cache_latents_to_disk=True)
    with pytest.raises(DatasetError) as err:
        cache_latents(build_dataset(cfg), vae)
    assert str(err.value).startswith("2 training images cannot be loaded:\n")
    for name in ("a_landscape.jpg", "b_portrait.png"):
        assert f"  {concept / name}: truncated or corrupt image data" in err.value.message
    assert "latents encoded so far are kept on disk" in err.value.hint
    assert len(_files(data)) == 2  # the two good images were encoded anyway
