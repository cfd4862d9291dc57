"""img2img's and inpaint's Batch from folders on the server (A1111's img2img Batch tab): which pictures and masks
a folder gives, where the results go, and the page's endpoints run on them (tiny model, CPU)."""

from __future__ import annotations

import html
import inspect
import socket
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from engine import InvalidRequestError
from engine.folder_batch import FolderBatchError, list_pictures, plan_folder_batch, write_outputs
from engine.infotext import read_infotext
from ui.page import build_page
from ui.page_jobs import PageSession, run_folder_batch

# /img2img's first parameters: prompt, negative, sampler, schedule, steps, cfg, seed, w, h, count, size.
COMMON = ("a square", "", "Euler", "Automatic", 3, 7.0, -1, 64, 64, 1, 1)


def _picture(path: Path, colour, size=(64, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _half_mask(path: Path, side: str) -> Path:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64) if side == "left" else (32, 0, 64, 64))
    path.parent.mkdir(parents=True, exist_ok=True)
    mask.save(path)
    return path


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# The plan -------------------------------------------------------------------------------------------------------


def test_pictures_come_in_natural_order_with_subfolders_and_only_picture_files(tmp_path):
    for name in ("frame10.png", "frame2.jpg", "frame1.webp", "sub/frame3.png", ".hidden.png", "notes.txt"):
        _picture(tmp_path / name, "red") if name.endswith((".png", ".jpg", ".webp")) else (tmp_path / name).write_text(
            ""
        )
    assert [path.as_posix() for path in list_pictures(tmp_path)] == [
        "frame1.webp",
        "frame2.jpg",
        "frame10.png",
        "sub/frame3.png",
    ]


def test_masks_are_one_for_all_or_matched_by_name_and_pictures_without_one_are_left_out(tmp_path):
    for name in ("a.png", "b.png", "sub/c.png"):
        _picture(tmp_path / "in" / name, "red")
    _half_mask(tmp_path / "one" / "only.png", "left")
    plan = plan_folder_batch(tmp_path / "in", mask_dir=tmp_path / "one")
    assert [item.mask.name for item in plan.items] == ["only.png"] * 3 and plan.without_mask == ()

    _half_mask(tmp_path / "named" / "a.jpg", "left")  # any picture extension
    _half_mask(tmp_path / "named" / "sub" / "c.png", "right")
    plan = plan_folder_batch(tmp_path / "in", mask_dir=tmp_path / "named")
    assert [(item.relative.as_posix(), item.mask.relative_to(tmp_path).as_posix()) for item in plan.items] == [
        ("a.png", "named/a.jpg"),
        ("sub/c.png", "named/sub/c.png"),
    ]
    assert [path.as_posix() for path in plan.without_mask] == ["b.png"]

    _half_mask(tmp_path / "other" / "x.png", "left")
    _half_mask(tmp_path / "other" / "y.png", "left")
    with pytest.raises(InvalidRequestError, match="mask_dir: .*none of the 3 pictures has one"):
        plan_folder_batch(tmp_path / "in", mask_dir=tmp_path / "other")


