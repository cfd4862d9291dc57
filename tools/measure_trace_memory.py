"""What a server running the micro model keeps of the UNet traces it makes: resident memory over jobs that cycle
through more input shapes (batch sizes and picture sizes) than engine/traced_unet.py keeps traces for, and what
one trace made and dropped leaves behind.

A trace's graphs stay in TorchScript's process-wide compilation unit after the trace is dropped, so a cache that
dropped its oldest trace to make a new one grew by that much on every new shape. The engine makes at most
MAX_TRACES traces a model and runs further shapes on the module; the first figure shows the memory flat once
they are made. Memory is the process's resident set (psutil), read after a garbage collection and malloc_trim.

    .venv/bin/python tools/measure_trace_memory.py [--rounds 4]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402
import torch  # noqa: E402

from engine import Engine, GenerationRequest  # noqa: E402
from engine.presets import SHIPPED_MICRO_MODEL  # noqa: E402
from engine.traced_unet import MAX_TRACES, _PositionalUNet  # noqa: E402
from tools.benchmark_timing import log_to_console  # noqa: E402

log = logging.getLogger("measure_trace_memory")


def resident_mb() -> float:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the system, so only what is held counts
    except OSError:
        pass
    return psutil.Process().memory_info().rss / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="passes over the job shapes (default 4)")
    args = parser.parse_args(argv)
    log_to_console()
    torch.set_num_threads(1)
    engine = Engine(model=str(SHIPPED_MICRO_MODEL))
    # Ten picture sizes, two more than the engine keeps traces for (a job's UNet batch is the same at each).
    sizes = [64 + 8 * step for step in range(10)]
    log.info("Jobs at %d picture sizes; the engine keeps at most %d traces a model", len(sizes), MAX_TRACES)
    readings = []
    for round_number in range(1, args.rounds + 1):
        for size in sizes:
            request = GenerationRequest(prompt="a red circle", seed=1, steps=2, width=size, height=size)
            list(engine.generate(request))
        readings.append(resident_mb())
        log.info(
            "Round %d: resident %.0f MB, %d traces",
            round_number,
            readings[-1],
            len(engine.loaded.traced_unet.traced_sample_shapes),
        )
    log.info("Growth from round 2 to round %d: %.0f MB", args.rounds, readings[-1] - readings[1])

    unet = engine.loaded.components["unet"]
    sample, timestep, text = (
        torch.randn(7, 4, 8, 8),
        torch.tensor(500.0),
        torch.randn(7, 77, unet.config.cross_attention_dim),
    )
    before = resident_mb()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shape branches, as the engine silences them
        for _ in range(3):
            trace = torch.jit.trace(_PositionalUNet(unet), (sample, timestep, text), check_trace=False)
            del trace
    log.info("Three traces made and dropped at once left %.0f MB each behind", (resident_mb() - before) / 3)


if __name__ == "__main__":
    main()
