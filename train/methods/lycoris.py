"""LyCORIS networks (`network_module = "lycoris.kohya"`: LoCon, LoHa, LoKr... by `algo=` in
network_args) through the `lycoris-lora` package, saved with kohya's SGM key names.

As kohya's train_network.py with LyCORIS: `lycoris.kohya.create_network(1.0, network_dim,
network_alpha, vae, [te1, te2], unet, **network_args)` with the network_args strings as written, so
every LyCORIS option means what it means under kohya. LyCORIS names its modules after the model it
wraps; sdprep's U-Net and CLIP-L are diffusers / transformers 5 models, so the saved names are
translated to the ones kohya's SGM U-Net gives (`lora_unet_input_blocks_4_1_...`,
`lora_te1_text_model_encoder_...`), the names ComfyUI and A1111 load. Modules kohya's U-Net cannot
have (LyCORIS's `full` preset also matches diffusers' conv_in / conv_out / time embeddings by name)
are left out, so the network is the one kohya trains.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdprep.errors import ConfigError, InstallError, TrainingError
from sdprep.train.methods.base import TrainMethod, allreduce_gradients, key_problems
from sdprep.train.methods.lora import _num, _te_lrs, kohya_name

if TYPE_CHECKING:
    import torch

    from sdprep.train.config.schema import TrainConfig
    from sdprep.train.models.load import SDXLModel

MODULE = "lycoris.kohya"
ALGOS = ("lora", "locon", "loha", "lokr", "ia3", "dylora", "glora", "full", "diag-oft", "boft")
# the network_args lycoris.kohya.create_network and its modules read (4.1.3), plus deprecated names
LYCORIS_ARGS = (
    "algo",
    "preset",
    "conv_dim",
    "conv_alpha",
    "dropout",
    "rank_dropout",
    "module_dropout",
    "rank_dropout_scale",
    "use_tucker",
    "use_scalar",
    "use_cp",
    "use_conv_cp",
    "disable_conv_cp",
    "block_size",
    "train_norm",
    "constraint",
    "constrain",
    "rescaled",
    "dora_wd",
    "wd_on_output",
    "full_matrix",
    "bypass_mode",
    "rs_lora",
    "unbalanced_factorization",
    "decompose_both",
    "factor",
    "loraplus_lr_ratio",
    "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio",
)
PREFIXES = {"unet": "lora_unet", "te1": "lora_te1", "te2": "lora_te2"}
# diffusers U-Net modules that LyCORIS's presets match by name or class (TimestepEmbedding) but that
# kohya's SGM U-Net does not have under those names: LyCORIS under kohya never trains them
NOT_IN_KOHYA = [
    f"{block}{leaf}"
    for block in ("time_embedding", "add_embedding")
    for leaf in ("", ".linear_1", ".linear_2")
] + ["conv_in", "conv_out"]


@contextlib.contextmanager
def _kohya_view(network_class: Any) -> Iterator[None]:
    """While LyCORIS builds a network on sdprep's diffusers U-Net: skip the modules kohya's U-Net does
    not have (NOT_IN_KOHYA; LyCORIS's class-level exclude list, which presets without exclude_name
    keep) and keep its INFO log lines (every choice it makes) off the console."""
    log = logging.getLogger("LyCORIS")
    level, excluded = log.level, network_class.TARGET_EXCLUDE_NAME
    log.setLevel(logging.WARNING)
    network_class.TARGET_EXCLUDE_NAME = [*excluded, *NOT_IN_KOHYA]
    try:
        yield
    finally:
        log.setLevel(level)
        network_class.TARGET_EXCLUDE_NAME = excluded


def require_lycoris() -> None:
    """InstallError naming the extra when lycoris-lora is missing (cheap: no import)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("lycoris") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise InstallError(
            'network_module "lycoris.kohya" needs the `lycoris-lora` package, which is not installed: '
            "install sdprep's lycoris extra (pip install 'sdprep[lycoris]')",
            'or train standard LoRA: network_module = "networks.lora"',
        )


