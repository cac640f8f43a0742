"""`sdprep train --plan`: the peak accelerator memory a config needs on SDXL, before anything runs.

Nothing is allocated. The prediction is a sum of parts, each a pure function of the settings:

- weights of what sits on the accelerator: the U-Net always; the text encoders unless their
  outputs are cached (sdprep moves cached encoders and the VAE of cached latents to the CPU);
  trainable weights (LoRA layers, token vectors, the fine-tuned model) in fp32 or half;
- gradients (one per trainable weight; with a fused backward pass only the largest is alive);
- optimizer state per optimizer (AdamW 2 x 4 bytes per weight, 8-bit AdamW about 2 bytes,
  Adafactor factored...), an EMA copy, and the optimizer step's temporaries (torch's foreach
  AdamW on CUDA holds one more copy of a parameter group);
- activations, measured on fake tensors by running sdprep's own step code on the model's
  architecture (`sdprep.train.memory.trace`; for the full-size SDXL the measurements are stored in
  `sdprep.train.memory.profile`) and fitted as a + b x (batch x area) through measurements at two
  sizes (scaled by batch x area where one size was measured: the plan then says so).

The peak is weights + optimizer state + the largest of the step's phases (encoding images and
captions; forward + backward with gradients; the optimizer step). What torch's allocator and CUDA
add on top (fragmentation, cuBLAS / cuDNN workspaces, the CUDA context) is not in these tensors:
the plan adds a stated margin for it. Then it looks for the nearest settings that fit 8, 12, 16 and
24 GB cards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdprep.train.config.schema import TrainConfig
    from sdprep.train.memory.profile import Profile, Stats

GIB = 1 << 30
BUDGETS_GB = (8, 12, 16, 24)  # cards sold as N GB have N GiB
MARGIN_FIXED = int(0.75 * GIB)  # CUDA context, cuBLAS/cuDNN workspaces
MARGIN_FRACTION = 0.08  # caching-allocator fragmentation


@dataclass(frozen=True)
class Settings:
    """What a training step's memory depends on, read from a config (`settings_from_config`)."""

    method: str = "lora"  # lora / ti / finetune
    unet: str = "lora"  # U-Net: frozen (TI) / lora / lora_conv / full
    text: str = "cached"  # text encoders: cached / frozen / lora / full / ti
    latents_cached: bool = True
    half: bool = True  # mixed precision (fp16 / bf16): frozen weights and activations in 2 bytes
    half_trained: bool = False  # full_bf16 / full_fp16: trained weights and gradients in 2 bytes
    no_half_vae: bool = False  # the VAE stays in fp32 under mixed precision (see `vae_half`)
    gc: bool = True
    batch: int = 1
    width: int = 1024
    height: int = 1024
    chunks: int = 1  # 75-token chunks per caption (max_token_length 75 / 150 / 225)
    rank: int = 32
    conv_rank: int | None = None
    vectors: int = 1  # textual inversion: vectors per token
    optimizer: str = "AdamW"
    adafactor_momentum: bool = False  # Adafactor with beta1 (keeps exp_avg)
    ema: bool = False
    fused_backward: bool = False
    device: str = "cuda"  # cuda: the accelerator; cpu: a CPU run (everything resident, no foreach)
    captions_fixed: bool = True  # no shuffling / dropout / wildcards: text-encoder outputs can be cached
    latents_cacheable: bool = True  # no color_aug / random_crop

    @property
    def trains_text(self) -> bool:
        return self.text in ("lora", "full", "ti")

    @property
    def vae_half(self) -> bool:
        """The VAE in half precision: mixed precision without no_half_vae (which a suggested
        mixed_precision change leaves in the user's config)."""
        return self.half and not self.no_half_vae


