"""The memory planner's maths (pure functions, a hand-made profile), its answers for kohya's
documented anchors on the stored full-size SDXL profile, and `sdprep train --plan` on seed 003.
Checks against real runs are in test_plan_measured.py."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from seed_configs import SEED_003_LORA

from sdprep.train.config.schema import load_train_config
from sdprep.train.memory.planner import (
    GIB,
    Settings,
    _batch_and_resolution,
    fitting_settings,
    optimizer_state_bytes,
    optimizer_step_bytes,
    predict,
    settings_from_config,
)
from sdprep.train.memory.profile import Profile, _adafactor_elements, full_size_profile, size_fit

MIB = 1 << 20
SIZE = {"batch": 1, "height": 1024, "width": 1024}


def toy_profile() -> Profile:
    """A made-up architecture with round numbers: every figure below follows from these."""
    lora = {"per_rank": 1000, "largest_per_rank": 100, "modules": 10}
    stats = {
        "params": {"unet": 1000 * MIB, "te1": 100 * MIB, "te2": 300 * MIB, "vae": 50 * MIB},
        "buffers": {"unet": 0, "te1": 0, "te2": 0, "vae": 0},
        "largest": {"unet": 10 * MIB, "te1": 5 * MIB, "te2": 20 * MIB, "vae": MIB},
        "adafactor": {"unet": 20 * MIB, "te1": 4 * MIB, "te2": 8 * MIB, "vae": MIB},
        "hidden": {"te1": 768, "te2": 1280},
        "lora": {"unet": lora, "unet_conv": lora, "te1": lora, "te2": lora},
    }
    p = Profile("toy", stats)
    for half in (True, False):
        for gc in (True, False):
            act = (1000 if gc else 4000) * MIB * (1 if half else 2)
            for mode in ("frozen", "full"):
                p.unet[f"{mode}/{'half' if half else 'fp32'}/{'gc' if gc else 'nogc'}"] = [
                    {**SIZE, "bytes": act, "grads_at_peak": 0, "tail": 0}
                ]
            for mode in ("lora", "lora_conv"):
                for rank, extra in ((8, 0), (64, 56 * MIB)):
                    key = f"{mode}/{'half' if half else 'fp32'}/{'gc' if gc else 'nogc'}/r{rank}"
                    p.unet[key] = [{**SIZE, "bytes": act + extra, "grads_at_peak": 0, "tail": 0}]
            for mode in ("lora", "full", "ti"):
                key = f"{mode}/{'half' if half else 'fp32'}/{'gc' if gc else 'nogc'}"
                p.text[key] = {"batch": 1, "chunks": 1, "kept": 100 * MIB, "peak": 150 * MIB}
        p.text[f"frozen/{'half' if half else 'fp32'}"] = {
            "batch": 1,
            "chunks": 1,
            "kept": 0,
            "peak": 50 * MIB,
        }
        p.vae["half" if half else "fp32"] = [{**SIZE, "bytes": 2000 * MIB}]
    return p


def part(plan, name: str) -> int:
    return next(b for p, b, _ in plan.parts if p == name)


# -- optimizer maths -------------------------------------------------------------------------


def test_optimizer_state_per_family() -> None:
    n = 1024 * 1024
    assert optimizer_state_bytes("adam", n, 4, 0) == 8 * n  # two fp32 moments
    assert optimizer_state_bytes("adam", n, 2, 0) == 4 * n  # full_bf16: moments in bf16
    assert optimizer_state_bytes("adam8bit", n, 4, 0) == 2 * n + 2 * 4 * n // 256  # + block scales
    assert optimizer_state_bytes("one", n, 4, 0) == 4 * n
    assert optimizer_state_bytes("adafactor", n, 4, 3000) == 12000
    assert optimizer_state_bytes("adafactor", n, 4, 3000, momentum=True) == 12000 + 4 * n


def test_adafactor_keeps_rows_and_columns() -> None:
    assert _adafactor_elements((1280, 640)) == 1280 + 640
    assert _adafactor_elements((320, 640, 3, 3)) == 320 * 640 * 3 + 320 * 640 * 3
    assert _adafactor_elements((1280,)) == 1280


def test_optimizer_step_temporaries() -> None:
    # torch's AdamW on CUDA: foreach kernels hold a copy of the parameter group
    assert optimizer_step_bytes("adam", 1000, 10, 4, "cuda") == 1000
    assert optimizer_step_bytes("adam", 1000, 10, 4, "cpu") == 80  # per parameter: two copies
    assert optimizer_step_bytes("adam", 1000, 10, 4, "cuda", fused=True) == 80
    assert optimizer_step_bytes("adafactor", 1000, 10, 4, "cuda") == 80  # fp32 statistics
    assert optimizer_step_bytes("adafactor", 1000, 10, 2, "cuda") == 160  # + fp32 copies of bf16 tensors
    assert optimizer_step_bytes("adam8bit", 1000, 10, 4, "cuda") == 0


# -- settings --------------------------------------------------------------------------------


def seed003_cfg(tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text(SEED_003_LORA)
    cfg, _ = load_train_config(path)
    return cfg


def test_settings_of_seed003(tmp_path: Path) -> None:
    s = settings_from_config(seed003_cfg(tmp_path), "lora")
    assert (s.method, s.unet, s.text, s.latents_cached) == ("lora", "lora", "cached", True)
    assert (s.half, s.gc, s.batch, s.width, s.height, s.chunks, s.rank) == (True, True, 2, 1024, 1024, 3, 32)
    assert s.optimizer == "AdamW"
    assert not settings_from_config(seed003_cfg(tmp_path), "lora", device="cpu").half  # fp16 -> fp32 on CPU


def test_settings_of_other_methods(tmp_path: Path) -> None:
    cfg = seed003_cfg(tmp_path)
    te = dataclasses.replace(cfg, network_train_unet_only=False, network_args=("conv_dim=8",))
    assert (settings_from_config(te, "lora").unet, settings_from_config(te, "lora").text) == (
        "lora_conv",
        "lora",
    )
    ft = dataclasses.replace(cfg, cache_text_encoder_outputs=False, cache_text_encoder_outputs_to_disk=False)
    assert (settings_from_config(ft, "finetune").unet, settings_from_config(ft, "finetune").text) == (
        "full",
        "frozen",
    )
    ft = dataclasses.replace(ft, train_text_encoder=True, full_bf16=True, mixed_precision="bf16")
    s = settings_from_config(ft, "finetune")
    assert (s.text, s.half_trained) == ("full", True)
    assert settings_from_config(cfg, "ti").unet == "frozen"


# -- the prediction --------------------------------------------------------------------------


def test_parts_of_a_cached_lora_plan() -> None:
    s = Settings(rank=8, batch=1)
    plan = predict(s, toy_profile())
    assert part(plan, "U-Net weights") == 2 * 1000 * MIB  # half
    assert part(plan, "text encoders") == 0  # cached: moved to the CPU
    assert part(plan, "VAE") == 0
    assert part(plan, "LoRA weights") == 4 * 8 * 1000  # fp32
    assert part(plan, "optimizer state") == 8 * 8 * 1000
    assert part(plan, "activations: U-Net") == 1000 * MIB
    assert plan.tensors == plan.static + max(plan.phases.values())
    assert plan.peak_phase == "forward + backward"
    assert plan.total == plan.tensors + int(0.75 * GIB) + int(0.08 * plan.tensors)


def test_a_cpu_run_keeps_everything_resident() -> None:
    plan = predict(Settings(rank=8, device="cpu"), toy_profile())
    assert part(plan, "text encoders") == 2 * 400 * MIB
    assert part(plan, "VAE") == 2 * 50 * MIB


def test_activations_follow_batch_area_checkpointing_and_rank() -> None:
    p = toy_profile()
    base = part(predict(Settings(rank=8), p), "activations: U-Net")
    assert part(predict(Settings(rank=8, batch=2), p), "activations: U-Net") == 2 * base
    assert part(predict(Settings(rank=8, width=512, height=512), p), "activations: U-Net") == base // 4
    assert part(predict(Settings(rank=8, gc=False), p), "activations: U-Net") == 4 * base
    assert part(predict(Settings(rank=36), p), "activations: U-Net") == base + 28 * MIB  # interpolated
    assert part(predict(Settings(rank=8, half=False), p), "activations: U-Net") == 2 * base


# -- the size model ----------------------------------------------------------------------------


def test_size_fit_through_one_point_is_proportional_to_pixels() -> None:
    assert size_fit([(1000, 300)], 1000) == 300
    assert size_fit([(1000, 300)], 250) == 75
    assert size_fit([(1000, 300)], 4000) == 1200


def test_size_fit_through_two_points_is_exact_at_both_and_affine() -> None:
    # y = 100 + 0.2 x through (1000, 300) and (4000, 900), given in either order
    for pts in ([(1000, 300), (4000, 900)], [(4000, 900), (1000, 300)]):
        assert size_fit(pts, 1000) == 300
        assert size_fit(pts, 4000) == 900
        assert size_fit(pts, 2500) == 600  # linear in between
        assert size_fit(pts, 8000) == 1700  # and beyond
        assert size_fit(pts, 0) == 100  # the part that does not grow with the image
    assert size_fit([(1000, 100), (2000, 1100)], 100) == 0  # never below zero


def test_size_fit_through_more_points_uses_the_neighbouring_pair() -> None:
    pts = [(100, 10), (200, 30), (400, 40)]
    assert [size_fit(pts, x) for x in (100, 200, 400)] == [10, 30, 40]
    assert size_fit(pts, 150) == 20
    assert size_fit(pts, 300) == 35
    assert size_fit(pts, 800) == 60  # the last segment, extended
    assert size_fit(pts, 75) == 5  # the first one, extended


def test_size_fit_needs_sizes_apart_to_fit_a_slope() -> None:
    # two nearly equal sizes would give a nearly vertical line (47 GB at twice the size):
    # scaled by area from the nearest point instead
    near = [(524176, 500_000_000), (524288, 510_000_000)]
    assert size_fit(near, 1048576) == 1_020_000_000
    assert size_fit(near, 524176) == 500_000_000  # still exact where measured
    # a near-equal pair and a third point: the line goes through points apart in size
    pts = [(100, 10), (101, 12), (200, 30)]
    assert size_fit(pts, 150) == round(12 + 18 * 49 / 99)  # 101 .. 200
    assert size_fit(pts, 300) == round(12 + 18 * 199 / 99)  # 101 .. 200, extended
    assert size_fit(pts, 80) == round(10 + 20 * -20 / 100)  # 100 .. 200, extended
    # the threshold: a ratio of 1.2 is a slope, less is not
    assert size_fit([(1000, 300), (1200, 340)], 2000) == 500  # 100 + 0.2 x
    assert size_fit([(1000, 300), (1190, 340)], 2380) == 680  # twice the nearest


def test_plan_says_when_near_equal_sizes_are_scaled_by_area() -> None:
    p = toy_profile()
    for rank in (8, 64):  # a second measurement 0.4 % larger than 1024 x 1024
        p.unet[f"lora/half/gc/r{rank}"].append(
            {"batch": 1, "height": 1024, "width": 1028, "bytes": 1001 * MIB, "grads_at_peak": 0, "tail": 0}
        )
    plan = predict(Settings(rank=8, width=512, height=512), p)
    assert part(plan, "activations: U-Net") == 250 * MIB
    assert any(n.startswith("U-Net activations") and "one image size" in n for n in plan.notes)


def two_size_profile() -> Profile:
    """The toy profile with its half-precision checkpointed LoRA measured at 512 px too: 400 MiB
    where scaling 1024 px's 1000 MiB by area would say 250 (200 MiB do not grow with the image)."""
    p = toy_profile()
    for rank, extra in ((8, 0), (64, 28 * MIB)):
        p.unet[f"lora/half/gc/r{rank}"].insert(
            0,
            {
                "batch": 1,
                "height": 512,
                "width": 512,
                "bytes": 400 * MIB + extra,
                "grads_at_peak": 0,
                "tail": 0,
            },
        )
    return p


