"""What the benchmark scripts share: timing variants interleaved round by round, so that machine noise
hits every variant alike, and printing each one's median and fastest time as ratios to a baseline."""

from __future__ import annotations

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