def settings_from_config(cfg: TrainConfig, method: str, device: str = "cuda") -> Settings:
    """The memory-relevant settings of a `TrainConfig` for `method` (lora / ti / finetune)."""
    from sdprep.train.config.kohya import parse_kv_args

    conv = None
    if method == "lora":
        # conv_dim as networks.lora and LyCORIS both name it (networks.lora's own parser refuses
        # LyCORIS's algo= / preset=, so it is not the one to read a LyCORIS config with)
        args = parse_kv_args(cfg.network_args or [])
        conv = cfg.conv_dim if cfg.conv_dim is not None else args.get("conv_dim")
        conv = int(conv) if conv else None
        unet = "lora_conv" if conv else "lora"
        text = "lora" if not cfg.network_train_unet_only else None
    elif method == "ti":
        unet, text = "frozen", "ti"
    else:
        unet, text = "full", ("full" if cfg.train_text_encoder else None)
    if text is None:
        cached = cfg.cache_text_encoder_outputs or cfg.cache_text_encoder_outputs_to_disk
        text = "cached" if cached else "frozen"
    mixed = cfg.mixed_precision
    if device == "cpu" and mixed == "fp16":
        mixed = "no"  # sdprep trains fp16 configs in fp32 on a CPU
    half = mixed in ("fp16", "bf16")
    w, h = cfg.resolution
    args = {}
    if cfg.optimizer_args:
        args = parse_kv_args(cfg.optimizer_args)
    return Settings(
        method=method,
        unet=unet,
        text=text,
        latents_cached=bool(cfg.cache_latents or cfg.cache_latents_to_disk),
        half=half,
        half_trained=half and bool(cfg.full_bf16 or cfg.full_fp16),
        no_half_vae=bool(cfg.no_half_vae),
        gc=bool(cfg.gradient_checkpointing),
        batch=int(cfg.train_batch_size),
        width=int(w),
        height=int(h),
        chunks=int(cfg.token_chunks),
        rank=int(cfg.network_dim or 4),
        conv_rank=conv,
        vectors=int(cfg.num_vectors_per_token),
        optimizer=str(cfg.optimizer_type or "AdamW"),
        adafactor_momentum=args.get("beta1") not in (None, "None", "none"),
        ema=bool(cfg.ema),
        fused_backward=bool(cfg.fused_backward_pass),
        device=device,
        captions_fixed=not (
            cfg.shuffle_caption
            or cfg.caption_dropout_rate
            or cfg.caption_tag_dropout_rate
            or cfg.caption_dropout_every_n_epochs
            or cfg.enable_wildcard
            or method == "ti"
        ),
        latents_cacheable=not (cfg.color_aug or cfg.random_crop),
    )


# -- optimizer maths -----------------------------------------------------------------------


def _optimizer_family(name: str) -> str:
    key = name.strip().lower().rsplit(".", 1)[-1]
    if key in (
        "adamw8bit",
        "pagedadamw8bit",
        "adam8bit",
        "pagedadam8bit",
        "ademamix8bit",
        "pagedademamix8bit",
    ):
        return "adam8bit"
    if key in ("lion8bit", "pagedlion8bit", "sgdnesterov8bit", "sgd8bit"):
        return "one8bit"
    if key in ("lion", "sgdnesterov", "sgd", "came"):
        return "one"
    if key == "adafactor":
        return "adafactor"
    if key in ("prodigy", "dadaptation", "dadaptadam", "dadaptadampreprint", "dadaptadan", "dadaptadanip"):
        return "three"
    return "adam"  # AdamW, Adam, schedule-free, D-Adapt Lion/SGD/AdaGrad and anything unknown: two moments


def optimizer_state_bytes(
    family: str, params: int, param_bytes: int, adafactor_elements: int, momentum: bool = False
) -> int:
    """Bytes of optimizer state for `params` trainable weights of `param_bytes` each.

    adam: two moments in the weights' dtype; adam8bit: two 8-bit moments plus a float scale per
    256-value block (bitsandbytes); one / one8bit: one moment (Lion, SGD with momentum, CAME's
    first moment); three: Prodigy / D-Adaptation (about three moments in fp32); adafactor: its
    factored second moment (`adafactor_elements` fp32 values, row and column statistics) and,
    with beta1, a first moment."""
    if family == "adam":
        return 2 * params * param_bytes
    if family == "adam8bit":
        return 2 * params + 2 * 4 * math.ceil(params / 256)
    if family == "one":
        return params * param_bytes
    if family == "one8bit":
        return params + 4 * math.ceil(params / 256)
    if family == "three":
        return 3 * params * 4
    if family == "adafactor":
        return 4 * adafactor_elements + (params * param_bytes if momentum else 0)
    raise ValueError(f"unknown optimizer family {family!r}")


