"""The memory profile of an SDXL architecture: parameter statistics and measured activations.

A profile is what `sdprep.train.memory.planner.predict` needs about a model: parameter counts per component,
LoRA sizes per rank, Adafactor's factored state sizes, and activation bytes measured by
`sdprep.train.memory.trace` (U-Net forward + backward, text encoders, VAE encoding). Image
activations are measured at one or more sizes per key and modelled as affine in batch x area
(`size_fit`): part of the peak does not grow with the image (per-block tensors, LoRA and autocast
temporaries, a checkpointed block's recompute), so scaling one measurement by area is low for
smaller images; a key measured at one size only falls back to that scaling.

The full-size SDXL's profile is stored (`sdxl_memory_profile.json`, tracing it takes many
minutes on a CPU): `full_size_profile()` reads it. `measure_profile(spec, settings)` measures
what a list of settings needs on any architecture (the tiny and topology-true test models); run
this module to regenerate the stored profile, or to add measurements at other sizes to it
(keys already measured at a size are kept):

    python -m sdprep.train.memory.profile                # 1024 px
    python -m sdprep.train.memory.profile --sizes 512    # adds the 512 px points
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from sdprep.train.memory.planner import Settings
    from sdprep.train.models.fullsize import SdxlSpec

# one trace: batch, height, width and bytes (the U-Net's also grads_at_peak and tail; the text
# encoders' batch, chunks, kept and peak)
Measurement = dict[str, int]
Stats = dict[str, Any]  # parameter_stats: counts per component, LoRA sizes (JSON)

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
    stats: Stats
    # unet_key -> measurements at one or more sizes: [{"batch", "height", "width", "bytes", ...}]
    unet: dict[str, list[Measurement]] = field(default_factory=dict)
    text: dict[str, Measurement] = field(
        default_factory=dict
    )  # text_key -> {"batch", "chunks", "kept", "peak"}
    vae: dict[str, list[Measurement]] = field(
        default_factory=dict
    )  # "half" / "fp32" -> [{"batch", "height", "width", "bytes"}]

    # -- lookups (fitted to the settings' batch and size) ------------------------------------

    def unet_activations(self, s: Settings) -> tuple[int, int, int]:
        """(activation peak, gradients stored by then, activations left when all gradients are),
        for the U-Net's forward + backward at the settings' batch and size."""
        entries = self._unet_entries(s)

        def at(name: str, sized: bool) -> int:
            points = [(r, _at_size(e, s, name) if sized else _nearest(e, s)[name]) for r, e in entries]
            return _interpolate(points, s.rank)

        return at("bytes", True), at("grads_at_peak", False), at("tail", True)

    def _unet_entries(self, s: Settings) -> list[tuple[int, list[Measurement]]]:
        """(rank, measurements) of the U-Net key of `s` (LoRA: each measured rank)."""
        prefix = unet_key(s.unet, s.half, s.gc)
        entries = [
            (int(k.rsplit("/r", 1)[1]), e) for k, e in self.unet.items() if k.startswith(prefix + "/r")
        ]
        if s.unet not in ("lora", "lora_conv"):
            entries = [(0, self.unet[prefix])] if prefix in self.unet else []
        if not entries:
            raise KeyError(f"{self.name}: no measurement for {prefix}")
        return sorted(entries, key=lambda item: item[0])

    def area_scaled(self, s: Settings) -> list[str]:
        """The parts whose activations for `s` come from one measured size scaled by area (not
        fitted through two sizes): the planner says so in its notes."""
        out = []
        if any(_area_only(e, s) for _, e in self._unet_entries(s)):
            out.append("U-Net")
        vae = "half" if s.vae_half else "fp32"
        if not s.latents_cached and vae in self.vae and _area_only(self.vae[vae], s):
            out.append("VAE encoding")
        return out

    def text_activations(self, s: Settings) -> tuple[int, int]:
        key = text_key(s.text, s.half, s.gc)
        if key not in self.text:
            raise KeyError(f"{self.name}: no measurement for text encoders {key}")
        entry = self.text[key]
        scale = (s.batch * s.chunks) / (entry["batch"] * entry["chunks"])
        return round(entry["kept"] * scale), round(entry["peak"] * scale)

    def vae_activations(self, s: Settings) -> int:
        key = "half" if s.vae_half else "fp32"
        if key not in self.vae:
            raise KeyError(f"{self.name}: no measurement for VAE encoding in {key}")
        return _at_size(self.vae[key], s, "bytes")

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


def pixels(m: Measurement | Settings) -> int:
    """Batch x height x width of a measurement (a dict) or of settings."""
    if isinstance(m, dict):
        return m["batch"] * m["height"] * m["width"]
    return m.batch * m.height * m.width


MIN_SIZE_RATIO = 1.2  # two measurements closer in pixels than this do not define a slope


def fit_pair(points: list[tuple[int, int]], x: int) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """The measurements (pixels, bytes) `size_fit` draws its line through at `x` pixels: the one
    nearest `x`, and its partner: the nearest on the other side of `x` whose pixels differ from the
    first's by a ratio of at least MIN_SIZE_RATIO, else the nearest such on the far side of the
    first (the end segment, extended). No partner (None) when every other point is as close in pixels as
    that: two nearly equal sizes give a nearly vertical line, not a slope."""
    pts = sorted(dict(points).items())
    near = min(pts, key=lambda p: abs(p[0] - x))
    x0 = near[0]
    apart = [p for p in pts if max(p[0], x0) >= MIN_SIZE_RATIO * min(p[0], x0)]
    above, below = [p for p in apart if p[0] > x0], [p for p in apart if p[0] < x0]
    # nothing lies between `near` and `x` (it is the nearest): prefer a partner beyond `x`
    if x0 < x:
        partner = above[0] if above else (below[-1] if below else None)
    else:
        partner = below[-1] if below else (above[0] if above else None)
    return near, partner


def size_fit(points: list[tuple[int, int]], x: int) -> int:
    """Activation bytes at `x` pixels (batch x height x width) from measurements (pixels, bytes):
    the affine a + b * pixels through the pair `fit_pair` chooses (exact at each measured point,
    linear between neighbouring sizes, the end segments extended beyond them); proportional to the
    pixels from the nearest point when there is one point, or no other whose size differs enough.
    Never below zero."""
    (x0, y0), partner = fit_pair(points, x)
    if partner is None:
        return max(0, round(y0 * x / x0))
    x1, y1 = partner
    return max(0, round(y0 + (y1 - y0) * (x - x0) / (x1 - x0)))


def _at_size(entry: list[Measurement], s: Settings, field_name: str) -> int:
    return size_fit([(pixels(m), m[field_name]) for m in entry], pixels(s))


def _nearest(entry: list[Measurement], s: Settings) -> Measurement:
    """The measurement closest to the settings' batch x area."""
    return min(entry, key=lambda m: abs(pixels(m) - pixels(s)))


