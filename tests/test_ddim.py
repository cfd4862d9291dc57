"""DDIM as A1111 samples it: its timesteps, its count of model calls, and its img2img start, checked step by step
against A1111's algorithm (sd_samplers_timesteps.py and sd_samplers_timesteps_impl.ddim) written out."""

from __future__ import annotations

import dataclasses
import math

import diffusers
import numpy as np
import pytest
import torch

from engine import GenerationRequest
from engine.infotext import parse_infotext
from engine.samplers import (
    A1111DDIMScheduler,
    A1111PLMSScheduler,
    build_scheduler,
    diffusers_strength,
    img2img_steps,
    pass_steps,
    picture_steps,
)
from tests.test_engine import SD_SCHEDULER_CONFIG
from tests.test_pad_conds import unet_calls

SHAPE = (1, 4, 8, 8)


def a1111_timesteps(steps: int) -> torch.Tensor:
    # CompVisSampler.get_timesteps
    return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)


def ddim_parameters(timesteps, alphas_cumprod, eta):
    """A1111's DDIM samplers' alphas, alphas_prev and (eta's) sigmas over `timesteps`."""
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].double()
    sigmas = eta * np.sqrt(
        (1 - alphas_prev.numpy()) / (1 - alphas.double().numpy()) * (1 - alphas.numpy() / alphas_prev.numpy())
    )
    return alphas, alphas_prev, sigmas


def a1111_ddim(eps_model, x, timesteps, alphas_cumprod, eta=0.0, noises=None):
    """sd_samplers_timesteps_impl.ddim, with the noise it draws handed in."""
    alphas, alphas_prev, sigmas = ddim_parameters(timesteps, alphas_cumprod, eta)
    noises = iter(noises or [])
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = eps_model(x, int(timesteps[index]))
        a_t, a_prev, sigma_t = alphas[index].item(), alphas_prev[index].item(), float(sigmas[index])
        pred_x0 = (x - math.sqrt(1 - a_t) * e_t) / math.sqrt(a_t)
        dir_xt = math.sqrt(1.0 - a_prev - sigma_t**2) * e_t
        x = math.sqrt(a_prev) * pred_x0 + dir_xt + (sigma_t * next(noises) if sigma_t else 0)
    return x


def eps_model(x, t):
    """A smooth stand-in for a UNet's noise prediction."""
    return 0.9 * x * math.cos(t / 700) + 0.1 * math.sin(t / 90)


def alphas_cumprod() -> torch.Tensor:
    return diffusers.DDPMScheduler.from_config(SD_SCHEDULER_CONFIG).alphas_cumprod


def draws(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randn(SHAPE, generator=generator) for _ in range(count)]


def picture_pass(sampler: str, steps: int, strength: float, *, exact: bool = False):
    """A pass from a picture as this engine hands it to a diffusers img2img pipeline: (its scheduler, the timesteps
    the pipeline then runs, its PictureSteps). `exact`: counted as the hires pass counts."""
    counted = picture_steps(sampler, steps, strength, exact=exact)
    scheduler = build_scheduler(
        SD_SCHEDULER_CONFIG, sampler, "Automatic", seed=0, from_picture=True, picture_calls=counted.sampling
    )
    scheduler.set_timesteps(counted.schedule)
    pipeline_strength = diffusers_strength(counted.sampling, counted.schedule)
    skipped = counted.schedule - min(int(counted.schedule * pipeline_strength), counted.schedule)
    return scheduler, scheduler.timesteps[skipped * scheduler.order :], counted


def noised_picture(timestep: int):
    """(a picture, noise, the picture noised to `timestep`'s level)."""
    abar = alphas_cumprod()
    picture = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)) * 0.5
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    return picture, noise, math.sqrt(abar[timestep]) * picture + math.sqrt(1 - abar[timestep]) * noise


def run(scheduler, x, timesteps, model, eta=0.0, noises=None):
    """`scheduler` stepped over `timesteps` with `model(x, t)` (UniPC's model times are fractional)."""
    noises = iter(noises or [])
    for timestep in timesteps:
        drawn = {"eta": eta, "variance_noise": next(noises)} if eta else {}
        x = scheduler.step(model(x, float(timestep)), timestep, x, **drawn).prev_sample
    return x


@pytest.mark.parametrize("steps", [20, 30, 7, 60])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_txt2img_is_a1111s_ddim(steps, eta):
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, "DDIM", "Automatic", seed=0)
    assert isinstance(scheduler, A1111DDIMScheduler)
    scheduler.set_timesteps(steps)
    timesteps = a1111_timesteps(steps)
    # The model is asked at every timestep but the first (timestep 1): at 20 steps 951 to 51, at 60 steps 62 times.
    assert scheduler.timesteps.tolist() == timesteps[1:].flip(0).tolist()
    assert len(scheduler.timesteps) == pass_steps("DDIM", "Automatic", steps)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    noises = draws(len(timesteps))
    ours = run(scheduler, start.clone(), scheduler.timesteps, eps_model, eta, noises)
    expected = a1111_ddim(eps_model, start.clone(), timesteps, alphas_cumprod(), eta, noises)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()


