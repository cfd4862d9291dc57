"""txt2img's starting noise as A1111 draws it: k-diffusion's noise x sigma_max, whichever space the diffusers scheduler
keeps its latents in, and A1111's SGM noise multiplier (noise x sqrt(1 + sigma_max^2))."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine import GenerationRequest
from engine.infotext import parse_infotext
from engine.samplers import ScheduleShape, build_scheduler, get_sampler, supported_schedules
from tests.test_engine import SD_SCHEDULER_CONFIG

# diffusers keeps DPM-Solver latents variance-preserving (the variance-exploding x / sqrt(1 + sigma^2)).
PRESERVING = {"DPM++ 2M", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE"}
K_DIFFUSION = ["Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ SDE", *sorted(PRESERVING)]


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
