"""The page in a real browser: Debian's Chromium driven by Playwright (tiny model, CPU).

Never downloads a browser: a missing /usr/bin/chromium fails with the command that installs it.
"""

from __future__ import annotations

import io
import re
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from ui.page import build_page

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 60_000
# Batches of 150 steps in the runs a test stops: long enough (minutes, had nobody pressed Stop) that
# a slow page or screenshot cannot let one finish before Stop arrives.
LONG_RUN_BATCHES = 20
PROMPT = "a lighthouse at dusk, oil painting"

# Records, in order, each new src of the live preview and of the gallery's main image, and each
# progress text: what a person watching the page would have seen.
RECORDER_JS = """
() => {
  window.__seen = [];
  const last = {};
  const note = (kind, value) => {
    if (value && last[kind] !== value) { last[kind] = value; window.__seen.push([kind, value]); }
  };
  const look = () => {
    const preview = document.querySelector('#txt2img_preview img');
    note('preview', preview && preview.getAttribute('src'));
    const gallery = document.querySelector('#txt2img_gallery img');
    note('gallery', gallery && gallery.getAttribute('src'));
    const progress = document.querySelector('#txt2img_progress .job-progress-text');
    note('progress', progress && progress.textContent);
  };
  if (window.__observer) window.__observer.disconnect();
  window.__observer = new MutationObserver(look);
  window.__observer.observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
  look();
}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_page(engine, settings):
    """The page for `engine`, served on a free local port: (demo, url). Close the demo when done."""
    demo = build_page(engine, settings)
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(), quiet=True)
    return demo, url


@pytest.fixture(scope="module")
def page_url(engine, models_dir, tmp_path_factory):
    settings = SimpleNamespace(
        outputs_dir=tmp_path_factory.mktemp("browser-outputs"), save_images=False, models_dir=models_dir
    )
    demo, url = serve_page(engine, settings)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make chromium` to install Debian's Chromium for the browser tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_page(browser, url: str, height: int = 1000):
    """A new browser context showing the page at `url`, once its prompt box is there: (context, page)."""
    context = browser.new_context(viewport={"width": 1400, "height": height})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#txt2img_prompt textarea")
    return context, page


@pytest.fixture(scope="module")
def page(browser, page_url):
    context, page = open_page(browser, page_url)
    yield page
    context.close()


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    page.wait_for_function(
        "([id, v]) => document.querySelector(`#${id} input[type=number]`).value === String(v)", arg=[elem_id, value]
    )


def _generate(page, *, steps: int, size: int = 64, n_iter: int = 1, wait_for_end: bool = True) -> None:
    _set_number(page, "txt2img_steps", steps)
    _set_number(page, "txt2img_batch_count", n_iter)
    _set_number(page, "txt2img_width", size)
    _set_number(page, "txt2img_height", size)
    page.evaluate(RECORDER_JS)
    # The last run's bar is marked, so that waiting for this run's end cannot be met by the bar it left behind.
    page.evaluate(
        "document.querySelectorAll('#txt2img_progress .job-progress').forEach(bar => bar.classList.add('stale'))"
    )
    page.click("#txt2img_generate")
    if wait_for_end:
        _wait_until_idle(page)


def _wait_until_idle(page) -> None:
    page.wait_for_selector(
        "#txt2img_progress .job-progress.done:not(.stale), #txt2img_progress .job-progress.interrupted:not(.stale)"
    )
    page.wait_for_function("!document.querySelector('#txt2img_generate').disabled")
    page.wait_for_function("document.querySelector('#txt2img_infotext textarea').value.includes('Seed:')")


def _seen(page, kind: str) -> list[str]:
    return [value for seen_kind, value in page.evaluate("window.__seen") if seen_kind == kind]


def test_generate_shows_live_previews_then_the_result_with_its_seed(page, artifacts_dir):
    page.fill("#txt2img_prompt textarea", PROMPT)
    page.wait_for_function("document.querySelector('#txt2img_token_counter').textContent.trim() === '7/75'")
    _set_number(page, "txt2img_seed", 4242)
    _generate(page, steps=16, size=128)

    seen = page.evaluate("window.__seen")
    kinds = [kind for kind, _ in seen]
    first_result = kinds.index("gallery")
    previews_before_result = {value for kind, value in seen[:first_result] if kind == "preview"}
    assert len(previews_before_result) >= 2, f"the live preview should change at least twice, saw {seen}"
    assert any(re.search(r"step \d+/16, [\d.]+ it/s, ETA", text) for text in _seen(page, "progress"))

    infotext = page.input_value("#txt2img_infotext textarea")
    assert infotext.startswith(PROMPT) and "Seed: 4242" in infotext and "Size: 128x128" in infotext
    assert "seed 4242" in page.inner_text("#txt2img_progress")
    assert page.locator("#txt2img_preview img").count() == 0 or not page.is_visible("#txt2img_preview")

    page.screenshot(path=str(artifacts_dir / "page_txt2img.png"), full_page=True)


def test_the_model_note_gets_a_readable_column_beside_the_checkpoint(page):
    """gr.HTML takes no flex share of its own: without the page's style the note was squeezed to a column a
    few words wide, and its wrapped lines stretched the whole top row to three times its controls' height."""
    note = page.locator("#model_note").bounding_box()
    checkpoint = page.locator("#model_dropdown").bounding_box()
    assert note["width"] >= 240
    assert checkpoint["height"] < 120