def test_activations_are_affine_in_batch_times_area_through_two_sizes() -> None:
    p = two_size_profile()

    def act(**kw) -> int:
        return part(predict(Settings(**{"rank": 8, **kw}), p), "activations: U-Net")

    assert act() == 1000 * MIB  # measured sizes are reproduced
    assert act(width=512, height=512) == 400 * MIB
    assert act(width=768, height=768) == 650 * MIB  # 200 MiB + 200 MiB per 512 x 512 pixels
    assert act(width=512, height=512, batch=2) == 600 * MIB
    assert act(batch=2) == 1800 * MIB
    assert act(width=512, height=512, rank=36) == 414 * MIB  # ranks still interpolate
    assert not predict(Settings(rank=8, width=768, height=768), p).notes


def test_plan_says_when_activations_are_scaled_from_one_size() -> None:
    p = toy_profile()  # one size: 1024 px
    assert not predict(Settings(rank=8), p).notes  # the measured size: nothing scaled
    notes = predict(Settings(rank=8, width=512, height=512, latents_cached=False), p).notes
    assert any("U-Net and VAE encoding activations" in n and "one image size" in n for n in notes)
    notes = predict(Settings(rank=8, width=512, height=512, latents_cached=False), two_size_profile()).notes
    assert any(n.startswith("VAE encoding activations") for n in notes)


