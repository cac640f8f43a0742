import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.nn import functional as F

from sdprep import fileops
from sdprep.cli import cli
from sdprep.errors import ConfigError, ModelError
from sdprep.prep.upscale import UpscaleOptions, parse_pixels, resize_mask, run_upscale, target_size
from sdprep.prep.upscale_models import load_upscaler

torch.set_num_threads(1)


def tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".sdprep" not in p.parts
    }


# -- tiny ESRGAN-family weights, written out key by key as the real files name them ---------------


def rrdb_state_dict(nf=8, nb=2, gc=4, n_up=2, in_mult=1, seed=0) -> dict[str, torch.Tensor]:
    """Random weights in the new BasicSR layout (conv_first, body.N.rdbK.convJ, conv_up1...)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"conv_first": (nf, 3 * in_mult)}
    for b in range(nb):
        for r in (1, 2, 3):
            for c in range(1, 6):
                shapes[f"body.{b}.rdb{r}.conv{c}"] = (nf if c == 5 else gc, nf + (c - 1) * gc)
    shapes["conv_body"] = (nf, nf)
    shapes.update({f"conv_up{i + 1}": (nf, nf) for i in range(n_up)})
    shapes.update(conv_hr=(nf, nf), conv_last=(3, nf))
    sd = {}
    for name, (out_c, in_c) in shapes.items():
        sd[f"{name}.weight"] = torch.randn(out_c, in_c, 3, 3, generator=g) * 0.1
        sd[f"{name}.bias"] = torch.randn(out_c, generator=g) * 0.01
    return sd


def to_trunk_layout(sd):
    """The old ESRGAN repository's names: RRDB_trunk, RDB1, trunk_conv, upconv1, HRconv."""
    out = {}
    for k, v in sd.items():
        k = "trunk_conv." + k[10:] if k.startswith("conv_body.") else k
        k = k.replace("body.", "RRDB_trunk.", 1) if k.startswith("body.") else k
        k = k.replace(".rdb", ".RDB")
        k = k.replace("conv_up", "upconv").replace("conv_hr.", "HRconv.")
        out[k] = v
    return out


def to_sequential_layout(sd, nb, n_up):
    """The oldest layout: model.0, model.1.sub.N.RDBk.convj.0, model.1.sub.<nb>, model.3/6, ..."""
    names = {"conv_first": 0, "conv_hr": 3 * n_up + 2, "conv_last": 3 * n_up + 4}
    names.update({f"conv_up{i + 1}": 3 * (i + 1) for i in range(n_up)})
    out = {}
    for k, v in sd.items():
        layer, _, param = k.rpartition(".")
        if layer.startswith("body."):
            _, b, rdb, conv = layer.split(".")
            out[f"model.1.sub.{b}.RDB{rdb[3:]}.{conv}.0.{param}"] = v
        elif layer == "conv_body":
            out[f"model.1.sub.{nb}.{param}"] = v
        else:
            out[f"model.{names[layer]}.{param}"] = v
    return out


def reference_rrdbnet(sd, x, nb, n_up, unshuffle=1):
    """ESRGAN's forward pass written with plain functional calls over the state dict."""

    def conv(name, t):
        return F.conv2d(t, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=1)

    def lrelu(t):
        return F.leaky_relu(t, 0.2)

    if unshuffle > 1:
        x = F.pixel_unshuffle(x, unshuffle)
    feat = conv("conv_first", x)
    body = feat
    for b in range(nb):
        block_in = body
        for r in (1, 2, 3):
            xs = [body]
            for c in range(1, 5):
                xs.append(lrelu(conv(f"body.{b}.rdb{r}.conv{c}", torch.cat(xs, 1))))
            body = conv(f"body.{b}.rdb{r}.conv5", torch.cat(xs, 1)) * 0.2 + xs[0]
        body = body * 0.2 + block_in
    feat = feat + conv("conv_body", body)
    for i in range(n_up):
        feat = lrelu(conv(f"conv_up{i + 1}", F.interpolate(feat, scale_factor=2, mode="nearest")))
    return conv("conv_last", lrelu(conv("conv_hr", feat)))


def as_uint8(t: torch.Tensor) -> np.ndarray:
    return t[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)


