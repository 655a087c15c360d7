"""How an image file becomes the pixels a model sees: one rule for the shard stage, the
loaders and the MLflow model, so that a picture gives the same tensor in training and at
serving time. PIL and numpy only (the shard stage's workers import no torch).

The rule, by the mode Pillow opens an image in (every mode it has):

- L and RGB: as stored. 1 (bilevel), P (palette), CMYK, YCbCr, LAB, HSV, RGBX: PIL's
  `convert` to L or RGB (RGB to L: ITU-R 601-2 luma).
- 16-bit grayscale (I;16, I;16B, I;16L, I;16N, and I, as older Pillows open 16-bit
  PNGs): the top 8 bits. `convert("L")` clips every value above 255 to white. Values of
  an I image outside 0-65535 are refused.
- F (32-bit float, e.g. a TIFF): values in [0, 1] scaled to 0-255. `convert("L")` clamps
  them to 0 or 1, a black image (Pillow#3159). Values outside [0, 1], or not finite, are
  refused: no scale is implied by the file.
- Transparency (LA, La, PA, RGBA, RGBa, or a palette or L/RGB image with a transparent
  colour): composited on white (`BACKGROUND`), as an image viewer shows it. Dropping
  alpha exposes whatever colour sits under alpha 0, so two icons that look the same
  read as black and as white.
- EXIF orientation is not applied, as torchvision's ImageFolder does not: the pixels are
  the file's, in training and at serving time alike.

A refusal is a ValueError that names the mode and why.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

WIDE_GRAY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}  # how PIL opens 16-bit gray PNGs
ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
BACKGROUND = 255  # what shows through transparency: white


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """`img` in `mode` ("L" or "RGB") by the module's rule; ValueError for what it refuses."""
    if img.mode in WIDE_GRAY_MODES or img.mode == "F":
        img = _scaled_gray(img)
    elif img.mode in ALPHA_MODES or "transparency" in img.info:
        img = _on_background(img)
    return img if img.mode == mode else img.convert(mode)


def _scaled_gray(img: Image.Image) -> Image.Image:
    pixels = np.asarray(img)
    if img.mode == "F":
        lo, hi = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
        if not (np.isfinite(pixels).all() and lo >= 0 and hi <= 1):
            raise ValueError(
                f"float (mode F) pixels from {lo:.4g} to {hi:.4g}: only values in [0, 1] are "
                "read (scaled to 0-255)"
            )
        return Image.fromarray(np.rint(pixels * 255).astype(np.uint8), "L")
    pixels = pixels.astype(np.int64)
    if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
        raise ValueError(
            f"32-bit (mode {img.mode}) pixels from {pixels.min()} to {pixels.max()}: read as "
            "16-bit grayscale, only values in 0-65535 are"
        )
    return Image.fromarray((pixels >> 8).astype(np.uint8), "L")


def _on_background(img: Image.Image) -> Image.Image:
    """An image with transparency, composited on `BACKGROUND` (gray stays gray)."""
    gray = img.mode in ("LA", "La", "L", "1")
    straight = img.convert("LA" if gray else "RGBA")  # premultiplied and palettes resolved
    a = np.asarray(straight).astype(np.float32)
    alpha = a[..., -1:] / 255
    out = np.rint(a[..., :-1] * alpha + BACKGROUND * (1 - alpha)).astype(np.uint8)
    return Image.fromarray(out[..., 0] if gray else out, "L" if gray else "RGB")


def decode(data: bytes, mode: str) -> Image.Image:
    """An encoded image (any format Pillow reads) -> the image in `mode` by `to_mode`.

    Raises ValueError naming why: not an image, truncated or corrupt, more pixels than
    Pillow's decompression-bomb limit (twice `PIL.Image.MAX_IMAGE_PIXELS`: its
    `DecompressionBombError` is no OSError), or a mode the rule refuses."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_mode(img, mode)
    except Image.DecompressionBombError as err:
        raise ValueError(f"too large to decode safely: {str(err).split(',')[0]}") from None
    except UnidentifiedImageError:
        raise ValueError("not an image (Pillow cannot identify it)") from None
    except (OSError, SyntaxError) as err:  # unreadable, truncated, corrupt
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"not a readable image ({first})") from None
