"""Engine behaviour users rely on: reproducible seeds, every sampler, previews, Stop, img2img, inpaint."""

from __future__ import annotations

import dataclasses
import math
import shutil
import threading
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from engine import Engine, GenerationRequest, JobControl, JobState, PreviewSettings, Progress, Result, Waiting, samplers
from engine.errors import EngineError, InvalidRequestError
from engine.samplers import NoiseLevels, build_scheduler, sampler_names

SMALL = {"width": 64, "height": 64}


def run(engine: Engine, control: JobControl | None = None, preview: PreviewSettings | None = None, **fields):
    """Generate and split the stream into (progress events, result); Waiting events (another
    thread's job holding the device) are left out."""
    events = list(engine.generate(GenerationRequest(**fields), control=control, preview=preview))
    assert isinstance(events[-1], Result)
    assert all(isinstance(event, (Progress, Waiting)) for event in events[:-1])
    return [event for event in events[:-1] if isinstance(event, Progress)], events[-1]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.tobytes() == b.tobytes()


# Seeds and reproducibility ------------------------------------------------------------------


def test_same_request_gives_identical_bytes(engine):
    request = {"prompt": "a red fox", "seed": 1234, "steps": 5, **SMALL}
    _, first = run(engine, **request)
    _, second = run(engine, **request)
    assert first.seeds == second.seeds == [1234]
    assert same_pixels(first.images[0], second.images[0])


def test_different_seeds_give_different_images(engine):
    _, first = run(engine, prompt="a red fox", seed=1, steps=4, **SMALL)
    _, second = run(engine, prompt="a red fox", seed=2, steps=4, **SMALL)
    assert not same_pixels(first.images[0], second.images[0])


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M SDE", "DPM++ SDE", "DDIM"])
def test_image_for_a_seed_does_not_depend_on_its_batch(engine, sampler):
    request = {"prompt": "a lighthouse", "sampler_name": sampler, "steps": 4, **SMALL}
    _, batch = run(engine, seed=500, batch_size=2, n_iter=2, **request)
    assert batch.seeds == [500, 501, 502, 503]
    _, alone = run(engine, seed=502, **request)
    assert same_pixels(batch.images[2], alone.images[0])


def test_batched_sampling_on_request_stays_within_one_level(models_dir):
    """Batched kernels (the GPU default) may round differently, by one level at most."""
    batched = Engine(models_dir=models_dir, exact_batches=False)
    request = {"prompt": "a lighthouse", "sampler_name": "Euler a", "steps": 4, **SMALL}
    _, batch = run(batched, seed=500, batch_size=2, **request)
    _, alone = run(batched, seed=501, **request)
    assert np.abs(pixels(batch.images[1]) - pixels(alone.images[0])).max() <= 1


@pytest.fixture(scope="module")
def micro_engine_untraced(models_dir):
    from engine.presets import SHIPPED_MICRO_MODEL

    return Engine(model=str(SHIPPED_MICRO_MODEL), models_dir=models_dir, trace_unet=False)


@pytest.fixture(scope="module")
def micro_engine_traced(models_dir):
    """The micro model on an engine of this file's own: the session's micro_engine may have made all the traces a
    model keeps for the shapes of other files' tests, and runs further shapes as a module."""
    from engine.presets import SHIPPED_MICRO_MODEL

    return Engine(model=str(SHIPPED_MICRO_MODEL), models_dir=models_dir)


@pytest.mark.parametrize(
    "fields",
    [
        {"sampler_name": "Euler a"},  # CFG: the UNet sees the prompt and the negative as a batch of 2
        {"sampler_name": "DDIM"},  # integer timesteps instead of float ones
        {"sampler_name": "DPM++ 2M", "cfg_scale": 1.0},  # no CFG: a batch of 1
        {"sampler_name": "Euler", "width": 72, "height": 56},  # latents the UNet's upsampling must resize to
        {"sampler_name": "Euler a", "init": True},  # img2img
    ],
    ids=["cfg", "ddim", "no-cfg", "72x56", "img2img"],
)
def test_the_traced_unet_draws_the_same_pixels_as_the_module(micro_engine_traced, micro_engine_untraced, fields):
    fields = dict(fields)
    if fields.pop("init", False):
        fields.update(init_images=[make_init_image()], denoising_strength=0.6)
    request = {"prompt": "a red circle on a blue background, (simple:1.2)", "seed": 11, "steps": 6, **fields}
    _, traced = run(micro_engine_traced, **request)
    _, module = run(micro_engine_untraced, **request)
    assert micro_engine_untraced.loaded.traced_unet is None
    model = micro_engine_traced.loaded
    _, channels, height, width = model.latent_shape(request.get("width", 64), request.get("height", 64))
    batch = 1 if request.get("cfg_scale") == 1.0 else 2
    assert (batch, channels, height, width) in model.traced_unet.traced_sample_shapes, "the job ran no trace"
    assert same_pixels(traced.images[0], module.images[0])
    assert traced.infotexts[0] == module.infotexts[0]


def test_past_its_trace_limits_the_unet_runs_as_a_module_and_never_traces_again(micro_engine, monkeypatch):
    """A dropped trace keeps its graphs in TorchScript's process-wide compilation unit: dropping the oldest trace to
    make another grew the server by 15-30 MB each time a ninth shape came by. Past the limit (2 here), other shapes
    run the module, the same numbers, and the traces made stay in use."""
    from engine import traced_unet

    monkeypatch.setattr(traced_unet, "MAX_TRACES", 2)
    made = []
    real_trace = torch.jit.trace
    monkeypatch.setattr(torch.jit, "trace", lambda *args, **kwargs: made.append(1) or real_trace(*args, **kwargs))
    unet = micro_engine.loaded.components["unet"]
    runner = traced_unet.TracedUNet(unet)
    timestep = torch.tensor(500.0)
    with torch.no_grad():
        for _ in range(2):  # the second time round, every shape has been seen
            for batch in (1, 2, 3):
                sample, text = torch.randn(batch, 4, 8, 8), torch.randn(batch, 77, unet.config.cross_attention_dim)
                assert torch.equal(runner(sample, timestep, text).sample, unet(sample, timestep, text).sample)
    assert len(made) == 2 and [shape[0] for shape in runner.traced_sample_shapes] == [1, 2]
    # Nor can a model loaded again free its old traces: an engine's models share one budget of traces, and once it
    # is spent a model loaded after runs its UNet as a module.
    assert micro_engine.loaded.traced_unet._budget is micro_engine.trace_budget
    budget = traced_unet.TraceBudget(1)
    first, reloaded = traced_unet.TracedUNet(unet, budget), traced_unet.TracedUNet(unet, budget)
    sample, text = torch.randn(1, 4, 8, 8), torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        first(sample, timestep, text)
        assert torch.equal(reloaded(sample, timestep, text).sample, unet(sample, timestep, text).sample)
    assert len(first.traced_sample_shapes) == 1 and not reloaded.traced_sample_shapes and len(made) == 3


