"""LoRA on the SDXL U-Net (and optionally the text encoders) with PEFT, saved in kohya's format.

Targets are kohya's defaults: every Linear and 1x1 conv inside the U-Net's transformer blocks
(attn1/attn2 q,k,v,out, ff.net.0.proj, ff.net.2, proj_in, proj_out); with `network_args`
`conv_dim`/`conv_alpha` also the ResNet/down/upsample blocks (3x3 convs at conv_dim). The file
uses the ORIGINAL (SGM) module names and the TRUE alpha, so ComfyUI, A1111/Forge, kohya and
diffusers' `load_lora_weights` apply exactly the strength that was trained.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdprep.errors import ConfigError
from sdprep.train.methods.base import TrainMethod, allreduce_gradients, key_problems, restore_tensors

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig

    from sdprep.train.config.schema import TrainConfig
    from sdprep.train.methods.maxnorm import NormStats
    from sdprep.train.models.load import SDXLModel
    from sdprep.train.save.sgm import UnetLayout

UNET_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_BLOCKS = ("CLIPAttention", "CLIPMLP")


def parse_network_args(args: list[str] | tuple[str, ...] | str | None) -> tuple[dict[str, str], list[str]]:
    """kohya's `network_args` ("conv_dim=4", "block_dims=...", ...) as strings by name (as kohya
    reads them), plus notes for ignored ones."""
    from sdprep.train.config.kohya import NETWORK_ARGS, split_kv_args

    out: dict[str, str] = {}
    notes = []
    for item in split_kv_args(args, "network_args"):
        key, value = (s.strip() for s in item.split("=", 1))
        if key == "algo":
            raise ConfigError(
                f"network_args: algo={value} is a LyCORIS option",
                'LyCORIS networks need network_module = "lycoris.kohya"; for networks.lora remove algo=',
            )
        if key in NETWORK_ARGS:
            out[key] = value
        else:
            notes.append(f"network_args: {key}={value} is accepted but not used by sdprep")
    return out, notes


def _is_target_layer(module: torch.nn.Module, conv_ok: bool) -> str | None:
    """ "linear" for Linear / 1x1 conv, "conv" for larger convs (when enabled), else None."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.Conv2d):
        if module.kernel_size == (1, 1):
            return "linear"
        return "conv" if conv_ok else None
    return None


def target_modules(
    root: torch.nn.Module, block_classes: tuple[str, ...], conv_blocks: tuple[str, ...] = ()
) -> dict[str, str]:
    """Module name -> "linear" / "conv" for every layer kohya's LoRA would adapt under `root`."""
    found: dict[str, str] = {}
    for name, module in root.named_modules():
        cls = module.__class__.__name__
        if cls not in block_classes and cls not in conv_blocks:
            continue
        for child_name, child in module.named_modules():
            kind = _is_target_layer(child, cls in conv_blocks)
            full = f"{name}.{child_name}" if child_name else name
            if kind and full not in found:
                found[full] = kind
    return found


def kohya_name(component: str, module_name: str, layout: UnetLayout | None = None) -> str:
    """`lora_unet_input_blocks_4_1_proj_in` etc. for a diffusers/transformers module name."""
    from sdprep.train.save.sgm import LORA_PREFIXES, SDXL_LAYOUT, kohya_lora_name

    return kohya_lora_name(module_name, LORA_PREFIXES[component], layout or SDXL_LAYOUT)