def test_measuring_a_further_size_keeps_the_stored_points(monkeypatch) -> None:
    from sdprep.train.memory import trace
    from sdprep.train.memory.profile import measure_profile

    calls = []

    def fake_unet(spec, *, mode, batch, height, width, **kw) -> trace.UnetTrace:
        calls.append((mode, height))
        return trace.UnetTrace(batch * height * width + 7, 5, 3, 0, 0)

    def fake_vae(spec, *, half, batch, height, width) -> int:
        calls.append(("vae", height))
        return batch * height * width

    monkeypatch.setattr(trace, "trace_unet", fake_unet)
    monkeypatch.setattr(trace, "trace_vae_encode", fake_vae)
    p = toy_profile()
    stored = p.unet["lora/half/gc/r8"][0]
    settings = [
        Settings(rank=8, width=512, height=512),
        Settings(rank=8, width=512, height=512, latents_cached=False),
    ]
    messages = []
    measure_profile(None, settings, progress=lambda m, _: messages.append(m), profile=p)
    assert calls == [("lora", 512), ("vae", 512)]
    assert messages == ["U-Net lora/half/gc/r8 at 512x512, batch 1", "VAE half at 512x512, batch 1"]
    assert p.unet["lora/half/gc/r8"] == [
        {"batch": 1, "height": 512, "width": 512, "bytes": 512 * 512 + 7, "grads_at_peak": 5, "tail": 3},
        stored,
    ]
    assert p.vae["half"][0]["bytes"] == 512 * 512
    measure_profile(None, settings, profile=p)  # measured already: nothing traced again
    assert len(calls) == 2
    assert Profile.from_json(p.to_json()) == p