def test_a_warmed_up_engine_has_traced_the_default_picture_before_the_first_job(models_dir, micro_engine, caplog):
    from engine.presets import SHIPPED_MICRO_MODEL
    from engine.tiny_model import tiny_model_path

    caplog.set_level("INFO", logger="engine.engine")
    warmed = Engine(model=str(SHIPPED_MICRO_MODEL), models_dir=models_dir, warm_up=True)
    model = warmed.loaded
    with_cfg = (2, *model.latent_shape(*model.defaults.native_size)[1:])
    assert model.traced_unet.traced_sample_shapes == [with_cfg]
    assert warmed.progress() == JobState(), "the warm-up must not show as a job, nor leave a preview"
    defaults = warmed.defaults()
    request = {"prompt": "a red circle on a blue background", "seed": 3, "steps": 4}
    request.update(sampler_name=defaults.sampler_name, scheduler=defaults.scheduler, cfg_scale=defaults.cfg_scale)
    _, first = run(warmed, **request)
    assert model.traced_unet.traced_sample_shapes == [with_cfg], "the first job had to trace after all"
    _, usual = run(micro_engine, **request)
    assert same_pixels(first.images[0], usual.images[0])
    warmed.load_model(str(tiny_model_path(models_dir)))  # a model switch warms the new model too
    assert len(warmed.loaded.traced_unet.traced_sample_shapes) == 1
    assert len([record for record in caplog.records if record.message.startswith("Warmed up")]) == 2


def test_a_model_whose_unet_is_not_traced_is_not_warmed_up(models_dir, caplog):
    # The warm-up pays for a trace; a real model on a CPU would spend seconds on it for nothing.
    from engine.presets import SHIPPED_MICRO_MODEL

    caplog.set_level("INFO", logger="engine.engine")
    Engine(model=str(SHIPPED_MICRO_MODEL), models_dir=models_dir, warm_up=True, trace_unet=False)
    assert [record.message for record in caplog.records if record.message.startswith("Warmed up")] == []


def test_a_hook_on_the_unet_sees_every_step_of_a_traced_family(micro_engine):
    # A trace would run a hook's Python once, while tracing; a hooked UNet must run as a module.
    unet = micro_engine.loaded.components["unet"]
    calls = []
    handle = unet.mid_block.register_forward_hook(lambda module, inputs, output: calls.append(output.shape[0]))
    try:
        run(micro_engine, prompt="a red circle", seed=1, steps=3)
    finally:
        handle.remove()
    assert calls == [2, 2, 2]
    assert not micro_engine.loaded.traced_unet.hooked()


def test_a_unet_the_tracer_cannot_follow_still_generates(engine, models_dir, monkeypatch, caplog):
    from engine import traced_unet
    from engine.tiny_model import tiny_model_path

    def refuse(*args, **kwargs):
        raise RuntimeError("this UNet cannot be traced")

    request = {"prompt": "a lighthouse", "seed": 5, "steps": 3, **SMALL}
    _, usual = run(engine, **request)
    fresh = Engine(model=str(tiny_model_path(models_dir)), models_dir=models_dir)
    monkeypatch.setattr(traced_unet.torch.jit, "trace", refuse)
    _, fallback = run(fresh, **request)
    _, again = run(fresh, **request)
    assert same_pixels(fallback.images[0], usual.images[0]) and same_pixels(again.images[0], usual.images[0])
    assert [record.message for record in caplog.records if "Could not trace" in record.message] == [
        "Could not trace the UNet; running it as a Python module from now on"
    ]


def test_random_seed_is_reported(engine):
    _, result = run(engine, prompt="x", seed=-1, steps=2, **SMALL)
    seed = result.seeds[0]
    assert 0 <= seed < 2**32
    assert result.request.seed == seed
    assert f"Seed: {seed}," in result.infotexts[0]
    _, again = run(engine, prompt="x", seed=seed, steps=2, **SMALL)
    assert same_pixels(result.images[0], again.images[0])


def test_native_size_comes_from_the_model_preset(engine):
    assert (engine.defaults().width, engine.defaults().height) == (256, 256)
    _, result = run(engine, prompt="x", steps=1)
    assert result.images[0].size == (256, 256)
    _, wide = run(engine, prompt="x", steps=1, width=128, height=64)
    assert wide.images[0].size == (128, 64)


# Samplers -------------------------------------------------------------------------------------


def test_sampler_list_has_a1111_names(engine):
    names = engine.samplers()
    for expected in ["Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE",
                     "DPM++ 2S a", "DDIM", "PLMS", "UniPC", "LCM"]:  # fmt: skip
        assert expected in names
    assert {"Automatic", "Karras", "Exponential"} <= set(engine.schedulers())


@pytest.mark.parametrize("sampler", sampler_names())
def test_every_sampler_runs_and_streams_previews(engine, sampler, caplog):
    events, result = run(engine, prompt="a cat", sampler_name=sampler, steps=3, seed=7, **SMALL)
    # Its config is complete as built: diffusers does not rewrite it (and warn in the log) on every job.
    assert not [record for record in caplog.records if "Changing scheduler" in record.getMessage()]
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    assert events and events[-1].step == events[-1].total
    assert all(event.preview is not None for event in events)
    assert f"Sampler: {sampler}," in result.infotexts[0]
    # A picture, not a blank: random weights make noise, but never a constant image.
    assert pixels(result.images[0]).std() > 1


@pytest.mark.parametrize(
    ("sampler", "schedule"),
    [
        ("DPM++ 2M", "Karras"),
        ("DPM++ 2M", "Exponential"),
        ("Euler", "Karras"),
        ("Euler", "SGM Uniform"),
        ("DPM++ 2M SDE", "Beta"),
        ("LMS", "Karras"),
    ],  # fmt: skip
)
def test_schedule_types_change_the_sigmas(engine, sampler, schedule):
    _, scheduled = run(engine, prompt="a cat", sampler_name=sampler, scheduler=schedule, steps=4, seed=3, **SMALL)
    _, uniform = run(engine, prompt="a cat", sampler_name=sampler, scheduler="Uniform", steps=4, seed=3, **SMALL)
    assert f"Schedule type: {schedule}" in scheduled.infotexts[0]
    assert not same_pixels(scheduled.images[0], uniform.images[0])


def test_automatic_schedule_is_the_samplers_a1111_default(engine):
    request = {"prompt": "a cat", "sampler_name": "DPM++ 2M", "steps": 4, "seed": 3, **SMALL}
    _, automatic = run(engine, scheduler="Automatic", **request)
    _, karras = run(engine, scheduler="Karras", **request)
    assert same_pixels(automatic.images[0], karras.images[0])


# SD 1.x's scheduler config: "leading" spacing with offset 1, made for DDIM and PLMS.
SD_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}


@pytest.mark.parametrize(
    ("sampler", "schedule", "second_sigma"),
    [
        ("Euler a", "Uniform", 10.747),  # k-diffusion's uniform: t = linspace(999, 0, steps)
        ("DPM++ 2M", "Uniform", 10.747),  # diffusers' own spaces 21 timesteps and drops the last (10.904)
        ("DPM++ 2S a", "Uniform", 10.747),
        ("LMS", "Uniform", 10.747),
        ("Heun", "Karras", 11.725),
        ("DPM++ SDE", "Karras", 11.725),
        ("DPM++ 2M", "Karras", 11.725),
    ],
)
def test_k_diffusion_samplers_span_a1111s_sigmas(sampler, schedule, second_sigma):
    # A1111 samples SD 1.x from sigma 14.6146 (t=999) down to 0.0292 (t=0) with every k-diffusion
    # sampler; the config's "leading" spacing would start at t=951 (sigma 12.2) and stop at t=1.
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, sampler, schedule, seed=0)
    scheduler.set_timesteps(20)
    sigmas = scheduler.sigmas.tolist()
    assert sigmas[0] == pytest.approx(14.6146, abs=1e-3)
    assert sigmas[1] == pytest.approx(second_sigma, abs=1e-3)
    assert min(s for s in sigmas if s > 0) == pytest.approx(0.0292, abs=1e-3)


