"""Background accuracy per sampler for the ideal denoiser of the training data, next to the model's own.

    .venv/bin/python tools/ideal_denoiser_samplers.py                       # LMS, DPM2 a, Euler a at CFG 7
    .venv/bin/python tools/ideal_denoiser_samplers.py --cfg 1 4 7 --samplers LMS
    .venv/bin/python tools/ideal_denoiser_samplers.py --learned            # the model's UNet, same loop

The ideal denoiser is the exact minimiser of the training loss (training/ideal.py): the posterior mean
over the training pictures' latents. A sampler that draws the wrong backgrounds with it would do so
with any model that fits the data more closely. --learned runs the model's own UNet through the same
loop, which reproduces the engine's readings (measure_micro_quality.py), as a check on the loop.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from training import dataset, ideal, quality  # noqa: E402
from training.train_micro import DEFAULT_OUT  # noqa: E402

logger = logging.getLogger("ideal_denoiser_samplers")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--samplers", nargs="+", default=["LMS", "DPM2 a", "Euler a"])
    parser.add_argument("--cfg", type=float, nargs="+", default=[quality.DEFAULT_CFG])
    parser.add_argument("--steps", type=int, default=quality.DEFAULT_STEPS)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--pictures", type=int, default=10000, help="training pictures the ideal denoiser knows")
    parser.add_argument("--learned", action="store_true", help="sample the model's UNet instead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)

    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(args.model, dtype=torch.float32)
    vae = pipeline.vae.eval()
    scheduler_config = dict(pipeline.scheduler.config)
    if not args.learned:
        started = time.perf_counter()
        training_set = ideal.training_set_denoiser(vae, args.pictures)
        logger.info("encoded %d training pictures in %.0f s", args.pictures, time.perf_counter() - started)
    components = {name: getattr(pipeline, name) for name in ("unet", "tokenizer", "text_encoder")}

    def denoiser_for(prompt: str, scene: dataset.ShapeScene) -> ideal.Denoiser:
        if args.learned:
            return quality.unet_denoiser(components, prompt, scheduler_config)
        return training_set.for_scene(scene, size_named=scene.size in prompt)

    print(f"{'learned UNet' if args.learned else 'ideal denoiser'}, {args.steps} steps, {args.prompts} prompts")
    for sampler in args.samplers:
        for cfg_scale in args.cfg:
            hits = ideal.background_hits(
                denoiser_for,
                vae,
                scheduler_config,
                sampler,
                cfg_scale=cfg_scale,
                steps=args.steps,
                prompts=args.prompts,
            )
            print(f"{sampler:10s} CFG {cfg_scale:4.1f}: backgrounds {hits}/{args.prompts}", flush=True)


if __name__ == "__main__":
    main()
