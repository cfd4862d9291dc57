"""A1111's schedule types that diffusers has no flag for (Polyexponential, KL Optimal, Align Your Steps, Simple,
Normal), and its schedule min sigma, max sigma and rho (its sigma_min, sigma_max and rho settings): where the
schedules start and end, and the Karras and Polyexponential curves. Checked on the schedules against k-diffusion's
and A1111's formulas, on the UNet's first call, on the micro model's pictures, and through the infotext, the API,
the page and Compare."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from engine import GenerationRequest, InvalidRequestError, Result
from engine.compare import parse_axis, plan_grid
from engine.infotext import parse_infotext, parse_infotext_params
from engine.samplers import (
    ALIGN_YOUR_STEPS,
    SAMPLERS,
    ScheduleShape,
    build_scheduler,
    supported_schedules,
    takes_schedule_range,
)
from tests.test_api import api, ok, server  # noqa: F401 - fixtures
from tests.test_engine import SD_SCHEDULER_CONFIG
from tests.test_ngms import RowsPerCall, sd_alphas, sd_schedule
from tests.test_page_client import _client, outputs_dir, page_url  # noqa: F401 - fixtures

PROMPT = dict(prompt="a red circle on a blue background", seed=5, steps=8)
# SD's own sigma range, which the schedules span unless told otherwise.
SD_SIGMA_MIN, SD_SIGMA_MAX = 0.029168, 14.6146


def karras(steps: int, lowest: float, highest: float, rho: float = 7.0) -> list[float]:
    """k-diffusion's get_sigmas_karras, without its final 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    return ((highest ** (1 / rho) + ramp * (lowest ** (1 / rho) - highest ** (1 / rho))) ** rho).tolist()


def exponential(steps: int, lowest: float, highest: float) -> list[float]:
    """k-diffusion's get_sigmas_exponential, without its final 0."""
    return torch.linspace(math.log(highest), math.log(lowest), steps, dtype=torch.float64).exp().tolist()


def distinct_sigmas(
    sampler: str, schedule: str, schedule_range=(0.0, 0.0, 0.0), steps: int = 10, family: str = ""
) -> list[float]:
    shape = ScheduleShape(*schedule_range)
    scheduler = build_scheduler(
        SD_SCHEDULER_CONFIG, sampler, schedule, seed=0, schedule_shape=shape, model_family=family
    )
    scheduler.set_timesteps(steps)
    # Second-order schedulers list a sigma twice; DEIS and DPM++ SDE end on the smallest one twice.
    return list(dict.fromkeys(round(sigma, 5) for sigma in scheduler.sigmas.tolist() if sigma > 0))


@pytest.mark.parametrize(
    ("sampler", "schedule"),
    [
        ("DPM++ 2M", "Karras"),
        ("Euler", "Karras"),
        ("LMS", "Karras"),  # diffusers reads its step count itself
        ("DPM++ SDE", "Karras"),
        ("Heun", "Exponential"),
        ("UniPC", "Exponential"),
        ("DPM++ 2M SDE", "Karras"),
    ],
)
def test_the_schedule_spans_the_sigmas_asked_for_with_the_rho_asked_for(sampler, schedule):
    made = exponential if schedule == "Exponential" else karras
    assert distinct_sigmas(sampler, schedule) == pytest.approx(made(10, SD_SIGMA_MIN, SD_SIGMA_MAX), abs=2e-4)
    assert distinct_sigmas(sampler, schedule, (0.1, 10, 0)) == pytest.approx(made(10, 0.1, 10), abs=2e-4)
    # One end alone leaves the other the model's.
    assert distinct_sigmas(sampler, schedule, (0, 5, 0)) == pytest.approx(made(10, SD_SIGMA_MIN, 5), abs=2e-4)
    if schedule == "Karras":
        expected = karras(10, 0.2, SD_SIGMA_MAX, rho=3)
        assert distinct_sigmas(sampler, schedule, (0.2, 0, 3)) == pytest.approx(expected, abs=2e-4)


