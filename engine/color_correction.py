"""A1111's "Apply color correction to img2img results to match original colors".

img2img (and inpaint, and the scripts built on them) can drift in colour, more with every Loopback loop. A1111
pulls the result back: in CIE L*a*b* (OpenCV's 8-bit encoding), each channel of the result gets the value
distribution of the init image (histogram matching), and the result's own luminosity is then laid back over it
(the "luminosity" blend mode), so only hue and saturation move. The same steps here, in NumPy:
- L*a*b* as OpenCV's 8-bit RGB2Lab/Lab2RGB define it (sRGB, D65 white; L scaled to 0..255, a and b offset
  by 128);
- histogram matching as scikit-image's match_histograms does it for 8-bit channels (the matched values
  truncated back to whole numbers, as its uint8 output does);
- the W3C compositing spec's SetLum with ClipColor, with the Rec. 601 weights of the blendmodes package A1111
  uses.
tests/test_color_correction.py holds a result of A1111's own function (OpenCV, scikit-image, blendmodes) to
compare against.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# sRGB (linear) to CIE XYZ, D65, and the white point X and Z are divided by: OpenCV's constants.
_RGB_TO_XYZ = np.array(
    [
        [0.412453, 0.357580, 0.180423],
        [0.212671, 0.715160, 0.072169],
        [0.019334, 0.119193, 0.950227],
    ]
)
_WHITE = np.array([0.950456, 1.0, 1.088754])
_EPSILON = 0.008856  # (6/29)^3, where L*a*b*'s cube root meets its linear part
_KAPPA = 903.3  # L* = kappa * Y below it
_LUMA = np.array([0.299, 0.587, 0.114])  # blendmodes' luminosity weights


def _linear(srgb: np.ndarray) -> np.ndarray:
    return np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)


def _srgb(linear: np.ndarray) -> np.ndarray:
    linear = np.clip(linear, 0.0, 1.0)
    return np.where(linear <= 0.0031308, linear * 12.92, 1.055 * linear ** (1 / 2.4) - 0.055)


def lab_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """8-bit RGB (H x W x 3, uint8) to 8-bit L*a*b*: L * 255/100, a + 128, b + 128, rounded."""
    xyz = (_linear(rgb.astype(np.float64) / 255.0) @ _RGB_TO_XYZ.T) / _WHITE
    cube_root = np.where(xyz > _EPSILON, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    y = xyz[..., 1]
    lightness = np.where(y > _EPSILON, 116 * cube_root[..., 1] - 16, _KAPPA * y)
    a = 500 * (cube_root[..., 0] - cube_root[..., 1])
    b = 200 * (cube_root[..., 1] - cube_root[..., 2])
    lab = np.stack([lightness * 255 / 100, a + 128, b + 128], axis=-1)
    return np.clip(np.rint(lab), 0, 255).astype(np.uint8)


def rgb_from_lab(lab: np.ndarray) -> np.ndarray:
    """8-bit L*a*b* (as lab_from_rgb makes it) back to 8-bit RGB; colours outside sRGB are clipped."""
    lab = lab.astype(np.float64)
    lightness, a, b = lab[..., 0] * 100 / 255, lab[..., 1] - 128, lab[..., 2] - 128
    fy = (lightness + 16) / 116
    y = np.where(lightness > _KAPPA * _EPSILON, fy**3, lightness / _KAPPA)
    fy = np.where(lightness > _KAPPA * _EPSILON, fy, 7.787 * y + 16 / 116)
    fx, fz = fy + a / 500, fy - b / 200
    x = np.where(fx**3 > _EPSILON, fx**3, (fx - 16 / 116) / 7.787)
    z = np.where(fz**3 > _EPSILON, fz**3, (fz - 16 / 116) / 7.787)
    xyz = np.stack([x, y, z], axis=-1) * _WHITE
    linear = xyz @ np.linalg.inv(_RGB_TO_XYZ).T
    return np.clip(np.rint(_srgb(linear) * 255), 0, 255).astype(np.uint8)


def match_histograms(source: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each channel of `source` (uint8, H x W x C) mapped so its values are distributed as `reference`'s
    channel is (any size): a value goes to the reference value at the same cumulative share."""
    matched = np.empty_like(source)
    for channel in range(source.shape[-1]):
        values = source[..., channel].ravel()
        source_counts = np.bincount(values, minlength=256)
        reference_counts = np.bincount(reference[..., channel].ravel(), minlength=256)
        reference_values = np.nonzero(reference_counts)[0]
        source_shares = np.cumsum(source_counts) / values.size
        reference_shares = np.cumsum(reference_counts[reference_values]) / reference[..., channel].size
        mapped = np.interp(source_shares, reference_shares, reference_values)
        matched[..., channel] = mapped.astype(np.uint8)[values].reshape(source.shape[:-1])
    return matched


def with_luminosity(colours: np.ndarray, luminosity: np.ndarray) -> np.ndarray:
    """`colours` (floats 0..1, H x W x 3) moved to the given luminosity, their hue kept and their saturation
    lowered only where they would leave 0..1 (the compositing spec's SetLum and ClipColor)."""
    moved = colours + (luminosity - colours @ _LUMA)[..., None]
    lum = (moved @ _LUMA)[..., None]
    lowest, highest = moved.min(axis=-1, keepdims=True), moved.max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        below = lum + (moved - lum) * lum / (lum - lowest)
        above = lum + (moved - lum) * (1 - lum) / (highest - lum)
    moved = np.where(lowest < 0, below, moved)
    return np.where(highest > 1, above, moved)


def correct_colors(picture: Image.Image, reference: Image.Image) -> Image.Image:
    """`picture` with the colours of `reference` (its hue and saturation distribution in L*a*b*), keeping its own
    luminosity: A1111's img2img colour correction, `reference` being the init image."""
    pixels = np.asarray(picture.convert("RGB"))
    matched = rgb_from_lab(match_histograms(lab_from_rgb(pixels), lab_from_rgb(np.asarray(reference.convert("RGB")))))
    own_luminosity = (pixels.astype(np.float64) / 255) @ _LUMA
    blended = with_luminosity(matched.astype(np.float64) / 255, own_luminosity)
    return Image.fromarray(np.clip(np.rint(blended * 255), 0, 255).astype(np.uint8))


def corrected(req, pictures: list[Image.Image], references: list[Image.Image]) -> list[Image.Image]:
    """A job's pictures, colour-corrected when it asks for it (`req.color_correction`): each to the init image it
    was made from (`references`, at the generation size), or all to `req.color_reference` when one is set."""
    if not req.color_correction:
        return pictures
    return [
        correct_colors(picture, req.color_reference or reference)
        for picture, reference in zip(pictures, references, strict=True)
    ]