@pytest.mark.parametrize(
    ("sampler", "schedule"), [("DPM2", "Automatic"), ("DPM2 a", "Automatic"), ("DPM2", "Exponential")]
)
def test_dpm2_drops_the_next_to_last_sigma_as_a1111_does(sampler, schedule):
    # A1111 builds DPM2's schedule (Karras unless asked otherwise) for steps + 1 and drops its smallest
    # non-zero sigma (discard_next_to_last_sigma): same step count, last step to 0 from the next larger one.
    sigma_min, sigma_max, rho, steps = 0.029168, 14.6146, 7.0, 20
    ramp = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    if schedule == "Exponential":
        made = (math.log(sigma_max) + ramp * (math.log(sigma_min) - math.log(sigma_max))).exp()
    else:
        made = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    expected = [*made[:-1].tolist(), 0.0]
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, sampler, schedule, seed=0)
    scheduler.set_timesteps(steps)
    # The scheduler lists each sigma twice, once per evaluation of the second-order step.
    sigmas = list(dict.fromkeys(round(sigma, 4) for sigma in scheduler.sigmas.tolist()))
    assert sigmas == pytest.approx(expected, abs=2e-4)
    assert len(scheduler.timesteps) == 2 * steps - 1  # still 20 steps, 39 model evaluations


def test_dpmpp_3m_sde_drops_the_next_to_last_sigma_as_a1111_does():
    # A1111's DPM++ 3M SDE is discard_next_to_last_sigma too, on its Exponential schedule: 20 steps end on
    # 0 from the 20th of 21 sigmas spread evenly in log from sigma_max to sigma_min.
    sigma_min, sigma_max, steps = 0.029168, 14.6146, 20
    made = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps + 1, dtype=torch.float64).exp()
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, "DPM++ 3M SDE", "Automatic", seed=0)
    scheduler.set_timesteps(steps)
    assert scheduler.sigmas.tolist() == pytest.approx([*made[:-1].tolist(), 0.0], abs=2e-4)
    assert len(scheduler.timesteps) == steps
    # DPM++ 2M SDE, on the same class, keeps every sigma (A1111 does not discard there).
    kept = build_scheduler(SD_SCHEDULER_CONFIG, "DPM++ 2M SDE", "Automatic", seed=0)
    kept.set_timesteps(steps)
    assert min(s for s in kept.sigmas.tolist() if s > 0) == pytest.approx(sigma_min, abs=1e-3)


def a1111_lcm_sigmas(alphas_cumprod, steps, sgm_uniform=False):
    """A1111's LCM sigmas (modules/sd_samplers_lcm.py): those of the 50 "original" timesteps 19 ... 999,
    interpolated in log at timesteps spread evenly from 999 to 19, then 0; and `sigma_to_t`, the nearest
    of the 50 timesteps, where the UNet is asked."""
    valid_t = torch.arange(50) * 20 + 19
    alphas = alphas_cumprod[valid_t].double()
    log_sigmas = ((1 - alphas) / alphas).sqrt().log()

    def t_to_sigma(t):
        index = ((t - 19) / 20).clamp(0, 49)
        low, high, weight = index.floor().long(), index.ceil().long(), index.frac()
        return ((1 - weight) * log_sigmas[low] + weight * log_sigmas[high]).exp()

    def sigma_to_t(sigma):
        return (sigma.log() - log_sigmas).abs().argmin() * 20 + 19

    ramp = torch.linspace(999, 19, steps + 1 if sgm_uniform else steps, dtype=torch.float64)
    sigmas = [t_to_sigma(t) for t in (ramp[:-1] if sgm_uniform else ramp)] + [torch.tensor(0.0, dtype=torch.float64)]
    return sigmas, sigma_to_t


def a1111_lcm(eps_model, noise, noises, sigmas, sigma_to_t):
    """A1111's LCM sampler: k-diffusion's x = x0 + sigma * noise, LCM's boundary scalings at 10x the
    UNet's timestep."""
    x = noise.double() * sigmas[0]
    for i in range(len(sigmas) - 1):
        sigma, t = sigmas[i], sigma_to_t(sigmas[i])
        eps = eps_model((x / (sigma**2 + 1).sqrt()).float(), t).double()
        scaled = t * 10.0
        c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25) ** 0.5
        x = c_out * (x - sigma * eps) + c_skip * x
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noises[i].double()
    return x.float()


@pytest.mark.parametrize(
    ("steps", "schedule"), [(4, "Automatic"), (8, "Automatic"), (20, "Automatic"), (6, "SGM Uniform")]
)
def test_lcm_samples_as_a1111s_lcm_does(steps, schedule):
    # A fixed stand-in for the UNet: the samplers must agree step by step on what they ask it and do with it.
    def eps_model(latent, timestep):
        return 0.3 * latent * (1 + float(timestep) / 1000) + 0.1 * torch.sin(3 * latent)

    shape = (1, 4, 8, 8)
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(shape, generator=generator)
    noises = [torch.randn(shape, generator=generator) for _ in range(steps)]
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, "LCM", schedule)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(5)
    latent = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps:
        latent = scheduler.step(eps_model(latent, timestep), timestep, latent, generator=generator).prev_sample
    sigmas, sigma_to_t = a1111_lcm_sigmas(scheduler.alphas_cumprod, steps, schedule == "SGM Uniform")
    assert torch.allclose(latent, a1111_lcm(eps_model, noise, noises, sigmas, sigma_to_t), atol=1e-4)
    assert scheduler.timesteps.tolist() == [int(sigma_to_t(sigma)) for sigma in sigmas[:-1]]
    if (steps, schedule) == (8, "Automatic"):  # diffusers' own LCMScheduler ends at 139
        assert scheduler.timesteps.tolist() == [999, 859, 719, 579, 439, 299, 159, 19]
    # img2img starting at step 3 noises the picture to that step's sigma (x0 + sigma * noise, scaled).
    scheduler.set_begin_index(3)
    noised = scheduler.add_noise(torch.ones(shape), noise, scheduler.timesteps[3:4])
    expected = (1 + sigmas[3] * noise.double()) / (1 + sigmas[3] ** 2).sqrt()
    assert torch.allclose(noised, expected.float(), atol=1e-5)


def a1111_euler_ancestral(eps_model, noise, noises, sigmas, timesteps, eta):
    """k-diffusion's sample_euler_ancestral with get_ancestral_step's eta, as A1111 runs Euler a."""
    x = noise.double() * sigmas[0]
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = x - sigma * eps_model((x / (sigma**2 + 1).sqrt()).float(), timesteps[i]).double()
        sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + noises[i].double() * sigma_up
    return x.float()


def stand_in_eps(latent, timestep):
    """A fixed stand-in for the UNet: the samplers must agree step by step on what they ask it and do with it."""
    return 0.3 * latent * (1 + float(timestep) / 1000) + 0.1 * torch.sin(3 * latent)


def pass_drawing_step_noise(scheduler, steps: int, shape=(1, 4, 8, 8)):
    """A pass of `scheduler` over stand_in_eps whose starting noise and steps' noise come from one generator (seed 5),
    as a pipeline draws them; the result, the starting noise, and the draws after it, one a step."""
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(shape, generator=generator)
    noises = [torch.randn(shape, generator=generator) for _ in range(steps)]
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(5)
    latent = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    return stepped_over_stand_in(scheduler, latent, scheduler.timesteps, generator), noise, noises


def stepped_over_stand_in(scheduler, latent, timesteps, generator):
    """`latent` stepped by `scheduler` over `timesteps` with stand_in_eps as the model, as a pipeline steps it."""
    for timestep in timesteps:
        if getattr(scheduler, "finished", False):  # DPM adaptive's pass is done: the job ends its loop there
            break
        model_input = scheduler.scale_model_input(latent, timestep)
        latent = scheduler.step(stand_in_eps(model_input, timestep), timestep, latent, generator=generator).prev_sample
    return latent