def test_bad_folders_are_refused_naming_the_field_and_the_path(tmp_path):
    _picture(tmp_path / "in" / "a.png", "red")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.png").write_bytes(b"")
    cases = [
        (dict(input_dir=tmp_path / "missing"), "input_dir: got '.*missing'; allowed: an existing folder"),
        (dict(input_dir=tmp_path / "empty"), "input_dir: .*it has none"),
        (dict(input_dir=tmp_path / "in", mask_dir=tmp_path / "empty"), "mask_dir: .*holding masks"),
        (dict(input_dir=tmp_path / "in", output_dir=tmp_path / "file.png"), "output_dir: .*a folder \\(this is a file"),
        (dict(input_dir=tmp_path / "in", output_dir=tmp_path / "in"), "output_dir: .*a folder outside input_dir"),
        (dict(input_dir=tmp_path / "in", output_dir=tmp_path / "in" / "out"), "output_dir: .*outside input_dir"),
        (dict(input_dir=tmp_path, mask_dir=tmp_path / "in"), "mask_dir: .*outside input_dir .*masks would be read"),
        (dict(input_dir=tmp_path / "in", info_dir=tmp_path / "in"), "png_info_dir: .*outside input_dir"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InvalidRequestError, match=message):
            plan_folder_batch(**kwargs)


def test_outputs_are_named_as_the_pictures_and_never_overwrite(tmp_path):
    _picture(tmp_path / "in" / "a.png", "red")
    _picture(tmp_path / "in" / "sub" / "b.jpg", "blue")
    out = tmp_path / "out"
    plan = plan_folder_batch(tmp_path / "in", out, outputs_per_picture=2)
    assert [name.as_posix() for name in plan.items[1].output_names(2)] == ["sub/b-1.png", "sub/b-2.png"]
    assert [name.as_posix() for name in plan.items[0].output_names(1)] == ["a.png"]

    written = write_outputs(plan.items[0], out, [Image.new("RGB", (8, 8), "red")], ["a square\nSteps: 3, Seed: 7"])
    assert written == [out / "a.png"] and read_infotext(Image.open(written[0])) == "a square\nSteps: 3, Seed: 7"
    with pytest.raises(FolderBatchError, match="appeared while the batch ran; it was kept"):
        write_outputs(plan.items[0], out, [Image.new("RGB", (8, 8), "blue")], [None])
    assert _pixels(out / "a.png")[0, 0].tolist() == [255, 0, 0]

    with pytest.raises(InvalidRequestError, match="output_dir: .*'a.png' already there would be overwritten"):
        plan_folder_batch(tmp_path / "in", out)
    resumed = plan_folder_batch(tmp_path / "in", out, skip_done=True)
    assert [item.relative.as_posix() for item in resumed.items] == ["sub/b.jpg"]
    assert [path.as_posix() for path in resumed.done_before] == ["a.png"]


def test_a_pictures_png_info_is_read_from_the_picture_opened_or_from_its_namesake(tmp_path):
    from engine.outputs import encode_image

    text = "red circle\nSteps: 12, Sampler: Euler, Seed: 99"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(encode_image(Image.new("RGB", (8, 8), "red"), text, "png"))
    (tmp_path / "in" / "b.jpg").write_bytes(encode_image(Image.new("RGB", (8, 8), "red"), text, "jpg"))  # EXIF
    _picture(tmp_path / "in" / "c.png", "red")
    for item in plan_folder_batch(tmp_path / "in").items:
        picture, _mask = item.open()
        assert item.infotext(picture) == (None if item.relative.name == "c.png" else text), item.relative
    (tmp_path / "info").mkdir()
    (tmp_path / "info" / "c.png").write_bytes(encode_image(Image.new("RGB", (8, 8), "red"), "blue square", "png"))
    plan = plan_folder_batch(tmp_path / "in", info_dir=tmp_path / "info")
    by_name = {item.relative.name: item.infotext(item.open()[0]) for item in plan.items}
    assert by_name == {"a.png": None, "b.jpg": None, "c.png": "blue square"}  # the folder's, where it has one


def test_png_info_parameters_are_taken_as_a1111s_batch_takes_them():
    from engine import GenerationRequest
    from engine.folder_batch import with_png_info

    tab = GenerationRequest(prompt="a square", negative_prompt="blurry", seed=1, cfg_scale=7.0, steps=20)
    text = (
        "red circle\nNegative prompt: green\nSteps: 12, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 4, "
        "Seed: 99"
    )
    every = ("Prompt", "Negative prompt", "Seed", "CFG scale", "Sampler", "Steps")
    taken = with_png_info(tab, text, every)
    assert (taken.prompt, taken.negative_prompt) == ("a square red circle", "blurry green")  # appended
    assert (taken.seed, taken.cfg_scale, taken.steps) == (99, 4.0, 12)
    assert (taken.sampler_name, taken.scheduler) == ("DPM++ 2M", "Karras")
    only_seed = with_png_info(tab, text, ("Seed",))
    assert (only_seed.prompt, only_seed.seed, only_seed.steps, only_seed.sampler_name) == (
        "a square",
        99,
        20,
        "Euler a",
    )
    # What the text does not say stays the tab's.
    assert with_png_info(tab, "red circle\nSteps: 12", every).seed == 1
    with pytest.raises(InvalidRequestError, match="CFG scale: got 'big'"):
        with_png_info(tab, "red circle\nSteps: 12, CFG scale: big, Seed: 3", every)


# The page's endpoints ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def folder_page(engine, models_dir, tmp_path_factory):
    outputs = tmp_path_factory.mktemp("folder-outputs")
    settings = SimpleNamespace(outputs_dir=outputs, save_images=True, models_dir=models_dir, server_folders=True)
    demo = build_page(engine, settings)
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(), quiet=True)
    yield SimpleNamespace(client=Client(url, verbose=False), outputs=outputs)
    demo.close()


