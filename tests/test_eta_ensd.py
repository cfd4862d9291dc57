"""A1111's sampler parameters: eta (Euler a's and DDIM's fresh noise) and the eta noise seed delta (ENSD).

Euler a's eta is checked step by step against k-diffusion's formula in test_engine.py; here, on the micro
model: what each setting does to a picture, what the infotext says (as A1111 writes it), and that reading it
back makes the same picture.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch

from engine import GenerationRequest, InvalidRequestError, Result
from engine.infotext import parse_infotext, parse_infotext_params
from engine.noise import reseed_after_start

REQUEST = {"prompt": "a red circle on a blue background", "steps": 8, "seed": 21}


def generate(engine, **fields) -> Result:
    result = list(engine.generate(GenerationRequest(**{**REQUEST, **fields})))[-1]
    assert isinstance(result, Result), result
    return result


def same(a: Result, b: Result) -> bool:
    return np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def pixels(result: Result) -> np.ndarray:
    return np.asarray(result.images[0]).astype(int)


def test_euler_a_at_eta_0_is_euler_and_eta_shows_in_the_infotext(micro_engine):
    euler = generate(micro_engine, sampler_name="Euler")
    no_noise = generate(micro_engine, sampler_name="Euler a", eta=0)
    assert same(no_noise, euler)  # no fresh noise: the same steps as Euler, byte for byte
    default = generate(micro_engine, sampler_name="Euler a")
    half = generate(micro_engine, sampler_name="Euler a", eta=0.5)
    assert not same(half, default) and not same(half, no_noise)
    assert same(generate(micro_engine, sampler_name="Euler a", eta=1), default)  # 1 is the default
    assert "Eta" not in parse_infotext_params(default.infotexts[0])
    assert parse_infotext_params(half.infotexts[0])["Eta"] == "0.5"
    again = list(micro_engine.generate(parse_infotext(half.infotexts[0])))[-1]
    assert same(again, half)


def test_dpm2_a_at_eta_0_is_dpm2_and_its_eta_reads_back(micro_engine):
    dpm2 = generate(micro_engine, sampler_name="DPM2")
    assert same(generate(micro_engine, sampler_name="DPM2 a", eta=0), dpm2)  # no fresh noise: DPM2's steps
    default = generate(micro_engine, sampler_name="DPM2 a")
    half = generate(micro_engine, sampler_name="DPM2 a", eta=0.5)
    assert not same(half, default) and not same(half, dpm2)
    assert same(generate(micro_engine, sampler_name="DPM2 a", eta=1), default)  # 1 is the default
    assert parse_infotext_params(half.infotexts[0])["Eta"] == "0.5"
    assert same(list(micro_engine.generate(parse_infotext(half.infotexts[0])))[-1], half)


def test_dpmpp_2s_a_adds_noise_from_the_ensd_seed_and_its_eta_reads_back(micro_engine):
    """A1111's DPM++ 2S a is ancestral (checked step by step in test_engine.py): its steps' noise comes from seed + ENSD,
    and A1111 writes ENSD for it; at eta 0 it adds none."""
    default = generate(micro_engine, sampler_name="DPM++ 2S a")
    delta = generate(micro_engine, sampler_name="DPM++ 2S a", eta_noise_seed_delta=31337)
    assert not same(delta, default) and parse_infotext_params(delta.infotexts[0])["ENSD"] == "31337"
    assert same(list(micro_engine.generate(parse_infotext(delta.infotexts[0])))[-1], delta)
    still = generate(micro_engine, sampler_name="DPM++ 2S a", eta=0)
    assert not same(still, default) and parse_infotext_params(still.infotexts[0])["Eta"] == "0"
    assert same(generate(micro_engine, sampler_name="DPM++ 2S a", eta=0, eta_noise_seed_delta=31337), still)


@pytest.mark.parametrize("sampler", ["DPM++ 2M SDE", "DPM++ 2M SDE Heun"])
def test_dpmpp_2m_sde_takes_eta_and_at_0_adds_no_noise(micro_engine, sampler):
    default = generate(micro_engine, sampler_name=sampler)
    half = generate(micro_engine, sampler_name=sampler, eta=0.5)
    assert not same(half, default) and parse_infotext_params(half.infotexts[0])["Eta"] == "0.5"
    assert same(list(micro_engine.generate(parse_infotext(half.infotexts[0])))[-1], half)
    # The noise steps add comes from the seed's Brownian tree, as in A1111: ENSD changes nothing, and A1111 writes none.
    with_delta = generate(micro_engine, sampler_name=sampler, eta=0.5, eta_noise_seed_delta=31337)
    assert same(with_delta, half) and "ENSD" not in parse_infotext_params(with_delta.infotexts[0])
    still = generate(micro_engine, sampler_name=sampler, eta=0)
    assert same(generate(micro_engine, sampler_name=sampler, eta=0, eta_noise_seed_delta=31337), still)
    if sampler == "DPM++ 2M SDE":  # and the steps are DPM++ 2M's
        plain = generate(micro_engine, sampler_name="DPM++ 2M", scheduler="Exponential")
        assert same(still, plain)


def test_dpmpp_sde_takes_eta_and_its_eta_1_is_diffusers_own_step(micro_engine):
    """DPM++ SDE's eta runs k-diffusion's sample_dpmpp_sde (checked step by step in test_engine.py); just below 1 it
    draws what diffusers' own step (eta 1) draws, to a level."""
    default = generate(micro_engine, sampler_name="DPM++ SDE")
    nearly = generate(micro_engine, sampler_name="DPM++ SDE", eta=0.9999999)
    assert np.abs(pixels(nearly) - pixels(default)).max() <= 1
    half = generate(micro_engine, sampler_name="DPM++ SDE", eta=0.5)
    assert (
        np.abs(pixels(half) - pixels(default)).mean() > 1 and parse_infotext_params(half.infotexts[0])["Eta"] == "0.5"
    )
    assert same(list(micro_engine.generate(parse_infotext(half.infotexts[0])))[-1], half)


