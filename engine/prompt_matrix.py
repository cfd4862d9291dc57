"""A1111's "Prompt matrix" script: a picture for every combination of a prompt's |-separated parts, and one
grid of them labelled with the parts each holds.

"a house | at night | in snow" makes four pictures: "a house", "a house, at night", "a house, in snow" and "a
house, at night, in snow". The first part is in every picture; picture k holds later part i where bit i of k is
set, as A1111 counts, so the pictures come in A1111's order. The first half of the later parts label the columns,
the rest the rows, each header listing its parts with those left out struck through. Every picture has the same
seed (A1111's "Random seeds": the seed, the seed + 1, ...) and the variation seed counts up, as A1111 gives them.

Where A1111 keeps the first part's spaces as typed ("a house , at night"), they are trimmed here: the tokens,
and so the pictures, are the same.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

from .errors import InvalidRequestError
from .events import Result
from .grids import grid_of
from .labels import font, text_width, wrap
from .request import SEED_MAX, GenerationRequest

SCRIPT_NAME = "prompt matrix"
PROMPT_TYPES = ("positive", "negative")
DELIMITERS = {"comma": ", ", "space": " "}
MAX_MARGIN = 500  # A1111's slider
# 2 ** 8 pictures: each is a whole job, and a grid of more could not be read.
MAX_PICTURES = 256
SCRIPT_ARGS = '[put at start, random seeds, "positive" or "negative", "comma" or "space", grid margins]'
_INACTIVE = (153, 153, 153)


@dataclass(frozen=True)
class PromptMatrix:
    """The script's settings, in the order of A1111's script_args."""

    put_at_start: bool = False  # the later parts go before the first one
    different_seeds: bool = False  # A1111's "Random seeds": each picture one seed above the one before
    prompt_type: str = "positive"  # which prompt holds the | parts
    delimiter: str = "comma"  # what joins the parts
    margin: int = 0  # pixels between the grid's pictures

    @classmethod
    def from_script_args(cls, args: Any) -> PromptMatrix:
        """A1111's API script_args; values left out take the script's defaults, as in A1111."""
        if args is None:
            args = []
        if not isinstance(args, (list, tuple)) or len(args) > 5:
            raise InvalidRequestError("script_args", args, f"at most 5 values for Prompt matrix: {SCRIPT_ARGS}")
        defaults = cls()
        values = [*args, *dataclasses.astuple(defaults)[len(args) :]]
        return cls(
            put_at_start=bool(values[0]),
            different_seeds=bool(values[1]),
            prompt_type=values[2],
            delimiter=values[3],
            margin=values[4],
        )


@dataclass(frozen=True)
class MatrixPlan:
    """The parts a prompt splits into (the first in every picture) and one request per picture, in A1111's order."""

    parts: tuple[str, ...]
    requests: tuple[GenerationRequest, ...]
    margin: int


def plan(base: GenerationRequest, matrix: PromptMatrix) -> MatrixPlan:
    """The pictures of a prompt matrix made from `base` (each one picture: batch size and count are set by the
    parts, as in A1111). InvalidRequestError names the setting or prompt that cannot make one."""
    if matrix.prompt_type not in PROMPT_TYPES:
        raise InvalidRequestError("prompt_matrix_prompt_type", matrix.prompt_type, " or ".join(PROMPT_TYPES))
    if matrix.delimiter not in DELIMITERS:
        raise InvalidRequestError("prompt_matrix_delimiter", matrix.delimiter, " or ".join(DELIMITERS))
    margin = matrix.margin
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin <= MAX_MARGIN:
        raise InvalidRequestError("prompt_matrix_margin", margin, f"a number of pixels from 0 to {MAX_MARGIN}")
    field = "prompt" if matrix.prompt_type == "positive" else "negative_prompt"
    text = getattr(base, field)
    parts = [part.strip() for part in str(text).split("|")]
    parts[1:] = [part.strip(",") for part in parts[1:]]
    if len(parts) < 2:
        raise InvalidRequestError(
            field,
            text,
            "parts separated by | for the prompt matrix (such as 'a house | at night | in snow': the first part is "
            "in every picture, each later one in half of them)",
        )
    count = 2 ** (len(parts) - 1)
    if count > MAX_PICTURES:
        raise InvalidRequestError(
            field,
            text,
            f"at most {int(math.log2(MAX_PICTURES))} parts after the first for the prompt matrix "
            f"({len(parts) - 1} make {count} pictures; at most {MAX_PICTURES})",
        )
    drawn = base.with_seeds_drawn()
    seed, subseed = drawn.seed, drawn.subseed
    requests = []
    for number in range(count):
        chosen = [part for bit, part in enumerate(parts[1:]) if number & (1 << bit)]
        words = [*chosen, parts[0]] if matrix.put_at_start else [parts[0], *chosen]
        requests.append(
            dataclasses.replace(
                base,
                **{field: DELIMITERS[matrix.delimiter].join(words)},
                seed=(seed + (number if matrix.different_seeds else 0)) % (SEED_MAX + 1),
                subseed=(subseed + number) % (SEED_MAX + 1),
                batch_size=1,
                n_iter=1,
            )
        )
    return MatrixPlan(parts=tuple(parts), requests=tuple(requests), margin=int(margin))


