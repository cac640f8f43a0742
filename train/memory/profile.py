"""The memory profile of an SDXL architecture: parameter statistics and measured activations.

A profile is what `sdprep.train.memory.planner.predict` needs about a model: parameter counts per component,
LoRA sizes per rank, Adafactor's factored state sizes, and activation bytes measured by
`sdprep.train.memory.trace` (U-Net forward + backward, text encoders, VAE encoding) at a reference
batch and size, scaled by batch x area for other settings.

The full-size SDXL's profile is stored (`sdxl_memory_profile.json`, tracing it takes many
minutes on a CPU): `full_size_profile()` reads it. `measure_profile(spec, settings)` measures
what a list of settings needs on any architecture (the tiny and topology-true test models); run
this module to regenerate the stored profile:

    python -m sdprep.train.memory.profile
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROFILE_FILE = Path(__file__).resolve().parent / "sdxl_memory_profile.json"
REFERENCE = {"batch": 1, "height": 1024, "width": 1024, "chunks": 1}
LORA_RANKS = (8, 64)  # LoRA activations are measured at two ranks and interpolated


def unet_key(unet: str, half: bool, gc: bool, rank: int | None = None) -> str:
    key = f"{unet}/{'half' if half else 'fp32'}/{'gc' if gc else 'nogc'}"
    return key if rank is None else f"{key}/r{rank}"


def text_key(text: str, half: bool, gc: bool) -> str:
    return f"{text}/{'half' if half else 'fp32'}" + ("" if text == "frozen" else f"/{'gc' if gc else 'nogc'}")


@dataclass
class Profile:
    """Parameter statistics and activation measurements of one architecture."""

    name: str
    stats: dict
    unet: dict = field(default_factory=dict)  # unet_key -> {"batch", "height", "width", "bytes"}
    text: dict = field(default_factory=dict)  # text_key -> {"batch", "chunks", "kept", "peak"}
    vae: dict = field(default_factory=dict)  # "half" / "fp32" -> {"batch", "height", "width", "bytes"}

    # -- lookups (scaled to the settings) --------------------------------------------------

    def unet_activations(self, s: Any) -> tuple[int, int, int]:
        """(activation peak, gradients stored by then, activations left when all gradients are),
        for the U-Net's forward + backward at the settings' batch and size."""
        prefix = unet_key(s.unet, s.half, s.gc)
        entries = [
            (int(k.rsplit("/r", 1)[1]), e) for k, e in self.unet.items() if k.startswith(prefix + "/r")
        ]
        if s.unet not in ("lora", "lora_conv"):
            entries = [(0, self.unet[prefix])] if prefix in self.unet else []
        if not entries:
            raise KeyError(f"{self.name}: no measurement for {prefix}")
        entries.sort(key=lambda item: item[0])

        def at(name: str, scaled: bool) -> int:
            points = [(r, _scaled(e, s, name) if scaled else e[name]) for r, e in entries]
            return _interpolate(points, s.rank)

        return at("bytes", True), at("grads_at_peak", False), at("tail", True)

    def text_activations(self, s: Any) -> tuple[int, int]:
        key = text_key(s.text, s.half, s.gc)
        if key not in self.text:
            raise KeyError(f"{self.name}: no measurement for text encoders {key}")
        entry = self.text[key]
        scale = (s.batch * s.chunks) / (entry["batch"] * entry["chunks"])
        return round(entry["kept"] * scale), round(entry["peak"] * scale)

    def vae_activations(self, s: Any) -> int:
        key = "half" if s.vae_half else "fp32"
        if key not in self.vae:
            raise KeyError(f"{self.name}: no measurement for VAE encoding in {key}")
        return _scaled(self.vae[key], s, "bytes")

    # -- storage ---------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(
            {"name": self.name, "stats": self.stats, "unet": self.unet, "text": self.text, "vae": self.vae},
            indent=1,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Profile:
        d = json.loads(text)
        return cls(d["name"], d["stats"], d["unet"], d["text"], d["vae"])


def _scaled(entry: dict, s: Any, field_name: str) -> int:
    """Activations scale with batch x image area (convolutions, norms and flash attention are linear
    in the number of pixels and tokens)."""
    scale = (s.batch * s.height * s.width) / (entry["batch"] * entry["height"] * entry["width"])
    return round(entry[field_name] * scale)


def _interpolate(points: list[tuple[int, int]], x: int) -> int:
    if len(points) == 1:
        return points[0][1]
    (x0, y0), (x1, y1) = points[0], points[-1]
    return max(0, round(y0 + (y1 - y0) * (x - x0) / (x1 - x0)))


def full_size_profile() -> Profile:
    """The stored profile of the full-size SDXL 1.0."""
    return Profile.from_json(PROFILE_FILE.read_text())


# -- measuring -----------------------------------------------------------------------------


def parameter_stats(spec: Any) -> dict:
    """Parameter counts, LoRA sizes per rank and Adafactor state sizes of `spec`, on the meta device."""
    import torch

    from sdprep.train.methods.lora import TE_BLOCKS, UNET_BLOCKS, UNET_CONV_BLOCKS, target_modules
    from sdprep.train.models.fullsize import build_components
    from sdprep.train.models.load import quiet_libraries

    quiet_libraries()
    with torch.device("meta"):
        unet, vae, te1, te2 = build_components(spec)
    comps = {"unet": unet, "te1": te1, "te2": te2, "vae": vae}
    stats: dict[str, Any] = {"params": {}, "buffers": {}, "largest": {}, "adafactor": {}, "lora": {}}
    for name, module in comps.items():
        params = list(module.parameters())
        stats["params"][name] = sum(p.numel() for p in params)
        stats["buffers"][name] = sum(b.numel() * b.element_size() for b in module.buffers())
        stats["largest"][name] = max(p.numel() for p in params)
        stats["adafactor"][name] = sum(_adafactor_elements(tuple(p.shape)) for p in params)
    stats["hidden"] = {"te1": spec.te1["hidden_size"], "te2": spec.te2["hidden_size"]}
    modules = dict(unet.named_modules())
    linear = target_modules(unet, UNET_BLOCKS)
    conv = {n: k for n, k in target_modules(unet, UNET_BLOCKS, UNET_CONV_BLOCKS).items() if n not in linear}
    stats["lora"]["unet"] = _lora_sizes(modules, linear)
    stats["lora"]["unet_conv"] = _lora_sizes(modules, conv)
    for name, te in (("te1", te1), ("te2", te2)):
        stats["lora"][name] = _lora_sizes(dict(te.named_modules()), target_modules(te, TE_BLOCKS))
    return stats


def _adafactor_elements(shape: tuple[int, ...]) -> int:
    if len(shape) < 2:
        return math.prod(shape)
    return math.prod(shape[:-1]) + math.prod(shape[:-2] + shape[-1:])


def _lora_sizes(modules: dict, targets: dict) -> dict:
    """Per rank: LoRA weights (down [r, in*k*k] + up [out, r]) summed and largest, and the count."""
    per_rank, largest = 0, 0
    for name in targets:
        m = modules[name]
        if hasattr(m, "in_features"):
            fan_in, out = m.in_features, m.out_features
        else:
            fan_in, out = m.in_channels * math.prod(m.kernel_size), m.out_channels
        per_rank += fan_in + out
        largest = max(largest, fan_in, out)
    return {"per_rank": per_rank, "largest_per_rank": largest, "modules": len(targets)}


def measure_profile(
    spec: Any, settings: list[Any], progress: Any = None, profile: Profile | None = None
) -> Profile:
    """Measure what `settings` (a list of `plan.Settings`) need on `spec`, at their own batch and size;
    measurements already in `profile` are kept. `progress(message, profile)` is called before each."""
    profile = profile or Profile(spec.name, parameter_stats(spec))

    def measure(table: dict, key: str, label: str, run: Any) -> None:
        if key not in table:
            if progress:
                progress(f"{label} {key}", profile)
            table[key] = run()

    for s in settings:
        _measure_settings(spec, s, profile, measure)
    return profile


def _measure_settings(spec: Any, s: Any, profile: Profile, measure: Any) -> None:
    """Trace what settings `s` need that `profile` does not hold yet."""
    from sdprep.train.memory import trace as T

    size = {"batch": s.batch, "height": s.height, "width": s.width}
    common = {"half": s.half, "gc": s.gc, "half_trained": s.half_trained}
    lora = s.unet in ("lora", "lora_conv")

    def unet() -> dict:
        rank = s.rank if lora else 4
        r = T.trace_unet(
            spec, mode=s.unet, rank=rank, conv_rank=s.conv_rank, chunks=s.chunks, **common, **size
        )
        return {**size, "bytes": r.peak, "grads_at_peak": r.grads_at_peak, "tail": r.tail}

    def text() -> dict:
        r = T.trace_text_encoders(spec, mode=s.text, rank=s.rank, batch=s.batch, chunks=s.chunks, **common)
        return {"batch": s.batch, "chunks": s.chunks, "kept": r.kept, "peak": r.peak}

    measure(profile.unet, unet_key(s.unet, s.half, s.gc, s.rank if lora else None), "U-Net", unet)
    if s.text != "cached":
        measure(profile.text, text_key(s.text, s.half, s.gc), "text encoders", text)
    if not s.latents_cached:
        vae = "half" if s.vae_half else "fp32"
        measure(
            profile.vae,
            vae,
            "VAE",
            lambda: {**size, "bytes": T.trace_vae_encode(spec, half=s.vae_half, **size)},
        )


def full_size_settings() -> list[Any]:
    """Every combination the stored full-size profile holds (at the reference size)."""
    from sdprep.train.memory.planner import Settings

    out = []
    for half in (True, False):
        for gc in (True, False):
            for unet in ("lora", "lora_conv"):
                for rank in LORA_RANKS:
                    out.append(Settings(unet=unet, half=half, gc=gc, rank=rank, conv_rank=rank))
            out.append(Settings(method="finetune", unet="full", half=half, gc=gc))
            out.append(Settings(method="ti", unet="frozen", text="ti", half=half, gc=gc))
            out.append(Settings(method="lora", text="lora", half=half, gc=gc, rank=LORA_RANKS[0]))
            out.append(Settings(method="finetune", unet="full", text="full", half=half, gc=gc))
        out.append(
            Settings(text="frozen", latents_cached=False, half=half, vae_half=half, rank=LORA_RANKS[0])
        )
    return out


def main() -> None:
    """Regenerate the stored full-size profile (tens of minutes on a CPU; allocates little)."""
    import time

    import torch

    from sdprep.train.models.fullsize import FULL

    torch.set_num_threads(1)
    started = time.perf_counter()
    partial = PROFILE_FILE.with_suffix(".partial.json")  # survives an interruption: resumed from

    def progress(message: str, profile: Profile) -> None:
        partial.write_text(profile.to_json() + "\n")
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    kept = Profile.from_json(partial.read_text()) if partial.exists() else None
    profile = measure_profile(FULL, full_size_settings(), progress=progress, profile=kept)
    PROFILE_FILE.write_text(profile.to_json() + "\n")
    partial.unlink(missing_ok=True)
    print(f"wrote {PROFILE_FILE} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