def _area_only(entry: list[Measurement], s: Settings) -> bool:
    """Whether `size_fit` scales one measurement by area for `s` (no second size to fit through)."""
    (x0, _), partner = fit_pair([(pixels(m), 0) for m in entry], pixels(s))
    return partner is None and x0 != pixels(s)


def _interpolate(points: list[tuple[int, int]], x: int) -> int:
    if len(points) == 1:
        return points[0][1]
    (x0, y0), (x1, y1) = points[0], points[-1]
    return max(0, round(y0 + (y1 - y0) * (x - x0) / (x1 - x0)))


def full_size_profile() -> Profile:
    """The stored profile of the full-size SDXL 1.0."""
    return Profile.from_json(PROFILE_FILE.read_text())


# -- measuring -----------------------------------------------------------------------------


def parameter_stats(spec: SdxlSpec) -> Stats:
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


def _lora_sizes(modules: dict[str, Any], targets: dict[str, str]) -> dict[str, int]:
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
    spec: SdxlSpec, settings: list[Settings], progress: Any = None, profile: Profile | None = None
) -> Profile:
    """Measure what `settings` (a list of `plan.Settings`) need on `spec`, at their own batch and size;
    measurements already in `profile` are kept (image activations: per key and size).
    `progress(message, profile)` is called before each."""
    profile = profile or Profile(spec.name, parameter_stats(spec))

    def measure(
        table: dict[str, Any], key: str, label: str, run: Any, size: Measurement | None = None
    ) -> None:
        if size is None:  # text encoders: one measurement per key
            if key not in table:
                if progress:
                    progress(f"{label} {key}", profile)
                table[key] = run()
            return
        points = table.setdefault(key, [])
        if not any(pixels(m) == pixels(size) for m in points):
            if progress:
                progress(f"{label} {key} at {size['width']}x{size['height']}, batch {size['batch']}", profile)
            points.append(run())
            points.sort(key=pixels)

    for s in settings:
        _measure_settings(spec, s, profile, measure)
    return profile


