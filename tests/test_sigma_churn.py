"""A1111's sigma churn on Euler, Heun and DPM2 (s_churn, s_tmin, s_tmax, and s_noise on the churn's noise): the
schedulers step by step against k-diffusion's sample_euler, sample_heun and sample_dpm_2, and the engine's jobs and
infotext."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from engine import GenerationRequest
from engine.errors import InvalidRequestError
from engine.infotext import format_infotext, parse_infotext
from engine.samplers import SigmaChurn, build_scheduler
from tests.test_engine import SD_SCHEDULER_CONFIG


def k_sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """k-diffusion's DiscreteSchedule.sigma_to_t (unquantized)."""
    log_sigma = sigma.log()
    dists = log_sigma - log_sigmas[:, None]
    low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
    w = ((low - log_sigma) / (low - high)).clamp(0, 1)
    return ((1 - w) * low_idx + w * (low_idx + 1)).view(sigma.shape)


def a1111_sampler(sampler, eps_model, x, sigmas, noises, log_sigmas, *, s_churn, s_tmin, s_tmax, s_noise):
    """k-diffusion's sample_euler, sample_heun or sample_dpm_2 at the commit A1111 pins (ab527a9: each step draws its
    noise, used where it churns), with a CompVis eps model: input scaled by 1/sqrt(sigma^2 + 1), timestep
    sigma_to_t."""
    x = x.double()

    def denoise(x, sigma):
        t = k_sigma_to_t(sigma.reshape(1), log_sigmas)
        return x - sigma * eps_model((x / (sigma**2 + 1) ** 0.5).float(), t).double()

    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        eps = noises[i].double() * s_noise
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
        d = (x - denoise(x, sigma_hat)) / sigma_hat
        dt = sigmas[i + 1] - sigma_hat
        if sampler == "Euler" or sigmas[i + 1] == 0:
            x = x + d * dt
        elif sampler == "Heun":
            x_2 = x + d * dt
            d_2 = (x_2 - denoise(x_2, sigmas[i + 1])) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
        else:  # DPM2
            sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = (x_2 - denoise(x_2, sigma_mid)) / sigma_mid
            x = x + d_2 * dt
    return x.float()


def eps_model(latent, timestep):
    return 0.3 * latent * (1 + float(timestep.flatten()[0]) / 1000) + 0.1 * torch.sin(3 * latent)


def run_scheduler(scheduler, x, generators, *, begin: int = 0, copies: int = 2):
    """A pipeline's loop: the batch handed over `copies` times side by side (classifier-free guidance), the
    guided prediction from the first copy."""
    scheduler.noise_generators = generators
    timesteps = scheduler.timesteps[begin:]  # an img2img pipeline takes its slice first
    if begin:
        scheduler.set_begin_index(begin)
    for timestep in timesteps:
        model_input = scheduler.scale_model_input(torch.cat([x] * copies), timestep)
        prediction = eps_model(model_input, timestep).chunk(copies)[0]
        x = scheduler.step(prediction, timestep, x).prev_sample
    return x


@pytest.mark.parametrize("sampler", ["Euler", "Heun", "DPM2"])
@pytest.mark.parametrize(
    ("churn", "s_noise", "begin", "steps"),
    [
        (SigmaChurn(2.0), 1.0, 0, 10),
        # gamma capped at sqrt(2) - 1; the first steps' raised sigmas are above SD's largest: their timesteps are 999
        (SigmaChurn(40.0), 0.8, 0, 20),
        # Only the steps with sigma from 0.5 to 3 churn; the others still draw their noise.
        (SigmaChurn(5.0, s_tmin=0.5, s_tmax=3.0), 1.0, 0, 10),
        (SigmaChurn(2.0), 1.0, 4, 10),  # img2img: gamma counts the 6 steps run (2 / 6, not 2 / 10)
    ],
)
def test_sigma_churn_is_k_diffusions(sampler, churn, s_noise, begin, steps):
    shape = (2, 4, 8, 8)
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, sampler, "Automatic", s_noise=s_noise, churn=churn)
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.double()
    if sampler != "Euler":  # diffusers interleaves the two calls of a step: s0, s1, s1, s2, s2, ..., 0
        sigmas = torch.cat([sigmas[0 : len(scheduler.timesteps) : 2], sigmas.new_zeros(1)])
    start = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * sigmas[begin]
    generators = [torch.Generator().manual_seed(seed) for seed in (11, 12)]
    got = run_scheduler(scheduler, start.clone(), generators, begin=begin * scheduler.order)

    # The churn's noise: each image's own generator, one draw per step run, in order.
    generators = [torch.Generator().manual_seed(seed) for seed in (11, 12)]
    noises = [torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generators]) for _ in range(begin, steps)]
    alphas = torch.tensor(np.asarray(scheduler.alphas_cumprod), dtype=torch.float64)
    log_sigmas = (((1 - alphas) / alphas) ** 0.5).log()
    ranges = dict(s_tmin=churn.s_tmin, s_tmax=churn.s_tmax or math.inf)
    expected = a1111_sampler(
        sampler,
        eps_model,
        start,
        sigmas[begin:],
        noises,
        log_sigmas,
        s_churn=churn.s_churn,
        s_noise=s_noise,
        **ranges,
    )
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    # Without churn, the steps are diffusers' own.
    plain = build_scheduler(SD_SCHEDULER_CONFIG, sampler, "Automatic")
    plain.set_timesteps(steps)
    assert not torch.allclose(run_scheduler(plain, start.clone(), None, begin=begin * plain.order), got, atol=1e-2)


