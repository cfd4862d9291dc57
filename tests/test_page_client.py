"""The page's endpoints through gradio_client, as a script user would call them (tiny model, CPU).

Each gradio_client.Client is its own browser-like session: these tests use two to check that one
user's Stop and settings never reach the other's jobs.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from ui.page import build_page

STEP_RE = re.compile(r"(?:batch (\d+)/\d+, )?step (\d+)/(\d+)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def outputs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("page-outputs")


@pytest.fixture(scope="module")
def page_url(engine, models_dir, outputs_dir):
    settings = SimpleNamespace(outputs_dir=outputs_dir, save_images=True, models_dir=models_dir)
    demo = build_page(engine, settings)
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(), quiet=True)
    yield url
    demo.close()


def _client(url: str) -> Client:
    return Client(url, verbose=False)


def txt2img_args(prompt="a red lighthouse", *, steps=8, seed=1234, width=64, height=64, n_iter=1, batch_size=1):
    """The /txt2img parameters in order: prompt, negative, sampler, schedule type, steps, cfg, seed, w, h, count, size."""
    return (prompt, "blurry", "Euler a", "Automatic", steps, 7.0, seed, width, height, n_iter, batch_size)


def _steps_seen(outputs) -> list[int]:
    """Steps done so far (over all batches) as reported by the progress text of each streamed update."""
    steps = []
    for update in outputs:
        if len(update) < 2:
            # gradio_client's update when it could not download a file: gradio rewrites a cached file each time
            # the same picture is sent, and a download during the rewrite ends short.
            continue
        match = STEP_RE.search(update[1] or "")
        if match:
            batch, step, total = int(match.group(1) or 1), int(match.group(2)), int(match.group(3))
            steps.append((batch - 1) * total + step)
    return steps


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_txt2img_streams_previews_then_a_png_carrying_its_infotext(page_url):
    client = _client(page_url)
    job = client.submit(*txt2img_args(steps=8, seed=1234), api_name="/txt2img")
    updates = list(job)
    *running, final = updates

    previews = [update[0] for update in running if update[0]]
    assert len(set(previews)) >= 2, f"expected at least two distinct live previews, got {previews}"
    assert all(not update[2] for update in running), "the gallery stays empty until the job ends"
    assert _steps_seen(running)[-1] == 8
    assert "it/s" in running[-1][1] and "ETA" in running[-1][1]

    preview, progress, gallery, infotext = final
    assert preview is None
    assert len(gallery) == 1 and gallery[0]["caption"] == "Seed 1234"
    with Image.open(gallery[0]["image"]) as image:
        assert image.format == "PNG"
        assert image.size == (64, 64)
        parameters = image.info["parameters"]
    assert parameters == infotext
    assert parameters.startswith("a red lighthouse\nNegative prompt: blurry\n")
    assert "Steps: 8" in parameters and "Seed: 1234" in parameters and "Size: 64x64" in parameters
    assert "seed 1234" in progress


def test_a_fast_run_streams_at_most_ten_updates_a_second_and_ends_on_its_last_step(page_url):
    # The tiny model makes dozens of steps a second; the page gets a paced stream, not one per step.
    client = _client(page_url)
    started = time.monotonic()
    updates = list(client.submit(*txt2img_args(steps=150, seed=7), api_name="/txt2img"))
    elapsed = time.monotonic() - started
    *running, _ = updates
    assert len(running) <= elapsed / 0.1 + 3, f"{len(running)} updates in {elapsed:.1f} s"
    assert len(running) < 150
    assert _steps_seen(running)[-1] == 150
    assert len({update[0] for update in running if update[0]}) >= 2, "the preview still changes as it runs"


def _pictures(gallery) -> list[dict]:
    """The gallery's pictures, without the batch grid that comes first."""
    return [item for item in gallery if item["caption"] != "Grid"]