def test_img2img_folder_batch_writes_each_picture_under_its_name_with_one_seed(folder_page, tmp_path):
    client = folder_page.client
    source, out = tmp_path / "frames", tmp_path / "styled"
    _picture(source / "frame1.png", "red")
    _picture(source / "frame2.png", "blue")
    _picture(source / "sub" / "frame10.png", "yellow")
    (source / "broken.png").write_text("not a picture")

    folders = dict(batch_input_dir=str(source), batch_output_dir=str(out))
    _, progress, gallery, infotext = client.predict(*COMMON, None, 0.3, **folders, api_name="/img2img")
    assert "3 of 4 pictures" in progress and f"3 images written to {out}" in progress
    assert "1 unreadable (broken.png)" in progress
    written = sorted(path.relative_to(out).as_posix() for path in out.rglob("*.png"))
    assert written == ["frame1.png", "frame2.png", "sub/frame10.png"] and len(gallery) == 3
    texts = [read_infotext(Image.open(out / name)) for name in written]
    seeds = {text.split("Seed: ")[1].split(",")[0] for text in texts}
    assert len(seeds) == 1  # -1 drawn once for the whole batch, as A1111's fix_seed does
    # Each result is the job its picture makes on its own at that seed.
    seed = int(seeds.pop())
    alone = client.predict(
        *COMMON[:6], seed, *COMMON[7:], handle_file(str(source / "frame2.png")), 0.3, api_name="/img2img"
    )
    assert np.array_equal(_pixels(alone[2][0]["image"]), _pixels(out / "frame2.png"))

    with pytest.raises(AppError, match="batch_output_dir: .*'frame1.png' and 2 more already there"):
        client.predict(*COMMON, None, 0.3, **folders, api_name="/img2img")
    with pytest.raises(AppError, match="Nothing was made.*1 unreadable \\(broken.png\\); 3 already done"):
        client.predict(*COMMON, None, 0.3, **folders, batch_skip_done=True, api_name="/img2img")


def test_folder_batch_without_an_output_folder_saves_where_pictures_go(folder_page, tmp_path):
    _picture(tmp_path / "frames" / "a.png", "red")
    before = set(folder_page.outputs.rglob("*.png"))
    _, progress, gallery, _ = folder_page.client.predict(
        *COMMON, None, 0.3, batch_input_dir=str(tmp_path / "frames"), api_name="/img2img"
    )
    saved = set(folder_page.outputs.rglob("*.png")) - before
    assert "1 of 1 picture in" in progress and "1 image written" in progress and len(gallery) == 1
    assert [path.parent.parent.name for path in saved] == ["img2img-images"]


def test_a_folder_batch_takes_each_pictures_own_png_info_when_asked(folder_page, engine, tmp_path):
    from engine import GenerationRequest
    from engine.outputs import encode_image

    source, infos, out = tmp_path / "in", tmp_path / "infos", tmp_path / "out"
    source.mkdir()
    for name, prompt, seed in (("a.png", "red", 5), ("b.png", "blue", 9)):
        made = list(engine.generate(GenerationRequest(prompt=prompt, steps=2, seed=seed, width=64, height=64)))[-1]
        (source / name).write_bytes(encode_image(made.images[0], made.infotexts[0], "png"))
    _picture(source / "plain.png", "yellow")  # no PNG info: the tab's settings
    folders = dict(batch_input_dir=str(source), batch_output_dir=str(out), batch_png_info=["Prompt", "Seed"])
    progress = folder_page.client.predict(*COMMON[:6], 3, *COMMON[7:], None, 0.3, **folders, api_name="/img2img")[1]
    assert "1 without PNG info, the tab's settings used (plain.png)" in html.unescape(progress)
    texts = {name: read_infotext(Image.open(out / name)) for name in ("a.png", "b.png", "plain.png")}
    assert texts["a.png"].startswith("a square red\n") and "Seed: 5," in texts["a.png"]
    assert texts["b.png"].startswith("a square blue\n") and "Seed: 9," in texts["b.png"]
    assert texts["plain.png"].startswith("a square\n") and "Seed: 3," in texts["plain.png"]
    assert "Steps: 3," in texts["a.png"]  # Steps was not ticked

    # From a PNG info directory: the picture of the same name there.
    _picture(tmp_path / "in2" / "b.png", "green")
    infos.mkdir()
    (infos / "b.png").write_bytes((source / "b.png").read_bytes())
    folders = dict(batch_input_dir=str(tmp_path / "in2"), batch_png_info=["Seed"], batch_png_info_dir=str(infos))
    gallery = folder_page.client.predict(*COMMON, None, 0.3, **folders, api_name="/img2img")[2]
    assert gallery[0]["caption"] == "Seed 9"