def test_dpm2_still_drops_the_next_to_last_sigma_of_the_schedule_asked_for():
    # A1111 makes DPM2's schedule for one step more with the asked-for ends and rho, then drops the smallest sigma.
    expected = karras(11, 0.1, 10, rho=5)[:-1]
    assert distinct_sigmas("DPM2", "Karras", (0.1, 10, 5)) == pytest.approx(expected, abs=2e-4)


def test_beta_and_sgm_uniform_take_the_ends_and_uniform_takes_nothing():
    beta = distinct_sigmas("Euler", "Beta", (0.1, 10, 0))
    assert beta[0] == pytest.approx(10) and beta[-1] == pytest.approx(0.1)
    # rho shapes Karras and Polyexponential only, as in A1111.
    assert distinct_sigmas("Euler", "Beta", (0, 0, 3)) == distinct_sigmas("Euler", "Beta")
    assert distinct_sigmas("Euler", "Exponential", (0, 0, 3)) == distinct_sigmas("Euler", "Exponential")
    # SGM Uniform: A1111's evenly spaced timesteps from the max sigma's, one over, the last dropped.
    sigmas = model_sigmas()
    log_sigmas, positions = sigmas.log().numpy(), np.arange(len(sigmas))
    start, end = (float(np.interp(math.log(sigma), log_sigmas, positions)) for sigma in (10, 0.1))
    timesteps = np.linspace(start, end, 11)[:-1]
    expected = np.exp(np.interp(timesteps, positions, log_sigmas)).tolist()
    assert distinct_sigmas("Euler", "SGM Uniform", (0.1, 10, 0)) == pytest.approx(expected, abs=2e-4)
    # Samplers that make no Karras sigmas keep diffusers' SGM Uniform, whose ends are the model's.
    assert takes_schedule_range("Euler", "SGM Uniform") and not takes_schedule_range("Euler a", "SGM Uniform")
    # Uniform is the model's own timesteps, as A1111's is.
    assert distinct_sigmas("Euler", "Uniform", (0.1, 10, 3)) == distinct_sigmas("Euler", "Uniform")


def model_sigmas() -> torch.Tensor:
    """SD's sigma at each timestep, ascending (k-diffusion's DiscreteSchedule.sigmas)."""
    alphas = sd_alphas().double()
    return ((1 - alphas) / alphas).sqrt()


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "LMS", "Heun"])
def test_a1111s_further_schedule_types_are_its_formulas(sampler):
    steps, lowest, highest = 10, SD_SIGMA_MIN, SD_SIGMA_MAX
    # Polyexponential: k-diffusion's get_sigmas_polyexponential; at its own rho (1) it is Exponential.
    assert distinct_sigmas(sampler, "Polyexponential") == pytest.approx(exponential(steps, lowest, highest), abs=2e-4)
    ramp = torch.linspace(1, 0, steps, dtype=torch.float64) ** 2.5
    expected = torch.exp(ramp * (math.log(highest) - math.log(lowest)) + math.log(lowest)).tolist()
    assert distinct_sigmas(sampler, "Polyexponential", (0, 0, 2.5)) == pytest.approx(expected, abs=2e-4)
    # KL Optimal: tan of evenly spaced angles between atan(max) and atan(min), the first n of A1111's n + 1.
    shares = torch.arange(steps, dtype=torch.float64) / steps
    expected = torch.tan(shares * math.atan(lowest) + (1 - shares) * math.atan(highest)).tolist()
    assert distinct_sigmas(sampler, "KL Optimal") == pytest.approx(expected, abs=2e-4)
    # Simple: every (1000 / n)th of the model's own sigmas, from the top.
    sigmas = model_sigmas()
    expected = [float(sigmas[-(1 + int(index * len(sigmas) / steps))]) for index in range(steps)]
    assert distinct_sigmas(sampler, "Simple") == pytest.approx(expected, abs=2e-4)
    # Normal: evenly spaced timesteps between the max's and the min's; at the model's own ends, Uniform's.
    assert distinct_sigmas(sampler, "Normal") == pytest.approx(distinct_sigmas(sampler, "Uniform"), abs=2e-4)
    ranged = distinct_sigmas(sampler, "Normal", (0.1, 10, 0))
    timesteps = np.interp(np.log(ranged)[::-1], sigmas.log().numpy(), np.arange(len(sigmas)))[::-1]
    assert ranged[0] == pytest.approx(10, abs=2e-4) and ranged[-1] == pytest.approx(0.1, abs=2e-4)
    assert np.diff(timesteps) == pytest.approx([np.diff(timesteps)[0]] * (steps - 1), abs=1e-2)


