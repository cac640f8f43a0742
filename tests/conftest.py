"""Shared fixtures: sample data copies and tiny models built offline (no network, one torch thread)."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The Ray tests' cluster (fixture ray_cluster), set before Ray is imported (it reads them then): every
# socket on 127.0.0.1 (Ray takes the machine's outward address unless it thinks it runs on a laptop
# OS), token auth with a token in the environment (child processes inherit it; nothing in $HOME).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)

REPO = Path(__file__).resolve().parent.parent
SAMPLE_IMAGES = REPO / "sample_data" / "images"


@pytest.fixture
def sample_dataset(tmp_path: Path) -> Path:
    """A private copy of sample_data/images (images + gallery-dl sidecars)."""
    dest = tmp_path / "data"
    shutil.copytree(SAMPLE_IMAGES, dest)
    return dest


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL-architecture diffusers folder (random weights), built once per session."""
    import torch

    torch.set_num_threads(1)
    from sdprep.train.models.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "model")


@pytest.fixture(scope="session")
def topology_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The topology-true SDXL (real block structure, real CLIP tokenizer, narrow widths; random
    weights, about 3 GB on disk), built once per session: for the `slow` tests."""
    import torch

    torch.set_num_threads(1)
    from sdprep.train.models.fullsize import build_topology_sdxl

    return build_topology_sdxl(tmp_path_factory.mktemp("topology_sdxl") / "model")


@pytest.fixture(scope="session")
def tiny_wd14(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny WD14-shaped ONNX tagger folder (model.onnx + selected_tags.csv)."""
    from sdprep.taggers.tiny import build_tiny_wd14

    return build_tiny_wd14(tmp_path_factory.mktemp("tiny_wd14") / "wd14")


@pytest.fixture(scope="session")
def review_template(tmp_path_factory: pytest.TempPathFactory, tiny_wd14: Path) -> Path:
    """The 12-image dataset the review page's tests use (tests/review_support.py), built once."""
    from review_support import make_review_dataset

    return make_review_dataset(tmp_path_factory.mktemp("review") / "data", tiny_wd14)


@pytest.fixture
def review_dataset(review_template: Path, tmp_path: Path) -> Path:
    """A private copy of the review dataset."""
    return Path(shutil.copytree(review_template, tmp_path / "data"))


@pytest.fixture
def cli_runner():
    from click.testing import CliRunner

    return CliRunner()


@pytest.fixture(scope="session")
def zygote(tmp_path_factory: pytest.TempPathFactory):
    """A fork server for the crash tests (tests/zygote.py): real CLI processes, forked warm."""
    from crashkit import Zygote

    server = Zygote(tmp_path_factory.mktemp("zygote"))
    yield server
    server.close()


@pytest.fixture
def fast_tmp(tmp_path: Path):
    """A scratch folder in memory (/dev/shm) when the machine has one, else tmp_path. Crash tests
    run hundreds of commands that fsync every journal entry and file; a busy disk makes those
    syncs the slowest part, and a killed process loses nothing the page cache holds anyway."""
    import tempfile

    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="sdprep-test-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real Ray cluster on the loopback address for the whole session (a head node with 2 CPUs),
    this process connected to it as the driver; yields its address for other drivers (the CLI).
    Its environment is set at the top of this file."""
    import logging
    import tempfile

    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    temp = tempfile.mkdtemp(prefix="sdprep-ray-")  # short: Ray's socket paths live under it
    info = ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        _temp_dir=temp,
        _node_ip_address="127.0.0.1",
    )
    try:
        yield info.address_info["gcs_address"]
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
