"""AI upscalers from a local weights file: spandrel when importable, else sdprep's own ESRGAN loader.

Weights are read with safetensors or `torch.load(weights_only=True)` only: a file that needs full
unpickling (it could run code) is refused. spandrel (many architectures: SwinIR, HAT, DAT...) is used
when it imports; it needs torchvision, which does not install beside every torch, so sdprep also
reads the most common family itself:
- ESRGAN / Real-ESRGAN RRDBNet in all three key layouts: new BasicSR (`conv_first`, `body.N.rdb1`,
  `conv_up1`), old ESRGAN (`RRDB_trunk`, `trunk_conv`, `upconv1`, `HRconv`) and the oldest
  sequential one (`model.0.weight`, `model.1.sub.N.RDB1.conv1.0.weight`); the scale, width, depth
  and pixel-unshuffle (Real-ESRGAN x2/x1) are read from the state dict;
- Real-ESRGAN's SRVGGNetCompact (`realesr-general-x4v3`, `realesr-animevideov3`).
Inference runs in overlapping tiles so a 4x model on a large image fits in memory.
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sdprep.errors import ModelError

if TYPE_CHECKING:
    import torch

WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model", "net")
# what runs the tiles: an nn.Module, or a spandrel ImageModelDescriptor (spandrel ships no types)
TileModel = Callable[["torch.Tensor"], "torch.Tensor"]


def _need_torch() -> None:
    """Check that PyTorch imports (each user imports it where needed: this module stays light)."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise ModelError(
            "--model needs PyTorch, which is not installed",
            'install it (pip install "sdprep[train]"), or upscale with Lanczos (no --model)',
        ) from exc


# -- reading weights ---------------------------------------------------------------------------


