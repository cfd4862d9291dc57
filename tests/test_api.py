"""The A1111 REST API, over real HTTP against the app running in this process on a free port."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import math
import struct
import threading
import time
import zlib

import httpx
import pytest
from PIL import Image

from engine import EngineError
from ui.api import SdApi
from ui.server import ServerSettings, launch

SMALL = {"steps": 3, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    outputs = tmp_path_factory.mktemp("api-outputs")
    settings = ServerSettings(host="127.0.0.1", port=0, api=True, outputs_dir=outputs)
    handle = launch(engine, settings)
    yield handle
    handle.close()
    assert not handle.running


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server.url + "sdapi/v1/", timeout=120) as client:
        yield client


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def generate(api, endpoint: str = "txt2img", **payload) -> tuple[dict, dict]:
    body = ok(api.post(endpoint, json={**SMALL, **payload}))
    return body, json.loads(body["info"])


# txt2img / img2img / inpaint ----------------------------------------------------------------


def test_txt2img_with_an_a1111_payload(api, engine):
    payload = {
        "prompt": "a lighthouse at dusk",
        "negative_prompt": "fog",
        "styles": [],
        "seed": 1234,
        "subseed": -1,
        "subseed_strength": 0,
        "sampler_name": "Euler a",
        "scheduler": "Automatic",
        "batch_size": 2,
        "n_iter": 1,
        "steps": 4,
        "cfg_scale": 6.5,
        "width": 64,
        "height": 96,
        "restore_faces": False,
        "tiling": False,
        "enable_hr": False,
        "denoising_strength": 0.7,
        "override_settings": {},
        "send_images": True,
        "save_images": False,
    }
    body = ok(api.post("txt2img", json=payload))
    info = json.loads(body["info"])

    assert len(body["images"]) == 2
    for index, b64 in enumerate(body["images"]):
        image = decode(b64)
        assert image.format == "PNG" and image.size == (64, 96)
        text = image.text["parameters"]
        assert text.startswith("a lighthouse at dusk\nNegative prompt: fog\n")
        assert f"Seed: {1234 + index}," in text
        assert "Steps: 4, Sampler: Euler a" in text and "Size: 64x96" in text
        assert text == info["infotexts"][index]
    assert info["seed"] == 1234 and info["all_seeds"] == [1234, 1235]
    assert info["prompt"] == "a lighthouse at dusk" and info["all_prompts"] == ["a lighthouse at dusk"] * 2
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (64, 96, 4, 6.5)
    assert info["sd_model_hash"] == engine.model.hash
    assert info["ignored_fields"] == []  # every field above is either used or left at a value that changes nothing
    assert body["parameters"]["prompt"] == "a lighthouse at dusk" and body["parameters"]["seed"] == 1234


def test_random_seed_is_reported(api):
    body, info = generate(api, prompt="x", seed=-1)
    assert isinstance(info["seed"], int) and info["seed"] >= 0
    assert f"Seed: {info['seed']}," in decode(body["images"][0]).text["parameters"]


def test_unimplemented_and_unknown_fields_are_accepted_and_listed(api):
    body, info = generate(
        api,
        prompt="x",
        enable_hr=True,
        hr_scale=2,
        hr_upscaler="Latent",
        hr_checkpoint_name="Use same checkpoint",
        restore_faces=True,
        alwayson_scripts={"ControlNet": {"args": []}},
        override_settings={"token_merging_ratio": 0.5},
        my_extension_field={"anything": [1, 2]},
    )
    assert len(body["images"]) == 1
    assert info["ignored_fields"] == sorted(
        [
            "restore_faces",
            "alwayson_scripts",
            "override_settings.token_merging_ratio",
            "my_extension_field",
        ]
    )
    assert body["parameters"]["my_extension_field"] == {"anything": [1, 2]}


def test_the_api_acts_on_variation_seeds_and_reports_them(api):
    payload = {"prompt": "a hill", "seed": 9, "subseed": 30, "subseed_strength": 0.4, "batch_size": 2, "steps": 3}
    payload.update(width=64, height=64, seed_resize_from_w=56, seed_resize_from_h=56)
    response = api.post("txt2img", json=payload)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["all_seeds"] == [9, 9] and info["all_subseeds"] == [30, 31]
    assert (info["subseed"], info["subseed_strength"]) == (30, 0.4)
    assert (info["seed_resize_from_w"], info["seed_resize_from_h"]) == (56, 56)
    assert "Variation seed: 31, Variation seed strength: 0.4, Seed resize from: 56x56" in info["infotexts"][1]
    assert info["ignored_fields"] == []
    again = api.post("txt2img", json={**payload, "batch_size": 1, "subseed": 31})
    assert again.json()["images"][0] == response.json()["images"][1]
    refused = api.post("txt2img", json={**payload, "subseed_strength": 2})
    assert refused.status_code == 422 and refused.json()["field"] == "subseed_strength"


def test_hires_fix_makes_the_bigger_picture_and_says_so_in_the_infotext(api):
    body, info = generate(
        api, prompt="a hill", seed=9, enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos", hr_second_pass_steps=2
    )
    image = decode(body["images"][0])
    assert image.size == (96, 96)
    text = image.text["parameters"]
    assert "Size: 64x64" in text and "Denoising strength: 0.7" in text
    assert "Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Lanczos" in text
    assert info["ignored_fields"] == []
    refused = api.post("txt2img", json={**SMALL, "enable_hr": True, "hr_upscaler": "4x-UltraSharp"})
    assert refused.status_code == 422 and refused.json()["field"] == "hr_upscaler"
    assert "Latent (nearest-exact)" in refused.json()["detail"]


def test_img2img_uses_the_init_image_and_strength(api):
    init = Image.new("RGB", (64, 64), (30, 120, 200))
    body, info = generate(
        api,
        "img2img",
        prompt="sea",
        init_images=["data:image/png;base64," + png_b64(init)],
        denoising_strength=0.5,
        seed=21,
    )
    image = decode(body["images"][0])
    assert image.size == (64, 64)
    assert "Denoising strength: 0.5" in image.text["parameters"]
    assert info["mode"] == "img2img" and info["denoising_strength"] == 0.5 and info["seed"] == 21
    # Like A1111, the (large) init images are not sent back unless asked for.
    assert body["parameters"]["init_images"] is None

    body = ok(api.post("img2img", json={**SMALL, "init_images": [png_b64(init)], "include_init_images": True}))
    assert body["parameters"]["init_images"] == [png_b64(init)]


def test_tiling_is_acted_on(api):
    body, info = generate(api, prompt="a wall", seed=4, tiling=True)
    assert "Tiling: True" in decode(body["images"][0]).text["parameters"] and info["ignored_fields"] == []


def test_img2img_resize_mode_is_acted_on(api):
    wide = Image.new("RGB", (128, 64), (250, 250, 0))
    wide.paste((0, 0, 250), (32, 0, 96, 64))  # blue in the middle, yellow at the sides
    payload = {"prompt": "sea", "init_images": [png_b64(wide)], "denoising_strength": 0, "seed": 3}
    _, info = generate(api, "img2img", resize_mode=1, **payload)
    assert info["ignored_fields"] == []
    cropped = decode(generate(api, "img2img", resize_mode=1, **payload)[0]["images"][0]).convert("RGB")
    stretched = decode(generate(api, "img2img", resize_mode=0, **payload)[0]["images"][0]).convert("RGB")
    assert cropped.getpixel((2, 32)) == (0, 0, 250) and stretched.getpixel((2, 32)) == (250, 250, 0)
    mask = png_b64(Image.new("L", (128, 64), 255))
    refused = api.post("img2img", json={**SMALL, **payload, "mask": mask, "resize_mode": 3})
    assert refused.status_code == 422 and refused.json()["field"] == "resize_mode"


def test_inpaint_repaints_only_the_white_part_of_the_mask(api):
    init = Image.new("RGB", (64, 64), (220, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # left half white: repaint it
    body, info = generate(
        api,
        "img2img",
        prompt="blue",
        init_images=[png_b64(init)],
        mask=png_b64(mask),
        mask_blur=0,
        denoising_strength=1.0,
        inpainting_fill=1,
        inpaint_full_res=False,
        seed=5,
    )
    image = decode(body["images"][0]).convert("RGB")
    assert info["mode"] == "inpaint" and info["ignored_fields"] == []
    right = image.crop((32, 0, 64, 64))
    assert right.getextrema() == ((220, 220), (30, 30), (30, 30))  # untouched
    assert image.crop((0, 0, 32, 64)).getextrema() != right.getextrema()  # repainted

    _, info = generate(
        api, "img2img", init_images=[png_b64(init)], mask=png_b64(mask), inpainting_fill=0, inpaint_full_res=True
    )
    assert info["ignored_fields"] == []


def test_inpaint_area_defaults_to_only_masked_as_in_a1111s_api(api):
    init = Image.new("RGB", (128, 128), (220, 30, 30))
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (96, 96, 120, 120))
    payload = {"init_images": [png_b64(init)], "mask": png_b64(mask), "mask_blur": 0, "seed": 2}
    body, info = generate(api, "img2img", **payload)
    image = decode(body["images"][0])
    text = image.text["parameters"]
    assert (
        image.size == (128, 128) and "Masked content: fill, Inpaint area: Only masked, Masked area padding: 0" in text
    )
    whole = decode(generate(api, "img2img", inpaint_full_res=False, **payload)[0]["images"][0])
    assert whole.size == (64, 64) and "Inpaint area" not in whole.text["parameters"]


def test_inpainting_mask_invert_repaints_the_black_part(api):
    init = Image.new("RGB", (64, 64), (220, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    body, _ = generate(
        api,
        "img2img",
        init_images=[png_b64(init)],
        mask=png_b64(mask),
        mask_blur=0,
        inpainting_mask_invert=1,
        denoising_strength=1.0,
    )
    image = decode(body["images"][0]).convert("RGB")
    assert image.crop((0, 0, 32, 64)).getextrema() == ((220, 220), (30, 30), (30, 30))


@pytest.mark.parametrize(
    "sampler_name, scheduler, expected",
    [
        ("k_euler_a", "automatic", ("Euler a", "Automatic")),
        ("euler", "Karras", ("Euler", "Karras")),
        ("DPM++ 2M Karras", None, ("DPM++ 2M", "Karras")),
        ("dpm++ 2m", "exponential", ("DPM++ 2M", "Exponential")),
        ("DDIM", "sgm_uniform", ("DDIM", "SGM Uniform")),
    ],
)
def test_sampler_and_scheduler_names_match_as_in_a1111(api, sampler_name, scheduler, expected):
    payload = {"prompt": "x", "sampler_name": sampler_name, "steps": 2}
    if scheduler is not None:
        payload["scheduler"] = scheduler
    body, info = generate(api, **payload)
    assert (info["sampler_name"], info["scheduler"]) == expected
    assert f"Sampler: {expected[0]}, Schedule type: {expected[1]}," in info["infotexts"][0]


def test_sampler_index_still_works(api):
    _, info = generate(api, prompt="x", sampler_index="k_lms", steps=2)
    assert info["sampler_name"] == "LMS"


def test_infotext_field_fills_what_the_request_leaves_out(api):
    text = (
        "a red door\nNegative prompt: blur\n"
        "Steps: 2, Sampler: Euler, CFG scale: 5, Seed: 99, Size: 64x64, Clip skip: 2, Hires upscale: 2, Version: v1.9"
    )
    _, info = generate(api, infotext=text, width=None, height=None, steps=None)
    assert (info["prompt"], info["negative_prompt"], info["seed"], info["steps"]) == ("a red door", "blur", 99, 2)
    assert (info["sampler_name"], info["cfg_scale"], info["width"]) == ("Euler", 5.0, 64)
    assert info["clip_skip"] == 2 and "Clip skip: 2" in info["infotexts"][0]
    # The infotext's hires fix is made again: the first pass at 64x64, the picture at 128x128.
    assert "Size: 64x64" in info["infotexts"][0] and "Hires upscale: 2, Hires upscaler: Latent" in info["infotexts"][0]

    _, info = generate(api, infotext=text, prompt="given", seed=5)
    assert (info["prompt"], info["seed"], info["steps"]) == ("given", 5, SMALL["steps"])
    assert info["ignored_fields"] == []
    # Settings the infotext names that no request field carries are listed as ignored, by key.
    _, info = generate(api, infotext=text + ", Face restoration: CodeFormer, ADetailer model: face_yolov8n.pt")
    assert info["ignored_fields"] == ["infotext.ADetailer model", "infotext.Face restoration"]


def test_send_images_false_returns_no_images_but_the_info(api):
    body, info = generate(api, prompt="x", seed=3, send_images=False)
    assert body["images"] == [] and info["all_seeds"] == [3]


def test_save_images_writes_a1111_layout(api, server):
    outputs = server.app.state.sdapi.settings.outputs_dir
    today = dt.date.today().isoformat()
    generate(api, prompt="kept", seed=4242, save_images=True)
    generate(api, prompt="not kept", seed=4343, save_images=False)
    init = png_b64(Image.new("RGB", (64, 64), "white"))
    generate(api, "img2img", init_images=[init], seed=4444, save_images=True)

    saved = sorted((outputs / "txt2img-images" / today).glob("*-4242.png"))
    assert len(saved) == 1 and saved[0].name[:5].isdigit()
    with Image.open(saved[0]) as image:
        assert image.text["parameters"].startswith("kept\n")
    assert not list(outputs.rglob("*-4343.png"))
    assert len(list((outputs / "img2img-images" / today).glob("*-4444.png"))) == 1


def test_a_picture_that_cannot_be_saved_still_comes_back_with_why(engine, tmp_path):
    blocked = tmp_path / "outputs"
    blocked.write_text("a file where the outputs folder should be")
    handle = launch(engine, ServerSettings(host="127.0.0.1", port=0, api=True, outputs_dir=blocked, page=False))
    try:
        with httpx.Client(base_url=handle.url + "sdapi/v1/", timeout=120) as client:
            body, info = generate(client, prompt="kept anyway", seed=4545, save_images=True)
        assert len(body["images"]) == 1 and info["all_seeds"] == [4545]
        assert len(info["save_errors"]) == 1 and info["save_errors"][0].startswith("seed 4545: ")
        assert "Not a directory" in info["save_errors"][0]
    finally:
        handle.close()


# Errors: 422 naming the field, and the server stays ready ----------------------------------


def _not_an_image() -> str:
    return base64.b64encode(b"this is plain text, not a picture").decode()


def _init(size=(64, 64)) -> str:
    return png_b64(Image.new("RGB", size, (10, 200, 10)))


BAD_REQUESTS = [
    ("txt2img", {"width": 65}, "width"),
    ("txt2img", {"height": 0}, "height"),
    ("txt2img", {"steps": 0}, "steps"),
    ("txt2img", {"steps": "many"}, "steps"),
    ("txt2img", {"seed": 1.5}, "seed"),
    ("txt2img", {"sampler_name": "Euler b"}, "sampler_name"),
    ("txt2img", {"scheduler": "Sometimes"}, "scheduler"),
    ("txt2img", {"batch_size": -1}, "batch_size"),
    ("txt2img", {"n_iter": 0}, "n_iter"),
    ("txt2img", {"cfg_scale": "high"}, "cfg_scale"),
    ("txt2img", {"prompt": 12}, "prompt"),
    ("txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 0}}, "override_settings.CLIP_stop_at_last_layers"),
    ("img2img", {"denoising_strength": 2}, "denoising_strength"),
    ("img2img", {"mask": "SIZE"}, "mask"),
    ("img2img", {"init_images": ["NOT_IMAGE"]}, "init_images[0]"),
    ("img2img", {"init_images": ["%%% not base64 %%%"]}, "init_images[0]"),
    ("img2img", {"init_images": []}, "init_images"),
    ("img2img", {"init_images": None}, "init_images"),
    ("img2img", {"mask_blur": -3}, "mask_blur"),
]


@pytest.mark.parametrize("endpoint, change, field", BAD_REQUESTS, ids=[f"{e}-{f}" for e, _, f in BAD_REQUESTS])
def test_bad_values_are_422_naming_the_field_then_the_next_request_works(api, endpoint, change, field):
    good = {"prompt": "x", **SMALL}
    if endpoint == "img2img":
        good["init_images"] = [_init()]
    change = dict(change)
    if change.get("mask") == "SIZE":
        change["mask"] = png_b64(Image.new("L", (32, 32), 255))
    if change.get("init_images") == ["NOT_IMAGE"]:
        change["init_images"] = [_not_an_image()]

    response = api.post(endpoint, json={**good, **change})
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["field"] == field
    assert field in error["detail"] and "allowed" in error["detail"]
    assert error["allowed"]

    generate(api, endpoint, **good)


@pytest.mark.parametrize("content", [b"[1, 2, 3]", b"{not json", b'"a string"'])
def test_a_body_that_is_not_a_json_object_is_422(api, content):
    response = api.post("txt2img", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["field"] == "body"


# Progress, interrupt, skip ------------------------------------------------------------------


class BackgroundJob:
    """A long txt2img request running in a thread, so the test can poll and stop it."""

    def __init__(self, server, **payload):
        self.response: httpx.Response | None = None
        self.finished_at: float | None = None
        body = {"prompt": "long", "steps": 150, "width": 64, "height": 64, "seed": 1, **payload}

        def run():
            with httpx.Client(timeout=300) as client:
                self.response = client.post(server.url + "sdapi/v1/txt2img", json=body)
            self.finished_at = time.monotonic()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self, timeout: float = 120) -> tuple[dict, dict]:
        self.thread.join(timeout)
        assert self.response is not None, "the job did not finish"
        body = ok(self.response)
        return body, json.loads(body["info"])


def wait_for(api, predicate, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = ok(api.get("progress"))
        if predicate(progress):
            return progress
        time.sleep(0.05)
    raise AssertionError(f"progress never matched; last: {progress}")


def test_progress_shows_the_running_job_then_the_state_after(api, server):
    job = BackgroundJob(server, n_iter=10)
    progress = wait_for(api, lambda p: p["current_image"] and p["state"]["sampling_step"] >= 2)

    state = progress["state"]
    assert 0 < progress["progress"] < 1
    assert progress["eta_relative"] >= 0
    assert state["job"] == "txt2img" and state["job_count"] == 10 and state["sampling_steps"] == 150
    assert state["job_timestamp"].isdigit() and len(state["job_timestamp"]) == 14
    assert progress["textinfo"].startswith("Sampling step ")
    assert decode(progress["current_image"]).format == "PNG"
    assert ok(api.get("progress", params={"skip_current_image": True}))["current_image"] is None

    ok(api.post("interrupt"))
    job.result()
    after = ok(api.get("progress"))
    assert after["progress"] == 0 and after["current_image"] is None
    assert after["state"]["job_count"] == 0 and after["state"]["interrupted"] is True


def test_a_prompt_lists_progress_runs_once_over_its_lines(api, server):
    lines = "first\nsecond\nthird"
    job = BackgroundJob(server, steps=40, script_name="prompts from file or textbox", script_args=[False, False, lines])
    first = wait_for(api, lambda p: p["state"]["job_count"] == 3 and p["state"]["sampling_step"] >= 2)
    assert first["state"]["job_no"] == 0 and first["textinfo"].startswith("Line 1/3: Sampling step ")
    assert 0 < first["progress"] < 1 / 3
    second = wait_for(api, lambda p: p["state"]["job_no"] == 1 and p["state"]["sampling_step"] >= 2)
    assert 1 / 3 < second["progress"] < 2 / 3 and second["textinfo"].startswith("Line 2/3: ")
    assert second["eta_relative"] > 0
    ok(api.post("interrupt"))
    _body, info = job.result()
    assert len(info["all_prompts"]) < 3  # the interrupt ended the list


def test_interrupt_stops_a_running_job_early(api, server):
    job = BackgroundJob(server, n_iter=20)
    wait_for(api, lambda p: p["state"]["sampling_step"] >= 3)
    interrupted_at = time.monotonic()
    ok(api.post("interrupt"))
    body, info = job.result()
    assert info["interrupted"] is True
    assert len(body["images"]) < 20  # 20 x 150 steps would take far longer than the wait above
    assert job.finished_at - interrupted_at < 5
    generate(api, prompt="after the interrupt")  # and the next job runs normally
    assert ok(api.get("progress"))["state"]["interrupted"] is False


def test_skip_cuts_only_the_current_batch_short(api, server):
    job = BackgroundJob(server, n_iter=2, steps=60)
    wait_for(api, lambda p: p["state"]["job_no"] == 0 and p["state"]["sampling_step"] >= 2)
    ok(api.post("skip"))
    body, info = job.result()
    assert info["interrupted"] is False
    assert info["skipped_batches"] == [0]
    assert len(body["images"]) == 2


# Models, samplers, schedulers, options -----------------------------------------------------


def test_sd_models_lists_the_tiny_model_with_its_hash(api, engine):
    models = ok(api.get("sd-models"))
    tiny = [m for m in models if m["model_name"] == "tiny-sd"]
    assert len(tiny) == 1
    item = tiny[0]
    assert set(item) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert len(item["hash"]) == 10 and item["sha256"].startswith(item["hash"])
    assert item["title"] == f"tiny-sd [{item['hash']}]" == engine.model.title


def test_samplers_have_a1111_names_and_aliases(api):
    samplers = {item["name"]: item for item in ok(api.get("samplers"))}
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"} <= set(samplers)
    assert "k_euler_a" in samplers["Euler a"]["aliases"]
    assert samplers["DDIM CFG++"] == {"name": "DDIM CFG++", "aliases": ["ddim_cfgpp"], "options": {}}
    assert samplers["DPM adaptive"] == {"name": "DPM adaptive", "aliases": ["k_dpm_ad"], "options": {}}
    assert samplers["DPM++ 2M"]["options"] == {"scheduler": "karras"}
    assert all(set(item) == {"name", "aliases", "options"} for item in samplers.values())


def test_schedulers_have_a1111_shape(api):
    schedulers = ok(api.get("schedulers"))
    by_label = {item["label"]: item for item in schedulers}
    assert all(set(item) == {"name", "label", "aliases", "default_rho", "need_inner_model"} for item in schedulers)
    assert by_label["Automatic"]["name"] == "automatic"
    assert by_label["Karras"] == {
        "name": "karras",
        "label": "Karras",
        "aliases": None,
        "default_rho": 7.0,
        "need_inner_model": False,
    }


def test_options_switch_to_the_same_model_and_refuse_an_unknown_one(api, engine):
    options = ok(api.get("options"))
    assert options["sd_model_checkpoint"] == engine.model.title
    assert options["sd_checkpoint_hash"] == engine.model.sha256

    for name in (engine.model.title, "tiny-sd"):
        response = api.post("options", json={"sd_model_checkpoint": name})
        assert response.status_code == 200, response.text
    assert ok(api.get("options"))["sd_model_checkpoint"] == engine.model.title

    response = api.post("options", json={"sd_model_checkpoint": "no-such-model [0123456789]"})
    assert response.status_code == 422
    error = response.json()
    assert error["field"] == "sd_model_checkpoint"
    assert "not found" in error["detail"] and "tiny-sd" in error["detail"]
    assert ok(api.get("options"))["sd_model_checkpoint"] == engine.model.title
    generate(api, prompt="still works")


def test_unload_checkpoint_frees_the_model_and_the_next_job_loads_it_back(api, engine):
    before, _ = generate(api, prompt="unload", seed=11)
    title = engine.model.title
    assert ok(api.post("unload-checkpoint")) == {}
    assert not engine.model_loaded
    # Clients still read the checkpoint's name, and listing models loads nothing.
    assert ok(api.get("options"))["sd_model_checkpoint"] == title
    assert title in [item["title"] for item in ok(api.get("sd-models"))]
    assert not engine.model_loaded

    after, _ = generate(api, prompt="unload", seed=11)
    assert engine.model_loaded and after["images"] == before["images"]

    engine.unload_model()
    assert ok(api.post("reload-checkpoint")) == {} and engine.model_loaded
    assert ok(api.post("reload-checkpoint")) == {}


def test_memory_answers_in_a1111s_shape(api, engine):
    memory = ok(api.get("memory"))
    assert set(memory) == {"ram", "cuda"}
    assert set(memory["ram"]) == {"free", "used", "total"} and 0 < memory["ram"]["used"] < memory["ram"]["total"]
    if engine.device.type == "cuda":
        assert {"system", "active", "allocated", "reserved", "inactive", "events"} == set(memory["cuda"])
    else:
        assert memory["cuda"] == {"error": "unavailable"}  # as A1111 answers without a GPU


def test_unknown_options_are_kept_per_server(api, engine, server):
    assert api.post("options", json={"my_extension_option": [1, "two"], "samples_save": False}).status_code == 200
    options = ok(api.get("options"))
    assert options["my_extension_option"] == [1, "two"] and options["samples_save"] is False
    # Another server over the same engine starts with its own options.
    other = SdApi(engine, server.app.state.sdapi.settings)
    assert "my_extension_option" not in other.get_options()


def test_bad_options_are_422_and_change_nothing(api):
    response = api.post("options", json={"samples_format": "bmp", "my_other_option": 1})
    assert response.status_code == 422 and response.json()["field"] == "samples_format"
    assert "my_other_option" not in ok(api.get("options"))
    response = api.post("options", json={"CLIP_stop_at_last_layers": "two"})
    assert response.status_code == 422 and response.json()["field"] == "CLIP_stop_at_last_layers"


def test_clip_skip_option_reaches_the_infotext(api):
    ok(api.post("options", json={"CLIP_stop_at_last_layers": 2}))
    try:
        _, info = generate(api, prompt="x")
        assert "Clip skip: 2" in info["infotexts"][0] and info["clip_skip"] == 2
        _, info = generate(api, prompt="x", override_settings={"CLIP_stop_at_last_layers": 1})
        assert "Clip skip" not in info["infotexts"][0]
    finally:
        ok(api.post("options", json={"CLIP_stop_at_last_layers": 1}))


# PNG info -----------------------------------------------------------------------------------


def test_png_info_round_trip(api):
    body, info = generate(api, prompt="a, b: c", negative_prompt="d", seed=777, cfg_scale=5)
    result = ok(api.post("png-info", json={"image": body["images"][0]}))
    assert result["info"] == info["infotexts"][0]
    params = result["parameters"]
    assert params["Prompt"] == "a, b: c" and params["Negative prompt"] == "d"
    assert params["Seed"] == "777" and params["CFG scale"] == "5"
    assert (params["Size-1"], params["Size-2"]) == ("64", "64")
    assert "parameters" not in result["items"]


def test_png_info_of_an_image_without_parameters(api):
    image = Image.new("RGB", (8, 8))
    result = ok(api.post("png-info", json={"image": "data:image/png;base64," + png_b64(image)}))
    assert result == {"info": "", "items": {}, "parameters": {}}


def test_png_info_of_something_that_is_not_an_image_is_422(api):
    response = api.post("png-info", json={"image": _not_an_image()})
    assert response.status_code == 422 and response.json()["field"] == "image"


def _claims_a_huge_picture(width: int, height: int) -> str:
    """A PNG of a few hundred bytes whose header claims width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    rows = zlib.compress(b"\0" * (width + 1))  # one row: Pillow refuses the size before it reads any
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