def grid_result(matrix_plan: MatrixPlan, results: list[Result]) -> Result | None:
    """The grid of the pictures made so far (a stopped matrix leaves blank cells), as a Result with the first
    picture's seed and infotext, as A1111 gives its grid; None when no picture was made."""
    if not any(result.images for result in results):
        return None
    pictures = [result.images[0] if result.images else None for result in results]
    pictures += [None] * (len(matrix_plan.requests) - len(pictures))
    return grid_of(draw_grid(matrix_plan, pictures), results)


def draw_grid(matrix_plan: MatrixPlan, pictures: list[Image.Image | None]) -> Image.Image:
    """A1111's prompt matrix grid: 2^(ceil(n/2)) columns and 2^(floor(n/2)) rows for n parts after the first.
    Above each column its parts, below each other; left of each row, the rest. A part the picture leaves out is
    grey and struck through."""
    later = matrix_plan.parts[1:]
    across, down = later[: math.ceil(len(later) / 2)], later[math.ceil(len(later) / 2) :]
    columns, rows = 2 ** len(across), 2 ** len(down)
    width, height = next(picture.size for picture in pictures if picture is not None)
    label_font = _fitting_font(max(12, (width + height) // 25), later, width)
    line_h = label_font.size + 2
    spacing = label_font.size // 2
    left = max(width * 3 // 4, 8 * label_font.size) if down else 0

    def lines(parts, number, room):
        return [
            (line, bool(number & (1 << bit))) for bit, part in enumerate(parts) for line in wrap(part, label_font, room)
        ]

    headers = [lines(across, column, width) for column in range(columns)]
    top = max(len(header) for header in headers) * line_h + 2 * spacing
    margin = matrix_plan.margin
    grid = Image.new(
        "RGB", (left + columns * width + (columns - 1) * margin, top + rows * height + (rows - 1) * margin)
    )
    grid.paste("white", (0, 0, *grid.size))
    draw = ImageDraw.Draw(grid)
    for number, picture in enumerate(pictures):
        if picture is not None:
            row, column = divmod(number, columns)
            grid.paste(picture.convert("RGB"), (left + column * (width + margin), top + row * (height + margin)))
    for column, header in enumerate(headers):
        _draw_lines(draw, header, left + column * (width + margin) + width / 2, top / 2, label_font)
    for row in range(rows if down else 0):
        header = lines(down, row, left)
        _draw_lines(draw, header, left / 2, top + row * (height + margin) + height / 2, label_font)
    return grid


def _fitting_font(size: int, parts: tuple[str, ...], width: int):
    """A1111's label size, made smaller (to 8 at least) until each word fits a column of small pictures."""
    words = [word for part in parts for word in part.split()] or [""]
    label_font = font(size)
    while size > 8 and max(text_width(label_font, word) for word in words) > width - 4:
        size -= 1
        label_font = font(size)
    return label_font


def _draw_lines(draw: ImageDraw.ImageDraw, lines: list[tuple[str, bool]], middle_x: float, middle_y: float, label_font):
    """Lines centred on (middle_x, middle_y): black where the part is in the picture, grey and struck through
    where it is not."""
    line_h = label_font.size + 2
    y = middle_y - line_h * len(lines) / 2
    for text, active in lines:
        line_w = text_width(label_font, text)
        x = middle_x - line_w / 2
        colour = (0, 0, 0) if active else _INACTIVE
        draw.text((x, y), text, fill=colour, font=label_font)
        if not active:
            strike_y = y + label_font.size * 0.55
            draw.line((x, strike_y, x + line_w, strike_y), fill=colour, width=max(1, label_font.size // 12))
        y += line_h