@pytest.mark.parametrize(("steps", "strength"), [(20, 0.75), (20, 1.0), (30, 0.4), (60, 0.5), (60, 0.04), (8, 0.5)])
def test_img2img_is_a1111s_ddim(steps, strength):
    # A1111: t_enc = int(min(strength, 0.999) x steps); the picture noised to timestep t_enc's level, then the model
    # asked at timesteps t_enc - 1 down to 1.
    timesteps = a1111_timesteps(steps)
    t_enc = int(min(strength, 0.999) * steps)
    picture, noise, noised = noised_picture(timesteps[t_enc])
    expected = a1111_ddim(eps_model, noised, timesteps[:t_enc], alphas_cumprod())

    # As a diffusers img2img pipeline runs it: the strength this engine hands it, the steps it then skips.
    scheduler, ours_timesteps, counted = picture_pass("DDIM", steps, strength)
    assert counted.sampling == img2img_steps("DDIM", steps, strength) == t_enc - 1
    assert ours_timesteps.tolist() == timesteps[1:t_enc].flip(0).tolist()
    start = scheduler.add_noise(picture, noise, ours_timesteps[:1])
    assert torch.allclose(start, noised, atol=1e-6)
    ours = run(scheduler, start, ours_timesteps, eps_model)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()


def test_always_discarding_spaces_the_timesteps_for_one_step_more():
    # A1111 spaces DDIM's timesteps for steps + 1 (at 20 steps 22 of them, 21 model calls, 988 to 48).
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, "DDIM", "Automatic", seed=0, always_discard_penultimate_sigma=True)
    scheduler.set_timesteps(20)
    assert scheduler.timesteps.tolist() == a1111_timesteps(21)[1:].flip(0).tolist()
    assert len(scheduler.timesteps) == pass_steps("DDIM", "Automatic", 20, always_discard=True) == 21


def test_sgm_uniform_keeps_diffusers_trailing_ddim():
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, "DDIM", "SGM Uniform", seed=0)
    assert not isinstance(scheduler, A1111DDIMScheduler)
    scheduler.set_timesteps(20)
    assert scheduler.timesteps[:2].tolist() == [999, 949]
    assert pass_steps("DDIM", "SGM Uniform", 20) == 20 and img2img_steps("DDIM", 20, 0.75, "SGM Uniform") == 15


REQUEST = GenerationRequest(prompt="a red circle on a blue background", steps=20, seed=7, sampler_name="DDIM")


def unet_timesteps(engine, request: GenerationRequest):
    return unet_calls(
        engine, request, lambda args, kwargs: int(kwargs.get("timestep", args[1] if len(args) > 1 else 0))
    )


def test_a_ddim_job_asks_the_unet_at_a1111s_timesteps(micro_engine):
    result, timesteps = unet_timesteps(micro_engine, REQUEST)
    assert timesteps == list(range(951, 50, -50))  # 19 calls
    # The hires pass runs A1111's count: its 20 steps at denoising 0.5 make a schedule of 40 (timesteps 1, 26, ...
    # 976), of which it asks at t_enc - 1 = 18, from 451 down to 26.
    hires = dataclasses.replace(REQUEST, enable_hr=True, hr_scale=1.5, hr_sampler_name="DDIM", denoising_strength=0.5)
    _, timesteps = unet_timesteps(micro_engine, hires)
    assert timesteps[19:] == list(range(451, 25, -25))
    # Always discarding respaces them, writes it and reads it back to the same picture.
    discarded, timesteps = unet_timesteps(
        micro_engine, dataclasses.replace(REQUEST, always_discard_penultimate_sigma=True)
    )
    assert len(timesteps) == 21 and timesteps[0] == 988
    assert "Discard penultimate sigma: True" in discarded.infotexts[0]
    again, _ = unet_timesteps(micro_engine, parse_infotext(discarded.infotexts[0]))
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(discarded.images[0]))
    assert not np.array_equal(np.asarray(discarded.images[0]), np.asarray(result.images[0]))


# PLMS ---------------------------------------------------------------------------------------------------------


