"""Mask post-processing maths on small hand-checked arrays."""

import numpy as np
import pytest

from sdprep.prep.masks.postprocess import (
    PostOptions,
    as_mask,
    combine,
    coverage,
    feather,
    floor,
    grow,
    invert,
    postprocess,
    shrink,
    threshold,
    to_uint8,
)


def dot(n=7, at=(3, 3)):
    m = np.zeros((n, n), dtype=np.float32)
    m[at] = 1.0
    return m


def test_threshold_and_invert():
    m = np.array([[0.2, 0.5, 0.8]], dtype=np.float32)
    assert threshold(m, 0.5).tolist() == [[0.0, 1.0, 1.0]]
    np.testing.assert_allclose(invert(m), [[0.8, 0.5, 0.2]], atol=1e-6)


def test_grow_one_pixel_is_a_disk_of_radius_one():
    expected = np.zeros((7, 7), dtype=np.float32)
    expected[3, 2:5] = 1
    expected[2:5, 3] = 1
    assert np.array_equal(grow(dot(), 1), expected)


def test_grow_keeps_grey_levels_as_local_max():
    m = np.zeros((1, 5), dtype=np.float32)
    m[0, 2] = 0.5
    assert grow(m, 1).tolist() == [[0.0, 0.5, 0.5, 0.5, 0.0]]


def test_shrink_square_and_border():
    m = np.zeros((9, 9), dtype=np.float32)
    m[2:7, 2:7] = 1
    expected = np.zeros((9, 9), dtype=np.float32)
    expected[3:6, 3:6] = 1
    assert np.array_equal(shrink(m, 1), expected)
    # the image border is not a black frame: an all-white mask stays all white
    assert shrink(np.ones((5, 5), np.float32), 2).min() == 1.0
    assert shrink(dot(), 0) is not None and np.array_equal(shrink(dot(), 0), dot())


def test_grow_then_shrink_closes_a_gap():
    m = np.ones((5, 9), dtype=np.float32)
    m[:, 4] = 0  # a one-pixel black gap
    closed = shrink(grow(m, 1), 1)
    assert closed.min() == 1.0


def test_feather_step_edge():
    m = np.zeros((3, 20), dtype=np.float32)
    m[:, 10:] = 1
    f = feather(m, 4)
    row = f[1]
    assert row[0] == pytest.approx(0.0, abs=1e-6) and row[19] == pytest.approx(1.0, abs=1e-6)
    assert np.all(np.diff(row) >= -1e-7)  # monotone
    assert row[9] + row[10] == pytest.approx(1.0, abs=1e-5)  # symmetric about the edge
    assert 0.1 < row[9] < 0.5 < row[10] < 0.9
    assert np.array_equal(feather(np.ones((4, 4), np.float32), 3), np.ones((4, 4), np.float32))
    assert np.array_equal(feather(m, 0), m)


def test_floor_raises_low_values_only():
    m = np.array([[0.0, 0.1, 0.5, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(floor(m, 0.2), [[0.2, 0.2, 0.5, 1.0]], atol=1e-6)


def test_combine():
    a = np.array([[0.0, 1.0, 0.4]], dtype=np.float32)
    b = np.array([[1.0, 0.0, 0.6]], dtype=np.float32)
    np.testing.assert_allclose(combine(a, b, "union"), [[1.0, 1.0, 0.6]], atol=1e-6)
    np.testing.assert_allclose(combine(a, b, "intersection"), [[0.0, 0.0, 0.4]], atol=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        combine(a, np.zeros((2, 3), np.float32), "union")
    with pytest.raises(ValueError, match="valid: union, intersection"):
        combine(a, b, "xor")


def test_conversions_and_coverage():
    u8 = np.array([[0, 128, 255]], dtype=np.uint8)
    np.testing.assert_allclose(as_mask(u8), [[0.0, 128 / 255, 1.0]], atol=1e-6)
    assert np.array_equal(to_uint8(as_mask(u8)), u8)
    assert as_mask(np.array([[-1.0, 2.0]])).tolist() == [[0.0, 1.0]]
    assert coverage(np.array([[0.0, 1.0], [0.5, 0.5]], np.float32)) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        as_mask(np.zeros((2, 2, 3)))


def test_postprocess_order_threshold_invert_then_floor():
    raw = np.array([[0.3, 0.7]], dtype=np.float32)
    out = postprocess(raw, PostOptions(threshold=0.5, invert=True, floor=0.25))
    np.testing.assert_allclose(out, [[1.0, 0.25]], atol=1e-6)


def test_postprocess_grow_acts_on_the_inverted_mask():
    raw = np.ones((7, 7), dtype=np.float32) - dot()  # black dot on white
    out = postprocess(raw, PostOptions(invert=True, grow=1))  # -> white dot, grown
    assert out.sum() == 5


def test_postprocess_combine_with_existing():
    raw = np.array([[0.0, 1.0]], dtype=np.float32)
    existing = np.array([[255, 0]], dtype=np.uint8)
    assert postprocess(raw, PostOptions(combine="union"), existing).tolist() == [[1.0, 1.0]]
    assert postprocess(raw, PostOptions(combine="intersection"), existing).tolist() == [[0.0, 0.0]]
    # without an existing mask, combine is a no-op
    assert postprocess(raw, PostOptions(combine="union")).tolist() == [[0.0, 1.0]]


def test_post_options_record_only_what_differs():
    assert PostOptions().record() == {}
    assert PostOptions(grow=3, invert=True).record() == {"grow": 3, "invert": True}