@pytest.mark.parametrize(
    ("endpoint", "field", "payload"),
    [
        ("png-info", "image", lambda bomb: {"image": bomb}),
        ("extra-single-image", "image", lambda bomb: {"image": bomb, "upscaler_1": "Lanczos"}),
        ("img2img", "init_images[0]", lambda bomb: {"init_images": [bomb], "steps": 2}),
    ],
)
def test_a_picture_claiming_too_many_pixels_is_422_naming_its_size(api, endpoint, field, payload):
    response = api.post(endpoint, json=payload(_claims_a_huge_picture(20000, 20000)))
    assert response.status_code == 422
    body = response.json()
    assert body["field"] == field and body["value"] == "a picture of 400,000,000 pixels"
    assert "of at most 178,956,970 pixels" in body["allowed"]


# A real A1111 client ------------------------------------------------------------------------


def test_the_webuiapi_client_works_against_this_server(server, engine):
    import webuiapi  # in requirements-dev.txt: a missing client is a failed setup, not a skipped test

    client = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=3)

    result = client.txt2img(prompt="a cat", width=64, height=64, seed=11, batch_size=2)
    assert [image.size for image in result.images] == [(64, 64), (64, 64)]
    assert result.info["all_seeds"] == [11, 12] and result.parameters["prompt"] == "a cat"

    init = Image.new("RGB", (64, 64), "orange")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result = client.img2img(images=[init], mask_image=mask, width=64, height=64, denoising_strength=0.6, seed=3)
    assert result.image.size == (64, 64) and result.info["mode"] == "inpaint"

    info = client.png_info(result.image)
    assert info.info == result.info["infotexts"][0]

    assert "Euler a" in client.util_get_sampler_names()
    assert "automatic" in client.util_get_scheduler_names()
    # Other tests may add checkpoints to the shared models folder; the loaded one must be listed.
    assert engine.model.title in client.util_get_model_names()
    assert client.util_get_current_model() == engine.model.title
    client.util_set_model("tiny-sd")
    assert client.get_progress()["progress"] == 0
    client.interrupt()
    client.skip()


