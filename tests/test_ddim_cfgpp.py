"""A1111's DDIM CFG++ (sd_samplers_timesteps_impl.ddim_cfgpp): A1111's DDIM whose steps take pred_x0 from the
prediction guided at CFG scale / 12.5 and head on along the negative prompt's noise prediction. Checked against
A1111's algorithm written out: the scheduler alone (eta, img2img, v-prediction), and whole jobs on the micro model
call by call, from the UNet's own outputs (CFG 7, CFG 1, NGMS, AND)."""

from __future__ import annotations

import dataclasses
import math

import diffusers
import numpy as np
import pytest
import torch

from engine import GenerationRequest, InvalidRequestError
from engine.infotext import parse_infotext
from engine.samplers import A1111DDIMCFGppScheduler, build_scheduler, pass_steps, resolve
from tests.test_ddim import (
    SHAPE,
    a1111_timesteps,
    alphas_cumprod,
    ddim_parameters,
    draws,
    noised_picture,
    picture_pass,
)
from tests.test_engine import SD_SCHEDULER_CONFIG
from tests.test_pad_conds import unet_calls

CFGPP_DIVISOR = 12.5  # A1111's cond_scale_miltiplier is 1 / 12.5


def a1111_ddim_cfgpp(predictions, x, timesteps, alphas_cumprod, cfg_scale, eta=0.0, noises=None):
    """sd_samplers_timesteps_impl.ddim_cfgpp with its CFGDenoiser: `predictions(x, t)` is (the negative's noise
    prediction, the prompt's); the noise it draws is handed in."""
    alphas, alphas_prev, sigmas = ddim_parameters(timesteps, alphas_cumprod, eta)
    noises = iter(noises or [])
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        uncond, cond = predictions(x, int(timesteps[index]))
        e_t = uncond + (cond - uncond) * (cfg_scale / CFGPP_DIVISOR)  # combine_denoised at cond_scale / 12.5
        a_t, a_prev, sigma_t = alphas[index].item(), alphas_prev[index].item(), float(sigmas[index])
        pred_x0 = (x - math.sqrt(1 - a_t) * e_t) / math.sqrt(a_t)
        dir_xt = math.sqrt(1.0 - a_prev - sigma_t**2) * uncond  # last_noise_uncond
        x = math.sqrt(a_prev) * pred_x0 + dir_xt + (sigma_t * next(noises) if sigma_t else 0)
    return x


def predictions(x, t):
    """Smooth stand-ins for a UNet's noise predictions, (negative, prompt), apart from each other."""
    return 0.9 * x * math.cos(t / 700) + 0.1 * math.sin(t / 90), 0.8 * x * math.cos(t / 600) - 0.2 * math.cos(t / 70)


def run_cfgpp(scheduler, x, timesteps, cfg_scale, model=predictions, eta=0.0, noises=None):
    """`scheduler` stepped as a pipeline runs it through CFGppUNet: guided at cfg_scale / 12.5, and handed the
    negative's prediction before each step."""
    noises = iter(noises or [])
    for timestep in timesteps:
        negative, prompt = model(x, int(timestep))
        scheduler.negative_prediction = negative
        guided = negative + (prompt - negative) * (cfg_scale / CFGPP_DIVISOR)
        drawn = {"eta": eta, "variance_noise": next(noises)} if eta else {}
        x = scheduler.step(guided, timestep, x, **drawn).prev_sample
    return x


