"""How much do live previews cost? Engine.generate against a plain diffusers pipeline call.

Runs the same request (same components, sampler, seed, steps, size) through
  - a plain pipeline call with no callback (the baseline),
  - Engine.generate with previews off, approximate previews every step, full-VAE previews every step,
interleaved round by round so machine noise hits every variant alike, and prints each variant's
median time as a ratio to the baseline, all measured in this one run.

    .venv/bin/python tools/benchmark_previews.py [--model NAME] [--size 512] [--steps 20] [--rounds 5]
"""

from __future__ import annotations

import logging
import statistics
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import Engine, GenerationRequest, PreviewSettings  # noqa: E402
from engine.engine import cpu_threads_for  # noqa: E402
from engine.samplers import build_scheduler  # noqa: E402
from tools.benchmark_timing import log_ratio_table, log_to_console, model_arguments, time_interleaved  # noqa: E402

log = logging.getLogger("benchmark")


def main() -> None:
    parser = model_arguments(__doc__, size=512, rounds=5, sampler="Euler")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    log_to_console()

    engine = Engine(model=args.model, models_dir=args.models_dir, device=args.device)
    model = engine.loaded
    request = GenerationRequest(
        prompt="a lighthouse on a cliff at dusk, oil painting",
        negative_prompt="blurry",
        sampler_name=args.sampler,
        scheduler="Uniform",
        steps=args.steps,
        cfg_scale=7.0,
        seed=1234,
        width=args.size,
        height=args.size,
    )
    checked = engine.validate(request)
    # The baseline gets the same conditioning the engine computes, so both do the same work.
    positive, negative = model.prompt_encoder.encode(checked.prompt, checked.negative_prompt)
    positive, negative = positive.to(model.device, model.dtype), negative.to(model.device, model.dtype)
    latent_shape = model.latent_shape(args.size, args.size)

    def plain_pipeline_call():
        scheduler = build_scheduler(model.scheduler_config, checked.sampler_name, checked.scheduler)
        pipe = model.pipeline_for("txt2img", scheduler)
        generator = torch.Generator("cpu").manual_seed(checked.seed)
        latents = torch.randn(latent_shape, generator=generator).to(model.device, model.dtype)
        return pipe(
            prompt_embeds=positive,
            negative_prompt_embeds=negative,
            num_inference_steps=checked.steps,
            guidance_scale=checked.cfg_scale,
            latents=latents,
            generator=[generator],
            height=args.size,
            width=args.size,
            output_type="pil",
        ).images[0]

    def in_worker_thread(call, family_threads: bool = True):
        # Engine.generate samples in a worker thread with the family's CPU thread count; run the
        # baseline the same way, so that both are measured under the same threading conditions.
        def with_threads():
            if not family_threads:
                return call()
            with cpu_threads_for(model, args.size * args.size):
                return call()

        def threaded():
            box = []
            worker = threading.Thread(target=lambda: box.append(with_threads()))
            worker.start()
            worker.join()
            return box[0]

        return threaded

    preview_share: dict[str, list[float]] = {}

    def engine_call(mode: str):
        def call():
            result = list(engine.generate(request, preview=PreviewSettings(mode=mode, every=1)))[-1]
            preview_share.setdefault(mode, []).append(result.preview_seconds / result.elapsed)
            return result.images[0]

        return call

    variants = {
        "plain diffusers call": in_worker_thread(plain_pipeline_call),
        # What the family's cpu_threads setting saves (differs only for families and sizes it covers).
        "plain call, torch's default threads": in_worker_thread(plain_pipeline_call, family_threads=False),
        "engine, previews off": engine_call("none"),
        "engine, approx preview every step": engine_call("approx"),
        "engine, full VAE preview every step": engine_call("vae"),
    }
    reference = variants["plain diffusers call"]()  # warm-up, and the image every variant must reproduce
    for name, call in variants.items():
        # A different thread count may add up floating-point sums in another order.
        if call().tobytes() != reference.tobytes() and "default threads" not in name:
            log.warning("%s made a different image than the plain call", name)

    times = time_interleaved(variants, args.rounds)
    log.info(
        "model %s on %s, %dx%d, %s, %d steps, median and fastest of %d rounds",
        engine.model.title,
        engine.device,
        args.size,
        args.size,
        args.sampler,
        args.steps,
        args.rounds,
    )
    log_ratio_table(times, "plain diffusers call")
    # Time measured inside the job itself: independent of how busy the machine was between rounds.
    for mode, shares in preview_share.items():
        log.info("previews '%s': %.2f%% of the job's time (median)", mode, 100 * statistics.median(shares))


if __name__ == "__main__":
    main()
