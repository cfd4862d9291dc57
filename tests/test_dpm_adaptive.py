"""A1111's DPM adaptive (k-diffusion's sample_dpm_adaptive), checked call by call against the algorithm written out
here, and on the micro model: whole jobs replayed from the UNet's own predictions, its progress, prompt editing and
the infotext."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from engine import GenerationRequest
from engine.events import Progress
from engine.infotext import parse_infotext_params
from engine.samplers import ADAPTIVE_MAX_CALLS, build_scheduler, get_sampler
from tests.test_ddim import picture_pass
from tests.test_dpm_fast import (
    compvis_log_sigmas,
    counted_eps,
    schedule_ends,
    sigma,
    written_read_back_and_moved_by_ensd,
)
from tests.test_engine import SD_SCHEDULER_CONFIG, stand_in_eps, stepped_over_stand_in


class IntegralController:
    """k-diffusion's PIDStepSizeController as sample_dpm_adaptive makes it by default (pcoeff 0, icoeff 1, dcoeff 0)."""

    def __init__(self, h, order):
        self.h, self.b1, self.b2, self.b3, self.errs = h, 1 / order, -0.0 / order, 0.0 / order, []

    def propose_step(self, error) -> bool:
        inv_error = 1 / (float(error) + 1e-8)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= 0.81
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


def a1111_dpm_adaptive(eps_model, x, sigma_min, sigma_max, eta, noises):
    """k-diffusion's sample_dpm_adaptive as A1111 calls it (its defaults but eta; noise from the generator): the
    result, the sigma of each model call, and (steps taken, refused)."""
    fresh, calls = iter(noises), []
    eps = counted_eps(eps_model, calls)
    t_start, t_end = -torch.tensor(float(sigma_max)).log(), -torch.tensor(float(sigma_min)).log()
    atol, rtol = torch.tensor(0.0078), torch.tensor(0.05)
    s, x_prev, taken, refused = t_start, x, 0, 0
    pid = IntegralController(0.05, 1.5 if eta else 3)
    while s < t_end - 1e-5:
        t = torch.minimum(t_end, s + pid.h)
        if eta:
            sigma_up = min(sigma(t), eta * (sigma(t) ** 2 * (sigma(s) ** 2 - sigma(t) ** 2) / sigma(s) ** 2) ** 0.5)
            t_ = torch.minimum(t_end, -((sigma(t) ** 2 - sigma_up**2) ** 0.5).log())
            su = (sigma(t) ** 2 - sigma(t_) ** 2) ** 0.5
        else:
            t_, su = t, 0.0
        h = t_ - s
        r1, r2 = 1 / 3, 2 / 3
        s1, s2 = s + r1 * h, s + r2 * h
        e = eps(x, s)
        u1 = x - sigma(s1) * (r1 * h).expm1() * e
        e1 = eps(u1, s1)
        u2 = x - sigma(s2) * (r2 * h).expm1() * e - sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (e1 - e)
        e2 = eps(u2, s2)
        x_low = x - sigma(t_) * h.expm1() * e - sigma(t_) / (2 * r1) * h.expm1() * (e1 - e)
        x_high = x - sigma(t_) * h.expm1() * e - sigma(t_) / r2 * (h.expm1() / h - 1) * (e2 - e)
        delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        if pid.propose_step(error):
            x_prev, x, s, taken = x_low, x_high + (su * next(fresh) if eta else 0), t, taken + 1
        else:
            refused += 1
    return x, calls, (taken, refused)


def generator_draws(shape, count: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """What a generator seeded 5 draws: the starting noise, then `count` more."""
    generator = torch.Generator().manual_seed(5)
    return torch.randn(shape, generator=generator), [torch.randn(shape, generator=generator) for _ in range(count)]


def adaptive_pass(scheduler, latent, timesteps):
    """`latent` stepped over stand_in_eps as a pipeline steps it (its step noise from a generator seeded 5 that has
    drawn the starting noise), with the sigma of each call the scheduler made."""
    generator = torch.Generator().manual_seed(5)
    torch.randn(latent.shape, generator=generator)
    sigmas = []
    original_scale = scheduler.scale_model_input

    def scale(sample, timestep):
        sigmas.append(scheduler._next_call_sigma())
        return original_scale(sample, timestep)

    scheduler.scale_model_input = scale
    return stepped_over_stand_in(scheduler, latent, timesteps, generator), sigmas


SHAPE = (1, 4, 8, 8)


@pytest.mark.parametrize(("schedule", "eta"), [("Automatic", 1.0), ("Automatic", 0.0), ("Karras", 0.5)])
def test_dpm_adaptive_samples_as_a1111s(schedule, eta):
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, "DPM adaptive", schedule, eta=eta)
    scheduler.set_timesteps(20)
    assert len(scheduler.timesteps) == ADAPTIVE_MAX_CALLS
    noise, noises = generator_draws(SHAPE, 200)
    latent, sigmas = adaptive_pass(scheduler, noise * scheduler.init_noise_sigma, scheduler.timesteps)
    sigma_max, sigma_min = schedule_ends(schedule, 20)
    expected, calls, (taken, refused) = a1111_dpm_adaptive(
        stand_in_eps, noise * sigma_max, sigma_min, sigma_max, eta, noises
    )
    assert scheduler.finished and scheduler.calls_made == len(calls) == 3 * (taken + refused)
    assert (scheduler.steps_taken, scheduler.steps_refused) == (taken, refused)
    assert len(calls) != 20  # it sizes its own steps
    if eta == 1.0:
        assert refused > 0  # and tries a refused one again, smaller, from the same start
    assert torch.allclose(torch.stack(sigmas), torch.stack(calls), rtol=1e-5)
    assert torch.allclose(latent, expected, atol=1e-4), (latent - expected).abs().max()