def test_profile_command_adds_a_size_to_the_stored_file(monkeypatch, tmp_path: Path) -> None:
    """`python -m sdprep.train.memory.profile --sizes 512` traces every image key at 512 px and
    keeps what is stored (the 1024 px points, the text encoders): nothing at 1024 is traced again."""
    import torch

    from sdprep.train.memory import profile as P
    from sdprep.train.memory import trace

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep this process's threads
    traced = []

    def fake_unet(spec, *, mode, batch, height, width, **kw) -> trace.UnetTrace:
        traced.append(height)
        return trace.UnetTrace(height, 0, 0, 0, 0)

    monkeypatch.setattr(trace, "trace_unet", fake_unet)
    monkeypatch.setattr(trace, "trace_vae_encode", lambda spec, **kw: traced.append(kw["height"]) or 1)
    monkeypatch.setattr(trace, "trace_text_encoders", lambda *a, **kw: pytest.fail("text traced again"))
    stored = toy_profile()
    monkeypatch.setattr(P, "PROFILE_FILE", tmp_path / "profile.json")
    P.PROFILE_FILE.write_text(stored.to_json())
    P.main(["--sizes", "512"])
    after = Profile.from_json(P.PROFILE_FILE.read_text())
    assert len(traced) == len(stored.unet) + len(stored.vae) and set(traced) == {512}
    assert after.text == stored.text and after.stats == stored.stats
    for table in ("unet", "vae"):
        for key, points in getattr(after, table).items():
            assert [m["width"] for m in points] == [512, 1024]
            assert points[1] == getattr(stored, table)[key][0]
    assert not (tmp_path / "profile.partial.json").exists()


def test_encoding_phase_when_nothing_is_cached() -> None:
    s = Settings(rank=8, text="frozen", latents_cached=False)
    plan = predict(s, toy_profile())
    assert plan.phases["encoding"] == 2000 * MIB  # the VAE's peak beats the text encoders'
    assert plan.peak_phase == "encoding"
    assert part(plan, "text encoders") == 2 * 400 * MIB


