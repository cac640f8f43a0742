"""Monochrome detection: the reduced measurement gives the seed's full-resolution label on every image."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from seed_tagpy import seed_label

from sdprep.prep import monochrome as mono
from sdprep.prep.monochrome import MonochromeSettings

SAMPLES = Path(__file__).resolve().parent.parent / "sample_data" / "images"
DEFAULT = MonochromeSettings()


def label(path: Path, settings: MonochromeSettings = DEFAULT) -> str | None:
    stats = mono.measure(path, settings)
    return mono.classify(stats.saturation, stats.hue_std, settings)


SAMPLE_FILES = sorted(p for p in SAMPLES.iterdir() if p.suffix in (".png", ".jpg", ".webp"))


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: p.name)
def test_same_label_as_seed_on_sample_data(path: Path):
    assert label(path) == seed_label(path)


def test_sample_labels_are_the_seed_rule():
    labels = {p.name: label(p) for p in SAMPLE_FILES}
    assert labels["d_greyscale.png"] == "greyscale"
    assert labels["e_sepia.jpg"] == "monochrome"
    assert label(SAMPLES / "e_sepia.jpg", MonochromeSettings(hue_threshold=0.001)) is None
    assert {n for n, v in labels.items() if v is None} == {
        "a_landscape.jpg",
        "b_portrait.png",
        "c_square.webp",
        "f_transparent.png",
        "g_tiny.png",
        "h_wide.jpg",
    }


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> list[Path]:
    """Every synthetic kind at SDXL size as JPEG (q90) and PNG, plus BMP / GIF / WebP of some."""
    folder = tmp_path_factory.mktemp("mono")
    paths = []
    for i, kind in enumerate(mono.SYNTHETIC_KINDS):
        im = Image.fromarray(mono.synthetic_image(kind, seed=i))
        for ext, kwargs in ((".jpg", {"quality": 90}), (".png", {})):
            paths.append(folder / f"{kind}{ext}")
            im.save(paths[-1], **kwargs)
    grey = Image.fromarray(mono.synthetic_image("grey", seed=1, size=(640, 960)))
    for ext in (".bmp", ".gif", ".webp"):
        paths.append(folder / f"grey_small{ext}")
        grey.save(paths[-1])
    sepia = Image.fromarray(mono.synthetic_image("sepia", seed=2, size=(640, 960)))
    paths.append(folder / "sepia_small.webp")
    sepia.save(paths[-1], quality=90)
    return paths


def test_same_label_as_seed_on_generated_images(generated: list[Path]):
    mismatches = [(p.name, label(p), seed_label(p)) for p in generated if label(p) != seed_label(p)]
    assert mismatches == []


def test_generated_set_spans_every_label(generated: list[Path]):
    labels = {p.name: label(p) for p in generated}
    assert labels["grey.jpg"] == labels["grey.png"] == labels["grey_noise.jpg"] == "greyscale"
    assert labels["grey_small.gif"] == labels["grey_small.bmp"] == labels["grey_small.webp"] == "greyscale"
    assert labels["sepia.jpg"] == labels["blue.jpg"] == labels["sepia_small.webp"] == "monochrome"
    assert labels["colour.jpg"] is labels["pastel.jpg"] is labels["grey_accent.jpg"] is None
    # the seed's rule is not circular in hue: a red tint straddles 0/179 once JPEG noise is added
    assert labels["red_tint.png"] == "monochrome" and labels["red_tint.jpg"] is None


def test_reduced_measurement_is_small(generated: list[Path]):
    stats = mono.measure_reduced(generated[0])
    assert stats.measured == "reduced" and min(stats.size) == 256


def two_hue_image(path: Path, fraction: float) -> None:
    """Hue 0 (red) on `fraction` of the pixels and hue 20 elsewhere: hue std = 20/179*sqrt(p(1-p))."""
    arr = np.zeros((600, 400, 3), np.uint8)
    arr[...] = cv2.cvtColor(np.array([[[20, 200, 200]]], np.uint8), cv2.COLOR_HSV2RGB)[0, 0]
    rows = int(600 * fraction)
    arr[:rows] = cv2.cvtColor(np.array([[[0, 200, 200]]], np.uint8), cv2.COLOR_HSV2RGB)[0, 0]
    Image.fromarray(arr).save(path)


def test_near_threshold_is_measured_at_full_resolution(tmp_path: Path):
    near, far = tmp_path / "near.png", tmp_path / "far.png"
    two_hue_image(near, 0.08)  # hue std ~0.0305, within 25% of 0.03
    two_hue_image(far, 0.5)  # hue std ~0.056
    s_near, s_far = mono.measure(near, DEFAULT), mono.measure(far, DEFAULT)
    assert s_near.measured == "full" and s_near.size == (400, 600)
    assert s_far.measured == "reduced"
    assert abs(s_near.hue_std - 20 / 179 * (0.08 * 0.92) ** 0.5) < 1e-3
    assert label(near) == seed_label(near)


def test_needs_full_resolution_band():
    s = lambda sat, hue: mono.HsvStats(sat, hue, "reduced", (1, 1))  # noqa: E731
    assert mono.needs_full_resolution(s(0.0011, 0.5), DEFAULT)
    assert not mono.needs_full_resolution(s(0.0, 0.031), DEFAULT)  # greyscale: hue does not matter
    assert mono.needs_full_resolution(s(0.2, 0.035), DEFAULT)
    assert not mono.needs_full_resolution(s(0.2, 0.05), DEFAULT)
    assert not mono.needs_full_resolution(mono.HsvStats(0.2, 0.03, "full", (1, 1)), DEFAULT)


def test_detect_reuses_the_sidecar_record_until_the_file_changes(tmp_path: Path):
    path = tmp_path / "g.png"
    Image.fromarray(mono.synthetic_image("grey", seed=0, size=(300, 300))).save(path)
    label_, record, measured = mono.detect(path, None, DEFAULT)
    assert label_ == "greyscale" and record["label"] == "greyscale" and record["version"] == mono.VERSION
    assert measured and not mono.detect(path, record, DEFAULT)[2]
    assert set(record) >= {"label", "saturation", "hue_std", "version"}
    # a stored record is trusted (no decoding): prove it by storing different statistics
    forged = dict(record, saturation=0.5, hue_std=0.01)
    assert mono.detect(path, forged, DEFAULT)[0] == "monochrome"
    # new thresholds re-label from the stored statistics
    assert mono.detect(path, forged, MonochromeSettings(hue_threshold=0.001))[0] is None
    # a changed file is measured again
    Image.fromarray(mono.synthetic_image("colour", seed=0, size=(300, 300))).save(path)
    assert mono.detect(path, forged, DEFAULT)[0] is None
    # another algorithm version is measured again
    old = dict(record, version="hsv-0", saturation=0.5)
    Image.fromarray(mono.synthetic_image("grey", seed=0, size=(300, 300))).save(path)
    assert mono.detect(path, old, DEFAULT)[0] == "greyscale"


def test_transparent_pixels_count_as_white(tmp_path: Path):
    path = tmp_path / "t.png"
    arr = np.zeros((64, 64, 4), np.uint8)
    arr[:32, :, :3] = (200, 50, 50)  # a red half, opaque
    arr[:32, :, 3] = 255
    arr[32:, :, :3] = (0, 0, 255)  # blue under full transparency: invisible
    Image.fromarray(arr, "RGBA").save(path)
    stats = mono.measure(path, DEFAULT)
    assert stats.hue_std == 0.0  # red and white both have hue 0
    assert label(path) == "monochrome"


def test_unknown_synthetic_kind():
    with pytest.raises(ValueError, match="unknown synthetic image kind 'plaid'"):
        mono.synthetic_image("plaid", 0)