@pytest.mark.parametrize(("steps", "eta", "cfg_scale"), [(20, 0.0, 7.0), (7, 0.5, 12.0), (30, 1.0, 1.0)])
def test_txt2img_is_a1111s_ddim_cfgpp(steps, eta, cfg_scale):
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, "DDIM CFG++", "Automatic", seed=0)
    assert isinstance(scheduler, A1111DDIMCFGppScheduler)
    scheduler.set_timesteps(steps)
    timesteps = a1111_timesteps(steps)
    # DDIM's timesteps and count: at 20 steps 19 model calls, 951 to 51.
    assert scheduler.timesteps.tolist() == timesteps[1:].flip(0).tolist()
    assert (
        len(scheduler.timesteps)
        == pass_steps("DDIM CFG++", "Automatic", steps)
        == pass_steps("DDIM", "Automatic", steps)
    )
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    noises = draws(len(timesteps))
    ours = run_cfgpp(scheduler, start.clone(), scheduler.timesteps, cfg_scale, eta=eta, noises=noises)
    expected = a1111_ddim_cfgpp(predictions, start.clone(), timesteps, alphas_cumprod(), cfg_scale, eta, noises)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()
    # Not DDIM's: the direction is the negative's.
    ddim = build_scheduler(SD_SCHEDULER_CONFIG, "DDIM", "Automatic", seed=0)
    ddim.set_timesteps(steps)
    assert not torch.allclose(run_cfgpp(ddim, start.clone(), ddim.timesteps, cfg_scale, eta=eta, noises=noises), ours)


def test_img2img_is_a1111s_ddim_cfgpp():
    steps, strength = 20, 0.75
    timesteps = a1111_timesteps(steps)
    t_enc = int(strength * steps)
    picture, noise, noised = noised_picture(timesteps[t_enc])
    expected = a1111_ddim_cfgpp(predictions, noised, timesteps[:t_enc], alphas_cumprod(), 7.0)
    scheduler, ours_timesteps, counted = picture_pass("DDIM CFG++", steps, strength)
    assert counted.sampling == t_enc - 1
    start = scheduler.add_noise(picture, noise, ours_timesteps[:1])
    ours = run_cfgpp(scheduler, start, ours_timesteps, 7.0)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()


def test_a_v_prediction_model_steps_along_the_negatives_noise_prediction():
    abar = alphas_cumprod()

    def v_predictions(x, t):
        return 0.3 * x * math.sin(t / 500) - 0.2, 0.25 * x * math.sin(t / 400) + 0.1

    def as_eps(x, t):  # CompVisTimestepsVDenoiser: sqrt(abar) v + sqrt(1 - abar) x, for each of them
        return tuple(math.sqrt(abar[t]) * v + math.sqrt(1 - abar[t]) * x for v in v_predictions(x, t))

    scheduler = build_scheduler({**SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}, "DDIM CFG++", "Automatic")
    scheduler.set_timesteps(20)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    ours = run_cfgpp(scheduler, start.clone(), scheduler.timesteps, 7.0, model=v_predictions)
    expected = a1111_ddim_cfgpp(as_eps, start.clone(), a1111_timesteps(20), abar, 7.0)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()


def test_it_steps_on_a1111s_timesteps_only():
    assert resolve("ddim_cfgpp", "") == ("DDIM CFG++", "Automatic")
    assert resolve("DDIM CFG++", "uniform") == ("DDIM CFG++", "Uniform")
    with pytest.raises(InvalidRequestError) as refused:
        resolve("DDIM CFG++", "Karras")
    assert refused.value.field == "scheduler"
    assert "for sampler DDIM CFG++: Automatic, Uniform (it steps on A1111's own timesteps)" in str(refused.value)


# Whole jobs --------------------------------------------------------------------------------------------------------

REQUEST = GenerationRequest(
    prompt="a red circle on a blue background", steps=20, seed=7, sampler_name="DDIM CFG++", cfg_scale=7
)


