"""`--executor ray` on a real Ray cluster on the loopback address (the session's `ray_cluster`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sdprep.errors import ImageError
from sdprep.stage import map_items


@pytest.fixture(autouse=True)
def _by_value():
    """The workers cannot import this test module: its functions travel by value."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _double_or_fail(n: int) -> int:
    if n % 7 == 3:
        raise ImageError(Path(f"/data/{n}.png"), f"bad {n}", "fix it")
    return n * 2


def test_ray_map_gives_map_items_results_in_order(ray_cluster):
    from sdprep.ray_executor import RayExecutor

    ex = RayExecutor(ray_cluster)
    got = list(ex.map(_double_or_fail, range(50), batch_size=4))
    want = list(map_items(_double_or_fail, range(50)))
    assert [i for i, _ in got] == list(range(50))
    assert [(i, str(o)) for i, o in got] == [(i, str(o)) for i, o in want]
    failed = [o for _, o in got if isinstance(o, ImageError)]
    assert [(f.path, f.reason, f.hint) for f in failed][:1] == [(Path("/data/3.png"), "bad 3", "fix it")]
    assert ex.summary().startswith("  ray: 50 items in ")
    assert ex.summary().endswith(" on 2 workers")