def test_a_bad_value_shows_the_field_and_the_page_keeps_working(page):
    _set_number(page, "txt2img_width", 100)
    page.click("#txt2img_generate")
    toast = page.locator("[data-testid='toast-text']").first
    toast.wait_for()
    assert toast.inner_text() == "width: got 100; allowed: a multiple of 8, at least 8"
    page.wait_for_function("!document.querySelector('#txt2img_generate').disabled")
    assert "Not run" in page.inner_text("#txt2img_progress")
    page.click("[data-testid='toast-close']")
    # The last result is still there to reuse.
    assert "Seed: 4242" in page.input_value("#txt2img_infotext textarea")


def test_reuse_and_random_seed_buttons(page):
    _set_number(page, "txt2img_seed", -1)
    page.click("#txt2img_reuse_seed")
    page.wait_for_function("document.querySelector('#txt2img_seed input').value === '4242'")
    page.click("#txt2img_random_seed")
    page.wait_for_function("document.querySelector('#txt2img_seed input').value === '-1'")


def test_send_result_to_img2img(page):
    page.click("#txt2img_send_to_img2img")
    page.wait_for_selector("#img2img_image img")
    page.wait_for_function(f"document.querySelector('#img2img_prompt textarea').value === {PROMPT!r}")
    assert page.input_value("#img2img_seed input") == "4242"
    assert page.input_value("#img2img_width input[type=number]") == "128"
    page.get_by_role("tab", name="txt2img").click()
    page.wait_for_selector("#txt2img_prompt textarea")


