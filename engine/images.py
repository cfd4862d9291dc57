"""Turning what callers send (PIL images, encoded bytes, base64 strings) into PIL images."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InvalidRequestError

IMAGE_KINDS = "a PIL image, a numpy array, PNG/JPEG/WebP bytes, or such bytes as base64 (data URLs too)"


def to_pil(value: Any, field: str) -> Image.Image:
    """Decode one image, raising InvalidRequestError naming `field` when it is not an image."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        try:
            return Image.fromarray(value)
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(field, f"array of shape {value.shape}", IMAGE_KINDS) from exc
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]
        try:
            value = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequestError(field, value, IMAGE_KINDS + " (this string is not valid base64)") from exc
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            image = Image.open(io.BytesIO(bytes(value)))
            image.load()
            return image
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise InvalidRequestError(
                field, f"{len(value)} bytes", IMAGE_KINDS + " (these bytes are not an image file)"
            ) from exc
    raise InvalidRequestError(field, value, IMAGE_KINDS)


def encode_png(image: Image.Image, infotext: str | None = None, compress_level: int = 4) -> bytes:
    """PNG bytes with the A1111 `parameters` text chunk when an infotext is given."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()


def encode_base64_png(image: Image.Image, infotext: str | None = None) -> str:
    return base64.b64encode(encode_png(image, infotext)).decode("ascii")