def test_a_looping_folder_batch_writes_every_loops_picture(folder_page, tmp_path):
    _picture(tmp_path / "frames" / "a.png", "red")
    folders = dict(batch_input_dir=str(tmp_path / "frames"), batch_output_dir=str(tmp_path / "out"))
    looping = dict(loopback_on=True, loopback_loops=2, loopback_final_denoising=0.5)
    progress = folder_page.client.predict(*COMMON, None, 0.3, **folders, **looping, api_name="/img2img")[1]
    assert "2 images written" in progress
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["a-1.png", "a-2.png"]
    # The second loop starts from the first one's picture: its infotext says so by its own seed.
    seeds = [
        read_infotext(Image.open(tmp_path / "out" / name)).split("Seed: ")[1].split(",")[0]
        for name in ("a-1.png", "a-2.png")
    ]
    assert int(seeds[1]) == int(seeds[0]) + 1


def test_inpaint_folder_batch_takes_each_pictures_mask_by_name(folder_page, tmp_path):
    client = folder_page.client
    source, masks, out = tmp_path / "in", tmp_path / "masks", tmp_path / "out"
    _picture(source / "left.png", "red")
    _picture(source / "right.png", "red")
    _picture(source / "none.png", "red")
    _half_mask(masks / "left.png", "left")
    _half_mask(masks / "right.png", "right")
    inpaint = (None, None, 0.9, 4, "Inpaint masked")
    common = (*COMMON[:6], 11, *COMMON[7:])
    folders = dict(batch_input_dir=str(source), batch_mask_dir=str(masks), batch_output_dir=str(out))
    progress = client.predict(*common, *inpaint, **folders, api_name="/inpaint")[1]
    assert "2 of 2 pictures" in progress and "1 without a mask, left out (none.png)" in progress
    for name in ("left", "right"):
        editor = {"background": handle_file(str(source / f"{name}.png")), "layers": [], "composite": None}
        alone = client.predict(
            *common, editor, handle_file(str(masks / f"{name}.png")), *inpaint[2:], api_name="/inpaint"
        )
        assert np.array_equal(_pixels(alone[2][0]["image"]), _pixels(out / f"{name}.png"))
    assert not np.array_equal(_pixels(out / "left.png"), _pixels(out / "right.png"))

    with pytest.raises(AppError, match="batch_mask_dir: got nothing; allowed: a folder of masks"):
        client.predict(*common, *inpaint, batch_input_dir=str(source), api_name="/inpaint")
    with pytest.raises(AppError, match="batch_input_dir: got a folder batch with Inpaint sketch; allowed: one of"):
        client.predict(*common, *inpaint, **folders, inpaint_sketch=True, api_name="/inpaint")


def test_a_folder_batch_with_uploaded_files_or_a_script_is_refused(folder_page, tmp_path):
    _picture(tmp_path / "in" / "a.png", "red")
    folders = dict(batch_input_dir=str(tmp_path / "in"))
    upload = [handle_file(str(tmp_path / "in" / "a.png"))]
    with pytest.raises(AppError, match="batch_input_dir: got a folder batch with uploaded batch files"):
        folder_page.client.predict(*COMMON, None, 0.3, **folders, batch_images=upload, api_name="/img2img")
    with pytest.raises(AppError, match="batch_input_dir: got a folder batch with the prompt matrix"):
        folder_page.client.predict(*COMMON, None, 0.3, **folders, matrix_on=True, api_name="/img2img")
    with pytest.raises(AppError, match="batch_png_info: got none with batch_png_info_dir '.*'; allowed: the param"):
        folder_page.client.predict(*COMMON, None, 0.3, **folders, batch_png_info_dir=str(tmp_path), api_name="/img2img")
    with pytest.raises(AppError, match="batch_output_dir: got nothing with|batch_input_dir: got nothing with"):
        folder_page.client.predict(*COMMON, None, 0.3, batch_output_dir=str(tmp_path), api_name="/img2img")


