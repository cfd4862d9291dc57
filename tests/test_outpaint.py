"""A1111's Poor man's outpainting: the picture grown on chosen sides, the new border inpainted tile by tile."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from gradio_client import handle_file
from PIL import Image

from engine import GenerationRequest, InvalidRequestError, Result
from engine.events import Progress
from engine.infotext import parse_infotext
from engine.outpaint import canvas_size, fields_from_script_args, layout, tile_job
from tests.test_api import api, decode, ok, png_b64, server  # noqa: F401 - fixtures
from tests.test_page_client import _client, outputs_dir, page_url  # noqa: F401 - fixtures
from training import dataset


def test_the_canvas_grows_as_a1111_grows_it():
    # Both sides of an axis together rounded up to a multiple of 64, shared as A1111 shares it.
    assert canvas_size((64, 64), 128, ("left", "right", "up", "down")) == (320, 320, 128, 128, 128, 128)
    assert canvas_size((100, 60), 32, ("left", "right")) == (192, 60, 46, 46, 0, 0)  # height kept: not chosen
    assert canvas_size((64, 64), 32, ("up",)) == (64, 128, 0, 0, 64, 0)
    # Tiles of 64 overlapping by 32 across 128: the middle one lies inside the picture and is not redrawn.
    plan = layout((64, 64), 32, ("left", "right"), 64, 64)
    assert plan.grid.columns == (0, 32, 64) and plan.redrawn == (0, 2)


def test_script_args_read_as_a1111s_api_sends_them():
    assert fields_from_script_args([16, 2, 1, ["left"]]) == {
        "outpaint": True,
        "outpaint_pixels": 16,
        "mask_blur": 2,
        "inpainting_fill": 1,
        "outpaint_directions": ["left"],
    }
    assert fields_from_script_args([16, 2, "latent noise"])["inpainting_fill"] == 2  # by name too
    assert fields_from_script_args([])["outpaint_directions"] == ["left", "right", "up", "down"]
    with pytest.raises(InvalidRequestError, match="at most 4 values"):
        fields_from_script_args([1, 2, 3, 4, 5])


def _outpaint_request(init: Image.Image, **fields) -> GenerationRequest:
    settings = dict(
        prompt="a red circle on a white background",
        seed=10,
        steps=12,
        init_images=[init],
        denoising_strength=0.75,
        outpaint=True,
        outpaint_pixels=32,
        outpaint_directions=("left", "right"),
        mask_blur=4,
        inpainting_fill=0,
    )
    return GenerationRequest(**{**settings, **fields})


def test_the_border_is_painted_tile_by_tile_and_the_infotext_makes_it_again(micro_engine, red_circle):
    request = _outpaint_request(red_circle)
    events = list(micro_engine.generate(request))
    result = events[-1]
    assert isinstance(result, Result) and result.seeds == [10]
    (picture,) = result.images
    assert picture.size == (128, 64)
    assert {(event.batch_no, event.batch_count) for event in events if isinstance(event, Progress)} == {(0, 2), (1, 2)}
    pixels, circle = np.asarray(picture).astype(int), np.asarray(red_circle).astype(int)
    # The picture's middle (inside the kept part of the mask, away from its blur) is untouched; the new border
    # continues its white background.
    assert np.array_equal(pixels[:, 56:72], circle[:, 24:40])
    border = Image.fromarray(np.concatenate([pixels[:, :24], pixels[:, -24:]], axis=1).astype(np.uint8))
    assert dataset.classify(border).background == "white"
    # The right tile (the second one redrawn, at the seed + 1) is exactly its inpainting job alone where no other
    # tile reaches.
    checked = micro_engine.validate(request)
    plan = layout(red_circle.size, 32, ("left", "right"), 64, 64)
    alone_request = dataclasses.replace(tile_job(checked, plan).request(checked, 1), seed=11)
    alone = list(micro_engine.generate(alone_request))[-1].images[0]
    assert np.array_equal(pixels[:, 96:], np.asarray(alone)[:, 32:])
    text = result.infotexts[0]
    assert "Outpaint pixels: 32, Outpaint direction: left right, Mask blur: 4, Masked content: fill" in text
    again = parse_infotext(text)
    again.init_images = [red_circle]
    assert list(micro_engine.generate(again))[-1].images[0].tobytes() == picture.tobytes()


@pytest.mark.parametrize(
    ("fields", "field", "allowed"),
    [
        ({"init_images": None}, "outpaint", "img2img only"),
        ({"mask": Image.new("L", (64, 64), 255)}, "outpaint", "img2img only"),
        ({"outpaint_pixels": 64}, "outpaint_pixels", "less than the tile size, 64x64"),
        ({"outpaint_pixels": 4}, "outpaint_pixels", "8 to 256"),
        ({"outpaint_directions": ()}, "outpaint_directions", "one or more of left, right, up, down"),
        ({"outpaint_directions": ("sideways",)}, "outpaint_directions", "one or more of left, right, up, down"),
        ({"width": 128, "outpaint_directions": ("up",)}, "outpaint_pixels", "at least one tile, 128x64"),
        ({"loopback": True}, "outpaint", "one script at a time"),
    ],
)
def test_settings_it_cannot_use_are_refused_by_field(micro_engine, fields, field, allowed):
    with pytest.raises(InvalidRequestError) as refused:
        micro_engine.validate(_outpaint_request(Image.new("RGB", (64, 64), "white"), **fields))
    assert refused.value.field == field and allowed in refused.value.allowed, refused.value


def img2img_payload() -> dict:
    """A small img2img job on an orange 64x64 picture, for the scripts' API tests."""
    return {
        "prompt": "a cat",
        "steps": 3,
        "width": 64,
        "height": 64,
        "denoising_strength": 0.8,
        "init_images": [png_b64(Image.new("RGB", (64, 64), "orange"))],
    }


