"""Upscaler models (ESRGAN, Real-ESRGAN, Real-ESRGAN Compact) from A1111's folders, in the hires fix and Extras.

The networks here are built by the tests. A "nearest" ESRGAN has weights that make it copy its input through
every layer (identity convolutions, a zero trunk), so its output is the input scaled by nearest neighbour,
exactly: any mistake in reading a layout, in the order of its layers or in the scale shows as other pixels.
Random weights check that every layout of the same network gives the same output. (The networks were also
checked against spandrel's, the library A1111 and ComfyUI use, on random weights in every layout: equal to
the last bit. spandrel cannot be a dependency here; see engine/upscalers.py.)
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engine import (
    Engine,
    ExtrasRequest,
    GenerationRequest,
    InvalidRequestError,
    JobControl,
    ModelLoadError,
    Result,
)
from engine.infotext import parse_infotext
from engine.presets import SHIPPED_MICRO_MODEL
from engine.upscalers import CompactNet, RRDBNet, UpscalerFile, build_network, read_tensors, run_tiled

HIRES = {
    "prompt": "a red circle on a blue background",
    "steps": 8,
    "seed": 3,
    "sampler_name": "Euler",
    "enable_hr": True,
    "hr_scale": 2,
    "denoising_strength": 0.5,
}


def basicsr_names(network: RRDBNet) -> dict[str, torch.Tensor]:
    """BasicSR's file layout (Real-ESRGAN, 4x-UltraSharp): conv_up1, conv_up2 for the module's list."""
    return {
        re.sub(r"^conv_up\.(\d)\.", lambda m: f"conv_up{int(m.group(1)) + 1}.", key): tensor.detach().clone()
        for key, tensor in network.state_dict().items()
    }


def original_names(network: RRDBNet) -> dict[str, torch.Tensor]:
    """ESRGAN's original sequential layout: model.0, model.1.sub.N.RDBr.convc.0, model.1.sub.<blocks> (trunk
    conv), model.3/6/... (upsampling convs), then the HR conv and the last conv two places apart."""
    blocks, upsamples = len(network.body), len(network.conv_up)
    renamed = {}
    for key, tensor in network.state_dict().items():
        kind = key.rsplit(".", 1)[1]
        if key.startswith("conv_first."):
            key = f"model.0.{kind}"
        elif key.startswith("body."):
            key = re.sub(r"^body\.(\d+)\.rdb(\d)\.conv(\d)\.", r"model.1.sub.\1.RDB\2.conv\3.0.", key)
        elif key.startswith("conv_body."):
            key = f"model.1.sub.{blocks}.{kind}"
        elif key.startswith("conv_up."):
            key = f"model.{3 * (int(key.split('.')[1]) + 1)}.{kind}"
        elif key.startswith("conv_hr."):
            key = f"model.{3 * upsamples + 2}.{kind}"
        elif key.startswith("conv_last."):
            key = f"model.{3 * upsamples + 4}.{kind}"
        renamed[key] = tensor.detach().clone()
    return renamed


def bsrgan_names(network: RRDBNet) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, tensor in basicsr_names(network).items():
        key = re.sub(r"^body\.(\d+)\.rdb(\d)\.", r"RRDB_trunk.\1.RDB\2.", key)
        key = key.replace("conv_body.", "trunk_conv.").replace("conv_hr.", "HRconv.")
        renamed[re.sub(r"^conv_up(\d)\.", r"upconv\1.", key)] = tensor
    return renamed


def random_rrdb(upsamples: int = 2, unshuffle: int = 1, seed: int = 0) -> RRDBNet:
    torch.manual_seed(seed)
    network = RRDBNet(3 * unshuffle**2, 3, features=8, blocks=2, growth=4, upsamples=upsamples, unshuffle=unshuffle)
    for parameter in network.parameters():
        parameter.data.normal_(0, 0.1)
    return network


def nearest_rrdb(upsamples: int) -> RRDBNet:
    """An ESRGAN whose output is its input scaled by nearest neighbour (for inputs in [0, 1])."""
    network = RRDBNet(3, 3, features=8, blocks=1, growth=4, upsamples=upsamples, unshuffle=1)
    identity = torch.zeros(8, 8, 3, 3)
    identity[range(8), range(8), 1, 1] = 1
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.zero_()
        network.conv_first.weight[:3, :3] = identity[:3, :3]
        for conv in (*network.conv_up, network.conv_hr):
            conv.weight.copy_(identity)
        network.conv_last.weight.copy_(identity[:3])
        # The trunk stays busy (random dense blocks) but its own last conv is zero, so it adds nothing.
        for parameter in network.body.parameters():
            parameter.normal_(0, 0.1)
    return network


def save_pth(tensors: dict, path, nesting: str | None = None) -> None:
    torch.save({nesting: tensors} if nesting else tensors, path)


@pytest.fixture(scope="module")
def upscaler_models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("upscaler-models")
    esrgan, realesrgan = root / "ESRGAN", root / "RealESRGAN"
    esrgan.mkdir()
    realesrgan.mkdir()
    save_file(
        {k: v.contiguous() for k, v in basicsr_names(nearest_rrdb(1)).items()}, str(esrgan / "2x-nearest.safetensors")
    )
    save_pth(original_names(nearest_rrdb(2)), esrgan / "4x-nearest.pth")
    (esrgan / "broken.pth").write_bytes(b"not a checkpoint")
    save_pth(basicsr_names(random_rrdb()), realesrgan / "RealESRGAN_x4plus.pth", nesting="params_ema")
    torch.manual_seed(1)
    compact = CompactNet(3, 3, features=8, convs=2, scale=4)
    save_pth(compact.state_dict(), realesrgan / "realesr-general-x4v3.pth", nesting="params")
    return root


@pytest.fixture(scope="module")
def upscaler_engine(upscaler_models_dir):
    return Engine(model=str(SHIPPED_MICRO_MODEL), models_dir=upscaler_models_dir)


def generate(engine, **fields) -> Result:
    result = list(engine.generate(GenerationRequest(**{**HIRES, **fields})))[-1]
    assert isinstance(result, Result), result
    return result


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_every_layout_of_one_network_loads_to_the_same_network():
    network = random_rrdb().eval()
    picture = torch.rand(1, 3, 12, 10)
    with torch.no_grad():
        expected = network(picture)
        for layout in (basicsr_names, original_names, bsrgan_names):
            loaded = build_network(layout(network), layout.__name__).eval()
            assert torch.equal(loaded(picture), expected), layout.__name__


@pytest.mark.parametrize(
    ("upsamples", "unshuffle", "scale"),
    [(2, 1, 4), (2, 2, 2), (2, 4, 1), (3, 1, 8), (1, 1, 2)],
)
def test_the_scale_is_read_off_the_weights(upsamples, unshuffle, scale):
    """Real-ESRGAN's x2 and x1 models unshuffle their input (12 or 48 input channels); odd sides are padded."""
    for layout in (basicsr_names, original_names):
        loaded = build_network(layout(random_rrdb(upsamples, unshuffle)), "x")
        assert loaded.scale == scale
        with torch.no_grad():
            assert loaded(torch.rand(1, 3, 13, 11)).shape == (1, 3, 13 * scale, 11 * scale)
    for compact_scale in (2, 4):
        compact = build_network(CompactNet(3, 3, 8, 2, compact_scale).state_dict(), "compact")
        assert isinstance(compact, CompactNet) and compact.scale == compact_scale