def test_dpm_adaptive_from_a_picture_runs_between_the_ends_of_a1111s_sigma_sched():
    steps, strength = 20, 0.6
    scheduler, timesteps, counted = picture_pass("DPM adaptive", steps, strength)
    assert counted.sampling == 13 and len(timesteps) == ADAPTIVE_MAX_CALLS
    picture = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    latent, sigmas = adaptive_pass(scheduler, scheduler.add_noise(picture, noise, timesteps[:1]), timesteps)
    made = build_scheduler(SD_SCHEDULER_CONFIG, "Euler", "Automatic")
    made.set_timesteps(steps)
    sigma_sched = made.sigmas.float()[steps - counted.sampling :]
    _, noises = generator_draws(SHAPE, 200)
    expected, calls, _ = a1111_dpm_adaptive(
        stand_in_eps, picture + noise * sigma_sched[0], sigma_sched[-2], sigma_sched[0], 1.0, noises
    )
    assert torch.allclose(torch.stack(sigmas), torch.stack(calls), rtol=1e-5)
    assert torch.allclose(latent, expected, atol=1e-4), (latent - expected).abs().max()


def test_a_pass_from_a_picture_below_one_step_of_strength_takes_no_step():
    """At strength 0.04 of 20 steps A1111's t_enc is 0: DPM adaptive gets the schedule's last sigma above 0 as both
    its ends, and k-diffusion's loop gives back the noised picture without a step (stepping would divide by a step
    of 0: NaN values)."""
    scheduler, timesteps, counted = picture_pass("DPM adaptive", 20, 0.04)
    assert counted.sampling == 1 and scheduler.finished and scheduler.estimated_calls() == 1
    picture = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    noised = scheduler.add_noise(picture, noise, timesteps[:1])
    model_output = stand_in_eps(scheduler.scale_model_input(noised, timesteps[0]), timesteps[0])
    assert torch.equal(scheduler.step(model_output, timesteps[0], noised).prev_sample, noised)
    made = build_scheduler(SD_SCHEDULER_CONFIG, "Euler", "Automatic")
    made.set_timesteps(20)
    last = made.sigmas.float()[-2]
    expected, calls, _ = a1111_dpm_adaptive(stand_in_eps, picture + noise * last, last, last, 1.0, [])
    assert not calls and torch.allclose(noised, expected, atol=1e-6)


def test_a_pipeline_that_copies_the_timesteps_is_refused():
    """Each call's timestep is written into the loop as the step before it chooses it: a loop over a copy would ask
    the model somewhere else, and the step says so instead of taking it."""
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, "DPM adaptive", "Automatic")
    scheduler.set_timesteps(20)
    with pytest.raises(RuntimeError, match="pipeline asked at nan"):
        stepped_over_stand_in(scheduler, torch.randn(SHAPE), scheduler.timesteps.clone(), None)


# Whole jobs --------------------------------------------------------------------------------------------------------

REQUEST = GenerationRequest(
    prompt="a red circle on a blue background", steps=20, seed=7, sampler_name="DPM adaptive", eta=0.0
)


def unet_inputs_and_outputs(engine, request: GenerationRequest):
    """The job's events, and (input, timestep, output, prompt conditioning) of each call of the UNet."""
    calls = []

    def record(_module, args, kwargs, output):
        states = kwargs["encoder_hidden_states"]
        output = output[0] if isinstance(output, tuple) else output.sample
        calls.append((args[0].clone(), float(args[1].flatten()[0]), output.clone(), states[-1].clone()))

    handle = engine.loaded.components["unet"].register_forward_hook(record, with_kwargs=True)
    try:
        events = list(engine.generate(request))
    finally:
        handle.remove()
    return events, calls


