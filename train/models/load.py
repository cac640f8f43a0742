"""Loading an SDXL model for training: a diffusers folder, a single-file checkpoint or a hub id.

Everything loads offline when the files are local: a standard SDXL single file (base, Pony,
Illustrious, ...) is configured by the SDXL base config sdprep ships (`sdxl_config`), another
architecture by `model_config`. Weights are read with safetensors or
`torch.load(weights_only=True)` only (diffusers does the latter for `.ckpt`/`.bin`). Tokenizers are
checked after loading, because transformers 5 silently returns a 2-3 token tokenizer for a folder
without vocabulary files, which would train every caption as "end of text".
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdprep.errors import ModelError

if TYPE_CHECKING:
    import torch

    # the modules themselves: mypy reads `diffusers.X` as the no-torch placeholder classes
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerBase

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
MIN_VOCAB = 256  # a byte-level BPE has at least 256 symbols; broken loads give 2-3
HUB_SDXL = "stabilityai/stable-diffusion-xl-base-1.0"


@dataclass
class SDXLModel:
    """The SDXL components the trainer works with, plus where they came from."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: PreTrainedTokenizerBase
    tokenizer_2: PreTrainedTokenizerBase
    scheduler_config: dict[str, Any]  # the noise scheduler's diffusers config (JSON values)
    source: str
    is_tiny: bool = False
    notes: list[str] = field(default_factory=list)  # what loading found (v-prediction markers...)

    @property
    def tokenizers(self) -> tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase]:
        return self.tokenizer, self.tokenizer_2

    @property
    def text_encoders(self) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
        return self.text_encoder, self.text_encoder_2

    def freeze(self, dtype: torch.dtype) -> None:
        """No weight of the four networks trains, each stored in `dtype` (a training method then
        unfreezes what it trains). As `nn.Module`s: diffusers' own `.to` is `@wraps(nn.Module.to)`,
        whose signature mypy misreads."""
        networks: tuple[torch.nn.Module, ...] = (self.unet, self.vae, self.text_encoder, self.text_encoder_2)
        for module in networks:
            module.requires_grad_(False)
            module.to(dtype=dtype)

    def pipeline(self, scheduler: Any = None, unet: Any = None) -> Any:
        """A StableDiffusionXLPipeline sharing these modules (no copies), e.g. for samples. (Any: the
        pipeline's annotations are narrower than what it takes, e.g. the scheduler as an enum.)"""
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            unet=unet if unet is not None else self.unet,
            scheduler=scheduler or EulerDiscreteScheduler.from_config(self.scheduler_config),
        )