def test_openapi_docs_describe_the_routes(server):
    schema = ok(httpx.get(server.url + "openapi.json", timeout=30))
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/progress", "/sdapi/v1/options"} <= set(schema["paths"])
    assert httpx.get(server.url + "docs", timeout=30).status_code == 200


class FailingOnceEngine:
    """The real engine, except that its next job fails the way a device error would."""

    def __init__(self, engine, error: Exception):
        self._engine = engine
        self._error = error

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, req, **kwargs):
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._engine.generate(req, **kwargs)


@pytest.mark.parametrize(
    "error, name",
    [
        (EngineError("Generation failed: RuntimeError: CUDA out of memory"), "EngineError"),
        (RuntimeError("a bug in the adapter"), "RuntimeError"),
    ],
)
def test_a_failed_job_is_a_json_500_and_the_next_request_works(engine, tmp_path, error, name):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from ui.api import install_api

    app = FastAPI()
    install_api(app, FailingOnceEngine(engine, error), ServerSettings(api=True, outputs_dir=tmp_path))
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL})
        assert response.status_code == 500
        assert response.json()["error"] == name and str(error) in response.json()["detail"]
        response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL})
        assert response.status_code == 200 and len(response.json()["images"]) == 1


def test_lists_clients_read_at_start_up_answer_rather_than_404(api):
    for route in ("hypernetworks", "face-restorers", "realesrgan-models", "sd-vae", "extensions"):
        assert ok(api.get(route)) == []
    # The hires fix upscalers, each name one hr_upscaler takes.
    assert [item["name"] for item in ok(api.get("upscalers"))] == ["None", "Lanczos", "Nearest"]
    latent = [item["name"] for item in ok(api.get("latent-upscale-modes"))]
    assert latent[0] == "Latent" and "Latent (nearest-exact)" in latent and len(latent) == 6


