"""A1111's settings that change the schedule a sampler runs on: "Always discard next-to-last sigma", the "Zero Terminal
SNR" noise schedule and "Downcast alphas_cumprod"; and passes whose first sigmas all get the model's last timestep."""

from __future__ import annotations

import dataclasses
import inspect
import math

import diffusers
import numpy as np
import pytest
import torch

from engine import GenerationRequest
from engine.infotext import format_infotext, parse_infotext
from engine.samplers import (
    SAMPLERS,
    ZERO_TERMINAL_ALPHA_BAR,
    NoiseLevels,
    ScheduleShape,
    build_scheduler,
    get_sampler,
    supported_schedules,
)
from tests.test_engine import SD_SCHEDULER_CONFIG
from tests.test_start_noise import K_DIFFUSION

NOT_K_DIFFUSION = ["DEIS", "LCM"]
SCHEDULES = ["Uniform", "Karras", "Exponential", "SGM Uniform", "Beta"]


def schedule(sampler: str, kind: str, steps: int, **options) -> np.ndarray:
    """The sigmas a scheduler steps through, each once (Heun, DPM2 and DPM++ SDE list a step's sigma twice)."""
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, sampler, kind, seed=0, **options)
    scheduler.set_timesteps(steps)
    return np.array(list(dict.fromkeys(round(sigma, 5) for sigma in scheduler.sigmas.tolist())))


@pytest.mark.parametrize(
    ("sampler", "kind"),
    [
        (sampler, kind)
        for sampler in K_DIFFUSION
        for kind in SCHEDULES
        if kind in supported_schedules(get_sampler(sampler))
    ],
)
def test_always_discarding_drops_the_next_to_last_sigma_of_a_schedule_one_step_longer(sampler, kind):
    steps = 10
    discarded = schedule(sampler, kind, steps, always_discard_penultimate_sigma=True)
    if get_sampler(sampler).discard_penultimate_sigma:  # DPM2, DPM2 a, DPM++ 3M SDE: as they always are
        assert np.array_equal(discarded, schedule(sampler, kind, steps))
        return
    longer = schedule(sampler, kind, steps + 1)
    # Still `steps` steps, the last one to 0 from the sigma before the longer schedule's smallest.
    assert len(discarded) == steps + 1
    assert discarded == pytest.approx([*longer[:-2], 0.0], rel=1e-4)


@pytest.mark.parametrize("sampler", ["Euler", "LMS", "DPM++ 2M", "DPM++ SDE", "Heun"])
def test_a_discarded_karras_schedule_is_k_diffusions(sampler):
    # k-diffusion's get_sigmas_karras for steps + 1, its next-to-last sigma dropped (A1111's get_sigmas).
    sigma_min, sigma_max, rho, steps = 0.029168, 14.6146, 7.0, 12
    ramp = np.linspace(0, 1, steps + 1)
    made = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    expected = [*made[:-1], 0.0]
    assert schedule(sampler, "Karras", steps, always_discard_penultimate_sigma=True) == pytest.approx(
        expected, abs=2e-4
    )


@pytest.mark.parametrize("sampler", NOT_K_DIFFUSION)
def test_samplers_that_step_on_their_own_timesteps_keep_them(sampler):
    plain = build_scheduler(SD_SCHEDULER_CONFIG, sampler, "Automatic", seed=0)
    asked = build_scheduler(SD_SCHEDULER_CONFIG, sampler, "Automatic", seed=0, always_discard_penultimate_sigma=True)
    plain.set_timesteps(10)
    asked.set_timesteps(10)
    assert torch.equal(plain.timesteps, asked.timesteps)


REQUEST = GenerationRequest(prompt="a red circle on a blue background", steps=12, seed=7)


def draw(engine, **fields):
    result = list(engine.generate(dataclasses.replace(REQUEST, **fields)))[-1]
    return np.asarray(result.images[0]), result.infotexts[0]


def test_a_job_always_discarding_writes_it_and_reads_it_back(micro_engine):
    plain, plain_text = draw(micro_engine, sampler_name="Euler")
    discarded, text = draw(micro_engine, sampler_name="Euler", always_discard_penultimate_sigma=True)
    assert not np.array_equal(discarded, plain)
    assert "Discard penultimate sigma: True" in text and "Discard penultimate sigma" not in plain_text
    again = parse_infotext(text)
    assert again.always_discard_penultimate_sigma
    assert np.array_equal(draw(micro_engine, sampler_name="Euler", always_discard_penultimate_sigma=True)[0], discarded)
    # As A1111 writes it: only where it changed a sampler (DPM2 always discards; DEIS keeps its timesteps).
    for sampler in ("DPM2", "DEIS"):
        same, text = draw(micro_engine, sampler_name=sampler, always_discard_penultimate_sigma=True)
        assert np.array_equal(same, draw(micro_engine, sampler_name=sampler)[0])
        assert "Discard penultimate sigma" not in text


