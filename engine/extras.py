"""A1111's Extras upscale: a picture made larger with one upscaler, optionally blended with a second.

As A1111's postprocessing does it: "Scale by" makes the picture `upscaling_resize` times larger, rounded down to
a multiple of 8 on each side; "Scale to" scales by the larger of the two ratios to the asked size and, with
`upscaling_crop`, centres the result on a canvas of exactly that size (cropping what sticks out; A1111 rounds
the scaled sides down to a multiple of 8 here too, leaving black bands when the asked size is not one). An upscaler
model runs until the picture is at least that large, then Lanczos brings it to size; Lanczos and Nearest resize
directly; "None" as the first upscaler leaves the picture as it is. A second upscaler at a visibility above 0 is
blended over the first (0: only the first, 1: only the second).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from .errors import InvalidRequestError
from .images import to_pil

# The generation request's number parsing, so both refuse a value in the same words.
from .request import Limits, _as_float, _as_int
from .upscalers import upscale_to

SCALE_BY, SCALE_TO = 0, 1
MAX_SCALE = 8.0


@dataclass
class ExtrasRequest:
    """One picture to upscale; field names and defaults are A1111's /sdapi/v1/extra-single-image."""

    image: Any = None
    resize_mode: int = SCALE_BY
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0


def target_size(picture: Image.Image, req: ExtrasRequest) -> tuple[int, int, float]:
    """(width, height, scale) the upscaler brings `picture` to, before any crop."""
    if req.resize_mode == SCALE_TO:
        # Covering the asked size: A1111 rounds these sides down to a multiple of 8 too, which leaves black bands
        # on the canvas whenever the asked size is not a multiple of 8 itself.
        width, height = req.upscaling_resize_w, req.upscaling_resize_h
        scale = max(width / picture.width, height / picture.height)
        return max(round(picture.width * scale), width), max(round(picture.height * scale), height), scale
    scale = req.upscaling_resize
    return int(picture.width * scale) // 8 * 8, int(picture.height * scale) // 8 * 8, scale


def check(req: ExtrasRequest, limits: Limits, choose_upscaler) -> ExtrasRequest:
    """A checked copy of `req` (the picture decoded, upscaler names made canonical by `choose_upscaler(value,
    field)`); InvalidRequestError naming the field otherwise."""
    if req.image is None:
        raise InvalidRequestError("image", None, "a picture (base64 PNG/JPEG/WebP, or a data URL)")
    picture = to_pil(req.image, "image").convert("RGB")
    mode = _as_int(req.resize_mode, "resize_mode")
    if mode not in (SCALE_BY, SCALE_TO):
        raise InvalidRequestError("resize_mode", req.resize_mode, "0 (scale by) or 1 (scale to)")
    scale = _as_float(req.upscaling_resize, "upscaling_resize")
    if not 1.0 <= scale <= MAX_SCALE:
        raise InvalidRequestError("upscaling_resize", req.upscaling_resize, f"1 to {MAX_SCALE:g}")
    width = _as_int(req.upscaling_resize_w, "upscaling_resize_w")
    height = _as_int(req.upscaling_resize_h, "upscaling_resize_h")
    for name, side in (("upscaling_resize_w", width), ("upscaling_resize_h", height)):
        if mode == SCALE_TO and not 8 <= side <= limits.max_side:
            raise InvalidRequestError(name, side, f"8 to {limits.max_side} pixels")
    visibility = _as_float(req.extras_upscaler_2_visibility, "extras_upscaler_2_visibility")
    if not 0.0 <= visibility <= 1.0:
        raise InvalidRequestError("extras_upscaler_2_visibility", req.extras_upscaler_2_visibility, "0 to 1")
    checked = ExtrasRequest(
        image=picture,
        resize_mode=mode,
        upscaling_resize=scale,
        upscaling_resize_w=width,
        upscaling_resize_h=height,
        upscaling_crop=bool(req.upscaling_crop),
        upscaler_1=choose_upscaler(req.upscaler_1 or "None", "upscaler_1"),
        upscaler_2=choose_upscaler(req.upscaler_2 or "None", "upscaler_2"),
        extras_upscaler_2_visibility=visibility,
    )
    out_width, out_height, _ = target_size(picture, checked)
    if checked.upscaler_1 != "None" and min(out_width, out_height) < 8:
        raise InvalidRequestError(
            "upscaling_resize",
            checked.upscaling_resize,
            f"a scale that makes this {picture.width}x{picture.height} picture at least 8 pixels a side "
            "(sides are rounded down to a multiple of 8)",
        )
    if checked.upscaler_1 != "None" and max(out_width, out_height) > limits.max_side:
        field = "upscaling_resize" if mode == SCALE_BY else "upscaling_resize_w"
        raise InvalidRequestError(
            field,
            getattr(checked, field),
            f"a size whose result stays within {limits.max_side} pixels a side "
            f"(this {picture.width}x{picture.height} picture would become {out_width}x{out_height})",
        )
    return checked


