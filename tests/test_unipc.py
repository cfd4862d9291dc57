"""UniPC as A1111 samples it (its own UniPC in continuous time, not diffusers'): its times, its count of model calls,
its img2img start, checked step by step against A1111's algorithm (modules/models/diffusion/uni_pc/uni_pc.py and
sd_samplers_timesteps_impl.unipc) written out."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from engine import InvalidRequestError
from engine.infotext import parse_infotext
from engine.samplers import (
    A1111UniPCScheduler,
    build_scheduler,
    img2img_steps,
    pass_steps,
)
from tests.test_ddim import (
    REQUEST,
    SHAPE,
    a1111_timesteps,
    alphas_cumprod,
    eps_model,
    noised_picture,
    picture_pass,
    run,
)
from tests.test_engine import SD_SCHEDULER_CONFIG
from tests.test_pad_conds import unet_calls


class A1111UniPC:
    """A1111's UniPC (NoiseScheduleVP 'discrete', UniPC.sample multistep with the B(h) update and data prediction),
    written out in float64. `model(x, t_input)` is its noise prediction at model time t_input."""

    def __init__(self, abar, variant="bh1"):
        self.log_alphas = 0.5 * torch.log(abar.double())
        self.times = torch.linspace(0.0, 1.0, len(abar) + 1, dtype=torch.float64)[1:]
        self.variant = variant

    def log_alpha(self, t):
        t = float(t)
        right = min(
            max(int(torch.searchsorted(self.times, torch.tensor(t, dtype=torch.float64))), 1), len(self.times) - 1
        )
        t0, t1 = float(self.times[right - 1]), float(self.times[right])
        y0, y1 = float(self.log_alphas[right - 1]), float(self.log_alphas[right])
        return y0 + (t - t0) * (y1 - y0) / (t1 - t0)

    def alpha(self, t):
        return math.exp(self.log_alpha(t))

    def sigma(self, t):
        return math.sqrt(1.0 - math.exp(2.0 * self.log_alpha(t)))

    def lam(self, t):
        return self.log_alpha(t) - 0.5 * math.log(1.0 - math.exp(2.0 * self.log_alpha(t)))

    def inverse_lambda(self, lam):
        """The time of half-log-SNR `lam`: log alpha interpolated back to time."""
        log_alpha = -0.5 * float(torch.logaddexp(torch.tensor(0.0, dtype=torch.float64), torch.tensor(-2.0 * lam)))
        descending = self.log_alphas.flip(0)
        right = int(torch.searchsorted(descending, torch.tensor(log_alpha, dtype=torch.float64)))
        right = min(max(right, 1), len(descending) - 1)
        x0, x1 = float(descending[right - 1]), float(descending[right])
        t0, t1 = float(self.times.flip(0)[right - 1]), float(self.times.flip(0)[right])
        return t0 + (log_alpha - x0) * (t1 - t0) / (x1 - x0)

    def data(self, model, x, t):
        eps = model(x, (float(t) - 1.0 / 1000) * 1000.0)
        return (x - self.sigma(t) * eps) / self.alpha(t)

    def update(self, model, x, models, times, t, order, use_corrector):
        t_prev_0, m0 = times[-1], models[-1]
        h = self.lam(t) - self.lam(t_prev_0)
        rks, d1s = [], []
        for i in range(1, order):
            rk = (self.lam(times[-(i + 1)]) - self.lam(t_prev_0)) / h
            rks.append(rk)
            d1s.append((models[-(i + 1)] - m0) / rk)
        rks.append(1.0)
        hh = -h
        h_phi_1 = math.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if self.variant == "bh1" else math.expm1(hh)
        r_rows, b = [], []
        factorial_i = 1
        for i in range(1, order + 1):
            r_rows.append([rk ** (i - 1) for rk in rks])
            b.append(h_phi_k * factorial_i / b_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        r_matrix, b = torch.tensor(r_rows, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        x_t_ = self.sigma(t) / self.sigma(t_prev_0) * x - self.alpha(t) * h_phi_1 * m0
        pred_res = 0
        if d1s:
            rhos_p = [0.5] if order == 2 else torch.linalg.solve(r_matrix[:-1, :-1], b[:-1]).tolist()
            pred_res = sum(rho * d for rho, d in zip(rhos_p, d1s, strict=True))
        x_t = x_t_ - self.alpha(t) * b_h * pred_res
        model_t = None
        if use_corrector:
            model_t = self.data(model, x_t, t)
            rhos_c = [0.5] if order == 1 else torch.linalg.solve(r_matrix, b).tolist()
            corr_res = sum(rho * d for rho, d in zip(rhos_c[:-1], d1s, strict=True)) if d1s else 0
            x_t = x_t_ - self.alpha(t) * b_h * (corr_res + rhos_c[-1] * (model_t - m0))
        return x_t, model_t

    def sample(self, model, x, steps, t_start=1.0, order=3, lower_order_final=True, skip_type="time_uniform"):
        t_0 = 1.0 / 1000
        if skip_type == "time_uniform":
            ts = torch.linspace(t_start, t_0, steps + 1, dtype=torch.float64).tolist()
        elif skip_type == "time_quadratic":
            ts = (torch.linspace(t_start**0.5, t_0**0.5, steps + 1, dtype=torch.float64) ** 2).tolist()
        else:  # logSNR
            lambdas = torch.linspace(self.lam(t_start), self.lam(t_0), steps + 1, dtype=torch.float64)
            ts = [self.inverse_lambda(float(lam)) for lam in lambdas]
        models, times = [self.data(model, x, ts[0])], [ts[0]]
        for init_order in range(1, order):
            x, model_x = self.update(model, x, models, times, ts[init_order], init_order, True)
            models.append(model_x)
            times.append(ts[init_order])
        for step in range(order, steps + 1):
            step_order = min(order, steps + 1 - step) if lower_order_final else order
            x, model_x = self.update(model, x, models, times, ts[step], step_order, step != steps)
            models, times = models[1:] + [model_x], times[1:] + [ts[step]]
        return x


@pytest.mark.parametrize("steps", [20, 30, 7, 3])
def test_txt2img_is_a1111s_unipc(steps):
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, "UniPC", "Automatic", seed=0)
    assert isinstance(scheduler, A1111UniPCScheduler)
    scheduler.set_timesteps(steps)
    # As many steps as A1111 has timesteps (31 at 30 steps), the model asked at each step's start: 999, 949.05, ...
    solver_steps = len(a1111_timesteps(steps))
    assert len(scheduler.timesteps) == pass_steps("UniPC", "Automatic", steps) == solver_steps
    expected_times = [(1 - k * 0.999 / solver_steps - 0.001) * 1000 for k in range(solver_steps)]
    assert scheduler.timesteps.tolist() == pytest.approx(expected_times, abs=1e-3)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    ours = run(scheduler, start.clone(), scheduler.timesteps, eps_model)
    expected = A1111UniPC(alphas_cumprod()).sample(eps_model, start.clone(), solver_steps)
    assert torch.allclose(ours, expected.float(), atol=1e-5), (ours - expected).abs().max()


@pytest.mark.parametrize(
    "settings",
    [
        {"variant": "bh2"},
        {"unipc_order": 2},
        {"unipc_order": 4, "lower_order_final": False},
        {"skip_type": "time_quadratic"},
        {"skip_type": "logSNR"},
    ],
)
def test_a1111s_other_unipc_settings(settings):
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, "UniPC", "Automatic", seed=0)
    for name, value in settings.items():
        setattr(scheduler, name, value)
    scheduler.set_timesteps(10)
    # In double precision: order 4 to the end amplifies float32's rounding past the tolerance.
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).double()
    ours = run(scheduler, start.clone(), scheduler.timesteps, eps_model)
    reference = A1111UniPC(alphas_cumprod(), settings.get("variant", "bh1"))
    expected = reference.sample(
        eps_model,
        start.clone(),
        10,
        order=settings.get("unipc_order", 3),
        lower_order_final=settings.get("lower_order_final", True),
        skip_type=settings.get("skip_type", "time_uniform"),
    )
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()


@pytest.mark.parametrize(
    ("steps", "strength", "exact"), [(20, 0.75, False), (30, 0.4, False), (20, 1.0, False), (10, 0.5, True)]
)
def test_img2img_and_the_hires_pass_are_a1111s_unipc(steps, strength, exact):
    # A1111: t_enc model calls from t = (timestep t_enc - 1 + 1) / 1000 down, on the picture noised to timestep
    # t_enc; in the hires pass (exact) t_enc = steps - 1 on a schedule of steps / strength.
    scheduler, ours_timesteps, counted = picture_pass("UniPC", steps, strength, exact=exact)
    t_enc = steps - 1 if exact else int(min(strength, 0.999) * steps)
    timesteps = a1111_timesteps(counted.schedule)
    picture, noise, noised = noised_picture(timesteps[t_enc])
    t_start = float(timesteps[t_enc - 1]) / 1000 + 1 / 1000
    expected = A1111UniPC(alphas_cumprod()).sample(eps_model, noised.double(), t_enc, t_start=t_start)
    assert counted.sampling == t_enc and (exact or t_enc == img2img_steps("UniPC", steps, strength))
    assert len(ours_timesteps) == t_enc and float(ours_timesteps[0]) == pytest.approx(float(timesteps[t_enc - 1]))
    start = scheduler.add_noise(picture, noise, ours_timesteps[:1])
    assert torch.allclose(start, noised, atol=1e-6)
    ours = run(scheduler, start, ours_timesteps, eps_model)
    assert torch.allclose(ours, expected.float(), atol=1e-5), (ours - expected).abs().max()


def test_a_v_prediction_model_is_read_at_the_whole_timestep():
    # A1111's CompVisTimestepsVDenoiser turns v into a noise prediction at int(model time).
    abar = alphas_cumprod()

    def v_model(x, t):
        return 0.3 * x * math.sin(t / 500) - 0.2

    def as_eps(x, t):
        whole = int(t)
        return math.sqrt(abar[whole]) * v_model(x, t) + math.sqrt(1 - abar[whole]) * x

    scheduler = build_scheduler({**SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}, "UniPC", "Automatic")
    scheduler.set_timesteps(20)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    ours = run(scheduler, start.clone(), scheduler.timesteps, v_model)
    expected = A1111UniPC(abar).sample(as_eps, start.clone(), 20)
    assert torch.allclose(ours, expected.float(), atol=1e-5), (ours - expected).abs().max()


def test_other_schedule_types_keep_diffusers_unipc():
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, "UniPC", "Karras", seed=0)
    assert not isinstance(scheduler, A1111UniPCScheduler)


def test_a_unipc_job_asks_the_unet_at_a1111s_times(micro_engine):
    request = dataclasses.replace(REQUEST, sampler_name="UniPC")
    result, timesteps = unet_calls(
        micro_engine, request, lambda args, kwargs: float(kwargs.get("timestep", args[1] if len(args) > 1 else 0))
    )
    assert timesteps == pytest.approx([999 - 49.95 * k for k in range(20)], abs=1e-3)
    # Always discarding spaces A1111's timesteps for 21 steps, of which there are 22: 22 calls; it is written and
    # read back.
    discarded, timesteps = unet_calls(
        micro_engine,
        dataclasses.replace(request, always_discard_penultimate_sigma=True),
        lambda args, kwargs: float(kwargs.get("timestep", args[1] if len(args) > 1 else 0)),
    )
    assert len(timesteps) == len(a1111_timesteps(21)) == 22
    assert "Discard penultimate sigma: True" in discarded.infotexts[0]
    again = unet_calls(micro_engine, parse_infotext(discarded.infotexts[0]), lambda args, kwargs: None)[0]
    assert again.images[0].tobytes() == discarded.images[0].tobytes()
    assert discarded.images[0].tobytes() != result.images[0].tobytes()


def test_a1111s_unipc_settings_change_the_picture_are_written_and_read_back(micro_engine):
    request = dataclasses.replace(REQUEST, sampler_name="UniPC", steps=12)
    plain = list(micro_engine.generate(request))[-1]
    for settings, written in (
        ({"unipc_variant": "bh2"}, "UniPC variant: bh2"),
        ({"unipc_skip_type": "LOGSNR"}, "UniPC skip type: logSNR"),
        ({"unipc_order": 2, "unipc_lower_order_final": False}, "UniPC order: 2, UniPC lower order final: False"),
    ):
        result = list(micro_engine.generate(dataclasses.replace(request, **settings)))[-1]
        assert written in result.infotexts[0]
        assert result.images[0].tobytes() != plain.images[0].tobytes()
        again = list(micro_engine.generate(parse_infotext(result.infotexts[0])))[-1]
        assert again.images[0].tobytes() == result.images[0].tobytes()
    # Defaults, and samplers other than A1111's UniPC, write none of them.
    assert "UniPC" not in plain.infotexts[0].replace("Sampler: UniPC", "")
    euler = list(micro_engine.generate(dataclasses.replace(REQUEST, sampler_name="Euler a", unipc_variant="bh2")))[-1]
    assert "UniPC variant" not in euler.infotexts[0]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("unipc_variant", "vary_coeff", "unipc_variant: got 'vary_coeff'; allowed: one of bh1, bh2"),
        ("unipc_order", 0, "unipc_order: got 0; allowed: a whole number from 1 to 50"),
        ("unipc_skip_type", "linear", "unipc_skip_type: got 'linear'; allowed: one of time_uniform, time_quadratic"),
    ],
)
def test_bad_unipc_settings_are_refused_by_name(micro_engine, field, value, message):
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        micro_engine.validate(dataclasses.replace(REQUEST, sampler_name="UniPC", **{field: value}))