def test_a_job_steps_as_a1111s_dpm_adaptive_from_the_unets_own_predictions(micro_engine):
    """The algorithm written out, fed the UNet's guided predictions call by call, asks for the same inputs at the
    same timesteps as the job did, and ends on the job's latents; the progress counts the calls and ends at their
    number."""
    events, calls = unet_inputs_and_outputs(micro_engine, REQUEST)
    log_sigmas = compvis_log_sigmas()
    replayed = iter(calls)

    def guided_eps(model_input, timestep):
        recorded_input, recorded_timestep, output, _ = next(replayed)
        assert recorded_timestep == pytest.approx(float(timestep), abs=1e-3)
        assert torch.allclose(recorded_input[0:1], model_input, atol=1e-4)
        negative, positive = output[0:1], output[1:2]
        return negative + 7 * (positive - negative)

    sigma_max, sigma_min = torch.exp(log_sigmas[-1]), torch.exp(log_sigmas[0])
    first_input, first_timestep, _, _ = calls[0]
    start = first_input[0:1] * (sigma_max**2 + 1).sqrt()
    assert first_timestep == pytest.approx(999, abs=1e-3)
    _, made, (taken, refused) = a1111_dpm_adaptive(guided_eps, start, sigma_min, sigma_max, 0.0, [])
    assert len(made) == len(calls) == 3 * (taken + refused) and len(calls) != REQUEST.steps
    progress = [event for event in events if isinstance(event, Progress)]
    assert [event.step for event in progress] == list(range(1, len(calls) + 1))
    assert progress[-1].total == len(calls) and all(event.total > event.step for event in progress[:-1])


def test_prompt_editing_switches_at_the_call_of_its_step(micro_engine):
    """A1111 counts DPM adaptive's steps by its model calls: [red:blue:5] holds red up to step 5 and takes blue from
    the seventh call on, as Euler's seventh step does."""
    request = dataclasses.replace(REQUEST, prompt="a [red:blue:5] circle on a white background")
    for sampler in ("DPM adaptive", "Euler"):
        _, calls = unet_inputs_and_outputs(micro_engine, dataclasses.replace(request, sampler_name=sampler))
        states = [prompt_states for _, _, _, prompt_states in calls]
        changes = [index for index in range(1, len(states)) if not torch.equal(states[index], states[index - 1])]
        assert changes == [6], sampler


def test_dpm_adaptive_on_the_micro_model_is_written_and_read_back(micro_engine):
    spec = get_sampler("k_dpm_ad")  # A1111's alias
    assert spec.name == "DPM adaptive" and spec.eta_default == 1.0 and spec.uses_ensd and not spec.takes_s_noise
    result = written_read_back_and_moved_by_ensd(micro_engine, dataclasses.replace(REQUEST, eta=None))
    # The picture is the prompt's: a red shape on a blue background.
    pixels = np.asarray(result.images[0].convert("RGB")).astype(int)
    corner, middle = pixels[2, 2], np.median(pixels.reshape(-1, 3), axis=0)
    assert corner[2] > 150 and corner[0] < 100
    red = (pixels[..., 0] > 150) & (pixels[..., 2] < 100)
    assert red.mean() > 0.1 and middle[2] > 150


def test_dpm_adaptive_runs_img2img_and_a_hires_pass(micro_engine, red_circle):
    """From a picture it runs between the ends of the pass's schedule; as the hires sampler, after another first
    pass, its progress goes on from that pass's steps."""
    recoloured = list(
        micro_engine.generate(
            dataclasses.replace(
                REQUEST,
                prompt="a blue circle on a white background",
                init_images=[red_circle],
                denoising_strength=0.75,
            )
        )
    )[-1]
    pixels = np.asarray(recoloured.images[0].convert("RGB")).astype(int)
    blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 100)
    assert blue.mean() > 0.1
    hires = dataclasses.replace(
        REQUEST, sampler_name="Euler", enable_hr=True, hr_scale=2, hr_sampler_name="DPM adaptive", steps=8
    )
    events = list(micro_engine.generate(hires))
    progress = [event for event in events if isinstance(event, Progress)]
    steps = [event.step for event in progress]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 8
    assert progress[7].step == 8 and progress[-1].total == len(steps)
    assert events[-1].images[0].size == (128, 128)
    assert parse_infotext_params(events[-1].infotexts[0])["Hires sampler"] == "DPM adaptive"
    # As the first pass, its calls are followed by the hires pass's steps, and the total says so once it is done.
    first = dataclasses.replace(hires, sampler_name="DPM adaptive", hr_sampler_name="Euler")
    progress = [event for event in micro_engine.generate(first) if isinstance(event, Progress)]
    calls = len(progress) - 8
    assert [event.step for event in progress] == list(range(1, calls + 9))
    assert progress[calls - 1].total == calls + 8 == progress[-1].total
    # Below one step of strength the pass takes no step: the picture comes back through the VAE, in one model call.
    events = list(
        micro_engine.generate(dataclasses.replace(REQUEST, init_images=[red_circle], denoising_strength=0.01))
    )
    assert [(event.step, event.total) for event in events if isinstance(event, Progress)] == [(1, 1)]
    returned = np.asarray(events[-1].images[0].convert("RGB")).astype(int)
    assert np.abs(returned - np.asarray(red_circle.convert("RGB")).astype(int)).mean() < 5