def picture_pass_drawing_step_noise(scheduler, calls, shape=(1, 4, 8, 8), draws: int = 8):
    """A pass of `scheduler` from a picture (seed 3) noised at the first of `calls` with seed 4's noise, over
    stand_in_eps, its steps' noise from a generator seeded 5; the result, the picture, that noise, and the
    generator's first `draws` draws."""
    picture = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    replay = torch.Generator().manual_seed(5)
    noises = [torch.randn(shape, generator=replay) for _ in range(draws)]
    generator = torch.Generator().manual_seed(5)
    latent = stepped_over_stand_in(scheduler, scheduler.add_noise(picture, noise, calls[:1]), calls, generator)
    return latent, picture, noise, noises


def a1111_dpmpp_2m(eps_model, x, sigmas, timesteps, hold=None):
    """k-diffusion's sample_dpmpp_2m, as A1111 runs DPM++ 2M: second order from the second step on, first order to 0.
    `hold(denoised)`, when given, changes each denoised prediction, as A1111's inpainting blend does."""
    old_denoised = None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:], strict=True)):
        denoised = x - sigma * eps_model((x / (sigma**2 + 1).sqrt()).float(), timesteps[i]).double()
        if hold is not None:
            denoised = hold(denoised)
        if sigma_next == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()
            if old_denoised is None:
                blended = denoised
            else:
                r = (sigmas[i - 1].log() - sigma.log()) / h
                blended = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - (-h).expm1() * blended
        old_denoised = denoised
    return x.float()


@pytest.mark.parametrize(("steps", "schedule"), [(6, "Karras"), (10, "Exponential"), (20, "Karras"), (20, "Uniform")])
def test_dpmpp_2m_is_k_diffusions(steps, schedule):
    # Few steps too: diffusers' lower_order_final makes only the last step (to 0) first order, as k-diffusion does.
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, "DPM++ 2M", schedule)
    latent, noise, _ = pass_drawing_step_noise(scheduler, steps)
    sigmas = scheduler.sigmas.double()
    expected = a1111_dpmpp_2m(stand_in_eps, noise.double() * sigmas[0], sigmas, scheduler.timesteps)
    assert torch.allclose(latent, expected, atol=1e-4), (latent - expected).abs().max()


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_euler_a_takes_a1111s_eta(eta):
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, "Euler a", "Automatic", eta=eta)
    latent, noise, noises = pass_drawing_step_noise(scheduler, 10)
    sigmas = scheduler.sigmas.double()
    expected = a1111_euler_ancestral(stand_in_eps, noise, noises, sigmas, scheduler.timesteps, eta)
    assert torch.allclose(latent, expected, atol=1e-4)


def a1111_dpmpp_2s_ancestral(eps_model, x, sigmas, timesteps, eta, noises, s_noise=1.0):
    """k-diffusion's sample_dpmpp_2s_ancestral, as A1111 runs DPM++ 2S a, in its t = -log(sigma); `timesteps` are those
    the model is called with (two a step but the last), `noises[i]` step i's noise."""
    calls = iter(timesteps)

    def denoise(x, sigma):
        return x - sigma * eps_model((x / (sigma**2 + 1).sqrt()).float(), next(calls)).double()

    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:], strict=True)):
        denoised = denoise(x, sigma)
        up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
        down = (sigma_next**2 - up**2) ** 0.5
        if down == 0:
            x = x + (x - denoised) / sigma * (down - sigma)
        else:
            t, t_next = -sigma.log(), -down.log()
            h = t_next - t
            s = t + h / 2
            x_2 = ((-s).exp() / (-t).exp()) * x - (-h / 2).expm1() * denoised
            denoised_2 = denoise(x_2, (-s).exp())
            x = ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * denoised_2
        if sigma_next > 0:
            x = x + noises[i].double() * s_noise * up
    return x.float()


@pytest.mark.parametrize(
    ("eta", "s_noise", "schedule"), [(1.0, 1.0, "Automatic"), (0.5, 0.8, "Karras"), (0.0, 1.0, "Exponential")]
)
def test_dpmpp_2s_a_is_k_diffusions_ancestral_sampler(eta, s_noise, schedule):
    """A1111's DPM++ 2S a: two model calls a step (at sigma and at the midpoint towards sigma_down), DPM-Solver++'s
    updates, and each step's noise drawn from the pass's generator after the starting noise."""

    steps = 8
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, "DPM++ 2S a", schedule, eta=eta, s_noise=s_noise)
    latent, noise, noises = pass_drawing_step_noise(scheduler, steps)
    sigmas = torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1:-1:2]]).double()  # each step's, held twice there
    assert len(sigmas) == steps + 1 and len(scheduler.timesteps) == 2 * steps - 1
    expected = a1111_dpmpp_2s_ancestral(
        stand_in_eps, noise.double() * sigmas[0], sigmas, scheduler.timesteps, eta, noises, s_noise
    )
    assert torch.allclose(latent, expected, atol=1e-4), (latent - expected).abs().max()


def test_dpmpp_2s_a_takes_a_step_left_without_a_sigma_down_as_an_euler_step():
    """Zero Terminal SNR at three steps: 4519, 113, then 0.03. From 113 to 0.03 the ancestral step leaves no sigma_down
    in float32 (0.03 is below its resolution of 113), and k-diffusion takes that step as one Euler step to the
    prediction plus its noise. Its midpoint would be log 0 halfway, NaN: the job stopped with a NaN error. The
    pipeline still asks the model at the midpoint, at timestep 0 now, and that answer is not used."""
    steps = 3
    scheduler = build_scheduler(
        SD_SCHEDULER_CONFIG, "DPM++ 2S a", "Automatic", noise_levels=NoiseLevels(zero_terminal_snr=True)
    )
    latent, noise, noises = pass_drawing_step_noise(scheduler, steps)
    assert not scheduler.timesteps.isnan().any() and torch.isfinite(latent).all()
    sigmas = torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1:-1:2]])  # float32, as A1111's are
    assert sigmas[0] > 4000 and len(scheduler.timesteps) == 2 * steps - 1
    # The calls k-diffusion makes: the flat step (the second) makes one, so its midpoint's is left out.
    calls = torch.cat([scheduler.timesteps[:3], scheduler.timesteps[4:]])
    expected = a1111_dpmpp_2s_ancestral(stand_in_eps, noise.double() * sigmas[0], sigmas, calls, 1.0, noises)
    assert torch.allclose(latent, expected, atol=1e-4), (latent - expected).abs().max()


def a1111_dpmpp_sde(eps_model, x, sigmas, timesteps, eta, noise_sampler, s_noise=1.0):
    """k-diffusion's sample_dpmpp_sde (r = 1/2) with get_ancestral_step's eta, as A1111 runs DPM++ SDE, in
    its t = -log(sigma); `timesteps` are those the model is called with, two a step but the last."""
    calls = iter(timesteps)

    def sigma_fn(t):
        return t.neg().exp()

    def t_fn(sigma):
        return sigma.log().neg()

    def denoise(x, sigma):
        return x - sigma * eps_model((x / (sigma**2 + 1).sqrt()).float(), next(calls)).double()

    def ancestral(sigma_from, sigma_to):
        up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
        return (sigma_to**2 - up**2) ** 0.5, up

    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
            continue
        t, t_next = t_fn(sigma), t_fn(sigma_next)
        s = t + (t_next - t) * 0.5
        down, up = ancestral(sigma_fn(t), sigma_fn(s))
        s_ = t_fn(down)
        x_2 = (sigma_fn(s_) / sigma_fn(t)) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + noise_sampler(sigma_fn(t), sigma_fn(s)).double() * s_noise * up
        denoised_2 = denoise(x_2, sigma_fn(s))
        down, up = ancestral(sigma_fn(t), sigma_fn(t_next))
        t_next_ = t_fn(down)
        x = (sigma_fn(t_next_) / sigma_fn(t)) * x - (t - t_next_).expm1() * denoised_2
        x = x + noise_sampler(sigma_fn(t), sigma_fn(t_next)).double() * s_noise * up
    return x.float()