class LoraMethod(TrainMethod):
    name = "lora"
    architecture = "stable-diffusion-xl-v1-base/lora"
    title = "LoRA"

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        from sdprep.train.methods.lora_args import parse_blocks

        args, notes = parse_network_args(cfg.network_args)
        self.notes += notes
        self.network_args = args
        self.rank = cfg.network_dim
        self.alpha = float(cfg.network_alpha)
        conv_dim = cfg.conv_dim if cfg.conv_dim is not None else args.get("conv_dim")
        conv_alpha = cfg.conv_alpha if cfg.conv_alpha is not None else args.get("conv_alpha", 1.0)
        self.conv_rank = int(conv_dim) if conv_dim else None
        self.conv_alpha = float(conv_alpha) if self.conv_rank else None
        self.blocks = parse_blocks(args, self.rank, self.alpha, self.conv_rank, self.conv_alpha)
        self.dropouts = tuple(
            float(getattr(cfg, key) or args.get(key) or 0.0)
            for key in ("network_dropout", "rank_dropout", "module_dropout")
        )
        # kohya: a component's own ratio, else loraplus_lr_ratio (0 or unset: no LoRA+)
        common = _ratio(cfg, args, "loraplus_lr_ratio")
        self.plus_ratio = {
            "unet": _ratio(cfg, args, "loraplus_unet_lr_ratio") or common,
            "te": _ratio(cfg, args, "loraplus_text_encoder_lr_ratio") or common,
        }
        self.train_unet = True  # network_train_text_encoder_only is rejected by the config
        self.train_te = not cfg.network_train_unet_only
        if cfg.save_model_as not in (None, "safetensors"):
            self.notes.append(
                f"save_model_as = {cfg.save_model_as}: LoRA files are always written as safetensors"
            )
        # component -> {module name: kind}, {module name: (rank, alpha)} and LoraConfig; filled in setup()
        self.targets: dict[str, dict[str, str]] = {}
        self.shapes: dict[str, dict[str, tuple[int, float]]] = {}
        self.lora_configs: dict[str, LoraConfig] = {}
        self.max_norm = cfg.scale_weight_norms  # kohya's max-norm regularisation (None: off)
        self._norm_targets: list[tuple[torch.Tensor, torch.Tensor, float]] | None = None
        self._norms: NormStats | None = None

    # -- setup -----------------------------------------------------------------------------

    def _components(self) -> dict[str, Any]:
        comps = {}
        if self.train_unet:
            comps["unet"] = self.model.unet
        if self.train_te:
            comps["te1"] = self.model.text_encoder
            comps["te2"] = self.model.text_encoder_2
        return comps

    def _module_shapes(self, comp: str, targets: dict[str, str]) -> dict[str, tuple[int, float]]:
        """(rank, alpha) of each module that gets a LoRA: network_dim / conv_dim, or the block's."""
        layout = self._layout()
        shapes = {}
        for name, kind in targets.items():
            if comp == "unet" and self.blocks is not None:
                shape = self.blocks.rank_alpha(kohya_name(comp, name, layout), kind)
            elif kind != "conv":
                shape = (self.rank, self.alpha)
            else:  # conv layers are targets only with a conv_dim
                shape = (
                    (self.conv_rank, self.conv_alpha)
                    if self.conv_rank and self.conv_alpha is not None
                    else None
                )
            if shape is not None:
                shapes[name] = shape
        return shapes

    def _layout(self) -> UnetLayout:
        from sdprep.train.save.sgm import UnetLayout

        return UnetLayout.from_config(self.model.unet.config)

    def _lora_config(self, shapes: dict[str, tuple[int, float]]) -> LoraConfig:
        from peft import LoraConfig

        # exact-name patterns: PEFT matches rank_pattern keys as regexes against module names
        odd = {n: s for n, s in shapes.items() if s != (self.rank, self.alpha)}
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,  # type: ignore[arg-type]  # peft says int; it divides by r, a float works
            lora_dropout=0.0,  # kohya's dropout acts on the down output: lora_args.add_dropout
            init_lora_weights=True,
            target_modules=sorted(shapes),
            rank_pattern={f"^{_re_escape(n)}$": r for n, (r, _) in odd.items()},
            alpha_pattern={f"^{_re_escape(n)}$": a for n, (_, a) in odd.items()},
        )

    def setup(self, model: SDXLModel, weight_dtype: torch.dtype) -> None:
        import torch

        self.model = model
        model.freeze(weight_dtype)
        for comp, module in self._components().items():
            if comp == "unet":
                targets = target_modules(module, UNET_BLOCKS, UNET_CONV_BLOCKS if self.conv_rank else ())
            else:
                targets = target_modules(module, TE_BLOCKS)
            if not targets:
                raise ConfigError(f"no LoRA target layers found in the {comp} (is this an SDXL model?)")
            shapes = self._module_shapes(comp, targets)
            if not shapes:
                raise ConfigError(
                    f"block_dims / lr weights leave no LoRA module in the {comp}",
                    "give at least one block a rank and a non-zero lr weight",
                )
            self.targets[comp] = {n: k for n, k in targets.items() if n in shapes}
            self.shapes[comp] = shapes
            self.lora_configs[comp] = inject_lora(module, self._lora_config(shapes))
            if any(self.dropouts):
                from sdprep.train.methods.lora_args import add_dropout

                for name, layer in module.named_modules():
                    if name in shapes:
                        add_dropout(layer, *self.dropouts)
            full = self.cfg.full_bf16 or self.cfg.full_fp16  # kohya: LoRA weights in the half type too
            for param in module.parameters():
                if param.requires_grad:
                    param.data = param.data.to(weight_dtype if full else torch.float32)
            if comp != "unet":
                allreduce_gradients(self._lora_params(comp))  # text encoders are not DDP-wrapped

    def _lora_params(self, comp: str) -> list[Any]:
        module = self._components()[comp]
        return [p for n, p in module.named_parameters() if p.requires_grad and "lora_" in n]

    def _named_lora_params(self, comp: str) -> list[tuple[str, Any]]:
        module = self._components()[comp]
        return [(n, p) for n, p in module.named_parameters() if p.requires_grad and "lora_" in n]

    def param_groups(self) -> list[dict[str, Any]]:
        """As kohya's prepare_optimizer_params: per component (per SDXL block with block lr weights),
        the LoRA+ up weights in a `... plus` group at lr * ratio."""
        from sdprep.train.methods.lora_args import plus_groups

        cfg = self.cfg
        base_lr = cfg.learning_rate
        groups = []
        if self.train_unet:
            lr = cfg.unet_lr if cfg.unet_lr is not None else base_lr
            params = self._named_lora_params("unet")
            ratio = self.plus_ratio["unet"]
            if self.blocks is None or self.blocks.lr_weight is None:
                groups += plus_groups("unet", params, lr, ratio)
            else:
                for idx, block in self._by_block(params).items():
                    groups += plus_groups(f"unet_block{idx}", block, lr * self.blocks.lr_weight[idx], ratio)
        if self.train_te:
            te_lrs = _te_lrs(cfg.text_encoder_lr, base_lr)
            for comp, lr in zip(("te1", "te2"), te_lrs):
                groups += plus_groups(comp, self._named_lora_params(comp), lr, self.plus_ratio["te"])
        return groups

    def _by_block(self, params: list[tuple[str, Any]]) -> dict[int, list[tuple[str, Any]]]:
        """U-Net LoRA parameters by kohya's SDXL block index, in the order blocks first appear."""
        from sdprep.train.methods.lora_args import block_index

        layout = self._layout()
        out: dict[int, list[tuple[str, Any]]] = {}
        for name, param in params:
            module = name.split(".lora_")[0]
            out.setdefault(block_index(kohya_name("unet", module, layout)), []).append((name, param))
        return out

    @property
    def trains_text_encoders(self) -> bool:
        return self.train_te

    @property
    def trains_unet(self) -> bool:
        return self.train_unet

    def train_modules(self) -> list[Any]:
        return list(self._components().values())

    # -- state for resume ------------------------------------------------------------------

    def trainable_state(self) -> dict[str, Any]:
        out = {}
        for comp, module in self._components().items():
            for name, param in module.named_parameters():
                if param.requires_grad:
                    out[f"{comp}/{name}"] = param.detach().clone()
        return out

    def load_trainable_state(self, state: dict[str, Any]) -> None:
        mine = {}
        for comp, module in self._components().items():
            for name, param in module.named_parameters():
                if param.requires_grad:
                    mine[f"{comp}/{name}"] = param
        restore_tensors(
            state,
            mine,
            what="LoRA setup",
            hint="resume with the same network_dim, network_args and network_train_unet_only as the run that saved it",
            shape_hint="resume with the same network_dim / conv_dim as the run that saved it",
        )

    # -- per step ---------------------------------------------------------------------------

    def after_step(self) -> None:
        if not self.max_norm:
            return
        from sdprep.train.methods.maxnorm import apply_max_norm

        if self._norm_targets is None:  # (down, up, alpha / rank) per module, found once
            self._norm_targets = []
            for comp, name, _, layer in self._modules():
                down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                self._norm_targets.append((down, up, self.module_alpha(comp, name) / down.shape[0]))
        self._norms = apply_max_norm(self._norm_targets, self.max_norm)

    def step_logs(self) -> dict[str, float]:
        if self._norms is None:
            return {}
        n = self._norms
        return {
            "norm/keys_scaled": n.keys_scaled,
            "norm/average_key_norm": n.average_norm,
            "norm/max_key_norm": n.max_norm,
        }

    # -- outputs ---------------------------------------------------------------------------

    def _modules(self) -> Iterator[tuple[str, str, str, Any]]:
        """(component, module name, kohya name, peft LoraLayer) for every adapted layer."""
        from sdprep.train.save.sgm import UnetLayout

        layout = UnetLayout.from_config(self.model.unet.config)
        for comp, module in self._components().items():
            for name, layer in module.named_modules():
                if name in self.targets.get(comp, {}):
                    yield comp, name, kohya_name(comp, name, layout), layer

    def module_alpha(self, comp: str, name: str) -> float:
        return self.shapes[comp][name][1]

    def export_tensors(self, dtype: torch.dtype) -> dict[str, Any]:
        import torch

        out: dict[str, Any] = {}
        for comp, name, kname, layer in self._modules():
            down = layer.lora_A["default"].weight.detach()
            up = layer.lora_B["default"].weight.detach()
            out[f"{kname}.lora_down.weight"] = down.to(dtype).contiguous().cpu()
            out[f"{kname}.lora_up.weight"] = up.to(dtype).contiguous().cpu()
            out[f"{kname}.alpha"] = torch.tensor(self.module_alpha(comp, name), dtype=dtype)
        return out

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for _comp, _name, kname, layer in self._modules():
            shapes[f"{kname}.lora_down.weight"] = tuple(layer.lora_A["default"].weight.shape)
            shapes[f"{kname}.lora_up.weight"] = tuple(layer.lora_B["default"].weight.shape)
            shapes[f"{kname}.alpha"] = ()
        return shapes

    def verify_tensors(self, tensors: dict[str, Any], trained: bool) -> list[str]:
        return verify_lora_tensors(tensors, self.expected_shapes(), self._alphas(), trained)

    def _alphas(self) -> dict[str, float]:
        return {kname: self.module_alpha(comp, name) for comp, name, kname, _ in self._modules()}

    def metadata(self) -> dict[str, str]:
        meta = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(self.rank),
            "ss_network_alpha": str(float(self.alpha)),  # kohya: argparse float, "1.0"
            "ss_network_dropout": str(self.cfg.network_dropout),
            "ss_scale_weight_norms": str(self.max_norm),
            "ss_network_train_unet_only": str(not self.train_te),
            "ss_network_train_text_encoder_only": str(not self.train_unet),
        }
        args: dict[str, str | float | None] = dict(self.network_args)
        if self.conv_rank and self.conv_alpha is not None:
            args.update(conv_dim=str(self.conv_rank), conv_alpha=_num(self.conv_alpha))
        for key, value in zip(("rank_dropout", "module_dropout"), self.dropouts[1:]):
            if value:
                args[key] = _num(value)
        for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
            ratio = getattr(self.cfg, key)  # a float field of TrainConfig, None when unset
            if ratio:
                args[key] = _num(ratio)
        if args:
            args.setdefault("dropout", self.cfg.network_dropout)  # kohya adds it last
            meta["ss_network_args"] = json.dumps(args)  # as kohya: the network_args strings by name
        return meta

    def extra_outputs(self, final_path: Path) -> list[Path]:
        if not self.cfg.save_diffusers_copy:
            return []
        return [save_diffusers_copy(self, final_path)]

    def load_initial_weights(self) -> None:
        path = self.cfg.network_weights
        if path:
            self.notes.append(load_kohya_lora(self, Path(path)))