def test_batch_gives_one_image_and_caption_per_seed_after_a1111s_grid(page_url, outputs_dir):
    client = _client(page_url)
    result = client.predict(*txt2img_args(steps=4, seed=77, n_iter=2, batch_size=2), api_name="/txt2img")
    gallery, infotext = result[2], result[3]
    assert [item["caption"] for item in gallery] == ["Grid", "Seed 77", "Seed 78", "Seed 79", "Seed 80"]
    assert "Seed: 77" in infotext
    # A1111's layout: round(sqrt(4)) = 2 rows of 2; saved beside the pictures' folder, at the first seed.
    grid = Image.open(gallery[0]["image"])
    assert grid.size == (128, 128)
    assert np.array_equal(np.asarray(grid)[64:, :64], np.asarray(Image.open(gallery[3]["image"]).convert("RGB")))
    assert list(outputs_dir.glob("txt2img-grids/*/*-77.png"))
    # Off in the Settings, a batch has no grid; one picture never has one.
    client.predict(False, api_name="/set_batch_grid")
    plain = client.predict(*txt2img_args(steps=2, seed=77, batch_size=2), api_name="/txt2img")[2]
    assert [item["caption"] for item in plain] == ["Seed 77", "Seed 78"]
    client.predict(True, api_name="/set_batch_grid")
    single = client.predict(*txt2img_args(steps=2, seed=77), api_name="/txt2img")[2]
    assert [item["caption"] for item in single] == ["Seed 77"]


def test_variation_seed_applies_only_with_extra_ticked(page_url):
    client = _client(page_url)
    extras = {"subseed": 500, "subseed_strength": 0.5, "batch_size": 2}
    args = txt2img_args(steps=4, seed=77)[:-1]
    ticked = client.predict(*args, seed_extra=True, **extras, api_name="/txt2img")
    assert [item["caption"] for item in _pictures(ticked[2])] == ["Seed 77, variation 500", "Seed 77, variation 501"]
    assert "Variation seed: 500, Variation seed strength: 0.5" in ticked[3]
    unticked = client.predict(*args, seed_extra=False, **extras, api_name="/txt2img")
    assert [item["caption"] for item in _pictures(unticked[2])] == ["Seed 77", "Seed 78"]
    assert "Variation seed" not in unticked[3]


def test_a_bad_value_is_refused_with_the_field_and_what_is_allowed(page_url, capfd, caplog):
    client = _client(page_url)
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="ui.fields"), pytest.raises(AppError) as caught:
        client.predict(*txt2img_args(width=100), api_name="/txt2img")
    message = str(caught.value)
    assert "width" in message and "100" in message and "multiple of 8" in message
    # The server's log says it in one line: no traceback for a person's typo.
    assert "Traceback" not in capfd.readouterr().err
    assert any("width: got 100" in record.getMessage() for record in caplog.records)
    with pytest.raises(AppError, match="sampler"):
        client.predict("x", "", "No such sampler", "Automatic", 4, 7, 1, 64, 64, 1, 1, api_name="/txt2img")
    # A script's wrong types: gradio itself would answer "Could not preprocess input component at index 6" for the
    # text, and take the string "false" as a ticked box.
    with pytest.raises(AppError, match=r"Sampling steps: got '20'; allowed: a number from 1 to 150"):
        client.predict("x", "", "Euler a", "Automatic", "20", api_name="/txt2img")
    with pytest.raises(AppError, match=r"Tiling: got 'false'; allowed: true or false"):
        client.predict(*txt2img_args(steps=4), tiling="false", api_name="/txt2img")
    # The page keeps working after an error.
    assert client.predict(*txt2img_args(steps=4), api_name="/txt2img")[2]


def test_skip_cuts_only_the_running_batch_of_the_callers_job(page_url):
    user_a, user_b = _client(page_url), _client(page_url)
    job = user_a.submit(*txt2img_args(steps=150, seed=8, n_iter=3), api_name="/txt2img")
    _wait_for(lambda: len(_steps_seen(job.outputs())) >= 2, 60, "the job to start")
    user_b.predict(api_name="/skip")  # another user's Skip does nothing to it
    time.sleep(0.3)
    user_a.predict(api_name="/skip")
    _preview, progress, gallery, infotext = job.result(timeout=120)
    assert len(_pictures(gallery)) == 3, "the skipped batch keeps its picture as far as it got, and the job goes on"
    # One batch skipped, the one running at the caller's Skip: the other user's Skip skipped none.
    assert re.search(r"\(skipped batch \d\)", progress) and "Stopped" not in progress