def test_the_hires_pass_counts_for_writing_the_discard():
    request = GenerationRequest(
        prompt="a cat",
        sampler_name="DEIS",
        enable_hr=True,
        hr_sampler_name="Euler",
        width=64,
        height=64,
        always_discard_penultimate_sigma=True,
    )
    assert "Discard penultimate sigma: True" in format_infotext(request, 1)
    assert "Discard penultimate sigma" not in format_infotext(dataclasses.replace(request, enable_hr=False), 1)


# Zero Terminal SNR and the model's noise levels ------------------------------------------------------------------


def sd_alphas_cumprod() -> torch.Tensor:
    return diffusers.DDPMScheduler.from_config(SD_SCHEDULER_CONFIG).alphas_cumprod.double()


def test_zero_terminal_snr_rescales_the_noise_levels_as_a1111_does():
    original = sd_alphas_cumprod()
    rescaled = NoiseLevels(zero_terminal_snr=True).alphas_cumprod(SD_SCHEDULER_CONFIG)
    # sqrt(alphas_cumprod) shifted so that the last is 0 and scaled so that the first stays; the last then set to
    # A1111's value, not 0, whose sigma would be infinite.
    first, last = original[0].sqrt(), original[-1].sqrt()
    expected = ((original.sqrt() - last) * first / (first - last)) ** 2
    assert rescaled[:-1] == pytest.approx(expected[:-1].tolist(), rel=1e-12)
    assert rescaled[0] == pytest.approx(float(original[0]), rel=1e-12)
    assert float(rescaled[-1]) == ZERO_TERMINAL_ALPHA_BAR
    assert math.sqrt((1 - ZERO_TERMINAL_ALPHA_BAR) / ZERO_TERMINAL_ALPHA_BAR) == pytest.approx(4518.8, abs=0.1)
    assert bool((rescaled[1:] < rescaled[:-1]).all())  # still ever noisier
    assert NoiseLevels().alphas_cumprod(SD_SCHEDULER_CONFIG) == pytest.approx(original.tolist(), rel=1e-12)


@pytest.mark.parametrize("sampler", [spec.name for spec in SAMPLERS])
def test_every_sampler_runs_on_the_jobs_noise_levels(sampler):
    rescaled = NoiseLevels(zero_terminal_snr=True).alphas_cumprod(SD_SCHEDULER_CONFIG)
    scheduler = build_scheduler(
        SD_SCHEDULER_CONFIG, sampler, "Automatic", seed=0, noise_levels=NoiseLevels(zero_terminal_snr=True)
    )
    assert scheduler.alphas_cumprod.double() == pytest.approx(rescaled.tolist(), rel=1e-5)
    if sampler in K_DIFFUSION:  # k-diffusion's schedules start at the largest sigma: nearly pure noise
        scheduler.set_timesteps(10)
        assert float(scheduler.sigmas.max()) == pytest.approx(4518.8, rel=1e-3)
    # A model whose scheduler config asks for zero terminal SNR gets the same, whichever sampler (diffusers' LMS,
    # Heun, DPM2 and DPM++ SDE classes take no such flag and would run on the model's plain noise levels).
    flagged = build_scheduler({**SD_SCHEDULER_CONFIG, "rescale_betas_zero_snr": True}, sampler, "Automatic", seed=0)
    assert flagged.alphas_cumprod.double() == pytest.approx(rescaled.tolist(), rel=1e-5)
    # Downcast: the model's noise levels as half precision holds them.
    downcast = build_scheduler(SD_SCHEDULER_CONFIG, sampler, "Automatic", noise_levels=NoiseLevels(downcast=True))
    halved = sd_alphas_cumprod().half().double()
    assert downcast.alphas_cumprod.double() == pytest.approx(halved.tolist(), rel=1e-5)
    assert not torch.allclose(halved, sd_alphas_cumprod(), rtol=1e-5)


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "DPM2", "DDIM"])
def test_a_zero_terminal_snr_job_runs_writes_it_and_reads_it_back(micro_engine, sampler):
    # The micro model is not trained for it: these pictures are not good ones, only made on the other schedule.
    plain, plain_text = draw(micro_engine, sampler_name=sampler)
    rescaled, text = draw(micro_engine, sampler_name=sampler, noise_schedule="Zero Terminal SNR")
    assert not np.array_equal(rescaled, plain)
    assert "Noise Schedule: Zero Terminal SNR" in text and "Noise Schedule" not in plain_text
    again = parse_infotext(text)
    assert again.noise_schedule == "Zero Terminal SNR"
    assert np.array_equal(draw(micro_engine, sampler_name=sampler, noise_schedule=again.noise_schedule)[0], rescaled)