def test_align_your_steps_is_nvidias_table_for_the_models_family():
    # At 10 steps (11 sigmas) the table itself; SDXL's for SDXL models, SD 1.5's for the others, as in A1111.
    for family, table in (("sd1", "sd1"), ("sdxl", "sdxl"), ("micro", "sd1")):
        made = distinct_sigmas("Euler", "Align Your Steps", steps=11, family=family)
        assert made == pytest.approx(ALIGN_YOUR_STEPS[table], abs=1e-4)
    # Other step counts: log-linear interpolation over the table's positions (NVIDIA's how-to).
    table = np.array(ALIGN_YOUR_STEPS["sd1"])
    expected = np.exp(np.interp(np.linspace(0, 1, 20), np.linspace(0, 1, 11), np.log(table[::-1])))[::-1]
    assert distinct_sigmas("Euler", "Align Your Steps", steps=20, family="sd1") == pytest.approx(expected, abs=1e-4)
    # It ignores the schedule's ends, as A1111's does.
    assert distinct_sigmas("Euler", "Align Your Steps", (0.1, 10, 3)) == distinct_sigmas("Euler", "Align Your Steps")


def test_dpm2_drops_the_next_to_last_sigma_of_every_schedule_type():
    sigmas = model_sigmas()
    expected = [float(sigmas[-(1 + int(index * len(sigmas) / 11))]) for index in range(11)][:-1]
    assert distinct_sigmas("DPM2", "Simple") == pytest.approx(expected, abs=2e-4)
    # Uniform: k-diffusion's evenly spaced timesteps for 11 steps, the smallest sigma dropped.
    timesteps = np.linspace(len(sigmas) - 1, 0, 11)
    uniform = np.exp(np.interp(timesteps, np.arange(len(sigmas)), sigmas.log().numpy()))
    for sampler in ("DPM2", "DPM2 a"):
        assert distinct_sigmas(sampler, "Uniform") == pytest.approx(uniform[:-1].tolist(), abs=2e-4)


def test_one_step_goes_from_the_models_largest_sigma_to_0_on_every_schedule():
    """k-diffusion spaces one step at t_max (linspace(t_max, 0, 1)) and takes the model's sigma range for its
    schedules at any step count: turbo models' usual one step, with Euler a, starts at the most noise. (diffusers'
    linspace spacing put one step at timestep 0, the least noise; the further schedule types refused it.) Align Your
    Steps' one step is A1111's interpolation of its table at the start, its smallest sigma; A1111's KL Optimal divides
    by 0 there (its sigmas are NaN), and here takes the top, as the others do."""
    checked = 0
    for spec in SAMPLERS:
        if not spec.k_diffusion or spec.name in ("DPM fast", "DPM adaptive"):
            continue
        for schedule in supported_schedules(spec):
            scheduler = build_scheduler(SD_SCHEDULER_CONFIG, spec.name, schedule, seed=0)
            scheduler.set_timesteps(1)
            sigmas = [sigma for sigma in scheduler.sigmas.tolist() if sigma > 0]
            # Samplers that drop the next-to-last sigma make two steps of it and keep the first.
            table_start = schedule == "Align Your Steps" and not spec.discard_penultimate_sigma
            top = ALIGN_YOUR_STEPS["sd1"][-1] if table_start else SD_SIGMA_MAX
            assert sigmas == pytest.approx([top], rel=1e-4), (spec.name, schedule, scheduler.sigmas)
            assert scheduler.sigmas[-1] == 0, (spec.name, schedule)
            checked += 1
    assert checked > 50
    # DPM fast and DPM adaptive take two ends, not a schedule: in txt2img the model's, at one step too.
    for sampler in ("DPM fast", "DPM adaptive"):
        scheduler = build_scheduler(SD_SCHEDULER_CONFIG, sampler, "Automatic", seed=0)
        scheduler.set_timesteps(1)
        ends = scheduler._pass_sigmas(1, None)
        assert [float(ends[0]), float(ends[-2])] == pytest.approx([SD_SIGMA_MAX, SD_SIGMA_MIN], rel=1e-4)


