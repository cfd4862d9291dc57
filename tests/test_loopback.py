"""A1111's Loopback script: each picture made becomes the init image of the next loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gradio_client import handle_file
from PIL import Image

from engine import GenerationRequest, InvalidRequestError, Result
from engine.events import JobControl, Progress
from engine.infotext import parse_infotext
from engine.loopback import denoising_strength, fields_from_script_args
from tests.test_api import api, decode, ok, png_b64, server  # noqa: F401 - fixtures
from tests.test_page_client import _client, outputs_dir, page_url  # noqa: F401 - fixtures
from training import dataset

PROMPT = "a large blue square on a yellow background"


def test_the_denoising_strength_moves_to_the_final_one_along_a1111s_curves():
    assert [denoising_strength(0.3, 0.6, "Linear", 4, loop) for loop in range(4)] == [0.3, 0.4, 0.5, 0.6]
    aggressive = [denoising_strength(0.3, 0.6, "Aggressive", 4, loop) for loop in range(4)]
    lazy = [denoising_strength(0.3, 0.6, "Lazy", 4, loop) for loop in range(4)]
    assert aggressive[0] == lazy[0] == 0.3 and aggressive[-1] == lazy[-1] == 0.6
    assert aggressive[1] == 0.45 and lazy[1] == pytest.approx(0.3 + 0.3 * (1 - np.cos(np.pi / 6)), abs=1e-6)
    assert denoising_strength(0.3, 0.6, "Linear", 1, 0) == 0.3  # one loop: the tab's strength


def test_script_args_read_as_a1111s_api_sends_them():
    assert fields_from_script_args([3, 0.7, "Lazy", "None"]) == {
        "loopback": True,
        "loopback_loops": 3,
        "loopback_final_denoising": 0.7,
        "loopback_curve": "Lazy",
    }
    assert fields_from_script_args([])["loopback_loops"] == 4  # the script's defaults
    with pytest.raises(InvalidRequestError) as refused:
        fields_from_script_args([3, 0.7, "Lazy", "CLIP"])
    assert refused.value.field == "script_args[3]" and "no CLIP or DeepBooru" in refused.value.allowed


def _loop_request(init: Image.Image, **fields) -> GenerationRequest:
    settings = dict(
        prompt=PROMPT,
        seed=10,
        steps=10,
        init_images=[init],
        denoising_strength=0.3,
        loopback=True,
        loopback_loops=4,
        loopback_final_denoising=0.6,
    )
    return GenerationRequest(**{**settings, **fields})


def _events(engine, request, control=None) -> list:
    return list(engine.generate(request, control=control))


def test_each_loop_redraws_the_picture_before_and_its_infotext_makes_it_again(micro_engine, red_circle):
    events = _events(micro_engine, _loop_request(red_circle))
    result = events[-1]
    assert isinstance(result, Result) and result.seeds == [10, 11, 12, 13] and len(result.images) == 4
    # One job: progress counts the loops.
    assert sorted({(event.batch_no, event.batch_count) for event in events if isinstance(event, Progress)}) == [
        (loop, 4) for loop in range(4)
    ]
    strengths = [parse_infotext(text).denoising_strength for text in result.infotexts]
    assert strengths == [0.3, 0.4, 0.5, 0.6]
    assert all("Final denoising strength: 0.6, Denoising curve: Linear" in text for text in result.infotexts)
    # Loop 3 is exactly the img2img job its infotext names, from loop 2's picture.
    again = parse_infotext(result.infotexts[2])
    again.init_images = [result.images[1]]
    assert list(micro_engine.generate(again))[-1].images[0].tobytes() == result.images[2].tobytes()
    # Looping towards the prompt, the red circle on white becomes blue on yellow.
    first, last = dataset.classify(red_circle), dataset.classify(result.images[-1])
    assert (first.background, first.colour) == ("white", "red")
    assert (last.background, last.colour) == ("yellow", "blue")


def test_a_batch_count_keeps_each_pictures_last_loop_and_counts_the_seed_on(micro_engine, red_circle):
    fields = dict(loopback_loops=2, steps=4)
    both = _events(micro_engine, _loop_request(red_circle, n_iter=2, **fields))[-1]
    assert both.seeds == [11, 13] and len(both.images) == 2
    # The second picture starts again from the init image, at the seed after the first picture's last loop.
    second = _events(micro_engine, _loop_request(red_circle, seed=12, **fields))[-1]
    assert second.images[-1].tobytes() == both.images[1].tobytes()


def test_inpainting_loops_keep_the_unmasked_part_and_repaint_from_the_last_loop(micro_engine, red_circle):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # the left half
    request = _loop_request(red_circle, mask=mask, mask_blur=0, inpainting_fill=0, loopback_loops=3, steps=6)
    result = _events(micro_engine, request)[-1]
    contents = [parse_infotext(text).inpainting_fill for text in result.infotexts]
    assert contents == [0, 1, 1]  # fill, then original: the masked part holds the last loop's picture
    for picture in result.images:
        assert np.array_equal(np.asarray(picture)[:, 40:], np.asarray(red_circle)[:, 40:])
    assert not np.array_equal(np.asarray(result.images[-1])[:, :24], np.asarray(red_circle)[:, :24])


def test_stop_drops_the_loop_it_cuts_and_skip_ends_the_pictures_loops(micro_engine, red_circle):
    request = _loop_request(red_circle, steps=4)
    control = JobControl()
    for event in micro_engine.generate(request, control=control):
        if isinstance(event, Progress) and event.batch_no == 1 and event.step == 2:
            control.interrupt()
    assert event.interrupted and event.seeds == [10]
    control = JobControl()
    loops_seen = set()
    for event in micro_engine.generate(request, control=control):
        if isinstance(event, Progress):
            loops_seen.add(event.batch_no)
            if event.batch_no == 2 and event.step == 1:
                control.skip()
    assert not event.interrupted and event.skipped_batches == [2] and event.seeds == [10, 11]
    assert loops_seen == {0, 1, 2}  # the fourth loop never ran


@pytest.mark.parametrize(
    ("fields", "field", "allowed"),
    [
        ({"init_images": None}, "loopback", "img2img or inpaint only"),
        ({"loopback_loops": 0}, "loopback_loops", "1 to 32"),
        ({"loopback_loops": 33}, "loopback_loops", "1 to 32"),
        ({"loopback_final_denoising": 1.5}, "loopback_final_denoising", "0.0 to 1.0"),
        ({"loopback_curve": "Fast"}, "loopback_curve", "Aggressive, Linear, Lazy"),
        ({"sd_upscale": True, "sd_upscale_overlap": 16}, "loopback", "one script at a time"),
    ],
)
def test_settings_it_cannot_use_are_refused_by_field(micro_engine, fields, field, allowed):
    with pytest.raises(InvalidRequestError) as refused:
        micro_engine.validate(_loop_request(Image.new("RGB", (64, 64), "white"), **fields))
    assert refused.value.field == field and allowed in refused.value.allowed, refused.value


def test_the_api_runs_loopback_as_an_img2img_script_with_the_grid_first(api):  # noqa: F811
    payload = {
        "prompt": "a cat",
        "steps": 3,
        "width": 64,
        "height": 64,
        "seed": 5,
        "denoising_strength": 0.4,
        "init_images": [png_b64(Image.new("RGB", (64, 64), "orange"))],
        "script_name": "Loopback",
        "script_args": [3, 0.7, "Lazy", "None"],
    }
    body = ok(api.post("img2img", json=payload))
    info = json.loads(body["info"])
    assert [decode(image).size for image in body["images"]] == [(192, 64), (64, 64), (64, 64), (64, 64)]
    assert info["all_seeds"] == [5, 6, 7] and info["index_of_first_image"] == 1 and info["ignored_fields"] == []
    assert "Denoising curve: Lazy" in info["infotexts"][0] and info["infotexts"][0] == info["infotexts"][1]
    refused = api.post("img2img", json={**payload, "script_args": [3, 0.7, "Lazy", "DeepBooru"]})
    assert refused.status_code == 422 and refused.json()["field"] == "script_args[3]"
    refused = api.post("txt2img", json={key: payload[key] for key in ("prompt", "script_name", "script_args")})
    assert refused.status_code == 422 and refused.json()["field"] == "script_name"
    assert "loopback" in ok(api.get("scripts"))["img2img"]


def test_the_page_loops_from_the_img2img_tab_and_runs_one_script_at_a_time(page_url, tmp_path):  # noqa: F811
    client = _client(page_url)
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), "teal").save(init)
    common = ("a boat", "", "Euler", "Automatic", 3, 7.0, 30, 64, 64, 1, 1)
    looping = dict(loopback_on=True, loopback_loops=2, loopback_final_denoising=0.6, loopback_curve="Aggressive")
    _, _, gallery, infotext = client.predict(*common, handle_file(str(init)), 0.3, **looping, api_name="/img2img")
    assert [Image.open(item["image"]).size for item in gallery] == [(128, 64), (64, 64), (64, 64)]
    assert "Denoising curve: Aggressive" in infotext
    with pytest.raises(Exception, match="one script at a time"):
        client.predict(*common, handle_file(str(init)), 0.3, **looping, matrix_on=True, api_name="/img2img")
