"""A1111's "SD upscale" img2img script: a picture made larger, then redrawn tile by tile at the generation size.

The init image is upscaled `sd_upscale_scale` times by an upscaler (as Extras does it: sides rounded down to a
multiple of 8; "None" leaves the picture as it is), cut into tiles of width x height that overlap their
neighbours by `sd_upscale_overlap` pixels, each tile is run through img2img, and the tiles are joined again,
each overlap blended linearly from one tile into the next. Tile positions, the order tiles run in, their seeds
and the blending are A1111's (modules/images.py split_grid and combine_grid, scripts/sd_upscale.py), so the same
settings cut the same tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .errors import InvalidRequestError

SCRIPT_NAME = "sd upscale"
MAX_SCALE = 4.0  # A1111's slider
MAX_OVERLAP = 256  # A1111's slider
# A picture cut into more tiles than this is refused: each tile is a whole img2img job.
MAX_TILES = 256


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of a `width` x `height` picture lie: `rows` are the tiles' top edges, `columns` their left
    edges; tiles are `tile_width` x `tile_height` and neighbours overlap by `overlap` pixels (the last row and
    column are moved in to end at the picture's edge, so they may overlap more)."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    overlap: int
    rows: tuple[int, ...]
    columns: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.rows) * len(self.columns)

    def boxes(self) -> list[tuple[int, int, int, int]]:
        """Each tile's (left, top, right, bottom), row by row: the order the tiles run in."""
        return [(x, y, x + self.tile_width, y + self.tile_height) for y in self.rows for x in self.columns]


def _starts(length: int, tile: int, overlap: int) -> tuple[int, ...]:
    # As A1111's split_grid: as many tiles as cover the side with at least `overlap` between neighbours, spread
    # evenly, the last one moved in to end at the edge.
    count = math.ceil((length - overlap) / (tile - overlap))
    step = (length - tile) / (count - 1) if count > 1 else 0
    return tuple(min(int(index * step), length - tile) for index in range(count))


def upscaled_size(size: tuple[int, int], scale: float, upscaler: str) -> tuple[int, int]:
    """The size the upscaler brings a picture of `size` to, as Extras' "Scale by" does: each side times `scale`,
    rounded down to a multiple of 8; "None" leaves the picture as it is."""
    if upscaler == "None":
        return size
    return int(size[0] * scale) // 8 * 8, int(size[1] * scale) // 8 * 8


def plan_tiles(width: int, height: int, tile_width: int, tile_height: int, overlap: int) -> TileGrid:
    """The tiles of a picture at least as large as one tile; `overlap` is below both tile sides."""
    return TileGrid(
        width,
        height,
        tile_width,
        tile_height,
        overlap,
        rows=_starts(height, tile_height, overlap),
        columns=_starts(width, tile_width, overlap),
    )


def cut_tiles(picture: Image.Image, grid: TileGrid) -> list[Image.Image]:
    return [picture.crop(box) for box in grid.boxes()]


def join_tiles(grid: TileGrid, tiles: list[Image.Image]) -> Image.Image:
    """The tiles put back together, A1111's way: across each row, a tile's first `overlap` columns fade in over
    the tile before it (the rest of it is pasted over whatever the tile before left there); then down the
    picture, each row's first `overlap` lines fade in over the row above the same way."""
    ramp = (np.arange(grid.overlap, dtype=np.float32) * 255 / max(grid.overlap, 1)).astype(np.uint8)
    across = Image.fromarray(np.repeat(ramp[None, :], grid.tile_height, axis=0), "L")
    down = Image.fromarray(np.repeat(ramp[:, None], grid.width, axis=1), "L")
    picture = Image.new("RGB", (grid.width, grid.height))
    columns = len(grid.columns)
    for row_no, y in enumerate(grid.rows):
        row = Image.new("RGB", (grid.width, grid.tile_height))
        for column_no, x in enumerate(grid.columns):
            tile = tiles[row_no * columns + column_no].convert("RGB")
            if column_no == 0 or grid.overlap == 0:
                row.paste(tile, (x, 0))
                continue
            row.paste(tile.crop((0, 0, grid.overlap, grid.tile_height)), (x, 0), mask=across)
            row.paste(tile.crop((grid.overlap, 0, grid.tile_width, grid.tile_height)), (x + grid.overlap, 0))
        if row_no == 0 or grid.overlap == 0:
            picture.paste(row, (0, y))
            continue
        picture.paste(row.crop((0, 0, grid.width, grid.overlap)), (0, y), mask=down)
        picture.paste(row.crop((0, grid.overlap, grid.width, grid.tile_height)), (0, y + grid.overlap))
    return picture


def tile_seeds(seed: int, subseed: int, tiles: int, batch_size: int, varying: bool) -> tuple[list[int], list[int]]:
    """Each tile's seed and variation seed, as A1111's script gives them: tiles run `batch_size` at a time, a
    batch counts up from its first seed (or, with a variation strength, keeps it and counts up the variation
    seed), and each batch after the first starts one above the first seed of the batch before (so with a batch
    size above 1, neighbouring batches share seeds, as in A1111)."""
    seeds, subseeds = [], []
    for index in range(tiles):
        batch_no, offset = divmod(index, batch_size)
        seeds.append(seed + batch_no + (0 if varying else offset))
        subseeds.append(subseed + offset)
    return seeds, subseeds


# A1111's upscaler list starts with these three; its upscaler models follow (in another order than here).
BUILT_IN_UPSCALERS = ("None", "Lanczos", "Nearest")
SCRIPT_ARGS = "[info, tile overlap, upscaler (name, or index in the upscaler list), scale factor]"


def fields_from_script_args(args: Any, upscaler_models: list[str]) -> dict[str, Any]:
    """The request fields for A1111's API script_args of "SD upscale": [info, overlap, upscaler, scale factor], as its
    script's ui() returns them. A value left out takes the script's default (64, "None", 2), as in A1111; the
    upscaler may be named, or given by its index in A1111's list ("None", "Lanczos", "Nearest", then the models)."""
    if args is None:
        args = []
    if not isinstance(args, (list, tuple)) or len(args) > 4:
        raise InvalidRequestError("script_args", args, f"at most 4 values for SD upscale: {SCRIPT_ARGS}")
    fields: dict[str, Any] = {"sd_upscale": True, "sd_upscale_overlap": 64, "sd_upscale_upscaler": "None"}
    fields["sd_upscale_scale"] = 2.0
    if len(args) > 1:
        fields["sd_upscale_overlap"] = args[1]
    if len(args) > 2:
        upscaler = args[2]
        listed = [*BUILT_IN_UPSCALERS, *upscaler_models]
        if isinstance(upscaler, int) and not isinstance(upscaler, bool):
            if not 0 <= upscaler < len(listed):
                raise InvalidRequestError(
                    "script_args[2]",
                    upscaler,
                    f"an upscaler's name, or its index 0 to {len(listed) - 1} in: " + ", ".join(listed),
                )
            upscaler = listed[upscaler]
        fields["sd_upscale_upscaler"] = upscaler
    if len(args) > 3:
        fields["sd_upscale_scale"] = args[3]
    return fields
