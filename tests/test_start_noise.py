"""txt2img's starting noise as A1111 draws it: k-diffusion's noise x sigma_max, whichever space the diffusers scheduler
keeps its latents in, and A1111's SGM noise multiplier (noise x sqrt(1 + sigma_max^2))."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from engine import GenerationRequest
from engine.infotext import parse_infotext
from engine.samplers import ScheduleShape, build_scheduler, get_sampler, supported_schedules
from tests.test_engine import SD_SCHEDULER_CONFIG

# diffusers keeps DPM-Solver latents variance-preserving (the variance-exploding x / sqrt(1 + sigma^2)).
PRESERVING = {"DPM++ 2M", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"}
K_DIFFUSION = [
    "Euler a",
    "Euler",
    "LMS",
    "Heun",
    "DPM2",
    "DPM2 a",
    "DPM++ SDE",
    "DPM++ 2S a",
    "Restart",
    *sorted(PRESERVING),
]


@pytest.mark.parametrize("sampler", K_DIFFUSION)
@pytest.mark.parametrize("sgm", [False, True])
def test_the_start_is_a1111s_in_the_schedulers_own_space(sampler, sgm):
    for shape, sigma_max in ((ScheduleShape(), None), (ScheduleShape(sigma_max=10.0), 10.0)):
        scheduler = build_scheduler(
            SD_SCHEDULER_CONFIG, sampler, "Karras", schedule_shape=shape, sgm_noise_multiplier=sgm
        )
        scheduler.set_timesteps(20)
        sigma = float(scheduler.sigmas.max())
        if "Karras" in supported_schedules(get_sampler(sampler)):  # Euler a takes none: its own Uniform
            assert sigma == pytest.approx(sigma_max or 14.6146, abs=1e-3)
        # k-diffusion's start, noise x sigma (or x sqrt(1 + sigma^2)), in the scheduler's space.
        start = (1 + sigma**2) ** 0.5 if sgm else sigma
        expected = start / (1 + sigma**2) ** 0.5 if sampler in PRESERVING else start
        assert scheduler.init_noise_sigma == pytest.approx(expected, rel=1e-6), sampler


REQUEST = GenerationRequest(prompt="a red circle on a blue background", steps=12, seed=7)


def draw(engine, **fields):
    result = list(engine.generate(dataclasses.replace(REQUEST, **fields)))[-1]
    return np.asarray(result.images[0]), result.infotexts[0]


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_the_sgm_noise_multiplier_starts_txt2img_louder_and_reads_back(micro_engine, red_circle, sampler):
    plain, plain_text = draw(micro_engine, sampler_name=sampler)
    louder, text = draw(micro_engine, sampler_name=sampler, sgm_noise_multiplier=True)
    assert not np.array_equal(louder, plain)
    assert "SGM noise multiplier: True" in text and "SGM noise multiplier" not in plain_text
    again = parse_infotext(text)
    assert again.sgm_noise_multiplier
    assert np.array_equal(
        draw(micro_engine, sampler_name=sampler, sgm_noise_multiplier=again.sgm_noise_multiplier)[0], louder
    )
    # As in A1111, a pass from a picture adds its noise to the picture: img2img is the same, and says nothing.
    img2img = dict(sampler_name=sampler, init_images=[red_circle], denoising_strength=0.6)
    plain, _ = draw(micro_engine, **img2img)
    with_it, text = draw(micro_engine, sgm_noise_multiplier=True, **img2img)
    assert np.array_equal(with_it, plain) and "SGM noise multiplier" not in text


@pytest.mark.parametrize("mode", ["img2img", "inpaint", "hires"])
def test_a_pass_from_a_picture_starts_from_its_mean_latents_and_the_seeds_first_draw(micro_engine, red_circle, mode):
    """As A1111 starts one: the picture's latents plus sigma x the first draw of the seed's generator (A1111's
    ImageRNG.first). Encoding the picture draws nothing from that generator: it is the VAE's mean."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    from engine.noise import seed_noise
    from engine.samplers import picture_steps
    from engine.vae import mean_latents
    from tests.test_pad_conds import unet_calls

    steps, strength, seed = 10, 0.5, 11
    fields = dict(sampler_name="Euler", steps=steps, seed=seed, denoising_strength=strength, width=64, height=64)
    if mode == "hires":  # a Lanczos upscale of the first pass's picture, encoded, as the hires pass starts from it
        fields.update(enable_hr=True, hr_scale=1.0, hr_upscaler="Lanczos")
    else:
        fields.update(init_images=[red_circle])
        if mode == "inpaint":
            fields.update(mask=Image.new("L", red_circle.size, 255))
    request = dataclasses.replace(REQUEST, **fields)
    result, samples = unet_calls(micro_engine, request, record=lambda args, kwargs: args[0][:1].clone())
    if mode == "hires":
        first_pass = list(micro_engine.generate(dataclasses.replace(request, enable_hr=False)))[-1].images[0]
        picture, samples = first_pass, samples[steps:]
    else:
        picture = red_circle
    vae = micro_engine.loaded.components["vae"]
    latents = mean_latents(vae, VaeImageProcessor(vae_scale_factor=8).preprocess(picture))
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, "Euler", "Automatic")
    counted = picture_steps("Euler", steps, strength, "Automatic", exact=mode == "hires")
    scheduler.set_timesteps(counted.schedule)
    sigma = float(scheduler.sigmas[counted.schedule - counted.sampling])
    start = (latents + sigma * seed_noise(seed, latents.shape[1:])) / (1 + sigma**2) ** 0.5
    assert len(samples) == counted.sampling
    assert torch.allclose(samples[0], start, atol=1e-4)
