"""A1111's DPM fast (k-diffusion's sample_dpm_fast), checked call by call against the algorithm written out here, and
on the micro model."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from engine import GenerationRequest
from engine.infotext import parse_infotext, parse_infotext_params
from engine.samplers import build_scheduler, get_sampler
from tests.test_ddim import picture_pass
from tests.test_engine import (
    SD_SCHEDULER_CONFIG,
    pass_drawing_step_noise,
    picture_pass_drawing_step_noise,
    stand_in_eps,
)


def compvis_log_sigmas() -> torch.Tensor:
    """The log sigmas of SD's 1000 training timesteps, in float32, as k-diffusion's CompVisDenoiser holds them."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float().log()


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """k-diffusion's CompVisDenoiser.sigma_to_t: the fractional timestep of `sigma`."""
    log_sigma = sigma.log()
    low = int((log_sigma - log_sigmas >= 0).sum().clamp(1, len(log_sigmas) - 1)) - 1
    weight = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
    return (1 - weight) * low + weight * (low + 1)


def sigma(t):
    """DPM-Solver's sigma at time t = -log(sigma)."""
    return (-t).exp()


def counted_eps(eps_model, calls: list):
    """DPMSolver.eps over `eps_model` (scaled input, fractional timestep), appending each call's sigma to `calls`."""
    log_sigmas = compvis_log_sigmas()

    def eps(x, t):
        calls.append(sigma(t))
        return eps_model((x / (sigma(t) ** 2 + 1).sqrt()).float(), sigma_to_t(sigma(t), log_sigmas))

    return eps


def a1111_dpm_fast(eps_model, x, sigma_min, sigma_max, n, eta, noises, s_noise=1.0):
    """k-diffusion's sample_dpm_fast as A1111 calls it (eta from its ancestral eta, noise from its generator): n model
    calls over floor(n / 3) + 1 equal steps in t = -log(sigma), with third-order steps but the last ones."""
    fresh, calls = iter(noises), []
    eps = counted_eps(eps_model, calls)

    t_start, t_end = -sigma_max.log(), -sigma_min.log()
    m = math.floor(n / 3) + 1
    ts = torch.linspace(t_start, t_end, m + 1)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        if eta:
            sigma_up = min(
                sigma(t_next), eta * (sigma(t_next) ** 2 * (sigma(t) ** 2 - sigma(t_next) ** 2) / sigma(t) ** 2) ** 0.5
            )
            sigma_down = (sigma(t_next) ** 2 - sigma_up**2) ** 0.5
            aim = torch.minimum(t_end, -sigma_down.log())
            up = (sigma(t_next) ** 2 - sigma(aim) ** 2) ** 0.5
        else:
            aim, up = t_next, 0.0
        h = aim - t
        e = eps(x, t)
        if order == 1:
            x = x - sigma(aim) * h.expm1() * e
        elif order == 2:
            s1 = t + h / 2
            u1 = x - sigma(s1) * (h / 2).expm1() * e
            e1 = eps(u1, s1)
            x = x - sigma(aim) * h.expm1() * e - sigma(aim) / (2 * 0.5) * h.expm1() * (e1 - e)
        else:
            r1, r2 = 1 / 3, 2 / 3
            s1, s2 = t + r1 * h, t + r2 * h
            u1 = x - sigma(s1) * (r1 * h).expm1() * e
            e1 = eps(u1, s1)
            u2 = (
                x
                - sigma(s2) * (r2 * h).expm1() * e
                - sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (e1 - e)
            )
            e2 = eps(u2, s2)
            x = x - sigma(aim) * h.expm1() * e - sigma(aim) / r2 * (h.expm1() / h - 1) * (e2 - e)
        x = x + up * s_noise * next(fresh)
    return x, calls