def test_a_one_step_picture_is_the_models_prediction_from_pure_noise(micro_engine):
    """One step from the largest sigma to 0 is the model's clean-picture prediction from the starting noise, the same
    for Euler a, Euler and DPM++ 2M (whose one step was right before), and unlike the noise itself it has the
    prompt's blue background in it."""
    one_step = dict(prompt="a red circle on a blue background", seed=3, steps=1)
    pictures = {
        sampler: np.asarray(run(micro_engine, **one_step, sampler_name=sampler).images[0]).astype(int)
        for sampler in ("Euler a", "Euler", "DPM++ 2M", "DPM2")
    }
    for sampler, picture in pictures.items():
        assert np.abs(picture - pictures["DPM++ 2M"]).mean() < 1.0, sampler
    red, green, blue = pictures["Euler a"].reshape(-1, 3).mean(axis=0)
    assert blue > red


@pytest.mark.parametrize("schedule", ["Polyexponential", "KL Optimal", "Align Your Steps", "Simple", "Normal"])
def test_the_micro_model_draws_the_backgrounds_on_each_schedule_type(micro_engine, schedule):
    from training import quality

    accuracy = quality.attribute_accuracy(micro_engine, 8, sampler="Euler", scheduler=schedule)
    assert accuracy.background >= 0.9, accuracy


def test_the_beta_schedule_takes_its_alpha_and_beta():
    from scipy import stats

    def beta_sigmas(alpha: float, beta: float, lowest: float, highest: float) -> list[float]:
        quantiles = stats.beta.ppf(1 - np.linspace(0, 1, 10), alpha, beta)
        return (lowest + quantiles * (highest - lowest)).tolist()

    def made(alpha: float, beta: float, lowest: float = 0.0, highest: float = 0.0) -> list[float]:
        shape = ScheduleShape(lowest, highest, 0.0, alpha, beta)
        scheduler = build_scheduler(SD_SCHEDULER_CONFIG, "Euler", "Beta", seed=0, schedule_shape=shape)
        scheduler.set_timesteps(10)
        return [sigma for sigma in scheduler.sigmas.tolist() if sigma > 0]

    assert made(0.6, 0.6) == pytest.approx(beta_sigmas(0.6, 0.6, SD_SIGMA_MIN, SD_SIGMA_MAX), abs=2e-4)
    assert made(0.3, 0.9) == pytest.approx(beta_sigmas(0.3, 0.9, SD_SIGMA_MIN, SD_SIGMA_MAX), abs=2e-4)
    assert made(0.3, 0.9, 0.1, 10) == pytest.approx(beta_sigmas(0.3, 0.9, 0.1, 10), abs=2e-4)


def test_ends_the_wrong_way_round_are_refused_naming_the_setting(micro_engine):
    with pytest.raises(InvalidRequestError) as refused:
        micro_engine.validate(GenerationRequest(**PROMPT, sigma_min=1, sigma_max=0.5))
    assert refused.value.field == "sigma_max" and "more than sigma_min" in refused.value.allowed
    # A max below the model's own min (0.029) is found where the schedule is made.
    with pytest.raises(InvalidRequestError) as refused:
        distinct_sigmas("Euler", "Karras", (0, 0.01, 0))
    assert refused.value.field == "sigma_max" and "0.02917" in refused.value.allowed
    for field, value in (("sigma_min", 3), ("sigma_max", 61), ("rho", -1), ("rho", "steep"), ("beta_dist_alpha", 0)):
        with pytest.raises(InvalidRequestError) as refused:
            micro_engine.validate(GenerationRequest(**PROMPT, **{field: value}))
        assert refused.value.field == field


