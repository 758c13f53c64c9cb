"""Images of requests: `data:` URLs (PNG, JPEG, WebP) decoded with Pillow, within the server's limits.

Remote URLs and local paths are read only with `--allow-remote-images`: a server that fetches any
URL it is given can be made to probe the network it sits in.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.request
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .config import ServeConfig
from .errors import APIError

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def _bad(message: str) -> APIError:
    return APIError(400, message, code="invalid_image", param="messages")


def _read_remote(url: str, limit: int) -> bytes:
    if url.startswith(("http://", "https://")):
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 -- only with --allow-remote-images
            data = r.read(limit + 1)
    else:
        path = Path(url.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise _bad(f"image {url!r}: no such file")
        with path.open("rb") as f:
            data = f.read(limit + 1)
    return data


def load_image(url: str, cfg: ServeConfig) -> Image.Image:
    """The RGB image an `image_url` names, or a 400 that says what is wrong with it."""
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or ";base64" not in head:
            raise _bad("image data URLs must be base64: data:image/png;base64,...")
        mime = head[5:].split(";")[0]
        if mime not in FORMATS.values():
            raise _bad(f"image type {mime or '(none)'!r} is not supported; send PNG, JPEG or WebP")
        if len(payload) * 3 // 4 > cfg.max_image_bytes:
            raise _bad(f"the image is larger than the server's limit of {cfg.max_image_bytes} bytes")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _bad("the image data URL is not valid base64") from None
    elif not cfg.allow_remote_images:
        raise _bad("only data: image URLs are accepted (the server was not started with --allow-remote-images)")
    else:
        try:
            data = _read_remote(url, cfg.max_image_bytes)
        except OSError as e:
            raise _bad(f"image {url!r} could not be read: {e}") from None
    if len(data) > cfg.max_image_bytes:
        raise _bad(f"the image is larger than the server's limit of {cfg.max_image_bytes} bytes")
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in FORMATS:
            raise _bad(f"image format {image.format} is not supported; send PNG, JPEG or WebP")
        w, h = image.size
        if w * h > cfg.max_image_pixels:
            raise _bad(f"the image has {w}x{h} pixels, more than the server's limit of {cfg.max_image_pixels}")
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise _bad("the image could not be decoded (PNG, JPEG or WebP expected)") from None
