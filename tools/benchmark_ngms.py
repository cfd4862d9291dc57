"""What A1111's Negative Guidance minimum sigma (NGMS) saves: the same request at NGMS off, at a few sigmas and
at the cap with all steps (every UNet call runs the prompt's rows only), interleaved round by round on one
Engine, printed as time ratios to NGMS off measured in this one run, with how many UNet calls skipped the negative
and how far each picture moved from NGMS off (mean absolute difference, 0-255 levels).

    .venv/bin/python tools/benchmark_ngms.py [--model NAME] [--size 64] [--steps 20] [--rounds 9]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import Engine, GenerationRequest  # noqa: E402
from tools.benchmark_timing import (  # noqa: E402
    log_ratio_table,
    log_setup,
    log_to_console,
    model_arguments,
    shapes_request,
    time_interleaved,
)

log = logging.getLogger("benchmark")


def main() -> None:
    args = model_arguments(__doc__).parse_args()
    log_to_console()

    engine = Engine(model=args.model, models_dir=args.models_dir)
    size = args.size or engine.loaded.defaults.width
    base = shapes_request(args, size)
    variants = {
        "NGMS off": {},
        "NGMS 1": {"s_min_uncond": 1.0},
        "NGMS 3": {"s_min_uncond": 3.0},
        "NGMS 15, all steps (every call)": {"s_min_uncond": 15.0, "s_min_uncond_all": True},
    }
    unet = engine.loaded.components["unet"]

    def picture(fields: dict) -> np.ndarray:
        result = list(engine.generate(GenerationRequest(**{**vars(base), **fields})))[-1]
        return np.asarray(result.images[0]).astype(float)

    # Rows per UNet call, counted once per variant with a hook (outside the timing: a hook runs the UNet as a module).
    rows: list[int] = []
    handle = unet.register_forward_pre_hook(
        lambda _m, args, kwargs: rows.append((args or [kwargs["sample"]])[0].shape[0]), with_kwargs=True
    )
    pictures, halved = {}, {}
    try:
        for name, fields in variants.items():
            rows.clear()
            pictures[name] = picture(fields)
            halved[name] = f"{rows.count(1)}/{len(rows)}"
    finally:
        handle.remove()

    times = time_interleaved(
        {name: lambda fields=fields: picture(fields) for name, fields in variants.items()}, args.rounds
    )
    log_setup(engine.model.title, size, args)
    log_ratio_table(times, "NGMS off")
    for name in variants:
        apart = np.abs(pictures[name] - pictures["NGMS off"]).mean()
        log.info("%-40s calls without the negative %7s, picture moved %.2f levels", name, halved[name], apart)


if __name__ == "__main__":
    main()