def run(engine, **fields) -> Result:
    result = list(engine.generate(GenerationRequest(**{**PROMPT, **fields})))[-1]
    assert isinstance(result, Result), result
    return result


def test_sampling_starts_at_the_max_sigma_and_the_infotext_makes_the_picture_again(micro_engine):
    unet = micro_engine.loaded.components["unet"]
    with RowsPerCall(unet, sd_schedule()) as seen:
        plain = run(micro_engine, sampler_name="DPM++ 2M", scheduler="Karras")
    assert seen.calls[0][1] == pytest.approx(SD_SIGMA_MAX, rel=1e-3)
    with RowsPerCall(unet, sd_schedule()) as seen:
        ranged = run(micro_engine, sampler_name="DPM++ 2M", scheduler="Karras", sigma_max=5, sigma_min=0.1, rho=4)
    # The UNet is told the timestep of sigma 5: sampling starts from that much noise.
    assert seen.calls[0][1] == pytest.approx(5, rel=1e-2)
    assert ranged.images[0].tobytes() != plain.images[0].tobytes()
    params = parse_infotext_params(ranged.infotexts[0])
    assert (params["Schedule min sigma"], params["Schedule max sigma"], params["Schedule rho"]) == ("0.1", "5", "4")
    again = parse_infotext(ranged.infotexts[0])
    assert (again.sigma_min, again.sigma_max, again.rho) == (0.1, 5, 4)
    assert list(micro_engine.generate(again))[-1].images[0].tobytes() == ranged.images[0].tobytes()

    # Uniform takes none of them: the same picture, and the infotext says nothing of them.
    uniform = run(micro_engine, sampler_name="Euler", scheduler="Uniform")
    with_range = run(micro_engine, sampler_name="Euler", scheduler="Uniform", sigma_max=5, rho=4)
    assert with_range.images[0].tobytes() == uniform.images[0].tobytes()
    written = parse_infotext_params(with_range.infotexts[0])
    assert written["Schedule type"] == "Uniform" and not {"Schedule max sigma", "Schedule rho"} & set(written)
    # A1111's Normal at the model's own ends is its Uniform: the same picture.
    normal = run(micro_engine, sampler_name="Euler", scheduler="Normal")
    assert normal.images[0].tobytes() == uniform.images[0].tobytes() and "Schedule type: Normal" in normal.infotexts[0]
    steps = run(micro_engine, sampler_name="DPM++ 2M", scheduler="Align Your Steps")
    again = parse_infotext(steps.infotexts[0])
    assert again.scheduler == "Align Your Steps"
    assert list(micro_engine.generate(again))[-1].images[0].tobytes() == steps.images[0].tobytes()
    # The Beta schedule's alpha and beta are written whenever it is used, as A1111 writes them, and read back.
    beta = run(micro_engine, sampler_name="Euler", scheduler="Beta", beta_dist_alpha=0.4)
    params = parse_infotext_params(beta.infotexts[0])
    assert (params["Beta schedule alpha"], params["Beta schedule beta"]) == ("0.4", "0.6")
    assert "Beta schedule alpha" not in parse_infotext_params(plain.infotexts[0])
    again = parse_infotext(beta.infotexts[0])
    assert list(micro_engine.generate(again))[-1].images[0].tobytes() == beta.images[0].tobytes()
    assert beta.images[0].tobytes() != run(micro_engine, sampler_name="Euler", scheduler="Beta").images[0].tobytes()
    # Exponential takes the ends but not rho.
    exponential_params = parse_infotext_params(
        run(micro_engine, sampler_name="Euler", scheduler="Exponential", sigma_max=5, rho=4).infotexts[0]
    )
    assert exponential_params["Schedule max sigma"] == "5" and "Schedule rho" not in exponential_params


