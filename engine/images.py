"""Turning what callers send (PIL images, encoded bytes, base64 strings) into PIL images."""

from __future__ import annotations

import base64
import binascii
import io
import re
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
        except Image.DecompressionBombError as exc:
            # A small file can claim a huge picture: Pillow refuses to decode it (it would fill the memory).
            pixels = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"a picture of {int(pixels.group(1)):,} pixels" if pixels else f"{len(value)} bytes"
            raise InvalidRequestError(
                field, size, f"{IMAGE_KINDS} of at most {2 * Image.MAX_IMAGE_PIXELS:,} pixels"
            ) from exc
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise InvalidRequestError(
                field, f"{len(value)} bytes", IMAGE_KINDS + " (these bytes are not an image file)"
            ) from exc
    raise InvalidRequestError(field, value, IMAGE_KINDS)


def encode_png(
    image: Image.Image, infotext: str | None = None, compress_level: int = 4, postprocessing: str | None = None
) -> bytes:
    """PNG bytes with the A1111 `parameters` text chunk when an infotext is given, and its `postprocessing`
    chunk (what Extras did to the picture) when that is."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    if postprocessing:
        info.add_text("postprocessing", postprocessing)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()


def encode_base64_png(image: Image.Image, infotext: str | None = None, postprocessing: str | None = None) -> str:
    return base64.b64encode(encode_png(image, infotext, postprocessing=postprocessing)).decode("ascii")


# A1111's img2img resize modes (its `resize_mode` field and the page's "Resize mode").
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")
LATENT_RESIZE = 3


def resize_to(image: Image.Image, width: int, height: int, mode: int = 0) -> Image.Image:
    """An init image (or mask) brought to the generation size as A1111's resize_image does it:

    0 "Just resize": stretched to the size;
    1 "Crop and resize": scaled to cover the size, keeping its aspect ratio, and the middle cut out;
    2 "Resize and fill": scaled to fit inside, keeping its aspect ratio, the rest filled by stretching
      its outermost rows or columns outwards.
    Mode 3 (latent upscale) resizes latents rather than pixels; for pixels it is A1111's mode 2 here too.
    """
    if image.size == (width, height):
        return image
    lanczos = Image.Resampling.LANCZOS
    if mode == 0:
        return image.resize((width, height), lanczos)
    wanted, given = width / height, image.width / image.height
    if mode == 1:  # cover
        scaled_w = width if wanted > given else image.width * height // image.height
        scaled_h = height if wanted <= given else image.height * width // image.width
    else:  # fit
        scaled_w = width if wanted < given else image.width * height // image.height
        scaled_h = height if wanted >= given else image.height * width // image.width
    scaled = image.resize((scaled_w, scaled_h), lanczos)
    canvas = Image.new(image.mode, (width, height))
    left, top = width // 2 - scaled_w // 2, height // 2 - scaled_h // 2
    canvas.paste(scaled, (left, top))
    if mode != 1:
        # The bands left empty take the picture's edge rows (or columns), stretched across them. (Where the
        # difference is odd, A1111 leaves the far band one row short, black; it is filled here.)
        below, right = height - (top + scaled_h), width - (left + scaled_w)
        if wanted < given and top > 0:
            canvas.paste(scaled.resize((width, top), lanczos, box=(0, 0, width, 0)), (0, 0))
            bottom_edge = (0, scaled_h, width, scaled_h)
            canvas.paste(scaled.resize((width, below), lanczos, box=bottom_edge), (0, top + scaled_h))
        elif wanted > given and left > 0:
            canvas.paste(scaled.resize((left, height), lanczos, box=(0, 0, 0, height)), (0, 0))
            right_edge = (scaled_w, 0, scaled_w, height)
            canvas.paste(scaled.resize((right, height), lanczos, box=right_edge), (left + scaled_w, 0))
    return canvas