def optimizer_step_bytes(
    family: str, group_bytes: int, largest: int, param_bytes: int, device: str, fused: bool = False
) -> int:
    """Temporaries of one optimizer step. torch's AdamW on CUDA runs its foreach kernels: one more
    copy of the largest parameter group (the square root of the second moment); elsewhere optimizers
    go parameter by parameter: about two copies of the largest parameter (Adafactor in fp32, plus
    fp32 copies of a half parameter and its gradient)."""
    if family == "adam" and device == "cuda" and not fused:
        return group_bytes
    if family == "adafactor":
        return largest * (2 * 4 + (2 * 4 if param_bytes < 4 else 0))
    if family in ("adam8bit", "one8bit"):
        return 0  # fused CUDA kernels update in place
    return 2 * largest * param_bytes


# -- the prediction ------------------------------------------------------------------------


@dataclass
class Plan:
    """The predicted peak and its parts (bytes); `parts` in display order, `phases` the step phases."""

    settings: Settings
    model: str
    parts: list[tuple[str, int, str]] = field(default_factory=list)  # (part, bytes, note)
    static: int = 0  # alive the whole step: weights, optimizer state, EMA
    n_static: int = 0  # parts[:n_static] are those
    phases: dict[str, int] = field(default_factory=dict)  # phase -> bytes on top of `static`
    notes: list[str] = field(default_factory=list)

    @property
    def tensors(self) -> int:
        """Peak bytes of live tensors (what torch.cuda.max_memory_allocated reports)."""
        return self.static + max(self.phases.values(), default=0)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda phase: self.phases[phase]) if self.phases else ""

    @property
    def margin(self) -> int:
        return margin_bytes(self.tensors)

    @property
    def total(self) -> int:
        return self.tensors + self.margin


def margin_bytes(tensors: int) -> int:
    """What the plan adds for allocator overhead and CUDA workspaces: 0.75 GiB + 8 %."""
    return MARGIN_FIXED + int(MARGIN_FRACTION * tensors)


def predict(s: Settings, profile: Profile) -> Plan:
    """Predict the peak memory of settings `s` on the architecture `profile` describes."""
    st = profile.stats
    plan = Plan(s, profile.name)
    trained_b = 2 if s.half_trained else 4
    plan.parts += _resident_weights(s, st)
    trainable, groups, largest = trainable_params(s, st)
    if s.method != "finetune":  # LoRA layers, token vectors (a fine-tune's are the U-Net's weights)
        label = "LoRA weights" if s.method == "lora" else "token vectors"
        plan.parts.append(
            (label, trainable * trained_b, f"{trainable / 1e6:.1f} M, {_dtype_note(trained_b)}")
        )
    family = _optimizer_family(s.optimizer)
    state = optimizer_state_bytes(
        family, trainable, trained_b, adafactor_elements(s, st), s.adafactor_momentum
    )
    plan.parts.append(("optimizer state", state, s.optimizer))
    if s.ema:
        plan.parts.append(("EMA copy", trainable * trained_b, "of the trained weights"))
    plan.static = sum(b for _, b, _ in plan.parts)
    plan.n_static = len(plan.parts)

    grads = (largest if s.fused_backward else trainable) * trained_b
    plan.parts.append(("gradients", grads, "only one alive: fused backward pass" if s.fused_backward else ""))
    unet_act, grads_early, tail = profile.unet_activations(s)
    note = f"forward + backward, checkpointing {'on' if s.gc else 'off'}"
    with contextlib.suppress(KeyError):  # a profile measured for these settings only has no other
        other, _, _ = profile.unet_activations(dataclasses.replace(s, gc=not s.gc))
        note += f" ({'off' if s.gc else 'on'}: {gib(other)} GiB)"
    plan.parts.append(("activations: U-Net", unet_act, note))
    area_only = profile.area_scaled(s)
    if area_only:
        plan.notes.append(
            f"{' and '.join(area_only)} activations for these settings were measured at one image size "
            "only and scaled by batch x area; part of them does not grow with the image, so at a smaller "
            "size they are under-estimated (SDXL at 512 px: by up to 51% for a bf16 LoRA, 73% for a bf16 fine-tune)"
        )
    text_kept, text_peak = profile.text_activations(s) if s.text != "cached" else (0, 0)
    if s.trains_text:
        plan.parts.append(("activations: text encoders", text_kept, "kept for their backward"))
    group_b, largest_b = max(groups, default=0) * trained_b, largest * trained_b
    step_tmp = optimizer_step_bytes(family, group_b, largest_b, trained_b, s.device, s.fused_backward)
    foreach = step_tmp and family == "adam" and s.device == "cuda"
    plan.parts.append(("optimizer step temporaries", step_tmp, "foreach kernels" if foreach else ""))
    encode = 0
    if not s.latents_cached:
        encode = profile.vae_activations(s)
        plan.parts.append(("VAE encoding (no gradient)", encode, "before the forward pass"))
    if s.text == "frozen":
        plan.parts.append(("text encoding (no gradient)", text_peak, "before the forward pass"))
        encode = max(encode, text_peak)

    # gradients fill in while the backward pass frees activations: the peak is either at the
    # activation peak (with the gradients stored by then) or when every gradient is stored
    unet_grads = (largest if s.fused_backward else groups[0]) * trained_b if s.unet != "frozen" else 0
    early = min(grads_early, unet_grads)
    if s.fused_backward:  # each gradient is applied and freed as soon as it is computed
        fb = text_kept + unet_act + early + step_tmp
    else:
        fb = text_kept + max(unet_act + early, tail + unet_grads)
    plan.phases = {"encoding": encode} if encode else {}
    plan.phases["forward + backward"] = fb
    if s.trains_text:
        plan.phases["text-encoder backward"] = grads + text_peak
    if not s.fused_backward:
        plan.phases["optimizer step"] = grads + step_tmp
    return plan


