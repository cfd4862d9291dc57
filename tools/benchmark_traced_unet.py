"""Does running the UNet as TorchScript traces pay? The same request through Engines on one model:
one as the family preset has it (traced on a CPU, engine/traced_unet.py), one with trace_unet=False
(and, for the first generation only, one with warm_up=True as the server makes it).

Prints what the first generation costs each (the traced one makes its trace then) and what a server's
engine pays instead (Engine(warm_up=True) traces the default picture as it loads), then each
variant's median and fastest time over interleaved rounds, so that machine noise hits both alike,
as ratios measured in this one run; and checks that both draw byte-identical images.

    .venv/bin/python tools/benchmark_traced_unet.py [--model NAME] [--size 64] [--steps 20] [--rounds 9]
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

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


def main() -> None:
    args = model_arguments(__doc__).parse_args()
    log_to_console()

    def load(**options) -> tuple[Engine, float]:
        started = time.perf_counter()
        engine = Engine(model=args.model, models_dir=args.models_dir, **options)
        return engine, time.perf_counter() - started

    variants = {
        "traced UNet": {},
        "UNet as a Python module": {"trace_unet": False},
        "traced, warmed up as a server loads it": {"warm_up": True},
    }
    loaded = {name: load(**options) for name, options in variants.items()}
    engines = {name: engine for name, (engine, _) in loaded.items()}
    if engines["traced UNet"].loaded.traced_unet is None:
        log.info("This model's family does not trace its UNet on this device: both variants are the same.")
    size = args.size or engines["traced UNet"].loaded.defaults.width
    request = shapes_request(args, size)

    def generate(engine: Engine):
        return list(engine.generate(request))[-1].images[0]

    images = {}
    for name, (engine, load_seconds) in loaded.items():
        started = time.perf_counter()
        images[name] = generate(engine)
        log.info("%s: load %.3f s, then first generation %.3f s", name, load_seconds, time.perf_counter() - started)
    identical = len({image.tobytes() for image in images.values()}) == 1
    del engines["traced, warmed up as a server loads it"]  # the same trace as "traced UNet" from here on

    times = time_interleaved(
        {name: lambda engine=engine: generate(engine) for name, engine in engines.items()}, args.rounds
    )

    log_setup(engines["traced UNet"].model.title, size, args)
    log_ratio_table(times, "UNet as a Python module")
    log.info("byte-identical images: %s", "yes" if identical else "NO")


if __name__ == "__main__":
    main()