@pytest.mark.parametrize(("eta", "s_noise"), [(0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (1.0, 0.6), (0.5, 1.1)])
def test_dpmpp_sde_takes_a1111s_eta_and_sigma_noise(eta, s_noise):
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    def eps_model(latent, timestep):
        return 0.3 * latent * (1 + float(timestep) / 1000) + 0.1 * torch.sin(3 * latent)

    shape, steps = (1, 4, 8, 8), 6
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, "DPM++ SDE", "Automatic", seed=9, eta=eta, s_noise=s_noise)
    scheduler.set_timesteps(steps)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(5)) * scheduler.init_noise_sigma
    latent = start
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latent, timestep)
        latent = scheduler.step(eps_model(model_input, timestep), timestep, latent).prev_sample
    # A1111 keeps its sigmas in float32 and works out t from them.
    step_sigmas = torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1:-1:2], scheduler.sigmas[-1:]])
    positive = scheduler.sigmas[scheduler.sigmas > 0]
    brownian = BrownianTreeNoiseSampler(start, positive.min().item(), scheduler.sigmas.max().item(), 9)
    expected = a1111_dpmpp_sde(eps_model, start, step_sigmas, scheduler.timesteps, eta, brownian, s_noise)
    assert torch.allclose(latent, expected, atol=1e-4), (latent - expected).abs().max()


def a1111_dpmpp_3m_sde(eps_model, x, sigmas, timesteps, eta, noise_sampler, s_noise=1.0):
    """k-diffusion's sample_dpmpp_3m_sde, as A1111 runs DPM++ 3M SDE, with `noise_sampler(sigma, sigma_next)` as a
    step's noise."""
    denoised_1 = denoised_2 = h_1 = h_2 = None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:], strict=True)):
        denoised = x - sigma * eps_model((x / (sigma**2 + 1).sqrt()).float(), timesteps[i]).double()
        h = None
        if sigma_next == 0:
            x = denoised
        else:
            t, s = -sigma.log(), -sigma_next.log()
            h = s - t
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                d = (denoised - denoised_1) / (h_1 / h)
                x = x + (h_eta.neg().expm1() / h_eta + 1) * d
            if eta:
                noise = noise_sampler(sigma, sigma_next).double()
                x = x + noise * sigma_next * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x.float()


@pytest.mark.parametrize(("eta", "s_noise", "steps"), [(0.0, 1.0, 8), (0.5, 1.0, 8), (1.0, 1.0, 8), (1.0, 0.6, 20)])
def test_dpmpp_3m_sde_is_k_diffusions_at_every_eta(eta, s_noise, steps):
    def eps_model(latent, timestep):
        return 0.3 * latent * (1 + float(timestep) / 1000) + 0.1 * torch.sin(3 * latent)

    shape = (1, 4, 8, 8)
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, "DPM++ 3M SDE", "Automatic", seed=9, eta=eta, s_noise=s_noise)
    latent, expected = _sde_pass_and_k_diffusions(scheduler, shape, steps, a1111_dpmpp_3m_sde, eta, s_noise)
    assert torch.allclose(latent, expected, atol=1e-4), (latent - expected).abs().max()


def _sde_pass_and_k_diffusions(scheduler, shape, steps, reference, eta, s_noise, **options):
    """A pass of `scheduler` (one of A1111's Brownian-noise samplers, built with seed 9) over a stand-in UNet, and what
    k-diffusion's `reference` sampler makes from the same start with A1111's noise sampler: a Brownian tree seeded
    with the image's seed over the schedule's sigmas (held in float32, as A1111 holds them)."""
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    # The generator is handed over as a pipeline does; the steps' noise does not come from it.
    latent, start, _ = pass_drawing_step_noise(scheduler, steps, shape)
    positive = scheduler.sigmas[scheduler.sigmas > 0]
    # The tree is made on the first step's sample: the start in diffusers' (variance-preserving) latents.
    tree = BrownianTreeNoiseSampler(
        start * scheduler.init_noise_sigma, positive.min().item(), scheduler.sigmas.max().item(), 9
    )

    def noise_sampler(sigma, sigma_next):
        return tree(sigma.float(), sigma_next.float())

    sigmas = scheduler.sigmas.double()
    # A1111's start, noise x sigma_max (k-diffusion's variance-exploding x, which is diffusers' latent / alpha).
    x = start.double() * sigmas[0]
    return latent, reference(stand_in_eps, x, sigmas, scheduler.timesteps, eta, noise_sampler, s_noise, **options)


def test_sde_jobs_leave_no_torchsde_warnings_in_the_log(micro_engine):
    """torchsde rounds its tree's ends to 6 digits, so the schedule's smallest sigma falls just outside the tree and
    it would warn on every SDE job (it clamps, as in A1111); the engine keeps that out of the server's log."""
    with warnings.catch_warnings(record=True) as caught:  # keeps the process's filters, shows every warning again
        for sampler in ("DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE"):
            request = GenerationRequest(prompt="a red circle", sampler_name=sampler, steps=4, seed=1)
            assert isinstance(list(micro_engine.generate(request))[-1], Result)
    assert [str(w.message) for w in caught if "torchsde" in w.filename] == []


@pytest.mark.parametrize("sampler", ["DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE"])
def test_a_batched_sde_pass_gives_each_image_its_own_seeds_brownian_tree(sampler):
    """A1111 grows one Brownian tree per image seed (BatchedBrownianTree), so an image comes out the same whatever
    batch it is sampled in (as on a GPU, where a batch runs in one pass)."""

    def run(starts, seeds):
        scheduler = build_scheduler(SD_SCHEDULER_CONFIG, sampler, "Automatic", seed=seeds)
        scheduler.set_timesteps(6)
        latent = starts * scheduler.init_noise_sigma
        for timestep in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latent, timestep)
            latent = scheduler.step(stand_in_eps(model_input, timestep), timestep, latent).prev_sample
        return latent

    starts = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    batched = run(starts, [9, 10])
    assert torch.allclose(batched[1:], run(starts[1:], [10]), atol=1e-5)
    assert torch.allclose(batched[:1], run(starts[:1], [9]), atol=1e-5)
    assert not torch.allclose(run(starts[1:], [9]), batched[1:], atol=1e-3)  # the seed, not the place, decides


def a1111_dpmpp_2m_sde(eps_model, x, sigmas, timesteps, eta, noise_sampler, s_noise=1.0, solver_type="midpoint"):
    """k-diffusion's sample_dpmpp_2m_sde, as A1111 runs DPM++ 2M SDE (midpoint) and DPM++ 2M SDE Heun."""
    old_denoised = h_last = None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:], strict=True)):
        denoised = x - sigma * eps_model((x / (sigma**2 + 1).sqrt()).float(), timesteps[i]).double()
        h = None
        if sigma_next == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()
            eta_h = eta * h
            x = sigma_next / sigma * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    weight = (-h - eta_h).expm1().neg() / (-h - eta_h) + 1
                else:
                    weight = 0.5 * (-h - eta_h).expm1().neg()
                x = x + weight * (1 / r) * (denoised - old_denoised)
            if eta:
                noise = noise_sampler(sigma, sigma_next).double()
                x = x + noise * sigma_next * (-2 * eta_h).expm1().neg().sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x.float()


