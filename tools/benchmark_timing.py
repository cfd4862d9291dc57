"""What the benchmark scripts share: timing variants interleaved round by round, so that machine noise
hits every variant alike, and printing each one's median and fastest time as ratios to a baseline."""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

log = logging.getLogger("benchmark")


def log_to_console() -> None:
    """The benchmark's own lines at INFO; the libraries' and the engine's only when they warn."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("diffusers", "transformers", "engine"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def model_arguments(
    description: str, *, size: int | None = None, rounds: int = 9, sampler: str = "Euler a"
) -> argparse.ArgumentParser:
    """The options every benchmark takes: the model, the picture size, steps, rounds and sampler."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name/path (default: the default model, micro-shapes)")
    parser.add_argument("--models-dir", default=None)
    size_help = "width and height" + (" (default: the model's native size)" if size is None else "")
    parser.add_argument("--size", type=int, default=size, help=size_help)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--sampler", default=sampler)
    return parser


def shapes_request(args: argparse.Namespace, size: int):
    """The request the micro model's benchmarks time: a red circle on blue, a negative prompt, CFG 7, seed 1234."""
    from engine import GenerationRequest

    return GenerationRequest(
        prompt="a red circle on a blue background",
        negative_prompt="blurry",
        sampler_name=args.sampler,
        steps=args.steps,
        cfg_scale=7.0,
        seed=1234,
        width=size,
        height=size,
    )


def log_setup(title: str, size: int, args: argparse.Namespace) -> None:
    """The line saying what was timed."""
    log.info(
        "model %s, %dx%d, %s, %d steps, CFG 7, median and fastest of %d rounds",
        title,
        size,
        size,
        args.sampler,
        args.steps,
        args.rounds,
    )


def time_interleaved(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds each call took, `rounds` times, every variant once per round."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, call in variants.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return times


def log_ratio_table(times: dict[str, list[float]], baseline: str) -> None:
    """Median and fastest time of each variant, each as a ratio to the baseline's."""
    base_median, base_fastest = statistics.median(times[baseline]), min(times[baseline])
    # The fastest round is the least disturbed by other work on the machine; both are shown.
    log.info("%-40s %10s %8s %10s %8s", "variant", "median s", "ratio", "fastest s", "ratio")
    for name, samples in times.items():
        median, fastest = statistics.median(samples), min(samples)
        log.info("%-40s %10.3f %8.3f %10.3f %8.3f", name, median, median / base_median, fastest, fastest / base_fastest)