def _resident_weights(s: Settings, st: Stats) -> list[tuple[str, int, str]]:
    """The U-Net's, text encoders' and VAE's weights on the device (cached ones move to the CPU,
    except in a CPU run, which has one memory)."""
    frozen_b, trained_b = (2 if s.half else 4), (2 if s.half_trained else 4)
    keep_all = s.device == "cpu"

    def size(*names: str, nbytes: int) -> int:
        return sum(st["params"][n] * nbytes + st["buffers"][n] for n in names)

    unet_b = trained_b if s.unet == "full" else frozen_b
    parts = [("U-Net weights", size("unet", nbytes=unet_b), _dtype_note(unet_b))]
    te_b = trained_b if s.text == "full" else frozen_b
    if s.text == "cached" and not keep_all:
        parts.append(("text encoders", 0, "outputs cached: moved to the CPU"))
    else:
        parts.append(("text encoders", size("te1", "te2", nbytes=te_b), _dtype_note(te_b)))
    vae_b = 2 if s.vae_half else 4
    if s.latents_cached and not keep_all:
        parts.append(("VAE", 0, "latents cached: moved to the CPU"))
    else:
        parts.append(("VAE", size("vae", nbytes=vae_b), _dtype_note(vae_b)))
    return parts


def _dtype_note(nbytes: int) -> str:
    return "fp32" if nbytes == 4 else "fp16/bf16"


def trainable_params(s: Settings, st: Stats) -> tuple[int, list[int], int]:
    """(trainable weights, weights per optimizer group, largest single weight tensor)."""
    if s.method == "lora":
        lora = st["lora"]
        conv_rank = s.conv_rank or s.rank
        unet = s.rank * lora["unet"]["per_rank"] + (
            conv_rank * lora["unet_conv"]["per_rank"] if s.unet == "lora_conv" else 0
        )
        groups = [unet]
        largest = s.rank * lora["unet"]["largest_per_rank"]
        if s.text == "lora":
            groups += [s.rank * lora["te1"]["per_rank"], s.rank * lora["te2"]["per_rank"]]
            largest = max(largest, s.rank * lora["te2"]["largest_per_rank"])
        return sum(groups), groups, largest
    if s.method == "ti":
        n = s.vectors * (st["hidden"]["te1"] + st["hidden"]["te2"])
        return (
            n,
            [s.vectors * st["hidden"]["te1"], s.vectors * st["hidden"]["te2"]],
            s.vectors * st["hidden"]["te2"],
        )
    groups = [st["params"]["unet"]]
    largest = st["largest"]["unet"]
    if s.text == "full":
        groups += [st["params"]["te1"], st["params"]["te2"]]
        largest = max(largest, st["largest"]["te2"])
    return sum(groups), groups, largest


def adafactor_elements(s: Settings, st: Stats) -> int:
    """fp32 values of Adafactor's factored second moment for what trains."""
    ada: dict[str, int] = st["adafactor"]
    if s.method == "lora":
        lora: dict[str, dict[str, int]] = st["lora"]
        # a LoRA pair [r, in] + [out, r] keeps rows and columns: in + out + 2r values
        comps = (
            ["unet"]
            + (["unet_conv"] if s.unet == "lora_conv" else [])
            + (["te1", "te2"] if s.text == "lora" else [])
        )
        return sum(lora[c]["per_rank"] + 2 * s.rank * lora[c]["modules"] for c in comps)
    if s.method == "ti":
        hidden: dict[str, int] = st["hidden"]
        return s.vectors * (hidden["te1"] + hidden["te2"])
    return ada["unet"] + (ada["te1"] + ada["te2"] if s.text == "full" else 0)