def unet_inputs_and_outputs(engine, request: GenerationRequest):
    """The job's result, and (latents, timestep, output) of each call of the UNet itself (inside every stand-in)."""
    calls = []

    def record(_module, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        output = output[0] if isinstance(output, tuple) else output.sample
        calls.append((sample.detach().clone(), int(timestep.flatten()[0]), output.detach().clone()))

    handle = engine.loaded.components["unet"].register_forward_hook(record, with_kwargs=True)
    try:
        result = list(engine.generate(request))[-1]
    finally:
        handle.remove()
    return result, calls


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"cfg_scale": 1.0},  # still guided, at 1 / 12.5, as A1111 does: the pipeline asks for the negative
        {"cfg_scale": 12.0, "s_min_uncond": 15.0},  # NGMS: every other call without the negative
        {"prompt": "a red circle AND a blue background"},
    ],
    ids=["cfg 7", "cfg 1", "ngms", "AND"],
)
def test_a_job_steps_as_a1111s_ddim_cfgpp_from_the_unets_own_predictions(micro_engine, changes):
    """Each step, replayed with A1111's formula from the latents and the UNet's outputs of one call, lands on the
    latents of the next call. Skipped negatives (NGMS) are the prompt's prediction, as A1111 takes them; with AND the
    guidance is each part's, at its weight, times CFG scale / 12.5."""
    request = dataclasses.replace(REQUEST, **changes)
    result, calls = unet_inputs_and_outputs(micro_engine, request)
    assert [t for _, t, _ in calls] == list(range(951, 50, -50))
    abar = diffusers.DDPMScheduler.from_config(micro_engine.loaded.scheduler_config).alphas_cumprod
    skipped = 0
    for (sample, t, output), (next_sample, t_next, _) in zip(calls, calls[1:], strict=False):
        x = sample[-1:].double()
        rows = output.double().split(1)
        if len(rows) == 1:  # the negative skipped: the prompt's prediction stands in for it
            skipped += 1
            uncond = guidance = rows[0]
        else:
            uncond = rows[0]
            guidance = uncond + sum(row - uncond for row in rows[1:])
        e_t = uncond + (guidance - uncond) * (request.cfg_scale / CFGPP_DIVISOR)
        pred_x0 = (x - math.sqrt(1 - abar[t]) * e_t) / math.sqrt(abar[t])
        expected = math.sqrt(abar[t_next]) * pred_x0 + math.sqrt(1 - abar[t_next]) * uncond
        assert torch.allclose(next_sample[-1:].double(), expected, atol=2e-4), (t, (next_sample - expected).abs().max())
    assert skipped == (9 if "s_min_uncond" in changes else 0)
    assert "Sampler: DDIM CFG++" in result.infotexts[0]


def test_the_infotext_names_it_with_its_eta_and_brings_the_same_picture_back(micro_engine):
    result = list(micro_engine.generate(dataclasses.replace(REQUEST, eta=0.4)))[-1]
    assert "Sampler: DDIM CFG++," in result.infotexts[0] and "Eta DDIM: 0.4," in result.infotexts[0]
    again = parse_infotext(result.infotexts[0])
    assert (again.sampler_name, again.eta) == ("DDIM CFG++", 0.4)
    back = list(micro_engine.generate(again))[-1]
    assert np.array_equal(np.asarray(back.images[0]), np.asarray(result.images[0]))
    plain = list(micro_engine.generate(dataclasses.replace(REQUEST, eta=0.4, sampler_name="DDIM")))[-1]
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(result.images[0]))


def test_each_hires_pass_guides_as_its_own_sampler_does(micro_engine):
    """At CFG 1 Euler runs the prompt alone (one row a call) while DDIM CFG++ still asks for the negative (two)."""
    request = dataclasses.replace(
        REQUEST, cfg_scale=1.0, steps=6, enable_hr=True, hr_scale=1.5, denoising_strength=0.5, sampler_name="Euler"
    )
    _, calls = unet_calls(micro_engine, dataclasses.replace(request, hr_sampler_name="DDIM CFG++"), _rows_and_size)
    assert set(calls) == {(1, (16, 16)), (2, (24, 24))}
    _, calls = unet_calls(
        micro_engine, dataclasses.replace(request, sampler_name="DDIM CFG++", hr_sampler_name="Euler"), _rows_and_size
    )
    assert set(calls) == {(2, (16, 16)), (1, (24, 24))}


def _rows_and_size(args, kwargs) -> tuple[int, tuple[int, ...]]:
    sample = args[0] if args else kwargs["sample"]
    return int(sample.shape[0]), tuple(sample.shape[2:])