def test_a_nearest_esrgan_scales_exactly_by_nearest_neighbour_in_either_layout():
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 13, 3), dtype=np.uint8))
    array = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    for layout in (basicsr_names, original_names):
        network = build_network(layout(nearest_rrdb(2)), "nearest")
        with torch.no_grad():
            out = (network(array)[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        assert np.array_equal(out, np.asarray(picture.resize((52, 36), Image.Resampling.NEAREST)))


def test_a_1x_model_runs_once_and_lanczos_makes_the_size():
    from engine.upscalers import upscale_to

    network = nearest_rrdb(0)  # 1x: the picture as it is
    calls = []
    network.register_forward_hook(lambda *args: calls.append(1))
    picture = Image.fromarray(np.random.default_rng(4).integers(0, 256, (10, 12, 3), dtype=np.uint8))
    result = upscale_to(network, picture, 24, 20)
    assert len(calls) == 1
    assert np.array_equal(pixels(result), pixels(picture.resize((24, 20), Image.Resampling.LANCZOS)))


def test_tiles_blend_into_the_whole_picture():
    """A picture larger than a tile is made in overlapping tiles; where a quarter of the overlap covers the
    network's reach (a Compact net with 2 body convolutions sees 4 pixels around), the result is the whole
    picture's."""
    torch.manual_seed(2)
    network = CompactNet(3, 3, features=8, convs=2, scale=2).eval()
    picture = torch.rand(1, 3, 70, 90)
    with torch.no_grad():
        whole = network(picture)
        tiled = run_tiled(network, picture, tile=32, overlap=16)
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().max() < 1e-5


def test_passes_count_their_tiles_as_they_finish():
    from engine.upscalers import planned_passes, tile_count, upscale_to

    network = nearest_rrdb(1)  # 2x
    picture = Image.fromarray(np.random.default_rng(5).integers(0, 256, (150, 210, 3), dtype=np.uint8))
    assert planned_passes(2, (210, 150), (800, 600)) == [(210, 150), (420, 300)]  # a third would overshoot
    counted = []
    result = upscale_to(network, picture, 800, 600, on_tile=lambda done, total: counted.append((done, total)))
    total = tile_count(150, 210) + tile_count(300, 420)
    assert total == 2 + 6
    assert counted == [(done, total) for done in range(1, total + 1)]
    assert np.array_equal(pixels(result), pixels(upscale_to(network, picture, 800, 600)))


def test_extras_shows_in_progress_while_it_runs(upscaler_engine, tmp_path):
    """An Extras upscale holds the device: /progress and jobs waiting behind it see it, tile by tile."""
    from engine.events import Waiting
    from ui.api import SdApi
    from ui.page_jobs import describe_waiting
    from ui.server import ServerSettings

    api = SdApi(upscaler_engine, ServerSettings(api=True, outputs_dir=tmp_path))
    network = upscaler_engine.upscalers.get(upscaler_engine.list_upscalers()["2x-nearest"])
    seen = []
    hook = network.register_forward_hook(lambda *args: seen.append((upscaler_engine.progress(), api.progress())))
    try:
        picture = Image.new("RGB", (200, 200), "purple")
        upscaler_engine.upscale(ExtrasRequest(image=picture, upscaler_1="2x-nearest"))  # 2x2 tiles of 192
    finally:
        hook.remove()
    assert [(state.running, state.mode, state.step, state.total) for state, _ in seen] == [
        (True, "extras", 0, 0),
        (True, "extras", 1, 4),
        (True, "extras", 2, 4),
        (True, "extras", 3, 4),
    ]
    last = seen[-1][1]
    assert last["state"]["job"] == "extras" and last["textinfo"] == "Upscaling, tile 3/4"
    assert 0.7 < last["progress"] < 0.8
    after = upscaler_engine.progress()
    assert not after.running and after.mode == "extras"
    assert api.progress()["state"]["job_count"] == 0
    # A page job waiting for the device says what it waits for.
    waiting = Waiting(ahead=dataclasses.replace(seen[-1][0], batch_count=2, batch_no=1), job_id=0)
    assert describe_waiting(waiting).startswith("Waiting for an upscale to finish (upscaler 2/2, tile 3/4, ETA ")


def test_an_upscale_stops_at_its_next_tile_and_keeps_the_pictures_finished_before(upscaler_engine, monkeypatch):
    """Interrupt (engine.interrupt(), the API's /interrupt) and the Extras tab's Stop (the session's jobs) end a
    running upscale at its next tile; a batch keeps the pictures finished before, and the next upscale runs."""
    from engine import TaskStopped
    from ui.page_extras import run_extras
    from ui.page_jobs import PageSession

    network = upscaler_engine.upscalers.get(upscaler_engine.list_upscalers()["2x-nearest"])
    tiles, stop = [], [upscaler_engine.interrupt]

    def on_tile(*args):
        tiles.append(1)
        if len(tiles) == 2:
            stop[0]()

    hook = network.register_forward_hook(on_tile)
    purple, grey = Image.new("RGB", (200, 200), "purple"), Image.new("RGB", (24, 16), "grey")  # 4 tiles, 1 tile
    request = ExtrasRequest(image=purple, upscaler_1="2x-nearest")
    try:
        with pytest.raises(TaskStopped, match="Upscale stopped after 2 of 4 tiles"):
            upscaler_engine.upscale(request)
        assert not upscaler_engine.progress().running
        # The page: the first picture of a batch finished (one tile), the second stopped at its second tile.
        session, tiles[:] = PageSession(), []
        stop[0] = session.stop
        batch = [SimpleNamespace(name="grey.png"), SimpleNamespace(name="purple.png")]
        monkeypatch.setattr("ui.page_extras.batch_pictures", lambda files, field: [grey, purple] if files else [])
        settings = (0, 2, 512, 512, True, "2x-nearest", "None", 0)
        result, info, gallery = run_extras(upscaler_engine, session, None, *settings, batch)
        assert info.startswith("Upscale stopped after 1 of 4 tiles; its picture was not kept. Finished before the ")
        assert "stop: 1 of 2 pictures: Postprocess upscale by: 2" in info
        assert result.size == (48, 32) and [picture.size for picture in gallery] == [(48, 32)]
        assert not session.running
        # A single picture stopped shows why and leaves the result as it was.
        tiles[:] = [1]
        _, info, _ = run_extras(upscaler_engine, session, purple, *settings)
        assert info == "Upscale stopped after 1 of 4 tiles; its picture was not kept."
    finally:
        hook.remove()
    # The page's Stop while the click waits in the queue reaches it through its ticket: it does not start.
    ticket = session.register()
    session.stop()
    _, info, _ = run_extras(upscaler_engine, session, purple, *settings, None, ticket)
    assert info == "Upscale stopped before it started." and not session.running
    # A stop asked for while it waited for the device: it does not start.
    control = JobControl()
    control.interrupt()
    with pytest.raises(TaskStopped, match="stopped before it started"):
        upscaler_engine.upscale(request, control=control)
    done, _ = upscaler_engine.upscale(request)
    assert done.size == (400, 400)


def test_the_folders_list_files_by_a1111s_names(upscaler_engine, upscaler_models_dir):
    listed = upscaler_engine.list_upscalers()
    assert set(listed) == {"2x-nearest", "4x-nearest", "broken", "R-ESRGAN 4x+", "R-ESRGAN General 4xV3"}
    assert listed["R-ESRGAN 4x+"].path == upscaler_models_dir / "RealESRGAN" / "RealESRGAN_x4plus.pth"
    tensors = read_tensors(listed["R-ESRGAN General 4xV3"])  # BasicSR's "params" nesting removed
    assert "body.0.weight" in tensors


def test_the_hires_fix_upscales_with_a_model(upscaler_engine):
    """A 2x nearest ESRGAN makes the same picture as the built-in Nearest upscaler, byte for byte; a 4x one runs
    once and is brought down to the hires size with Lanczos, so it differs (a little, on flat shapes)."""
    by_model = generate(upscaler_engine, hr_upscaler="2x-nearest")
    by_nearest = generate(upscaler_engine, hr_upscaler="Nearest")
    assert by_model.images[0].size == (128, 128)
    assert np.array_equal(pixels(by_model.images[0]), pixels(by_nearest.images[0]))
    assert "Hires upscaler: 2x-nearest" in by_model.infotexts[0]
    # Matched without case or with the file's extension, as the file's name.
    four = generate(upscaler_engine, hr_upscaler="4X-NEAREST.pth")
    assert "Hires upscaler: 4x-nearest" in four.infotexts[0]
    assert not np.array_equal(pixels(four.images[0]), pixels(by_nearest.images[0]))
    # The infotext brings the upscaler back, and the same picture with it.
    again = list(upscaler_engine.generate(parse_infotext(by_model.infotexts[0])))[-1]
    assert np.array_equal(pixels(again.images[0]), pixels(by_model.images[0]))


def test_png_info_sends_an_upscaler_model_that_is_here_and_lanczos_for_one_that_is_not(upscaler_engine):
    from ui.page import ReadInfotext, _hires_settings_from_infotext

    text = "a cat\nSteps: 8, Seed: 1, Size: 64x64, Denoising strength: 0.5, Hires upscale: 2, Hires upscaler: "
    assert _hires_settings_from_infotext(ReadInfotext.of(text + "R-ESRGAN 4x+"), upscaler_engine)[1] == "R-ESRGAN 4x+"
    with pytest.warns(UserWarning, match=r"R-ESRGAN 2x\+ is not available here \(put it in .*ESRGAN.*Lanczos"):
        assert _hires_settings_from_infotext(ReadInfotext.of(text + "R-ESRGAN 2x+"), upscaler_engine)[1] == "Lanczos"


def test_a_missing_or_broken_upscaler_is_refused_by_name_and_the_next_job_works(upscaler_engine):
    with pytest.raises(InvalidRequestError) as missing:
        generate(upscaler_engine, hr_upscaler="R-ESRGAN 4x+ Anime6B")
    assert missing.value.field == "hr_upscaler"
    assert "R-ESRGAN 4x+" in missing.value.allowed and "ESRGAN" in missing.value.allowed  # what there is, where
    with pytest.raises(InvalidRequestError) as broken:
        generate(upscaler_engine, hr_upscaler="broken")
    assert broken.value.field == "hr_upscaler" and "could not read" in broken.value.allowed
    assert generate(upscaler_engine, hr_upscaler="Lanczos").images[0].size == (128, 128)


def test_extras_scales_by_and_to_as_a1111(upscaler_engine):
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    # Scale by 4 with a 4x model: one pass, exactly nearest neighbour.
    result, info = upscaler_engine.upscale(ExtrasRequest(image=picture, upscaler_1="4x-nearest", upscaling_resize=4))
    assert np.array_equal(pixels(result), pixels(picture.resize((120, 80), Image.Resampling.NEAREST)))
    assert info == {"Postprocess upscale by": "4", "Postprocess upscaler": "4x-nearest"}
    # Scale by 1.5: sides rounded down to a multiple of 8 (45x30 -> 40x24), as A1111 makes them.
    result, _ = upscaler_engine.upscale(ExtrasRequest(image=picture, upscaler_1="Lanczos", upscaling_resize=1.5))
    assert result.size == (40, 24)
    # Scale to 100x100 with crop: scaled by the larger ratio (5: 150x100) and centred on a 100x100 canvas.
    request = ExtrasRequest(image=picture, resize_mode=1, upscaling_resize_w=100, upscaling_resize_h=100)
    result, info = upscaler_engine.upscale(ExtrasRequest(**{**vars(request), "upscaler_1": "Nearest"}))
    nearest = picture.resize((150, 100), Image.Resampling.NEAREST)
    assert result.size == (100, 100)
    assert np.array_equal(pixels(result), pixels(nearest.crop((25, 0, 125, 100))))
    assert info["Postprocess crop to"] == "100x100" and info["Postprocess upscale to"] == "100x100"
    # A second upscaler at visibility 0.3 is blended over the first (on a picture whose doubled sides are
    # multiples of 8).
    picture = picture.crop((0, 0, 28, 20))
    blended, info = upscaler_engine.upscale(
        ExtrasRequest(
            image=picture,
            upscaler_1="Lanczos",
            upscaler_2="2x-nearest",
            extras_upscaler_2_visibility=0.3,
        )
    )
    expected = Image.blend(
        picture.resize((56, 40), Image.Resampling.LANCZOS), picture.resize((56, 40), Image.Resampling.NEAREST), 0.3
    )
    assert np.array_equal(pixels(blended), pixels(expected))
    assert info["Postprocess upscaler 2"] == "2x-nearest"
    unchanged, info = upscaler_engine.upscale(ExtrasRequest(image=picture, upscaler_1="None"))
    assert np.array_equal(pixels(unchanged), pixels(picture)) and info == {}


def test_extras_refuses_bad_values_by_field(upscaler_engine):
    picture = Image.new("RGB", (600, 600), "red")
    cases = [
        ({"upscaler_1": "nope"}, "upscaler_1"),
        ({"upscaler_1": "Lanczos", "upscaling_resize": 9}, "upscaling_resize"),
        ({"upscaler_1": "Lanczos", "upscaling_resize": 8}, "upscaling_resize"),  # 4800 px: over the 4096 side
        ({"upscaler_1": "Lanczos", "resize_mode": 2}, "resize_mode"),
        ({"upscaler_1": "Lanczos", "extras_upscaler_2_visibility": "x"}, "extras_upscaler_2_visibility"),
        ({"upscaler_1": "broken"}, "upscaler_1"),
        ({"image": None}, "image"),
        ({"image": Image.new("RGB", (3, 3)), "upscaler_1": "Lanczos"}, "upscaling_resize"),  # 6x6: rounds to 0
    ]
    for fields, field in cases:
        with pytest.raises(InvalidRequestError) as refused:
            upscaler_engine.upscale(ExtrasRequest(**{"image": picture, **fields}))
        assert refused.value.field == field, fields
    assert upscaler_engine.upscale(ExtrasRequest(image=picture, upscaler_1="Lanczos"))[0].size == (1200, 1200)


def test_the_api_lists_upscalers_and_runs_extras(upscaler_engine, tmp_path):
    from engine.images import encode_base64_png
    from ui.server import ServerSettings, launch

    picture = Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 24, 3), dtype=np.uint8))
    encoded = encode_base64_png(picture, "a red circle\nSteps: 8, Seed: 3, Size: 24x16")
    handle = launch(
        upscaler_engine, ServerSettings(host="127.0.0.1", port=0, api=True, outputs_dir=tmp_path, page=False)
    )
    try:
        with httpx.Client(base_url=handle.url + "sdapi/v1/", timeout=120) as api:
            listed = {entry["name"]: entry for entry in api.get("upscalers").json()}
            assert {"None", "Lanczos", "Nearest", "2x-nearest", "R-ESRGAN 4x+"} <= set(listed)
            assert listed["2x-nearest"]["scale"] == 2 and listed["2x-nearest"]["model_path"].endswith(".safetensors")
            assert listed["R-ESRGAN 4x+"]["model_name"] == "RealESRGAN"
            real = {entry["name"]: entry for entry in api.get("realesrgan-models").json()}
            assert set(real) == {"R-ESRGAN 4x+", "R-ESRGAN General 4xV3"}
            assert real["R-ESRGAN 4x+"]["path"].endswith("RealESRGAN_x4plus.pth") and real["R-ESRGAN 4x+"]["scale"] == 4

            answer = api.post(
                "extra-single-image", json={"image": encoded, "upscaler_1": "4x-nearest", "upscaling_resize": 4}
            )
            assert answer.status_code == 200, answer.text
            result = Image.open(io.BytesIO(base64.b64decode(answer.json()["image"])))
            assert np.array_equal(pixels(result), pixels(picture.resize((96, 64), Image.Resampling.NEAREST)))
            # The source's infotext stays, and what Extras did is recorded beside it, as in A1111.
            assert result.info["parameters"].startswith("a red circle")
            assert result.info["postprocessing"] == "Postprocess upscale by: 4, Postprocess upscaler: 4x-nearest"
            assert "4x-nearest" in answer.json()["html_info"]

            batch = api.post(
                "extra-batch-images",
                json={"imageList": [{"data": encoded, "name": "a.png"}] * 2, "upscaler_1": "Lanczos"},
            )
            assert batch.status_code == 200 and len(batch.json()["images"]) == 2
            # /interrupt during a batch: the pictures finished before come back; with none finished, a 409.
            network = upscaler_engine.upscalers.get(upscaler_engine.list_upscalers()["2x-nearest"])
            hook = network.register_forward_hook(lambda *args: upscaler_engine.interrupt())
            try:
                batch = {"imageList": [{"data": encoded, "name": "a.png"}] * 3, "upscaler_1": "2x-nearest"}
                assert len(api.post("extra-batch-images", json=batch).json()["images"]) == 1
                big = encode_base64_png(Image.new("RGB", (200, 200), "purple"))
                stopped = api.post("extra-single-image", json={"image": big, "upscaler_1": "2x-nearest"})
                assert stopped.status_code == 409 and stopped.json()["error"] == "TaskStopped"
                assert stopped.json()["detail"] == "Upscale stopped after 1 of 4 tiles; its picture was not kept."
            finally:
                hook.remove()

            refused = api.post("extra-single-image", json={"image": encoded, "upscaler_1": "R-ESRGAN 2x+"})
            assert refused.status_code == 422 and refused.json()["field"] == "upscaler_1"
            payload = {**HIRES, "hr_upscaler": "2x-nearest", "width": 64, "height": 64}
            info = json.loads(api.post("txt2img", json=payload).json()["info"])
            assert "Hires upscaler: 2x-nearest" in info["infotexts"][0]
    finally:
        handle.close()