# -- nearest settings that fit -------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One setting change the search may make, with how much it alters training (cost)."""

    key: str  # config key(s) to set, as the user writes them
    cost: int
    apply: Any  # Settings -> Settings | None (None: not applicable)


def _changes(s: Settings) -> list[Change]:
    """The changes worth trying, in the order they are applied (each tests the settings it gets:
    stopping text-encoder training makes caching their outputs possible)."""

    def change(key: str, cost: int, cond: Any, **kw: Any) -> Change:
        return Change(key, cost, lambda t: dataclasses.replace(t, **kw) if cond(t) else None)

    adafactor = 'optimizer_type = "Adafactor" (optimizer_args = ["scale_parameter=False", "relative_step=False", "warmup_init=False"])'
    return [
        change(
            "network_train_unet_only = true",
            4,
            lambda t: t.method == "lora" and t.text == "lora",
            text="frozen",
        ),
        change(
            "train_text_encoder = false",
            4,
            lambda t: t.method == "finetune" and t.text == "full",
            text="frozen",
        ),
        change("gradient_checkpointing = true", 1, lambda t: not t.gc, gc=True),
        change(
            "cache_latents = true",
            1,
            lambda t: not t.latents_cached and t.latents_cacheable,
            latents_cached=True,
        ),
        change(
            "cache_text_encoder_outputs = true",
            1,
            lambda t: t.text == "frozen" and t.captions_fixed,
            text="cached",
        ),
        change('mixed_precision = "bf16"', 2, lambda t: not t.half, half=True),
        change(
            'no_half_vae = false (with mixed_precision = "bf16": the SDXL VAE overflows in fp16)',
            3,
            lambda t: t.half and t.no_half_vae and not t.latents_cached,
            no_half_vae=False,
        ),
        change(
            'optimizer_type = "AdamW8bit"',
            2,
            lambda t: _optimizer_family(t.optimizer) in ("adam", "three"),
            optimizer="AdamW8bit",
        ),
        change(
            adafactor,
            3,
            lambda t: t.optimizer.lower() not in ("adafactor", "adamw8bit"),
            optimizer="Adafactor",
        ),
        change(
            "full_bf16 = true",
            3,
            lambda t: t.method == "finetune" and t.half and not t.half_trained,
            half_trained=True,
        ),
    ]


def _batch_and_resolution(s: Settings) -> list[tuple[Settings, list[str], int]]:
    """Smaller batches (gradient accumulation keeps the effective batch: only divisors of the
    batch, so accumulation x batch is the batch configured) and, last, smaller images."""
    out = []
    batches = [b for b in range(s.batch, 0, -1) if s.batch % b == 0]
    for b in batches:
        keys, cost = [], 0
        if b != s.batch:
            keys.append(f"train_batch_size = {b} (gradient_accumulation_steps x{s.batch // b})")
            cost += 2
        out.append((dataclasses.replace(s, batch=b), keys, cost))
        for side in (896, 768, 640, 512):
            if side * side < s.width * s.height:
                r = dataclasses.replace(s, batch=b, width=side, height=side)
                out.append(
                    (
                        r,
                        [*keys, f'resolution = "{side},{side}" (smaller images: changes the result)'],
                        cost + 8,
                    )
                )
    return out


def fitting_settings(s: Settings, profile: Profile, budget_gb: int) -> tuple[list[str], Plan] | None:
    """The cheapest set of changes (fewest and least intrusive) whose plan fits `budget_gb` GiB;
    ([], plan) when the settings fit as they are, None when nothing tried fits."""
    budget = budget_gb * GIB
    changes = _changes(s)
    best: tuple[int, list[str], Plan] | None = None
    for n in range(len(changes) + 1):
        for combo in itertools.combinations(changes, n):
            t: Settings | None = s
            for c in combo:
                t = c.apply(t)
                if t is None:
                    break
            if t is None:
                continue
            base_cost = sum(c.cost for c in combo)
            if best is not None and base_cost >= best[0]:
                continue
            for variant, keys, cost in _batch_and_resolution(t):
                total = base_cost + cost
                if best is not None and total >= best[0]:
                    continue
                p = predict(variant, profile)
                if p.total <= budget:
                    best = (total, [c.key for c in combo] + keys, p)
    return None if best is None else (best[1], best[2])