def inject_lora(module: torch.nn.Module, config: LoraConfig) -> LoraConfig:
    """Put LoRA layers (adapter "default") into `module` with peft's own API; returns the config.

    Not `module.add_adapter`: diffusers' and transformers' integrations gate that on the peft
    version (transformers 5.25 refuses peft < 0.22 there), so a new release of either could stop
    training although peft itself works. `inject_adapter_in_model` is the call both wrap.
    """
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, module, adapter_name="default")
    return config


def lora_state_dict(module: torch.nn.Module) -> dict[str, Any]:
    """The injected adapter's tensors under peft's saved names (`...to_q.lora_A.weight`)."""
    return {
        name.replace(".default.", "."): tensor
        for name, tensor in module.state_dict().items()
        if ".lora_A.default." in name or ".lora_B.default." in name
    }


def _re_escape(name: str) -> str:
    import re

    return re.escape(name)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _ratio(cfg: TrainConfig, args: dict[str, str], key: str) -> float | None:
    value = getattr(cfg, key)
    if value is None and args.get(key) is not None:
        value = float(args[key])
    return float(value) if value else None


def _te_lrs(value: float | list[float] | tuple[float, ...] | None, base: float) -> tuple[float, float]:
    if value is None:
        return base, base
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return float(value[0]), float(value[0])
        return float(value[0]), float(value[1])
    return float(value), float(value)