def test_the_page_extras_tab_upscales(upscaler_engine, tmp_path):
    from types import SimpleNamespace

    from gradio_client import Client, handle_file

    from engine.images import encode_png
    from ui.page import build_page

    picture_path = tmp_path / "source.png"
    picture = Image.fromarray(np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    picture_path.write_bytes(encode_png(picture, "a red circle\nSteps: 8, Seed: 3, Size: 16x16"))
    outputs = tmp_path / "outputs"
    demo = build_page(upscaler_engine, SimpleNamespace(outputs_dir=outputs, save_images=True))
    demo.queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        client = Client(url, verbose=False)
        settings = (0, 2, 512, 512, True, "2x-nearest", "None", 0)
        result, info, batch = client.predict(handle_file(str(picture_path)), *settings, api_name="/extras")
        assert Image.open(result).size == (32, 32) and batch == []
        assert "Postprocess upscaler: 2x-nearest" in info and "saved as 00000.png" in info
        # Saved as A1111 saves Extras results: outputs/extras-images/<date>/NNNNN.png, with the source's
        # infotext and what was done.
        (saved,) = (outputs / "extras-images").glob("*/00000.png")
        with Image.open(saved) as kept:
            assert kept.info["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: 2x-nearest"
            assert kept.info["parameters"].startswith("a red circle")

        # A1111's Batch Process: each picture upscaled alike, each one as it is upscaled alone.
        other_path = tmp_path / "other.png"
        Image.fromarray(np.full((8, 24, 3), 200, dtype=np.uint8)).save(other_path)
        files = [handle_file(str(picture_path)), handle_file(str(other_path))]
        result, info, batch = client.predict(None, *settings, files, api_name="/extras")
        assert info.startswith("2 pictures: Postprocess upscale by: 2")
        sizes = [Image.open(item["image"]).size for item in batch]
        assert sizes == [(32, 32), (48, 16)] and Image.open(result).size == (32, 32)
        alone = client.predict(handle_file(str(other_path)), *settings, api_name="/extras")[0]
        assert np.array_equal(np.asarray(Image.open(batch[1]["image"])), np.asarray(Image.open(alone)))
        assert len(list((outputs / "extras-images").glob("*/*.png"))) == 4
        (broken := tmp_path / "broken.png").write_text("not a picture")
        with pytest.raises(Exception, match="batch_files: got 'broken.png'"):
            client.predict(None, *settings, [handle_file(str(broken))], api_name="/extras")
    finally:
        demo.close()


def test_upscaler_folders_come_from_a1111s_flags(tmp_path):
    from ui.server import parse_args

    (tmp_path / "esr").mkdir()
    settings = parse_args(["--esrgan-models-path", str(tmp_path / "esr"), "--realesrgan-models-path", str(tmp_path)])
    assert settings.esrgan_dir == tmp_path / "esr" and settings.realesrgan_dir == tmp_path
    with pytest.raises(SystemExit):
        parse_args(["--esrgan-models-path", str(tmp_path / "missing")])


def test_a_file_that_is_no_upscaler_is_named(tmp_path):
    path = tmp_path / "swinir.pth"
    torch.save({"layers.0.weight": torch.zeros(2)}, path)
    with pytest.raises(ModelLoadError, match="not an ESRGAN"):
        build_network(read_tensors(UpscalerFile("swinir", path)), "swinir")
    with pytest.raises(ModelLoadError, match="1-channel pictures; only RGB"):
        build_network(CompactNet(1, 1, 8, 2, 2).state_dict(), "grey")
    broken = CompactNet(3, 3, 8, 2, 2).state_dict()
    broken["body.2.weight"] = torch.zeros(8, 8, 5, 5)
    with pytest.raises(ModelLoadError, match="do not make a Real-ESRGAN Compact network"):
        build_network(broken, "broken")


def test_the_shipped_micro_upscaler_doubles_the_micro_models_pictures_sharper_than_lanczos():
    """models/ESRGAN/micro-shapes-2x (training/train_upscaler.py), on scenes it never saw: the 64x64 scene
    through the micro model's VAE, against the scene drawn at 128x128."""
    from diffusers import AutoencoderKL

    from engine.upscalers import load_network
    from training.train_upscaler import DEFAULT_OUT, lanczos, psnr, scene_pairs

    network = load_network(UpscalerFile("micro-shapes-2x", DEFAULT_OUT))
    assert isinstance(network, CompactNet) and network.scale == 2
    vae = AutoencoderKL.from_pretrained(str(SHIPPED_MICRO_MODEL / "vae")).eval()
    inputs, targets = scene_pairs(vae, 40, seed=2026)
    with torch.no_grad():
        upscaled = network(inputs).clamp(0, 1)
    learned, resized = psnr(upscaled, targets), psnr(lanczos(inputs), targets)
    assert learned > resized + 1.5, (learned, resized)