def test_stop_ends_only_the_callers_job_and_keeps_the_partial_result(page_url):
    user_a, user_b = _client(page_url), _client(page_url)
    # Up to 4 x 120 steps: long enough that only Stop can end it while the test looks.
    long_job = user_a.submit(*txt2img_args(steps=120, seed=5, n_iter=4), api_name="/txt2img")
    _wait_for(lambda: len(_steps_seen(long_job.outputs())) >= 2, 60, "user A's job to start")
    # User B queues a short job behind A's and presses Stop: A's job must go on.
    queued_job = user_b.submit(*txt2img_args(steps=6, seed=6), api_name="/txt2img")
    user_b.predict(api_name="/stop")
    steps_when_b_stopped = _steps_seen(long_job.outputs())[-1]
    _wait_for(
        lambda: _steps_seen(long_job.outputs())[-1] >= steps_when_b_stopped + 2,
        60,
        "user A's job to go on after user B pressed Stop",
    )
    assert not long_job.done()

    user_a.predict(api_name="/stop")
    preview, progress, gallery, infotext = long_job.result(timeout=60)
    assert _steps_seen(long_job.outputs())[-1] < 4 * 120, "Stop should end the job early"
    assert "Stopped" in progress
    assert 1 <= len(_pictures(gallery)) < 4, "an interrupted job still shows what it made, and no more batches"
    assert "Steps: 120" in infotext and "Seed: 5" in infotext

    # B's job ran after A's, in full: A's Stop did not reach it.
    b_final = queued_job.result(timeout=60)
    assert _steps_seen(queued_job.outputs())[-1] == 6
    assert "Stopped" not in b_final[1] and len(b_final[2]) == 1


def test_a_page_job_behind_an_api_job_says_what_it_waits_for(page_url, job_ahead):
    # A page job that leaves the page's queue while a REST API job runs must say why it has not
    # started rather than sit at "Starting...".
    page_job = _client(page_url).submit(*txt2img_args(steps=4, seed=7), api_name="/txt2img")
    _wait_for(
        lambda: any("Waiting for another job to finish (step " in (update[1] or "") for update in page_job.outputs()),
        60,
        "the page job to say it waits for the API job",
    )
    assert not page_job.done()
    job_ahead.interrupt()
    _, progress, gallery, _ = page_job.result(timeout=60)
    assert _steps_seen(page_job.outputs())[-1] == 4
    assert "Stopped" not in progress and len(gallery) == 1


def test_settings_belong_to_one_session(page_url, outputs_dir):
    user_a, user_b = _client(page_url), _client(page_url)
    user_b.predict("none", api_name="/set_preview_mode")
    user_b.predict(False, api_name="/set_save_images")

    def saved() -> set[Path]:
        return set(outputs_dir.rglob("*.png"))

    before = saved()
    a_job = user_a.submit(*txt2img_args(steps=4, seed=11), api_name="/txt2img")
    a_updates = list(a_job)
    a_saved = saved() - before
    assert any(update[0] for update in a_updates[:-1]), "user A still gets live previews"
    assert len(a_saved) == 1, "user A's page still saves (the server default)"
    with Image.open(a_saved.pop()) as image:
        assert "Seed: 11" in image.info["parameters"]

    before = saved()
    b_job = user_b.submit(*txt2img_args(steps=4, seed=12), api_name="/txt2img")
    b_updates = list(b_job)
    assert not any(update[0] for update in b_updates), "user B turned previews off"
    assert len(b_updates[-1][2]) == 1
    assert saved() == before, "user B turned saving off"

    with pytest.raises(AppError, match="approx"):  # the message lists the modes there are
        user_b.predict("sepia", api_name="/set_preview_mode")


def test_img2img_and_inpaint_endpoints(page_url, tmp_path):
    client = _client(page_url)
    init_path = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(init_path)
    mask_path = tmp_path / "mask.png"
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(mask_path)
    common = ("a red square", "", "Euler", "Automatic", 4, 7.0, 21, 64, 64, 1, 1)

    result = client.predict(*common, handle_file(str(init_path)), 0.5, api_name="/img2img")
    with Image.open(result[2][0]["image"]) as image:
        assert "Denoising strength: 0.5" in image.info["parameters"]

    # A mask uploaded on its own.
    editor = {"background": handle_file(str(init_path)), "layers": [], "composite": None}
    result = client.predict(
        *common, editor, handle_file(str(mask_path)), 0.75, 4, "Inpaint masked", api_name="/inpaint"
    )
    assert len(result[2]) == 1 and "Seed: 21" in result[3]

    # A mask painted in the editor: the painted layer's opaque pixels are the area to repaint.
    layer_path = tmp_path / "layer.png"
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (8, 8, 32, 32))
    layer.save(layer_path)
    painted = {"background": handle_file(str(init_path)), "layers": [handle_file(str(layer_path))], "composite": None}
    result = client.predict(*common, painted, None, 0.75, 4, "Inpaint not masked", api_name="/inpaint")
    assert len(result[2]) == 1

    with pytest.raises(AppError, match="mask"):
        client.predict(*common, editor, None, 0.75, 4, "Inpaint masked", api_name="/inpaint")


