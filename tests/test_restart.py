"""A1111's Restart sampler (its sd_samplers_extra.restart_sampler), checked step by step against A1111's algorithm
written out here, and on the micro model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engine import GenerationRequest
from engine.infotext import parse_infotext, parse_infotext_params
from engine.samplers import build_scheduler
from tests.test_ddim import picture_pass
from tests.test_engine import (
    SD_SCHEDULER_CONFIG,
    pass_drawing_step_noise,
    picture_pass_drawing_step_noise,
    stand_in_eps,
)


def karras(count: int, lowest: float, highest: float) -> torch.Tensor:
    """k-diffusion's get_sigmas_karras at rho 7, in float32, with its final 0."""
    ramp = torch.linspace(0, 1, count)
    sigmas = (highest ** (1 / 7) + ramp * (lowest ** (1 / 7) - highest ** (1 / 7))) ** 7
    return torch.cat([sigmas, torch.zeros(1)])


def a1111_restart(eps_model, x, sigmas, timesteps, noises):
    """A1111's restart_sampler over `sigmas` (float32, ending in 0): Heun steps, and from 20 steps a schedule made anew
    with a restart from the sigma nearest 0.1 back to the one nearest 2 (twice from 36 steps), the noise of each
    restart taken from `noises` in turn; `timesteps` are those the model is called with."""
    calls, fresh = iter(timesteps), iter(noises)

    def denoise(x, sigma):
        return x - sigma * eps_model((x / (sigma**2 + 1).sqrt()).float(), next(calls))

    steps = len(sigmas) - 1
    plan = None
    if steps >= 20:
        restart_steps, times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = karras(steps - restart_steps * times, sigmas[-2].item(), sigmas[0].item())
        plan = (restart_steps + 1, times)
    low = int(torch.argmin((sigmas - 0.1).abs()))
    high = int(torch.argmin((sigmas - 2.0).abs()))
    sequence = []
    for i in range(len(sigmas) - 1):
        sequence.append((sigmas[i], sigmas[i + 1]))
        if plan is not None and i + 1 == low and high < low:
            again = karras(plan[0], sigmas[low].item(), sigmas[high].item())[:-1]
            for _ in range(plan[1]):
                sequence.extend(zip(again[:-1], again[1:], strict=True))
    last = None
    for old, new in sequence:
        if last is not None and last < old:
            x = x + next(fresh) * (old**2 - last**2) ** 0.5
        slope = (x - denoise(x, old)) / old
        if new == 0:
            x = x + slope * (new - old)
        else:
            ahead = x + slope * (new - old)
            x = x + (slope + (ahead - denoise(ahead, new)) / new) / 2 * (new - old)
        last = new
    return x, len(sequence)


@pytest.mark.parametrize(("steps", "schedule"), [(10, "Karras"), (20, "Karras"), (24, "Exponential"), (40, "Karras")])
def test_restart_samples_as_a1111s(steps, schedule):
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, "Restart", schedule)
    latent, noise, noises = pass_drawing_step_noise(scheduler, steps)
    # The pass's schedule as diffusers made it for the schedule type (Heun holds each step's sigma twice).
    made = build_scheduler(SD_SCHEDULER_CONFIG, "Heun", schedule)
    made.set_timesteps(steps)
    sigmas = torch.cat([made.sigmas[:1], made.sigmas[1::2]]).float()
    expected, pairs = a1111_restart(stand_in_eps, noise * sigmas[0], sigmas, scheduler.timesteps, noises)
    assert pairs == steps  # restarts keep the step count
    assert len(scheduler.timesteps) == 2 * steps - 1  # Heun's two calls a step, one for the last
    assert torch.allclose(latent, expected, atol=1e-4), (latent - expected).abs().max()


def test_restart_from_a_picture_restarts_over_the_pass_as_a1111s_img2img():
    """A1111 hands Restart the last t_enc + 1 steps' sigmas (its sigma_sched) and starts from the picture plus noise x
    the first of them; from 20 such steps the pass restarts."""
    steps, strength = 30, 0.8
    scheduler, calls, counted = picture_pass("Restart", steps, strength)
    assert counted.sampling == int(strength * steps) + 1 == 25
    latent, picture, noise, noises = picture_pass_drawing_step_noise(scheduler, calls, draws=2)
    made = build_scheduler(SD_SCHEDULER_CONFIG, "Heun", "Karras")  # Restart's Automatic
    made.set_timesteps(steps)
    sigmas = torch.cat([made.sigmas[:1], made.sigmas[1::2]]).float()[steps - counted.sampling :]
    expected, pairs = a1111_restart(stand_in_eps, picture + noise * sigmas[0], sigmas, calls, noises)
    assert pairs == counted.sampling and len(calls) == 2 * counted.sampling - 1
    assert torch.allclose(latent, expected, atol=1e-4), (latent - expected).abs().max()


REQUEST = GenerationRequest(prompt="a red circle on a blue background", steps=20, seed=7, sampler_name="Restart")


def test_restart_on_the_micro_model_is_written_and_read_back(micro_engine):
    result = list(micro_engine.generate(REQUEST))[-1]
    params = parse_infotext_params(result.infotexts[0])
    assert params["Sampler"] == "Restart"
    again = list(micro_engine.generate(parse_infotext(result.infotexts[0])))[-1]
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))
    # Its restart draws from seed + ENSD (as A1111's does), which is written so that the text makes it again.
    delta = list(micro_engine.generate(dataclasses.replace(REQUEST, eta_noise_seed_delta=31337)))[-1]
    assert not np.array_equal(np.asarray(delta.images[0]), np.asarray(result.images[0]))
    assert parse_infotext_params(delta.infotexts[0])["ENSD"] == "31337"
    # Below 20 steps it does not restart: no noise after the start, so ENSD changes nothing and is not written.
    short = dataclasses.replace(REQUEST, steps=12)
    plain, with_delta = (
        list(micro_engine.generate(dataclasses.replace(short, eta_noise_seed_delta=d)))[-1] for d in (0, 5)
    )
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(with_delta.images[0]))