def schedule_ends(schedule: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first sigma and the last above 0 of the schedule A1111 makes for `steps` (what it hands DPM fast)."""
    made = build_scheduler(SD_SCHEDULER_CONFIG, "Euler", schedule)
    made.set_timesteps(steps)
    sigmas = made.sigmas.float()
    return sigmas[0], sigmas[-2]


@pytest.mark.parametrize(
    ("steps", "schedule", "eta"),
    [(20, "Automatic", 1.0), (12, "Automatic", 1.0), (10, "Karras", 0.0), (21, "Exponential", 0.5)],
)
def test_dpm_fast_samples_as_a1111s(steps, schedule, eta):
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, "DPM fast", schedule, eta=eta)
    latent, noise, noises = pass_drawing_step_noise(scheduler, steps)
    sigma_max, sigma_min = schedule_ends(schedule, steps)
    if schedule == "Automatic":
        assert (round(float(sigma_max), 4), round(float(sigma_min), 4)) == (14.6146, 0.0292)
    expected, calls = a1111_dpm_fast(stand_in_eps, noise * sigma_max, sigma_min, sigma_max, steps, eta, noises)
    assert len(calls) == steps == len(scheduler.timesteps)  # its steps are model calls
    assert torch.allclose(scheduler.sigmas[:-1], torch.stack(calls), rtol=1e-5)
    assert torch.allclose(latent, expected, atol=1e-4), (latent - expected).abs().max()


def test_dpm_fast_from_a_picture_runs_over_a1111s_sigma_sched():
    """A1111 hands DPM fast sigma_sched's first sigma and its last above 0, and its length less one calls."""
    steps, strength = 20, 0.6
    scheduler, calls, counted = picture_pass("DPM fast", steps, strength)
    assert counted.sampling == int(strength * steps) + 1 == 13
    latent, picture, noise, noises = picture_pass_drawing_step_noise(scheduler, calls, draws=5)
    made = build_scheduler(SD_SCHEDULER_CONFIG, "Euler", "Automatic")
    made.set_timesteps(steps)
    sigma_sched = made.sigmas.float()[steps - counted.sampling :]
    start = picture + noise * sigma_sched[0]
    expected, made_calls = a1111_dpm_fast(
        stand_in_eps, start, sigma_sched[-2], sigma_sched[0], counted.sampling, 1.0, noises
    )
    assert len(made_calls) == counted.sampling
    assert torch.allclose(latent, expected, atol=1e-4), (latent - expected).abs().max()


REQUEST = GenerationRequest(prompt="a red circle on a blue background", steps=20, seed=7, sampler_name="DPM fast")


def written_read_back_and_moved_by_ensd(engine, request: GenerationRequest):
    """The job's result, checked as A1111's DPM-Solver samplers' (eta 1): its infotext names the sampler and no eta
    (A1111 writes one only when it is not 1) and makes the picture again byte for byte; its steps draw fresh noise,
    from seed + ENSD as A1111's do, so an ENSD changes the picture and is written."""
    result = list(engine.generate(request))[-1]
    params = parse_infotext_params(result.infotexts[0])
    assert params["Sampler"] == request.sampler_name and "Eta" not in params
    again = list(engine.generate(parse_infotext(result.infotexts[0])))[-1]
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))
    delta = list(engine.generate(dataclasses.replace(request, eta_noise_seed_delta=31337)))[-1]
    assert not np.array_equal(np.asarray(delta.images[0]), np.asarray(result.images[0]))
    assert parse_infotext_params(delta.infotexts[0])["ENSD"] == "31337"
    return result


def test_dpm_fast_on_the_micro_model_is_written_and_read_back(micro_engine):
    spec = get_sampler("k_dpm_fast")  # A1111's alias
    assert spec.name == "DPM fast" and spec.eta_default == 1.0 and spec.uses_ensd
    written_read_back_and_moved_by_ensd(micro_engine, REQUEST)
    # At eta 0 its steps draw no noise, and the eta is written.
    calm = list(micro_engine.generate(dataclasses.replace(REQUEST, eta=0.0)))[-1]
    assert parse_infotext_params(calm.infotexts[0])["Eta"] == "0"
    # At 50 steps the picture is the prompt's, a red shape on a blue background (at 20 steps and CFG 7 this model's
    # stiff guidance breaks some of its pictures up: README, Samplers).
    drawn = list(micro_engine.generate(dataclasses.replace(REQUEST, steps=50)))[-1]
    pixels = np.asarray(drawn.images[0].convert("RGB")).astype(int)
    corner, middle = pixels[2, 2], pixels[28:36, 28:36].reshape(-1, 3).mean(axis=0)
    assert corner[2] > 150 and corner[0] < 100 and middle[0] > 150 and middle[2] < 100