def test_dpmpp_3m_sde_takes_eta_and_at_0_adds_no_noise(micro_engine):
    """DPM++ 3M SDE is k-diffusion's at every eta (checked step by step in test_engine.py)."""
    default = generate(micro_engine, sampler_name="DPM++ 3M SDE")
    half = generate(micro_engine, sampler_name="DPM++ 3M SDE", eta=0.5)
    assert (
        np.abs(pixels(half) - pixels(default)).mean() > 1 and parse_infotext_params(half.infotexts[0])["Eta"] == "0.5"
    )
    assert same(list(micro_engine.generate(parse_infotext(half.infotexts[0])))[-1], half)
    still = generate(micro_engine, sampler_name="DPM++ 3M SDE", eta=0)
    assert same(generate(micro_engine, sampler_name="DPM++ 3M SDE", eta=0, eta_noise_seed_delta=31337), still)


@pytest.mark.parametrize("sampler", ["DPM2 a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE"])
def test_sigma_noise_scales_the_fresh_noise_of_the_samplers_that_add_it(micro_engine, sampler):
    default = generate(micro_engine, sampler_name=sampler)
    assert same(generate(micro_engine, sampler_name=sampler, s_noise=1.0), default)
    scaled = generate(micro_engine, sampler_name=sampler, s_noise=0.5)
    assert np.abs(pixels(scaled) - pixels(default)).mean() > 1
    assert parse_infotext_params(scaled.infotexts[0])["Sigma noise"] == "0.5"
    assert same(list(micro_engine.generate(parse_infotext(scaled.infotexts[0])))[-1], scaled)
    # None of it: nothing is added after the start, so the noise seed the steps draw from no longer matters.
    silent = generate(micro_engine, sampler_name=sampler, s_noise=0)
    assert same(generate(micro_engine, sampler_name=sampler, s_noise=0, eta_noise_seed_delta=31337), silent)


