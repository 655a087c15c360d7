"""How an image file becomes the pixels a model sees: one function for the shard stage,
the loaders and the MLflow model, so that a picture gives the same tensor in training and
at serving time. PIL and numpy only (the shard stage's workers import no torch)."""

from __future__ import annotations

import numpy as np
from PIL import Image

WIDE_GRAY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}  # how PIL opens 16-bit gray PNGs


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """`img` in `mode` ("L" or "RGB"), as the pipeline reads every image.

    16-bit (and wider) grayscale keeps its top 8 bits: PIL's `convert("L")` would clip
    every value above 255 to white. Everything else is PIL's `convert` (alpha dropped,
    palettes expanded). EXIF orientation is not applied, as torchvision's ImageFolder
    does not: the pixels are the file's, in training and at serving time alike.
    """
    if img.mode in WIDE_GRAY_MODES:
        pixels = np.asarray(img).astype(np.int64) >> 8
        img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "L")
    return img if img.mode == mode else img.convert(mode)
