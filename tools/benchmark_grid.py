"""What a grid costs over running its cells one by one: prints the ratio measured in one run.

    .venv/bin/python tools/benchmark_grid.py                 # the embedded model, 2x3 grid, 9 rounds
    .venv/bin/python tools/benchmark_grid.py --model path --rounds 7

Each round times the grid (Comparer.run_grid, previews on as on the page) and the same cells as
separate Engine.generate calls with the same previews, interleaved so machine noise hits both alike.
Target: grid / single runs <= 1.05 (no model reloads, prompt encodings reused).

Round-to-round noise on a shared CPU is often larger than 5%, so it also prints the grid's own
work: the time run_grid spends outside the engine's jobs (planning, checking cells, collecting
timelines, drawing the grid), as a share of the grid's time, which noise hardly moves.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import Engine, GenerationRequest, PreviewSettings  # noqa: E402
from engine.compare import Comparer, parse_axis, plan_grid  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name or path (default: the embedded model)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", default="10, 20, 30")
    parser.add_argument("--samplers", default="Euler a, DPM++ 2M")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    engine = Engine(model=args.model)
    preview = PreviewSettings(mode="approx", every=1)
    base = GenerationRequest(prompt="a red circle on a blue background", seed=5)
    axes = [parse_axis("Sampler", args.samplers, engine), parse_axis("Steps", args.steps, engine)]
    cells = plan_grid(base, axes)
    comparer = Comparer(engine)
    run_job = engine.generate
    seconds_in_jobs = [0.0]

    def timed_job(*args, **kwargs):
        # Time only the engine's own work: the clock stops while the grid handles each event.
        events = run_job(*args, **kwargs)
        while True:
            started = time.perf_counter()
            try:
                event = next(events)
            except StopIteration:
                seconds_in_jobs[0] += time.perf_counter() - started
                return
            seconds_in_jobs[0] += time.perf_counter() - started
            yield event

    own_shares = []

    def grid() -> float:
        seconds_in_jobs[0] = 0.0
        engine.generate = timed_job
        started = time.perf_counter()
        try:
            for _event in comparer.run_grid(base, axes, preview=preview):
                pass
        finally:
            del engine.generate
        elapsed = time.perf_counter() - started
        own_shares.append((elapsed - seconds_in_jobs[0]) / elapsed)
        return elapsed

    def singles() -> float:
        started = time.perf_counter()
        for cell in cells:
            for _event in engine.generate(cell.request, preview=preview):
                pass
        return time.perf_counter() - started

    grid(), singles()  # warm-up: first-call allocations and caches
    ratios = []
    for round_no in range(args.rounds):
        # Alternate which goes first, so a slow moment of the machine does not always hit the same side.
        first, second = (grid, singles) if round_no % 2 == 0 else (singles, grid)
        a, b = first(), second()
        grid_time, singles_time = (a, b) if first is grid else (b, a)
        ratios.append(grid_time / singles_time)
        sys.stdout.write(
            f"round {round_no + 1}: grid {grid_time:.2f} s, {len(cells)} single runs {singles_time:.2f} s\n"
        )
    sys.stdout.write(
        f"{len(cells)}-cell grid / {len(cells)} single runs: median {statistics.median(ratios):.3f}, "
        f"best {min(ratios):.3f} (target <= 1.05)\n"
        f"grid's own work outside the jobs: median {statistics.median(own_shares[1:]):.2%} of the grid's time\n"
    )


if __name__ == "__main__":
    main()
