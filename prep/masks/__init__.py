"""Mask methods for masked-loss training: one plugin per method behind `base.MaskMethod`.

Importing this package registers the built-in methods (alpha, face, clipseg, color, import, full);
heavy libraries (torch, transformers) are imported only when a method's `load()` runs.
"""

from sdprep.prep.masks import alpha, clipseg, color, face, full, importer  # noqa: F401 - registers the built-in methods
from sdprep.prep.masks.base import (
    MASK_METHODS,
    MaskMethod,
    MaskNotFound,
    MethodSettings,
    create_method,
    read_mask_image,
    register,
)

__all__ = [
    "MASK_METHODS",
    "MaskMethod",
    "MaskNotFound",
    "MethodSettings",
    "create_method",
    "read_mask_image",
    "register",
]