def verify_lora_tensors(
    tensors: dict[str, Any], shapes: dict[str, tuple[int, ...]], alphas: dict[str, float], trained: bool
) -> list[str]:
    """Problems in a reloaded kohya LoRA: missing/extra keys, shapes, non-finite, untrained, alpha."""
    import torch

    if not tensors:
        return ["the file has no tensors"]
    problems = key_problems(tensors, shapes)
    ups_zero = ups = 0
    for key, shape in shapes.items():
        t = tensors.get(key)
        if t is None:
            continue
        if key.endswith(".alpha"):
            if t.numel() != 1 or not math.isclose(float(t), alphas[key[: -len(".alpha")]], rel_tol=1e-3):
                problems.append(f"{key} is {t.tolist()}, expected alpha {alphas[key[: -len('.alpha')]]}")
            continue
        if tuple(t.shape) != shape and not (len(shape) == 2 and tuple(t.shape) == (*shape, 1, 1)):
            problems.append(f"{key} has shape {tuple(t.shape)}, expected {shape}")
        if not torch.isfinite(t.float()).all():
            problems.append(f"{key} has NaN or infinite values")
        if key.endswith(".lora_up.weight"):
            ups += 1
            ups_zero += int(not bool(t.float().abs().sum() > 0))
    if trained and ups and ups_zero == ups:
        problems.append("every lora_up weight is zero: the LoRA has not learned anything")
    return problems


