"""`face`: boxes around faces found by an OpenCV cascade detector, padded; the rest is ignored.

The default is OpenCV's frontal-face Haar cascade (shipped by the opencv-python(-headless) 4.x
wheels; 5.x wheels ship no cascade files). `--cascade FILE` takes any cascade XML, Haar or LBP, e.g.
`lbpcascade_animeface.xml` for anime faces; a bare file name is also looked up in OpenCV's folder.
Soft edges come from the shared `--feather` option.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from sdprep.dataset import Item
from sdprep.errors import ConfigError, ModelError
from sdprep.prep.masks.base import MaskMethod, MaskNotFound, MethodSettings, register

DEFAULT_CASCADE = "haarcascade_frontalface_default.xml"
# Detection runs on a copy no larger than this (boxes are scaled back): 2-3x faster than at 1024 px,
# and faces under about 4% of the long side (24 px here) are too small to be worth a mask anyway.
DETECT_MAX_SIDE = 640
SCALE_FACTOR = 1.1
MIN_NEIGHBORS = 5
MIN_FACE = 24


def opencv_cascade_dir() -> Path | None:
    data = getattr(cv2, "data", None)
    folder = getattr(data, "haarcascades", None) if data is not None else None
    return Path(folder) if folder else None


def resolve_cascade(name: str | None) -> Path:
    """The cascade file to load: a path, or a file name in OpenCV's cascade folder."""
    wanted = name or DEFAULT_CASCADE
    path = Path(wanted).expanduser()
    if path.is_file():
        return path
    folder = opencv_cascade_dir()
    if folder is not None and (folder / path.name).is_file() and path.name == wanted:
        return folder / path.name
    if name is None:
        raise ModelError(
            f"OpenCV's default face cascade {DEFAULT_CASCADE} is missing "
            f"(OpenCV {cv2.__version__}; OpenCV 5 wheels ship no cascade files)",
            'install OpenCV 4 (pip install "opencv-python-headless>=4.8,<5"), '
            "or pass --cascade FILE with a cascade XML",
        )
    raise ModelError(
        f"cascade file not found: {wanted}",
        "pass the path of a Haar or LBP cascade XML (e.g. lbpcascade_animeface.xml for anime faces)",
    )


def pad_box(box: tuple[int, int, int, int], pad: float, w: int, h: int) -> tuple[int, int, int, int]:
    """Grow an (x, y, bw, bh) box by `pad` of its size on every side; returns (x0, y0, x1, y1) clipped."""
    x, y, bw, bh = box
    dx, dy = bw * pad, bh * pad
    x0, y0 = max(0, int(np.floor(x - dx))), max(0, int(np.floor(y - dy)))
    x1, y1 = min(w, int(np.ceil(x + bw + dx))), min(h, int(np.ceil(y + bh + dy)))
    return x0, y0, x1, y1


@register
class FaceMask(MaskMethod):
    """Faces (padded boxes) -> 1, everything else -> 0."""

    name = "face"

    def __init__(self, settings: MethodSettings) -> None:
        super().__init__(settings)
        if settings.pad < 0:
            raise ConfigError(f"--pad must be 0 or more, got {settings.pad}")
        self.cascade_path: Path | None = None
        self._local = threading.local()  # a classifier per thread: detectMultiScale is not re-entrant

    def load(self) -> None:
        self.cascade_path = resolve_cascade(self.settings.cascade)
        self._classifier()  # fail now, not on the first image

    def _classifier(self) -> cv2.CascadeClassifier:
        clf = getattr(self._local, "clf", None)
        if clf is None:
            try:
                clf = cv2.CascadeClassifier(str(self.cascade_path))
            except (cv2.error, SystemError):  # a malformed XML raises instead of giving an empty one
                clf = None
            if clf is None or clf.empty():
                raise ModelError(
                    f"{self.cascade_path}: not a cascade OpenCV can load",
                    "pass a Haar or LBP cascade XML written by opencv_traincascade",
                )
            self._local.clf = clf
        return clf

    def detect(self, grey: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Face boxes (x, y, w, h) in the coordinates of `grey`."""
        h, w = grey.shape
        scale = min(1.0, DETECT_MAX_SIDE / max(h, w))
        small = grey
        if scale < 1.0:
            small = cv2.resize(grey, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        small = cv2.equalizeHist(small)
        found = self._classifier().detectMultiScale(
            small, scaleFactor=SCALE_FACTOR, minNeighbors=MIN_NEIGHBORS, minSize=(MIN_FACE, MIN_FACE)
        )

        def scaled(v: float) -> int:
            return int(round(v / scale))

        return [(scaled(x), scaled(y), scaled(w), scaled(h)) for x, y, w, h in found]

    def make(self, image: Image.Image, item: Item) -> np.ndarray:
        w, h = image.size
        boxes = self.detect(np.asarray(image.convert("L")))
        if not boxes:
            raise MaskNotFound(
                item.path,
                f"no face found (cascade {Path(self.settings.cascade or DEFAULT_CASCADE).name})",
                "use --fallback full to train on such images whole, or another --cascade / --method",
            )
        mask = np.zeros((h, w), dtype=np.float32)
        for box in boxes:
            x0, y0, x1, y1 = pad_box(box, self.settings.pad, w, h)
            mask[y0:y1, x0:x1] = 1.0
        return mask

    def options(self) -> dict[str, Any]:
        return {"cascade": self.settings.cascade or DEFAULT_CASCADE, "pad": self.settings.pad}