def test_full_finetune_gradients_optimizer_and_fused_backward() -> None:
    p = toy_profile()
    s = Settings(method="finetune", unet="full", optimizer="AdamW")
    plan = predict(s, p)
    weights = 4 * 1000 * MIB
    assert part(plan, "U-Net weights") == weights  # fp32 master weights
    assert part(plan, "gradients") == weights
    assert part(plan, "optimizer state") == 2 * weights
    assert part(plan, "optimizer step temporaries") == weights  # foreach AdamW on CUDA
    assert plan.peak_phase == "optimizer step"
    ada = predict(dataclasses.replace(s, optimizer="Adafactor"), p)
    assert part(ada, "optimizer state") == 4 * 20 * MIB
    fused = predict(dataclasses.replace(s, optimizer="Adafactor", fused_backward=True), p)
    assert part(fused, "gradients") == 4 * 10 * MIB  # only the largest gradient at a time
    assert fused.tensors < ada.tensors
    bf16 = predict(dataclasses.replace(s, optimizer="Adafactor", half_trained=True), p)
    assert part(bf16, "U-Net weights") == weights // 2


def test_fitting_settings_prefers_the_least_intrusive_change() -> None:
    p = toy_profile()
    s = Settings(rank=8, gc=False, batch=4)
    assert fitting_settings(s, p, 24)[0] == []  # fits as it is
    keys, plan = fitting_settings(s, p, 8)
    assert keys == ["gradient_checkpointing = true"]
    assert plan.total <= 8 * GIB
    keys, plan = fitting_settings(dataclasses.replace(s, gc=True), p, 4)
    assert any(k.startswith("train_batch_size = ") for k in keys)
    assert fitting_settings(s, p, 1) is None  # the weights alone do not fit


# -- kohya's documented anchors on the full-size SDXL ------------------------------------------


def anchor(**kw) -> Settings:
    return Settings(**{"half": True, "gc": True, "batch": 1, "width": 1024, "height": 1024, **kw})


def test_kohya_lora_anchor_fits_8_gb() -> None:
    """SDXL LoRA trains on 8 GB: U-Net only, cached text-encoder outputs and latents, gradient
    checkpointing, fp16/bf16, an 8-bit optimizer, batch 1, 1024x1024 (kohya's documentation)."""
    p = full_size_profile()
    for rank in (4, 32):  # kohya's default network_dim, and seed 003's
        plan = predict(anchor(rank=rank, optimizer="AdamW8bit"), p)
        assert plan.total < 8 * GIB, rank
    # without caching the text encoders stay on the GPU (1.6 GB in bf16) and encode every step
    assert predict(anchor(rank=32, text="frozen"), p).total > predict(anchor(rank=32), p).total + GIB


def test_kohya_finetune_anchor_24_gb() -> None:
    """A full SDXL fine-tune fits 24 GB at batch 1 with the U-Net only, gradient checkpointing,
    cached outputs and Adafactor; AdamW 8-bit does not fit (kohya's documentation)."""
    p = full_size_profile()
    ft = anchor(method="finetune", unet="full")
    assert predict(dataclasses.replace(ft, optimizer="Adafactor"), p).total < 24 * GIB
    assert predict(dataclasses.replace(ft, optimizer="AdamW8bit"), p).total > 24 * GIB
    assert predict(dataclasses.replace(ft, optimizer="AdamW"), p).total > 24 * GIB
    # the fused backward pass lowers it further
    fused = predict(dataclasses.replace(ft, optimizer="Adafactor", fused_backward=True), p)
    assert fused.total < predict(dataclasses.replace(ft, optimizer="Adafactor"), p).total - 4 * GIB


# -- the command -----------------------------------------------------------------------------


def test_plan_command_on_seed003(tmp_path: Path, cli_runner) -> None:
    from sdprep.cli import cli

    (tmp_path / "config.toml").write_text(SEED_003_LORA)
    result = cli_runner.invoke(cli, ["train", "--config", str(tmp_path / "config.toml"), "--plan"])
    assert result.exit_code == 0, result.output
    out = result.output
    for line in (
        "U-Net weights",
        "optimizer state",
        "activations: U-Net",
        "peak of live tensors",
        "+ margin",
    ):
        assert line in out
    assert "allocator overhead and CUDA workspaces" in out
    for budget in (8, 12, 16, 24):
        assert f"{budget:>2} GB: " in out