def upscale_picture(
    picture: Image.Image, req: ExtrasRequest, networks: dict, on_tile=None
) -> tuple[Image.Image, dict[str, str]]:
    """The upscaled picture and A1111's "Postprocess ..." parameters for it; `networks` holds the loaded
    network of each upscaler model the request names. `on_tile(upscaler_no, done, total)`, when given, counts
    an upscaler model's tiles (upscaler_no 0 or 1) as they finish."""
    info: dict[str, str] = {}
    if req.upscaler_1 == "None":
        return picture.copy(), info
    result = _upscale_with(picture, req, req.upscaler_1, networks, info, _tile_counter(on_tile, 0))
    info["Postprocess upscaler"] = req.upscaler_1
    if req.upscaler_2 != "None" and req.extras_upscaler_2_visibility > 0:
        second = _upscale_with(picture, req, req.upscaler_2, networks, info, _tile_counter(on_tile, 1))
        result = Image.blend(result, second, req.extras_upscaler_2_visibility)
        info["Postprocess upscaler 2"] = req.upscaler_2
    return result, info


def describe(info: dict[str, str]) -> str:
    """A1111's text for the postprocessing parameters ("Postprocess upscale by: 2, Postprocess upscaler: ...")."""
    return ", ".join(f"{key}: {value}" for key, value in info.items())


def _tile_counter(on_tile, upscaler_no: int):
    return None if on_tile is None else lambda done, total: on_tile(upscaler_no, done, total)


def _upscale_with(picture, req: ExtrasRequest, upscaler: str, networks: dict, info: dict, on_tile) -> Image.Image:
    width, height, scale = target_size(picture, req)
    if req.resize_mode == SCALE_TO:
        info["Postprocess upscale to"] = f"{req.upscaling_resize_w}x{req.upscaling_resize_h}"
    else:
        info["Postprocess upscale by"] = f"{scale:g}"
    if upscaler in networks:
        result = upscale_to(networks[upscaler], picture, width, height, on_tile=on_tile)
    elif upscaler == "Nearest":
        result = picture.resize((int(picture.width * scale), int(picture.height * scale)), Image.Resampling.NEAREST)
        if result.size != (width, height):
            result = result.resize((width, height), Image.Resampling.LANCZOS)
    else:  # Lanczos, and None as the second upscaler (A1111's "None" upscaler resizes with Lanczos)
        result = picture.resize((width, height), Image.Resampling.LANCZOS)
    if req.resize_mode == SCALE_TO and req.upscaling_crop:
        canvas = Image.new("RGB", (req.upscaling_resize_w, req.upscaling_resize_h))
        left = req.upscaling_resize_w // 2 - result.width // 2
        top = req.upscaling_resize_h // 2 - result.height // 2
        canvas.paste(result, (left, top))
        result = canvas
        info["Postprocess crop to"] = f"{result.width}x{result.height}"
    return result
