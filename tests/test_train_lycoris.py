"""LyCORIS networks (network_module = "lycoris.kohya"): the key names and shapes LyCORIS gives under
kohya on the real SDXL U-Net (tests/assets/lycoris_sdxl_unet_keys.json.gz, from running LyCORIS on
kohya's SGM U-Net), and trained files that LyCORIS's own loader (and, for LoCon, the A1111/ComfyUI
merge) turns back into exactly the trained network."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from train_support import (
    PAIR,
    errors_without,
    lora_cfg,
    make_dataset,
    merge_kohya_file,
    run_trainer,
    unet_inputs,
)

from sdprep.errors import ConfigError

pytest.importorskip("lycoris", reason="lycoris-lora is not installed (sdprep's lycoris extra)")
torch.set_num_threads(1)
ASSET = Path(__file__).parent / "assets" / "lycoris_sdxl_unet_keys.json.gz"
ORACLE_ARGS = {"locon": [], "loha": [], "lokr": ["factor=8"]}


def _cfg(**over):
    from sdprep.train.config.schema import load_train_config

    settings = {"network_module": "lycoris.kohya", "network_dim": 8, "network_alpha": 4, **over}
    return load_train_config(None, overrides=settings)[0]


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
def test_sdxl_unet_keys_are_the_ones_lycoris_writes_under_kohya(algo: str) -> None:
    """Full-size SDXL (diffusers layout, meta tensors): every saved key and shape is what LyCORIS
    writes on kohya's SGM U-Net with the same network_args, the names ComfyUI and A1111 load."""
    from sdprep.train.methods import make_method
    from sdprep.train.models.fullsize import FULL, build_components
    from sdprep.train.models.load import SDXLModel

    want = json.loads(gzip.decompress(ASSET.read_bytes()))[algo]
    with torch.device("meta"):
        unet, vae, te1, te2 = build_components(FULL)
    model = SDXLModel(unet, vae, te1, te2, None, None, scheduler_config={}, source="meta")  # no tokenizers
    args = [f"algo={algo}", "conv_dim=4", "conv_alpha=2", *ORACLE_ARGS[algo]]
    method = make_method("lora", _cfg(network_args=args, network_train_unet_only=True))
    method.setup(model, torch.float32)
    got = {k: list(v.shape) for k, v in method.export_tensors(torch.float32).items()}
    assert len(got) == len(want)
    assert got == want


