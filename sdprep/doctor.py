"""`sdprep doctor`: what this machine gives sdprep (versions, GPU / ROCm / MPS, ONNX providers, disk).

The facts people paste into a bug report, and the first thing to check when training falls back to
the CPU or a tagger ignores the GPU. Each fact is a `Fact`; nothing here changes anything.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

REQUIRED = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "onnxruntime")
OTHER = ("huggingface_hub", "gallery_dl", "opencv-python-headless", "pillow", "rich", "click")
OPTIONAL = {  # package -> what it adds
    "spandrel": "more upscaler architectures",
    "bitsandbytes": "8-bit optimizers (AdamW8bit, Lion8bit...)",
    "prodigyopt": "the Prodigy optimizer",
    "dadaptation": "the D-Adaptation optimizers",
    "lion-pytorch": "the Lion optimizer",
    "schedulefree": "the schedule-free optimizers",
    "came-pytorch": "the CAME optimizer",
    "lycoris-lora": "LyCORIS networks (LoCon, LoHa, LoKr)",
    "tensorboard": "TensorBoard event files",
}
LOW_DISK_BYTES = 20 << 30  # below this, latents caches and checkpoints may not fit


@dataclass(frozen=True)
class Fact:
    name: str
    value: str
    status: str = "ok"  # ok | info | warn | missing | bad (missing and bad fail `sdprep doctor`)
    hint: str = ""


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def packages() -> list[Fact]:
    facts = []
    for name in REQUIRED + OTHER:
        v = version(name)
        if v is None:
            hint = "pip install 'sdprep[all]'" if name in REQUIRED else ""
            facts.append(Fact(name, "not installed", "missing" if name in REQUIRED else "warn", hint))
        else:
            facts.append(Fact(name, v))
    for name, adds in OPTIONAL.items():
        v = version(name)
        facts.append(Fact(name, v or f"not installed (optional: {adds})", "ok" if v else "info"))
    return facts


def compatibility() -> list[Fact]:
    """Known-bad package pairs (each fails doctor) and packages that differ from the tested lock."""
    from sdprep import compat

    facts = [Fact("package pair", p.message(), "bad", p.pair.fix) for p in compat.known_problems()]
    lock = compat.read_lock()
    if not lock:
        return facts + [Fact("tested versions", "no lock here (not a source checkout)", "info")]
    differ = compat.untested(lock)
    if differ:
        listed = ", ".join(f"{name} {have} (tested: {want})" for name, have, want in differ)
        facts.append(
            Fact(
                "tested versions",
                f"{len(differ)} differ from {compat.LOCK_FILE.name}: {listed}",
                "warn",
                f"pip install -c {compat.LOCK_FILE} -e '.[all]' installs the tested set",
            )
        )
    else:
        facts.append(Fact("tested versions", f"as in {compat.LOCK_FILE.name} (the lock the tests ran on)"))
    return facts


def torch_devices() -> list[Fact]:
    try:
        import torch
    except ImportError:
        return [Fact("training device", "torch is not installed", "missing", "pip install torch")]
    facts = []
    if torch.cuda.is_available():
        kind = (
            f"ROCm {torch.version.hip}"
            if getattr(torch.version, "hip", None)
            else f"CUDA {torch.version.cuda}"
        )
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            facts.append(Fact(f"gpu {i}", f"{p.name}, {p.total_memory / 2**30:.1f} GiB ({kind})"))
        bf16 = torch.cuda.is_bf16_supported()
        facts.append(
            Fact(
                "bf16",
                "supported" if bf16 else "not supported",
                "ok" if bf16 else "warn",
                "" if bf16 else 'use mixed_precision = "fp16"',
            )
        )
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        facts.append(Fact("gpu", "Apple MPS"))
    else:
        build = (
            "CPU-only build"
            if torch.version.cuda is None and not getattr(torch.version, "hip", None)
            else "no GPU visible"
        )
        facts.append(
            Fact(
                "gpu",
                f"none ({build}): training runs on the CPU",
                "warn",
                "install the CUDA or ROCm build of torch that matches your driver",
            )
        )
    facts.append(Fact("cpu threads", str(torch.get_num_threads())))
    return facts


def onnx_providers() -> list[Fact]:
    try:
        import onnxruntime
    except ImportError:
        return [Fact("onnx providers", "onnxruntime is not installed", "missing", "pip install onnxruntime")]
    from sdprep.taggers.wd14 import CPU_PROVIDER, choose_providers

    providers = onnxruntime.get_available_providers()
    gpu = choose_providers("auto", providers)[0] != CPU_PROVIDER  # the provider `sdprep tag` would pick
    return [
        Fact(
            "onnx providers",
            ", ".join(providers),
            "ok" if gpu else "warn",
            "" if gpu else "WD14 tagging runs on the CPU: install onnxruntime-gpu (CUDA) or onnxruntime-rocm",
        )
    ]


def hub_and_disk(path: Path) -> list[Fact]:
    facts = []
    try:
        from huggingface_hub import constants

        offline = constants.HF_HUB_OFFLINE
        facts.append(Fact("hub cache", str(constants.HF_HUB_CACHE)))
        facts.append(Fact("hub access", "offline (HF_HUB_OFFLINE)" if offline else "online when needed"))
    except ImportError:
        facts.append(Fact("hub cache", "huggingface_hub is not installed", "missing"))
    try:
        free = shutil.disk_usage(path).free
    except OSError as exc:
        facts.append(Fact("free disk", f"{path}: {exc.strerror}", "warn"))
    else:
        low = free < LOW_DISK_BYTES
        facts.append(
            Fact(
                f"free disk ({path})",
                f"{free / 2**30:.1f} GiB",
                "warn" if low else "ok",
                "SDXL checkpoints are ~7 GB and latent caches grow with the dataset" if low else "",
            )
        )
    return facts


def collect(path: Path | str = ".") -> list[Fact]:
    """Every fact, in the order printed."""
    from sdprep import __version__

    head = [
        Fact("sdprep", __version__),
        Fact("python", f"{platform.python_version()} ({platform.system()} {platform.machine()})"),
        Fact("cpu cores", str(os.cpu_count())),
    ]
    return head + torch_devices() + onnx_providers() + packages() + compatibility() + hub_and_disk(Path(path))