def test_all_three_rrdb_layouts_load_and_match_the_reference(tmp_path, rgb):
    sd = rrdb_state_dict(nb=2, n_up=2)
    expected = as_uint8(reference_rrdbnet(sd, torch.from_numpy(rgb).permute(2, 0, 1)[None] / 255.0, 2, 2))
    save_file(sd, tmp_path / "new.safetensors")
    torch.save(to_trunk_layout(sd), tmp_path / "trunk.pth")
    torch.save({"params_ema": to_sequential_layout(sd, 2, 2)}, tmp_path / "seq.pth")
    for name in ["new.safetensors", "trunk.pth", "seq.pth"]:
        up = load_upscaler(tmp_path / name, device="cpu", tile=0)
        assert up.scale == 4 and "rrdbnet x4" in up.name
        out = up.upscale(rgb)
        assert out.shape == (80, 96, 3)
        assert np.abs(out.astype(int) - expected).max() <= 1, name


def test_scale_is_read_from_the_state_dict(tmp_path, rgb):
    sd = rrdb_state_dict(nb=1, n_up=1, seed=1)
    torch.save(to_sequential_layout(sd, 1, 1), tmp_path / "x2.pth")
    assert load_upscaler(tmp_path / "x2.pth", device="cpu").scale == 2
    # Real-ESRGAN x2: pixel-unshuffle by 2 (conv_first takes 12 channels), two 2x upsamplings
    sd = rrdb_state_dict(nb=1, n_up=2, in_mult=4, seed=2)
    save_file(sd, tmp_path / "realesrgan_x2.safetensors")
    up = load_upscaler(tmp_path / "realesrgan_x2.safetensors", device="cpu", tile=0)
    assert up.scale == 2
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None] / 255.0
    expected = as_uint8(reference_rrdbnet(sd, x, 1, 2, unshuffle=2))
    assert np.abs(up.upscale(rgb).astype(int) - expected).max() <= 1


def test_realesrgan_compact(tmp_path, rgb):
    g = torch.Generator().manual_seed(3)
    sd, nf, scale = {}, 8, 2
    layers = [(3, nf)] + [(nf, nf)] * 2 + [(nf, 3 * scale * scale)]
    for i, (cin, cout) in enumerate(layers):
        sd[f"body.{2 * i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * 0.1
        sd[f"body.{2 * i}.bias"] = torch.zeros(cout)
        if i < len(layers) - 1:
            sd[f"body.{2 * i + 1}.weight"] = torch.full((cout,), 0.25)  # PReLU
    save_file(sd, tmp_path / "compact.safetensors")
    up = load_upscaler(tmp_path / "compact.safetensors", device="cpu", tile=0)
    assert up.scale == 2 and "compact" in up.name
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None] / 255.0
    h = x
    for i in range(len(layers)):
        h = F.conv2d(h, sd[f"body.{2 * i}.weight"], sd[f"body.{2 * i}.bias"], padding=1)
        if i < len(layers) - 1:
            h = F.prelu(h, sd[f"body.{2 * i + 1}.weight"])
    expected = as_uint8(F.pixel_shuffle(h, scale) + F.interpolate(x, scale_factor=scale, mode="nearest"))
    assert np.abs(up.upscale(rgb).astype(int) - expected).max() <= 1


def test_tiled_equals_untiled_within_tolerance(tmp_path):
    save_file(rrdb_state_dict(nb=1, n_up=2, seed=4), tmp_path / "m.safetensors")
    img = np.random.default_rng(1).integers(0, 256, (50, 44, 3), dtype=np.uint8)
    whole = load_upscaler(tmp_path / "m.safetensors", device="cpu", tile=0).upscale(img)
    tiled = load_upscaler(tmp_path / "m.safetensors", device="cpu", tile=16, overlap=8).upscale(img)
    diff = np.abs(whole.astype(int) - tiled)
    assert whole.shape == tiled.shape == (200, 176, 3)
    assert diff.max() <= 2 and diff.mean() < 0.05


