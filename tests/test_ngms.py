"""A1111's "Negative Guidance minimum sigma" (NGMS, s_min_uncond): below that noise level, every other UNet call
(or every one, with "all steps") runs the prompt's rows only and the prompt's prediction stands in for the
negative's; and its "Ignore negative prompt during early sampling" (Skip Early CFG, skip_early_cond), which does
so on the first share of the calls. Checked by the rows each UNet call gets, and against CFG 1 where every call
skips."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from engine import Engine, GenerationRequest, InvalidRequestError, Result
from engine.infotext import parse_infotext, parse_infotext_params
from engine.negative_guidance import NegativeGuidanceSkip, model_calls
from engine.presets import SHIPPED_MICRO_MODEL
from tests.test_api import api, ok, server  # noqa: F401 - fixtures
from tests.test_hires_checkpoint import pair_engine  # noqa: F401 - fixture
from tests.test_page_client import _client, outputs_dir, page_url  # noqa: F401 - fixtures

PROMPT = dict(prompt="a red circle on a blue background", negative_prompt="green", seed=5, steps=12)


def run(engine, **fields) -> Result:
    result = list(engine.generate(GenerationRequest(**{**PROMPT, **fields})))[-1]
    assert isinstance(result, Result), result
    return result


class RowsPerCall:
    """The rows (batch size) and sigma of each call of a UNet while in use."""

    def __init__(self, unet: torch.nn.Module, skip: NegativeGuidanceSkip):
        self.calls: list[tuple[int, float]] = []
        self._skip = skip
        self._handle = unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.calls.append((sample.shape[0], self._skip.sigma(timestep)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def sd_alphas() -> torch.Tensor:
    """SD's noise schedule (the micro model's too)."""
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod


def sd_schedule() -> NegativeGuidanceSkip:
    """A skip rule over SD's noise schedule, for its sigma()."""
    return NegativeGuidanceSkip(1.0, False, sd_alphas())


def test_the_odd_calls_below_the_sigma_skip_or_all_of_them_with_all_steps():
    alphas = sd_alphas()
    rule = NegativeGuidanceSkip(1.0, False, alphas)
    assert rule.sigma(999) == pytest.approx(14.61, abs=0.01) and rule.sigma(0) == pytest.approx(0.0292, abs=1e-4)
    # A fractional timestep is interpolated in log sigma, as k-diffusion's t_to_sigma does.
    assert rule.sigma(torch.tensor(500.5)) == pytest.approx((rule.sigma(500) * rule.sigma(501)) ** 0.5)
    timesteps = [999, 800, 400, 300, 200, 100, 50, 0]  # sigma 14.6, 5.1, 1.16, 0.83, ...: below 1 from the fourth
    assert [rule.skips(t) for t in timesteps] == [False, False, False, True, False, True, False, True]
    every = NegativeGuidanceSkip(1.0, True, alphas)
    assert [every.skips(t) for t in timesteps] == [False, False, False, True, True, True, True, True]
    assert rule.skipped == 3 and every.skipped == 5


def test_skipped_calls_run_the_prompt_rows_only(micro_engine, models_dir):
    unet = micro_engine.loaded.components["unet"]
    with RowsPerCall(unet, sd_schedule()) as seen:
        run(micro_engine, sampler_name="Euler", s_min_uncond=3.0)
    rows = [count for count, _ in seen.calls]
    expected = [1 if index % 2 and sigma < 3.0 else 2 for index, (_, sigma) in enumerate(seen.calls)]
    assert rows == expected and rows.count(1) >= 3, seen.calls
    # Two pictures in one batch (which a CPU runs one by one unless asked): each skipped call runs their two
    # prompt rows.
    batched = Engine(model=str(SHIPPED_MICRO_MODEL), models_dir=models_dir, exact_batches=False)
    with RowsPerCall(batched.loaded.components["unet"], sd_schedule()) as seen:
        run(batched, sampler_name="Euler", s_min_uncond=3.0, batch_size=2)
    assert [count for count, _ in seen.calls] == [2 * count for count in expected]


def test_skipping_every_call_is_the_prompt_alone_and_zero_changes_nothing(micro_engine):
    plain = run(micro_engine)
    assert run(micro_engine, s_min_uncond=0).images[0].tobytes() == plain.images[0].tobytes()
    everywhere = run(micro_engine, s_min_uncond=15, s_min_uncond_all=True)
    assert everywhere.images[0].tobytes() == run(micro_engine, cfg_scale=1).images[0].tobytes()
    late = run(micro_engine, s_min_uncond=2)
    apart = np.abs(np.asarray(late.images[0]).astype(int) - np.asarray(plain.images[0]).astype(int)).mean()
    assert 0 < apart < 10  # detail moves, the picture stays
    params = parse_infotext_params(late.infotexts[0])
    assert params["NGMS"] == "2" and "NGMS all steps" not in params and "NGMS" not in plain.infotexts[0]
    assert parse_infotext_params(everywhere.infotexts[0])["NGMS all steps"] == "True"
    again = parse_infotext(late.infotexts[0])
    assert again.s_min_uncond == 2 and list(micro_engine.generate(again))[-1].images[0].tobytes() == (
        late.images[0].tobytes()
    )