@pytest.mark.parametrize("sampler", ["DPM++ 2M SDE", "DPM++ 2M SDE Heun"])
@pytest.mark.parametrize(("eta", "s_noise"), [(1.0, 1.0), (0.5, 1.0), (1.0, 0.6)])
def test_dpmpp_2m_sde_is_k_diffusions_with_a1111s_brownian_noise(sampler, eta, s_noise):
    shape, steps = (1, 4, 8, 8), 20
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, sampler, "Automatic", seed=9, eta=eta, s_noise=s_noise)
    solver_type = "heun" if sampler.endswith("Heun") else "midpoint"
    latent, expected = _sde_pass_and_k_diffusions(
        scheduler, shape, steps, a1111_dpmpp_2m_sde, eta, s_noise, solver_type=solver_type
    )
    assert torch.allclose(latent, expected, atol=1e-4), (latent - expected).abs().max()


def test_sgm_uniform_is_a1111s_evenly_spaced_timesteps_one_over():
    # A1111's sgm_uniform: t = linspace(999, 0, steps + 1) without its last, at fractional timesteps.
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, "Euler", "SGM Uniform", seed=0)
    scheduler.set_timesteps(20)
    assert scheduler.timesteps.tolist() == pytest.approx(torch.linspace(999, 0, 21)[:-1].tolist(), abs=1e-3)
    # Samplers that make no Karras sigmas keep diffusers' trailing spacing, its rounded neighbour.
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, "Euler a", "SGM Uniform", seed=0)
    scheduler.set_timesteps(20)
    assert scheduler.timesteps[:2].tolist() == [999, 949]


def test_old_combined_sampler_names_and_any_case_are_accepted(engine):
    checked = engine.validate(GenerationRequest(sampler_name="DPM++ 2M Karras", scheduler="automatic"))
    assert (checked.sampler_name, checked.scheduler) == ("DPM++ 2M", "Karras")
    checked = engine.validate(GenerationRequest(sampler_name="k_euler_a", scheduler="sgm_uniform"))
    assert (checked.sampler_name, checked.scheduler) == ("Euler a", "SGM Uniform")


def test_unsupported_schedule_is_refused_by_name(engine):
    with pytest.raises(InvalidRequestError) as caught:
        engine.validate(GenerationRequest(sampler_name="Euler a", scheduler="Karras"))
    assert caught.value.field == "scheduler"
    assert "Euler a" in str(caught.value) and "Uniform" in str(caught.value)


def test_jobs_never_change_the_shared_scheduler(engine):
    shared = engine.loaded.components["scheduler"]
    config_before = dict(engine.loaded.scheduler_config)
    for sampler in ("DDIM", "DPM++ 2M", "Euler a"):
        run(engine, prompt="x", sampler_name=sampler, scheduler="Automatic", steps=2, seed=1, **SMALL)
    assert engine.loaded.components["scheduler"] is shared
    assert type(shared).__name__ == "PNDMScheduler"
    assert dict(engine.loaded.scheduler_config) == config_before


@pytest.mark.parametrize(("size", "threads_expected"), [(64, 1), (256, 2)])
def test_embedded_models_run_single_threaded_on_small_cpu_images_and_put_torchs_setting_back(
    engine, monkeypatch, size, threads_expected
):
    # Splitting a tiny model's small operations across cores costs more than it saves, yet at 256x256
    # the threads win again (both measured in the README); the family preset says where the line is,
    # and the job must not leave the setting changed.
    unet = engine.loaded.components["unet"]
    threads_seen = []
    original_forward = unet.forward

    def recording_forward(*args, **kwargs):
        threads_seen.append(torch.get_num_threads())
        return original_forward(*args, **kwargs)

    monkeypatch.setattr(unet, "forward", recording_forward)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run(engine, prompt="x", steps=2, seed=1, width=size, height=size)
        assert engine.loaded.defaults.cpu_threads == 1
        assert engine.loaded.defaults.cpu_threads_max_pixels < 256 * 256
        assert threads_seen and set(threads_seen) == {threads_expected}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads_before)