@pytest.fixture(scope="module", params=["locon", "loha", "lokr"])
def trained(request, tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp(request.param)
    data = make_dataset(root / "data", images=PAIR, repeats=1)
    cfg = lora_cfg(
        tiny_sdxl,
        data,
        root / "out",
        network_module="lycoris.kohya",
        network_dim=4,
        network_alpha=2,
        network_args=[f"algo={request.param}", "conv_dim=4", "conv_alpha=1", "rank_dropout=0.1"],
        network_train_unet_only=False,
        learning_rate=5e-3,
        max_train_steps=3,
    )
    trainer = run_trainer(cfg)
    trainer.method.network.eval()
    return trainer


def test_the_file_has_kohya_names_and_lycoris_metadata(trained) -> None:
    path = trained.result.output
    tensors = load_file(str(path))
    modules = {k.split(".")[0] for k in tensors}
    unet = {m for m in modules if m.startswith("lora_unet_")}
    assert unet and all(m.split("_")[2] in ("input", "middle", "output") for m in unet)
    assert any(m.startswith("lora_te1_text_model_encoder_layers_") for m in modules)
    assert any(m.startswith("lora_te2_text_model_encoder_layers_") for m in modules)
    assert modules == unet | {
        m for m in modules if m.startswith(("lora_te1_text_model_", "lora_te2_text_model_"))
    }
    suffix = {"locon": "lora_down.weight", "loha": "hada_w1_a", "lokr": "lokr_w1"}[trained.method.algo]
    assert all(f"{m}.{suffix}" in tensors and f"{m}.alpha" in tensors for m in modules)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["algo"] == trained.method.algo


def _outputs(unet, te1, te2):
    sample, t, enc, added = unet_inputs()
    ids = torch.arange(1, 78).unsqueeze(0) % 100
    with torch.no_grad():
        return (
            unet(sample, t, enc, added_cond_kwargs=added).sample,
            te1(ids).last_hidden_state,
            te2(ids).text_embeds,
        )


def test_lycoris_loads_the_file_back_into_the_trained_network(trained, tiny_sdxl: Path, monkeypatch) -> None:
    """LyCORIS's own loader (create_network_from_weights, as kohya and LyCORIS's tools load a file),
    given the file with each kohya name mapped to the module it names, reproduces the trained
    network's outputs."""
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    from sdprep.train.methods.lycoris import NOT_IN_KOHYA
    from sdprep.train.models.load import load_sdxl
    from sdprep.train.save.sgm import UnetLayout, kohya_lora_names

    model = trained.model
    want = _outputs(model.unet.eval(), model.text_encoder.eval(), model.text_encoder_2.eval())
    fresh = load_sdxl(tiny_sdxl)
    base = _outputs(fresh.unet, fresh.text_encoder, fresh.text_encoder_2)
    paths = {}
    layout = UnetLayout.from_config(fresh.unet.config)
    roots = (("lora_unet", fresh.unet), ("lora_te1", fresh.text_encoder), ("lora_te2", fresh.text_encoder_2))
    for prefix, root in roots:
        layers = [n for n, m in root.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        for kname, path in kohya_lora_names(layers, prefix, layout).items():
            paths[kname] = f"{prefix}_{path}".replace(".", "_")  # LyCORIS's name on this model
    sd = {}
    for key, tensor in load_file(str(trained.result.output)).items():
        module, _, rest = key.partition(".")
        sd[f"{paths[module]}.{rest}"] = tensor
    tes = [fresh.text_encoder, fresh.text_encoder_2]
    # the loader first builds the preset's network, which on a diffusers U-Net names time_embedding's
    # layers twice (by class and by name) and fails; the file's modules replace that network anyway
    monkeypatch.setattr(LycorisNetworkKohya, "TARGET_EXCLUDE_NAME", NOT_IN_KOHYA)
    network, weights = create_network_from_weights(1.0, None, None, tes, fresh.unet, weights_sd=sd)
    assert len(network.unet_loras) + len(network.text_encoder_loras) == len({k.split(".")[0] for k in sd})
    network.apply_to(tes, fresh.unet, apply_text_encoder=True, apply_unet=True)
    missing, unexpected = network.load_state_dict(weights, strict=False)
    assert not unexpected
    network.eval()
    got = _outputs(fresh.unet, fresh.text_encoder, fresh.text_encoder_2)
    assert (want[0] - base[0]).abs().max() > 1e-4  # the network does something
    for w, g in zip(want, got):
        assert (w - g).abs().max() < 1e-5


def test_locon_file_merges_like_a_kohya_lora(trained, tiny_sdxl: Path) -> None:
    """LoCon is LoRA on more layers: A1111 / ComfyUI merge its lora_down / lora_up / alpha as any
    kohya LoRA, and diffusers' load_lora_weights loads it; both give the trained U-Net."""
    if trained.method.algo != "locon":
        pytest.skip("LoCon only")
    from sdprep.train.models.load import load_sdxl

    unet = trained.model.unet.eval()
    sample, t, enc, added = unet_inputs()
    with torch.no_grad():
        want = unet(sample, t, enc, added_cond_kwargs=added).sample
    fresh = load_sdxl(tiny_sdxl).unet.eval()
    merge_kohya_file(fresh, load_file(str(trained.result.output)))
    with torch.no_grad():
        got = fresh(sample, t, enc, added_cond_kwargs=added).sample
    assert (want - got).abs().max() < 1e-5
    pipe = load_sdxl(tiny_sdxl).pipeline()  # and diffusers loads it as a kohya LoRA
    pipe.load_lora_weights(str(trained.result.output))
    with torch.no_grad():
        got = pipe.unet(sample, t, enc, added_cond_kwargs=added).sample
    assert (want - got).abs().max() < 1e-5


def test_lycoris_options_are_checked_before_training() -> None:
    with pytest.raises(ConfigError, match='network_args "algoo" is not a LyCORIS option') as err:
        _cfg(network_args=["algoo=loha"])
    assert 'did you mean "algo"' in err.value.hint
    with pytest.raises(ConfigError, match='network_args algo "lohaa" is not a LyCORIS algorithm'):
        _cfg(network_args=["algo=lohaa"])
    with pytest.raises(ConfigError, match="is a LyCORIS option"):
        _cfg(network_module="networks.lora", network_args=["algo=loha"])
    # the kohya_ss GUI's LoKr network_args, as it writes them
    gui = (
        "preset=full conv_dim=100000 conv_alpha=1 use_tucker=False rank_dropout=0 bypass_mode=False "
        "dora_wd=False module_dropout=0 factor=6 use_cp=False use_scalar=False decompose_both=False "
        "rank_dropout_scale=False algo=lokr train_norm=False"
    )
    assert _cfg(network_args=gui).network_args[-2] == "algo=lokr"


def test_missing_lycoris_is_one_error_before_the_model_loads(cli_runner, tmp_path, monkeypatch) -> None:
    settings = 'network_module = "lycoris.kohya"\nnetwork_args = ["algo=loha"]\n'
    assert errors_without(cli_runner, tmp_path, monkeypatch, "lycoris", settings) == [
        'Error: network_module "lycoris.kohya" needs the `lycoris-lora` package, which is not installed: '
        "install sdprep's lycoris extra (pip install 'sdprep[lycoris]')"
    ]


def test_preflight_reloads_lycoris_files_with_lycoris(trained, tiny_sdxl: Path) -> None:
    """diffusers loads no LoHa / LoKr: preflight's reload check uses LyCORIS's loader instead."""
    from sdprep.train.config.preflight import reload_check
    from sdprep.train.models.load import load_sdxl

    path = trained.result.output
    modules = len({k.split(".")[0] for k in load_file(str(path))})
    assert reload_check(trained, path) == f"{path.name} loads with LyCORIS's own loader ({modules} modules)"
    assert trained.method.load_with_lycoris(path, load_sdxl(tiny_sdxl)) == modules


def test_network_weights_and_loraplus(trained, tmp_path: Path) -> None:
    """network_weights starts a LyCORIS network from a saved file (its kohya names mapped back);
    LoRA+ puts the up weights (LyCORIS's own rule: "lora_up" in the name, so LoCon only) at lr x ratio."""
    import dataclasses

    from sdprep.train.loop.trainer import RecordingCallbacks, Trainer

    path = trained.result.output
    cfg = dataclasses.replace(
        trained.cfg,
        network_weights=path,
        output_dir=tmp_path / "out",
        loraplus_lr_ratio=4.0,
        max_train_steps=1,
    )
    again = Trainer(cfg, callbacks=RecordingCallbacks())
    again.setup()
    saved, loaded = load_file(str(path)), again.method.export_tensors(torch.float32)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert any(n.startswith("network_weights: started from") for n in again.method.notes)
    lrs = {g["name"]: g["lr"] for g in again.method.param_groups()}
    if trained.method.algo == "locon":
        assert lrs["unet plus"] == pytest.approx(4 * lrs["unet"]) and lrs["te1 plus"] == pytest.approx(
            4 * lrs["te1"]
        )
    else:
        assert not any(name.endswith(" plus") for name in lrs)
