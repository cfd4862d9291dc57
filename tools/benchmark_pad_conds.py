"""What asking the UNet at each conditioning's own length costs: a 2-chunk prompt with a 1-chunk negative prompt,
asked apart (A1111's default: two UNet calls a step) and with Pad conds (one call of both, the negative padded),
interleaved round by round on one Engine, printed as time ratios measured in this one run, with how far the two
pictures are apart (mean absolute difference, 0-255 levels).

    .venv/bin/python tools/benchmark_pad_conds.py [--model NAME] [--size 64] [--steps 20] [--rounds 9]
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import Engine  # noqa: E402
from tools.benchmark_timing import (  # noqa: E402
    log_ratio_table,
    log_setup,
    log_to_console,
    model_arguments,
    shapes_request,
    time_interleaved,
)

log = logging.getLogger("benchmark")

# 50 more tokens after the shapes prompt's own: two chunks.
LONGER = ", " + ", ".join(["simple"] * 50)


def main() -> None:
    args = model_arguments(__doc__).parse_args()
    log_to_console()

    engine = Engine(model=args.model, models_dir=args.models_dir)
    size = args.size or engine.loaded.defaults.width
    base = shapes_request(args, size)
    base = dataclasses.replace(base, prompt=base.prompt + LONGER, negative_prompt="green")
    variants = {"apart (A1111's default)": {}, "Pad conds": {"pad_cond_uncond": True}}

    def picture(fields: dict) -> np.ndarray:
        result = list(engine.generate(dataclasses.replace(base, **fields)))[-1]
        return np.asarray(result.images[0]).astype(float)

    pictures = {name: picture(fields) for name, fields in variants.items()}
    times = time_interleaved(
        {name: lambda fields=fields: picture(fields) for name, fields in variants.items()}, args.rounds
    )
    log_setup(engine.model.title, size, args)
    log_ratio_table(times, "Pad conds")
    apart = np.abs(pictures["Pad conds"] - pictures["apart (A1111's default)"]).mean()
    log.info("the two pictures are %.2f levels apart", apart)


if __name__ == "__main__":
    main()
