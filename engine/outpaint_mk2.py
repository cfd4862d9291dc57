"""A1111's "Outpainting mk2" img2img script: the picture grown side by side, each new border painted by an inpaint
pass that starts from noise shaped like the picture.

The sides are grown in A1111's order (left, right, up, down), each by its share of `pixels` (both sides of an axis
together rounded up to a multiple of 64, shared as A1111 shares it), each on the picture the side before made. For
a side, the picture is put on a canvas grown on that side (rounded up to a multiple of 64) and the new part is filled
with matched noise (`matched_noise`, A1111's get_matched_noise from g-diffuser): noise whose spectrum is shaped by the
picture's and whose colours follow the picture's histogram. A window of at most the job's width (or height) at the
growing side is inpainted, starting from that noise (masked content "original"), with the mask over the new part and
`mask_blur` pixels into the picture, blurred by 4 x mask blur; the latents are held outside a second mask, unblurred,
that reaches 2 x mask blur into the picture, as A1111's latent mask. The pass's pictures are put back on the canvas,
which is cut to the grown size.

Where this differs from A1111: a window whose side is not a multiple of 8 (a side's share of an odd rounding) is
made 8 smaller at most, where A1111 would hand its sampler a size diffusers refuses; and with a batch count each
picture after the first goes on counting seeds, where A1111's script hands every one the same seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from . import outpaint
from .errors import InvalidRequestError

SCRIPT_NAME = "outpainting mk2"
DIRECTIONS = outpaint.DIRECTIONS
MIN_PIXELS, MAX_PIXELS = 8, 256  # A1111's sliders
MAX_MASK_BLUR = 64
MAX_FALL_OFF = 4.0
# Each pass's image mask is blurred by this many times the script's mask blur (A1111's p.mask_blur = mask_blur * 4).
MASK_BLUR_FACTOR = 4
SCRIPT_ARGS = (
    "[info (ignored), pixels to expand, mask blur, directions ('left', 'right', ...), fall-off exponent, "
    "color variation]"
)
DEFAULTS = {"pixels": 128, "mask_blur": 8, "noise_q": 1.0, "color_variation": 0.05}
DEFAULTS_NOISE = (DEFAULTS["noise_q"], DEFAULTS["color_variation"])


def side_pixels(size: tuple[int, int], pixels: int, directions) -> dict[str, int]:
    """How many pixels each chosen side grows by (A1111's shares of the rounding up to a multiple of 64, as poor man's
    outpainting shares it), in the order the sides are painted; sides not chosen are left out."""
    shares = outpaint.canvas_size(size, pixels, directions)[2:]
    return {side: amount for side, amount in zip(DIRECTIONS, shares, strict=True) if amount > 0}


def grown_size(size: tuple[int, int], pixels: int, directions) -> tuple[int, int]:
    """The picture's size once every side has grown."""
    return outpaint.canvas_size(size, pixels, directions)[:2]


def _centred_fft(data: np.ndarray, inverse: bool = False) -> np.ndarray:
    """A1111's _fft2 / _ifft2: the orthonormal 2-D (inverse) FFT of each channel, shifted before and after."""
    transform = np.fft.ifft2 if inverse else np.fft.fft2
    return np.fft.ifftshift(transform(np.fft.fftshift(data, axes=(0, 1)), axes=(0, 1), norm="ortho"), axes=(0, 1))


def _noise_window(rows: int, columns: int) -> np.ndarray:
    """A1111's _get_gaussian_window in its mode 1 at std 3.14: 1 / ((x^2 + 1)(y^2 + 1)) over -1..1 on the shorter
    axis, stretched on the longer."""
    shorter = min(rows, columns)
    x = (np.arange(rows) / rows * 2.0 - 1.0) * (rows / shorter)
    y = (np.arange(columns) / columns * 2.0 - 1.0) * (columns / shorter)
    return 1 / ((x[:, None] ** 2 + 1.0) * (y[None, :] ** 2 + 1.0))


