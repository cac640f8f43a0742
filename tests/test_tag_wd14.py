"""The WD14 tagger: kohya's preprocessing, model lookup (folder / hub cache / offline), providers, records."""

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps
from tagger_cases import make_cases

from sdprep.errors import ConfigError, ModelError
from sdprep.taggers import wd14
from sdprep.taggers.base import Tagger
from sdprep.taggers.tiny import build_tiny_wd14

SAMPLES = Path(__file__).resolve().parent.parent / "sample_data" / "images"


# -- preprocessing --------------------------------------------------------------------------------


def reference_preprocess(path: Path, size: int = 448) -> np.ndarray:
    """kohya-formats.md's steps written out independently: white composite, BGR, centred white pad
    (remainder bottom/right), INTER_AREA when shrinking / Pillow LANCZOS when enlarging."""
    im = ImageOps.exif_transpose(Image.open(path))
    rgba = np.asarray(im.convert("RGBA"), dtype=np.float64)
    alpha = rgba[:, :, 3:4] / 255.0
    rgb = np.floor(rgba[:, :, :3] * alpha + 255.0 * (1 - alpha) + 0.5).astype(np.uint8)
    bgr = np.ascontiguousarray(np.flip(rgb, axis=2))
    h, w = bgr.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    padded = np.pad(bgr, ((top, side - h - top), (left, side - w - left), (0, 0)), constant_values=255)
    if side > size:
        return cv2.resize(padded, (size, size), interpolation=cv2.INTER_AREA)
    if side < size:
        return np.asarray(Image.fromarray(padded).resize((size, size), Image.Resampling.LANCZOS))
    return padded


KOHYA_HASHES = json.loads((Path(__file__).parent / "assets" / "kohya_wd14_preprocess.json").read_text())


@pytest.fixture(scope="module")
def tagger_cases(tmp_path_factory) -> dict[str, Path]:
    return make_cases(tmp_path_factory.mktemp("tagger_cases"))


@pytest.mark.parametrize("name", sorted(KOHYA_HASHES))
def test_preprocessing_is_byte_identical_to_kohyas_tagger(name, tagger_cases):
    """Colour keys (tRNS on RGB, greyscale, palette) composited on white, partial alpha pasted as
    kohya pastes it, a 300x200 image enlarged with Pillow's LANCZOS: the hashes are of the arrays
    kohya's own preprocess_image returned for these files (tests/tagger_cases.py)."""
    path = tagger_cases.get(name, SAMPLES / name)
    got = wd14.load_for_tagging(path)
    assert got.shape == (448, 448, 3) and got.dtype == np.uint8
    assert hashlib.sha256(got.tobytes()).hexdigest() == KOHYA_HASHES[name]


def test_colour_keyed_pixels_become_white(tagger_cases):
    for name, where in (("key_rgb.png", (20, 10)), ("key_grey.png", (5, 30)), ("key_palette.png", None)):
        im = Image.open(tagger_cases[name])
        rgb = np.asarray(wd14.on_white(im))
        if where is None:  # the palette entry made transparent
            where = next(zip(*np.nonzero(np.asarray(im) == 3)))[::-1]
        assert rgb[where[1], where[0]].tolist() == [255, 255, 255], name
        assert rgb.min() < 255, name  # the rest is not


@pytest.mark.parametrize("name", sorted(p.name for p in SAMPLES.iterdir() if p.suffix != ".json"))
def test_preprocessing_matches_an_independent_implementation(name):
    got = wd14.load_for_tagging(SAMPLES / name)
    want = reference_preprocess(SAMPLES / name)
    assert got.shape == (448, 448, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - want.astype(int))
    if name == "f_transparent.png":
        assert diff.max() <= 1  # Pillow's paste rounds half-transparent pixels its own way
    else:
        assert diff.max() == 0