def test_concurrent_callers_each_get_their_own_result(engine):
    requests = {
        "a": {"prompt": "a cat", "sampler_name": "Euler a", "seed": 11, "steps": 4, **SMALL},
        "b": {"prompt": "a dog", "sampler_name": "DDIM", "seed": 22, "steps": 4, **SMALL},
    }
    solo = {key: run(engine, **fields)[1].images[0] for key, fields in requests.items()}
    together: dict[str, Image.Image] = {}

    def worker(key):
        together[key] = run(engine, **requests[key])[1].images[0]

    threads = [threading.Thread(target=worker, args=(key,)) for key in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(same_pixels(solo[key], together[key]) for key in requests)


def test_a_job_behind_another_says_how_far_that_one_is_and_can_be_stopped_while_it_waits(engine, job_ahead):
    # Stopped while it waits: it ends at once, with no images, and the job ahead goes on.
    behind = JobControl()
    events = []
    request = GenerationRequest(prompt="a dog", seed=6, steps=3, **SMALL)
    for event in engine.generate(request, control=behind):
        events.append(event)
        if isinstance(event, Waiting):
            behind.interrupt()
    assert isinstance(events[0], Waiting) and events[0].job_id == behind.job_id
    assert events[0].ahead.running and events[0].ahead.job_id == job_ahead.job_id
    assert isinstance(events[-1], Result) and events[-1].interrupted and events[-1].images == []
    assert engine.progress().running and engine.progress().job_id == job_ahead.job_id
    assert not job_ahead.interrupted

    # Not stopped: it reports the job ahead's progress until that one ends, then runs in full.
    events = []
    for event in engine.generate(request):
        events.append(event)
        if sum(isinstance(seen, Waiting) for seen in events) == 2 and not job_ahead.interrupted:
            job_ahead.interrupt()
    waits = [event for event in events if isinstance(event, Waiting)]
    assert len(waits) >= 2 and 0 < waits[0].ahead.step <= waits[1].ahead.step
    assert [event.step for event in events if isinstance(event, Progress)] == [1, 2, 3]
    alone = run(engine, prompt="a dog", seed=6, steps=3, **SMALL)[1]
    assert same_pixels(events[-1].images[0], alone.images[0])


# Previews ------------------------------------------------------------------------------------


def test_preview_interval_and_modes(engine):
    events, _ = run(engine, preview=PreviewSettings(mode="approx", every=3), prompt="x", steps=7, seed=1, **SMALL)
    with_preview = [event.step for event in events if event.preview is not None]
    assert with_preview == [3, 6, 7]  # every third step, and always the last
    assert events[0].preview is None and events[2].preview.size == (8, 8)  # latent size
    assert [round(event.fraction, 3) for event in events] == [round(step / 7, 3) for step in range(1, 8)]
    assert events[-1].eta == 0 and events[0].eta > 0 and events[-1].it_per_s > 0

    events, _ = run(engine, preview=PreviewSettings(mode="vae"), prompt="x", steps=2, seed=1, **SMALL)
    assert events[0].preview.size == (64, 64)
    events, result = run(engine, preview=PreviewSettings(mode="none"), prompt="x", steps=2, seed=1, **SMALL)
    assert all(event.preview is None for event in events) and result.preview_seconds == 0
    _, result = run(engine, preview=PreviewSettings(mode="approx"), prompt="x", steps=2, seed=1, **SMALL)
    assert 0 < result.preview_seconds < result.elapsed


def test_previews_are_paced_in_time_and_each_batch_ends_with_one(engine):
    # The page asks for at most ten previews a second; a fast model must not decode one per step.
    paced = PreviewSettings(mode="approx", min_interval_s=3600)
    events, _ = run(engine, preview=paced, prompt="x", steps=6, n_iter=2, seed=1, **SMALL)
    with_preview = [(event.batch_no, event.step) for event in events if event.preview is not None]
    assert with_preview == [(0, 1), (0, 6), (1, 1), (1, 6)]  # the first, then none until each batch's end
    assert len(events) == 12  # progress itself still comes every step

    with pytest.raises(InvalidRequestError) as caught:
        run(engine, preview=PreviewSettings(min_interval_s=-1), prompt="x", steps=1, **SMALL)
    assert caught.value.field == "preview min_interval_s" and "0 or more" in str(caught.value)


@pytest.mark.parametrize("sampler", ["Euler", "DDIM", "DPM++ 2M", "PLMS", "UniPC", "Heun", "LCM"])
def test_preview_shows_the_predicted_clean_image(engine, sampler):
    """At the last step the predicted x0 is the final latent, so a full-VAE preview equals the image."""
    events, result = run(
        engine, preview=PreviewSettings(mode="vae"), prompt="a cat", sampler_name=sampler, steps=5, seed=9, **SMALL
    )
    final_preview = events[-1].preview
    difference = np.abs(pixels(final_preview) - pixels(result.images[0]))
    assert difference.mean() < 2.0
    # Early previews are not just decoded noise: they already resemble the final picture.
    early = np.abs(pixels(events[1].preview) - pixels(result.images[0])).mean()
    noise = np.abs(pixels(events[0].preview) - pixels(result.images[0])).mean()
    assert early <= noise + 1


def test_taesd_previews_only_where_weights_exist(engine, models_dir, tmp_path):
    with pytest.raises(InvalidRequestError) as caught:
        list(engine.generate(GenerationRequest(prompt="x", steps=1, **SMALL), preview=PreviewSettings(mode="taesd")))
    assert caught.value.field == "preview mode" and "VAE-approx" in str(caught.value)

    from diffusers import AutoencoderTiny

    local_models = tmp_path / "models"
    shutil.copytree(models_dir / "Stable-diffusion", local_models / "Stable-diffusion")
    AutoencoderTiny(latent_channels=4).save_pretrained(local_models / "VAE-approx" / "taesd-tiny")
    with_taesd = Engine(model=str(local_models / "Stable-diffusion" / "tiny-sd"), models_dir=local_models)
    events, _ = run(with_taesd, preview=PreviewSettings(mode="taesd"), prompt="x", steps=2, seed=1, **SMALL)
    assert events[-1].preview.size == (64, 64)


# Stop, skip, and recovery -------------------------------------------------------------------


def test_interrupt_stops_within_a_step_and_keeps_what_exists(engine):
    fresh = run(engine, prompt="a cat", seed=5, steps=4, **SMALL)[1].images[0]
    control = JobControl()
    events = []
    for event in engine.generate(GenerationRequest(prompt="a cat", seed=5, steps=150, **SMALL), control=control):
        events.append(event)
        if isinstance(event, Progress) and event.step == 3:
            control.interrupt()
    result = events[-1]
    assert isinstance(result, Result) and result.interrupted
    assert len(events) - 1 <= 4  # at most one more step after Stop
    assert len(result.images) == 1 and pixels(result.images[0]).std() > 1
    # The engine is ready, and the next job is exactly what a fresh run makes.
    again = run(engine, prompt="a cat", seed=5, steps=4, **SMALL)[1].images[0]
    assert same_pixels(fresh, again)


def test_engine_interrupt_stops_the_running_job(engine):
    events = []
    for event in engine.generate(GenerationRequest(prompt="x", seed=1, steps=150, **SMALL)):
        events.append(event)
        if isinstance(event, Progress) and event.step == 2:
            assert engine.progress().running
            engine.interrupt()
    assert events[-1].interrupted and len(events) <= 5
    assert not engine.progress().running


def test_one_callers_stop_does_not_stop_another_job(engine):
    other = JobControl()
    other.interrupt()  # someone else's job was stopped
    events, result = run(engine, control=JobControl(), prompt="x", seed=1, steps=5, **SMALL)
    assert not result.interrupted and len(events) == 5


def test_skip_ends_the_current_batch_and_runs_the_next(engine):
    control = JobControl()
    events = []
    request = GenerationRequest(prompt="x", seed=1, steps=50, n_iter=2, **SMALL)
    for event in engine.generate(request, control=control):
        events.append(event)
        if isinstance(event, Progress) and event.batch_no == 0 and event.step == 2:
            control.skip()
    result = events[-1]
    assert result.skipped_batches == [0] and not result.interrupted
    assert len(result.images) == 2
    assert [event.step for event in events[:-1] if event.batch_no == 1][-1] == 50


def test_abandoned_stream_stops_the_job(engine):
    stream = engine.generate(GenerationRequest(prompt="x", seed=1, steps=150, **SMALL))
    next(stream)
    stream.close()  # e.g. a browser tab closed mid-job
    _, result = run(engine, prompt="x", seed=1, steps=2, **SMALL)  # waits only for the stopped job
    assert not result.interrupted


# img2img and inpaint ---------------------------------------------------------------------------


def make_init_image(size=(64, 64)) -> Image.Image:
    image = Image.new("RGB", size, (30, 90, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 10, 50, 50), fill=(240, 200, 40))
    return image


def vae_round_trip(engine: Engine, image: Image.Image) -> Image.Image:
    import torch
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=8)
    with torch.no_grad():
        latent = engine.loaded.vae.encode(processor.preprocess(image)).latent_dist.mean
        return processor.postprocess(engine.loaded.vae.decode(latent).sample, output_type="pil")[0]


def test_img2img_strength_controls_how_far_from_the_init_image(engine):
    init = make_init_image()
    # The result is compared with what the VAE makes of the init image unchanged, so that only
    # the denoising's own departure is measured.
    reference = pixels(vae_round_trip(engine, init))

    def distance(strength):
        events, result = run(engine, prompt="x", seed=3, steps=10, init_images=[init], denoising_strength=strength)
        return events, result, np.abs(pixels(result.images[0]) - reference).mean()

    _, unchanged, _ = distance(0.0)
    assert same_pixels(unchanged.images[0], init)  # strength 0 keeps the init image
    low_events, _, low = distance(0.1)
    high_events, high_result, high = distance(0.7)
    assert low < high
    # As A1111 with a k-diffusion sampler (here Euler a): int(strength x steps) + 1 steps.
    assert low_events[-1].total == 2 and high_events[-1].total == 8
    assert "Denoising strength: 0.7" in high_result.infotexts[0]


@pytest.mark.parametrize(
    ("sampler", "steps", "strength", "expected"),
    [
        ("Euler a", 20, 0.75, 16),  # A1111: t_enc = 15, sigmas[4:] -> 16 steps
        ("DPM++ 2M", 20, 1.0, 20),  # strength is capped at 0.999: t_enc = 19, the whole schedule
        ("Euler", 20, 0.04, 1),  # t_enc = 0 still runs the last step
        ("Euler", 100, 0.29, 29),  # Python's int(0.29 * 100) is 28, in A1111 too
        ("DDIM", 20, 0.75, 14),  # A1111's DDIM asks the model at t_enc - 1 timesteps
        ("DDIM", 20, 1.0, 18),
        ("PLMS", 20, 0.75, 15),  # diffusers' int(strength x steps)
        ("Euler a", 20, 0.0, 0),
        ("LCM", 8, 0.5, 5),  # A1111 runs LCM through k-diffusion too
    ],
)
def test_img2img_runs_as_many_steps_as_a1111(sampler, steps, strength, expected):
    assert samplers.img2img_steps(sampler, steps, strength) == expected


