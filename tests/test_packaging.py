import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_folder_names_are_not_importable(tmp_path):
    res = subprocess.run([sys.executable, "-c", "import train"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode != 0 and "No module named 'train'" in res.stderr


def test_non_editable_install_imports_every_subpackage(tmp_path):
    """Build a wheel, install it (no deps: they are in this venv) into a folder, import from elsewhere."""
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(wheel_dir.glob("sdprep-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in ("sdprep/", "sdprep/prep/", "sdprep/train/", "sdprep/taggers/"):
        assert f"{pkg}__init__.py" in names, pkg
    assert not any(n.startswith(("train/", "prep/", "taggers/", "tests/")) for n in names)
    for page in (
        "index.html",
        "app.js",
        "detail.js",
        "panels.js",
        "app.css",
    ):  # the review page ships whole: no CDN
        assert f"sdprep/prep/review/static/{page}" in names, page
    for data in ("unet/config.json", "tokenizer_2/tokenizer_config.json", "NOTICE.txt"):
        assert f"sdprep/train/models/sdxl_base/{data}" in names, data  # SDXL's base config, for single files
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = (
        "import sdprep, sdprep.prep, sdprep.train, sdprep.taggers, sdprep.train.models.tiny, sdprep.taggers.tiny\n"
        f"assert sdprep.__file__.startswith({str(target)!r}), sdprep.__file__\n"
        "import importlib.util; assert importlib.util.find_spec('train') is None\n"
        "import pathlib, tempfile; from sdprep.train.models.sdxl_config import write_base_config\n"
        "from transformers import CLIPTokenizer\n"
        "d = write_base_config(pathlib.Path(tempfile.mkdtemp()))\n"
        "assert len(CLIPTokenizer.from_pretrained(d / 'tokenizer_2')) == 49408\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
