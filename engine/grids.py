"""Grids of a job's pictures, as A1111 makes them: one picture laid out with the others, carried as a Result of its
own with the first picture's seed and infotext (A1111's grids carry the first picture's parameters)."""

from __future__ import annotations

import math

from PIL import Image

from .events import Result


def image_grid(pictures: list[Image.Image], rows: int | None = None) -> Image.Image:
    """A1111's image_grid: `rows` rows (by default the square root of the count, rounded), as many columns as that
    takes, each picture at its place row by row on black."""
    rows = min(rows or round(math.sqrt(len(pictures))), len(pictures))
    columns = math.ceil(len(pictures) / rows)
    width, height = pictures[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "black")
    for number, picture in enumerate(pictures):
        grid.paste(picture.convert("RGB"), (number % columns * width, number // columns * height))
    return grid


def grid_of(grid: Image.Image, results: list[Result]) -> Result:
    """A grid made of `results`' pictures as a Result of its own, with the first picture's seed and infotext;
    `results` hold at least one picture."""
    first = next(result for result in results if result.images)
    return Result(
        images=[grid],
        seeds=first.seeds[:1],
        infotexts=first.infotexts[:1],
        request=first.request,
        model=first.model,
        interrupted=any(result.interrupted for result in results),
        subseeds=first.subseeds[:1],
    )


def batch_grid(results: list[Result]) -> Result | None:
    """The grid A1111 shows first in the gallery and saves with a batch: None for fewer than two pictures (A1111
    makes none of one)."""
    pictures = [image for result in results for image in result.images]
    if len(pictures) < 2:
        return None
    return grid_of(image_grid(pictures), results)