def a1111_plms(eps_model, x, timesteps, alphas_cumprod):
    """sd_samplers_timesteps_impl.plms."""
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].double()
    old_eps = []

    def get_x_prev(e_t, index):
        a_t, a_prev = alphas[index].item(), alphas_prev[index].item()
        pred_x0 = (x - math.sqrt(1 - a_t) * e_t) / math.sqrt(a_t)
        return math.sqrt(a_prev) * pred_x0 + math.sqrt(1.0 - a_prev) * e_t

    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        t_next = int(timesteps[max(index - 1, 0)])
        e_t = eps_model(x, int(timesteps[index]))
        if len(old_eps) == 0:
            e_t_next = eps_model(get_x_prev(e_t, index), t_next)
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x_prev = get_x_prev(e_t_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
        x = x_prev
    return x


@pytest.mark.parametrize("steps", [20, 30, 7, 2])
def test_txt2img_is_a1111s_plms(steps):
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, "PLMS", "Automatic", seed=0)
    assert isinstance(scheduler, A1111PLMSScheduler)
    scheduler.set_timesteps(steps)
    timesteps = a1111_timesteps(steps)
    # The model at t_L-1, at the timestep below twice (the warm-up's second call, then its own step), and so on.
    below = timesteps[-2].item() if len(timesteps) > 2 else timesteps[0].item()
    assert scheduler.timesteps.tolist() == [timesteps[-1].item(), below, *timesteps[1:-1].flip(0).tolist()]
    assert len(scheduler.timesteps) == pass_steps("PLMS", "Automatic", steps) == len(timesteps)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    ours = run(scheduler, start.clone(), scheduler.timesteps, eps_model)
    expected = a1111_plms(eps_model, start.clone(), timesteps, alphas_cumprod())
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()


@pytest.mark.parametrize(
    ("steps", "strength", "exact"),
    [(20, 0.75, False), (30, 0.4, False), (20, 1.0, False), (8, 0.25, False), (10, 0.5, True)],
)
def test_img2img_and_the_hires_pass_are_a1111s_plms(steps, strength, exact):
    # A1111: PLMS over its timesteps 0 to t_enc - 1, on the picture noised to timestep t_enc: t_enc model calls (the
    # warm-up's two, then one a step); in the hires pass (exact) t_enc = steps - 1 on a schedule of steps / strength.
    scheduler, ours_timesteps, counted = picture_pass("PLMS", steps, strength, exact=exact)
    assert isinstance(scheduler, A1111PLMSScheduler)
    t_enc = steps - 1 if exact else int(min(strength, 0.999) * steps)
    timesteps = a1111_timesteps(counted.schedule)
    picture, noise, noised = noised_picture(timesteps[t_enc])
    expected = a1111_plms(eps_model, noised, timesteps[:t_enc], alphas_cumprod())
    assert counted.sampling == len(ours_timesteps) == t_enc
    start = scheduler.add_noise(picture, noise, ours_timesteps[:1])
    assert torch.allclose(start, noised, atol=1e-6)
    ours = run(scheduler, start, ours_timesteps, eps_model)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()


def test_plms_runs_no_step_where_a1111s_runs_none():
    # t_enc = int(0.05 x 20) = 1: A1111's loop over timesteps[:1] has nothing to do.
    assert img2img_steps("PLMS", 20, 0.05) == 0 and img2img_steps("PLMS", 20, 0.1) == 2


def test_a_plms_job_asks_the_unet_at_a1111s_timesteps(micro_engine):
    request = dataclasses.replace(REQUEST, sampler_name="PLMS")
    result, timesteps = unet_timesteps(micro_engine, request)
    assert timesteps == [951, 901, *range(901, 50, -50)]  # 20 calls
    discarded, timesteps = unet_timesteps(
        micro_engine, dataclasses.replace(request, always_discard_penultimate_sigma=True)
    )
    assert len(timesteps) == 22 and timesteps[:3] == [988, 941, 941]
    assert "Discard penultimate sigma: True" in discarded.infotexts[0]
    # img2img: A1111's PLMS from timestep t_enc - 1 = 451 down (10 calls at 0.5 of 20 steps); Always discard
    # respaces it (for 21 steps: 47 apart) and is written.
    picture = dataclasses.replace(request, init_images=[result.images[0]], denoising_strength=0.5)
    assert unet_timesteps(micro_engine, picture)[1] == [451, 401, *range(401, 50, -50)]
    discarded, timesteps = unet_timesteps(
        micro_engine, dataclasses.replace(picture, always_discard_penultimate_sigma=True)
    )
    assert timesteps[:2] == [424, 377] and len(timesteps) == 10
    assert "Discard penultimate sigma: True" in discarded.infotexts[0]


@pytest.mark.parametrize(("sampler", "a1111_sampler"), [("DDIM", a1111_ddim), ("PLMS", a1111_plms)])
def test_a_v_prediction_model_is_a1111s_sampler_on_its_noise_prediction(sampler, a1111_sampler):
    # A1111's CompVisTimestepsVDenoiser turns the model's v into a noise prediction: sqrt(abar) v + sqrt(1 - abar) x.
    abar = alphas_cumprod()

    def v_model(x, t):
        return 0.3 * x * math.sin(t / 500) - 0.2

    def as_eps(x, t):
        return math.sqrt(abar[t]) * v_model(x, t) + math.sqrt(1 - abar[t]) * x

    scheduler = build_scheduler({**SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}, sampler, "Automatic")
    scheduler.set_timesteps(20)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    ours = run(scheduler, start.clone(), scheduler.timesteps, v_model)
    expected = a1111_sampler(as_eps, start.clone(), a1111_timesteps(20), abar)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()
