"""`--executor ray` on a real Ray cluster on the loopback address (the session's `ray_cluster`):
every stage through Ray writes the same bytes as a local run, is undone the same way, survives a
killed worker and a killed driver."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_mask_clipseg import tiny_clipseg  # noqa: F401 - a fixture
from test_upscale import rrdb_state_dict

from sdprep.errors import ImageError
from sdprep.fileops import Journal, undo
from sdprep.prep.clean import CleanOptions, run_clean
from sdprep.prep.convert import ConvertOptions, run_convert
from sdprep.prep.dedup import DedupOptions, run_dedup
from sdprep.prep.mask import MaskOptions, run_mask
from sdprep.prep.masks.base import MethodSettings
from sdprep.prep.rules import CleanRules
from sdprep.prep.tag import TagOptions, run_tag
from sdprep.prep.upscale import UpscaleOptions, run_upscale
from sdprep.progress import RecordingReporter
from sdprep.stage import StageResult, map_items

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _by_value():
    """The workers cannot import this test module: its functions travel by value."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def ray_executor(ray_cluster):
    from sdprep.ray_executor import RayExecutor

    return RayExecutor(ray_cluster)


# -- a generated set ----------------------------------------------------------------------------


def _picture(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """Blocks of colour with noise: different images hash apart, as photos do."""
    blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    big = np.kron(blocks, np.ones((size[1] // 4 + 1, size[0] // 4 + 1, 1), dtype=np.uint8))
    noise = rng.integers(-12, 13, big.shape)
    return np.clip(big.astype(int) + noise, 0, 255).astype(np.uint8)[: size[1], : size[0]]


def make_set(root: Path, n: int) -> Path:
    """`n` small images: PNG, JPEG, BMP (convert makes them PNG), transparent PNGs (mask alpha),
    a near-copy every 25th (dedup), captions on most (clean), and truncated files (failures)."""
    rng = np.random.default_rng(22)
    root.mkdir(parents=True)
    previous = None
    for i in range(n):
        size = (40 + 8 * (i % 3), 32 + 8 * (i % 4))
        pixels = _picture(rng, size)
        if i % 25 == 7 and previous is not None:
            pixels = np.clip(previous.astype(int) + 3, 0, 255).astype(np.uint8)  # a near-copy
        previous = pixels
        kind = i % 6
        name = f"img{i:04d}"
        if kind == 4:
            rgba = np.dstack([pixels, np.full(pixels.shape[:2], 255, np.uint8)])
            rgba[:4] = 0  # a transparent band: alpha masks find something
            Image.fromarray(rgba, "RGBA").save(root / f"{name}.png")
        elif kind == 5:
            Image.fromarray(pixels).save(root / f"{name}.bmp")
        elif kind in (1, 3):
            Image.fromarray(pixels).save(root / f"{name}.jpg", quality=90)
        else:
            Image.fromarray(pixels).save(root / f"{name}.png")
        if i % 5:
            tags = ["1girl", "solo", "smile", "long_hair", "outdoors"][: 2 + i % 4]
            (root / f"{name}.txt").write_text(", ".join(tags) + "\n")
        if i % 97 == 13:  # cut short: every stage lists it as failed and goes on
            path = next(root.glob(f"{name}.*[!t]"))
            path.write_bytes(path.read_bytes()[:60])
    return root


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    return make_set(tmp_path_factory.mktemp("generated") / "set", 500)


@pytest.fixture(scope="module")
def tiny_esrgan(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("esrgan") / "tiny_x4.safetensors"
    save_file(rrdb_state_dict(nb=1, n_up=2), path)
    return path


# -- comparing runs -----------------------------------------------------------------------------


def tree(root: Path) -> dict[str, bytes]:
    """Every file of a dataset (its own .sdprep/ state aside), by relative path.

    The caches of dedup and clean's colour check record the image's modification time, which
    differs between two copies whose images were written at different times (by convert or
    upscale) however they ran: it reads as 0.
    """
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and rel.parts[0] != ".sdprep":
            data = path.read_bytes()
            if path.suffix == ".json" and b"sdprep" in data:
                doc = json.loads(data)
                meta = doc.get("sdprep", {})
                if "dedup" in meta:
                    meta["dedup"]["file"][1] = 0
                if "monochrome" in meta:
                    meta["monochrome"]["image"]["mtime_ns"] = 0
                data = json.dumps(doc).encode()
            out[rel.as_posix()] = data
    return out


def outcome(result: StageResult, root: Path) -> tuple:
    """What a summary reports, with paths relative to the dataset (the two runs are in two folders)."""
    failed = sorted((Path(f.path).relative_to(root).as_posix(), f.reason) for f in result.failed)
    return result.changed, result.skipped, failed


def differences(a: dict[str, bytes], b: dict[str, bytes]) -> list[str]:
    names = sorted(set(a) | set(b))
    return [n for n in names if a.get(n) != b.get(n)]


Stage = tuple[str, Callable]


def chain(
    tiny_wd14: Path, *, min_side: int = 48, esrgan: Path | None = None, clipseg: Path | None = None
) -> list[Stage]:
    """The six stages with an executor, in a prep order (model-based upscale and mask when given)."""
    mask = MaskOptions(method="alpha")
    if clipseg is not None:
        mask = MaskOptions(method="clipseg", settings=MethodSettings(prompts=("head",), model=str(clipseg)))
    rules = CleanRules(trigger=("mytoken",), remove=("solo",))
    return [
        ("convert", lambda root, ex: run_convert(root, ConvertOptions(), executor=ex)),
        ("dedup", lambda root, ex: run_dedup(root, DedupOptions(), executor=ex)),
        (
            "upscale",
            lambda root, ex: run_upscale(root, UpscaleOptions(min_side=min_side, model=esrgan), executor=ex),
        ),
        ("mask", lambda root, ex: run_mask(root, mask, executor=ex)),
        ("tag", lambda root, ex: run_tag(root, TagOptions(model=str(tiny_wd14)), executor=ex)),
        ("clean", lambda root, ex: run_clean(root, CleanOptions(rules=rules), executor=ex)),
    ]


def compare_chain(source: Path, tmp_path: Path, stages: list[Stage], executor) -> dict[str, StageResult]:
    """Run `stages` on two copies of `source`, locally and through `executor`; after each stage the
    two trees hold the same bytes and the summaries report the same. Then the Ray copy is undone
    stage by stage back to the source, byte for byte."""
    here, there = tmp_path / "local", tmp_path / "ray"
    shutil.copytree(source, here)
    shutil.copytree(source, there)
    results = {}
    for name, run in stages:
        want = run(here, None)
        got = run(there, executor)
        assert differences(tree(here), tree(there)) == [], name
        assert outcome(got, there) == outcome(want, here), name
        assert got.notes[-1].startswith("  ray: ") or any(n.startswith("  ray: ") for n in got.notes), name
        results[name] = got
    operations = len(Journal(there).operations())
    for _ in range(operations):
        undo(there)
    assert differences(tree(source), tree(there)) == []
    return results


# -- every stage, byte for byte -----------------------------------------------------------------


def test_every_stage_through_ray_matches_a_local_run_on_500_images(
    generated, tmp_path, tiny_wd14, ray_executor
):
    results = compare_chain(generated, tmp_path, chain(tiny_wd14), ray_executor)
    assert results["convert"].changed > 50  # the BMPs became PNGs
    assert results["dedup"].changed >= 15  # the near-copies moved aside
    assert results["upscale"].changed > 100 and results["mask"].changed > 50
    assert results["tag"].changed > 400 and results["clean"].changed > 400
    assert len(results["convert"].failed) == 6  # the truncated files, listed like a local run's


def test_model_stages_through_ray_on_the_sample_data(
    tmp_path,
    tiny_wd14,
    tiny_esrgan,
    tiny_clipseg,  # noqa: F811 - the fixture imported above
    ray_executor,
):
    """The upscaler and CLIPSeg load in each Ray worker (sent as their recipe), WD14 too."""
    source = tmp_path / "sample"
    shutil.copytree(REPO / "sample_data" / "images", source)
    stages = chain(tiny_wd14, min_side=160, esrgan=tiny_esrgan, clipseg=tiny_clipseg)
    results = compare_chain(source, tmp_path, stages, ray_executor)
    assert results["upscale"].changed >= 1 and results["mask"].changed == 8 and results["tag"].changed == 8


# -- the executor -------------------------------------------------------------------------------


def _double_or_fail(n: int) -> int:
    if n % 7 == 3:
        raise ImageError(Path(f"/data/{n}.png"), f"bad {n}", "fix it")
    return n * 2


def test_ray_map_gives_map_items_results_in_order(ray_executor):
    got = list(ray_executor.map(_double_or_fail, range(50), batch_size=4))
    want = list(map_items(_double_or_fail, range(50)))
    assert [i for i, _ in got] == list(range(50))
    assert [(i, str(o)) for i, o in got] == [(i, str(o)) for i, o in want]
    failed = [o for _, o in got if isinstance(o, ImageError)]
    assert [(f.path, f.reason, f.hint) for f in failed][:1] == [(Path("/data/3.png"), "bad 3", "fix it")]
    assert ray_executor.summary().startswith("  ray: 50 items in ")
    assert ray_executor.summary().endswith(" on 2 workers")


def _disk_full(n: int) -> int:
    if n == 5:
        raise OSError(28, "No space left on device", f"/data/{n}.png")
    return n


def test_a_whole_run_error_in_a_worker_stops_the_run_as_locally(ray_executor):
    with pytest.raises(OSError) as got:
        list(ray_executor.map(_disk_full, range(20), batch_size=2))
    assert got.value.errno == 28


def test_one_progress_bar_on_the_driver_counts_every_image(sample_dataset, tiny_wd14, ray_executor):
    report = RecordingReporter()
    result = run_tag(sample_dataset, TagOptions(model=str(tiny_wd14)), report=report, executor=ray_executor)
    assert report.total == report.done == result.changed == 8


@pytest.fixture(scope="module")
def tagged_here(generated, tiny_wd14, tmp_path_factory) -> tuple[Path, StageResult]:
    """The generated set tagged by a local run: what the Ray runs below must give."""
    here = tmp_path_factory.mktemp("tagged") / "local"
    shutil.copytree(generated, here)
    return here, run_tag(here, TagOptions(model=str(tiny_wd14)))


class _KillOneWorker(RecordingReporter):
    """Kills a worker process of the running pool once `at` images are done (here, on the driver),
    and looks at the pool's processes again 100 images later."""

    def __init__(self, executor, at: int):
        super().__init__()
        self.executor, self.at, self.killed, self.later = executor, at, [], []

    def advance(self, n: int = 1) -> None:
        super().advance(n)
        if self.done == self.at:
            pid = self.executor.worker_pids()[0]
            os.kill(pid, signal.SIGKILL)
            self.killed.append(pid)
        if self.done == self.at + 100:
            self.later = self.executor.worker_pids()


def test_a_worker_killed_mid_run_is_restarted_and_its_images_redone(
    generated, tagged_here, tmp_path, tiny_wd14, ray_executor
):
    here, want = tagged_here
    there = tmp_path / "ray"
    shutil.copytree(generated, there)
    report = _KillOneWorker(ray_executor, at=60)
    got = run_tag(there, TagOptions(model=str(tiny_wd14)), report=report, executor=ray_executor)
    assert len(report.killed) == 1
    assert len(report.later) == 2 and report.killed[0] not in report.later  # Ray started another
    assert differences(tree(here), tree(there)) == []
    assert outcome(got, there) == outcome(want, here)


# -- the command line ---------------------------------------------------------------------------


def test_cli_tag_through_ray_prints_the_throughput(sample_dataset, tiny_wd14, ray_cluster, cli_runner):
    from sdprep.cli import cli

    args = ["tag", str(sample_dataset), "--model", str(tiny_wd14)]
    res = cli_runner.invoke(
        cli, [*args, "--executor", "ray", "--ray-address", ray_cluster, "--ray-workers", "1"]
    )
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == "tag: 8 changed, 0 skipped, 0 failed"
    assert any(line.startswith("  ray: 8 items in ") and line.endswith(" on 1 workers") for line in lines)


def _sdprep(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "sdprep"), *args]


def test_a_rerun_after_the_driver_is_killed_resumes(generated, tagged_here, tmp_path, tiny_wd14, ray_cluster):
    here = tagged_here[0]
    there = tmp_path / "ray"
    shutil.copytree(generated, there)
    args = ["tag", str(there), "--model", str(tiny_wd14), "--batch-size", "1"]
    args += ["--executor", "ray", "--ray-address", ray_cluster, "--ray-workers", "1"]
    first = subprocess.Popen(_sdprep(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(there.glob("*.json"))) < 20 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    done = len(list(there.glob("*.json")))
    assert 20 <= done < 494
    rerun = subprocess.run(_sdprep(*args), capture_output=True, text=True, timeout=300)
    summary = next(line for line in rerun.stdout.splitlines() if line.startswith("tag: "))
    changed, skipped = (int(summary.split()[k]) for k in (1, 3))
    assert skipped >= done - 1 and changed + skipped == 494, rerun.stdout
    assert differences(tree(here), tree(there)) == []


def test_without_ray_the_executor_is_one_error_line(sample_dataset, cli_runner, monkeypatch):
    from sdprep.cli import cli

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as when not installed
    res = cli_runner.invoke(cli, ["dedup", str(sample_dataset), "--executor", "ray"])
    assert res.exit_code == 1
    assert (
        res.output == "Error: --executor ray needs Ray, which is not installed: pip install 'sdprep[ray]'\n"
    )


def test_no_cluster_at_the_address_is_a_clear_error(sample_dataset, cli_runner, monkeypatch):
    """What Ray raises when `auto` finds no cluster (no RAY_ADDRESS, no Ray process on this machine;
    here the session's cluster runs, so Ray's answer is played back)."""
    import ray

    from sdprep.cli import cli

    def no_cluster(**kwargs):
        raise ConnectionError(
            "Could not find any running Ray instance. Please specify the one to connect to."
        )

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    res = cli_runner.invoke(cli, ["convert", str(sample_dataset), "--executor", "ray"])
    assert res.exit_code == 1
    assert res.output.splitlines() == [
        "Error: no Ray cluster at auto (RAY_ADDRESS is not set and none was started on this machine)",
        "Hint: start one with `ray start --head` (docs/ray.md), pass --ray-address HOST:PORT, "
        "or --ray-address local to start one on this machine for this run",
    ]


def test_an_address_with_nothing_listening_fails_at_once(sample_dataset, cli_runner, monkeypatch):
    """HOST:PORT with no cluster: Ray would retry for minutes; sdprep checks the port first and
    never calls ray.init. The same through RAY_ADDRESS when the address is `auto`."""
    import socket

    import ray

    from sdprep.cli import cli

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def must_not_run(**kwargs):
        raise AssertionError("ray.init was called for an address with nothing listening")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", must_not_run)
    before = sorted(p.name for p in sample_dataset.iterdir())
    res = cli_runner.invoke(
        cli, ["convert", str(sample_dataset), "--executor", "ray", "--ray-address", f"127.0.0.1:{port}"]
    )
    assert res.exit_code == 1, res.output
    assert res.output.startswith(f"Error: no Ray cluster at 127.0.0.1:{port} (nothing answers there: ")
    assert "Hint: start one with `ray start --head` on that machine" in res.output
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    res = cli_runner.invoke(cli, ["convert", str(sample_dataset), "--executor", "ray"])
    assert res.exit_code == 1 and f"no Ray cluster at 127.0.0.1:{port}" in res.output, res.output
    assert sorted(p.name for p in sample_dataset.iterdir()) == before


# -- project files ------------------------------------------------------------------------------

PROJECT = """[project]
dataset = "data"
{executor}
[stages.convert]
[stages.tag]
model = "{model}"
[stages.clean.rules]
trigger = ["mytoken"]
"""


def test_a_project_with_executor_ray_runs_its_stages_on_the_cluster(tmp_path, tiny_wd14, ray_cluster):
    from sdprep.project import load_project, run_project

    outputs = {}
    for name, line in [("local", ""), ("ray", f'executor = "ray"\nray_address = "{ray_cluster}"')]:
        folder = tmp_path / name
        shutil.copytree(REPO / "sample_data" / "images", folder / "data")
        (folder / "project.toml").write_text(PROJECT.format(executor=line, model=tiny_wd14.as_posix()))
        printed: list[str] = []
        results = run_project(load_project(folder / "project.toml"), echo=printed.append)
        assert [r.ok for r in results] == [True, True, True]
        outputs[name] = tree(folder / "data"), printed
    assert differences(outputs["local"][0], outputs["ray"][0]) == []
    assert not any("  ray: " in p for p in outputs["local"][1])
    assert sum("  ray: 8 items in " in p for p in outputs["ray"][1]) == 3  # convert, tag, clean


def test_project_executor_settings_are_read(tmp_path):
    from sdprep.executors import ExecutorSettings
    from sdprep.project import load_project

    p = tmp_path / "p.toml"
    p.write_text('[project]\ndataset = "d"\nexecutor = "ray"\nray_workers = 3\n')
    assert load_project(p).executor == ExecutorSettings("ray", "auto", 3)


@pytest.mark.parametrize(
    "lines, message",
    [
        ('executor = "spark"', 'unknown executor "spark"'),
        ('ray_address = "10.0.0.1:6379"', "a Ray address or worker count is set, but the executor is local"),
        ('executor = "ray"\nray_workers = 0', "ray workers must be at least 1, got 0"),
    ],
)
def test_project_executor_settings_are_checked(tmp_path, lines, message):
    from sdprep.errors import ConfigError
    from sdprep.project import load_project

    p = tmp_path / "p.toml"
    p.write_text(f'[project]\ndataset = "d"\n{lines}\n')
    with pytest.raises(ConfigError, match=message):
        load_project(p)


ONE_NODE = [{"CPU": 16.0, "GPU": 2.0}]  # a 16-CPU, 2-GPU machine
MIXED = [{"CPU": 16.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]  # CPU-only head, 2 GPU nodes


def _fake_cluster(monkeypatch, nodes: list[dict[str, float]]) -> None:
    """`nodes` as Ray reports them (this machine has no GPU), with a dead node that must not count."""
    import ray

    dead = {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}
    listed = [{"Alive": True, "Resources": {**r, "memory": 1e10, "node:10.0.0.1": 1.0}} for r in nodes]
    monkeypatch.setattr(ray, "nodes", lambda: [dead, *listed])
    monkeypatch.setattr(ray, "is_initialized", lambda: True)


def _placed(nodes: list[dict[str, float]], n: int, asks: dict[str, float]) -> int:
    """How many of `n` actors asking `asks` Ray can place, each on one node (in its 1/10000 steps)."""
    names = {"num_cpus": "CPU", "num_gpus": "GPU"}
    per_node = [
        min(
            (round(r.get(names[k], 0.0) * 10000) // round(v * 10000) for k, v in asks.items() if v > 0),
            default=n,
        )
        for r in nodes
    ]
    return min(n, sum(per_node))


@pytest.mark.parametrize(
    "workers, gpu, want",
    [
        (None, True, (2, {"num_gpus": 1.0, "num_cpus": 8.0})),  # a GPU each, with its share of CPUs
        (4, True, (4, {"num_gpus": 0.5, "num_cpus": 4.0})),
        (None, False, (16, {"num_cpus": 1.0})),  # no model: a CPU each
        (32, False, (32, {"num_cpus": 0.5})),
    ],
)
def test_the_pool_takes_a_gpu_per_model_worker_when_the_cluster_has_gpus(monkeypatch, workers, gpu, want):
    """A 16-CPU, 2-GPU cluster, as Ray reports it (this machine has no GPU)."""
    from sdprep.ray_executor import RayExecutor

    _fake_cluster(monkeypatch, ONE_NODE)
    assert RayExecutor("auto", workers=workers).pool(gpu) == want
    assert _placed(ONE_NODE, *want) == want[0]


@pytest.mark.parametrize(
    "nodes, workers, gpu, want",
    [
        # 3 workers on 2 GPUs: half a GPU each (0.667 each would leave the third unplaced for ever)
        ([{"CPU": 2.0, "GPU": 2.0}], 3, True, (3, {"num_gpus": 0.5, "num_cpus": 0.5})),
        ([{"CPU": 8.0, "GPU": 2.0}], 5, True, (5, {"num_gpus": 0.3333, "num_cpus": 1.0})),
        # GPU workers size their CPUs from the GPU nodes, not from the CPU-only head
        (MIXED, None, True, (2, {"num_gpus": 1.0, "num_cpus": 8.0})),
        (MIXED, 3, True, (3, {"num_gpus": 0.5, "num_cpus": 4.0})),
        # the GPU node with fewest CPUs per GPU sets the CPUs
        (
            [{"CPU": 4.0, "GPU": 2.0}, {"CPU": 32.0, "GPU": 1.0}],
            None,
            True,
            (3, {"num_gpus": 1.0, "num_cpus": 2.0}),
        ),
        # CPU workers: what fits on the nodes one by one, not the cluster's total / n
        (MIXED, 2, False, (2, {"num_cpus": 8.0})),  # 16 each: only the head takes one
        (MIXED, 5, False, (5, {"num_cpus": 5.0})),  # 6 each (32 / 5): only 4 fit
        ([{"CPU": 3.0}, {"CPU": 3.0}], 4, False, (4, {"num_cpus": 1.0})),
        ([{"CPU": 1.0}, {"CPU": 2.0}], 4, False, (4, {"num_cpus": 0.5})),
        (MIXED, None, False, (32, {"num_cpus": 1.0})),
        (MIXED, None, True, (2, {"num_gpus": 1.0, "num_cpus": 8.0})),
    ],
)
def test_every_worker_of_the_pool_fits_on_one_node(monkeypatch, nodes, workers, gpu, want):
    from sdprep.ray_executor import RayExecutor

    _fake_cluster(monkeypatch, nodes)
    n, asks = RayExecutor("auto", workers=workers).pool(gpu)
    assert (n, asks) == want
    assert _placed(nodes, n, asks) == n
    if gpu:
        assert _placed([r for r in nodes if "GPU" in r], n, asks) == n  # and they go on GPU nodes


def test_a_worker_no_node_can_take_is_a_cluster_error_not_a_hang(ray_executor, monkeypatch):
    """The 2-CPU test cluster and workers that ask for 4 CPUs each: Ray would keep them pending."""
    from sdprep.errors import ClusterError

    monkeypatch.setattr(ray_executor, "pool", lambda gpu: (1, {"num_cpus": 4.0}))
    monkeypatch.setenv("SDPREP_RAY_START_TIMEOUT", "3")
    with pytest.raises(ClusterError) as got:
        list(ray_executor.map(abs, range(-4, 0)))
    assert str(got.value).splitlines()[0] == (
        "1 of 1 Ray workers did not start within 3 s (each asks for 4 CPU)"
    )
    assert "ray status" in got.value.hint
    assert ray_executor.actors == []  # killed, not left waiting on the cluster
    monkeypatch.undo()
    assert [o for _, o in ray_executor.map(abs, range(-4, 0))] == [4, 3, 2, 1]  # the cluster is free


class _Drops:
    """A batch function with a bug: it loses the last item of every batch."""

    def __call__(self, n: int) -> int:
        return n

    def batch(self, items: list[int]) -> list[int]:
        return items[:-1]


def test_a_batch_function_that_loses_items_is_an_error_naming_it(ray_executor):
    from sdprep.errors import BatchError
    from sdprep.executors import run_batch

    with pytest.raises(BatchError, match=r"_Drops\.batch gave 2 results for a batch of 3 items"):
        run_batch(_Drops(), [1, 2, 3])
    with pytest.raises(BatchError, match=r"_Drops\.batch gave 3 results for a batch of 4 items"):
        list(ray_executor.map(_Drops(), range(8), batch_size=4))


def test_results_of_a_batch_are_counted_on_the_driver_too(monkeypatch):
    """The driver checks what comes back as well: a zip would drop items silently."""
    import ray

    from sdprep.errors import BatchError
    from sdprep.ray_executor import RayExecutor

    ex = RayExecutor.__new__(RayExecutor)
    ex._fn_name = "prep.tag.Tagger.batch"
    monkeypatch.setattr(ray, "get", lambda ref: ["a"])
    with pytest.raises(BatchError, match=r"^prep\.tag\.Tagger\.batch gave 1 results for a batch of 2 items"):
        list(ex._take((["x", "y"], None, 0), [1]))