def test_sigma_noise_leaves_the_other_samplers_alone(micro_engine):
    for sampler in ("Euler a", "Euler", "DPM++ 2M"):
        plain = generate(micro_engine, sampler_name=sampler)
        other = generate(micro_engine, sampler_name=sampler, s_noise=0.5)
        assert same(other, plain), sampler
        # Euler's sigma churn takes it (here off: nothing to scale); A1111 writes it for Euler all the same.
        assert ("Sigma noise" in other.infotexts[0]) == (sampler == "Euler"), sampler


def test_ddim_eta_adds_noise_and_is_written_as_eta_ddim(micro_engine):
    default = generate(micro_engine, sampler_name="DDIM")
    noisy = generate(micro_engine, sampler_name="DDIM", eta=0.7)
    assert not same(noisy, default)
    assert "Eta DDIM" not in parse_infotext_params(default.infotexts[0])
    assert parse_infotext_params(noisy.infotexts[0])["Eta DDIM"] == "0.7"
    assert same(list(micro_engine.generate(parse_infotext(noisy.infotexts[0])))[-1], noisy)


def test_ensd_changes_only_the_noise_drawn_after_the_start(micro_engine):
    plain = generate(micro_engine, sampler_name="Euler a")
    delta = generate(micro_engine, sampler_name="Euler a", eta_noise_seed_delta=31337)
    assert not same(delta, plain)
    assert parse_infotext_params(delta.infotexts[0])["ENSD"] == "31337"
    assert same(list(micro_engine.generate(parse_infotext(delta.infotexts[0])))[-1], delta)
    # Samplers that draw nothing after the start make the same picture; A1111 writes no ENSD for them, nor
    # for Euler a at eta 0.
    for fields in ({"sampler_name": "Euler"}, {"sampler_name": "DPM++ 2M"}, {"sampler_name": "Euler a", "eta": 0}):
        with_delta = generate(micro_engine, **fields, eta_noise_seed_delta=31337)
        assert same(with_delta, generate(micro_engine, **fields)), fields
        assert "ENSD" not in parse_infotext_params(with_delta.infotexts[0]), fields


def test_ensd_reseeds_each_generator_once_the_starting_noise_is_drawn():
    class Pipeline:
        def prepare_latents(self, shape, dtype, device, generator, latents=None):
            return torch.stack([torch.randn(shape, generator=g) for g in generator])

    pipe, seeds = Pipeline(), [5, 9]
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    reseed_after_start(pipe, seeds, 100)
    start = pipe.prepare_latents((3,), None, None, generators)
    assert torch.equal(start[1], torch.randn((3,), generator=torch.Generator().manual_seed(9)))
    for generator, seed in zip(generators, seeds, strict=True):
        assert torch.equal(
            torch.randn(4, generator=generator), torch.randn(4, generator=torch.Generator().manual_seed(seed + 100))
        )


def test_bad_eta_or_ensd_is_refused_by_name(micro_engine):
    for fields, field in (
        ({"eta": 1.5}, "eta"),
        ({"eta": "x"}, "eta"),
        ({"eta_noise_seed_delta": -1}, "eta_noise_seed_delta"),
    ):
        with pytest.raises(InvalidRequestError) as refused:
            micro_engine.validate(GenerationRequest(**{**REQUEST, **fields}))
        assert refused.value.field == field


