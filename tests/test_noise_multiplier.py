"""A1111's "Noise multiplier for img2img": the noise img2img and inpaint add to the picture, scaled.

On the micro model with Euler (which adds no noise of its own after the start): at 0 the seed no longer
matters, at 1 nothing changes, and the infotext records it as A1111 writes it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from engine import GenerationRequest, InvalidRequestError, Result
from engine.infotext import parse_infotext, parse_infotext_params
from tests.test_api import api, ok, png_b64, server  # noqa: F401 - fixtures
from tests.test_page_client import _client, outputs_dir, page_url  # noqa: F401 - fixtures

PROMPT = "a green circle on a blue background"


def run(engine, request: GenerationRequest) -> Result:
    result = list(engine.generate(request))[-1]
    assert isinstance(result, Result), result
    return result


def pixels(result: Result) -> np.ndarray:
    return np.asarray(result.images[0]).astype(int)


@pytest.fixture(scope="module")
def init_picture(micro_engine) -> Image.Image:
    return run(micro_engine, GenerationRequest(prompt="a red circle on a blue background", seed=3, steps=12)).images[0]


def img2img(init: Image.Image, **fields) -> GenerationRequest:
    base = dict(prompt=PROMPT, sampler_name="Euler", steps=12, denoising_strength=0.6, init_images=[init], seed=1)
    return GenerationRequest(**{**base, **fields})


def test_the_multiplier_scales_img2imgs_noise(micro_engine, init_picture):
    plain = run(micro_engine, img2img(init_picture))
    assert np.array_equal(pixels(run(micro_engine, img2img(init_picture, initial_noise_multiplier=1.0))), pixels(plain))
    assert "Noise multiplier" not in parse_infotext_params(plain.infotexts[0])
    other_seed = run(micro_engine, img2img(init_picture, seed=2))
    assert np.abs(pixels(other_seed) - pixels(plain)).mean() > 5
    # No noise: the picture only denoises, so the seed has no say (the picture is encoded to its mean latents).
    silent = [run(micro_engine, img2img(init_picture, seed=seed, initial_noise_multiplier=0)) for seed in (1, 2)]
    assert np.array_equal(pixels(silent[0]), pixels(silent[1]))
    half = run(micro_engine, img2img(init_picture, initial_noise_multiplier=0.5))
    assert np.abs(pixels(half) - pixels(plain)).mean() > 1
    assert parse_infotext_params(half.infotexts[0])["Noise multiplier"] == "0.5"
    again = dataclasses.replace(parse_infotext(half.infotexts[0]), init_images=[init_picture])
    assert again.initial_noise_multiplier == 0.5
    assert np.array_equal(pixels(run(micro_engine, again)), pixels(half))


def test_inpaint_at_full_strength_starts_from_the_scaled_noise(micro_engine, init_picture):
    mask = Image.new("L", init_picture.size, 0)
    mask.paste(255, (16, 16, 48, 48))
    inside = np.asarray(mask) > 0

    def pair(multiplier: float) -> list[np.ndarray]:
        fields = dict(mask=mask, denoising_strength=1.0, initial_noise_multiplier=multiplier)
        return [pixels(run(micro_engine, img2img(init_picture, seed=seed, **fields))) for seed in (1, 2)]

    silent, noisy = pair(0), pair(1)
    # The masked area starts from the scaled noise: without it the seeds' pictures are much closer. Beyond the reach
    # of the blurred mask (mask blur 4) both are the picture itself.
    assert np.abs(silent[0] - silent[1])[inside].mean() * 2 < np.abs(noisy[0] - noisy[1])[inside].mean()
    untouched = np.asarray(mask.filter(ImageFilter.GaussianBlur(4))) == 0
    assert np.abs(silent[0] - noisy[0])[inside].mean() > 2 and untouched.sum() > 1000
    assert (silent[0] == noisy[0])[untouched].all()


def test_txt2img_and_its_hires_pass_ignore_it(micro_engine):
    request = GenerationRequest(prompt=PROMPT, seed=4, steps=8, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=4)
    plain = run(micro_engine, request)
    scaled = run(micro_engine, dataclasses.replace(request, initial_noise_multiplier=0.3))
    assert np.array_equal(pixels(scaled), pixels(plain))
    assert "Noise multiplier" not in parse_infotext_params(scaled.infotexts[0])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("initial_noise_multiplier", -0.1),
        ("initial_noise_multiplier", 1.6),
        ("initial_noise_multiplier", "lots"),
        ("initial_noise_multiplier", float("nan")),
        ("img2img_extra_noise", -0.1),
        ("img2img_extra_noise", 1.1),
    ],
)
def test_values_outside_a1111s_range_are_refused_by_name(micro_engine, init_picture, field, value):
    with pytest.raises(InvalidRequestError) as refused:
        micro_engine.validate(img2img(init_picture, **{field: value}))
    assert refused.value.field == field


def test_the_api_takes_the_field_the_override_and_the_option(api):  # noqa: F811
    picture = png_b64(Image.new("RGB", (64, 64), "orange"))
    payload = {"prompt": "x", "steps": 3, "width": 64, "height": 64, "init_images": [picture], "seed": 5}

    def infotext(body: dict) -> dict:
        info = json.loads(body["info"])
        assert "initial_noise_multiplier" not in info["ignored_fields"]
        return parse_infotext_params(info["infotexts"][0])

    assert (
        infotext(ok(api.post("img2img", json={**payload, "initial_noise_multiplier": 0.75})))["Noise multiplier"]
        == "0.75"
    )
    overridden = {**payload, "override_settings": {"initial_noise_multiplier": 0.25}}
    assert infotext(ok(api.post("img2img", json=overridden)))["Noise multiplier"] == "0.25"
    ok(api.post("options", json={"initial_noise_multiplier": 0.5}))
    try:
        assert infotext(ok(api.post("img2img", json=payload)))["Noise multiplier"] == "0.5"
        assert "Noise multiplier" not in infotext(
            ok(api.post("img2img", json={**payload, "initial_noise_multiplier": 1}))
        )
    finally:
        ok(api.post("options", json={"initial_noise_multiplier": 1.0}))
    refused = api.post("img2img", json={**payload, "initial_noise_multiplier": 2})
    assert refused.status_code == 422 and refused.json()["field"] == "initial_noise_multiplier"
    assert api.post("options", json={"initial_noise_multiplier": -1}).status_code == 422


def test_the_page_setting_is_this_sessions_own(page_url, tmp_path):  # noqa: F811
    from gradio_client import handle_file

    init_path = tmp_path / "init.png"
    Image.new("RGB", (64, 64), "teal").save(init_path)
    args = ("x", "", "Euler", "Automatic", 3, 7.0, 9, 64, 64, 1, 1, handle_file(str(init_path)), 0.5)
    client, other = _client(page_url), _client(page_url)
    client.predict(0.8, api_name="/set_noise_multiplier")
    assert "Noise multiplier: 0.8" in client.predict(*args, api_name="/img2img")[3]
    assert "Noise multiplier" not in other.predict(*args, api_name="/img2img")[3]
    with pytest.raises(Exception, match="1.5"):  # the slider's own check names its maximum
        client.predict(3, api_name="/set_noise_multiplier")
    assert "Noise multiplier: 0.8" in client.predict(*args, api_name="/img2img")[3]  # the setting stands


def first_sigma(engine, request: GenerationRequest) -> tuple[Result, float]:
    """The job's result and the noise level sigma its start was noised to: its first UNet call's, or for DDIM the
    timestep's above it, where A1111's DDIM noises its picture."""
    from tests.test_ngms import sd_schedule

    timesteps = []
    handle = engine.loaded.components["unet"].register_forward_pre_hook(
        lambda _m, args, kwargs: timesteps.append(args[1] if len(args) > 1 else kwargs["timestep"]), with_kwargs=True
    )
    try:
        result = run(engine, request)
    finally:
        handle.remove()
    above = 1000 // request.steps if request.sampler_name == "DDIM" else 0
    return result, sd_schedule().sigma(timesteps[0] + above)


@pytest.mark.parametrize("sampler", ["Euler", "DDIM", "DPM++ 2M"])
def test_extra_noise_is_the_starting_noise_once_more(micro_engine, init_picture, sampler):
    """A1111's extra noise e adds e times the start's noise to the start, as a sigma-s0 start gets s0 times it: so
    it draws what a noise multiplier of 1 + e/s0 draws, in variance-exploding (Euler) and -preserving (DDIM, DPM++)
    schedulers alike, to a level."""
    plain = run(micro_engine, img2img(init_picture, sampler_name=sampler))
    assert np.array_equal(
        pixels(run(micro_engine, img2img(init_picture, sampler_name=sampler, img2img_extra_noise=0))), pixels(plain)
    )
    extra, sigma = first_sigma(micro_engine, img2img(init_picture, sampler_name=sampler, img2img_extra_noise=0.5))
    assert np.abs(pixels(extra) - pixels(plain)).mean() > 1
    same = run(micro_engine, img2img(init_picture, sampler_name=sampler, initial_noise_multiplier=1 + 0.5 / sigma))
    assert np.abs(pixels(extra) - pixels(same)).max() <= 1, sigma
    assert parse_infotext_params(extra.infotexts[0])["Extra noise"] == "0.5"
    again = dataclasses.replace(parse_infotext(extra.infotexts[0]), init_images=[init_picture])
    assert again.img2img_extra_noise == 0.5 and np.array_equal(pixels(run(micro_engine, again)), pixels(extra))


def test_extra_noise_reaches_the_hires_pass_and_inpaints_start_only(micro_engine, init_picture):
    request = GenerationRequest(prompt=PROMPT, seed=4, steps=8, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=4)
    plain, extra = run(micro_engine, request), run(micro_engine, dataclasses.replace(request, img2img_extra_noise=0.8))
    assert np.abs(pixels(extra) - pixels(plain)).mean() > 0.5
    assert parse_infotext_params(extra.infotexts[0])["Extra noise"] == "0.8"
    # txt2img alone starts from noise, not a picture: nothing changes, nothing is written.
    first_pass = dataclasses.replace(request, enable_hr=False)
    alone = run(micro_engine, dataclasses.replace(first_pass, img2img_extra_noise=0.8))
    assert np.array_equal(pixels(alone), pixels(run(micro_engine, first_pass)))
    assert "Extra noise" not in alone.infotexts[0]

    mask = Image.new("L", init_picture.size, 0)
    mask.paste(255, (16, 16, 48, 48))
    inside = np.asarray(mask) > 0
    fields = dict(mask=mask, mask_blur=0, inpaint_full_res=False)
    painted = pixels(run(micro_engine, img2img(init_picture, **fields)))
    more = pixels(run(micro_engine, img2img(init_picture, **fields, img2img_extra_noise=0.8)))
    assert np.abs(more - painted)[inside].mean() > 1 and np.array_equal(more[~inside], painted[~inside])


def test_extra_noise_through_the_api_and_the_page(api, page_url, tmp_path):  # noqa: F811
    from gradio_client import handle_file

    picture = png_b64(Image.new("RGB", (64, 64), "orange"))
    payload = {"prompt": "x", "steps": 3, "width": 64, "height": 64, "init_images": [picture], "seed": 5}
    body = ok(api.post("img2img", json={**payload, "override_settings": {"img2img_extra_noise": 0.4}}))
    info = json.loads(body["info"])
    assert info["ignored_fields"] == [] and "Extra noise: 0.4" in info["infotexts"][0]
    ok(api.post("options", json={"img2img_extra_noise": 0.2}))
    try:
        assert "Extra noise: 0.2" in json.loads(ok(api.post("img2img", json=payload))["info"])["infotexts"][0]
    finally:
        ok(api.post("options", json={"img2img_extra_noise": 0}))
    refused = api.post("img2img", json={**payload, "override_settings": {"img2img_extra_noise": 3}})
    assert refused.status_code == 422 and refused.json()["field"] == "override_settings.img2img_extra_noise"

    init_path = tmp_path / "init.png"
    Image.new("RGB", (64, 64), "teal").save(init_path)
    client = _client(page_url)
    client.predict(0.25, api_name="/set_extra_noise")
    args = ("x", "", "Euler", "Automatic", 3, 7.0, 9, 64, 64, 1, 1, handle_file(str(init_path)), 0.5)
    assert "Extra noise: 0.25" in client.predict(*args, api_name="/img2img")[3]
