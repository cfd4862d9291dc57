"""Measure what the micro model draws, through the Engine, and print a table.

    .venv/bin/python tools/measure_micro_quality.py                    # the shipped micro-shapes model
    .venv/bin/python tools/measure_micro_quality.py --model PATH --sampler-prompts 8   # another model, quicker
    .venv/bin/python tools/measure_micro_quality.py --stiffness     # why LMS breaks up at CFG 7 (30 s)

Background = most common palette colour, shape colour = the second, shape from how much of its
bounding box it fills. Fixed seeds: the same model prints the same table.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image  # noqa: E402

from engine import Engine  # noqa: E402
from training import quality  # noqa: E402
from training.train_micro import DEFAULT_OUT  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_OUT))
    parser.add_argument(
        "--prompts", type=int, default=168, help="prompts for the attribute accuracy (168 = all combos)"
    )
    parser.add_argument("--sampler-prompts", type=int, default=24, help="prompts per sampler (0: skip the samplers)")
    parser.add_argument("--seeds", type=int, default=300, help="seeds tried for the negative-prompt check (0: skip it)")
    parser.add_argument(
        "--grid", type=Path, help="also save a labelled sample grid (PNG) here, e.g. docs/micro-shapes.png"
    )
    parser.add_argument("--grid-only", action="store_true", help="only save the grid")
    parser.add_argument(
        "--stiffness",
        action="store_true",
        help="only print how sharply the guided denoiser answers a change of the latent (what makes "
        "multistep samplers oscillate) at CFG 4 and 7",
    )
    args = parser.parse_args(argv)
    for name, least in (("prompts", 1), ("sampler_prompts", 0), ("seeds", 0)):
        if getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be {least} or more, not {getattr(args, name)}")
    logging.basicConfig(level=logging.WARNING)
    engine = Engine(model=args.model)
    if args.stiffness:
        print_stiffness(engine)
        return
    if args.grid:
        save_sample_grid(engine, args.grid)
        if args.grid_only:
            return
    rows: list[tuple[str, str, str]] = []

    def row(name: str, value: str, bar: str) -> None:
        rows.append((name, value, bar))
        sys.stdout.write(f"{name:<48} {value:>18}   {bar}\n")
        sys.stdout.flush()

    start = time.perf_counter()
    quality.generate(engine, prompt="warm-up", seed=0)
    timings = []
    for seed in range(5):
        began = time.perf_counter()
        quality.generate(engine, prompt="a red circle on a blue background", seed=seed)
        timings.append(time.perf_counter() - began)
    row("20-step generation at 64x64 (median of 5)", f"{sorted(timings)[2]:.2f} s", "<= 1 s")

    accuracy = quality.attribute_accuracy(engine, args.prompts)
    row(f"background colour ({accuracy.count} prompts)", f"{accuracy.background:.1%}", ">= 95%")
    row(f"shape colour ({accuracy.count} prompts)", f"{accuracy.colour:.1%}", ">= 95%")
    row(f"shape ({accuracy.count} prompts)", f"{accuracy.shape:.1%}", ">= 85%")
    row(
        "  of which circles / squares / triangles",
        " / ".join(f"{right}/{asked}" for right, asked in accuracy.shape_by_kind.values()),
        "",
    )
    row(
        "  outline match, median IoU (same order)",
        " / ".join(f"{match:.2f}" for match in accuracy.outline_by_kind.values()),
        "data 0.98-1.0",
    )

    if args.seeds:
        colours = quality.circle_colours(engine, range(args.seeds))
        drawn = Counter(colours.values()).most_common()
        row(
            f"'{quality.NEGATIVE_CHECK_PROMPT}' draws ({args.seeds} seeds)",
            ", ".join(f"{c} {n}" for c, n in drawn[:4]),
            "",
        )
        # The check is on red; when a model seldom draws red unprompted, the colour it draws most
        # shows the same effect with enough seeds to count.
        for colour in dict.fromkeys(["red", drawn[0][0]]):
            negative = quality.negative_prompt_effect(engine, colours, colour)
            row(
                f"negative '{colour}' turns {colour} circles another colour",
                f"{negative.changed_with}/{negative.drawn_without} = {negative.share:.0%}",
                ">= 90%",
            )
    moved, total = quality.emphasis_effect(engine, range(6))
    row("(blue:1.4) has more blue than (blue:0.6)", f"{moved}/{total} = {moved / total:.0%}", ">= 90%")

    img2img = [quality.img2img_effect(engine, seed) for seed in range(12)]
    red_inits = [e for e in img2img if e.init_colour == "red"]
    row(
        "img2img red->blue: blue at 0.75 / red at 0.1",
        f"{sum(e.strong_colour == 'blue' for e in red_inits)}/{len(red_inits)} / "
        f"{sum(e.weak_colour == 'red' for e in red_inits)}/{len(red_inits)}",
        "all",
    )
    inpaint = quality.inpaint_effect(engine, seed=3)
    row("inpaint: change inside mask (0-255)", f"{inpaint.masked_change:.1f}", "large")
    row(
        "inpaint: change outside / VAE round trip", f"{inpaint.outside_change:.2f} / {inpaint.vae_round_trip:.2f}", "<="
    )
    row("inpaint: colour inside the mask", inpaint.colour_inside, "blue")

    for sampler in engine.samplers() if args.sampler_prompts else []:
        accuracy = quality.sampler_background_accuracy(engine, sampler, args.sampler_prompts)
        settings = f"{quality.usual_steps(sampler)} steps, CFG {quality.usual_cfg(sampler):g}"
        row(f"background accuracy, {sampler} ({settings})", f"{accuracy:.1%}", ">= 95%")
    sys.stdout.write(f"\n{time.perf_counter() - start:.0f} s in all\n")


def print_stiffness(engine: Engine) -> None:
    """The guided denoiser's eigenvalue farthest from zero at a few noise levels, and how far the prompt's
    and the empty prompt's denoisers each follow the latent along it (1: all the way, 0: not at all)."""
    sys.stdout.write(f"{'CFG':>4} {'sigma':>6} {'eigenvalue':>11} {'prompt':>7} {'empty':>7}\n")
    for cfg_scale in (4.0, quality.DEFAULT_CFG):
        for reading in quality.guidance_stiffness(engine, [6.0, 3.0, 1.5, 0.8, 0.4], cfg_scale=cfg_scale):
            sys.stdout.write(
                f"{cfg_scale:>4g} {reading.sigma:>6g} {reading.guided:>11.2f} "
                f"{reading.conditional:>7.2f} {reading.unconditional:>7.2f}\n"
            )


def save_sample_grid(engine: Engine, path: Path) -> None:
    """Colours across, shapes down, one seed: a Prompt S/R grid made by the Compare tab's own engine code."""
    from engine import GenerationRequest
    from engine.compare import Comparer, parse_axis
    from engine.images import encode_png

    base = GenerationRequest(prompt="a red circle on a white background", seed=7)
    axes = [
        parse_axis("Prompt S/R", "red, blue, green, yellow, purple, orange, black", engine),
        parse_axis("Prompt S/R", "circle, square, triangle", engine),
    ]
    result = list(Comparer(engine).run_grid(base, axes))[-1]
    grid = result.grids[0]
    grid = grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(grid, result.infotext))
    sys.stdout.write(f"saved {path}\n")


if __name__ == "__main__":
    main()