def quiet_libraries() -> None:
    """Silence diffusers/transformers loading bars and info logs (sdprep shows its own progress)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, name: str, source: str) -> None:
    """Fail when a tokenizer is missing its vocabulary (transformers 5 returns a near-empty one)."""
    size = len(tokenizer)
    if size < MIN_VOCAB:
        raise ModelError(
            f"{source}: {name} has only {size} tokens: its vocabulary files are missing",
            f"the {name}/ folder needs vocab.json and merges.txt (or tokenizer.json); copy them from "
            f"{HUB_SDXL} or pass --model_config DIR with a complete diffusers SDXL folder",
        )


def _check_sdxl(pipe: StableDiffusionXLPipeline, source: str) -> None:
    unet_cfg = pipe.unet.config
    if getattr(pipe, "text_encoder_2", None) is None or unet_cfg.get("addition_embed_type") != "text_time":
        raise ModelError(
            f"{source} is not an SDXL model (no second text encoder / size conditioning)",
            "sdprep trains SDXL and SDXL fine-tunes (Pony, Illustrious, ...); SD 1.x/2.x are not supported",
        )


PICKLE_HINT = (
    "use a .safetensors version of the model; if you trust where the file came from, set "
    "trust_pickle = true (or --set trust_pickle=true)"
)


def _refused_pickle(source: str, error: BaseException) -> ModelError | None:
    """The clear error for a checkpoint `torch.load(weights_only=True)` refused, else None."""
    import pickle

    seen = 0
    exc: BaseException | None = error
    while exc is not None and seen < 10:
        if isinstance(exc, pickle.UnpicklingError):
            return ModelError(
                f"{source}: the file holds pickled Python objects, not only weights; sdprep refuses to "
                "unpickle it because that can run code from the file",
                PICKLE_HINT,
            )
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _unpickled_copy(path: Path, folder: str) -> Path:
    """trust_pickle: load a pickled checkpoint in full and write its tensors as a .safetensors file."""
    import torch
    from safetensors.torch import save_file

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)  # trusted by the user
    except Exception as exc:  # noqa: BLE001 - unpickling raises anything the file's code raises
        raise ModelError(f"{path}: cannot read the checkpoint ({exc})") from exc
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    tensors = (
        {k: v.contiguous() for k, v in obj.items() if torch.is_tensor(v)} if isinstance(obj, dict) else {}
    )
    if not tensors:
        raise ModelError(f"{path}: no tensors found in the checkpoint")
    copy = Path(folder) / (path.stem + ".safetensors")
    save_file(tensors, str(copy))
    return copy


def _wrap_load(source: str, exc: Exception, single_file: bool, shipped: bool = False) -> ModelError:
    refused = _refused_pickle(source, exc)
    if refused is not None:
        return refused
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if shipped:
        return ModelError(
            f"cannot load the single-file checkpoint {source} with the standard SDXL configuration: {text}",
            "sdprep reads standard SDXL single files (SDXL base, Pony, Illustrious, ...) by itself; a file "
            "with another architecture needs --model_config DIR (or model_config = DIR in the config): a "
            "local diffusers folder whose configs match the file",
        )
    if single_file:
        return ModelError(
            f"cannot load the single-file checkpoint {source}: {text}",
            "diffusers needs the SDXL config (model_index.json, */config.json, tokenizers) to build a "
            "single file; offline, pass --model_config DIR (or model_config = DIR in the config) pointing at a local diffusers SDXL folder "
            f"(e.g. a copy of {HUB_SDXL} without its weights)",
        )
    return ModelError(
        f"cannot load the model {source}: {text}",
        "pass a local diffusers folder or .safetensors file; a hub id needs the network "
        "(or a copy in the Hugging Face cache)",
    )


class MissingVaeError(ModelError):
    """A single-file checkpoint without VAE weights (fixable with a separate `vae`)."""


def _missing_component(source: str, exc: Exception) -> ModelError:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "AutoencoderKL" in text:
        return MissingVaeError(
            f"{source} has no VAE weights (first_stage_model.*)",
            "set vae = <an SDXL VAE .safetensors, e.g. sdxl_vae.safetensors> (or --set vae=...)",
        )
    return ModelError(
        f"{source} is not a complete SDXL checkpoint: {text}",
        "an SDXL single file holds the U-Net, both text encoders and the VAE; pass a full checkpoint",
    )


def check_complete(pipe: StableDiffusionXLPipeline, source: str) -> None:
    """Fail when a component was built with weights missing from the file (left on the meta device)."""
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        missing = [n for n, p in [*module.named_parameters(), *module.named_buffers()] if p.is_meta]
        if missing:
            raise ModelError(
                f"{source}: {name} is missing {len(missing)} weights (e.g. {missing[0]})",
                "the checkpoint is incomplete or not an SDXL model; pass a complete SDXL checkpoint",
            )


def file_markers(path: Path) -> dict[str, bool]:
    """ComfyUI-style markers in a single file: `v_pred` (v-prediction), `ztsnr` (zero terminal SNR)."""
    if path.suffix.lower() not in (".safetensors", ".sft"):
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
    return {"v_pred": "v_pred" in keys, "ztsnr": "ztsnr" in keys}


def _reference_vae(model_config: Path | None, exc: MissingVaeError) -> Any:
    """An AutoencoderKL with the model's VAE config (to read a separate VAE file against)."""
    from diffusers.models.autoencoders.autoencoder_kl import (
        AutoencoderKL,
    )  # not diffusers.X (a placeholder to mypy)

    from sdprep.train.models.sdxl_config import BASE_DIR

    folder = model_config if model_config is not None else BASE_DIR  # no model_config: standard SDXL
    if not (folder / "vae" / "config.json").exists():
        raise exc
    return AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))


def _f32() -> torch.dtype:
    import torch

    return torch.float32


def to_float32(*modules: Any) -> None:
    """Cast every floating-point weight of the modules to float32 (a loader may keep a file's fp16)."""
    import torch

    for module in modules:
        if any(t.is_floating_point() and t.dtype != torch.float32 for t in module.state_dict().values()):
            module.to(torch.float32)


def _load_single_file(
    path: Path, model_config: Path | None, vae: AutoencoderKL | None, trust_pickle: bool
) -> Any:
    """An A1111/ComfyUI single file, configured by `model_config` or else by SDXL's shipped base config."""
    from sdprep.train.models.sdxl_config import base_config

    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelError(f"{path}: not a model file", "pass a .safetensors checkpoint or a diffusers folder")
    if model_config is not None:
        if not (Path(model_config) / "model_index.json").exists():
            raise ModelError(
                f"--model_config {model_config} is not a diffusers SDXL folder (no model_index.json)"
            )
        return _from_single_file(path, model_config, vae, trust_pickle, shipped=False)
    with base_config() as shipped:
        return _from_single_file(path, shipped, vae, trust_pickle, shipped=True)


def _from_single_file(
    path: Path, config: Path, vae: AutoencoderKL | None, trust_pickle: bool, shipped: bool
) -> Any:
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    kwargs: dict[str, Any] = {"local_files_only": True, "torch_dtype": _f32(), "config": str(config)}
    if vae is not None:
        kwargs["vae"] = vae
    try:
        if trust_pickle and path.suffix.lower() not in (".safetensors", ".sft"):
            with tempfile.TemporaryDirectory(prefix="sdprep-ckpt-") as tmp:
                copy = _unpickled_copy(path, tmp)
                return StableDiffusionXLPipeline.from_single_file(str(copy), **kwargs)
        return StableDiffusionXLPipeline.from_single_file(str(path), **kwargs)
    except SingleFileComponentError as exc:
        raise _missing_component(str(path), exc) from exc
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise _wrap_load(str(path), exc, True, shipped=shipped) from exc


