"""Measure a training step's activation memory on fake tensors: nothing is allocated.

The model is built on the meta device from its configs (`sdprep.train.models.fullsize.SdxlSpec`), set up as
a method sets it up (frozen parts in the weight dtype, LoRA layers injected with
`sdprep.train.methods.lora`, trainable weights in fp32 or half), turned into fake CPU tensors and
run through sdprep's own step code (`sdprep.train.loop.step.batch_loss`, `sdprep.train.data.text.encode_tokens`)
under torch's FakeTensorMode with autocast and gradient checkpointing as in training, while
`sdprep.train.memory.memtrack.LiveBytes` counts the storages that are alive. What comes out are bytes of
activations and temporaries (gradients and weights are counted apart, by `sdprep.train.memory.planner`):

- `trace_unet`: the peak of the U-Net's forward + backward (with the loss), cached conditioning;
- `trace_text_encoders`: what trained text encoders keep for their backward, and their peak;
  or, frozen, the peak of encoding a caption batch;
- `trace_vae_encode`: the peak of encoding a batch of images (no gradient).

The full-size SDXL takes tens of seconds per trace on a CPU, so its results are measured once and
stored (`sdprep.train.memory.profile`); the tiny and topology-true models are traced on demand.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from sdprep.train.data.pipeline import Batch
    from sdprep.train.models.fullsize import SdxlSpec
    from sdprep.train.models.load import SDXLModel

UNET_MODES = ("frozen", "lora", "lora_conv", "full")  # which U-Net weights train (frozen: TI)
TE_MODES = ("frozen", "lora", "full", "ti")  # frozen: encoded without gradient each step


@dataclass(frozen=True)
class UnetTrace:
    peak: int  # activations + temporaries at their peak during forward + backward (bytes)
    grads_at_peak: int  # gradients already stored at that moment
    tail: int  # activations still alive when the backward pass has stored every gradient
    grads: int  # gradients alive at the end of backward
    ops: int


@dataclass(frozen=True)
class TextTrace:
    kept: int  # what stays alive from the encoders' forward until the U-Net's backward is done
    peak: int  # the peak while encoding (frozen) or during the encoders' backward (trained)
    ops: int


def _fake_mode() -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def fakeify(module: Any, mode: Any) -> None:
    """Replace every parameter and buffer of a (meta) module by a fake CPU tensor of the same shape,
    dtype and requires_grad."""
    import torch

    with mode:
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    fake = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype)
                    sub._parameters[name] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
            for name, b in list(sub._buffers.items()):
                if b is not None:
                    sub._buffers[name] = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype)


def _meta(build: Any, *args: Any) -> Any:
    import torch

    from sdprep.train.models.load import quiet_libraries

    quiet_libraries()
    with torch.device("meta"):
        return build(*args)


def _autocast(half: bool) -> Any:
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if half else contextlib.nullcontext()


def _dtypes(half: bool, half_trained: bool) -> tuple[Any, Any]:
    """(dtype of frozen weights, dtype of trained weights)."""
    import torch

    frozen = torch.bfloat16 if half else torch.float32
    return frozen, (torch.bfloat16 if half and half_trained else torch.float32)


def _add_lora(
    module: Any, blocks: tuple[str, ...], conv_blocks: tuple[str, ...], rank: int, conv_rank: int | None
) -> None:
    """LoRA as `sdprep.train.methods.lora` injects it (same targets, same PEFT call)."""
    from peft import LoraConfig

    from sdprep.train.methods.lora import _re_escape, inject_lora, target_modules

    targets = target_modules(module, blocks, conv_blocks)
    convs = [n for n, kind in targets.items() if kind == "conv"]
    pattern = {f"^{_re_escape(n)}$": conv_rank for n in convs}
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(targets),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
    )
    inject_lora(module, config)


def _set_trainable(
    module: Any, mode: str, frozen: Any, trained: Any, rank: int, conv_rank: int | None
) -> None:
    from sdprep.train.methods.lora import TE_BLOCKS, UNET_BLOCKS, UNET_CONV_BLOCKS

    module.requires_grad_(False)
    module.to(dtype=frozen)
    if mode in ("lora", "lora_conv"):
        is_unet = hasattr(module, "down_blocks")
        blocks = UNET_BLOCKS if is_unet else TE_BLOCKS
        conv = UNET_CONV_BLOCKS if mode == "lora_conv" else ()
        _add_lora(module, blocks, conv, rank, conv_rank or rank)
    elif mode == "full":
        module.requires_grad_(True)
    for p in module.parameters():
        if p.requires_grad:
            p.data = p.data.to(trained)


def trace_unet(
    spec: SdxlSpec,
    *,
    mode: str = "lora",
    half: bool = True,
    gc: bool = True,
    rank: int = 32,
    conv_rank: int | None = None,
    half_trained: bool = False,
    batch: int = 1,
    height: int = 1024,
    width: int = 1024,
    chunks: int = 1,
    prediction: str = "epsilon",
) -> UnetTrace:
    """One U-Net training step's activation peak, run through `sdprep.train.loop.step.batch_loss` with
    cached latents and text-encoder outputs (the conditioning needs a gradient in mode "frozen",
    which is textual inversion's case)."""
    import types

    import torch
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler  # not diffusers.X (a placeholder to mypy)

    from sdprep.train.config.schema import TrainConfig
    from sdprep.train.loop.step import StepContext, batch_loss
    from sdprep.train.memory.memtrack import LiveBytes
    from sdprep.train.models.fullsize import SCHEDULER, build_unet

    if mode not in UNET_MODES:
        raise ValueError(f"unknown U-Net mode {mode!r}; valid: {', '.join(UNET_MODES)}")
    frozen, trained = _dtypes(half, half_trained)
    unet = _meta(build_unet, spec.unet)
    _set_trainable(unet, mode, frozen, trained, rank, conv_rank)
    if gc:
        unet.enable_gradient_checkpointing()
    fake = _fake_mode()
    fakeify(unet, fake)
    live = LiveBytes()
    live.add_module(unet)
    live.watch_grads(unet.parameters())
    static = live.now
    cfg = TrainConfig(train_batch_size=batch)
    latent_h, latent_w = height // 8, width // 8
    context = spec.unet["cross_attention_dim"]
    pooled_dim = spec.te2["projection_dim"]
    ctx = StepContext(
        cfg=cfg,
        # a stand-in: with latents given, batch_loss reads only the VAE's scaling factor
        model=cast(
            "SDXLModel", types.SimpleNamespace(vae=types.SimpleNamespace(config={"scaling_factor": 0.13}))
        ),
        unet=unet,
        noise_scheduler=DDPMScheduler.from_config({**SCHEDULER, "prediction_type": prediction}),
        device=torch.device("cpu"),
        weight_dtype=frozen,
        vae_dtype=frozen,
        train_text=mode == "frozen",
        prediction_type=prediction,
        generator=torch.Generator().manual_seed(0),
    )
    unet.train()
    with fake, live:
        embeds = torch.zeros(batch, 77 * chunks - 2 * (chunks - 1), context, requires_grad=mode == "frozen")
        batch_dict = {
            "latents": torch.zeros(batch, spec.unet.get("in_channels", 4), latent_h, latent_w),
            "prompt_embeds": embeds,
            "pooled_prompt_embeds": torch.zeros(batch, pooled_dim),
            "time_ids": torch.zeros(batch, 6),
            "loss_weight": torch.ones(batch),
        }
        live.reset_peak()
        with _autocast(half):
            loss = batch_loss(ctx, cast("Batch", batch_dict))  # the keys it reads with latents and embeds
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
        tail = live.now - live.grad_bytes - static
    return UnetTrace(live.peak_without_grads - static, live.grads_at_peak, tail, live.grad_bytes, live.ops)


def trace_text_encoders(
    spec: SdxlSpec,
    *,
    mode: str = "frozen",
    half: bool = True,
    gc: bool = False,
    rank: int = 32,
    half_trained: bool = False,
    batch: int = 1,
    chunks: int = 1,
) -> TextTrace:
    """Both text encoders' activation memory for one caption batch, through
    `sdprep.train.data.text.encode_tokens` (mode "ti": only new token vectors train, as textual inversion)."""
    import torch

    from sdprep.train.data.text import encode_tokens
    from sdprep.train.memory.memtrack import LiveBytes
    from sdprep.train.models.fullsize import build_text_encoders

    if mode not in TE_MODES:
        raise ValueError(f"unknown text-encoder mode {mode!r}; valid: {', '.join(TE_MODES)}")
    frozen, trained = _dtypes(half, half_trained)
    te1, te2 = _meta(build_text_encoders, spec)
    fake = _fake_mode()
    for te in (te1, te2):
        _set_trainable(te, {"lora": "lora", "full": "full"}.get(mode, "frozen"), frozen, trained, rank, None)
        if mode == "ti":
            _add_token_vectors(te, trained)
        if gc and mode != "frozen":
            from sdprep.train.loop.trainer import _checkpoint_text_encoder

            _checkpoint_text_encoder(te)
        fakeify(te, fake)
    live = LiveBytes()
    for te in (te1, te2):
        live.add_module(te)
        live.watch_grads(te.parameters())
        te.train(mode != "frozen")
    static = live.now
    eos = spec.te2.get("eos_token_id", spec.te2["vocab_size"] - 1)
    grad = contextlib.nullcontext() if mode != "frozen" else torch.no_grad()
    with fake, live:
        ids = torch.zeros(batch, chunks, 77, dtype=torch.long)
        live.reset_peak()
        with grad, _autocast(half):
            embeds, pooled = encode_tokens(ids, ids, (te1, te2), eos_token_id=eos)
        kept = live.now - static
        if mode != "frozen":
            (embeds.float().sum() + pooled.float().sum()).backward()  # type: ignore[no-untyped-call]  # as above
    return TextTrace(kept, live.peak_without_grads - static, live.ops)


def _add_token_vectors(te: Any, dtype: Any) -> None:
    """Textual inversion's trainable rows, as `sdprep.train.methods.ti` adds them."""
    import torch

    from sdprep.train.methods.ti import TokenVectors

    embeddings = te.get_input_embeddings()
    layer = TokenVectors(embeddings, embeddings.num_embeddings - 2, torch.zeros(2, embeddings.embedding_dim))
    layer.vectors.data = layer.vectors.data.to(dtype)
    te.set_input_embeddings(layer)


def trace_vae_encode(
    spec: SdxlSpec, *, half: bool = False, batch: int = 1, height: int = 1024, width: int = 1024
) -> int:
    """The activation peak of encoding a batch of images with the VAE (no gradient), in bytes."""
    import torch

    from sdprep.train.memory.memtrack import LiveBytes
    from sdprep.train.models.fullsize import build_vae

    vae = _meta(build_vae, spec.vae)
    vae.requires_grad_(False)
    vae.to(dtype=torch.bfloat16 if half else torch.float32)
    fake = _fake_mode()
    fakeify(vae, fake)
    live = LiveBytes()
    live.add_module(vae)
    static = live.now
    with fake, live, torch.no_grad():
        pixels = torch.zeros(batch, 3, height, width, dtype=torch.bfloat16 if half else torch.float32)
        live.reset_peak()
        vae.encode(pixels).latent_dist.sample()
    return live.peak - static