def test_each_pass_of_hires_fix_counts_its_calls_afresh(micro_engine):
    unet = micro_engine.loaded.components["unet"]
    hires = dict(enable_hr=True, hr_scale=1.5, hr_second_pass_steps=4, denoising_strength=1.0, sampler_name="Euler")
    with RowsPerCall(unet, sd_schedule()) as seen:
        run(micro_engine, steps=5, s_min_uncond=15, **hires)
    assert [count for count, _ in seen.calls] == [2, 1, 2, 1, 2, 2, 1, 2, 1]


def test_composable_parts_skip_the_negative_and_the_first_part_stands_in(micro_engine):
    unet = micro_engine.loaded.components["unet"]
    composed = dict(prompt="a red circle AND a blue background", sampler_name="Euler")
    with RowsPerCall(unet, sd_schedule()) as seen:
        skipping = run(micro_engine, s_min_uncond=15, **composed)
    assert [count for count, _ in seen.calls][:4] == [3, 2, 3, 2]  # the negative and two parts, then the parts
    plain = run(micro_engine, **composed)
    assert skipping.images[0].tobytes() != plain.images[0].tobytes()
    # The negative skipped everywhere and the second part weighted 0: the first part's prediction alone, as at CFG
    # 1 (which sums the parts' guidance onto the negative's prediction: equal but for rounding).
    single = dict(prompt="a red circle AND a blue background :0", sampler_name="Euler")
    alone = np.asarray(run(micro_engine, s_min_uncond=15, s_min_uncond_all=True, **single).images[0]).astype(int)
    cfg_1 = np.asarray(run(micro_engine, cfg_scale=1, **single).images[0]).astype(int)
    assert np.abs(alone - cfg_1).max() <= 2


def test_the_refiner_and_the_model_share_one_count(pair_engine):  # noqa: F811 - the fixture imported above
    refined = dict(refiner_checkpoint="micro-purple", refiner_switch_at=0.5, sampler_name="Euler")
    everywhere = run(pair_engine, s_min_uncond=15, s_min_uncond_all=True, **refined)
    assert everywhere.images[0].tobytes() == run(pair_engine, cfg_scale=1, **refined).images[0].tobytes()
    assert run(pair_engine, s_min_uncond=15, **refined).images[0].tobytes() != everywhere.images[0].tobytes()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"s_min_uncond": -1}, "s_min_uncond"),
        ({"s_min_uncond": 16}, "s_min_uncond"),
        ({"s_min_uncond_all": 2}, "s_min_uncond_all"),
    ],
)
def test_values_outside_a1111s_range_are_refused_by_name(micro_engine, fields, field):
    with pytest.raises(InvalidRequestError) as refused:
        micro_engine.validate(dataclasses.replace(GenerationRequest(**PROMPT), **fields))
    assert refused.value.field == field


def test_the_api_takes_the_field_the_override_and_the_options(api):  # noqa: F811
    payload = {"prompt": "x", "steps": 4, "width": 64, "height": 64, "seed": 5}

    def infotext(body: dict) -> dict:
        info = json.loads(body["info"])
        assert "s_min_uncond" not in info["ignored_fields"]
        return parse_infotext_params(info["infotexts"][0])

    assert infotext(ok(api.post("txt2img", json={**payload, "s_min_uncond": 1.5})))["NGMS"] == "1.5"
    overridden = {**payload, "override_settings": {"s_min_uncond": 2, "s_min_uncond_all": True}}
    params = infotext(ok(api.post("txt2img", json=overridden)))
    assert params["NGMS"] == "2" and params["NGMS all steps"] == "True"
    ok(api.post("options", json={"s_min_uncond": 0.5}))
    try:
        assert ok(api.get("options"))["s_min_uncond"] == 0.5
        assert infotext(ok(api.post("txt2img", json=payload)))["NGMS"] == "0.5"
    finally:
        ok(api.post("options", json={"s_min_uncond": 0}))
    refused = api.post("txt2img", json={**payload, "s_min_uncond": 20})
    assert refused.status_code == 422 and refused.json()["field"] == "s_min_uncond"
    assert api.post("options", json={"s_min_uncond": -1}).status_code == 422
    assert api.post("options", json={"s_min_uncond_all": "sometimes"}).status_code == 422
    assert "NGMS" not in infotext(ok(api.post("txt2img", json=payload)))  # the next request works, NGMS off


