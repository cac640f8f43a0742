"""kohya's `dim_from_weights`: a LoRA's ranks and alphas read from the file it continues from.

kohya builds the network from `network_weights` (create_network_from_weights): every module's
rank from its `lora_down` weight, its alpha from its `alpha` tensor (the rank when missing), and
only the modules the file has. sdprep trains one rank for linear layers and one for 3x3 convs, so
a file is read into `network_dim` / `network_alpha` / `conv_dim` / `conv_alpha` (a file whose
ranks vary within a kind is refused with the reason).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdprep.errors import ConfigError


def dims_from_weights(path: Path | str) -> tuple[dict[str, Any], list[str]]:
    """The settings that make a fresh LoRA match the file's layout, and notes about them."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"dim_from_weights: network_weights {path}: no such file",
            "dim_from_weights reads the ranks from network_weights; give the LoRA file to continue from",
        )
    dims: dict[str, dict[str, int]] = {"linear": {}, "conv": {}}
    alphas: dict[str, float] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()  # safe_open is not iterable
            for key in names:
                module = key.split(".")[0]
                if key.endswith(".alpha"):
                    alphas[module] = float(f.get_tensor(key).float().item())
                elif ".lora_down." in key:
                    shape = f.get_slice(key).get_shape()
                    kind = "conv" if len(shape) == 4 and shape[2:] != [1, 1] else "linear"
                    dims[kind][module] = int(shape[0])
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ConfigError(f"dim_from_weights: {path} cannot be read as safetensors ({exc})") from None
    if not dims["linear"]:
        raise ConfigError(f"dim_from_weights: {path} has no LoRA modules (no lora_down weights)")
    out: dict[str, Any] = {}
    for kind, (dim_key, alpha_key) in {
        "linear": ("network_dim", "network_alpha"),
        "conv": ("conv_dim", "conv_alpha"),
    }.items():
        found = dims[kind]
        if not found:
            continue
        ranks = set(found.values())
        kind_alphas = {alphas.get(m, float(r)) for m, r in found.items()}
        if len(ranks) > 1 or len(kind_alphas) > 1:
            raise ConfigError(
                f"dim_from_weights: {path} has {kind} modules of different ranks or alphas "
                f"(ranks {sorted(ranks)}, alphas {sorted(kind_alphas)})",
                "sdprep trains one rank per kind (linear, 3x3 conv); set network_dim / conv_dim yourself",
            )
        out[dim_key], out[alpha_key] = ranks.pop(), kind_alphas.pop()
    notes = [
        f"dim_from_weights: {path.name} gives "
        + ", ".join(f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}" for k, v in out.items())
    ]
    if not any(m.startswith("lora_te") for m in dims["linear"]):
        out["network_train_unet_only"] = True
        notes.append(
            f"dim_from_weights: {path.name} has no text-encoder LoRA: the U-Net only trains (as kohya)"
        )
    return out, notes
