"""Pictures redrawn tile by tile, as A1111's SD upscale and poor man's outpainting scripts do: where the tiles lie
(A1111's modules/images.py split_grid), how they are joined again (its combine_grid, each overlap blended
linearly from one tile into the next), and the job of each tile."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # request.py checks tile counts with plan_tiles
    from .request import GenerationRequest


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


@dataclass(frozen=True)
class TileJob:
    """A picture redrawn tile by tile: `tiles` are its tiles before (cut where `grid` says), `redrawn` the tiles run
    through the model, in the order they run; `masks` each tile's inpaint mask (outpainting; None: img2img) and
    `tile_fields` what else each tile's job sets. Every picture of the job redraws the same tiles."""

    grid: TileGrid
    tiles: list[Image.Image]
    redrawn: tuple[int, ...]
    masks: list[Image.Image] | None = None
    tile_fields: dict[str, Any] = field(default_factory=dict)

    def request(self, req: GenerationRequest, batch_no: int) -> GenerationRequest:
        """The job of batch `batch_no` (tiles run one a batch, picture after picture)."""
        tile_no = self.redrawn[batch_no % len(self.redrawn)]
        mask = self.masks[tile_no] if self.masks is not None else req.mask
        return dataclasses.replace(
            req, init_images=[self.tiles[tile_no]], mask=mask, batch_size=1, n_iter=1, **self.tile_fields
        )

    def join(self, done: list[Image.Image], done_indexes: list[int]) -> tuple[list[Image.Image], list[int]]:
        """The pictures joined from their redrawn tiles (`done`, by batch number), and the number of each. A picture
        stopped part-way keeps its own tiles where none were redrawn; one stopped before its first is left out."""
        by_picture: dict[int, list[Image.Image]] = {}
        for image, index in zip(done, done_indexes, strict=True):
            picture_no, order = divmod(index, len(self.redrawn))
            by_picture.setdefault(picture_no, list(self.tiles))[self.redrawn[order]] = image
        numbers = sorted(by_picture)
        return [join_tiles(self.grid, by_picture[number]) for number in numbers], numbers
