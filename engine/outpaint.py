"""A1111's "Poor man's outpainting" img2img script: the picture made larger on the chosen sides, and the new border
painted in tile by tile by inpainting.

The init image is put on a canvas `outpaint_pixels` larger on each chosen side, both sides of an axis together
rounded up to a multiple of 64 (shared between them as A1111 shares it), its edge pixels stretched over the new
border. The mask covers the new border
and reaches 2 x mask blur pixels into the picture on those sides, and is blurred by 2 x mask blur, as A1111 sets
it. The canvas is cut into tiles of width x height overlapping by outpaint_pixels (A1111's split_grid); each tile
that reaches outside the picture is inpainted (masked content as asked, whole picture), at the seed, the seed + 1,
..., and the tiles are joined again with A1111's linear blends.

Where A1111 differs: its new border is black, which the blurred mask mixes into the picture as a dark seam
along the old edge (and "original" masked content starts the border from black); stretched edges leave no seam.
It also rounds an axis up to a multiple of 64 even with neither of its sides chosen, which leaves
an unpainted black strip on the right or bottom of a picture whose side is not a multiple of 64; here such an
axis keeps the picture's size. A1111 also blends latents with a second mask, blurred less; here the one mask
serves both. With a batch count, each picture after the first goes on counting seeds from the tiles before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .errors import InvalidRequestError
from .tiles import TileGrid, TileJob, cut_tiles, plan_tiles

SCRIPT_NAME = "poor man's outpainting"
DIRECTIONS = ("left", "right", "up", "down")
MIN_PIXELS, MAX_PIXELS = 8, 256  # A1111's slider
SCRIPT_ARGS = '[pixels to expand, mask blur, masked content (0-3 or its name), directions ("left", "right", ...)]'


@dataclass(frozen=True)
class Layout:
    """Where the picture lies on the larger canvas, how many pixels each side gained, and the tiles redrawn."""

    width: int
    height: int
    left: int
    right: int
    up: int
    down: int
    grid: TileGrid
    redrawn: tuple[int, ...]


def canvas_size(size: tuple[int, int], pixels: int, directions) -> tuple[int, int, int, int, int, int]:
    """(canvas width, height, left, right, up, down) for a picture of `size` grown by `pixels` on `directions`."""
    width, height = size
    left, right, up, down = (pixels if side in directions else 0 for side in DIRECTIONS)
    target_w = math.ceil((width + left + right) / 64) * 64 if left or right else width
    target_h = math.ceil((height + up + down) / 64) * 64 if up or down else height
    # As A1111 shares the rounding out: the left (top) side gets its share, the right (bottom) side the rest.
    if left:
        left = left * (target_w - width) // (left + right)
    if right:
        right = target_w - width - left
    if up:
        up = up * (target_h - height) // (up + down)
    if down:
        down = target_h - height - up
    return target_w, target_h, left, right, up, down


def layout(size: tuple[int, int], pixels: int, directions, tile_width: int, tile_height: int) -> Layout:
    """The canvas and its tiles; the canvas is at least one tile and `pixels` is below the tile's sides."""
    width, height, left, right, up, down = canvas_size(size, pixels, directions)
    grid = plan_tiles(width, height, tile_width, tile_height, pixels)
    inside = (left, up, width - right, height - down)
    redrawn = tuple(
        number
        for number, (x0, y0, x1, y1) in enumerate(grid.boxes())
        if not (x0 >= inside[0] and y0 >= inside[1] and x1 <= inside[2] and y1 <= inside[3])
    )
    return Layout(width, height, left, right, up, down, grid, redrawn)


def tile_job(req, plan: Layout) -> TileJob:
    """The tiles of the canvas and of its mask, and each tile's inpainting job (blur doubled, whole picture)."""
    picture = np.asarray(req.init_images[0].convert("RGB"))
    sides = ((plan.up, plan.down), (plan.left, plan.right), (0, 0))
    canvas = Image.fromarray(np.pad(picture, sides, mode="edge"))
    blur = int(req.mask_blur)
    mask = Image.new("L", (plan.width, plan.height), 255)
    ImageDraw.Draw(mask).rectangle(
        (
            plan.left + (blur * 2 if plan.left else 0),
            plan.up + (blur * 2 if plan.up else 0),
            plan.width - plan.right - (blur * 2 if plan.right else 0),
            plan.height - plan.down - (blur * 2 if plan.down else 0),
        ),
        fill=0,
    )
    fields = {
        "mask_blur": blur * 2,
        "inpaint_full_res": False,
        "inpainting_mask_invert": 0,
        "outpaint": False,
    }
    return TileJob(
        plan.grid, cut_tiles(canvas, plan.grid), plan.redrawn, masks=cut_tiles(mask, plan.grid), tile_fields=fields
    )


def fields_from_script_args(args: Any) -> dict[str, Any]:
    """The request fields for A1111's API script_args of "Poor man's outpainting": [pixels, mask blur, masked
    content, directions]; a value left out takes the script's default (128, 4, fill, all four), as in A1111."""
    if args is None:
        args = []
    if not isinstance(args, (list, tuple)) or len(args) > 4:
        raise InvalidRequestError("script_args", args, f"at most 4 values for Poor man's outpainting: {SCRIPT_ARGS}")
    from .inpaint import MASKED_CONTENT  # here: inpaint imports request, which imports this module

    pixels, blur, content, directions = [*args, *(128, 4, 0, list(DIRECTIONS))[len(args) :]]
    if isinstance(content, str) and content.strip().lower() in MASKED_CONTENT:
        content = MASKED_CONTENT.index(content.strip().lower())
    return {
        "outpaint": True,
        "outpaint_pixels": pixels,
        "mask_blur": blur,
        "inpainting_fill": content,
        "outpaint_directions": directions,
    }