def test_churn_off_is_plain_euler():
    off = build_scheduler(SD_SCHEDULER_CONFIG, "Euler", "Automatic", churn=SigmaChurn(0.0, 0.5, 3.0))
    assert type(off).__name__ == "EulerDiscreteScheduler"
    # Samplers that take no churn here keep their own scheduler.
    other = build_scheduler(SD_SCHEDULER_CONFIG, "LMS", "Automatic", churn=SigmaChurn(1.0))
    assert type(other).__name__ == "LMSDiscreteScheduler"


# Jobs ------------------------------------------------------------------------------------------------------------

REQUEST = GenerationRequest(prompt="a red circle on a blue background", sampler_name="Euler", steps=8, seed=21)


def picture(engine, **fields) -> np.ndarray:
    result = list(engine.generate(dataclasses.replace(REQUEST, **fields)))[-1]
    return np.asarray(result.images[0]), result.infotexts[0]


def test_a_churned_euler_job_is_its_own_reproducible_picture(micro_engine):
    plain, plain_text = picture(micro_engine)
    churned, text = picture(micro_engine, s_churn=2)
    assert not np.array_equal(churned, plain) and np.array_equal(picture(micro_engine, s_churn=2)[0], churned)
    assert "Sigma churn: 2" in text and "Sigma churn" not in plain_text
    # The infotext makes it again, byte for byte.
    assert np.array_equal(picture(micro_engine, **_fields(parse_infotext(text)))[0], churned)
    # Each image of a batch churns with its own seed's noise: the second is that seed's picture alone.
    batch = list(micro_engine.generate(dataclasses.replace(REQUEST, s_churn=2, batch_size=2)))[-1]
    assert np.array_equal(np.asarray(batch.images[1]), picture(micro_engine, s_churn=2, seed=22)[0])
    # The churn's noise comes after the ENSD's reseeding, as A1111 draws it; the infotext then says ENSD.
    ensd, ensd_text = picture(micro_engine, s_churn=2, eta_noise_seed_delta=31337)
    assert not np.array_equal(ensd, churned) and "ENSD: 31337" in ensd_text
    assert np.array_equal(picture(micro_engine, **_fields(parse_infotext(ensd_text)))[0], ensd)
    # Outside tmin..tmax nothing churns: a range above SD's largest sigma is plain Euler.
    above, above_text = picture(micro_engine, s_churn=2, s_tmin=10, s_tmax=12)
    assert np.array_equal(above, plain) and "Sigma tmin: 10, Sigma tmax: 12" in above_text


def _fields(request: GenerationRequest) -> dict:
    names = (
        "prompt",
        "seed",
        "steps",
        "sampler_name",
        "s_churn",
        "s_tmin",
        "s_tmax",
        "s_noise",
        "eta_noise_seed_delta",
    )
    return {name: getattr(request, name) for name in names}


@pytest.mark.parametrize("sampler", ["Heun", "DPM2"])
def test_churned_heun_and_dpm2_jobs_read_back_from_their_infotext(micro_engine, sampler):
    plain, _ = picture(micro_engine, sampler_name=sampler)
    churned, text = picture(micro_engine, sampler_name=sampler, s_churn=2, s_tmin=0.1)
    assert not np.array_equal(churned, plain) and "Sigma churn: 2, Sigma tmin: 0.1" in text
    assert np.array_equal(picture(micro_engine, **_fields(parse_infotext(text)))[0], churned)


def test_churn_runs_in_img2img_and_the_hires_pass(micro_engine, red_circle):
    img2img = dict(init_images=[red_circle], denoising_strength=0.6)
    plain, _ = picture(micro_engine, **img2img)
    churned, text = picture(micro_engine, s_churn=2, **img2img)
    assert not np.array_equal(churned, plain) and "Sigma churn: 2" in text
    hires = dict(enable_hr=True, hr_scale=2, hr_upscaler="Latent", denoising_strength=0.6, hr_sampler_name="Euler")
    first_pass_other = dict(sampler_name="DPM++ 2M", **hires)
    plain, _ = picture(micro_engine, **first_pass_other)
    churned, text = picture(micro_engine, s_churn=2, **first_pass_other)
    assert churned.shape == (128, 128, 3) and not np.array_equal(churned, plain)
    assert "Sigma churn: 2" in text  # the hires pass's Euler ran it


def test_sigma_churn_settings_are_checked_and_other_samplers_do_not_write_them(engine):
    for field, value, allowed in (
        ("s_churn", 101, "0 to 100"),
        ("s_tmin", -1, "0 to 10"),
        ("s_tmax", 1000, "0 to 999"),
    ):
        with pytest.raises(InvalidRequestError) as caught:
            engine.validate(dataclasses.replace(REQUEST, **{field: value}))
        assert caught.value.field == field and allowed in str(caught.value)
    other = engine.validate(dataclasses.replace(REQUEST, sampler_name="Euler a", s_churn=2, s_tmin=1))
    text = format_infotext(other, seed=1)
    assert "Sigma" not in text