def test_a_model_that_asks_for_zero_terminal_snr_writes_it():
    request = GenerationRequest(prompt="a cat", width=64, height=64)
    assert "Noise Schedule: Zero Terminal SNR" in format_infotext(request, 1, zero_terminal_snr_model=True)
    assert "Noise Schedule" not in format_infotext(request, 1)


def test_a_downcast_job_writes_it_and_reads_it_back(micro_engine):
    plain, plain_text = draw(micro_engine, sampler_name="DPM++ 2M")
    downcast, text = draw(micro_engine, sampler_name="DPM++ 2M", downcast_alphas_cumprod=True)
    assert "Downcast alphas_cumprod: True" in text and "Downcast" not in plain_text
    assert parse_infotext(text).downcast_alphas_cumprod
    # Rounding moves the noise levels by under 0.1%: the picture stays close to the plain one.
    assert np.abs(downcast.astype(int) - plain.astype(int)).mean() < 2


# Passes that start above the model's largest sigma -----------------------------------------------------------------


@pytest.mark.parametrize("sampler", K_DIFFUSION)
@pytest.mark.parametrize(
    "options",
    [
        {"schedule_shape": ScheduleShape(sigma_max=60.0)},  # A1111's schedule max sigma goes to 60
        {"noise_levels": NoiseLevels(zero_terminal_snr=True)},
    ],
    ids=["sigma max 60", "zero terminal SNR"],
)
def test_a_pass_whose_first_sigmas_share_the_last_timestep_runs_every_step_once(sampler, options):
    kind = "Karras" if "Karras" in supported_schedules(get_sampler(sampler)) else "Automatic"
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, sampler, kind, seed=0, **options)
    scheduler.set_timesteps(10)
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    drawing = {"generator": torch.Generator()} if "generator" in inspect.signature(scheduler.step).parameters else {}
    visited = []
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, timestep)
        step = scheduler.step(torch.zeros_like(model_input), timestep, sample, **drawing)
        visited.append(scheduler.step_index - 1)
        sample = step.prev_sample
    # diffusers would find the first step by its timestep, start at the second and run past the end.
    assert visited == list(range(len(scheduler.timesteps)))
    assert torch.isfinite(sample).all()


def test_the_page_settings_belong_to_one_session(micro_engine):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from tests.test_browser import serve_page

    demo, url = serve_page(micro_engine, None)
    try:
        user_a, user_b = Client(url, verbose=False), Client(url, verbose=False)
        user_a.predict("Zero Terminal SNR", api_name="/set_noise_schedule")
        user_a.predict(True, api_name="/set_always_discard_penultimate_sigma")
        user_a.predict(True, api_name="/set_downcast_alphas_cumprod")
        args = ("a red circle on a blue background", "", "Euler", "Automatic", 6, 7.0, 21, 64, 64, 1, 1)
        infotext = user_a.predict(*args, api_name="/txt2img")[3]
        for written in (
            "Noise Schedule: Zero Terminal SNR",
            "Discard penultimate sigma: True",
            "Downcast alphas_cumprod",
        ):
            assert written in infotext
        other = user_b.predict(*args, api_name="/txt2img")[3]
        assert "Noise Schedule" not in other and "Discard" not in other and "Downcast" not in other
        with pytest.raises(AppError, match="choices|allowed"):
            user_a.predict("Cosine", api_name="/set_noise_schedule")
    finally:
        demo.close()


def test_ngms_measures_its_sigma_on_the_jobs_noise_levels(micro_engine, monkeypatch):
    import engine.generate

    seen = []
    original = engine.generate.NegativeGuidanceSkip

    def recording(threshold, every_call, alphas_cumprod, **rest):
        seen.append(alphas_cumprod)
        return original(threshold, every_call, alphas_cumprod, **rest)

    monkeypatch.setattr(engine.generate, "NegativeGuidanceSkip", recording)
    draw(micro_engine, sampler_name="Euler", s_min_uncond=2.0, noise_schedule="Zero Terminal SNR")
    config = micro_engine.loaded.scheduler_config
    expected = NoiseLevels(zero_terminal_snr=True).alphas_cumprod(config)
    assert len(seen) == 1 and torch.equal(seen[0], expected)