def test_routes_that_are_not_here_say_so_in_the_api_error_shape(api):
    unknown = api.get("no-such-route")
    assert unknown.status_code == 404
    body = unknown.json()
    assert body["error"] == "NotFound" and body["field"] == "route" and body["value"] == "/sdapi/v1/no-such-route"
    assert "/txt2img" in body["allowed"] and "/progress" in body["allowed"]

    wrong_method = api.get("txt2img")
    assert wrong_method.status_code == 405 and wrong_method.json()["allowed"] == "POST for /sdapi/v1/txt2img"

    interrogate = api.post("interrogate", json={"image": "", "model": "clip"})
    assert interrogate.status_code == 501 and interrogate.json()["error"] == "NotImplemented"
    assert "caption" in interrogate.json()["detail"]
    generate(api, prompt="still works")


def test_sigma_churn_runs_on_euler_and_is_listed_as_ignored_for_other_samplers(api):
    plain, _ = generate(api, sampler_name="Euler", seed=3)
    churned, info = generate(api, sampler_name="Euler", seed=3, s_churn=2, s_tmin=0, s_tmax=0, s_noise=1)
    assert churned["images"][0] != plain["images"][0]
    assert "Sigma churn: 2" in info["infotexts"][0] and "s_churn" not in info["ignored_fields"]
    # A1111's processing objects hold "no upper end" as infinity, which Python clients send as JSON's Infinity.
    payload = json.dumps({**SMALL, "sampler_name": "Euler", "seed": 3, "s_churn": 2, "s_tmax": math.inf})
    body = ok(api.post("txt2img", content=payload, headers={"content-type": "application/json"}))
    info = json.loads(body["info"])
    assert "Sigma churn: 2" in info["infotexts"][0] and "Sigma tmax" not in info["infotexts"][0]
    _, info = generate(api, sampler_name="Euler a", seed=3, s_churn=2, s_tmin=0.5)
    assert {"s_churn", "s_tmin"} <= set(info["ignored_fields"]) and "Sigma churn" not in info["infotexts"][0]
    bad = api.post("txt2img", json={**SMALL, "sampler_name": "Euler", "s_churn": 101})
    assert bad.status_code == 422 and "s_churn" in bad.text
    _, info = generate(api, sampler_name="Euler", seed=3, override_settings={"s_churn": 2})
    assert "Sigma churn: 2" in info["infotexts"][0]