def _load_pipeline(
    source: str, model_config: Path | None, vae: AutoencoderKL | None = None, trust_pickle: bool = False
) -> tuple[StableDiffusionXLPipeline, bool]:
    """Load a StableDiffusionXLPipeline from any supported source; returns (pipe, is_single_file)."""
    from diffusers import StableDiffusionXLPipeline

    path = Path(os.path.expanduser(source))
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelError(
                f"{path} is not a diffusers model folder (no model_index.json)",
                "pass the folder that holds unet/, vae/, text_encoder/... or a .safetensors checkpoint",
            )
        try:
            pipe = StableDiffusionXLPipeline.from_pretrained(path, local_files_only=True, torch_dtype=_f32())
            return pipe, False
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise _wrap_load(str(path), exc, False) from exc
    if path.is_file():
        return _load_single_file(path, model_config, vae, trust_pickle), True
    looks_local = source.startswith((".", "/", "~")) or path.suffix.lower() in SINGLE_FILE_SUFFIXES
    if looks_local or source.count("/") != 1:
        raise ModelError(f"{source}: no such file or folder", "check pretrained_model_name_or_path")
    try:
        return StableDiffusionXLPipeline.from_pretrained(source, torch_dtype=_f32()), False
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise _wrap_load(source, exc, False) from exc


def load_vae(vae: str | Path, reference: AutoencoderKL, base: str) -> AutoencoderKL:
    """Load a separate VAE (diffusers folder or single file), configured like `reference` when needed."""
    from diffusers.models.autoencoders.autoencoder_kl import (
        AutoencoderKL,
    )  # not diffusers.X (a placeholder to mypy)

    path = Path(os.path.expanduser(str(vae)))
    try:
        if path.is_dir():
            sub = "vae" if (path / "vae" / "config.json").exists() else None
            loaded: AutoencoderKL = AutoencoderKL.from_pretrained(path, subfolder=sub, local_files_only=True)
            return loaded
        if not path.is_file():
            raise ModelError(f"vae {path}: no such file or folder", "check the `vae` setting")
        with tempfile.TemporaryDirectory(prefix="sdprep-vae-") as tmp:
            reference.save_config(tmp)
            single: AutoencoderKL = AutoencoderKL.from_single_file(
                str(path), config=tmp, local_files_only=True
            )
            return single
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        refused = _refused_pickle(f"vae {path}", exc)
        if refused is not None:
            raise refused from exc
        raise ModelError(
            f"cannot load the VAE {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}",
            f"pass an SDXL VAE (diffusers folder or .safetensors) matching the model {base}",
        ) from exc


def load_sdxl(
    source: str | Path,
    *,
    vae: str | Path | None = None,
    model_config: str | Path | None = None,
    trust_pickle: bool = False,
) -> SDXLModel:
    """Load an SDXL model (diffusers folder, single file or hub id) with an optional separate VAE.

    All four modules come back in float32 whatever the files store (fp16/bf16 checkpoints included);
    the trainer casts the frozen parts for mixed precision.
    A .ckpt/.pt/.bin that needs full unpickling is refused unless `trust_pickle` (it can run code).
    """
    from sdprep.train.models.tiny import is_tiny_model

    quiet_libraries()
    source = str(source)
    model_config = Path(os.path.expanduser(str(model_config))) if model_config else None
    try:
        pipe, single = _load_pipeline(source, model_config, trust_pickle=trust_pickle)
        vae_module = load_vae(vae, pipe.vae, source) if vae else pipe.vae
    except MissingVaeError as exc:
        if not vae:
            raise
        vae_module = load_vae(vae, _reference_vae(model_config, exc), source)
        pipe, single = _load_pipeline(source, model_config, vae=vae_module, trust_pickle=trust_pickle)
    _check_sdxl(pipe, source)
    check_complete(pipe, source)
    to_float32(pipe.unet, vae_module, pipe.text_encoder, pipe.text_encoder_2)
    check_tokenizer(pipe.tokenizer, "tokenizer", source)
    check_tokenizer(pipe.tokenizer_2, "tokenizer_2", source)
    scheduler_config = dict(pipe.scheduler.config)
    notes = []
    markers = file_markers(Path(os.path.expanduser(source))) if single else {}
    if markers.get("v_pred"):
        scheduler_config["prediction_type"] = "v_prediction"
        notes.append(f"{Path(source).name} is marked v-prediction (v_pred key): training predicts v")
        if markers.get("ztsnr"):
            scheduler_config["rescale_betas_zero_snr"] = True
            notes.append("it is also marked zero terminal SNR (ztsnr key): the noise schedule is rescaled")
    return SDXLModel(
        unet=pipe.unet,
        vae=vae_module,
        text_encoder=pipe.text_encoder,
        text_encoder_2=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer,
        tokenizer_2=pipe.tokenizer_2,
        scheduler_config=scheduler_config,
        source=source,
        is_tiny=Path(source).is_dir() and is_tiny_model(source),
        notes=notes,
    )
