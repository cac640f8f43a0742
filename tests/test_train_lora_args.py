"""networks.lora's network_args as kohya: SDXL block dims / alphas / lr weights, LoRA+ groups,
neuron / rank / module dropout. Facts come from running kohya's networks/lora.py
(tests/assets/kohya_lora_network_args.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_support import PAIR, lora_cfg, make_dataset, merge_kohya_file, run_trainer, unet_inputs

from sdprep.train.methods.lora_args import (
    SDXL_BLOCKS,
    add_dropout,
    block_index,
    block_lr_weights,
    parse_blocks,
    plus_groups,
)

torch.set_num_threads(1)
KOHYA = json.loads((Path(__file__).parent / "assets" / "kohya_lora_network_args.json").read_text())
LR_CASES = {
    "down_cosine+0.1": {"down_lr_weight": "cosine+0.1"},
    "mid_only": {"mid_lr_weight": "0.5,0,2"},
    "up_linear_threshold": {"up_lr_weight": "linear", "block_lr_zero_threshold": "0.3"},
    "short_lists": {
        "down_lr_weight": "0.5,0.25",
        "up_lr_weight": "1,1,1,1,1,1,1,1,1,1,1",
        "mid_lr_weight": "0",
    },
    "sine_reverse": {"down_lr_weight": "sine", "up_lr_weight": "reverse_linear+0.5"},
    "zeros": {"down_lr_weight": "zeros"},
}
DIMS = ",".join(str(i % 5) for i in range(23))
ALPHAS = ",".join(str(i / 2) for i in range(23))


def test_sdxl_block_index_is_kohyas() -> None:
    got = {name: block_index(name) for name in KOHYA["blocks"]["block_index"]}
    assert got == KOHYA["blocks"]["block_index"]


@pytest.mark.parametrize("case", sorted(LR_CASES))
def test_block_lr_weights_are_kohyas(case: str) -> None:
    assert block_lr_weights(LR_CASES[case]) == pytest.approx(KOHYA["blocks"]["lr_weight"][case])
    assert block_lr_weights({}) is None


@pytest.mark.parametrize(
    ("case", "args", "conv"),
    [
        ("dims_only", {"block_dims": DIMS}, (None, None)),
        ("dims_alphas_conv", {"block_dims": DIMS, "block_alphas": ALPHAS}, (2, 1.0)),
        # kohya needs block_dims or lr weights to look at conv_block_dims: with lr weights given
        ("conv_block", {"conv_block_dims": DIMS}, (None, 3.0)),
    ],
)
def test_block_dims_and_alphas_are_kohyas(case, args, conv) -> None:
    want = KOHYA["blocks"]["dims"][case]
    with_lr = {**args, "down_lr_weight": "1,0,1"}  # block 2 (input_blocks 1) gets lr weight 0
    got = parse_blocks(with_lr, 8, 4.0, *conv)
    dims, alphas, conv_dims, conv_alphas = want["after_lr_weight_1,0,1"]
    assert got.dims == dims and got.alphas == pytest.approx(alphas)
    assert got.conv_dims == conv_dims
    assert (got.conv_alphas is None) == (conv_alphas is None)
    if conv_alphas is not None:
        assert got.conv_alphas == pytest.approx(conv_alphas)
    if "block_dims" in args:  # without lr weights: the dims as kohya sets them up
        plain = parse_blocks(args, 8, 4.0, *conv)
        assert plain.dims == want["dims_alphas"][0] and plain.lr_weight is None
    assert len(got.dims) == SDXL_BLOCKS


def test_plus_groups_put_the_up_weights_at_lr_times_ratio() -> None:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    params = [("x.lora_A.default.weight", a), ("x.lora_B.default.weight", b)]
    groups = plus_groups("unet", params, 1e-4, 16.0)
    assert [(g["name"], g["lr"], g["params"]) for g in groups] == [
        ("unet", 1e-4, [a]),
        ("unet plus", pytest.approx(1.6e-3), [b]),
    ]
    assert [(g["name"], g["params"]) for g in plus_groups("te1", params, 1e-4, None)] == [("te1", [a, b])]


@pytest.mark.parametrize("case", ["linear_3d", "linear_2d", "conv3x3"])
def test_dropouts_compute_what_kohyas_lora_module_computes(case: str) -> None:
    """Same weights, same seeds: kohya's LoRAModule (train mode, dropout 0.2, rank_dropout 0.3,
    module_dropout 0.25) and a peft layer with add_dropout give the same outputs."""
    from peft import LoraConfig

    from sdprep.train.methods.lora import inject_lora

    data = KOHYA["dropout"][case]
    t = {k: torch.tensor(v) for k, v in data["tensors"].items()}
    org = torch.nn.Conv2d(4, 6, 3, padding=1) if case == "conv3x3" else torch.nn.Linear(8, 6)
    root = torch.nn.Module()
    root.layer = org
    with torch.no_grad():
        org.weight.copy_(t["org.weight"])
        org.bias.copy_(t["org.bias"])
    inject_lora(root, LoraConfig(r=4, lora_alpha=2.0, target_modules=["layer"]))
    layer = root.layer
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(t["down"])
        layer.lora_B["default"].weight.copy_(t["up"].reshape(layer.lora_B["default"].weight.shape))
    add_dropout(layer, 0.2, 0.3, 0.25)
    root.train()
    skipped = 0
    for seed, want in enumerate(data["train_outputs"]):
        torch.manual_seed(seed)
        with torch.no_grad():
            got = layer(t["x"])
        assert torch.allclose(got, torch.tensor(want), atol=1e-5, rtol=1e-5), f"seed {seed}"
        skipped += bool(layer.disable_adapters)
    assert 0 < skipped < len(data["train_outputs"])  # module dropout both hit and missed
    root.eval()
    with torch.no_grad():
        assert torch.allclose(layer(t["x"]), torch.tensor(data["eval_output"]), atol=1e-5)
    assert not layer.disable_adapters  # eval mode never skips


BLOCK_ARGS = [
    "block_dims=" + ",".join(["4"] * 10 + ["2"] * 3 + ["8"] * 10),  # input 4, middle 2, output 8
    "block_alphas=" + ",".join(["2"] * 10 + ["1"] * 13),
    "down_lr_weight=1,1,1,1,0,1,1,1,1",  # input_blocks 4 (block 5): no LoRA
    "up_lr_weight=linear",
    "loraplus_lr_ratio=16",
    "loraplus_text_encoder_lr_ratio=4",
    "rank_dropout=0.1",
    "module_dropout=0.1",
]


@pytest.fixture(scope="module")
def block_run(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("blocks")
    data = make_dataset(root / "data", images=PAIR, repeats=1)
    cfg = lora_cfg(
        tiny_sdxl,
        data,
        root / "out",
        network_dim=4,
        network_alpha=2,
        network_args=BLOCK_ARGS,
        network_dropout=0.1,
        network_train_unet_only=False,
        unet_lr=1e-3,
        text_encoder_lr=5e-4,
        max_train_steps=3,
    )
    return run_trainer(cfg)


def test_block_dims_alphas_and_lr_weights_shape_the_network(block_run) -> None:
    tensors = load_file(str(block_run.result.output))
    downs = {k[: -len(".lora_down.weight")]: v for k, v in tensors.items() if k.endswith(".lora_down.weight")}
    unet = {k: v for k, v in downs.items() if k.startswith("lora_unet_")}
    ranks = {block_index(k): v.shape[0] for k, v in unet.items()}
    assert 5 not in ranks  # lr weight 0: kohya creates no module there
    assert {i: r for i, r in ranks.items() if i <= 9} == {i: 4 for i in ranks if i <= 9}
    assert {i: r for i, r in ranks.items() if 10 <= i <= 12} == {i: 2 for i in ranks if 10 <= i <= 12}
    assert {i: r for i, r in ranks.items() if i >= 13} == {i: 8 for i in ranks if i >= 13}
    for name in unet:
        assert float(tensors[f"{name}.alpha"]) == (2.0 if block_index(name) <= 9 else 1.0)
    te = [k for k in downs if k.startswith("lora_te")]
    assert te and all(downs[k].shape[0] == 4 and float(tensors[f"{k}.alpha"]) == 2.0 for k in te)
    meta_args = json.loads(block_run.saver.metadata(block_run.pos, None)["ss_network_args"])
    assert meta_args["rank_dropout"] == "0.1" and meta_args["loraplus_lr_ratio"] == "16"


def test_param_groups_per_block_with_loraplus(block_run) -> None:
    groups = block_run.method.param_groups()
    lrs = {g["name"]: g["lr"] for g in groups}
    weights = block_lr_weights(dict(a.split("=", 1) for a in BLOCK_ARGS))
    for name, lr in lrs.items():
        if name.startswith("unet_block"):
            idx = int(name.split()[0][len("unet_block") :])
            assert lr == pytest.approx(1e-3 * weights[idx] * (16 if name.endswith(" plus") else 1))
    assert (
        lrs["te1"] == 5e-4
        and lrs["te1 plus"] == pytest.approx(2e-3)
        and lrs["te2 plus"] == pytest.approx(2e-3)
    )
    assert "unet_block5" not in lrs
    for g in groups:
        plus = g["name"].endswith(" plus")
        names = {id(p) for p in g["params"]}
        named = {id(p): n for m in block_run.method._components().values() for n, p in m.named_parameters()}
        assert all(("lora_B" in named[i]) == plus for i in names)
    # the optimizer got exactly these groups and learning rates (as logged)
    assert [g["lr"] for g in block_run.optimizer.param_groups] == [g["lr"] for g in groups]


def test_the_trained_file_reproduces_the_merged_network(block_run, tiny_sdxl: Path) -> None:
    """Per-module ranks and alphas survive the file: merging it as A1111 / ComfyUI do gives the trained
    network's outputs. (diffusers 0.42's load_lora_weights loses per-module alphas of attention layers
    in kohya files: it warns that its alpha_pattern keys match nothing.)"""
    from sdprep.train.models.load import load_sdxl

    unet = block_run.model.unet
    unet.eval()  # no dropout: the network as it is saved
    sample, t, enc, added = unet_inputs()
    with torch.no_grad():
        want = unet(sample, t, enc, added_cond_kwargs=added).sample
    fresh = load_sdxl(tiny_sdxl).unet.eval()
    with torch.no_grad():
        base = fresh(sample, t, enc, added_cond_kwargs=added).sample
    merge_kohya_file(fresh, load_file(str(block_run.result.output)))
    with torch.no_grad():
        got = fresh(sample, t, enc, added_cond_kwargs=added).sample
    assert (want - base).abs().max() > 1e-4
    assert (want - got).abs().max() < 1e-5