# -- the report ----------------------------------------------------------------------------


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def describe(s: Settings) -> str:
    what = {"lora": "LoRA", "ti": "textual inversion", "finetune": "full fine-tune"}[s.method]
    prec = "mixed precision (2-byte weights and activations)" if s.half else "fp32"
    if s.half_trained:
        prec += ", full_bf16/fp16"
    return (
        f"{what}, {s.width}x{s.height} (largest bucket area), batch {s.batch}, {prec}, "
        f"gradient checkpointing {'on' if s.gc else 'off'}, latents {'cached' if s.latents_cached else 'encoded every step'}, "
        f"text encoders {dict(cached='cached', frozen='run every step', lora='LoRA-trained', full='trained', ti='TI-trained')[s.text]}, "
        f"{s.optimizer}"
    )


def report(plan: Plan, fits: dict[int, Any]) -> str:
    """The per-component table and the settings that fit each budget, as printed by --plan."""
    s = plan.settings
    lines = [f"memory plan for {plan.model}: {describe(s)}", ""]
    width = max(len(p) for p, _, _ in plan.parts) + 2
    lines.append(f"{'part':<{width}}{'GiB':>8}  note")
    for i, (part, nbytes, note) in enumerate(plan.parts):
        if i in (0, plan.n_static):
            lines.append("alive the whole step:" if i == 0 else "alive in some phases of the step:")
        lines.append(f"  {part:<{width - 2}}{gib(nbytes):>8}  {note}")
    phases = ", ".join(f"{name} {gib(b)}" for name, b in plan.phases.items())
    lines.append(f"phases (GiB on top of the parts alive the whole step): {phases}")
    lines.append(
        f"{'peak of live tensors':<{width}}{gib(plan.tensors):>8}  "
        f"= {gib(plan.static)} + {gib(plan.tensors - plan.static)} during the {plan.peak_phase}"
    )
    lines.append(
        f"{'+ margin':<{width}}{gib(plan.margin):>8}  allocator overhead and CUDA workspaces are not "
        f"tensors: {MARGIN_FIXED / GIB:.2f} GiB + {MARGIN_FRACTION:.0%} added for them"
    )
    lines.append(f"{'predicted peak':<{width}}{gib(plan.total):>8}")
    lines.append("")
    for budget, found in fits.items():
        if found is None:
            lines.append(f"{budget:>2} GB: does not fit with any setting tried")
        elif not found[0]:
            lines.append(f"{budget:>2} GB: fits as configured ({gib(found[1].total)} GiB)")
        else:
            lines.append(f"{budget:>2} GB: fits ({gib(found[1].total)} GiB) with: " + "; ".join(found[0]))
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def plan_summary(cfg: TrainConfig, method: str, profile: Profile | None = None) -> str:
    """One line for `--preflight`: the predicted peak on SDXL and which card sizes it fits."""
    from sdprep.train.memory.profile import full_size_profile

    profile = profile or full_size_profile()
    plan = predict(settings_from_config(cfg, method), profile)
    fits = ", ".join(f"{b} GB {'yes' if plan.total <= b * GIB else 'no'}" for b in BUDGETS_GB)
    return (
        f"about {gib(plan.total)} GiB of GPU memory on {profile.name} ({gib(plan.tensors)} of tensors + "
        f"{gib(plan.margin)} margin); fits {fits}; `sdprep train --plan` shows the parts and what fits"
    )


def plan_config(cfg: TrainConfig, method: str, profile: Profile | None = None) -> str:
    """`sdprep train --plan`: the report for `cfg` on the full-size SDXL (or `profile`)."""
    from sdprep.train.memory.profile import full_size_profile

    profile = profile or full_size_profile()
    s = settings_from_config(cfg, method)
    plan = predict(s, profile)
    if cfg.sample_prompts and (s.text == "cached" or s.latents_cached):
        plan.notes.append(
            "samples (sample_prompts) bring the cached-away text encoders / VAE back to the GPU while they run"
        )
    if cfg.dataset_config is not None:
        plan.notes.append("resolution and batch size are the main config's; a dataset TOML may set others")
    fits = {b: fitting_settings(s, profile, b) for b in BUDGETS_GB}
    return report(plan, fits)