def test_refuses_pickles_and_unknown_models(tmp_path):
    torch.save(torch.nn.Conv2d(3, 3, 3), tmp_path / "module.pth")
    with pytest.raises(ModelError, match="holds pickled Python objects, not only weights"):
        load_upscaler(tmp_path / "module.pth")
    save_file({"foo.weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    with pytest.raises(ModelError, match=r"unrecognised upscaler architecture \(first keys: foo.weight\)"):
        load_upscaler(tmp_path / "other.safetensors")
    with pytest.raises(ModelError, match="no such model file"):
        load_upscaler(tmp_path / "missing.pth")


# -- the stage --------------------------------------------------------------------------------------


def test_target_size_and_options():
    assert target_size(200, 150, UpscaleOptions()) == (1183, 887)
    assert 1183 * 887 >= 1024 * 1024 > 1182 * 886
    assert target_size(1024, 1024, UpscaleOptions()) is None
    assert target_size(300, 100, UpscaleOptions(min_side=200)) == (600, 200)
    assert parse_pixels("512x512") == 262144 and parse_pixels("1000") == 1000
    with pytest.raises(ConfigError, match="invalid pixel count"):
        parse_pixels("big")
    soft = Image.linear_gradient("L").resize((8, 8))
    assert len(resize_mask(soft, (32, 32)).getcolors()) > 8  # bilinear: new grey levels
    hard = Image.new("L", (8, 8), 0)
    hard.paste(255, (0, 0, 4, 8))
    assert sorted(v for _, v in resize_mask(hard, (30, 30)).getcolors()) == [0, 255]


def test_lanczos_on_sample_data_masks_sidecars_undo(sample_dataset):
    mask = sample_dataset / "masks" / "g_tiny.png"
    mask.parent.mkdir()
    m = Image.new("L", (200, 150), 0)
    m.paste(255, (50, 40, 150, 110))
    m.save(mask)
    (sample_dataset / "masks_face").mkdir()
    Image.linear_gradient("L").resize((200, 150)).save(sample_dataset / "masks_face" / "g_tiny.png")
    before = tree(sample_dataset)
    result = run_upscale(sample_dataset, UpscaleOptions(min_side=400))
    # below 400 px on the short side: g_tiny (150) and h_wide (400 is enough: skipped)
    assert (result.changed, result.skipped, result.failed) == (1, 7, [])
    with Image.open(sample_dataset / "g_tiny.png") as im, Image.open(mask) as mk:
        assert im.size == mk.size == (534, 400)
        assert sorted(v for _, v in mk.getcolors()) == [0, 255]  # a hard mask stays hard
    with Image.open(sample_dataset / "masks_face" / "g_tiny.png") as soft:
        assert soft.size == (534, 400) and len(soft.getcolors()) > 2
    side = json.loads((sample_dataset / "g_tiny.png.json").read_text())
    assert side["sdprep"]["upscale"] == {"from": [200, 150], "to": [534, 400], "method": "lanczos"}
    assert side["sdprep"]["size"] == [534, 400] and side["id"] == 1007
    assert run_upscale(sample_dataset, UpscaleOptions(min_side=400)).changed == 0
    fileops.undo(sample_dataset)
    assert tree(sample_dataset) == before


def test_default_target_is_one_megapixel(sample_dataset, cli_runner):
    for p in sample_dataset.iterdir():
        if p.name not in ("g_tiny.png", "f_transparent.png"):
            p.unlink()
    res = cli_runner.invoke(cli, ["-q", "upscale", str(sample_dataset)])
    assert res.exit_code == 0, res.output
    assert res.output == "upscale: 2 changed, 0 skipped, 0 failed\n"
    with Image.open(sample_dataset / "g_tiny.png") as im:
        assert im.size == (1183, 887)
    with Image.open(sample_dataset / "f_transparent.png") as im:
        assert im.size == (1024, 1024) and im.mode == "RGBA"


def test_model_path_end_to_end(tmp_path, cli_runner):
    save_file(rrdb_state_dict(nb=1, n_up=2, seed=5), tmp_path / "tiny.safetensors")
    data = tmp_path / "data"
    (data / "masks").mkdir(parents=True)
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(
        data / "a.png"
    )
    Image.new("L", (30, 20), 255).save(data / "masks" / "a.png")
    before = tree(data)
    args = ["-q", "upscale", str(data), "--min-side", "64", "--model", str(tmp_path / "tiny.safetensors")]
    res = cli_runner.invoke(cli, [*args, "--device", "cpu", "--tile", "16"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(
        "upscale: 1 changed, 0 skipped, 0 failed\n  model: tiny.safetensors (rrdbnet x4)"
    )
    with Image.open(data / "a.png") as im, Image.open(data / "masks" / "a.png") as mk:
        assert im.size == mk.size == (96, 64)
    method = json.loads((data / "a.png.json").read_text())["sdprep"]["upscale"]["method"]
    assert method.startswith("model tiny.safetensors sha256:")
    fileops.undo(data)
    assert tree(data) == before


def test_cli_usage_errors(tmp_path, cli_runner):
    res = cli_runner.invoke(cli, ["upscale", str(tmp_path), "--min-area", "100", "--min-side", "10"])
    assert res.exit_code == 2 and "use --min-area or --min-side, not both" in res.output
    torch.save(torch.nn.Conv2d(3, 3, 3), tmp_path / "bad.pth")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    res = cli_runner.invoke(cli, ["upscale", str(tmp_path), "--model", str(tmp_path / "bad.pth")])
    assert res.exit_code == 1 and "holds pickled Python objects" in res.output


def test_an_empty_mask_file_is_named_not_its_image(tmp_path):
    for n in "ab":
        Image.new("RGB", (64, 48), (ord(n) * 2, 100, 50)).save(tmp_path / f"{n}.png")
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "a.png").write_bytes(b"")
    Image.new("L", (64, 48), 255).save(tmp_path / "masks" / "b.png")
    res = run_upscale(tmp_path, UpscaleOptions(min_side=100))
    assert res.changed == 1
    assert [(f.path.name, f.reason) for f in res.failed] == [("a.png", "masks/a.png: empty file (0 bytes)")]


def test_an_upscale_past_what_sdprep_reads_back_is_refused_per_file(tmp_path):
    """1x20000 to --min-side 128 would be 128x2,560,000 (1.5 GB, refused by sdprep's own loader)."""
    Image.new("RGB", (1, 20000), (200, 10, 10)).save(tmp_path / "strip.png")
    Image.new("RGB", (300, 100), (10, 200, 10)).save(tmp_path / "wide.webp", lossless=True)  # 384x128: fine
    Image.new("RGB", (10, 2000), (10, 10, 200)).save(tmp_path / "tall.webp", lossless=True)  # 128x25600
    before = (tmp_path / "strip.png").read_bytes()
    res = run_upscale(tmp_path, UpscaleOptions(min_side=128))
    assert res.changed == 1
    assert sorted((f.path.name, f.reason) for f in res.failed) == [
        (
            "strip.png",
            "upscaled, 1x20000 would become 128x2,560,000: that is 327,680,000 pixels, over the 268,435,456 "
            "sdprep reads (SDPREP_MAX_PIXELS)",
        ),
        (
            "tall.webp",
            "upscaled, 10x2000 would become 128x25,600: that does not fit in WebP, which stores at most 16,383 px "
            "per side",
        ),
    ]
    assert (tmp_path / "strip.png").read_bytes() == before


def test_images_sharing_a_mask_by_stem_are_not_upscaled(tmp_path):
    """a.png (64x48) and a.jpg (32x24) share masks/a.png: resizing it for one breaks it for the other."""
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (32, 24), (10, 10, 200)).save(tmp_path / "a.jpg")
    Image.new("RGB", (64, 48), (10, 200, 10)).save(tmp_path / "b.png")
    (tmp_path / "masks").mkdir()
    Image.new("L", (64, 48), 255).save(tmp_path / "masks" / "a.png")
    before = (tmp_path / "masks" / "a.png").read_bytes()
    res = run_upscale(tmp_path, UpscaleOptions(min_side=100))
    assert res.changed == 1
    reason = "masks/a.png is the mask of another image with this stem too"
    assert sorted((f.path.name, f.reason) for f in res.failed) == [("a.jpg", reason), ("a.png", reason)]
    assert (tmp_path / "masks" / "a.png").read_bytes() == before