def test_exact_pixels_of_a_tiny_image_bgr_and_centred_pad():
    im = Image.new("RGB", (3, 1))
    im.putdata([(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    out = wd14.preprocess(im, size=3)  # 3x3 square: no resize, so every pixel is known
    white = [255, 255, 255]
    assert out.tolist() == [
        [white, white, white],
        [[0, 0, 255], [0, 255, 0], [255, 0, 0]],  # BGR
        [white, white, white],
    ]
    tall = Image.new("RGB", (1, 2), (10, 20, 30))
    out = wd14.preprocess(tall, size=2)  # one column of pad: the odd one goes right
    assert out[:, 0].tolist() == [[30, 20, 10], [30, 20, 10]] and out[:, 1].tolist() == [white, white]
    wide = Image.new("RGB", (4, 1), (0, 0, 0))
    out = wd14.preprocess(wide, size=4)  # 3 rows of pad: 1 on top, 2 at the bottom
    assert [int(out[r, 0, 0]) for r in range(4)] == [255, 0, 255, 255]


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 0, 255))
    rgba.save(tmp_path / "a.png")
    la = rgba.convert("LA")
    la.save(tmp_path / "la.png")
    pal = rgba.convert("P")
    pal.info["transparency"] = pal.getpixel((1, 1))
    pal.save(tmp_path / "p.png", transparency=pal.getpixel((1, 1)))
    for name in ("a.png", "la.png", "p.png"):
        out = wd14.load_for_tagging(tmp_path / name, size=2)
        assert out[0, 0].tolist() == [0, 0, 0], name
        assert out[1, 1].tolist() == [255, 255, 255], name
    assert np.array_equal(np.asarray(wd14.on_white(rgba)), np.asarray(wd14.on_white(la)))


def test_to_batch_is_float32_nhwc_0_255():
    a = np.full((448, 448, 3), 255, np.uint8)
    batch = wd14.to_batch([a, a])
    assert batch.shape == (2, 448, 448, 3) and batch.dtype == np.float32 and batch.max() == 255.0


# -- model lookup ---------------------------------------------------------------------------------


def test_every_smilingwolf_model_is_known_and_the_default_is_swinv2_v3():
    assert wd14.DEFAULT_MODEL == "SmilingWolf/wd-swinv2-tagger-v3"
    assert len(wd14.KNOWN_MODELS) == 10
    assert "SmilingWolf/wd-v1-4-moat-tagger-v2" in wd14.KNOWN_MODELS
    assert wd14.model_id_for("wd-eva02-large-tagger-v3") == "SmilingWolf/wd-eva02-large-tagger-v3"
    assert not wd14.is_local_spec("SmilingWolf/wd-vit-tagger-v3")
    assert wd14.is_local_spec("./models/wd14") and wd14.is_local_spec("/abs/path/wd14")


def test_local_folder_missing_files_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        wd14.resolve_model(str(tmp_path / "nope"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.onnx").write_bytes(b"x")
    with pytest.raises(ModelError) as err:
        wd14.resolve_model(str(tmp_path / "m"))
    assert f"WD14 model folder {tmp_path / 'm'} lacks selected_tags.csv" in str(err.value)
    assert "Hint:" in str(err.value)


def test_offline_without_the_model_says_how_to_provide_it(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelError) as err:
        wd14.resolve_model("SmilingWolf/wd-vit-tagger-v3")
    text = str(err.value)
    assert text.startswith(
        "WD14 model SmilingWolf/wd-vit-tagger-v3: selected_tags.csv is not (completely) in the "
        "Hugging Face cache and HF_HUB_OFFLINE is set\nHint: on a connected machine run "
        "`hf download SmilingWolf/wd-vit-tagger-v3 model.onnx selected_tags.csv --local-dir wd14`"
    )
    assert "--model DIR" in text


def fake_hub_cache(cache: Path, repo: str, src: Path, complete: bool) -> Path:
    """The huggingface_hub cache layout: refs/main -> snapshots/<commit>/<files>, blobs/."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    (folder / "blobs").mkdir()
    shutil.copy(src / "selected_tags.csv", snap / "selected_tags.csv")
    if complete:
        shutil.copy(src / "model.onnx", snap / "model.onnx")
    else:  # an interrupted download leaves only a partial blob, never the snapshot file
        data = (src / "model.onnx").read_bytes()
        (folder / "blobs" / "abc123.incomplete").write_bytes(data[: len(data) // 3])
    return snap


def test_half_finished_download_never_poisons_later_runs(tiny_wd14, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    repo = "SmilingWolf/wd-swinv2-tagger-v3"
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "cache"))
    fake_hub_cache(tmp_path / "cache", repo, tiny_wd14, complete=False)
    with pytest.raises(ModelError, match=r"model\.onnx is not \(completely\) in the Hugging Face cache"):
        wd14.resolve_model(repo)
    # the download finishes later (here: the snapshot file appears) and the same call now works
    shutil.rmtree(tmp_path / "cache")
    snap = fake_hub_cache(tmp_path / "cache", repo, tiny_wd14, complete=True)
    files = wd14.resolve_model(repo)
    assert files.model_id == repo and files.onnx_path == snap / "model.onnx"
    tagger = wd14.WD14Tagger(repo)
    tagger.load()
    assert tagger.name == f"wd14:{repo}"


def test_damaged_model_file_is_a_model_error(tiny_wd14, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_wd14, broken)
    data = (broken / "model.onnx").read_bytes()
    (broken / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="cannot load .*model.onnx") as err:
        wd14.WD14Tagger(str(broken)).load()
    assert "damaged or incomplete" in str(err.value)


def test_tags_file_from_another_model_is_refused(tiny_wd14, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_wd14, other)
    lines = (other / "selected_tags.csv").read_text().splitlines()
    (other / "selected_tags.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ModelError, match="lists 36 tags but .* outputs 37"):
        wd14.WD14Tagger(str(other)).load()


# -- session, providers, records -----------------------------------------------------------------


@pytest.mark.parametrize("input_name", ["input", "input_1:0"])
def test_input_name_and_size_come_from_the_session(tmp_path, input_name):
    folder = build_tiny_wd14(tmp_path / "m", input_name=input_name)
    tagger = wd14.WD14Tagger(str(folder), device="cpu")
    tagger.load()
    assert tagger.input_name == input_name and tagger.size == 448
    assert tagger.provider == "CPUExecutionProvider" and tagger.warnings == []
    probs = tagger.infer(wd14.to_batch([wd14.load_for_tagging(SAMPLES / "a_landscape.jpg")] * 2))
    assert probs.shape == (2, 37) and np.allclose(probs[0], probs[1])


def test_provider_choice_and_loud_warnings():
    avail = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert wd14.choose_providers("auto", avail) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert wd14.choose_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert wd14.choose_providers("cpu", avail) == ["CPUExecutionProvider"]
    assert wd14.choose_providers("rocm", avail)[0] == "ROCMExecutionProvider"
    with pytest.raises(ConfigError, match='unknown device "gpu"'):
        wd14.choose_providers("gpu", avail)
    # CUDA present but the session fell back to CPU (missing cuDNN...): loud
    [msg] = wd14.provider_warnings(
        "auto", ["CUDAExecutionProvider", "CPUExecutionProvider"], avail, ["CPUExecutionProvider"]
    )
    assert msg.startswith(
        "WARNING: CUDAExecutionProvider failed to start and onnxruntime fell back to CPUExecutionProvider"
    )
    [msg] = wd14.provider_warnings(
        "cuda", ["CUDAExecutionProvider"], ["CPUExecutionProvider"], ["CPUExecutionProvider"]
    )
    assert msg.startswith(
        "WARNING: --device cuda asked for CUDAExecutionProvider, which this onnxruntime does not have"
    )
    assert wd14.provider_warnings("auto", avail[:1] + avail[1:], avail, avail) == []


def test_record_keeps_scores_above_the_floor_exactly(tiny_wd14):
    tagger = wd14.WD14Tagger(str(tiny_wd14), floor=0.2)
    tagger.load()
    probs = tagger.infer(wd14.to_batch([wd14.load_for_tagging(SAMPLES / "b_portrait.png")]))[0]
    rec = tagger.record(probs)
    names = tagger.vocab.names
    assert set(rec["rating"]) == {"general", "sensitive", "questionable", "explicit"}
    expected = [n for i, n in enumerate(names) if i >= 4 and probs[i] >= np.float32(0.2)]
    assert list(rec["scores"]) == expected  # vocabulary order
    for i, n in enumerate(names):
        if n in rec["scores"]:
            assert np.float32(rec["scores"][n]) == probs[i]  # the float32 round-trips exactly
    assert set(rec["categories"].values()) <= {"general", "character"}
    assert rec["model"] == tiny_wd14.absolute().as_posix() and rec["floor"] == 0.2
    assert wd14.matches_record(rec, rec["model"], 0.2) and not wd14.matches_record(rec, rec["model"], 0.05)
    gen = probs[tagger.vocab.index_of("general")]
    assert np.float32(rec["mcut"]["general"]) == np.float32(wd14.mcut_threshold(gen))


def test_the_tagger_protocol_on_in_memory_images(tiny_wd14):
    tagger = wd14.WD14Tagger(str(tiny_wd14))
    assert isinstance(tagger, Tagger)
    from sdprep.taggers.registry import create_tagger

    same = create_tagger(str(tiny_wd14))
    assert same.name == tagger.name
    [a, b] = tagger.tag([Image.open(SAMPLES / "f_transparent.png"), Image.new("RGB", (64, 64), "red")])
    assert a.model == tiny_wd14.absolute().as_posix() and a.scores != b.scores
    pixels = [
        wd14.load_for_tagging(SAMPLES / "f_transparent.png"),
        wd14.preprocess(Image.new("RGB", (64, 64), "red")),
    ]
    direct = tagger.record(tagger.infer(wd14.to_batch(pixels))[0])  # same batch: same float arithmetic
    assert a.scores == direct["scores"]


def test_an_unreachable_hub_fails_at_once_without_retries(tmp_path, monkeypatch):
    """Not offline but no network: the error comes before any download attempt (which retries ~23 s)."""
    import huggingface_hub
    import huggingface_hub.constants as hc

    online = []
    real = huggingface_hub.hf_hub_download

    def spy(*args, **kwargs):
        if not kwargs.get("local_files_only"):
            online.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    with pytest.raises(ModelError) as err:
        wd14.resolve_model("SmilingWolf/wd-vit-tagger-v3")
    assert "is not (completely) in the Hugging Face cache and the hub cannot be reached" in str(err.value)
    assert online == []


class CountingSession:
    """A real onnxruntime session that records the batch size of every call."""

    def __init__(self, session):
        self.session, self.calls = session, []

    def run(self, outputs, feeds):
        self.calls.append(len(next(iter(feeds.values()))))
        return self.session.run(outputs, feeds)


def test_cpu_runs_each_image_alone_and_a_gpu_provider_runs_the_batch_in_one_call(tiny_wd14):
    tagger = wd14.WD14Tagger(str(tiny_wd14))
    tagger.load()
    batch = np.random.default_rng(0).uniform(0, 255, (3, tagger.size, tagger.size, 3)).astype(np.float32)
    tagger.session = counting = CountingSession(tagger.session)
    assert tagger.provider == "CPUExecutionProvider"
    cpu = tagger.infer(batch)
    assert counting.calls == [1, 1, 1]  # batch-independent scores on the CPU
    tagger.provider = "CUDAExecutionProvider"  # what a GPU session reports as its first provider
    counting.calls.clear()
    gpu = tagger.infer(batch)
    assert counting.calls == [3]  # a GPU gets the whole batch
    assert gpu.shape == cpu.shape == (3, len(tagger.vocab.names))
    np.testing.assert_allclose(gpu, cpu, atol=1e-2)
    assert tagger.infer(batch[:0]).shape == (0, len(tagger.vocab.names))