def _measure_settings(spec: SdxlSpec, s: Settings, profile: Profile, measure: Any) -> None:
    """Trace what settings `s` need that `profile` does not hold yet."""
    from sdprep.train.memory import trace as T

    size: Measurement = {"batch": s.batch, "height": s.height, "width": s.width}
    lora = s.unet in ("lora", "lora_conv")

    def unet() -> Measurement:
        rank = s.rank if lora else 4
        r = T.trace_unet(
            spec,
            mode=s.unet,
            rank=rank,
            conv_rank=s.conv_rank,
            chunks=s.chunks,
            half=s.half,
            gc=s.gc,
            half_trained=s.half_trained,
            batch=s.batch,
            height=s.height,
            width=s.width,
        )
        return {**size, "bytes": r.peak, "grads_at_peak": r.grads_at_peak, "tail": r.tail}

    def text() -> Measurement:
        r = T.trace_text_encoders(
            spec,
            mode=s.text,
            rank=s.rank,
            batch=s.batch,
            chunks=s.chunks,
            half=s.half,
            gc=s.gc,
            half_trained=s.half_trained,
        )
        return {"batch": s.batch, "chunks": s.chunks, "kept": r.kept, "peak": r.peak}

    key = unet_key(s.unet, s.half, s.gc, s.rank if lora else None)
    measure(profile.unet, key, "U-Net", unet, size)
    if s.text != "cached":
        measure(profile.text, text_key(s.text, s.half, s.gc), "text encoders", text)
    if not s.latents_cached:
        vae = "half" if s.vae_half else "fp32"
        measure(
            profile.vae,
            vae,
            "VAE",
            lambda: {
                **size,
                "bytes": T.trace_vae_encode(
                    spec, half=s.vae_half, batch=s.batch, height=s.height, width=s.width
                ),
            },
            size,
        )


class _Side(TypedDict):
    width: int
    height: int


def full_size_settings(side: int = REFERENCE["width"]) -> list[Settings]:
    """Every combination the stored full-size profile holds, at `side` x `side` px and batch 1; the
    ones most configs use come first (LoRA, fine-tune and TI with mixed precision and
    checkpointing), so an interrupted run at a further size has measured those."""
    from sdprep.train.memory.planner import Settings

    size: _Side = {"width": side, "height": side}
    out = []
    for half in (True, False):
        for gc in (True, False):
            for unet, rank in itertools.product(("lora", "lora_conv"), LORA_RANKS):
                out.append(Settings(unet=unet, half=half, gc=gc, rank=rank, conv_rank=rank, **size))
            out.insert(-2, Settings(method="finetune", unet="full", half=half, gc=gc, **size))
            out.insert(-2, Settings(method="ti", unet="frozen", text="ti", half=half, gc=gc, **size))
            out.append(Settings(method="lora", text="lora", half=half, gc=gc, rank=LORA_RANKS[0], **size))
            out.append(Settings(method="finetune", unet="full", text="full", half=half, gc=gc, **size))
        out.append(Settings(text="frozen", latents_cached=False, half=half, rank=LORA_RANKS[0], **size))
    return out


def main(argv: list[str] | None = None) -> None:
    """Regenerate the stored full-size profile, or add measurements at further sizes to it (tens of
    minutes per size on a CPU; allocates little). An interrupted run resumes where it stopped."""
    import argparse
    import time

    import torch

    from sdprep.train.models.fullsize import FULL

    parser = argparse.ArgumentParser(
        prog="python -m sdprep.train.memory.profile",
        description=main.__doc__,
        epilog="example: python -m sdprep.train.memory.profile --sizes 512",
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        metavar="PX",
        help="square sizes to measure at, kept with the stored ones (default: regenerate at 1024)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    partial = PROFILE_FILE.with_suffix(".partial.json")  # survives an interruption: resumed from

    def progress(message: str, profile: Profile) -> None:
        partial.write_text(profile.to_json() + "\n")
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    if partial.exists():
        kept = Profile.from_json(partial.read_text())
    elif args.sizes:
        kept = full_size_profile()
    else:
        kept = None
    settings = [s for side in args.sizes or [REFERENCE["width"]] for s in full_size_settings(side)]
    profile = measure_profile(FULL, settings, progress=progress, profile=kept)
    PROFILE_FILE.write_text(profile.to_json() + "\n")
    partial.unlink(missing_ok=True)
    print(f"wrote {PROFILE_FILE} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
