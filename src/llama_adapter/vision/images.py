"""Image loading that never hands a model something other than an upright 8-bit RGB picture.

Real image folders hold every PIL mode there is (palette GIFs with transparency, 16-bit
greyscale PNGs, CMYK JPEGs, phone photos rotated by an EXIF tag). Encoders expect RGB, so
everything is normalised here, once, and unreadable files fail loudly with their path.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = str | os.PathLike | bytes | Image.Image

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_BACKGROUND = (255, 255, 255)


def _describe(src: ImageSource) -> str:
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    return str(src)


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit L (PIL's own convert clips instead of scaling)."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16") or arr.dtype == np.uint16:
        arr = arr.astype(np.float64) / 257.0
    elif img.mode == "F":
        arr = arr.astype(np.float64)
        arr = arr * 255.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else arr
    else:  # "I": 32-bit ints, usually a 16-bit PNG decoded by an older PIL
        arr = arr.astype(np.float64)
        arr = arr / 257.0 if arr.size and float(arr.max()) > 255 else arr
    arr = np.nan_to_num(arr)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels are composited onto white."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        if img.mode == "RGB":
            return img
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        img = _high_depth_to_l(img)
    return img.convert("RGB")


def load_image(src: ImageSource) -> Image.Image:
    """Open a path, raw bytes or PIL image as an upright RGB image (first frame of animations).

    Raises FileNotFoundError for a missing file and ValueError (naming the file) for one that
    cannot be decoded, so a bad record is reported instead of silently training on garbage.
    """
    if isinstance(src, Image.Image):
        img = src
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        return to_rgb(ImageOps.exif_transpose(img) or img).copy()
    if isinstance(src, (bytes, bytearray)):
        stream: io.BytesIO | Path = io.BytesIO(bytes(src))
    else:
        stream = Path(src)
        if not stream.is_file():
            raise FileNotFoundError(f"image file not found: {stream}")
    try:
        with Image.open(stream) as img:
            img.seek(0)
            img.load()
            upright = ImageOps.exif_transpose(img) or img
            return to_rgb(upright).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {_describe(src)}: {e}") from e


def image_digest(src: str | os.PathLike | bytes) -> str:
    """sha256 of the encoded file bytes: the cache key of an image (content, not name, matters)."""
    if isinstance(src, (bytes, bytearray)):
        return hashlib.sha256(bytes(src)).hexdigest()
    path = Path(src)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def blank_image(size: int | tuple[int, int] = 224, value: int = 128) -> Image.Image:
    """A uniform grey RGB image: swap it in to check that a model really uses the picture."""
    w, h = (size, size) if isinstance(size, int) else size
    return Image.new("RGB", (w, h), (value, value, value))
