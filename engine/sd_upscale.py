"""A1111's "SD upscale" img2img script: a picture made larger, then redrawn tile by tile at the generation size.

The init image is upscaled `sd_upscale_scale` times by an upscaler (as Extras does it: sides rounded down to a
multiple of 8; "None" leaves the picture as it is), cut into tiles of width x height that overlap their
neighbours by `sd_upscale_overlap` pixels, each tile is run through img2img, and the tiles are joined again,
each overlap blended linearly from one tile into the next. Tile positions, the order tiles run in, their seeds
and the blending are A1111's (modules/images.py split_grid and combine_grid, scripts/sd_upscale.py), so the same
settings cut the same tiles.
"""

from __future__ import annotations

from typing import Any

from .errors import InvalidRequestError

SCRIPT_NAME = "sd upscale"
MAX_SCALE = 4.0  # A1111's slider
MAX_OVERLAP = 256  # A1111's slider
# A picture cut into more tiles than this is refused: each tile is a whole img2img job.
MAX_TILES = 256


def upscaled_size(size: tuple[int, int], scale: float, upscaler: str) -> tuple[int, int]:
    """The size the upscaler brings a picture of `size` to, as Extras' "Scale by" does: each side times `scale`,
    rounded down to a multiple of 8; "None" leaves the picture as it is."""
    if upscaler == "None":
        return size
    return int(size[0] * scale) // 8 * 8, int(size[1] * scale) // 8 * 8


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
