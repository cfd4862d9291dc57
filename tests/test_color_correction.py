"""A1111's "Apply color correction to img2img results to match original colors".

tests/data/color_correction/ holds a picture (init.png), a copy drifted in colour (drifted.png) and what A1111's
own apply_color_correction (OpenCV 5.1, scikit-image 0.26, blendmodes 2025) made of the drifted copy with init.png
as its reference (a1111.png)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from engine import GenerationRequest, InvalidRequestError, Result
from engine.color_correction import correct_colors, lab_from_rgb, rgb_from_lab
from engine.infotext import parse_infotext, parse_infotext_params
from tests.test_api import api, ok, png_b64, server  # noqa: F401 - fixtures
from tests.test_page_client import _client, outputs_dir, page_url  # noqa: F401 - fixtures

DATA = Path(__file__).parent / "data" / "color_correction"
LUMA = np.array([0.299, 0.587, 0.114])


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def run(engine, request: GenerationRequest) -> Result:
    result = list(engine.generate(request))[-1]
    assert isinstance(result, Result), result
    return result


def test_it_matches_a1111s_color_correction_within_a_few_levels():
    init, drifted = Image.open(DATA / "init.png"), Image.open(DATA / "drifted.png")
    ours, theirs = pixels(correct_colors(drifted, init)), pixels(Image.open(DATA / "a1111.png"))
    apart = np.abs(ours - theirs)
    assert apart.mean() < 0.5 and np.mean(apart > 3) < 0.005, (apart.mean(), np.mean(apart > 3))
    # And it does what it is for: the drift is mostly gone.
    assert np.abs(ours - pixels(init)).mean() * 3 < np.abs(pixels(drifted) - pixels(init)).mean()


def test_lab_is_opencvs_8_bit_encoding():
    # Values OpenCV's cvtColor(COLOR_RGB2LAB) gives for these 8-bit colours.
    colours = np.array([[[255, 0, 0], [0, 0, 255], [128, 128, 128], [255, 255, 255], [0, 0, 0], [0, 255, 0]]], np.uint8)
    opencv = [[[136, 208, 195], [82, 207, 20], [137, 128, 128], [255, 128, 128], [0, 128, 128], [224, 42, 211]]]
    assert lab_from_rgb(colours).tolist() == opencv
    # 8 bits of L*a*b* lose a little, as OpenCV's cvtColor(COLOR_LAB2RGB) loses it.
    opencv_back = [[255, 2, 1], [0, 1, 255], [128, 128, 128], [255, 255, 255], [0, 0, 0], [7, 255, 3]]
    assert np.abs(rgb_from_lab(np.array(opencv, np.uint8))[0].astype(int) - opencv_back).max() <= 1


def test_the_hue_comes_from_the_reference_and_the_luminosity_stays():
    def circle(colour: str) -> Image.Image:
        picture = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(picture).ellipse((12, 12, 52, 52), fill=colour)
        return picture

    blue = circle((40, 60, 200))
    corrected = pixels(correct_colors(blue, circle((200, 40, 30))))
    red, green, blue_channel = corrected[32, 32]
    assert red > blue_channel + 60 and red > green + 60, corrected[32, 32]  # the circle is red now
    own, kept = pixels(blue) @ LUMA, corrected @ LUMA
    assert np.abs(own - kept).max() <= 1.5  # each pixel as light or dark as it was
    assert (corrected[0, 0] == 255).all()  # white stays white


def test_img2img_results_are_corrected_to_their_init_image_and_the_infotext_says_so(micro_engine, red_circle):
    request = GenerationRequest(
        prompt="a large blue circle on a yellow background",
        seed=4,
        steps=8,
        init_images=[red_circle],
        denoising_strength=0.6,
    )
    plain = run(micro_engine, request)
    corrected = run(micro_engine, dataclasses.replace(request, color_correction=True))
    # The same sampling, then A1111's correction towards the init image.
    assert corrected.images[0].tobytes() == correct_colors(plain.images[0], red_circle).tobytes()
    assert "Color correction" not in parse_infotext_params(plain.infotexts[0])
    assert parse_infotext_params(corrected.infotexts[0])["Color correction"] == "True"
    # The colours came back towards the red circle on white.
    init_mean = pixels(red_circle).reshape(-1, 3).mean(0)
    assert np.abs(pixels(corrected.images[0]).reshape(-1, 3).mean(0) - init_mean).sum() < (
        np.abs(pixels(plain.images[0]).reshape(-1, 3).mean(0) - init_mean).sum()
    )
    # The infotext and the init image make it again.
    again = dataclasses.replace(parse_infotext(corrected.infotexts[0]), init_images=[red_circle])
    assert again.color_correction and run(micro_engine, again).images[0].tobytes() == corrected.images[0].tobytes()
    # txt2img has no init image: nothing to correct, nothing written.
    txt2img = run(micro_engine, GenerationRequest(prompt="a red circle", seed=4, steps=4, color_correction=True))
    assert "Color correction" not in parse_infotext_params(txt2img.infotexts[0])


def test_inpaint_corrects_the_masked_part_only(micro_engine, red_circle):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    request = GenerationRequest(
        prompt="a large blue circle on a green background",
        seed=2,
        steps=8,
        init_images=[red_circle],
        mask=mask,
        mask_blur=0,
        inpainting_fill=1,
        inpaint_full_res=False,
        denoising_strength=0.8,
    )
    plain = pixels(run(micro_engine, request).images[0])
    corrected = pixels(run(micro_engine, dataclasses.replace(request, color_correction=True)).images[0])
    inside = np.asarray(mask) > 0
    assert (corrected[~inside] == pixels(red_circle)[~inside]).all()
    assert np.abs(corrected - plain)[inside].mean() > 2


def test_every_loopback_loop_is_corrected_to_the_first_picture(micro_engine, red_circle):
    settings = dict(
        prompt="a large blue square on a yellow background",
        seed=10,
        steps=6,
        init_images=[red_circle],
        denoising_strength=0.5,
        loopback=True,
        loopback_loops=2,
        loopback_final_denoising=0.5,
        color_correction=True,
    )
    loops = run(micro_engine, GenerationRequest(**settings))
    # Loop 2 is loop 1's picture redrawn, then corrected to the red circle (not to loop 1's picture).
    second = dataclasses.replace(parse_infotext(loops.infotexts[1]), init_images=[loops.images[0]])
    raw = run(micro_engine, dataclasses.replace(second, color_correction=False)).images[0]
    assert loops.images[1].tobytes() == correct_colors(raw, red_circle).tobytes()
    assert loops.images[1].tobytes() != correct_colors(raw, loops.images[0]).tobytes()


def test_a_value_that_is_not_a_switch_is_refused_by_name(micro_engine, red_circle):
    with pytest.raises(InvalidRequestError) as refused:
        micro_engine.validate(GenerationRequest(prompt="x", init_images=[red_circle], color_correction="yes"))
    assert refused.value.field == "color_correction" and refused.value.allowed == "true or false"


def test_the_api_takes_a1111s_setting_from_the_override_and_the_options(api):  # noqa: F811
    picture = png_b64(Image.new("RGB", (64, 64), "orange"))
    payload = {"prompt": "x", "steps": 3, "width": 64, "height": 64, "init_images": [picture], "seed": 5}

    def infotext(body: dict) -> dict:
        info = json.loads(body["info"])
        assert not any("color_correction" in field for field in info["ignored_fields"])
        return parse_infotext_params(info["infotexts"][0])

    assert "Color correction" not in infotext(ok(api.post("img2img", json=payload)))
    overridden = {**payload, "override_settings": {"img2img_color_correction": True}}
    assert infotext(ok(api.post("img2img", json=overridden)))["Color correction"] == "True"
    ok(api.post("options", json={"img2img_color_correction": True}))
    try:
        assert ok(api.get("options"))["img2img_color_correction"] is True
        assert infotext(ok(api.post("img2img", json=payload)))["Color correction"] == "True"
        off = {**payload, "override_settings": {"img2img_color_correction": False}}
        assert "Color correction" not in infotext(ok(api.post("img2img", json=off)))
    finally:
        ok(api.post("options", json={"img2img_color_correction": False}))
    refused = api.post("img2img", json={**payload, "override_settings": {"img2img_color_correction": "often"}})
    assert refused.status_code == 422 and refused.json()["field"] == "override_settings.img2img_color_correction"
    refused = api.post("options", json={"img2img_color_correction": 2})
    assert refused.status_code == 422 and refused.json()["field"] == "img2img_color_correction"
    assert "Color correction" not in infotext(ok(api.post("img2img", json=payload)))  # the next request works


def test_the_page_setting_is_this_sessions_own(page_url, tmp_path):  # noqa: F811
    from gradio_client import handle_file

    init_path = tmp_path / "init.png"
    Image.new("RGB", (64, 64), "teal").save(init_path)
    args = ("x", "", "Euler", "Automatic", 3, 7.0, 9, 64, 64, 1, 1, handle_file(str(init_path)), 0.5)
    client, other = _client(page_url), _client(page_url)
    client.predict(True, api_name="/set_color_correction")
    assert "Color correction: True" in client.predict(*args, api_name="/img2img")[3]
    assert "Color correction" not in other.predict(*args, api_name="/img2img")[3]