def load_kohya_lora(method: LoraMethod, path: Path) -> str:
    """Load a kohya-format LoRA file into the PEFT adapters (for `network_weights`); returns a note.

    When the file's alpha differs from the configured one, the up weights are rescaled so the
    network computes exactly what the file computes.
    """
    import torch
    from safetensors.torch import load_file

    from sdprep.errors import ModelError

    if not path.is_file():
        raise ModelError(f"network_weights {path}: no such file")
    try:
        sd = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelError(f"network_weights {path}: not a readable safetensors file ({exc})") from exc
    ours = {kname: (comp, name, layer) for comp, name, kname, layer in method._modules()}
    theirs = {k.rsplit(".", 2)[0] for k in sd if k.endswith(".lora_down.weight")}
    unknown = sorted(theirs - set(ours))
    if unknown:
        raise ConfigError(
            f"network_weights {path.name}: {len(unknown)} LoRA modules are not trained by this config "
            f"(e.g. {unknown[0]})",
            "match the file: set network_train_unet_only = false for text-encoder LoRAs, "
            "conv_dim in network_args for conv LoRAs",
        )
    with torch.no_grad():
        for kname in sorted(theirs):
            comp, name, layer = ours[kname]
            down, up = sd[f"{kname}.lora_down.weight"], sd[f"{kname}.lora_up.weight"]
            a_param, b_param = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            if down.shape[0] != a_param.shape[0]:
                raise ConfigError(
                    f"network_weights {path.name}: rank {down.shape[0]} but network_dim is {a_param.shape[0]}",
                    f"set network_dim = {down.shape[0]} (and network_alpha to the file's alpha)",
                )
            rank = down.shape[0]
            file_alpha = float(sd.get(f"{kname}.alpha", torch.tensor(float(rank))))
            ratio = (file_alpha / rank) / (method.module_alpha(comp, name) / rank)
            a_param.copy_(down.reshape(a_param.shape).to(a_param.dtype))
            b_param.copy_((up.reshape(b_param.shape) * ratio).to(b_param.dtype))
    return f"network_weights: started from {path.name} ({len(theirs)} of {len(ours)} modules)"


def save_diffusers_copy(method: LoraMethod, final_path: Path) -> Path:
    """Write a diffusers-format copy (`<name>_diffusers/pytorch_lora_weights.safetensors`)."""
    from diffusers import StableDiffusionXLPipeline

    comps = method._components()
    out_dir = final_path.with_name(final_path.stem + "_diffusers")
    kwargs: dict[str, Any] = {}
    names = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}
    for comp, module in comps.items():
        kwargs[f"{names[comp]}_lora_layers"] = lora_state_dict(module)
        kwargs[f"{names[comp]}_lora_adapter_metadata"] = method.lora_configs[comp].to_dict()  # type: ignore[no-untyped-call]  # peft leaves to_dict unannotated
    StableDiffusionXLPipeline.save_lora_weights(out_dir, safe_serialization=True, **kwargs)
    return out_dir / "pytorch_lora_weights.safetensors"
