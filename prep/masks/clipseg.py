"""`clipseg`: text-prompted segmentation with CLIPSeg (transformers), e.g. `--prompt "head"`.

The model is a hub id (default CIDAS/clipseg-rd64-refined, from the Hugging Face cache) or a local
folder holding a saved CLIPSeg model and its processor files. Several prompts are combined by the
pixel-wise maximum. The output is the sigmoid of the logits (a soft probability), resized to the
image; `--threshold 0.4` gives a hard mask. torch and transformers are imported only in `load()`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from sdprep.dataset import Item
from sdprep.errors import ConfigError, ModelError
from sdprep.prep.masks.base import MaskMethod, MethodSettings, register

DEFAULT_MODEL = "CIDAS/clipseg-rd64-refined"
MIN_VOCAB = 100  # a tokenizer loaded from a folder without vocab files has 2-3 tokens


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or Path(name).expanduser().exists()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().split(". ")[0].splitlines()
    return text[0][:200] if text else type(exc).__name__


def _load_error(model: str, local: bool, exc: BaseException) -> ModelError:
    if local:
        return ModelError(
            f'cannot load the CLIPSeg model "{model}" ({_first_line(exc)})',
            "the folder needs config.json, the weights, the tokenizer (vocab.json, merges.txt) and "
            "preprocessor_config.json, as save_pretrained writes them for the model and its processor",
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    return ModelError(
        f'cannot load the CLIPSeg model "{model}" from the Hugging Face hub or its cache'
        + (" (HF_HUB_OFFLINE is set)" if offline else ""),
        f"without network, download it once elsewhere (hf download {DEFAULT_MODEL}) and copy the "
        "Hugging Face cache, or pass --model FOLDER with a saved CLIPSeg model and processor",
    )


@register
class ClipSegMask(MaskMethod):
    """Pixels matching any prompt -> high, the rest -> low (soft unless thresholded)."""

    name = "clipseg"
    thread_safe = False
    gpu = True

    def __init__(self, settings: MethodSettings) -> None:
        super().__init__(settings)
        self.prompts = [p.strip() for p in settings.prompts if p.strip()]
        if not self.prompts:
            raise ConfigError(
                "--method clipseg needs at least one --prompt",
                'say what to learn, e.g. --prompt "head" (repeat --prompt to combine several)',
            )
        self.model_name = settings.model or DEFAULT_MODEL
        self.model: Any = None
        self.processor: Any = None
        self.device = "cpu"

    def load(self) -> None:
        try:
            import torch
            from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor
            from transformers.utils import logging as hf_logging
        except ImportError as exc:
            raise ModelError(
                f"clipseg needs torch and transformers ({exc.name} is not installed)",
                'install them with: pip install "sdprep[vlm]"',
            ) from exc
        name = self.model_name
        if _looks_like_path(name):
            folder = Path(name).expanduser()
            if not (folder / "config.json").is_file():
                raise ModelError(
                    f"{folder}: not a saved CLIPSeg model (no config.json)",
                    "pass a folder written by save_pretrained, or a hub id such as " + DEFAULT_MODEL,
                )
            name = str(folder)
        hf_logging.disable_progress_bar()
        previous = logging.getLogger("transformers").level
        # the torchvision fallback notice is not for our users
        hf_logging.set_verbosity_error()
        try:
            self.processor = CLIPSegProcessor.from_pretrained(name)
            self.model = CLIPSegForImageSegmentation.from_pretrained(name)
        except (OSError, ValueError) as exc:
            raise _load_error(self.model_name, Path(name).is_dir(), exc) from exc
        finally:
            hf_logging.set_verbosity(previous or logging.WARNING)
        vocab = len(self.processor.tokenizer)
        if vocab < MIN_VOCAB:
            raise ModelError(
                f'the CLIPSeg tokenizer of "{self.model_name}" has only {vocab} tokens',
                "its vocab.json / merges.txt are missing: re-download or re-save the model",
            )
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device).eval()

    def make(self, image: Image.Image, item: Item) -> np.ndarray:
        import torch

        n = len(self.prompts)
        inputs = self.processor(
            text=self.prompts, images=[image.convert("RGB")] * n, padding=True, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            logits = self.model(**inputs).logits
        side = logits.shape[-2:]
        probs = torch.sigmoid(logits.float()).reshape(n, *side).amax(dim=0).cpu().numpy()
        w, h = image.size
        return np.clip(cv2.resize(probs, (w, h), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)

    def options(self) -> dict[str, Any]:
        return {"model": self.model_name, "prompts": list(self.prompts)}