def test_the_noise_schedule_settings_are_a1111_options(api):
    plain, _ = generate(api, sampler_name="Euler", seed=3)
    rescaled, info = generate(
        api,
        sampler_name="Euler",
        seed=3,
        override_settings={"sd_noise_schedule": "Zero Terminal SNR", "always_discard_next_to_last_sigma": True},
    )
    assert rescaled["images"][0] != plain["images"][0]
    assert "Noise Schedule: Zero Terminal SNR" in info["infotexts"][0]
    assert "Discard penultimate sigma: True" in info["infotexts"][0]
    bad = api.post("txt2img", json={**SMALL, "override_settings": {"sd_noise_schedule": "Cosine"}})
    assert bad.status_code == 422
    body = bad.json()
    assert body["field"] == "override_settings.sd_noise_schedule" and body["value"] == "Cosine"
    assert body["allowed"] == "one of Default, Zero Terminal SNR"
    # Set on the server, every later job takes them until set back.
    try:
        ok(api.post("options", json={"sd_noise_schedule": "zero terminal snr", "use_downcasted_alpha_bar": True}))
        options = ok(api.get("options"))
        assert options["sd_noise_schedule"] == "Zero Terminal SNR" and options["use_downcasted_alpha_bar"] is True
        again, info = generate(api, sampler_name="Euler", seed=3)
        assert "Noise Schedule: Zero Terminal SNR" in info["infotexts"][0]
        assert "Downcast alphas_cumprod: True" in info["infotexts"][0]
        assert api.post("options", json={"sd_noise_schedule": 1}).status_code == 422
    finally:
        ok(api.post("options", json={"sd_noise_schedule": "Default", "use_downcasted_alpha_bar": False}))
    _, info = generate(api, sampler_name="Euler", seed=3)
    assert "Noise Schedule" not in info["infotexts"][0]


