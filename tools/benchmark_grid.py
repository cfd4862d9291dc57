"""What a grid costs over running its cells one by one: prints the ratio measured in one run.

    .venv/bin/python tools/benchmark_grid.py                 # the embedded model, 2x3 grid, 5 rounds
    .venv/bin/python tools/benchmark_grid.py --model path --rounds 7

Each round times the grid (Comparer.run_grid, previews on as on the page) and the same cells as
separate Engine.generate calls with the same previews, interleaved so machine noise hits both alike.
Target: grid / single runs <= 1.05 (no model reloads, prompt encodings reused).
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
    parser.add_argument("--rounds", type=int, default=5)
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

    def grid() -> float:
        started = time.perf_counter()
        for _event in comparer.run_grid(base, axes, preview=preview):
            pass
        return time.perf_counter() - started

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
    )


if __name__ == "__main__":
    main()
