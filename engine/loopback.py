"""A1111's "Loopback" img2img script: each picture made is the init image of the next, `loops` times over.

The denoising strength moves from the request's to `loopback_final_denoising` along a curve (A1111's: Linear;
Aggressive, a quarter sine, which moves early; Lazy, one minus a quarter cosine, which moves late), the seed goes
up by one each loop (on across batch count, as A1111 counts it), and with a mask the masked content is "original"
after the first loop, since the part to repaint now holds the last loop's picture. With a batch count of 1 every
loop's picture is kept; with more, the last loop's picture of each. Skip ends the current picture's loops (its
pictures so far are kept with a batch count of 1, as in A1111); Stop ends the job, dropping the loop it cut.
Each picture's infotext is the img2img job that made it from the picture before, plus A1111's "Final denoising
strength" and "Denoising curve".
"""

from __future__ import annotations

import math
from typing import Any

from .errors import InvalidRequestError
from .events import Result
from .grids import grid_of, image_grid

SCRIPT_NAME = "loopback"
CURVES = ("Aggressive", "Linear", "Lazy")
MAX_LOOPS = 32  # A1111's slider
SCRIPT_ARGS = "[loops, final denoising strength, curve (Aggressive, Linear or Lazy), append interrogated prompt]"


def denoising_strength(initial: float, final: float, curve: str, loops: int, loop: int) -> float:
    """The denoising strength of loop `loop` (0 is the first, at `initial`; loop `loops` - 1 is at `final`),
    rounded to 6 decimals so that the infotext shows the strength that ran (A1111 writes 0.39999999999999997,
    which read back as 0.4 would run another number of steps)."""
    if loops == 1:
        return initial
    progress = loop / (loops - 1)
    if curve == "Aggressive":
        share = math.sin(progress * math.pi / 2)
    elif curve == "Lazy":
        share = 1 - math.cos(progress * math.pi / 2)
    else:
        share = progress
    return round(initial + (final - initial) * share, 6)


def fields_from_script_args(args: Any) -> dict[str, Any]:
    """The request fields for A1111's API script_args of "Loopback": [loops, final denoising strength, curve,
    append interrogated prompt]; a value left out takes the script's default (4, 0.5, Linear, None), as in A1111.
    Interrogation needs CLIP or DeepBooru models this program does not have, so only "None" is taken."""
    if args is None:
        args = []
    if not isinstance(args, (list, tuple)) or len(args) > 4:
        raise InvalidRequestError("script_args", args, f"at most 4 values for Loopback: {SCRIPT_ARGS}")
    loops, final, curve, interrogate = [*args, *(4, 0.5, "Linear", "None")[len(args) :]]
    if interrogate not in ("None", None, ""):
        raise InvalidRequestError(
            "script_args[3]", interrogate, "None (there are no CLIP or DeepBooru interrogation models here)"
        )
    return {"loopback": True, "loopback_loops": loops, "loopback_final_denoising": final, "loopback_curve": curve}


def grid_result(results: list[Result]) -> Result | None:
    """A1111's loopback grid: the pictures kept, in one row, with the first one's seed and infotext; None for
    fewer than two."""
    pictures = [image for result in results for image in result.images]
    if len(pictures) < 2:
        return None
    return grid_of(image_grid(pictures, rows=1), results)