def test_the_api_takes_eta_and_ensd_as_a1111_does(micro_engine, tmp_path):
    from ui.server import ServerSettings, launch

    handle = launch(micro_engine, ServerSettings(host="127.0.0.1", port=0, api=True, outputs_dir=tmp_path, page=False))
    try:
        with httpx.Client(base_url=handle.url + "sdapi/v1/", timeout=120) as api:
            base = {**REQUEST, "sampler_name": "Euler a"}
            info = json.loads(api.post("txt2img", json={**base, "eta": 0.5}).json()["info"])
            assert "Eta: 0.5" in info["infotexts"][0] and "eta" not in info["ignored_fields"]
            overridden = {**base, "override_settings": {"eta_noise_seed_delta": 31337}}
            info = json.loads(api.post("txt2img", json=overridden).json()["info"])
            assert "ENSD: 31337" in info["infotexts"][0] and not info["ignored_fields"]
            # Through /options it stays for later jobs, as in A1111.
            assert api.post("options", json={"eta_noise_seed_delta": 1}).status_code == 200
            assert "ENSD: 1" in json.loads(api.post("txt2img", json=base).json()["info"])["infotexts"][0]
            refused = api.post("options", json={"eta_noise_seed_delta": -5})
            assert refused.status_code == 422 and refused.json()["field"] == "eta_noise_seed_delta"
            api.post("options", json={"eta_noise_seed_delta": 0})
            # A1111's eta settings, per sampler kind: eta_ancestral (Euler a) and eta_ddim.
            info = json.loads(
                api.post("txt2img", json={**base, "override_settings": {"eta_ancestral": 0.5}}).json()["info"]
            )
            assert "Eta: 0.5" in info["infotexts"][0] and not info["ignored_fields"]
            assert api.post("options", json={"eta_ddim": 0.7}).status_code == 200
            ddim = json.loads(api.post("txt2img", json={**REQUEST, "sampler_name": "DDIM"}).json()["info"])
            assert "Eta DDIM: 0.7" in ddim["infotexts"][0]
            assert "Eta" not in json.loads(api.post("txt2img", json=base).json()["info"])["infotexts"][0]
            api.post("options", json={"eta_ddim": 0})
            assert api.post("options", json={"eta_ancestral": 2}).json()["field"] == "eta_ancestral"
            # A sampler that takes no eta here: listed, as every field this engine does not act on.
            info = json.loads(
                api.post("txt2img", json={**REQUEST, "sampler_name": "DPM++ 2M", "eta": 0.5}).json()["info"]
            )
            assert "eta" in info["ignored_fields"]
            # Sigma noise: the payload's, else the option's; listed as ignored where the sampler adds no noise.
            info = json.loads(
                api.post("txt2img", json={**REQUEST, "sampler_name": "DPM2 a", "s_noise": 0.5}).json()["info"]
            )
            assert "Sigma noise: 0.5" in info["infotexts"][0] and not info["ignored_fields"]
            overridden = {**REQUEST, "sampler_name": "DPM++ SDE", "override_settings": {"s_noise": 0.8}}
            info = json.loads(api.post("txt2img", json=overridden).json()["info"])
            assert "Sigma noise: 0.8" in info["infotexts"][0] and not info["ignored_fields"]
            info = json.loads(
                api.post("txt2img", json={**REQUEST, "sampler_name": "DPM++ 2M", "s_noise": 0.5}).json()["info"]
            )
            assert info["ignored_fields"] == ["s_noise"]
            # A hires pass whose sampler takes it: used there, written, and not listed.
            hires = {"enable_hr": True, "hr_scale": 1.25, "denoising_strength": 0.5, "hr_sampler_name": "DPM2 a"}
            info = json.loads(
                api.post(
                    "txt2img", json={**REQUEST, **hires, "steps": 4, "sampler_name": "DPM++ 2M", "s_noise": 0.5}
                ).json()["info"]
            )
            assert "Sigma noise: 0.5" in info["infotexts"][0] and not info["ignored_fields"]
            assert api.post("options", json={"s_noise": 1.2}).json()["field"] == "s_noise"
    finally:
        handle.close()