def test_png_info_reads_back_the_parameters(page_url):
    client = _client(page_url)
    gallery = client.predict(*txt2img_args(steps=4, seed=99), api_name="/txt2img")[2]
    text, table = client.predict(handle_file(gallery[0]["image"]), api_name="/png_info")
    assert text.startswith("a red lighthouse") and "Seed: 99" in text
    assert "<th>Seed</th><td>99</td>" in table


def test_prompt_syntax_and_emphasis_are_session_settings(page_url):
    user_a, user_b = _client(page_url), _client(page_url)
    user_a.predict("Ignore", api_name="/set_emphasis")
    user_a.predict("compel", api_name="/set_prompt_syntax")
    text_a = user_a.predict(*txt2img_args("a red++ lighthouse", steps=3), api_name="/txt2img")[3]
    text_b = user_b.predict(*txt2img_args("a (red:1.2) lighthouse", steps=3), api_name="/txt2img")[3]
    assert "Emphasis: Ignore" in text_a and "Prompt syntax: compel" in text_a
    assert "Emphasis" not in text_b and "Prompt syntax" not in text_b
    with pytest.raises(AppError, match="Emphasis mode \\(A1111 syntax\\): got 'loud'; allowed: one of Original, "):
        user_a.predict("loud", api_name="/set_emphasis")
    with pytest.raises(AppError, match="Sampling method: got 'Euler b'; allowed: one of DPM\\+\\+ 2M, "):
        user_a.predict(*txt2img_args()[:2], "Euler b", *txt2img_args()[3:], api_name="/txt2img")


def test_compare_grids_use_the_hires_panel_and_the_seed_extras(page_url):
    client = _client(page_url)
    axes = ("Var. strength", "0, 1", "Nothing", "", "Nothing", "", False)
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Lanczos", "hr_denoising_strength": 0.5}
    result = client.predict(
        *txt2img_args("a lighthouse", steps=3, seed=5)[:9],
        *axes,
        seed_extra=True,
        subseed=9,
        **hires,
        api_name="/compare",
    )
    progress, cells = result[0], result[3]
    assert "2 cells" in progress
    images = []
    for cell in cells:
        with Image.open(cell["image"]) as image:
            assert image.size == (96, 96)  # the hires pass's size
            images.append(image.convert("RGB").tobytes())
    assert images[0] != images[1]  # strength 0 is seed 5's picture, strength 1 variation seed 9's


def test_compare_grids_tile_when_the_txt2img_tiling_box_is_ticked(page_url, engine):
    from engine import GenerationRequest

    client = _client(page_url)
    axes = ("Seed", "5", "Nothing", "", "Nothing", "", False)
    result = client.predict(*txt2img_args("a lighthouse", steps=3, seed=5)[:9], *axes, tiling=True, api_name="/compare")
    (cell,) = result[3]
    with Image.open(cell["image"]) as image:
        shown = image.convert("RGB").tobytes()
    request = GenerationRequest(
        prompt="a lighthouse",
        negative_prompt="blurry",
        sampler_name="Euler a",
        steps=3,
        cfg_scale=7.0,
        seed=5,
        width=64,
        height=64,
        tiling=True,
    )
    tiled = list(engine.generate(request))[-1].images[0]
    plain = list(engine.generate(GenerationRequest(**{**vars(request), "tiling": False})))[-1].images[0]
    assert shown == tiled.convert("RGB").tobytes() and shown != plain.convert("RGB").tobytes()


