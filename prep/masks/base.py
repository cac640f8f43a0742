"""The mask-method contract and its registry.

A mask method turns one image into a float32 array [H, W] in 0..1 of the image's displayed size
(1 = full loss, 0 = none). Methods are plugins: a class with a unique `name`, built from
`MethodSettings`, that may load something heavy in `load()` (called once, only when there is work)
and then answers `make(image, item)` for each image. A method that finds nothing to mask in one image
(no transparency, no face) raises `MaskNotFound`: a per-file failure, or the `--fallback` mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from sdprep.dataset import Item
from sdprep.errors import ImageError, unknown_choice
from sdprep.images import Mode, load_image


class MaskNotFound(ImageError):
    """The method found nothing to mask in this image; `--fallback full` turns it into an all-white mask."""

    whole_image = False  # True: such an image needs no mask, trainers use all of it (no transparency)


class NoTransparency(MaskNotFound):
    """An opaque image under `--method alpha`: kohya and OneTrainer train it whole, so it is skipped."""

    whole_image = True


@dataclass(frozen=True)
class MethodSettings:
    """Method-specific options; each method reads only its own fields."""

    prompts: tuple[str, ...] = ()  # clipseg
    model: str = "CIDAS/clipseg-rd64-refined"  # clipseg: hub id or local folder
    cascade: str | None = None  # face: cascade XML (default: OpenCV's frontal face)
    pad: float = 0.25  # face: box padding, as a fraction of the box size on each side
    color: str | None = None  # color: background colour (default: estimated from the border)
    tolerance: float = 30.0  # color: RGB distance (0..441) still counted as background
    border_only: bool = False  # color: only background regions touching the border
    source: Path | None = None  # import: folder of painted masks


class MaskMethod:
    """Base class of mask methods; subclasses set `name` and implement `make`."""

    name: ClassVar[str] = ""
    image_mode: ClassVar[Mode] = "RGB"  # how the stage loads the image for `make`
    thread_safe: ClassVar[bool] = True  # False: the stage runs it on one thread
    gpu: ClassVar[bool] = False  # runs a model that wants a GPU (a Ray cluster's GPU actors)

    def __init__(self, settings: MethodSettings):
        self.settings = settings
        self.notes: list[str] = []  # short per-file remarks for the summary (list.append is atomic)
        self._loaded = False

    def __reduce__(self) -> tuple[type[MaskMethod], tuple[MethodSettings]]:
        """Sent to another process (a Ray worker) as what builds it, not what it loaded: each
        worker loads its own copy once (`ready`)."""
        return (type(self), (self.settings,))

    def ready(self) -> None:
        """`load()` once in this process."""
        if not self._loaded:
            self.load()
            self._loaded = True

    def load(self) -> None:
        """Load models or indexes; called once before the first `make` (through `ready`)."""

    def make(self, image: Image.Image, item: Item) -> np.ndarray:
        """The raw mask of `image` (already EXIF-rotated): float32 [H, W] in 0..1."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """What changes this method's output, recorded in the sidecar (a change redoes the mask)."""
        return {}

    def inputs(self, item: Item) -> dict[str, Any]:
        """Per-image inputs besides the image itself (import: the source mask's hash)."""
        return {}


MASK_METHODS: dict[str, type[MaskMethod]] = {}


def register(cls: type[MaskMethod]) -> type[MaskMethod]:
    """Class decorator adding a method to the registry; names are unique."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in MASK_METHODS and MASK_METHODS[cls.name] is not cls:
        raise ValueError(f'a mask method named "{cls.name}" is already registered')
    MASK_METHODS[cls.name] = cls
    return cls


def create_method(name: str, settings: MethodSettings | None = None) -> MaskMethod:
    """Build the method registered as `name`; an unknown name lists the valid ones."""
    import sdprep.prep.masks  # noqa: F401 - registers the built-in methods

    if name not in MASK_METHODS:
        raise unknown_choice("mask method", name, MASK_METHODS)
    return MASK_METHODS[name](settings or MethodSettings())


def read_mask_image(path: Path | str, *, root: Path | str | None = None) -> np.ndarray:
    """The 8-bit mask [H, W] kohya would read from a mask file: its red channel.

    Greyscale files are used as they are (R = G = B); transparent pixels count as black (no loss),
    so a mask painted as white strokes on a transparent layer means what it looks like. `root`: the
    dataset folder, for the symlink rule (`sdprep.dataset.unsafe_reason`).
    """
    im = load_image(path, mode="RGB", background=(0, 0, 0), root=root)
    return np.asarray(im.getchannel("R"), dtype=np.uint8)
