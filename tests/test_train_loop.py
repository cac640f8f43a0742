"""The training loop on the tiny model: learning, masks, NaN stops, predicates, samples and TensorBoard."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from train_support import lora_cfg, make_dataset

from sdprep.errors import ConfigError, TrainingError
from sdprep.train.loop.trainer import (
    RecordingCallbacks,
    Trainer,
    schedule,
    should_sample,
    should_save,
    train,
)

torch.set_num_threads(1)


def _fixed_loss(trainer: Trainer, batch: dict) -> float:
    from sdprep.train.loop.step import batch_loss

    for module in trainer.train_modules:
        module.eval()
    saved = trainer.ctx.generator.get_state()
    trainer.ctx.generator.manual_seed(123)  # the same noise and timesteps before and after training
    try:
        with torch.no_grad():
            return sum(float(batch_loss(trainer.ctx, batch)) for _ in range(4)) / 4
    finally:
        trainer.ctx.generator.set_state(saved)


def test_loss_on_a_fixed_batch_decreases(tiny_sdxl: Path, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", images=["c_square.webp"], repeats=1, side=64)
    cfg = lora_cfg(tiny_sdxl, data, tmp_path / "out", learning_rate=3e-2, max_train_steps=12, network_dim=8)
    trainer = Trainer(cfg, callbacks=RecordingCallbacks())
    trainer.setup()
    batch = next(trainer.dataset.batches(0))
    before = _fixed_loss(trainer, batch)
    trainer.run()
    after = _fixed_loss(trainer, batch)
    assert after < before * 0.92, (before, after)


def test_masks_are_used_and_black_pixels_get_no_gradient(tiny_sdxl: Path, tmp_path: Path) -> None:
    from sdprep.train.loop.step import batch_loss

    data = make_dataset(
        tmp_path / "data", images=["c_square.webp"], repeats=1, masks={"c_square.webp": "left"}
    )
    cfg = lora_cfg(tiny_sdxl, data, tmp_path / "out", masked_loss=True, cache_latents=False)
    cb = RecordingCallbacks()
    trainer = Trainer(cfg, callbacks=cb)
    trainer.setup()
    assert any(line.startswith("masks: 1 of 1 images") for line in trainer.banner()), trainer.banner()
    batch = next(trainer.dataset.batches(0))
    assert batch["mask"] is not None and batch["mask"].shape[-2:] == batch["pixels"].shape[-2:]

    outputs = {}
    unet = trainer.ctx.unet

    class Spy(torch.nn.Module):
        def forward(self, *args, **kwargs):
            out = unet(*args, **kwargs)
            out.sample.retain_grad()
            outputs["pred"] = out.sample
            return out

    def pred_grad(ctx, batch: dict) -> torch.Tensor:
        """d loss / d prediction of the first sample, with the same noise and timestep every call."""
        ctx.unet = Spy()
        with torch.random.fork_rng():  # the VAE samples latents from the global RNG
            torch.manual_seed(0)
            ctx.generator.manual_seed(0)
            batch_loss(ctx, batch).backward()
        return outputs["pred"].grad[0]

    grad = pred_grad(trainer.ctx, batch)
    half = grad.shape[-1] // 2
    assert grad[..., half:].abs().max() == 0  # right half black: no gradient at all
    assert grad[..., :half].abs().min() > 0

    unmasked = dataclasses.replace(trainer.ctx, cfg=dataclasses.replace(cfg, masked_loss=False))
    full = pred_grad(unmasked, dict(batch, mask=None))  # masked_loss off: no mask file is attached
    assert full[..., half:].abs().max() > 0
    assert torch.allclose(grad[..., :half], full[..., :half])  # white: the plain loss

    # kohya: a mask in the batch (alpha_mask without masked_loss) weights the loss all the same
    assert torch.equal(pred_grad(unmasked, batch), grad)

    # grey (128/255) halves the gradient: same noise, same timestep, mask replaced
    grey = dict(batch, mask=batch["mask"].clone())
    grey["mask"][..., grey["mask"].shape[-1] // 2 :] = 128 / 255
    halved = pred_grad(trainer.ctx, grey)
    assert torch.allclose(halved[..., half:], full[..., half:] * 128 / 255, rtol=1e-4, atol=1e-9)


def test_masked_loss_without_any_mask_is_an_error(tiny_sdxl: Path, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", images=["c_square.webp"], repeats=1)
    cfg = lora_cfg(tiny_sdxl, data, tmp_path / "out", masked_loss=True)
    with pytest.raises(ConfigError, match="masked_loss is on but no training image has a mask"):
        Trainer(cfg).setup()


class Corrupt(RecordingCallbacks):
    """Puts a NaN into the trained weights after optimizer step `at`."""

    def __init__(self, trainer_box: list, at: int) -> None:
        super().__init__()
        self.box, self.at = trainer_box, at

    def step(self, step: int, epoch: int, loss: float, lr: float) -> None:
        super().step(step, epoch, loss, lr)
        if step == self.at:
            with torch.no_grad():
                self.box[0].method.trainable_parameters()[0].fill_(float("nan"))


def corrupted_trainer(tiny_sdxl: Path, tmp_path: Path, *, at: int, save_every: int) -> tuple[Trainer, Path]:
    """A 6-step run whose first trainable tensor becomes NaN after step `at`; returns it and its output dir."""
    data = make_dataset(tmp_path / "data", images=["c_square.webp"], repeats=1)
    out = tmp_path / "out"
    cfg = lora_cfg(tiny_sdxl, data, out, max_train_steps=6, save_every_n_steps=save_every)
    box: list = []
    trainer = Trainer(cfg, callbacks=Corrupt(box, at=at))
    box.append(trainer)
    trainer.setup()
    return trainer, out


def test_nan_loss_stops_the_run_and_keeps_the_last_good_file(tiny_sdxl: Path, tmp_path: Path) -> None:
    trainer, out = corrupted_trainer(tiny_sdxl, tmp_path, at=3, save_every=2)
    with pytest.raises(TrainingError, match="the loss became nan at step 4: training stopped") as err:
        trainer.run()
    assert "files saved before this step were verified and are kept" in str(err.value)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["tiny-step00000002.safetensors"]


def test_a_save_that_fails_its_check_stops_the_run(tiny_sdxl: Path, tmp_path: Path) -> None:
    trainer, out = corrupted_trainer(tiny_sdxl, tmp_path, at=2, save_every=1)
    with pytest.raises(TrainingError, match="tiny-step00000002.safetensors failed its check"):
        trainer.run()
    assert sorted(p.name for p in out.iterdir()) == ["tiny-step00000001.safetensors"]


def test_samples_and_tensorboard_events(tiny_sdxl: Path, tmp_path: Path) -> None:
    from sdprep.train.loop.logs import read_image_tags, read_scalars

    data = make_dataset(tmp_path / "data", images=["c_square.webp", "e_sepia.jpg"], repeats=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\nmytoken, 1girl --n lowres --w 64 --h 64 --d 5 --l 5 --s 2 --ss euler_a\n")
    cfg = lora_cfg(
        tiny_sdxl,
        data,
        tmp_path / "out",
        max_train_steps=3,
        logging_dir=str(tmp_path / "logs"),
        log_prefix="run_",
        sample_prompts=str(prompts),
        sample_every_n_steps=2,
        sample_at_first=True,
        mixed_precision="bf16",
        lr_scheduler="linear",
    )
    cb = RecordingCallbacks()
    result = train(cfg, callbacks=cb)
    names = sorted(p.name for p in (tmp_path / "out" / "sample").iterdir())
    assert len(names) == 2
    assert names[0].startswith("tiny_000000_00_") and names[0].endswith("_5.png")
    assert names[1].startswith("tiny_000002_00_")
    assert result.log_dir is not None and result.log_dir.name.startswith("run_")
    scalars = read_scalars(result.log_dir)
    assert [s for s, _ in scalars["loss/current"]] == [1, 2, 3]
    assert [v for _, v in scalars["loss/current"]] == pytest.approx([loss for _, loss in cb.losses])
    lrs = [v for _, v in scalars["lr/unet"]]
    assert lrs[0] > lrs[1] > lrs[2] >= 0  # linear decay
    assert set(read_image_tags(result.log_dir)) == {"sample/00"}


def test_predicates_and_schedule() -> None:
    from sdprep.train.config.schema import TrainConfig

    cfg = TrainConfig(
        save_every_n_steps=5, save_every_n_epochs=2, sample_prompts=Path("p.txt"), sample_every_n_steps=3
    )
    assert [s for s in range(1, 16) if should_save(cfg, step=s, total=15)] == [5, 10]  # 15 is the final save
    assert [e for e in range(1, 7) if should_save(cfg, epoch=e, total=6)] == [2, 4]
    assert [s for s in range(0, 10) if should_sample(cfg, step=s)] == [3, 6, 9]
    assert should_sample(dataclasses.replace(cfg, sample_at_first=True), step=0)
    by_epoch = dataclasses.replace(cfg, sample_every_n_epochs=2)
    assert not should_sample(by_epoch, step=6)  # epochs win over steps, as kohya
    assert should_sample(by_epoch, step=6, epoch=2) and not should_sample(by_epoch, step=6, epoch=3)
    assert not should_sample(dataclasses.replace(cfg, sample_prompts=None), step=3)
    # 10 batches, accumulation 4 -> 3 steps per epoch (kohya rounds up)
    assert schedule(10, TrainConfig(gradient_accumulation_steps=4, max_train_steps=7)) == (3, 7, 3)
    assert schedule(10, TrainConfig(max_train_epochs=2)) == (10, 20, 2)


def test_save_last_n_removes_older_periodic_saves(tmp_path: Path) -> None:
    from sdprep.train.config.schema import TrainConfig
    from sdprep.train.save.weights import remove_saves, stale_saves

    cfg = TrainConfig(
        save_every_n_steps=10, save_last_n_steps=25, save_every_n_epochs=1, save_last_n_epochs=2
    )
    assert stale_saves(cfg, step=30, epoch=None) == []  # 30 - 26 = 4 -> 0: nothing yet
    assert stale_saves(cfg, step=40, epoch=None) == [{"step": 10}]
    assert stale_saves(cfg, step=None, epoch=5) == [{"epoch": 3}]
    (tmp_path / "x-step00000010.safetensors").write_bytes(b"1")
    (tmp_path / "x-step00000010-state").mkdir()
    (tmp_path / "x-step00000020.safetensors").write_bytes(b"1")
    remove_saves(tmp_path, "x", ".safetensors", [{"step": 10}])
    assert [p.name for p in tmp_path.iterdir()] == ["x-step00000020.safetensors"]


def test_single_file_checkpoint_loads_offline_with_model_config(tiny_sdxl: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from train_support import unet_inputs

    from sdprep.errors import ModelError
    from sdprep.train.models.load import load_sdxl
    from sdprep.train.save.sgm import pipeline_to_sgm

    ref = load_sdxl(tiny_sdxl)
    single = tmp_path / "model.safetensors"
    sd = pipeline_to_sgm(ref.unet, ref.text_encoder, ref.text_encoder_2, ref.vae)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(single))
    model = load_sdxl(single, model_config=tiny_sdxl)
    for module, loaded in [(ref.unet, model.unet), (ref.vae, model.vae)]:
        want_sd, got_sd = module.state_dict(), loaded.state_dict()
        assert want_sd.keys() == got_sd.keys()
        assert all(torch.equal(want_sd[k], got_sd[k]) for k in want_sd)  # the same weights, bit for bit
    sample, t, enc, added = unet_inputs()
    with torch.no_grad():
        want = ref.unet(sample, t, enc, added_cond_kwargs=added).sample
        got = model.unet(sample, t, enc, added_cond_kwargs=added).sample
    # same weights, but a memory-mapped file's storage may take another SIMD path: float32 rounding only
    assert (want - got).abs().max() < 1e-5
    with pytest.raises(ModelError) as err:
        load_sdxl(single)  # offline, no config: diffusers would fetch the hub's SDXL config
    assert "cannot load the single-file checkpoint" in str(err.value)
    assert "--model_config DIR" in str(err.value)
    from sdprep.train.config.schema import load_train_config

    cfg, _ = load_train_config(None, overrides={"model_config": str(tiny_sdxl)})  # also a config key
    assert cfg.model_config == tiny_sdxl


def test_a_folder_without_tokenizer_vocabulary_is_refused(tiny_sdxl: Path, tmp_path: Path) -> None:
    import shutil

    from sdprep.errors import ModelError
    from sdprep.train.models.load import load_sdxl

    broken = tmp_path / "model"
    shutil.copytree(tiny_sdxl, broken)
    for f in (broken / "tokenizer_2").iterdir():
        f.unlink()
    with pytest.raises(
        ModelError, match="tokenizer_2 has only [0-9] tokens: its vocabulary files are missing"
    ):
        load_sdxl(broken)


def test_optimizers_by_kohya_name() -> None:
    from sdprep.train.config.kohya import parse_kv_args, split_kv_args
    from sdprep.train.loop.optim import build_optimizer, build_scheduler, relative_adafactor

    params = [torch.nn.Parameter(torch.zeros(2))]
    groups = lambda: [{"params": params, "lr": 1e-3, "name": "unet"}]  # noqa: E731
    opt, desc = build_optimizer("adamw", groups(), 1e-3, {"weight_decay": 0.01})
    assert type(opt).__name__ == "AdamW" and desc == "AdamW(weight_decay=0.01)"
    assert type(build_optimizer("RMSprop", groups(), 1e-3, {})[0]).__name__ == "RMSprop"  # any torch.optim
    with pytest.raises(ConfigError, match='did you mean "AdamW"'):
        build_optimizer("AdamWW", groups(), 1e-3, {})
    # seed 001's fixed-lr Adafactor, written as one string the way its command line passes it
    args = parse_kv_args(
        split_kv_args("scale_parameter=False,relative_step=False,warmup_init=False", "optimizer_args")
    )
    fixed, _ = build_optimizer("Adafactor", groups(), 5e-6, args)
    assert not relative_adafactor(fixed) and fixed.param_groups[0]["lr"] == 1e-3
    auto, _ = build_optimizer("Adafactor", groups(), 5e-6, {})  # kohya's default: relative_step
    assert relative_adafactor(auto)
    assert (
        type(
            build_scheduler("adafactor", auto, warmup_steps=0, total_steps=10, args={"initial_lr": 5e-6})
        ).__name__
        == "AdafactorSchedule"
    )
    sched = build_scheduler("cosine", opt, warmup_steps=2, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0 and lrs[2] == pytest.approx(1e-3) and lrs[-1] < lrs[3]
    for name in ("cosine_with_min_lr", "warmup_stable_decay", "inverse_sqrt"):
        build_scheduler(name, opt, warmup_steps=1, total_steps=10)
    build_scheduler("piecewise_constant", opt, warmup_steps=0, total_steps=10, args={"step_rules": "1:5,0.1"})
    with pytest.raises(ConfigError, match="piecewise_constant needs step_rules"):
        build_scheduler("piecewise_constant", opt, warmup_steps=0, total_steps=10)
    with pytest.raises(ConfigError, match="unknown lr_scheduler"):
        build_scheduler("cosine_restart", opt, warmup_steps=0, total_steps=10)


def test_schedulers_as_kohya_builds_them() -> None:
    """kohya's get_scheduler_fix: extra lr_scheduler_args reach the schedule (seed 002's lr_end),
    lr_scheduler_type is any scheduler class, min-lr ratio and decay steps as kohya passes them."""
    from sdprep.train.loop.optim import build_scheduler

    def lrs(sched, opt, n=10):
        out = []
        for _ in range(n):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    def opt():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)

    o = opt()
    poly = lrs(build_scheduler("polynomial", o, warmup_steps=0, total_steps=10, args={"lr_end": 0.5}), o, 11)
    assert poly[-1] == pytest.approx(0.5)  # lr_end reached: 1 -> 0.5 linearly (power 1)
    assert poly[5] == pytest.approx(0.75)
    o = opt()
    cosine = lrs(
        build_scheduler(
            None, o, warmup_steps=0, total_steps=10, scheduler_type="CosineAnnealingLR", args={"T_max": 10}
        ),
        o,
        11,
    )
    assert (
        cosine[0] == 1.0 and cosine[10] == pytest.approx(0.0, abs=1e-12) and cosine[5] == pytest.approx(0.5)
    )
    o = opt()
    floor = lrs(
        build_scheduler("cosine_with_min_lr", o, warmup_steps=0, total_steps=10, min_lr_ratio=0.2), o, 11
    )
    assert floor[-1] == pytest.approx(0.2) and min(floor) == pytest.approx(0.2)
    o = opt()
    wsd = lrs(
        build_scheduler("warmup_stable_decay", o, warmup_steps=2, total_steps=10, decay_steps=0.4), o, 10
    )
    assert wsd[2:6] == [1.0] * 4 and wsd[7] < 1.0  # 2 warmup, 4 stable, 4 decay (0.4 of 10)
    o = opt()
    with pytest.raises(ConfigError, match='lr_scheduler_type "NoSuchLR": cannot import it'):
        build_scheduler(None, o, warmup_steps=0, total_steps=10, scheduler_type="NoSuchLR")
    with pytest.raises(ConfigError, match="lr_scheduler polynomial: .*lr_ending"):
        build_scheduler("polynomial", o, warmup_steps=0, total_steps=10, args={"lr_ending": 0.5})