def lycoris_args(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """network_args for LyCORIS as kohya passes them: `{name: value string}`; unknown names and
    unknown algos are errors."""
    from sdprep.errors import did_you_mean
    from sdprep.train.config.kohya import split_kv_args

    out = {}
    for item in split_kv_args(items, "network_args"):
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in LYCORIS_ARGS:
            hint = did_you_mean(key, LYCORIS_ARGS)
            raise ConfigError(
                f'network_args "{key}" is not a LyCORIS option',
                (hint + " " if hint else "") + "LyCORIS reads: " + ", ".join(LYCORIS_ARGS),
            )
        out[key] = value
    algo = out.get("algo", "lora").lower()
    if algo not in ALGOS:
        raise ConfigError(
            f'network_args algo "{algo}" is not a LyCORIS algorithm', "valid: " + ", ".join(ALGOS)
        )
    return out


class LycorisMethod(TrainMethod):
    name = "lora"
    architecture = "stable-diffusion-xl-v1-base/lora"
    title = "LyCORIS"

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.args = lycoris_args(cfg.network_args)
        self.algo = self.args.get("algo", "lora").lower()
        self.title = f"LyCORIS {self.algo}"
        self.rank = cfg.network_dim
        self.alpha = float(cfg.network_alpha)
        self.train_te = not cfg.network_train_unet_only
        self.max_norm = cfg.scale_weight_norms
        common = self.args.get("loraplus_lr_ratio") or cfg.loraplus_lr_ratio
        ratio = {
            "unet": self.args.get("loraplus_unet_lr_ratio") or cfg.loraplus_unet_lr_ratio or common,
            "te": self.args.get("loraplus_text_encoder_lr_ratio")
            or cfg.loraplus_text_encoder_lr_ratio
            or common,
        }
        self.plus_ratio = {k: float(v) if v else None for k, v in ratio.items()}
        self.network: Any = None
        self.names: dict[str, tuple[str, str]] = {}  # LyCORIS module name -> (component, module path)
        self._initial: dict[str, Any] = {}
        self._expected: dict[str, tuple[int, ...]] = {}
        # LyCORIS's apply_max_norm_regularization: (keys scaled, mean norm, max norm)
        self._norms: tuple[int, torch.Tensor | float, torch.Tensor | float] | None = None

    # -- setup -----------------------------------------------------------------------------

    def setup(self, model: SDXLModel, weight_dtype: torch.dtype) -> None:
        import torch
        from lycoris import kohya as lycoris_kohya

        self.model = model
        model.freeze(weight_dtype)
        tes = [model.text_encoder, model.text_encoder_2]
        for comp, root in (("unet", model.unet), ("te1", tes[0]), ("te2", tes[1])):
            for path, _ in root.named_modules():
                self.names[f"{PREFIXES[comp]}_{path}".replace(".", "_")] = (comp, path)
        with _kohya_view(lycoris_kohya.LycorisNetworkKohya):
            try:
                net = lycoris_kohya.create_network(
                    1.0,
                    self.rank,
                    self.alpha,
                    model.vae,
                    tes,
                    model.unet,
                    warn_on_unmatched=False,
                    **self.args,
                )
            except (TypeError, ValueError, AssertionError) as exc:
                raise ConfigError(f"LyCORIS refused the network_args: {exc}", "check network_args") from exc
            net.apply_to(tes, model.unet, apply_text_encoder=self.train_te, apply_unet=True)
        if not net.loras:
            raise ConfigError(f"LyCORIS {self.algo} found no layer to train", "check preset / network_args")
        full = self.cfg.full_bf16 or self.cfg.full_fp16
        net.to(dtype=weight_dtype if full else torch.float32)
        net.requires_grad_(True)
        self.network = net
        allreduce_gradients(list(net.parameters()))  # the network is not inside a DDP-wrapped module
        self._initial = {k: v.detach().clone() for k, v in net.state_dict().items()}

    def move_to(self, device: torch.device) -> None:
        self.network.to(device)

    def _by_component(self) -> dict[str, list[tuple[str, Any]]]:
        out: dict[str, list[tuple[str, Any]]] = {}
        for name, param in self.network.named_parameters():
            comp = self.names[name.split(".", 1)[0]][0]
            out.setdefault(comp, []).append((name, param))
        return out

    def param_groups(self) -> list[dict[str, Any]]:
        from sdprep.train.methods.lora_args import plus_groups

        cfg = self.cfg
        params = self._by_component()
        lr = cfg.unet_lr if cfg.unet_lr is not None else cfg.learning_rate
        groups = plus_groups("unet", params.get("unet", []), lr, self.plus_ratio["unet"])
        if self.train_te:
            for comp, te_lr in zip(("te1", "te2"), _te_lrs(cfg.text_encoder_lr, cfg.learning_rate)):
                groups += plus_groups(comp, params.get(comp, []), te_lr, self.plus_ratio["te"])
        return groups

    @property
    def trains_text_encoders(self) -> bool:
        return self.train_te

    def train_modules(self) -> list[Any]:
        # not the U-Net: the network's modules live outside it (no DDP wrapper; gradients are
        # averaged by allreduce_gradients); text encoders for gradient checkpointing's train mode
        return [self.network, *(self.model.text_encoders if self.train_te else [])]

    # -- state for resume ------------------------------------------------------------------

    def trainable_state(self) -> dict[str, Any]:
        return {f"lycoris/{n}": p.detach().clone() for n, p in self.network.named_parameters()}

    def load_trainable_state(self, state: dict[str, Any]) -> None:
        import torch

        mine = dict(self.network.named_parameters())
        if {f"lycoris/{n}" for n in mine} != set(state):
            raise TrainingError(
                "the saved training state does not match this LyCORIS network",
                "resume with the same network_dim, network_args and network_train_unet_only",
            )
        with torch.no_grad():
            for name, param in mine.items():
                param.copy_(state[f"lycoris/{name}"])

    # -- per step ---------------------------------------------------------------------------

    def after_step(self) -> None:
        if self.max_norm:
            device = next(self.network.parameters()).device
            self._norms = self.network.apply_max_norm_regularization(self.max_norm, device)

    def step_logs(self) -> dict[str, float]:
        if self._norms is None:
            return {}
        scaled, mean, top = self._norms
        return {
            "norm/keys_scaled": scaled,
            "norm/average_key_norm": float(mean),
            "norm/max_key_norm": float(top),
        }

    # -- outputs ---------------------------------------------------------------------------

    def kohya_names(self) -> dict[str, str]:
        """LyCORIS module name -> kohya's (SGM) name, for the modules this network has."""
        from sdprep.train.save.sgm import UnetLayout

        layout = UnetLayout.from_config(self.model.unet.config)
        out = {}
        for module in self.network.loras:
            comp, path = self.names[module.lora_name]
            out[module.lora_name] = kohya_name(comp, path, layout)
        return out

    def export_tensors(self, dtype: torch.dtype) -> dict[str, Any]:
        names = self.kohya_names()
        out = {}
        for key, tensor in self.network.state_dict().items():
            module, _, rest = key.partition(".")
            t = tensor.detach()
            out[f"{names[module]}.{rest}"] = (t.to(dtype) if t.is_floating_point() else t).contiguous().cpu()
        self._expected = {k: tuple(v.shape) for k, v in out.items()}
        return out

    def verify_tensors(self, tensors: dict[str, Any], trained: bool) -> list[str]:
        import torch

        if not tensors:
            return ["the file has no tensors"]
        problems = key_problems(tensors, self._expected)
        shapes = [k for k, s in self._expected.items() if k in tensors and tuple(tensors[k].shape) != s]
        if shapes:
            problems.append(f"{len(shapes)} tensors have the wrong shape (e.g. {shapes[0]})")
        bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t.float()).all()]
        if bad:
            problems.append(f"{len(bad)} tensors have NaN or infinite values (e.g. {bad[0]})")
        current = self.network.state_dict()
        if trained and all(torch.equal(current[k], v) for k, v in self._initial.items()):
            problems.append(
                "every LyCORIS weight equals its starting value: the network has not learned anything"
            )
        return problems

    def metadata(self) -> dict[str, str]:
        return {
            "ss_network_module": MODULE,
            "ss_network_dim": str(self.rank),
            "ss_network_alpha": _num(self.alpha),
            "ss_network_args": json.dumps(self.args),  # as kohya: the network_args strings by name
            "ss_network_dropout": str(self.cfg.network_dropout),
            "ss_scale_weight_norms": str(self.max_norm),
            "ss_network_train_unet_only": str(not self.train_te),
            "ss_network_train_text_encoder_only": "False",
        }

    def load_with_lycoris(self, path: Path, model: SDXLModel) -> int:
        """Load a saved file into a fresh `model` with LyCORIS's own loader (create_network_from_weights,
        as kohya and LyCORIS's tools load files), each kohya name mapped to the module it names;
        returns the number of modules. Raises TrainingError when the file does not fit."""
        import torch
        from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights
        from safetensors.torch import load_file

        from sdprep.train.save.sgm import UnetLayout

        layout = UnetLayout.from_config(model.unet.config)
        ours = {}
        for comp, root in (("unet", model.unet), ("te1", model.text_encoder), ("te2", model.text_encoder_2)):
            for name, module in root.named_modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    try:
                        ours[kohya_name(comp, name, layout)] = f"{PREFIXES[comp]}_{name}".replace(".", "_")
                    except ValueError:
                        continue  # a layer with no SGM name (never in a file)
        sd = {}
        for key, tensor in load_file(str(path)).items():
            module, _, rest = key.partition(".")
            if module not in ours:
                raise TrainingError(f"{path.name}: {module} names no layer of an SDXL model")
            sd[f"{ours[module]}.{rest}"] = tensor
        tes = [model.text_encoder, model.text_encoder_2]
        with _kohya_view(LycorisNetworkKohya):
            network, weights = create_network_from_weights(1.0, None, None, tes, model.unet, weights_sd=sd)
            network.apply_to(tes, model.unet, apply_text_encoder=True, apply_unet=True)
        missing, unexpected = network.load_state_dict(weights, strict=False)
        if unexpected or missing:
            raise TrainingError(
                f"{path.name}: LyCORIS cannot load {len(unexpected or missing)} of its tensors"
            )
        return len(network.loras)

    def load_initial_weights(self) -> None:
        path = self.cfg.network_weights
        if not path:
            return
        from safetensors.torch import load_file

        from sdprep.errors import ModelError

        path = Path(path)
        if not path.is_file():
            raise ModelError(f"network_weights {path}: no such file")
        back = {kohya: ours for ours, kohya in self.kohya_names().items()}
        sd = {}
        for key, tensor in load_file(str(path)).items():
            module, _, rest = key.partition(".")
            if module not in back:
                raise ConfigError(
                    f"network_weights {path.name}: module {module} is not in this LyCORIS network",
                    "use the network_dim, network_args and network_train_unet_only the file was trained with",
                )
            sd[f"{back[module]}.{rest}"] = tensor
        missing, unexpected = self.network.load_state_dict(sd, strict=False)
        if unexpected:
            raise ConfigError(
                f"network_weights {path.name}: {len(unexpected)} tensors do not fit (e.g. {unexpected[0]})",
                "use the algo and network_args the file was trained with",
            )
        self.notes.append(f"network_weights: started from {path.name} ({len(sd)} tensors)")