def test_a_hires_pass_on_karras_writes_them_when_the_first_pass_is_uniform(micro_engine):
    hires = dict(enable_hr=True, hr_scale=1.5, denoising_strength=0.5, sampler_name="Euler", scheduler="Uniform")
    params = parse_infotext_params(run(micro_engine, **hires, hr_scheduler="Karras", rho=3).infotexts[0])
    assert params["Schedule rho"] == "3" and params["Hires schedule type"] == "Karras"
    assert "Schedule rho" not in parse_infotext_params(run(micro_engine, **hires, rho=3).infotexts[0])


def test_the_api_takes_the_options_and_overrides(api):  # noqa: F811
    payload = {
        "prompt": "x",
        "steps": 4,
        "width": 64,
        "height": 64,
        "seed": 5,
        "sampler_name": "Euler",
        "scheduler": "Karras",
    }

    def infotext(body: dict) -> dict:
        info = json.loads(body["info"])
        assert info["ignored_fields"] == []
        return parse_infotext_params(info["infotexts"][0])

    options = ok(api.get("options"))
    assert (options["sigma_min"], options["sigma_max"], options["rho"]) == (0, 0, 0)
    overridden = {**payload, "override_settings": {"sigma_max": 8, "rho": 5}}
    params = infotext(ok(api.post("txt2img", json=overridden)))
    assert params["Schedule max sigma"] == "8" and params["Schedule rho"] == "5"
    ok(api.post("options", json={"sigma_min": 0.2}))
    try:
        assert ok(api.get("options"))["sigma_min"] == 0.2
        assert infotext(ok(api.post("txt2img", json=payload)))["Schedule min sigma"] == "0.2"
    finally:
        ok(api.post("options", json={"sigma_min": 0}))
    refused = api.post("txt2img", json={**payload, "override_settings": {"rho": 200}})
    assert refused.status_code == 422 and refused.json()["field"] == "override_settings.rho"
    assert "0 to 100" in refused.json()["detail"]
    refused = api.post("options", json={"sigma_max": "high"})
    assert refused.status_code == 422 and refused.json()["field"] == "sigma_max"
    # An infotext pasted into the API sets them too.
    text = "x\nSteps: 4, Sampler: Euler, Schedule type: Karras, CFG scale: 7, Seed: 5, Size: 64x64, Schedule rho: 2"
    assert infotext(ok(api.post("txt2img", json={"infotext": text})))["Schedule rho"] == "2"
    assert "Schedule rho" not in infotext(ok(api.post("txt2img", json=payload)))  # it set this job's alone


def test_the_page_setting_is_this_sessions_own(page_url):  # noqa: F811
    args = ("x", "", "Euler", "Karras", 4, 7.0, 9, 64, 64, 1, 1)
    client, other = _client(page_url), _client(page_url)
    client.predict(6, api_name="/set_sigma_max")
    client.predict(2.5, api_name="/set_rho")
    infotext = client.predict(*args, api_name="/txt2img")[3]
    assert "Schedule max sigma: 6" in infotext and "Schedule rho: 2.5" in infotext
    assert "Schedule max sigma" not in other.predict(*args, api_name="/txt2img")[3]
    with pytest.raises(Exception, match="60"):
        client.predict(70, api_name="/set_sigma_max")


def test_compare_has_schedule_axes_whose_cells_carry_the_values(micro_engine):
    base = GenerationRequest(**PROMPT, sampler_name="Euler", scheduler="Karras")
    cells = plan_grid(base, [parse_axis("Schedule max sigma", "0, 5", micro_engine)])
    assert [cell.request.sigma_max for cell in cells] == [0, 5] and cells[1].label == "Schedule max sigma: 5"
    cells = plan_grid(base, [parse_axis("Schedule rho", "3-5", micro_engine)])
    assert [cell.request.rho for cell in cells] == [3, 4, 5]
