"""A1111's SD upscale script: the picture upscaled, cut into tiles, each tile redrawn by img2img, joined again."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gradio_client import handle_file
from PIL import Image

from engine import GenerationRequest, InvalidRequestError, Result
from engine.events import JobControl, Progress
from engine.infotext import parse_infotext
from engine.sd_upscale import fields_from_script_args, tile_seeds
from engine.tiles import cut_tiles, join_tiles, plan_tiles
from tests.test_api import api, decode, ok, png_b64, server  # noqa: F401 - fixtures
from tests.test_page_client import _client, outputs_dir, page_url  # noqa: F401 - fixtures
from training import dataset


def test_tiles_lie_where_a1111_cuts_them():
    # A1111's split_grid: ceil((side - overlap) / (tile - overlap)) tiles spread evenly, the last at the edge.
    grid = plan_tiles(200, 120, 64, 64, 16)
    assert grid.columns == (0, 45, 90, 136)  # steps of (200 - 64) / 3
    assert grid.rows == (0, 28, 56)
    assert grid.count == 12 and grid.boxes()[5] == (45, 28, 109, 92)
    assert plan_tiles(128, 128, 64, 64, 32).columns == (0, 32, 64)
    assert plan_tiles(64, 64, 64, 64, 32).columns == (0,)  # one tile the size of the picture
    assert plan_tiles(130, 64, 64, 64, 0).columns == (0, 33, 66)  # no overlap asked, some needed to cover


def test_joining_the_cut_tiles_gives_the_picture_back_and_overlaps_fade_from_tile_to_tile():
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (120, 200, 3), dtype=np.uint8))
    for overlap in (0, 16, 40):
        grid = plan_tiles(200, 120, 64, 64, overlap)
        assert np.array_equal(np.asarray(join_tiles(grid, cut_tiles(picture, grid))), np.asarray(picture)), overlap
    # Two tiles side by side, black then white: across the 16 columns they share, white fades in evenly.
    grid = plan_tiles(112, 64, 64, 64, 16)
    assert grid.columns == (0, 48)
    joined = np.asarray(join_tiles(grid, [Image.new("RGB", (64, 64), "black"), Image.new("RGB", (64, 64), "white")]))
    ramp = joined[10, 48:64, 0].astype(int)
    assert ramp[0] == 0 and ramp[-1] == 239 and np.all(np.diff(ramp) > 0)  # 255 * 15 / 16 at the last
    assert (joined[:, :48] == 0).all() and (joined[:, 64:] == 255).all()


def test_tile_seeds_count_up_as_a1111s_script_gives_them():
    assert tile_seeds(10, 500, 4, 1, varying=False) == ([10, 11, 12, 13], [500, 500, 500, 500])
    # Batches of two: each batch starts one above the one before, so neighbouring batches share a seed.
    assert tile_seeds(10, 500, 4, 2, varying=False) == ([10, 11, 11, 12], [500, 501, 500, 501])
    # With a variation strength a batch keeps its seed and counts up the variation seed.
    assert tile_seeds(10, 500, 4, 2, varying=True) == ([10, 10, 11, 11], [500, 501, 500, 501])


def _upscale_request(init: Image.Image, **fields) -> GenerationRequest:
    settings = dict(
        prompt="a large red circle on a white background",
        seed=40,
        steps=10,
        width=64,
        height=64,
        init_images=[init],
        denoising_strength=0.3,
        sd_upscale=True,
        sd_upscale_overlap=32,
        sd_upscale_upscaler="Lanczos",
        sd_upscale_scale=2.0,
    )
    return GenerationRequest(**{**settings, **fields})


def _run(engine, request: GenerationRequest, control: JobControl | None = None) -> Result:
    result = list(engine.generate(request, control=control))[-1]
    assert isinstance(result, Result)
    return result


def test_each_tile_is_the_img2img_job_of_its_part_of_the_upscaled_picture(micro_engine, red_circle):
    init = red_circle
    result = _run(micro_engine, _upscale_request(init))
    (picture,) = result.images
    assert picture.size == (128, 128) and result.seeds == [40]
    # Still the picture it was, red on white and twice as large, redrawn: at denoising 0.3 each tile of this toy
    # model's adds roundness of its own to the circle (A1111's SD upscale is used at lower strengths for that).
    reading = dataset.classify(picture)
    assert (reading.background, reading.colour) == ("white", "red")
    upscaled = init.resize((128, 128), Image.Resampling.LANCZOS)
    pixels = np.asarray(picture)
    change = np.abs(pixels.astype(int) - np.asarray(upscaled, dtype=int)).mean()
    assert 2 < change < 40, change
    # Where no other tile reaches, a tile is exactly its img2img job alone: the first tile at the seed, the ninth
    # (bottom right of 3x3) at the seed + 8.
    for box, seed, region in (((0, 0, 64, 64), 40, pixels[:32, :32]), ((64, 64, 128, 128), 48, pixels[96:, 96:])):
        alone = _run(
            micro_engine, _upscale_request(upscaled.crop(box), sd_upscale=False, seed=seed, width=64, height=64)
        )
        crop = np.asarray(alone.images[0])[-32:, -32:] if seed == 48 else np.asarray(alone.images[0])[:32, :32]
        assert np.array_equal(region, crop), seed
    text = result.infotexts[0]
    assert "Size: 64x64" in text and "Seed: 40," in text
    assert "SD upscale overlap: 32, SD upscale upscaler: Lanczos, SD upscale scale factor: 2" in text
    # The infotext, with the init image, makes the same picture again.
    again = parse_infotext(text)
    assert again.sd_upscale and (again.sd_upscale_overlap, again.sd_upscale_scale) == (32, 2.0)
    again.init_images = [init]
    assert _run(micro_engine, again).images[0].tobytes() == picture.tobytes()


def test_a_batch_count_makes_one_picture_a_seed_and_stop_keeps_the_tiles_done(micro_engine, red_circle):
    init = red_circle
    fields = dict(sd_upscale_overlap=0, steps=4, denoising_strength=0.5)  # 2x2 tiles
    both = _run(micro_engine, _upscale_request(init, n_iter=2, **fields))
    assert both.seeds == [40, 41] and [image.size for image in both.images] == [(128, 128)] * 2
    second = _run(micro_engine, _upscale_request(init, seed=41, **fields))
    assert second.images[0].tobytes() == both.images[1].tobytes()
    # Stopped in its second tile: one picture, whose tiles after that are the upscaled picture's own.
    control = JobControl()
    events = []
    for event in micro_engine.generate(_upscale_request(init, n_iter=2, **fields), control=control):
        events.append(event)
        if isinstance(event, Progress) and event.batch_no == 1:
            control.interrupt()
    stopped = events[-1]
    assert stopped.interrupted and len(stopped.images) == 1
    assert {event.batch_count for event in events if isinstance(event, Progress)} == {8}  # 4 tiles x 2 pictures
    upscaled = np.asarray(init.resize((128, 128), Image.Resampling.LANCZOS))
    done = np.asarray(stopped.images[0])
    assert np.array_equal(done[:64, :64], np.asarray(both.images[0])[:64, :64])
    assert np.array_equal(done[64:, 64:], upscaled[64:, 64:])
    # Skip in the first tile cuts that tile short only: the others are redrawn as without it.
    control = JobControl()
    for event in micro_engine.generate(_upscale_request(init, **fields), control=control):
        if isinstance(event, Progress) and event.batch_no == 0 and event.step == 1:
            control.skip()
    assert event.skipped_batches == [0] and not event.interrupted
    cut, whole = np.asarray(event.images[0]), np.asarray(both.images[0])
    assert not np.array_equal(cut[:64, :64], whole[:64, :64]) and np.array_equal(cut[64:], whole[64:])


@pytest.mark.parametrize(
    ("fields", "field", "allowed"),
    [
        ({"init_images": None}, "sd_upscale", "img2img only"),
        ({"mask": Image.new("L", (64, 64), 255)}, "sd_upscale", "img2img only"),
        ({"sd_upscale_overlap": 64}, "sd_upscale_overlap", "less than the tile size, 64x64"),
        ({"sd_upscale_overlap": 300}, "sd_upscale_overlap", "0 to 256"),
        ({"sd_upscale_scale": 5}, "sd_upscale_scale", "1.0 to 4.0"),
        ({"sd_upscale_upscaler": "Bicubic"}, "sd_upscale_upscaler", "None, Lanczos, Nearest"),
        ({"width": 256, "height": 256}, "sd_upscale_scale", "at least one tile, 256x256 (it would become 128x128"),
        ({"width": 16, "height": 16, "sd_upscale_overlap": 8, "sd_upscale_scale": 4}, "sd_upscale_overlap", "256"),
    ],
)
def test_settings_it_cannot_use_are_refused_by_field(micro_engine, fields, field, allowed):
    request = _upscale_request(Image.new("RGB", (64, 64), "white"), **fields)
    with pytest.raises(InvalidRequestError) as refused:
        micro_engine.validate(request)
    assert refused.value.field == field and allowed in refused.value.allowed, refused.value


def test_script_args_read_as_a1111s_api_sends_them():
    assert fields_from_script_args(["", 32, "lanczos", 1.5], []) == {
        "sd_upscale": True,
        "sd_upscale_overlap": 32,
        "sd_upscale_upscaler": "lanczos",
        "sd_upscale_scale": 1.5,
    }
    # An index into A1111's list (None, Lanczos, Nearest, then the models); left out, the script's defaults.
    assert fields_from_script_args([None, 64, 3], ["4x-micro"])["sd_upscale_upscaler"] == "4x-micro"
    assert fields_from_script_args([], [])["sd_upscale_upscaler"] == "None"
    with pytest.raises(InvalidRequestError, match="index 0 to 2 in: None, Lanczos, Nearest"):
        fields_from_script_args(["", 64, 7, 2], [])


def test_the_api_runs_sd_upscale_as_an_img2img_script(api):  # noqa: F811
    payload = {
        "prompt": "a cat",
        "steps": 4,
        "width": 64,
        "height": 64,
        "denoising_strength": 0.4,
        "init_images": [png_b64(Image.new("RGB", (64, 64), "orange"))],
        "script_name": "SD upscale",
        "script_args": ["", 16, "Lanczos", 1.5],
    }
    body = ok(api.post("img2img", json=payload))
    info = json.loads(body["info"])
    assert decode(body["images"][0]).size == (96, 96)
    assert info["ignored_fields"] == [] and "SD upscale overlap: 16" in info["infotexts"][0]
    refused = api.post("txt2img", json={key: payload[key] for key in ("prompt", "script_name", "script_args")})
    assert refused.status_code == 422 and "script_name" in refused.text and "img2img" in refused.text
    assert "sd upscale" in ok(api.get("scripts"))["img2img"]
    (sd_upscale,) = [script for script in ok(api.get("script-info")) if script["name"] == "sd upscale"]
    assert sd_upscale["is_img2img"] and [arg["label"] for arg in sd_upscale["args"]][1:] == [
        "Tile overlap",
        "Upscaler",
        "Scale Factor",
    ]


def test_the_page_runs_sd_upscale_from_the_img2img_tab(page_url, tmp_path):  # noqa: F811
    client = _client(page_url)
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), "teal").save(init)
    common = ("a boat", "", "Euler", "Automatic", 4, 7.0, 30, 64, 64, 1, 1)
    upscale = dict(sd_upscale=True, sd_upscale_overlap=32, sd_upscale_upscaler="Nearest", sd_upscale_scale=2)
    _, _, gallery, infotext = client.predict(*common, handle_file(str(init)), 0.3, **upscale, api_name="/img2img")
    assert [Image.open(item["image"]).size for item in gallery] == [(128, 128)]
    assert "SD upscale upscaler: Nearest" in infotext


def test_the_pages_tile_overlap_starts_below_the_models_tile(micro_engine):
    from types import SimpleNamespace

    from ui.page import _default_tile_overlap

    # A1111's 64 for SD's 512-pixel tiles and larger; a quarter of a smaller model's tile, so SD upscale works as the
    # page opens on the micro model (64-pixel tiles, where 64 is refused).
    assert _default_tile_overlap(SimpleNamespace(width=512, height=768)) == 64
    defaults = micro_engine.defaults()
    overlap = _default_tile_overlap(defaults)
    assert overlap == 16
    picture = Image.new("RGB", (defaults.width, defaults.height), "teal")
    request = GenerationRequest(prompt="x", init_images=[picture], sd_upscale=True, sd_upscale_overlap=overlap)
    assert micro_engine.validate(request).sd_upscale_overlap == 16
    with pytest.raises(InvalidRequestError, match="less than the tile size"):
        micro_engine.validate(GenerationRequest(prompt="x", init_images=[picture], sd_upscale=True))  # 64