def test_plan_command_loads_no_model_and_stays_small(tmp_path: Path) -> None:
    """--plan imports no torch and allocates nothing large: its peak RSS stays under 1 GB."""
    (tmp_path / "config.toml").write_text(SEED_003_LORA)
    script = textwrap.dedent(
        f"""
        import sys
        from sdprep.cli import main
        try:
            main(["train", "--config", {str(tmp_path / "config.toml")!r}, "--plan"])
        except SystemExit as exc:
            assert not exc.code, exc.code
        # VmHWM: this process's own peak (ru_maxrss after fork+exec still holds the parent's peak)
        hwm = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
        print("torch" in sys.modules, hwm)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=os.environ, timeout=300
    )
    assert out.returncode == 0, out.stderr
    torch_loaded, rss_kb = out.stdout.split()[-2:]
    assert torch_loaded == "False"
    assert int(rss_kb) < 1_000_000


@pytest.mark.parametrize("method", ["ti", "finetune"])
def test_plan_summary_line(tmp_path: Path, method: str) -> None:
    from sdprep.train.memory.planner import plan_summary

    line = plan_summary(seed003_cfg(tmp_path), method)
    assert "GiB of GPU memory on SDXL 1.0" in line and "8 GB" in line and "24 GB" in line


@pytest.mark.parametrize("te_cached", [True, False])
@pytest.mark.parametrize("latents_cached", [True, False])
@pytest.mark.parametrize("te_trained", [True, False])
def test_planner_and_trainer_agree_on_what_leaves_the_gpu(
    tmp_path: Path, te_cached: bool, latents_cached: bool, te_trained: bool
) -> None:
    from sdprep.train.loop.trainer import offloaded_parts

    cfg = dataclasses.replace(
        seed003_cfg(tmp_path),
        cache_text_encoder_outputs=te_cached,
        cache_text_encoder_outputs_to_disk=False,
        cache_latents=latents_cached,
        cache_latents_to_disk=False,
        network_train_unet_only=not te_trained,
    )
    s = settings_from_config(cfg, "lora")
    parts = offloaded_parts(cfg, trains_text=te_trained)
    assert ("text_encoders" in parts) == (s.text == "cached")
    assert ("vae" in parts) == s.latents_cached


def test_fitting_settings_stops_text_encoder_training_then_caches() -> None:
    s = Settings(rank=8, text="lora")
    keys, _ = fitting_settings(s, toy_profile(), 4)
    assert keys[:2] == ["network_train_unet_only = true", "cache_text_encoder_outputs = true"]


def test_smaller_batches_keep_the_effective_batch() -> None:
    """Only divisors of the batch are offered: accumulation x batch is the batch configured."""
    for batch, expected in ((5, [1]), (6, [3, 2, 1]), (7, [1]), (8, [4, 2, 1])):
        offered = []
        for variant, keys, _ in _batch_and_resolution(Settings(batch=batch)):
            if keys and keys[0].startswith("train_batch_size"):
                steps = int(keys[0].rsplit("x", 1)[1].rstrip(")"))
                assert keys[0] == f"train_batch_size = {variant.batch} (gradient_accumulation_steps x{steps})"
                assert variant.batch * steps == batch, keys[0]
                offered.append(variant.batch)
        assert sorted(set(offered), reverse=True) == expected, batch
    keys, plan = fitting_settings(Settings(rank=8, batch=5), toy_profile(), 4)
    assert "train_batch_size = 1 (gradient_accumulation_steps x5)" in keys
    assert plan.settings.batch == 1


def test_suggested_mixed_precision_keeps_no_half_vae(tmp_path: Path) -> None:
    """A config with no_half_vae keeps its VAE in fp32 when the plan suggests bf16: the figure is
    the one that config runs at, and turning no_half_vae off is a change of its own."""
    cfg = dataclasses.replace(
        seed003_cfg(tmp_path),
        mixed_precision="no",
        no_half_vae=True,
        cache_latents=False,
        cache_latents_to_disk=False,
        color_aug=True,  # latents cannot be cached
        optimizer_type="AdamW8bit",
        train_batch_size=1,
    )
    s = settings_from_config(cfg, "lora")
    assert (s.half, s.no_half_vae, s.vae_half, s.latents_cached) == (False, True, False, False)
    p = full_size_profile()
    keys, plan = fitting_settings(s, p, 12)
    assert keys == ['mixed_precision = "bf16"']
    assert (
        not plan.settings.vae_half
        and part(plan, "VAE") == 4 * p.stats["params"]["vae"] + p.stats["buffers"]["vae"]
    )
    assert plan.total == predict(dataclasses.replace(s, half=True), p).total  # what the changed config runs
    keys, plan = fitting_settings(s, p, 8)
    assert keys[0] == 'mixed_precision = "bf16"' and keys[1].startswith("no_half_vae = false")
    assert plan.settings.vae_half and plan.total <= 8 * GIB
    assert predict(dataclasses.replace(plan.settings, no_half_vae=True), p).total > 8 * GIB
