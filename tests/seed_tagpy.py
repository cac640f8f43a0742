"""Seed 003's tag.py (shared/seeds/003_*), verbatim apart from its loop: the baseline the clean and
monochrome tests compare sdprep against. (The seed's own loop only looked at .webp files.)"""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

SEED_REMOVE = [
    "braided hair rings", "blue eyes", "pink hair", "fangs", "zettai ryouiki",
    "1girl", "black nails", "meme", "abyssal ship", "small breasts", "vampire",
    "parody", "hair rings", "ringed eyes", "blunt bangs", "bangs", "braids", "braid",
]  # fmt: skip


def seed_detect_monochrome(image):
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    saturation = (hsv[:, :, 1] / 255).mean()
    hue = (hsv[:, :, 0] / 179).std()
    if saturation < 0.001:
        return "greyscale"
    if hue < 0.03:
        return "monochrome"
    return None


def seed_clean_and_update_tags(img_path: Path, txt_path: Path) -> None:
    quality_tags = []
    image = np.array(Image.open(img_path).convert("RGB"))
    monochrome = seed_detect_monochrome(image)
    if monochrome is not None:
        quality_tags.append(f"{monochrome}")
    content = txt_path.read_text(encoding="utf-8").strip() if txt_path.exists() else ""
    if not content.startswith("nazuna, "):
        content = "nazuna, " + content if content else "nazuna"
    for tag in SEED_REMOVE:
        content = re.sub(rf",\s*{re.escape(tag)}", "", content)
    for qtag in quality_tags:
        if qtag not in content.split(", "):
            content += f", {qtag}"
    content = re.sub(r",\s*,", ",", content)
    content = re.sub(r"\s+", " ", content).strip().strip(",")
    txt_path.write_text(content, encoding="utf-8")


def seed_label(path: Path) -> str | None:
    """The seed's test on a full-resolution decode of the file at `path`."""
    return seed_detect_monochrome(np.array(Image.open(path).convert("RGB")))
