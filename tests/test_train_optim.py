"""Optimizers by kohya's names: the same classes kohya builds, stepping on CPU; a missing package is one
error naming sdprep's `optim` extra, raised before any model loads; schedule-free ones save their average."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_support import PAIR, errors_without, lora_cfg, make_dataset

from sdprep.errors import InstallError
from sdprep.train.loop.optim import build_optimizer, eval_mode, is_schedule_free, require_optimizer

torch.set_num_threads(1)

# What kohya sd-scripts' train_util.get_optimizer (48d368f) builds for each optimizer_type, found by
# running it (bitsandbytes 0.50.2, prodigyopt 1.1.2, dadaptation 3.2, lion-pytorch 0.2.5,
# schedulefree 1.4.1, came-pytorch 0.1.3). Its help also names AdEMAMix8bit / PagedAdEMAMix8bit, which
# it then fails to build (it looks them up in torch.optim); sdprep builds bitsandbytes' classes.
KOHYA_CLASSES = {
    "AdamW": "torch.optim.adamw.AdamW",
    "AdamW8bit": "bitsandbytes.optim.adamw.AdamW8bit",
    "PagedAdamW": "bitsandbytes.optim.adamw.PagedAdamW",
    "PagedAdamW8bit": "bitsandbytes.optim.adamw.PagedAdamW8bit",
    "PagedAdamW32bit": "bitsandbytes.optim.adamw.PagedAdamW32bit",
    "Lion": "lion_pytorch.lion_pytorch.Lion",
    "Lion8bit": "bitsandbytes.optim.lion.Lion8bit",
    "PagedLion8bit": "bitsandbytes.optim.lion.PagedLion8bit",
    "SGDNesterov": "torch.optim.sgd.SGD",
    "SGDNesterov8bit": "bitsandbytes.optim.sgd.SGD8bit",
    "Adafactor": "transformers.optimization.Adafactor",
    "Prodigy": "prodigyopt.prodigy.Prodigy",
    "DAdaptation": "dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint",
    "DAdaptAdamPreprint": "dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint",
    "DAdaptAdam": "dadaptation.dadapt_adam.DAdaptAdam",
    "DAdaptAdaGrad": "dadaptation.dadapt_adagrad.DAdaptAdaGrad",
    "DAdaptAdan": "dadaptation.dadapt_adan.DAdaptAdan",
    "DAdaptAdanIP": "dadaptation.experimental.dadapt_adan_ip.DAdaptAdanIP",
    "DAdaptLion": "dadaptation.dadapt_lion.DAdaptLion",
    "DAdaptSGD": "dadaptation.dadapt_sgd.DAdaptSGD",
    "AdamWScheduleFree": "schedulefree.adamw_schedulefree.AdamWScheduleFree",
    "RAdamScheduleFree": "schedulefree.radam_schedulefree.RAdamScheduleFree",
    "SGDScheduleFree": "schedulefree.sgd_schedulefree.SGDScheduleFree",
    "came_pytorch.CAME": "came_pytorch.CAME.CAME",
}
SDPREP_ONLY = {
    "AdEMAMix8bit": "bitsandbytes.optim.ademamix.AdEMAMix8bit",
    "PagedAdEMAMix8bit": "bitsandbytes.optim.ademamix.PagedAdEMAMix8bit",
    "CAME": "came_pytorch.CAME.CAME",
}
# optimizer_type -> the package it needs from the optim extra
NEEDS = {
    "AdamW8bit": "bitsandbytes",
    "Lion": "lion_pytorch",
    "Prodigy": "prodigyopt",
    "DAdaptation": "dadaptation",
    "AdamWScheduleFree": "schedulefree",
    "CAME": "came_pytorch",
    "came_pytorch.CAME": "came_pytorch",
}


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("name", [*KOHYA_CLASSES, *SDPREP_ONLY])
def test_each_kohya_optimizer_is_kohyas_class_and_trains_on_cpu(name: str) -> None:
    want = {**KOHYA_CLASSES, **SDPREP_ONLY}[name]
    if not _installed(want.split(".")[0]):
        pytest.skip(f"{want.split('.')[0]} is not installed (sdprep's optim extra)")
    torch.manual_seed(0)
    # 64x64 = 4096 elements: bitsandbytes keeps 8-bit state from this size up
    weight = torch.nn.Parameter(torch.randn(64, 64))
    start = weight.detach().clone()
    opt, desc = build_optimizer(name, [{"params": [weight], "lr": 1e-3, "name": "unet"}], 1e-3, {})
    assert f"{type(opt).__module__}.{type(opt).__name__}" == want
    for _ in range(6):  # RAdam's rectification holds still for the first steps
        weight.grad = torch.randn_like(weight)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert torch.isfinite(weight).all()
    assert (weight - start).abs().max() > 0  # it stepped
    if name.endswith("8bit") and not name.endswith("32bit"):
        dtypes = {v.dtype for k, v in opt.state[weight].items() if k.startswith("state")}  # the moments
        assert dtypes == {torch.uint8}, f"{name} keeps {dtypes} state, not 8-bit"
    if name == "SGDNesterov":  # kohya adds nesterov=True and momentum 0.9
        assert opt.param_groups[0]["nesterov"] is True and opt.param_groups[0]["momentum"] == 0.9
    if name == "SGDNesterov8bit":  # bitsandbytes keeps the momentum as betas[0] (and drops nesterov)
        assert opt.param_groups[0]["betas"][0] == 0.9


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_a_missing_package_is_one_error_naming_the_optim_extra(name: str, monkeypatch) -> None:
    module = NEEDS[name]
    for loaded in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, loaded)
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError, find_spec returns None
    with pytest.raises(InstallError) as err:
        require_optimizer(name)
    assert err.value.message == (
        f"optimizer_type {name} needs the `{module.replace('_', '-')}` package, which is not installed: "
        "install sdprep's optim extra (pip install 'sdprep[optim]')"
    )
    with pytest.raises(InstallError, match=r"sdprep\[optim\]"):
        build_optimizer(name, [{"params": [torch.nn.Parameter(torch.zeros(2))]}], 1e-3, {})


def test_optimizers_that_need_nothing_extra_pass_the_check() -> None:
    for name in ("AdamW", "Adafactor", "SGDNesterov", "RMSprop", "torch.optim.SGD", None):
        require_optimizer(name)


def test_missing_package_stops_the_run_before_the_model_loads(cli_runner, tmp_path, monkeypatch) -> None:
    settings = 'network_module = "networks.lora"\noptimizer_type = "AdamW8bit"\n'
    assert errors_without(cli_runner, tmp_path, monkeypatch, "bitsandbytes", settings) == [
        "Error: optimizer_type AdamW8bit needs the `bitsandbytes` package, which is not installed: "
        "install sdprep's optim extra (pip install 'sdprep[optim]')"
    ]


@pytest.mark.skipif(not _installed("schedulefree"), reason="schedulefree is not installed (optim extra)")
def test_eval_mode_swaps_in_the_schedule_free_average_and_back() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8))
    opt, _ = build_optimizer("AdamWScheduleFree", [{"params": [w], "lr": 1e-2}], 1e-2, {})
    assert is_schedule_free(opt) and opt.param_groups[0]["train_mode"]
    for _ in range(5):
        w.grad = torch.randn_like(w)
        opt.step()
    train_weights = w.detach().clone()
    with eval_mode(opt):
        averaged = w.detach().clone()
        assert not opt.param_groups[0]["train_mode"]
    assert opt.param_groups[0]["train_mode"]
    assert (averaged - train_weights).abs().max() > 1e-6  # eval weights are the average, not y
    assert torch.allclose(w.detach(), train_weights, atol=1e-6)  # and back
    plain, _ = build_optimizer("AdamW", [{"params": [w]}], 1e-2, {})
    with eval_mode(plain):  # a no-op for the others
        assert not is_schedule_free(plain)


@pytest.mark.skipif(not _installed("schedulefree"), reason="schedulefree is not installed (optim extra)")
def test_schedule_free_lora_saves_the_averaged_weights(tiny_sdxl: Path, tmp_path: Path) -> None:
    from sdprep.train.loop.trainer import RecordingCallbacks, Trainer

    data = make_dataset(tmp_path / "data", images=PAIR, repeats=1)
    cfg = lora_cfg(
        tiny_sdxl,
        data,
        tmp_path / "out",
        optimizer_type="AdamWScheduleFree",
        lr_scheduler="cosine",
        learning_rate=1e-2,
        max_train_steps=3,
    )
    trainer = Trainer(cfg, callbacks=RecordingCallbacks())
    trainer.setup()
    assert any("schedule-free: lr_scheduler and lr_warmup_steps are ignored" in n for n in trainer.notes)
    trainer.run()
    saved = load_file(str(trainer.result.output))
    assert trainer.optimizer.param_groups[0]["train_mode"]  # training mode again after the save
    in_train_mode = {k: v.clone() for k, v in trainer.method.export_tensors(torch.float32).items()}
    trainer.optimizer.eval()
    averaged = trainer.method.export_tensors(torch.float32)
    ups = [k for k in saved if k.endswith("lora_up.weight")]
    # eval -> train -> eval is exact up to float rounding; train-mode weights differ by far more
    assert max((saved[k] - averaged[k]).abs().max() for k in ups) < 1e-6
    assert max((saved[k] - in_train_mode[k]).abs().max() for k in ups) > 1e-4