def test_uploaded_batches_share_one_seed_too(folder_page, tmp_path):
    paths = [_picture(tmp_path / f"{colour}.png", colour) for colour in ("red", "blue")]
    gallery = folder_page.client.predict(
        *COMMON, None, 0.3, batch_images=[handle_file(str(path)) for path in paths], api_name="/img2img"
    )[2]
    assert len({item["caption"] for item in gallery}) == 1 and gallery[0]["caption"].startswith("Seed ")


def test_stop_ends_a_folder_batch_and_the_picture_it_cut_is_not_written(engine, tmp_path):
    from engine import GenerationRequest, Progress

    for index in range(3):
        _picture(tmp_path / "in" / f"{index}.png", "red")
    plan = plan_folder_batch(tmp_path / "in", tmp_path / "out")
    session = PageSession()
    ticket = session.register()
    asked = []

    def make_request(picture, mask):
        asked.append(picture)
        if len(asked) == 2:  # Stop pressed while the second picture starts
            session.stop()
        return GenerationRequest(prompt="a square", steps=3, seed=5, width=64, height=64, init_images=[picture])

    updates = list(
        run_folder_batch(engine, session, plan, make_request, ticket=ticket, mode="img2img", outputs_dir=None)
    )
    # The second picture never began: nothing of it is counted.
    assert "Stopped: 1 of 3 pictures in" in updates[-1][1] and "1 image written" in updates[-1][1]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["0.png"]
    resumed = plan_folder_batch(tmp_path / "in", tmp_path / "out", skip_done=True)
    assert [item.relative.name for item in resumed.items] == ["1.png", "2.png"]

    # Stopped at its first step, the second picture ends as far as it got, and that is not written.
    class StoppingAtTheSecondPicture:
        def __init__(self):
            self.generations = 0
            self.model = engine.model

        def validate(self, request):
            return engine.validate(request)

        def generate(self, request, **kwargs):
            self.generations += 1
            for event in engine.generate(request, **kwargs):
                if isinstance(event, Progress) and self.generations == 2:
                    session.stop()
                yield event

    def plain_request(picture, mask):
        return GenerationRequest(prompt="a square", steps=3, seed=5, width=64, height=64, init_images=[picture])

    session, plan = PageSession(), plan_folder_batch(tmp_path / "in", tmp_path / "out", skip_done=True)
    stopping = StoppingAtTheSecondPicture()
    last = list(run_folder_batch(stopping, session, plan, plain_request, mode="img2img", outputs_dir=None))[-1]
    assert "Stopped: 2 of 2 pictures" in last[1] and "1 stopped or skipped, not written (2.png)" in last[1]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["0.png", "1.png"]

    # Stopped before its first picture began: nothing is made, and the page keeps its last pictures.
    session = PageSession()
    ticket = session.register()
    session.stop()
    plan = plan_folder_batch(tmp_path / "in", tmp_path / "out", skip_done=True)
    run = run_folder_batch(engine, session, plan, plain_request, ticket=ticket, mode="img2img", outputs_dir=None)
    last = list(run)[-1]
    assert "Stopped before it started" in last[1] and last[2:] == (gr.skip(),) * 3