def test_the_page_setting_is_this_sessions_own(page_url):  # noqa: F811
    args = ("x", "", "Euler", "Automatic", 4, 7.0, 9, 64, 64, 1, 1)
    client, other = _client(page_url), _client(page_url)
    client.predict(1.5, api_name="/set_ngms")
    client.predict(True, api_name="/set_ngms_all")
    infotext = client.predict(*args, api_name="/txt2img")[3]
    assert "NGMS: 1.5" in infotext and "NGMS all steps: True" in infotext
    assert "NGMS" not in other.predict(*args, api_name="/txt2img")[3]
    with pytest.raises(Exception, match="15"):
        client.predict(40, api_name="/set_ngms")


def test_skip_early_cfg_leaves_the_negative_out_of_the_first_share_of_the_calls(micro_engine):
    # A1111's count: a call skips while its index over the pass's total is at most the share; second-order
    # samplers count two calls a step.
    rule = NegativeGuidanceSkip(0, False, sd_alphas(), early=0.2, total_calls=10)
    assert [rule.skips(999) for _ in range(10)] == [True] * 3 + [False] * 7
    assert model_calls("Euler", 10) == 10 and model_calls("Heun", 10) == 20 and model_calls("DPM2 a", 3) == 6

    unet = micro_engine.loaded.components["unet"]
    with RowsPerCall(unet, sd_schedule()) as seen:
        early = run(micro_engine, sampler_name="Euler", skip_early_cond=0.25)
    assert [count for count, _ in seen.calls] == [1, 1, 1, 1] + [2] * 8  # 3/12 is the last at most 0.25
    with RowsPerCall(unet, sd_schedule()) as seen:
        run(micro_engine, sampler_name="Heun", steps=6, skip_early_cond=0.25)
    assert [count for count, _ in seen.calls] == [1, 1, 1, 1] + [2] * 7  # 11 calls, counted as 12

    plain = run(micro_engine, sampler_name="Euler")
    apart = np.abs(np.asarray(early.images[0]).astype(int) - np.asarray(plain.images[0]).astype(int)).mean()
    assert apart > 0.5, apart
    params = parse_infotext_params(early.infotexts[0])
    assert params["Skip Early CFG"] == "0.25" and "Skip Early CFG" not in plain.infotexts[0]
    again = parse_infotext(early.infotexts[0])
    assert again.skip_early_cond == 0.25
    assert list(micro_engine.generate(again))[-1].images[0].tobytes() == early.images[0].tobytes()
    # All of them: the prompt alone, as at CFG 1.
    assert (
        run(micro_engine, skip_early_cond=1).images[0].tobytes() == run(micro_engine, cfg_scale=1).images[0].tobytes()
    )


def test_skip_early_cfg_through_the_api_and_the_page(api, page_url):  # noqa: F811
    payload = {"prompt": "x", "steps": 4, "width": 64, "height": 64, "seed": 5}
    body = ok(api.post("txt2img", json={**payload, "override_settings": {"skip_early_cond": 0.5}}))
    info = json.loads(body["info"])
    assert info["ignored_fields"] == [] and "Skip Early CFG: 0.5" in info["infotexts"][0]
    refused = api.post("txt2img", json={**payload, "override_settings": {"skip_early_cond": 1.5}})
    assert refused.status_code == 422 and refused.json()["field"] == "override_settings.skip_early_cond"
    assert api.post("options", json={"skip_early_cond": 2}).status_code == 422

    client = _client(page_url)
    client.predict(0.3, api_name="/set_skip_early_cond")
    assert (
        "Skip Early CFG: 0.3"
        in client.predict("x", "", "Euler", "Automatic", 4, 7.0, 9, 64, 64, 1, 1, api_name="/txt2img")[3]
    )


def test_sdxls_added_conditions_are_cut_to_the_prompt_rows_too(tmp_path):
    """SDXL's UNet also takes pooled text embeddings and size ids per row: skipping every call is the CFG 1 picture."""
    from tests.test_prompts_sdxl import build_tiny_sdxl_pipeline

    build_tiny_sdxl_pipeline().save_pretrained(tmp_path / "Stable-diffusion" / "xl", safe_serialization=True)
    engine = Engine(model="xl", models_dir=tmp_path)
    request = GenerationRequest(prompt="a cat", negative_prompt="a dog", seed=1, steps=4, width=64, height=64)

    def pixels(**fields) -> bytes:
        return list(engine.generate(dataclasses.replace(request, **fields)))[-1].images[0].tobytes()

    assert pixels(s_min_uncond=15, s_min_uncond_all=True) == pixels(cfg_scale=1)
    assert pixels(skip_early_cond=0.5) != pixels()