def matched_histograms(source: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`source` (pixels x channels) with each channel's values mapped to the same quantiles of `reference`'s channel
    (scikit-image's match_histograms, which A1111 calls, for float pixels)."""
    matched = np.empty_like(source)
    for channel in range(source.shape[1]):
        values, where, counts = np.unique(source[:, channel], return_inverse=True, return_counts=True)
        reference_values, reference_counts = np.unique(reference[:, channel], return_counts=True)
        quantiles = np.cumsum(counts) / source.shape[0]
        reference_quantiles = np.cumsum(reference_counts) / reference.shape[0]
        matched[:, channel] = np.interp(quantiles, reference_quantiles, reference_values)[where.reshape(-1)]
    return matched


def matched_noise(picture: np.ndarray, mask: np.ndarray, noise_q: float = 1.0, color_variation: float = 0.05):
    """A1111's get_matched_noise: `picture` (rows x columns x 3, 0..1) with the part under `mask` (same shape, 1 where
    it is new) replaced by noise shaped by the picture's spectrum (`noise_q`, the fall-off exponent: lower keeps more
    detail) and matched to the histogram of the rest, from a generator seeded 0 (so the seed alone moves a job); the
    noise's colours are `color_variation` of its own and the rest grey."""
    grey_mask = mask.sum(axis=2) / 3.0
    new, kept = grey_mask > 1e-6, grey_mask < 1e-3
    windowed = picture * (1.0 - grey_mask[..., None])
    brightest = windowed.max()
    if brightest > 0:
        windowed = windowed / brightest
    # An empty part filled with the average colour, rather than black, gives the spectrum better statistics.
    windowed = windowed + picture.mean() * mask
    spectrum = _centred_fft(windowed)
    magnitude = np.abs(spectrum)
    phase = np.divide(spectrum, magnitude, out=np.zeros_like(spectrum), where=magnitude > 0)

    rows, columns, channels = picture.shape
    noise = np.random.default_rng(0).random((rows, columns, channels))
    grey_noise = noise.sum(axis=2) / 3.0
    noise = noise * color_variation + (1.0 - color_variation) * grey_noise[..., None]
    noise = np.real(_centred_fft(_centred_fft(noise) * _noise_window(rows, columns)[..., None], inverse=True))
    shaped = np.abs(_centred_fft(noise)) ** 2 * magnitude**noise_q * phase
    shaped = np.real(_centred_fft(shaped, inverse=True))
    shaped -= shaped.min()
    top = shaped.max()
    if top > 0:
        shaped /= top
    if new.any() and kept.any():
        shaped[new] = matched_histograms(shaped[new], picture[kept])
    return np.clip(picture * (1.0 - mask) + shaped * mask, 0.0, 1.0)


@dataclass(frozen=True)
class _Geometry:
    """A side's pass over pictures of one size: their grown size, the canvas (rounded up to multiples of 64) and the
    window painted on it: the job's size along the growing axis (a multiple of 8), the whole canvas across it."""

    grown: tuple[int, int]
    canvas: tuple[int, int]
    box: tuple[int, int, int, int]


def _geometry(size: tuple[int, int], side: str, pixels: int, window: tuple[int, int]) -> _Geometry:
    across = side in ("left", "right")
    width, height = size
    grown = (width + pixels, height) if across else (width, height + pixels)
    canvas_w, canvas_h = (math.ceil(length / 64) * 64 for length in grown)
    window_w = min(window[0], grown[0]) // 8 * 8 if across else canvas_w
    window_h = canvas_h if across else min(window[1], grown[1]) // 8 * 8
    x0 = 0 if side == "left" else canvas_w - window_w
    y0 = 0 if side == "up" else canvas_h - window_h
    return _Geometry(grown, (canvas_w, canvas_h), (x0, y0, x0 + window_w, y0 + window_h))


def pass_windows(size: tuple[int, int], pixels: int, directions, window: tuple[int, int]) -> list[tuple[int, int]]:
    """The size of the window each side's pass paints, in order, for a picture of `size`."""
    windows = []
    for side, amount in side_pixels(size, pixels, directions).items():
        geometry = _geometry(size, side, amount, window)
        x0, y0, x1, y1 = geometry.box
        windows.append((x1 - x0, y1 - y0))
        size = geometry.grown
    return windows


@dataclass(frozen=True)
class SidePass:
    """One side's inpaint pass over a batch of pictures (all of one size): the window of each matched-noise canvas
    that is painted (`crops`), its image mask and latent mask (white where it is painted), and where the painted
    windows go back."""

    canvases: list[Image.Image]
    crops: list[Image.Image]
    mask: Image.Image
    latent_mask: Image.Image
    box: tuple[int, int, int, int]
    grown: tuple[int, int]

    @property
    def size(self) -> tuple[int, int]:
        return self.box[2] - self.box[0], self.box[3] - self.box[1]

    def finished(self, painted: list[Image.Image]) -> list[Image.Image]:
        """The grown pictures: each painted window put back on its canvas, cut to the grown size."""
        pictures = []
        for canvas, window in zip(self.canvases, painted, strict=True):
            canvas = canvas.copy()
            canvas.paste(window.convert("RGB").resize(self.size), self.box[:2])
            pictures.append(canvas.crop((0, 0, *self.grown)))
        return pictures


def side_pass(
    pictures: list[Image.Image],
    side: str,
    pixels: int,
    mask_blur: int,
    window: tuple[int, int],
    noise_q: float = 1.0,
    color_variation: float = 0.05,
) -> SidePass:
    """The pass that grows `pictures` by `pixels` on `side`, painting a window of at most `window` (the job's width
    and height) along the growing axis."""
    left, right, top, bottom = (side == name for name in DIRECTIONS)
    geometry = _geometry(pictures[0].size, side, pixels, window)
    grown, (canvas_w, canvas_h), box = geometry.grown, geometry.canvas, geometry.box
    mask = _painted_outside(
        (canvas_w, canvas_h),
        (
            pixels + mask_blur if left else 0,
            pixels + mask_blur if top else 0,
            canvas_w - pixels - mask_blur if right else grown[0],
            canvas_h - pixels - mask_blur if bottom else grown[1],
        ),
    )
    mask_rgb = np.repeat((np.asarray(mask, dtype=np.float64) / 255.0)[..., None], 3, axis=2)
    # A batch's first pass grows one picture several times over: its canvas is made once (the noise is seeded).
    made: dict[int, Image.Image] = {}
    for picture in pictures:
        if id(picture) in made:
            continue
        canvas = Image.new("RGB", (canvas_w, canvas_h))
        canvas.paste(picture.convert("RGB"), (pixels if left else 0, pixels if top else 0))
        noised = matched_noise(np.asarray(canvas, dtype=np.float64) / 255.0, mask_rgb, noise_q, color_variation)
        made[id(picture)] = Image.fromarray(np.clip(noised * 255.0, 0, 255).astype(np.uint8), mode="RGB")
    canvases = [made[id(picture)] for picture in pictures]
    window_w, window_h = box[2] - box[0], box[3] - box[1]
    window_mask = mask.crop(box)
    reach = pixels + mask_blur * 2
    latent_mask = _painted_outside(
        (window_w, window_h),
        (
            reach if left else 0,
            reach if top else 0,
            window_w - reach if right else grown[0],
            window_h - reach if bottom else grown[1],
        ),
    )
    crops = [canvas.crop(box) for canvas in canvases]
    return SidePass(canvases, crops, window_mask, latent_mask, box, grown)


def _painted_outside(size: tuple[int, int], kept: tuple[int, int, int, int]) -> Image.Image:
    """A mask of `size`, white but for the `kept` rectangle (its corners included, as PIL draws it); a rectangle
    that has turned inside out (a window no wider than what it paints) keeps nothing."""
    mask = Image.new("L", size, 255)
    x0, y0, x1, y1 = kept
    if x1 >= x0 and y1 >= y0:
        ImageDraw.Draw(mask).rectangle(kept, fill=0)
    return mask


def fields_from_script_args(args: Any) -> dict[str, Any]:
    """The request fields for A1111's API script_args of "Outpainting mk2": [info, pixels, mask blur, directions,
    fall-off exponent, color variation] (the first is the script's explanation, and ignored); a value left out takes
    the script's default (128, 8, all four, 1, 0.05), as in A1111."""
    if args is None:
        args = []
    if not isinstance(args, (list, tuple)) or len(args) > 6:
        raise InvalidRequestError("script_args", args, f"at most 6 values for Outpainting mk2: {SCRIPT_ARGS}")
    defaults = (None, DEFAULTS["pixels"], DEFAULTS["mask_blur"], list(DIRECTIONS), *DEFAULTS_NOISE)
    _, pixels, blur, directions, noise_q, color_variation = [*args, *defaults[len(args) :]]
    return {
        "outpaint_mk2": True,
        "outpaint_mk2_pixels": pixels,
        "outpaint_mk2_mask_blur": blur,
        "outpaint_mk2_directions": directions,
        "outpaint_mk2_noise_q": noise_q,
        "outpaint_mk2_color_variation": color_variation,
    }