def test_an_infotext_that_names_a_setting_at_its_default_overrides_the_servers_option(api):
    """A picture made with RNG: CPU is made again from its infotext on a server set to NV; a text that does not
    name the setting leaves the server's, as A1111's paste does."""
    text = "a red door\nSteps: 2, Sampler: Euler a, CFG scale: 5, Seed: 99, Size: 64x64"
    cpu, cpu_info = generate(api, infotext=text + ", RNG: CPU", width=None, height=None, steps=None)
    try:
        ok(api.post("options", json={"randn_source": "NV"}))
        again, info = generate(api, infotext=text + ", RNG: CPU", width=None, height=None, steps=None)
        assert "RNG: CPU" in info["infotexts"][0] and again["images"] == cpu["images"]
        unnamed, info = generate(api, infotext=text, width=None, height=None, steps=None)
        assert "RNG: NV" in info["infotexts"][0] and unnamed["images"] != cpu["images"]
    finally:
        ok(api.post("options", json={"randn_source": "CPU"}))


def test_pad_conds_is_an_a1111_option(api):
    long_prompt = "a lighthouse, " + ", ".join(["detailed"] * 60)
    _, info = generate(api, prompt=long_prompt, seed=3, override_settings={"pad_cond_uncond": True})
    assert "Pad conds: True" in info["infotexts"][0]
    _, info = generate(api, prompt=long_prompt, seed=3)
    assert "Pad conds" not in info["infotexts"][0]
    bad = api.post("txt2img", json={**SMALL, "override_settings": {"pad_cond_uncond": "often"}})
    assert bad.status_code == 422 and bad.json()["field"] == "override_settings.pad_cond_uncond"