def test_img2img_runs_a_batch_of_init_images_one_job_each(page_url, tmp_path):
    client = _client(page_url)
    paths = []
    for index, colour in enumerate(("red", "blue", "yellow")):
        paths.append(tmp_path / f"batch-{index}.png")
        Image.new("RGB", (64, 64), colour).save(paths[-1])
    common = ("a square", "", "Euler", "Automatic", 4, 7.0, 30, 64, 64, 1, 1)
    batch = [handle_file(str(path)) for path in paths]
    _, progress, gallery, _ = client.predict(*common, None, 0.3, batch_images=batch, api_name="/img2img")
    assert "3 init images: 3 images in" in progress
    # Each picture's job is the one that picture makes on its own, seed and all.
    for path, item in zip(paths, gallery, strict=True):
        alone = client.predict(*common, handle_file(str(path)), 0.3, api_name="/img2img")[2]
        with Image.open(alone[0]["image"]) as one, Image.open(item["image"]) as in_batch:
            assert np.array_equal(np.asarray(one), np.asarray(in_batch))
    with Image.open(gallery[0]["image"]) as first, Image.open(gallery[1]["image"]) as second:
        assert not np.array_equal(np.asarray(first), np.asarray(second))

    not_a_picture = tmp_path / "notes.png"
    not_a_picture.write_text("not a picture")
    with pytest.raises(AppError, match="batch_images: got 'notes.png'"):
        client.predict(*common, None, 0.3, batch_images=[handle_file(str(not_a_picture))], api_name="/img2img")
    with pytest.raises(AppError, match="one of the two"):
        client.predict(
            *common, None, 0.3, batch_images=batch, prompt_list=True, prompt_list_text="a", api_name="/img2img"
        )


def test_resize_by_sizes_each_job_from_its_own_init_image(page_url, tmp_path):
    client = _client(page_url)
    wide, square = tmp_path / "wide.png", tmp_path / "square.png"
    Image.new("RGB", (96, 64), "red").save(wide)
    Image.new("RGB", (64, 64), "blue").save(square)
    common = ("a square", "", "Euler", "Automatic", 3, 7.0, 30, 256, 256, 1, 1)

    def sizes(gallery) -> list[tuple[int, int]]:
        return [Image.open(item["image"]).size for item in gallery]

    gallery = client.predict(*common, handle_file(str(wide)), 0.3, resize_by=1.5, api_name="/img2img")[2]
    assert sizes(gallery) == [(144, 96)]  # not Width x Height (256x256)
    batch = [handle_file(str(wide)), handle_file(str(square))]
    gallery = client.predict(*common, None, 0.3, batch_images=batch, resize_by=0.5, api_name="/img2img")[2]
    assert sizes(gallery) == [(48, 32), (32, 32)]
    assert sizes(client.predict(*common, handle_file(str(wide)), 0.3, api_name="/img2img")[2]) == [(256, 256)]
    with pytest.raises(AppError, match="resize_by: got 0.05, which makes the 96x64 picture 0x0"):
        client.predict(*common, handle_file(str(wide)), 0.3, resize_by=0.05, api_name="/img2img")


def test_clip_skip_is_this_sessions_own_and_changes_the_picture(page_url):
    client, other = _client(page_url), _client(page_url)
    client.predict(2, api_name="/set_clip_skip")
    skipped = client.predict(*txt2img_args(steps=4), api_name="/txt2img")
    plain = other.predict(*txt2img_args(steps=4), api_name="/txt2img")
    assert "Clip skip: 2" in skipped[3] and "Clip skip" not in plain[3]
    with Image.open(skipped[2][0]["image"]) as a, Image.open(plain[2][0]["image"]) as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))  # the penultimate layer's states
    client.predict(1, api_name="/set_clip_skip")
    assert "Clip skip" not in client.predict(*txt2img_args(steps=4), api_name="/txt2img")[3]


def test_the_readme_lists_every_settings_endpoint(page_url):
    import re
    from pathlib import Path

    endpoints = _client(page_url).view_api(return_format="dict", print_info=False)["named_endpoints"]
    setters = {name for name in endpoints if name.startswith("/set_")}
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"`(/set_[a-z0-9_]+)`", readme))
    assert setters and listed == setters


def test_a_preview_already_on_the_page_is_not_sent_again(micro_engine):
    from engine import GenerationRequest
    from ui.page_jobs import PageSession, run_job

    # Previews every 20 steps; progress goes out up to ten times a second in between, without the picture again.
    session = PageSession(preview_every=20)
    request = GenerationRequest(prompt="a red circle on a blue background", steps=60, seed=3)
    ticket = session.start_job().job_id  # as the page's Generate registers the job; API calls have none
    *running, _final = run_job(micro_engine, session, request, ticket=ticket, mode="txt2img", outputs_dir=None)
    skipped = [isinstance(update[0], dict) and update[0].get("__type__") == "update" for update in running]
    sent = [update[0] for update, skip in zip(running, skipped, strict=True) if not skip and update[0] is not None]
    assert len(sent) == 3 and len({id(picture) for picture in sent}) == 3, "each preview goes out once"
    assert any(skipped), "progress between previews leaves the picture as it is"