def test_send_result_to_extras_and_upscale_it(page):
    infotext = page.input_value("#txt2img_infotext textarea")
    assert "Seed: " in infotext
    page.click("#txt2img_send_to_extras")
    page.wait_for_selector("#extras_image img")
    page.click("#extras_generate")  # Lanczos, 2x
    page.wait_for_function("document.querySelector('#extras_info textarea').value.includes('(256x256')")
    assert page.input_value("#extras_info textarea").startswith(
        "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
    )
    # The result's download keeps the generation's infotext, with what Extras did beside it.
    result = Image.open(io.BytesIO(page.request.get(page.get_attribute("#extras_result img", "src")).body()))
    assert result.size == (256, 256)
    assert result.info["parameters"] == infotext
    assert result.info["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
    page.get_by_role("tab", name="txt2img").click()
    page.wait_for_selector("#txt2img_prompt textarea")


def test_png_info_round_trip_fills_txt2img(page, tmp_path, artifacts_dir):
    src = page.get_attribute("#txt2img_gallery img", "src")
    png_path = tmp_path / "generated.png"
    png_path.write_bytes(page.request.get(src).body())
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    page.fill("#txt2img_prompt textarea", "")
    _set_number(page, "txt2img_steps", 30)
    page.get_by_role("tab", name="PNG Info").click()
    page.set_input_files("#pnginfo_image input[type=file]", str(png_path))
    page.wait_for_function("document.querySelector('#pnginfo_text textarea').value.includes('Seed: 4242')")
    assert "4242" in page.inner_text("#pnginfo_params")
    page.screenshot(path=str(artifacts_dir / "page_pnginfo.png"), full_page=True)

    page.click("#pnginfo_send_to_txt2img")
    page.wait_for_function(f"document.querySelector('#txt2img_prompt textarea').value === {PROMPT!r}")
    assert page.input_value("#txt2img_steps input[type=number]") == "16"
    assert page.input_value("#txt2img_seed input") == "4242"


def test_read_parameters_fills_the_tab_from_the_prompt_box_or_the_last_generation(page):
    """A1111's ↙: an infotext pasted into the prompt fills the tab as PNG Info's Send does; with the prompt empty,
    the last generation's; a prompt without parameters gets an error saying what to paste."""
    page.fill("#txt2img_prompt textarea", "a blue circle")
    _set_number(page, "txt2img_seed", 31)
    _generate(page, steps=3, size=64)
    last = page.input_value("#txt2img_infotext textarea")
    assert "Steps: 3," in last and "Seed: 31," in last
    assert "pasted into the prompt, or from the last generation" in page.get_attribute("#txt2img_paste", "title")
    pasted = (
        "a green square on a red background\nNegative prompt: blue\nSteps: 9, Sampler: DDIM, CFG scale: 5.5, Seed: 777"
    )
    page.fill("#txt2img_prompt textarea", pasted)
    page.click("#txt2img_paste")
    page.wait_for_function(
        "document.querySelector('#txt2img_prompt textarea').value === 'a green square on a red background'"
    )
    assert page.input_value("#txt2img_neg_prompt textarea") == "blue"
    assert page.input_value("#txt2img_steps input[type=number]") == "9"
    assert page.input_value("#txt2img_seed input") == "777"
    page.fill("#txt2img_prompt textarea", "")
    page.click("#txt2img_paste")
    page.wait_for_function("document.querySelector('#txt2img_prompt textarea').value === 'a blue circle'")
    assert page.input_value("#txt2img_steps input[type=number]") == "3"
    assert page.input_value("#txt2img_seed input") == "31"
    assert page.input_value("#txt2img_neg_prompt textarea") == ""
    page.fill("#txt2img_prompt textarea", "a red circle")
    page.click("#txt2img_paste")
    page.get_by_text("holds no generation parameters").first.wait_for()
    assert page.input_value("#txt2img_prompt textarea") == "a red circle"


def test_selecting_an_image_of_a_batch_shows_its_infotext_and_seed(page):
    _set_number(page, "txt2img_batch_size", 2)
    _set_number(page, "txt2img_seed", 100)
    try:
        _generate(page, steps=4, size=64)
        assert "Seed: 100" in page.input_value("#txt2img_infotext textarea")
        # A1111's batch grid comes first; the pictures follow it.
        page.get_by_role("button", name="Thumbnail 3 of 3").first.click()
        page.wait_for_function("document.querySelector('#txt2img_infotext textarea').value.includes('Seed: 101')")
        _set_number(page, "txt2img_seed", -1)
        page.click("#txt2img_reuse_seed")
        page.wait_for_function("document.querySelector('#txt2img_seed input').value === '101'")
    finally:
        _set_number(page, "txt2img_batch_size", 1)


def test_stop_ends_a_long_run_and_the_page_stays_usable(page, artifacts_dir):
    _set_number(page, "txt2img_seed", 7)
    _generate(page, steps=150, size=64, n_iter=LONG_RUN_BATCHES, wait_for_end=False)
    page.wait_for_function("/step \\d+\\/150/.test(document.querySelector('#txt2img_progress').textContent)")
    page.wait_for_selector("#txt2img_preview img")
    page.screenshot(path=str(artifacts_dir / "page_running.png"), full_page=True)
    page.click("#txt2img_stop")
    page.wait_for_selector("#txt2img_progress .job-progress.interrupted")
    _wait_until_idle(page)
    assert "Stopped" in page.inner_text("#txt2img_progress")
    assert _seen(page, "progress") and not any(
        f"batch {LONG_RUN_BATCHES}/" in text for text in _seen(page, "progress")
    ), "Stop should end the run early"
    assert "Seed: 7" in page.input_value("#txt2img_infotext textarea"), "the stopped run still shows its image"

    # Usable again: the next run goes to the end.
    _generate(page, steps=4, size=64)
    assert "Stopped" not in page.inner_text("#txt2img_progress")
    assert "Steps: 4" in page.input_value("#txt2img_infotext textarea")


STEPS_DONE_JS = """() => {
  const m = /(?:batch (\\d+)\\/\\d+, )?step (\\d+)\\/(\\d+)/.exec(document.querySelector('#txt2img_progress').textContent);
  return m ? (Number(m[1] || 1) - 1) * Number(m[3]) + Number(m[2]) : 0;
}"""


def _steps_done(page) -> int:
    """Steps done over all batches, from the progress text."""
    return page.evaluate(STEPS_DONE_JS)


def test_a_queued_job_shows_its_place_and_stop_reaches_only_its_owner(browser, page_url, page):
    other_context = browser.new_context(viewport={"width": 1400, "height": 1000})
    other = other_context.new_page()
    other.set_default_timeout(TIMEOUT_MS)
    other.goto(page_url)
    other.wait_for_selector("#txt2img_prompt textarea")
    try:
        # The other user already has a picture, which their cancelled job must leave in place.
        _set_number(other, "txt2img_seed", 5)
        _generate(other, steps=4, size=64)
        assert "Seed: 5" in other.input_value("#txt2img_infotext textarea")
        _set_number(other, "txt2img_seed", 6)

        _generate(page, steps=150, size=64, n_iter=LONG_RUN_BATCHES, wait_for_end=False)
        page.wait_for_function("/step \\d+\\/150/.test(document.querySelector('#txt2img_progress').textContent)")

        # The other user's job waits behind ours, and their page says where it stands in the queue.
        _generate(other, steps=4, size=64, wait_for_end=False)
        other.wait_for_function("document.querySelector('#txt2img_preview')?.textContent.includes('queue')")
        other.click("#txt2img_stop")
        steps_at_their_stop = _steps_done(page)
        page.wait_for_function(f"({STEPS_DONE_JS})() >= {steps_at_their_stop + 2}")
        assert "Stopped" not in page.inner_text("#txt2img_progress"), "their Stop must not reach our job"

        page.click("#txt2img_stop")
        _wait_until_idle(page)
        assert "Stopped" in page.inner_text("#txt2img_progress")
        # Their job was cancelled while it waited: it ends without running.
        other.wait_for_selector("#txt2img_progress .job-progress.interrupted")
        assert "Stopped before it started" in other.inner_text("#txt2img_progress")
        other.wait_for_function("!document.querySelector('#txt2img_generate').disabled")
        # Their last picture is still there, with its infotext.
        other.wait_for_selector("#txt2img_gallery img")
        assert "Seed: 5" in other.input_value("#txt2img_infotext textarea")
    finally:
        other_context.close()


def test_send_result_to_inpaint_paint_a_mask_and_inpaint(browser, page_url):
    # A page of its own, closed at the end: the image editor keeps drawing (in software, without a
    # GPU) while its page is open, which would slow every later test on this small machine.
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(page_url)
        page.wait_for_selector("#txt2img_prompt textarea")
        page.fill("#txt2img_prompt textarea", "a red door")
        _set_number(page, "txt2img_seed", 31)
        _generate(page, steps=4, size=96)

        page.click("#txt2img_send_to_inpaint")
        page.wait_for_function("document.querySelector('#inpaint_prompt textarea')?.value === 'a red door'")
        # The editor switches to its brush once the picture is in; strokes before that are lost.
        editor = page.locator("#inpaint_image")
        editor.get_by_role("button", name="Brush").and_(page.locator(".highlight")).wait_for()
        box = editor.locator("canvas").first.bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(x - 40, y - 20)
        page.mouse.down()
        page.mouse.move(x + 40, y + 20, steps=8)
        page.mouse.up()
        page.wait_for_function(
            "[...document.querySelectorAll('#inpaint_image button')].some("
            "b => b.getAttribute('aria-label') === 'Undo' && !b.disabled)"
        )  # the stroke is recorded
        _set_number(page, "inpaint_steps", 4)
        page.click("#inpaint_generate")
        page.wait_for_selector("#inpaint_progress .job-progress.done")
        infotext = page.input_value("#inpaint_infotext textarea")
        assert infotext.startswith("a red door") and "Size: 96x96" in infotext
        assert "Seed: 31" in infotext and "Denoising strength: 0.75" in infotext and "Mask blur: 4" in infotext
    finally:
        context.close()


def test_a_prompt_list_file_runs_one_job_per_line(page, tmp_path, artifacts_dir):
    listing = tmp_path / "prompts.txt"
    listing.write_text('a red lighthouse\r\n\r\n--prompt "a blue boat" --seed 9\n')
    page.click("#txt2img_prompt_list_box > button")
    page.set_input_files("#txt2img_prompt_list_file input[type=file]", str(listing))
    page.wait_for_function(
        "document.querySelector('#txt2img_prompt_list_text textarea').value === "
        "'a red lighthouse\\n\\n--prompt \"a blue boat\" --seed 9'"
    )
    assert page.is_checked("#txt2img_prompt_list_on input")  # an uploaded list is switched on
    page.fill("#txt2img_prompt textarea", "")
    try:
        _generate(page, steps=3, size=64)
        page.wait_for_function("document.querySelector('#txt2img_progress').innerText.includes('2 prompts')")
        page.get_by_role("button", name="Thumbnail 2 of 2").first.wait_for()
        page.screenshot(path=str(artifacts_dir / "page_prompt_list.png"), full_page=True)
        page.get_by_role("button", name="Thumbnail 2 of 2").first.click()
        page.wait_for_function("document.querySelector('#txt2img_infotext textarea').value.startsWith('a blue boat')")
        assert "Seed: 9," in page.input_value("#txt2img_infotext textarea")
    finally:
        page.uncheck("#txt2img_prompt_list_on input")
        page.click("#txt2img_prompt_list_box > button")


def test_generate_forever_repeats_until_stop(page):
    _set_number(page, "txt2img_seed", -1)
    page.check("#txt2img_forever input")
    try:
        _generate(page, steps=2, size=64, wait_for_end=False)
        # Three finished pictures, each with its own random seed, without another click.
        page.wait_for_function("window.__seen.filter(([kind]) => kind === 'gallery').length >= 3")
        page.click("#txt2img_stop")
        page.wait_for_function("!document.querySelector('#txt2img_forever input').checked")
        # Stop may land on a round that runs (a picture as far as it got) or one that waits (none).
        page.wait_for_selector("#txt2img_progress .job-progress.interrupted, #txt2img_progress .job-progress.done")
        page.wait_for_function("!document.querySelector('#txt2img_generate').disabled")
        page.wait_for_timeout(1500)
        shown = len(_seen(page, "gallery"))
        page.wait_for_timeout(1500)
        assert len(_seen(page, "gallery")) == shown, "Stop ends the repeats"
        assert not page.locator("#txt2img_generate").is_disabled()
    finally:
        page.uncheck("#txt2img_forever input")


def test_the_theme_flag_opens_the_page_dark_unless_its_address_names_a_theme(browser, engine, models_dir, tmp_path):
    settings = SimpleNamespace(outputs_dir=tmp_path, save_images=False, models_dir=models_dir, theme="dark")
    demo, url = serve_page(engine, settings)
    try:
        context, page = open_page(browser, url)
        page.wait_for_function("document.body.classList.contains('dark')")
        assert "__theme=dark" in page.url
        page.goto(url + "?__theme=light")  # a link that names one keeps it
        page.wait_for_selector("#txt2img_prompt textarea")
        page.wait_for_timeout(500)
        assert "__theme=light" in page.url
        assert not page.evaluate("document.body.classList.contains('dark')")
        context.close()
    finally:
        demo.close()