def test_folders_are_off_where_the_server_does_not_allow_them(engine, models_dir, tmp_path):
    from ui.page import _make_generate_handler

    _picture(tmp_path / "in" / "a.png", "red")
    demo = build_page(engine, SimpleNamespace(outputs_dir=tmp_path, save_images=False, models_dir=models_dir))
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert "img2img_batch_folders_off" in ids and "img2img_batch_input_dir" not in ids
    assert "inpaint_batch_mask_dir" not in ids
    # Without those fields the page's inputs still reach the handlers' first parameters, in order.
    for fn in (fn for fn in demo.fns.values() if fn.api_name in ("img2img", "inpaint")):
        parameters = list(inspect.signature(fn.fn).parameters)
        folders = ["batch_input_dir", "batch_output_dir", "batch_skip_done", "batch_png_info", "batch_png_info_dir"]
        if fn.api_name == "inpaint":
            folders.insert(1, "batch_mask_dir")
        assert parameters[len(fn.inputs) :] == folders
    handler = _make_generate_handler("img2img", engine, outputs_dir=None, save_image=None, server_folders=False)
    with pytest.raises(gr.Error, match="batch_input_dir: got '.*in'; allowed: nothing here: folders of this machine"):
        next(handler(PageSession(), None, *COMMON, None, 0.3, batch_input_dir=str(tmp_path / "in")))


def test_extras_upscales_a_folder_into_pictures_of_the_same_names(folder_page, tmp_path):
    from engine.images import encode_png

    source, out = tmp_path / "in", tmp_path / "out"
    (source / "sub").mkdir(parents=True)
    (source / "a.png").write_bytes(encode_png(Image.new("RGB", (16, 16), "red"), "a red square\nSteps: 3, Seed: 4"))
    _picture(source / "sub" / "b.jpg", "blue", size=(8, 24))
    settings = (0, 2, 512, 512, True, "Lanczos", "None", 0)
    folders = dict(batch_input_dir=str(source), batch_output_dir=str(out))
    result, info, gallery = folder_page.client.predict(None, *settings, **folders, api_name="/extras")
    assert "2 of 2 pictures" in info and f"2 images written to {out}" in info and len(gallery) == 2
    with Image.open(out / "a.png") as kept:
        # The source's infotext and what was done, as A1111's Extras writes them.
        assert kept.size == (32, 32) and kept.info["parameters"].startswith("a red square")
        assert kept.info["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
    assert Image.open(out / "sub" / "b.png").size == (16, 48)

    with pytest.raises(AppError, match="batch_output_dir: .*'a.png' and 1 more already there"):
        folder_page.client.predict(None, *settings, **folders, api_name="/extras")
    with pytest.raises(AppError, match="Nothing was upscaled.*2 already done"):
        folder_page.client.predict(None, *settings, **folders, batch_skip_done=True, api_name="/extras")
    with pytest.raises(AppError, match="batch_input_dir: got a folder batch with uploaded batch files"):
        upload = [handle_file(str(source / "a.png"))]
        folder_page.client.predict(None, *settings, upload, **folders, api_name="/extras")


def test_extras_folders_are_off_where_the_server_does_not_allow_them(engine, tmp_path):
    from ui.api import SdApi
    from ui.page_extras import run_extras
    from ui.server import ServerSettings

    # Clients read A1111's flag from /sdapi/v1/cmd-flags.
    for hidden in (True, False):
        settings = ServerSettings(api=True, outputs_dir=tmp_path, hide_ui_dir_config=hidden)
        assert SdApi(engine, settings).cmd_flags()["hide_ui_dir_config"] is hidden

    _picture(tmp_path / "in" / "a.png", "red")
    settings = (0, 2, 512, 512, True, "Lanczos", "None", 0)
    with pytest.raises(gr.Error, match="batch_input_dir: got '.*in'; allowed: nothing here: folders of this machine"):
        run_extras(engine, PageSession(), None, *settings, batch_input_dir=str(tmp_path / "in"))


def test_an_extras_folder_batch_counts_the_pictures_it_saved(engine, tmp_path):
    from engine.outputs import save_image
    from ui.page_extras import run_extras

    _picture(tmp_path / "in" / "a.png", "red")
    session, outputs = PageSession(save_images=True), tmp_path / "outputs"
    for upscaler, written in (("Lanczos", "1 image written"), ("None", "0 images written")):
        settings = (0, 2, 512, 512, True, upscaler, "None", 0)
        _, info, _ = run_extras(
            engine,
            session,
            None,
            *settings,
            batch_input_dir=str(tmp_path / "in"),
            outputs_dir=outputs,
            save_image=save_image,
            server_folders=True,
        )
        assert written in info
    # Upscaler 1 None leaves the picture as it was, and Extras saves nothing then, as a single upscale does.
    assert len(list(outputs.rglob("*.png"))) == 1