def test_the_api_runs_poor_mans_outpainting_as_an_img2img_script(api):  # noqa: F811
    payload = {
        **img2img_payload(),
        "script_name": "Poor man's outpainting",
        "script_args": [16, 2, "original", ["down"]],
    }
    body = ok(api.post("img2img", json=payload))
    info = json.loads(body["info"])
    assert [decode(image).size for image in body["images"]] == [(64, 128)]
    assert info["ignored_fields"] == [] and "Outpaint direction: down" in info["infotexts"][0]
    refused = api.post("img2img", json={**payload, "script_args": [16, 2, "original", ["sideways"]]})
    assert refused.status_code == 422 and refused.json()["field"] == "outpaint_directions"
    refused = api.post("txt2img", json={key: payload[key] for key in ("prompt", "script_name", "script_args")})
    assert refused.status_code == 422 and refused.json()["field"] == "script_name"
    assert "poor man's outpainting" in ok(api.get("scripts"))["img2img"]


def page_img2img(url, tmp_path, sampler: str, **script) -> tuple[list, str]:
    """(gallery, infotext) of a 3-step img2img job on a teal 64x64 picture at denoising 0.8, from the page's img2img
    endpoint with `script`'s fields."""
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), "teal").save(init)
    common = ("a boat", "", sampler, "Automatic", 3, 7.0, 30, 64, 64, 1, 1)
    _, _, gallery, infotext = _client(url).predict(*common, handle_file(str(init)), 0.8, **script, api_name="/img2img")
    return gallery, infotext


def test_the_page_outpaints_from_the_img2img_tab(page_url, tmp_path):  # noqa: F811
    outpainting = dict(outpaint_on=True, outpaint_pixels=16, outpaint_mask_blur=2, outpaint_directions=["left"])
    gallery, infotext = page_img2img(page_url, tmp_path, "Euler", **outpainting)
    assert [Image.open(item["image"]).size for item in gallery] == [(128, 64)]
    assert "Outpaint pixels: 16, Outpaint direction: left, Mask blur: 2, Masked content: fill" in infotext


# Outpainting mk2 (engine/outpaint_mk2.py, tests/test_outpaint_mk2.py) through the API and the page, on the servers
# these tests start.


def test_the_api_runs_outpainting_mk2_as_an_img2img_script(api):  # noqa: F811
    payload = {
        **img2img_payload(),
        "script_name": "Outpainting mk2",
        "script_args": ["", 32, 4, ["up"], 1.0, 0.05],
    }
    body = ok(api.post("img2img", json=payload))
    info = json.loads(body["info"])
    assert [decode(image).size for image in body["images"]] == [(64, 128)]
    assert info["ignored_fields"] == [] and "Mask blur: 16, Masked content: original" in info["infotexts"][0]
    refused = api.post("img2img", json={**payload, "script_args": ["", 32, 4, ["up"], 9.0]})
    assert refused.status_code == 422 and refused.json()["field"] == "outpaint_mk2_noise_q"
    scripts = {item["name"]: item for item in ok(api.get("script-info"))}
    assert [arg["label"] for arg in scripts["outpainting mk2"]["args"]][1:3] == ["Pixels to expand", "Mask blur"]
    assert "outpainting mk2" in ok(api.get("scripts"))["img2img"]


def test_the_page_runs_outpainting_mk2_from_the_img2img_tab(page_url, tmp_path):  # noqa: F811
    mk2 = dict(
        outpaint_mk2_on=True, outpaint_mk2_pixels=16, outpaint_mk2_mask_blur=2, outpaint_mk2_directions=["right"]
    )
    gallery, infotext = page_img2img(page_url, tmp_path, "Euler a", **mk2)
    assert [Image.open(item["image"]).size for item in gallery] == [(128, 64)]
    assert "Mask blur: 8, Masked content: original" in infotext