@pytest.mark.parametrize(
    ("sampler", "steps", "strength", "expected"),
    [
        ("Euler a", 20, 0.7, (28, 20)),  # A1111: steps int(20 / 0.7) = 28, t_enc = 19, sigmas[8:] -> 20 steps
        ("DPM++ 2M", 20, 1.0, (20, 20)),  # int(20 / 0.999): the whole schedule
        ("Euler", 10, 0.001, (1000, 10)),  # at most one step per training timestep
        ("DDIM", 20, 0.7, (28, 18)),  # t_enc - 1
        ("UniPC", 20, 0.5, (40, 19)),
        ("Euler a", 20, 0.0, (20, 0)),
    ],
)
def test_the_hires_pass_runs_as_many_steps_as_a1111(sampler, steps, strength, expected):
    assert samplers.picture_steps(sampler, steps, strength, exact=True) == samplers.PictureSteps(*expected)


def test_img2img_starts_where_a1111_starts(engine):
    # Euler on 8 steps samples timesteps 999, 856.3, 713.6, 570.9, 428.1, 285.4, 142.7, 0; at strength
    # 0.5 A1111 starts at sigmas[8 - 4 - 1] and runs 5 steps. DDIM asks the model at A1111's timesteps 4 - 1 to 1
    # (1, 126, 251, 376, ...), its picture noised to timestep 4's level.
    timesteps = []
    unet = engine.loaded.components["unet"]
    handle = unet.register_forward_pre_hook(
        lambda _m, args, kwargs: timesteps.append(float(kwargs.get("timestep", args[1] if len(args) > 1 else 0))),
        with_kwargs=True,
    )
    init = make_init_image()
    try:
        for sampler in ("Euler", "DDIM"):
            run(engine, prompt="x", seed=3, steps=8, sampler_name=sampler, init_images=[init], denoising_strength=0.5)
    finally:
        handle.remove()
    assert timesteps[:5] == pytest.approx([570.86, 428.14, 285.43, 142.71, 0.0], abs=0.01)
    assert timesteps[5:] == [376, 251, 126]


def test_img2img_with_exact_steps_runs_them_all_on_a_longer_schedule(engine):
    # A1111's img2img_fix_steps: 8 steps at strength 0.5 make a schedule of 16 and run its last 8 (Euler: linspace(999,
    # 0, 16) from 7 / 15 of 999); off, 5 of a schedule of 8. Written in the infotext, and read back.
    from engine.infotext import parse_infotext
    from tests.test_pad_conds import unet_calls

    def timestep(args, kwargs):
        return float(kwargs.get("timestep", args[1] if len(args) > 1 else 0))

    request = GenerationRequest(
        prompt="x", seed=3, steps=8, sampler_name="Euler", denoising_strength=0.5, init_images=[make_init_image()]
    )
    exact, timesteps = unet_calls(engine, dataclasses.replace(request, img2img_fix_steps=True), timestep)
    assert timesteps == pytest.approx([999 * k / 15 for k in range(7, -1, -1)], abs=0.01)
    assert "Img2img fix steps: True" in exact.infotexts[0]
    assert parse_infotext(exact.infotexts[0]).img2img_fix_steps
    plain, timesteps = unet_calls(engine, request, timestep)
    assert len(timesteps) == 5 and "Img2img fix steps" not in plain.infotexts[0]


def test_img2img_init_image_is_resized_to_the_requested_size(engine):
    _, result = run(engine, prompt="x", seed=3, steps=4, init_images=[make_init_image((100, 60))], width=64, height=64)
    assert result.images[0].size == (64, 64)
    _, native = run(engine, prompt="x", seed=3, steps=4, init_images=[make_init_image((100, 60))])
    assert native.images[0].size == (96, 56)  # the init image's size, rounded down to multiples of 8


def test_inpaint_repaints_only_the_masked_area(engine):
    init = make_init_image()
    mask = Image.new("L", init.size, 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
    _, result = run(
        engine, prompt="x", seed=3, steps=6, init_images=[init], mask=mask, mask_blur=0, denoising_strength=1.0
    )
    out, original, inside = pixels(result.images[0]), pixels(init), np.asarray(mask) > 0
    assert np.array_equal(out[~inside], original[~inside])
    assert np.abs(out[inside] - original[inside]).mean() > 10
    assert "Mask blur: 0" in result.infotexts[0]

    _, inverted = run(
        engine, prompt="x", seed=3, steps=6, init_images=[init], mask=mask, mask_blur=0, inpainting_mask_invert=1
    )
    assert np.array_equal(pixels(inverted.images[0])[inside], original[inside])


def test_modes_share_one_set_of_weights(engine):
    components = {name: id(module) for name, module in engine.loaded.components.items()}
    init = make_init_image()
    run(engine, prompt="x", seed=1, steps=2, **SMALL)
    run(engine, prompt="x", seed=1, steps=2, init_images=[init])
    run(engine, prompt="x", seed=1, steps=2, init_images=[init], mask=Image.new("L", init.size, 255))
    assert {name: id(module) for name, module in engine.loaded.components.items()} == components


# Infotext ------------------------------------------------------------------------------------


def test_results_carry_a1111_infotext(engine):
    _, result = run(engine, prompt="a castle", negative_prompt="blurry", seed=42, steps=3, cfg_scale=6.5, **SMALL)
    text = result.infotexts[0]
    assert result.images[0].info["parameters"] == text
    prompt_line, negative_line, params = text.split("\n")
    assert prompt_line == "a castle" and negative_line == "Negative prompt: blurry"
    for part in ["Steps: 3", "Sampler: Euler a", "Schedule type: Automatic", "CFG scale: 6.5", "Seed: 42",
                 "Size: 64x64", f"Model hash: {engine.model.hash}", "Model: tiny-sd"]:  # fmt: skip
        assert part in params


def test_infotext_round_trip_reproduces_the_image(engine):
    from engine.infotext import parse_infotext

    _, original = run(
        engine, prompt="a (castle:1.2), long\nsecond line", negative_prompt="blurry, dark", seed=77, steps=4,
        sampler_name="DPM++ 2M", scheduler="Karras", cfg_scale=5, width=64, height=72,
    )  # fmt: skip
    parsed = parse_infotext(original.infotexts[0])
    _, again = run(engine, **{k: getattr(parsed, k) for k in vars(parsed)})
    assert same_pixels(original.images[0], again.images[0])
    assert again.infotexts[0] == original.infotexts[0]


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:116] . DefaultCPUAllocator: can't allocate memory: you tried..."),
    ],
    ids=["device", "cpu"],
)
def test_a_job_that_runs_out_of_memory_says_what_asks_for_less_frees_it_and_the_next_job_runs(
    micro_engine, monkeypatch, error
):
    freed = []
    monkeypatch.setattr("engine.engine.release_cached_memory", freed.append)

    def out_of_memory(module, args):
        raise error

    hook = micro_engine.loaded.components["unet"].register_forward_pre_hook(out_of_memory)
    try:
        with pytest.raises(EngineError) as failed:
            list(micro_engine.generate(GenerationRequest(prompt="a red circle", steps=2, batch_size=2)))
    finally:
        hook.remove()
    message = str(failed.value)
    assert "ran out of the machine's memory (64x64, batch size 2)" in message
    assert "Try a smaller size or batch size" in message and "the next one runs" in message
    assert freed == [micro_engine.device]
    assert isinstance(list(micro_engine.generate(GenerationRequest(prompt="a red circle", steps=2)))[-1], Result)
