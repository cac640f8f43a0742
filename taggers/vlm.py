"""VLM captioners through transformers: `hf:REPO_OR_DIR`.

One code path for every model that transformers' image-text-to-text auto classes load
(`AutoModelForImageTextToText` + `AutoProcessor`): LLaVA 1.5 / NeXT / OneVision, JoyCaption,
Qwen-VL, Florence-2 and others. The prompt goes through the processor's chat template when it has
one; batches are left-padded for decoder-only models and only the new tokens are decoded.
torch and transformers are imported in `load()`, never at module import.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from sdprep.errors import ConfigError, ModelError, unknown_choice
from sdprep.taggers.base import CAPTIONERS

if TYPE_CHECKING:  # imported for real in load(): never at module import
    import torch
    from transformers import BitsAndBytesConfig

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class HFOptions:
    """Options of `hf:` captioners (the keyword arguments of `load_captioner("hf:...", ...)`)."""

    max_new_tokens: int = 200
    temperature: float = 0.0  # 0 = greedy (deterministic)
    top_p: float = 1.0
    system_prompt: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    load_in_4bit: bool = False  # needs bitsandbytes and a CUDA GPU
    trust_remote_code: bool = False
    revision: str | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.dtype not in DTYPES:
            raise unknown_choice("dtype", self.dtype, DTYPES)


def hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def resolve_source(source: str) -> tuple[str, bool]:
    """(folder path or hub id, is_local). A path-like source that does not exist is a ModelError."""
    source = source.strip()
    if not source:
        raise ConfigError("hf: captioner needs a model", "write hf:REPO_ID or hf:/path/to/model-folder")
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path.resolve()), True
    if path.exists():
        raise ModelError(f"{source} is a file, not a model folder", "pass the folder holding config.json")
    path_like = source.startswith((".", "/", "~", "\\")) or "\\" in source or source.count("/") > 1
    if path_like or (len(source) > 1 and source[1] == ":"):
        raise ModelError(
            f"model folder {source} does not exist",
            "check the path, or pass a Hugging Face repo id such as llava-hf/llava-1.5-7b-hf",
        )
    return source, False


def pick_device(device: str) -> str:
    """`auto` -> cuda when available, else mps, else cpu; explicit devices are checked."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device} requested but no CUDA GPU is available", "use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelError("device mps requested but Metal (MPS) is not available", "use --device cpu")
    if device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise unknown_choice("device", device, ["auto", "cpu", "cuda", "cuda:N", "mps"])
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto` -> bfloat16 (or float16) on GPUs, float32 on CPU."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device == "mps" else torch.float32
    chosen: torch.dtype = getattr(torch, dtype)  # one of DTYPES, checked by HFOptions
    return chosen


def quantization_config(dtype: torch.dtype, device: str) -> BitsAndBytesConfig:
    """A 4-bit (nf4) BitsAndBytesConfig; a clear ModelError when bitsandbytes or a GPU is missing."""
    missing = []
    if not device.startswith("cuda"):
        missing.append("a CUDA GPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package")
    if missing:
        raise ModelError(
            f"4-bit loading needs {' and '.join(missing)} (device is {device})",
            "drop the 4-bit option to load in full precision"
            + (", or pip install bitsandbytes" if "the bitsandbytes package" in missing else ""),
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=True,
    )


def _dtype_keyword() -> str:
    """`from_pretrained` takes `dtype` since transformers 4.56 and `torch_dtype` before."""
    import transformers

    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


class HFCaptioner:
    """Natural-language captions from a transformers image-text-to-text model."""

    def __init__(self, source: str, options: HFOptions | None = None):
        self.given = source
        self.source, self.local = resolve_source(source)
        self.options = options or HFOptions()
        self.name = f"hf:{self.source}"
        self.model: Any = None
        self.processor: Any = None
        self.device = "cpu"
        self.dtype: torch.dtype | None = None
        self._chat_form = ""  # which message form the chat template accepts (see build_text)

    def __reduce__(self) -> tuple[type[HFCaptioner], tuple[str, HFOptions]]:
        """Sent to a Ray worker as what builds it, not the loaded model: each worker loads its own."""
        return (HFCaptioner, (self.given, self.options))

    @property
    def settings(self) -> dict[str, Any]:
        """Options that change the text (recorded with each caption)."""
        o = self.options
        out: dict[str, Any] = {"max_new_tokens": o.max_new_tokens, "temperature": o.temperature}
        if o.temperature > 0 and o.top_p < 1:
            out["top_p"] = o.top_p
        if o.system_prompt:
            out["system_prompt"] = o.system_prompt
        return out

    def load(self) -> None:
        """Load processor and model (once); errors become ModelErrors with a hint."""
        if self.model is not None:
            return
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        o = self.options
        self.device = pick_device(o.device)
        self.dtype = pick_dtype(o.dtype, self.device)
        kwargs: dict[str, Any] = {"trust_remote_code": o.trust_remote_code, "revision": o.revision}
        if not self.local and hub_offline():
            kwargs["local_files_only"] = True
        model_kwargs: dict[str, Any] = {_dtype_keyword(): self.dtype}
        if o.load_in_4bit:
            model_kwargs["quantization_config"] = quantization_config(self.dtype, self.device)
            model_kwargs["device_map"] = {"": self.device}
        try:
            processor = AutoProcessor.from_pretrained(self.source, **kwargs)
            model = AutoModelForImageTextToText.from_pretrained(self.source, **kwargs, **model_kwargs)
        except (OSError, ValueError, KeyError, ImportError) as exc:
            raise self._load_error(exc) from exc
        if getattr(processor, "image_processor", None) is None:
            raise ModelError(f"{self.name}: the processor has no image processor; is this a vision model?")
        # transformers' @wraps(nn.Module.to): its type does not describe this call
        if not o.load_in_4bit:
            model = model.to(self.device)  # type: ignore[arg-type]
        model.eval()
        tokenizer = getattr(processor, "tokenizer", None)
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        if tokenizer is not None:
            if not self.encoder_decoder:
                tokenizer.padding_side = "left"  # batched generation appends after the prompt
            if tokenizer.pad_token is None and tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token
        self.processor, self.model, self._torch = processor, model, torch
        log.info("loaded %s on %s (%s)", self.name, self.device, str(self.dtype).replace("torch.", ""))

    def _load_error(self, exc: Exception) -> ModelError:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "Unrecognized configuration class" in str(exc) or "does not recognize this architecture" in str(
            exc
        ):
            return ModelError(
                f"{self.name}: transformers cannot load this model as image-text-to-text ({text})",
                "pass trust_remote_code=True if the model card asks for it, or upgrade transformers",
            )
        if self.local:
            return ModelError(
                f"{self.name}: cannot load the model folder ({text})",
                "the folder needs config.json, the weights and the processor/tokenizer files "
                "(as saved by save_pretrained or downloaded with `hf download REPO --local-dir DIR`)",
            )
        if hub_offline():
            return ModelError(
                f"{self.name}: not in the Hugging Face cache and the hub is offline (HF_HUB_OFFLINE)",
                f"download it where there is network (`hf download {self.source} --local-dir DIR`) "
                "and pass --captioner hf:DIR, or unset HF_HUB_OFFLINE",
            )
        return ModelError(
            f"{self.name}: cannot load from the Hugging Face hub ({text})",
            "check the repo id and your network; gated models need `hf auth login`",
        )

    def build_text(self, prompt: str) -> str:
        """The model input text for one image: the chat template when there is one, else the raw prompt.

        Templates differ: most take content parts (`{"type": "image"}` + text), some (JoyCaption,
        older LLaVA ports) take a plain string and insert the image token themselves or not at all.
        The first form that renders cleanly with an image marker is used from then on.
        """
        processor = self.processor
        image_token = getattr(processor, "image_token", None)
        has_template = getattr(processor, "chat_template", None) or getattr(
            getattr(processor, "tokenizer", None), "chat_template", None
        )
        if not has_template:
            # Florence-2 prompts are task tokens ("<MORE_DETAILED_CAPTION>"); its processor adds the image
            if (
                image_token
                and image_token not in prompt
                and not type(processor).__name__.startswith("Florence")
            ):
                return f"{image_token}\n{prompt}"
            return prompt
        if self._chat_form:
            text = self._render_chat(prompt, self._chat_form, image_token)
            if text is not None:
                return text
        fallback = None
        for form in ("parts", "string", "string+token"):
            text = self._render_chat(prompt, form, image_token)
            if text is None:
                continue
            if self._marks_image(text, prompt):
                self._chat_form = form
                return text
            fallback = fallback or (form, text)
        if fallback:  # no known image marker seen (e.g. Gemma's <start_of_image>): trust the parts form
            self._chat_form = fallback[0]
            return fallback[1]
        raise ModelError(
            f"{self.name}: the chat template does not accept an image with a text prompt",
            "the model may need trust_remote_code=True or a newer transformers",
        )

    def _marks_image(self, text: str, prompt: str) -> bool:
        """True when the rendered text holds one more image marker than the user's prompt."""
        found = (getattr(self.processor, n, None) for n in ("image_token", "boi_token"))
        markers = {m for m in found if isinstance(m, str) and m}
        return any(text.count(m) > prompt.count(m) for m in markers)

    def _render_chat(self, prompt: str, form: str, image_token: str | None) -> str | None:
        system = self.options.system_prompt
        if form == "parts":
            user: Any = [{"type": "image"}, {"type": "text", "text": prompt}]
            sys_content: Any = [{"type": "text", "text": system}]
        else:
            user = f"{image_token}\n{prompt}" if form == "string+token" and image_token else prompt
            sys_content = system
        messages = ([{"role": "system", "content": sys_content}] if system else []) + [
            {"role": "user", "content": user}
        ]
        try:
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja errors of templates written for the other content form
            log.debug("%s: chat template form %s failed: %s", self.name, form, exc)
            return None
        if not isinstance(text, str) or "'type':" in text:  # a list of parts printed as a string
            return None
        return text

    def _process(self, images: list[Image.Image], texts: list[str]) -> Any:
        """Processor inputs; some processors (Idefics, Mllama) want one list of images per prompt."""
        try:
            return self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        except (ValueError, TypeError) as exc:
            try:
                return self.processor(
                    images=[[im] for im in images], text=texts, return_tensors="pt", padding=True
                )
            except (ValueError, TypeError):
                raise ModelError(f"{self.name}: the processor rejected the batch ({exc})") from exc

    def caption(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        """One caption per image (batched generation); only the newly generated tokens are decoded."""
        if len(images) != len(prompts):
            raise ConfigError(f"caption() got {len(images)} images but {len(prompts)} prompts")
        if not images:
            return []
        self.load()
        torch = self._torch
        texts = [self.build_text(p) for p in prompts]
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        inputs = self._process(rgb, texts).to(self.device, dtype=self.dtype)
        o = self.options
        generate: dict[str, Any] = {"max_new_tokens": o.max_new_tokens, "do_sample": o.temperature > 0}
        if o.temperature > 0:
            generate.update(temperature=o.temperature, top_p=o.top_p)
        try:
            with torch.inference_mode():
                out = self.model.generate(**inputs, **generate)
        except torch.cuda.OutOfMemoryError as exc:
            raise ModelError(
                f"{self.name}: out of GPU memory for a batch of {len(images)}",
                "lower the batch size, max_new_tokens, or load in 4-bit",
            ) from exc
        if not self.encoder_decoder:
            out = out[:, inputs["input_ids"].shape[1] :]
        decoded = self.processor.batch_decode(out, skip_special_tokens=True)
        return [text.strip() for text in decoded]


def create_hf(source: str, **options: Any) -> HFCaptioner:
    """Registry factory for `hf:REPO_OR_DIR`."""
    from sdprep.taggers.captioners import parse_options

    return HFCaptioner(source, parse_options(HFOptions, options, "hf"))


CAPTIONERS.register("hf", create_hf)