def test_the_page_ensd_and_eta_belong_to_one_session(micro_engine):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from tests.test_browser import serve_page

    demo, url = serve_page(micro_engine, None)
    try:
        user_a, user_b = Client(url, verbose=False), Client(url, verbose=False)
        user_a.predict(31337, api_name="/set_ensd")
        user_a.predict(0.5, api_name="/set_eta_ancestral")
        args = ("a red circle on a blue background", "", "Euler a", "Automatic", 8, 7.0, 21, 64, 64, 1, 1)
        infotext = user_a.predict(*args, api_name="/txt2img")[3]
        assert "Eta: 0.5" in infotext and "ENSD: 31337" in infotext
        other = user_b.predict(*args, api_name="/txt2img")[3]
        assert "Eta" not in other and "ENSD" not in other
        user_a.predict(0.7, api_name="/set_s_noise")
        dpm2_a = ("a red circle on a blue background", "", "DPM2 a", "Automatic", 4, 7.0, 21, 64, 64, 1, 1)
        assert "Sigma noise: 0.7" in user_a.predict(*dpm2_a, api_name="/txt2img")[3]
        assert "Sigma noise" not in user_b.predict(*dpm2_a, api_name="/txt2img")[3]
        for api_name, bad in (("/set_ensd", -1), ("/set_eta_ancestral", 2), ("/set_s_noise", 1.5)):
            with pytest.raises(AppError, match="allowed|minimum|maximum"):
                user_a.predict(bad, api_name=api_name)
    finally:
        demo.close()


def test_png_info_send_sets_the_sessions_ensd_and_eta_from_the_infotext():
    import gradio as gr

    from engine.request import JOB_SETTINGS
    from ui.page import ReadInfotext, _sampler_parameters_from_infotext

    def sent(text: str) -> list:
        return _sampler_parameters_from_infotext(ReadInfotext.of(text))

    keep = gr.skip()

    def job_settings(**values) -> list:
        return [values.get(setting.field, keep) for setting in JOB_SETTINGS]

    # Eta, Eta DDIM, Clip skip, then the job settings in JOB_SETTINGS' order.
    text = "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64, Eta: 0.5, ENSD: 31337"
    assert sent(text) == [0.5, keep, 1, *job_settings(eta_noise_seed_delta=31337)]
    ddim = "a cat\nSteps: 20, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 64x64, Eta DDIM: 0.3"
    assert sent(ddim) == [keep, 0.3, 1, *job_settings()]
    img2img = "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Denoising strength: 0.5, Noise multiplier: 0.8"
    assert sent(img2img) == [keep, keep, 1, *job_settings(initial_noise_multiplier=0.8)]
    # A1111 writes Clip skip only when it is not 1, and pastes 1 when the text has none.
    assert sent(text + ", Clip skip: 2")[2] == 2
    # Every job setting is set where the infotext names it, and otherwise left as it is.
    every = (
        ", Color correction: True, Extra noise: 0.3, NGMS: 2.5, NGMS all steps: True, Skip Early CFG: 0.2, "
        "Conditional mask weight: 0.4, Sigma noise: 0.9, Schedule min sigma: 0.1, Schedule max sigma: 9, "
        "Schedule rho: 3"
    )
    assert sent(img2img + every)[3:] == job_settings(
        s_noise=0.9,
        sigma_min=0.1,
        sigma_max=9,
        rho=3,
        initial_noise_multiplier=0.8,
        img2img_extra_noise=0.3,
        color_correction=True,
        s_min_uncond=2.5,
        s_min_uncond_all=True,
        skip_early_cond=0.2,
        inpainting_mask_weight=0.4,
    )
    # The random source: the text's RNG; an A1111 text naming none (its default GPU source) sets NV.
    assert sent(text + ", RNG: CPU")[3:] == job_settings(eta_noise_seed_delta=31337, randn_source="CPU")
    assert sent(text + ", Version: v1.10.1")[3:] == job_settings(eta_noise_seed_delta=31337, randn_source="NV")


def test_png_info_send_says_which_of_the_sessions_settings_the_text_sets(engine, capsys):
    from ui.page import _send_png_info

    text = "a cat\nSteps: 4, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64, ENSD: 31337, Version: v1.10.1"
    # Outside a page event gradio prints its info; on the page it is a toast.
    _send_png_info(None, text, target_mode="txt2img", engine=engine)
    said = capsys.readouterr().out
    assert "Set from the text as this session's settings (Settings tab): ENSD: 31337, RNG: NV" in said
    _send_png_info(None, text.replace(", ENSD: 31337, Version: v1.10.1", ""), target_mode="txt2img", engine=engine)
    assert "Set from the text" not in capsys.readouterr().out