def read_state_dict(path: Path | str, *, trust_pickle: bool = False) -> dict[str, Any]:
    """Tensors of a weights file, unwrapped from `params_ema` / `state_dict`-style containers.

    `trust_pickle` unpickles a .pth/.ckpt in full (it can run code from the file): only for files
    from a source the user trusts, when no safetensors or plain state-dict version exists.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file", "pass the path of a .safetensors or .pth file")
    _need_torch()
    import torch

    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several untyped errors
            raise ModelError(f"{path}: not a readable safetensors file ({exc})") from exc
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
        except pickle.UnpicklingError as exc:
            raise ModelError(
                f"{path}: the file holds pickled Python objects, not only weights; sdprep refuses to "
                "unpickle it because that can run code from the file",
                "use a .safetensors version of the model, or a .pth that stores a plain state dict; "
                "if you trust where the file came from, pass --trust-pickle",
            ) from exc
        except (RuntimeError, EOFError, OSError, ImportError, AttributeError) as exc:  # the last two: trusted
            raise ModelError(f"{path}: cannot read model weights ({exc})") from exc
    for _ in range(3):
        if isinstance(obj, dict):
            inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is not None:
                obj = inner
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise ModelError(f"{path}: no state dict of tensors found in the file")
    return {k.removeprefix("module."): v for k, v in obj.items()}


# -- architectures ------------------------------------------------------------------------------


def _build_rrdbnet(
    in_nc: int, out_nc: int, nf: int, nb: int, gc: int, n_up: int, unshuffle: int
) -> torch.nn.Module:
    import torch
    from torch import nn
    from torch.nn import functional as F

    class RDB(nn.Module):
        conv5: nn.Conv2d  # conv1..conv5 are set by name below

        def __init__(self) -> None:
            super().__init__()
            for i in range(5):
                setattr(self, f"conv{i + 1}", nn.Conv2d(nf + i * gc, nf if i == 4 else gc, 3, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            feats = [x]
            for i in range(1, 5):
                feats.append(F.leaky_relu(getattr(self, f"conv{i}")(torch.cat(feats, 1)), 0.2))
            last: torch.Tensor = self.conv5(torch.cat(feats, 1))
            return last * 0.2 + x

    class RRDB(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rdb1, self.rdb2, self.rdb3 = RDB(), RDB(), RDB()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y: torch.Tensor = self.rdb3(self.rdb2(self.rdb1(x)))
            return y * 0.2 + x

    class RRDBNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv_first = nn.Conv2d(in_nc * unshuffle**2, nf, 3, 1, 1)
            self.body = nn.Sequential(*[RRDB() for _ in range(nb)])
            self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
            for i in range(n_up):
                setattr(self, f"conv_up{i + 1}", nn.Conv2d(nf, nf, 3, 1, 1))
            self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
            self.conv_last = nn.Conv2d(nf, out_nc, 3, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, w = x.shape[-2:]
            if unshuffle > 1:  # Real-ESRGAN x2/x1: the input must divide by the unshuffle factor
                pad_h, pad_w = (-h) % unshuffle, (-w) % unshuffle
                x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else x
                x = F.pixel_unshuffle(x, unshuffle)
            feat: torch.Tensor = self.conv_first(x)
            feat = feat + self.conv_body(self.body(feat))
            for i in range(n_up):
                up = F.interpolate(feat, scale_factor=2, mode="nearest")
                feat = F.leaky_relu(getattr(self, f"conv_up{i + 1}")(up), 0.2)
            out: torch.Tensor = self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))
            scale = 2**n_up // unshuffle
            return out[..., : h * scale, : w * scale]

    return RRDBNet()


def _build_compact(in_nc: int, out_nc: int, nf: int, num_conv: int, scale: int) -> torch.nn.Module:
    from torch import nn
    from torch.nn import functional as F

    class SRVGGNetCompact(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = [nn.Conv2d(in_nc, nf, 3, 1, 1), nn.PReLU(nf)]
            for _ in range(num_conv):
                layers += [nn.Conv2d(nf, nf, 3, 1, 1), nn.PReLU(nf)]
            layers.append(nn.Conv2d(nf, out_nc * scale * scale, 3, 1, 1))
            self.body = nn.ModuleList(layers)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = x
            for layer in self.body:
                out = layer(out)
            return F.pixel_shuffle(out, scale) + F.interpolate(x, scale_factor=scale, mode="nearest")

    return SRVGGNetCompact()


_OLD_NAMES = [
    (r"^RRDB_trunk\.", "body."),
    (r"\.RDB(\d)\.", r".rdb\1."),
    (r"^trunk_conv\.", "conv_body."),
    (r"^upconv(\d)\.", r"conv_up\1."),
    (r"^HRconv\.", "conv_hr."),
]


def _sequential_to_new(sd: dict[str, Any]) -> dict[str, Any]:
    """The oldest ESRGAN layout (`model.0`, `model.1.sub.N.RDB1.conv1.0`) in new BasicSR names."""
    top = sorted({int(k.split(".")[1]) for k in sd if re.match(r"model\.\d+\.(weight|bias)$", k)})
    n_up = (top[-1] - 4) // 3
    nb = max(int(k.split(".")[3]) for k in sd if k.startswith("model.1.sub.") and ".RDB" in k) + 1
    names = {0: "conv_first", 3 * n_up + 2: "conv_hr", 3 * n_up + 4: "conv_last"}
    names.update({3 * (i + 1): f"conv_up{i + 1}" for i in range(n_up)})
    out = {}
    for key, value in sd.items():
        m = re.match(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$", key)
        if m:
            out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = value
        elif m := re.match(rf"model\.1\.sub\.{nb}\.(weight|bias)$", key):
            out[f"conv_body.{m[1]}"] = value
        elif (m := re.match(r"model\.(\d+)\.(weight|bias)$", key)) and int(m[1]) in names:
            out[f"{names[int(m[1])]}.{m[2]}"] = value
        else:
            raise ModelError(f"unexpected key {key!r} in an ESRGAN (model.N) state dict")
    return out


def to_new_rrdb_keys(sd: dict[str, Any]) -> dict[str, Any]:
    """Any of the three RRDBNet key layouts in new BasicSR names (conv_first, body.N.rdb1...)."""
    if "model.0.weight" in sd:
        return _sequential_to_new(sd)
    out = {}
    for key, value in sd.items():
        for pattern, repl in _OLD_NAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def detect_architecture(sd: dict[str, Any]) -> tuple[str, dict[str, int]]:
    """('rrdbnet' | 'compact', hyper-parameters) read from the shapes of a state dict."""
    if "conv_first.weight" in sd or "model.0.weight" in sd:
        sd = to_new_rrdb_keys(sd)
        if "body.0.rdb1.conv1.weight" not in sd or "conv_last.weight" not in sd:
            raise ModelError(
                "an ESRGAN-like state dict without RRDB blocks", "install spandrel for this model"
            )
        first, last = sd["conv_first.weight"], sd["conv_last.weight"]
        out_nc, nf = last.shape[0], first.shape[0]
        unshuffle = int(round(math.sqrt(first.shape[1] / out_nc)))
        n_up = len([k for k in sd if re.match(r"conv_up\d+\.weight$", k)])
        nb = len({k.split(".")[1] for k in sd if k.startswith("body.")})
        gc = sd["body.0.rdb1.conv1.weight"].shape[0]
        return "rrdbnet", {
            "in_nc": out_nc,
            "out_nc": out_nc,
            "nf": nf,
            "nb": nb,
            "gc": gc,
            "n_up": n_up,
            "unshuffle": unshuffle,
            "scale": 2**n_up // unshuffle,
        }
    if "body.0.weight" in sd and "body.1.weight" in sd and sd["body.1.weight"].dim() == 1:
        convs = sorted(int(k.split(".")[1]) for k in sd if k.endswith(".weight") and sd[k].dim() == 4)
        in_nc, nf = sd["body.0.weight"].shape[1], sd["body.0.weight"].shape[0]
        last = sd[f"body.{convs[-1]}.weight"].shape[0]
        scale = int(round(math.sqrt(last / in_nc)))
        return "compact", {
            "in_nc": in_nc,
            "out_nc": in_nc,
            "nf": nf,
            "num_conv": len(convs) - 2,
            "scale": scale,
        }
    sample = ", ".join(list(sd)[:4])
    raise ModelError(
        f"unrecognised upscaler architecture (first keys: {sample})",
        "sdprep reads ESRGAN/Real-ESRGAN (RRDBNet) and Real-ESRGAN compact models by itself; "
        "install spandrel for SwinIR, HAT, DAT, OmniSR and others",
    )


# -- running -------------------------------------------------------------------------------------


@dataclass
class Upscaler:
    """A loaded model: `upscale(rgb)` maps an HxWx3 uint8 array to (H*scale)x(W*scale)x3."""

    model: TileModel
    scale: int
    name: str
    device: str
    tile: int = 256
    overlap: int = 16

    def upscale(self, rgb: np.ndarray) -> np.ndarray:
        return run_tiled(self.model, rgb, self.scale, self.device, self.tile, self.overlap)


def pick_device(device: str = "auto") -> str:
    _need_torch()
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def build_model(sd: dict[str, Any]) -> tuple[torch.nn.Module, int, str]:
    """An nn.Module with the weights loaded, its scale, and the architecture name."""
    _need_torch()
    arch, hp = detect_architecture(sd)
    scale = hp.pop("scale")
    if arch == "rrdbnet":
        model, weights = _build_rrdbnet(**hp), to_new_rrdb_keys(sd)
    else:
        model, weights = _build_compact(scale=scale, **hp), sd
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"weights do not fit the detected {arch} architecture ({exc})") from exc
    return model.eval(), scale, arch


def _spandrel_model(sd: dict[str, Any]) -> tuple[Any, int, str] | None:
    try:
        import spandrel
    except Exception:  # noqa: BLE001 - missing, or torchvision failing to import beside this torch
        return None
    try:
        desc = spandrel.ModelLoader().load_from_state_dict(sd)
    except spandrel.UnsupportedModelError:
        return None
    if not isinstance(desc, spandrel.ImageModelDescriptor):
        raise ModelError("the model is not an image-to-image model")
    desc.eval()  # the descriptor itself is called: it pads tiles to the sizes the architecture needs
    return desc, int(desc.scale), f"spandrel:{desc.architecture.name}"


def load_upscaler(
    path: Path | str, device: str = "auto", tile: int = 256, overlap: int = 16, *, trust_pickle: bool = False
) -> Upscaler:
    """Load an upscaler from a local weights file (spandrel first when it is importable)."""
    path = Path(path)
    sd = read_state_dict(path, trust_pickle=trust_pickle)
    loaded = _spandrel_model(sd) or build_model(sd)
    model, scale, arch = loaded
    dev = pick_device(device)
    return Upscaler(model.to(dev), scale, f"{path.name} ({arch} x{scale})", dev, tile, overlap)


def run_tiled(
    model: TileModel, rgb: np.ndarray, scale: int, device: str, tile: int, overlap: int
) -> np.ndarray:
    """Run `model` over overlapping tiles; each tile's centre is kept (tile=0 means one pass)."""
    _need_torch()
    import torch

    h, w = rgb.shape[:2]
    tile = tile if tile > 0 else max(h, w)
    out = np.empty((h * scale, w * scale, 3), dtype=np.uint8)
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            py0, px0 = max(y0 - overlap, 0), max(x0 - overlap, 0)
            py1, px1 = min(y1 + overlap, h), min(x1 + overlap, w)
            patch = torch.from_numpy(rgb[py0:py1, px0:px1].copy())  # a writable, contiguous copy
            x = patch.permute(2, 0, 1)[None].float().div(255).to(device)
            with torch.inference_mode():
                y = model(x)[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
            oy, ox = (y0 - py0) * scale, (x0 - px0) * scale
            out[y0 * scale : y1 * scale, x0 * scale : x1 * scale] = y[
                oy : oy + (y1 - y0) * scale, ox : ox + (x1 - x0) * scale
            ]
    return out
