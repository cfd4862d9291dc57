"""What NVIDIA's noise (the NV random source) costs over torch's CPU noise: prints the ratio measured in one run.

    .venv/bin/python tools/benchmark_random_source.py                      # the embedded model, Euler a, 7 rounds
    .venv/bin/python tools/benchmark_random_source.py --model path --width 512 --height 512 --rounds 3

Each round makes the same picture with each source, interleaved so machine noise hits both alike. Euler a draws
noise at every step, so it pays NV's cost most often. Also prints what one NV draw costs at the job's latent size
and at SD 1.5's and SDXL's.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import Engine, GenerationRequest  # noqa: E402
from engine.philox import PhiloxNoise  # noqa: E402

log = logging.getLogger("benchmark_random_source")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name or path (default: the embedded model)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="Euler a")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    engine = Engine(model=args.model)
    base = GenerationRequest(
        prompt="a red circle on a blue background",
        steps=args.steps,
        sampler_name=args.sampler,
        width=args.width,
        height=args.height,
    )
    seconds: dict[str, list[float]] = {"CPU": [], "NV": []}
    for round_no in range(args.rounds + 1):
        for source in seconds:
            started = time.perf_counter()
            result = list(engine.generate(dataclasses.replace(base, randn_source=source, seed=5 + round_no)))[-1]
            if round_no:  # the first round warms both up
                seconds[source].append(time.perf_counter() - started)
    size = result.images[0].size
    cpu, nv = (statistics.median(seconds[source]) for source in ("CPU", "NV"))
    log.info("%s, %d steps, %dx%d, medians of %d rounds", args.sampler, args.steps, *size, args.rounds)
    log.info("CPU noise: %.3f s   NV noise: %.3f s   NV / CPU = %.3f", cpu, nv, nv / cpu)
    # One draw per image and step: this job's latents, SD 1.5's at 512x512 and SDXL's at 1024x1024.
    for latent in (tuple(engine.loaded.latent_shape(*size)[1:]), (4, 64, 64), (4, 128, 128)):
        draws = []
        for seed in range(20):
            started = time.perf_counter()
            PhiloxNoise(seed).randn(latent)
            draws.append(time.perf_counter() - started)
        log.info("one NV draw of %s: %.2f ms", "x".join(map(str, latent)), statistics.median(draws) * 1000)


if __name__ == "__main__":
    main()
