"""Writing a fine-tuned SDXL: one `.safetensors` file with the ORIGINAL (SGM) key names, optionally a
diffusers folder too.

The single file is what A1111, Forge and ComfyUI load: the U-Net under `model.diffusion_model.*`,
CLIP-L under `conditioner.embedders.0.transformer.text_model.*`, OpenCLIP bigG under
`conditioner.embedders.1.model.*` (fused attention in_proj, transposed text_projection) and the VAE
under `first_stage_model.*` (names from `sdprep.train.save.sgm`). Every floating tensor is cast to the
save precision; the file is written by the trainer's verified atomic save (`sdprep.train.save.weights`).

The diffusers folder (`save_model_as = "diffusers"` or `save_diffusers_copy`) is written under a
temporary name and renamed into place, its weights cast to the save precision file by file.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdprep.fileops import atomic_write_dir
from sdprep.train.methods.base import key_problems

if TYPE_CHECKING:
    import torch

    from sdprep.train.models.load import SDXLModel

SINGLE_FILE_ARCHITECTURE = "stable-diffusion-xl-v1-base"


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach()
    if t.is_floating_point() and dtype is not None:
        t = t.to(dtype)
    return t.contiguous().cpu()


def component_to_sgm(
    component: str, state_dict: Mapping[str, Any], unet_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """One component's state dict ("unet", "te1", "te2", "vae") under its single-file names."""
    from sdprep.train.save.sgm import UnetLayout, te1_to_sgm, te2_to_sgm, unet_diffusers_to_sgm, vae_to_sgm

    if component == "unet":
        layout = UnetLayout.from_config(unet_config) if unet_config is not None else None
        return unet_diffusers_to_sgm(state_dict, layout)
    convert = {"te1": te1_to_sgm, "te2": te2_to_sgm, "vae": vae_to_sgm}
    if component not in convert:
        raise ValueError(f"unknown SDXL component {component!r}; valid: unet, te1, te2, vae")
    return convert[component](state_dict)


def checkpoint_tensors(
    unet: Mapping[str, Any],
    unet_config: Mapping[str, Any],
    text_encoder: Mapping[str, Any],
    text_encoder_2: Mapping[str, Any],
    vae: Mapping[str, Any],
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Diffusers/transformers state dicts of the four SDXL models -> one SGM-named state dict.

    `dtype` (a torch dtype) casts every floating tensor; None keeps each tensor's own dtype.
    """
    sd: dict[str, Any] = {}
    sd.update(component_to_sgm("unet", unet, unet_config))
    sd.update(component_to_sgm("te1", text_encoder))
    sd.update(component_to_sgm("te2", text_encoder_2))
    sd.update(component_to_sgm("vae", vae))
    return {key: _cast(value, dtype) for key, value in sd.items()}


def model_tensors(
    model: SDXLModel, dtype: torch.dtype | None = None, replace: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """An `SDXLModel`'s single-file state dict; `replace` swaps in tensors by component and parameter
    name (e.g. `{"unet": ema_weights}`) without touching the model."""
    replace = replace or {}
    parts = {}
    for key, module in (
        ("unet", model.unet),
        ("te1", model.text_encoder),
        ("te2", model.text_encoder_2),
        ("vae", model.vae),
    ):
        sd = module.state_dict()
        for name, value in replace.get(key, {}).items():
            if name not in sd:
                raise KeyError(f"{key}: no parameter {name} to replace")
            sd[name] = value
        parts[key] = sd
    return checkpoint_tensors(
        parts["unet"], model.unet.config, parts["te1"], parts["te2"], parts["vae"], dtype
    )


def prediction_markers(
    scheduler_config: Mapping[str, Any], v_parameterization: bool = False
) -> dict[str, Any]:
    """ComfyUI's markers for a v-prediction (`v_pred`) and zero-terminal-SNR (`ztsnr`) model: empty
    tensors whose presence makes loaders sample the checkpoint the way it was trained."""
    import torch

    out = {}
    if v_parameterization or scheduler_config.get("prediction_type") == "v_prediction":
        out["v_pred"] = torch.tensor([])
        if scheduler_config.get("rescale_betas_zero_snr"):
            out["ztsnr"] = torch.tensor([])
    return out


def cast_weight_files(folder: Path, dtype: torch.dtype) -> None:
    """Cast every floating tensor in the `*.safetensors` files under `folder` to `dtype`, file by file
    (metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
        tensors = load_file(str(path))
        if all(not t.is_floating_point() or t.dtype == dtype for t in tensors.values()):
            continue
        save_file({k: _cast(v, dtype) for k, v in tensors.items()}, str(path), metadata=meta)


def write_diffusers(folder: Path, model: SDXLModel, dtype: torch.dtype | None = None) -> Path:
    """Save `model` as a diffusers StableDiffusionXLPipeline folder (atomically), weights in `dtype`."""

    def write(tmp: Path) -> None:
        model.pipeline().save_pretrained(tmp, safe_serialization=True)
        if dtype is not None:
            cast_weight_files(tmp, dtype)

    atomic_write_dir(Path(folder), write)
    return Path(folder)


def tensor_digest(t: torch.Tensor, chunk: int = 1 << 22) -> tuple[int, int, int]:
    """An exact, device- and order-independent digest of a tensor's values: the float64 bit patterns
    summed (and their halves squared and summed) with wrap-around int64 arithmetic, chunk by chunk."""
    import torch

    flat = t.detach().reshape(-1)
    s1 = s2 = s3 = 0
    for i in range(0, flat.numel(), chunk):
        bits = flat[i : i + chunk].double().view(torch.int64)
        hi, lo = bits >> 32, bits & 0xFFFFFFFF
        s1 += int(bits.sum())
        s2 += int((hi * hi).sum())
        s3 += int((lo * lo).sum())
    return s1 % 2**64, s2 % 2**64, s3 % 2**64


Fingerprint = dict[str, tuple[int, int, int, tuple[int, ...]]]  # name -> (tensor_digest, shape)


def fingerprint(modules: Mapping[str, Any], skip: AbstractSet[int] = frozenset()) -> Fingerprint:
    """`tensor_digest` and shape of every floating parameter and buffer of `modules` ({prefix: module})
    except those whose id is in `skip`; equal fingerprints mean unchanged weights."""
    import torch

    out: Fingerprint = {}
    with torch.no_grad():
        for prefix, module in modules.items():
            for name, t in [*module.named_parameters(), *module.named_buffers()]:
                if id(t) not in skip and t.is_floating_point():
                    out[f"{prefix}.{name}"] = (*tensor_digest(t), tuple(t.shape))
    return out


def verify_checkpoint(tensors: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Problems in a reloaded single-file checkpoint: missing/extra keys, shapes, non-finite values."""
    import torch

    if not tensors:
        return ["the file has no tensors"]
    problems = key_problems(tensors, expected)
    for prefix in (
        "model.diffusion_model.",
        "conditioner.embedders.0.",
        "conditioner.embedders.1.",
        "first_stage_model.",
    ):
        if not any(k.startswith(prefix) for k in tensors):
            problems.append(f"no {prefix}* tensors: loaders will not recognise the file as SDXL")
    bad = [k for k, shape in expected.items() if k in tensors and tuple(tensors[k].shape) != tuple(shape)]
    if bad:
        problems.append(f"{len(bad)} tensors have the wrong shape (e.g. {bad[0]})")
    nonfinite = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if nonfinite:
        problems.append(f"{len(nonfinite)} tensors have NaN or infinite values (e.g. {nonfinite[0]})")
    return problems
