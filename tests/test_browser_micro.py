"""The page on the micro model, in a real browser, where pictures mean something: LoRAs (the picker
adds the tag, the prompt panel reads it, the picture is made with it; the shipped micro-purple LoRA),
hires fix, prompt styles, Extras with the shipped micro-shapes-2x upscaler, and sketching (img2img's Sketch,
Inpaint sketch)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from engine import Engine
from engine.presets import DEFAULT_MODELS_DIR, SHIPPED_MICRO_LORA, SHIPPED_MICRO_MODEL
from tests.test_browser import _set_number, browser, open_page, serve_page  # noqa: F401 - fixture


@pytest.fixture(scope="module")
def micro_url(models_dir, tmp_path_factory):
    styles_file = tmp_path_factory.mktemp("webui") / "styles.csv"
    styles_file.write_text('name,prompt,negative_prompt\n"On green","{prompt} on a green background",\n')
    engine = Engine(
        model=str(SHIPPED_MICRO_MODEL),
        models_dir=models_dir,
        lora_dir=SHIPPED_MICRO_LORA.parent,
        esrgan_dir=DEFAULT_MODELS_DIR / "ESRGAN",
        styles_file=styles_file,
    )
    settings = SimpleNamespace(outputs_dir=tmp_path_factory.mktemp("lora-outputs"), save_images=False)
    demo, url = serve_page(engine, settings)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def page(browser, micro_url):  # noqa: F811 - the fixture imported above
    context, page = open_page(browser, micro_url)
    yield page
    context.close()


def shown_size(page, selector: str) -> list[int]:
    """The natural size of the picture an <img> shows, once it has loaded."""
    page.wait_for_function(
        f"() => {{ const img = document.querySelector({selector!r}); return img && img.naturalWidth > 0; }}"
    )
    return page.evaluate(
        f"() => {{ const img = document.querySelector({selector!r}); return [img.naturalWidth, img.naturalHeight]; }}"
    )


def test_the_lora_picker_adds_the_tag_and_the_picture_is_made_with_it(page, artifacts_dir):
    page.fill("#txt2img_prompt textarea", "a red circle on a white background")
    page.click("#txt2img_add_lora input")
    page.locator("ul[role='listbox'] li", has_text="micro-purple").first.click()
    page.wait_for_function(
        "document.querySelector('#txt2img_prompt textarea').value"
        " === 'a red circle on a white background <lora:micro-purple:1>'"
    )
    page.click("#txt2img_prompt_reading_box button")
    reading = page.locator("#txt2img_prompt_reading")
    reading.locator(".prompt-reading-label", has_text="LoRAs").wait_for()
    assert "micro-purple: text encoder 1, UNet 1" in reading.inner_text()

    page.click("#txt2img_generate")
    page.wait_for_function("document.querySelector('#txt2img_infotext textarea').value.includes('Lora hashes')")
    assert 'Lora hashes: "micro-purple: ' in page.input_value("#txt2img_infotext textarea")
    page.screenshot(path=str(artifacts_dir / "page_lora.png"))
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(artifacts_dir / "page_lora_top.png"))

    # A LoRA that is not in the folder: the panel says so while typing.
    page.fill("#txt2img_prompt textarea", "a circle <lora:purple:1>")
    page.wait_for_function(
        "text => document.querySelector('#txt2img_prompt_reading').innerText.includes(text)",
        arg="got '<lora:purple:1>'",
    )
    assert "micro-purple" in page.inner_text("#txt2img_prompt_reading")


def test_hires_fix_makes_the_bigger_picture(page, artifacts_dir):
    page.fill("#txt2img_prompt textarea", "a blue square on a yellow background")
    page.click("#txt2img_hires_box button")
    page.check("#txt2img_enable_hr input")
    # Hires steps left at 0 (as many as Sampling steps): with fewer the micro model loses the scene.
    page.click("#txt2img_generate")
    page.wait_for_function("document.querySelector('#txt2img_infotext textarea').value.includes('Hires upscale')")
    infotext = page.input_value("#txt2img_infotext textarea")
    assert "Size: 64x64" in infotext and "Hires upscale: 2, Hires upscaler: Latent" in infotext
    assert "Denoising strength: 0.7" in infotext
    # The result is the hires pass's picture: twice the first pass's size.
    assert shown_size(page, "#txt2img_gallery img") == [128, 128]
    page.screenshot(path=str(artifacts_dir / "page_hires.png"), full_page=True)
    page.uncheck("#txt2img_enable_hr input")


def test_extras_upscales_a_picture_with_the_shipped_upscaler(page, tmp_path, artifacts_dir):
    from training.dataset import ShapeScene, draw_scene

    source = tmp_path / "scene.png"
    draw_scene(ShapeScene("triangle", "red", "blue", "large", (14, 12, 50, 48))).save(source)
    page.get_by_role("tab", name="Extras").click()
    page.set_input_files("#extras_image input[type=file]", str(source))
    # One mode's settings at a time: Scale to shows the size, Scale by the factor.
    page.click("#extras_resize_mode label:has-text('Scale to')")
    page.locator("#extras_w").wait_for(state="visible")
    assert not page.locator("#extras_upscaling_resize").is_visible()
    page.click("#extras_resize_mode label:has-text('Scale by')")
    page.locator("#extras_upscaling_resize").wait_for(state="visible")
    assert not page.locator("#extras_w").is_visible()
    page.click("#extras_upscaler_1 input")
    page.locator("ul[role='listbox'] li", has_text="micro-shapes-2x").first.click()
    page.click("#extras_generate")
    page.wait_for_function("document.querySelector('#extras_info textarea').value.includes('micro-shapes-2x')")
    assert page.input_value("#extras_info textarea") == (
        "Postprocess upscale by: 2, Postprocess upscaler: micro-shapes-2x (128x128)"
    )
    assert shown_size(page, "#extras_result img") == [128, 128]
    page.screenshot(path=str(artifacts_dir / "page_extras.png"), full_page=True)
    page.get_by_role("tab", name="txt2img").click()


def test_a_chosen_style_is_merged_into_the_prompt_of_the_job(page):
    page.fill("#txt2img_prompt textarea", "a white circle")
    page.click("#txt2img_styles input")
    page.locator("ul[role='listbox'] li", has_text="On green").first.click()
    page.keyboard.press("Escape")
    page.click("#txt2img_generate")
    page.wait_for_function(
        "document.querySelector('#txt2img_infotext textarea').value.startsWith('a white circle on a green background')"
    )
    # The style stays chosen until removed: take it off, so the next test's jobs are not merged with it.
    page.locator("#txt2img_styles .token-remove").first.click()
    page.wait_for_function("document.querySelectorAll('#txt2img_styles .token').length === 0")


def test_variation_seed_from_the_extra_row_and_back_through_png_info(page, tmp_path, artifacts_dir):
    page.fill("#txt2img_prompt textarea", "a green triangle on a black background")
    assert not page.is_visible("#txt2img_subseed")
    page.check("#txt2img_subseed_show input")
    page.wait_for_selector("#txt2img_subseed", state="visible")
    for elem_id, value in (("txt2img_seed", 31), ("txt2img_subseed", 9), ("txt2img_subseed_strength", 0.3)):
        box = page.locator(f"#{elem_id} input[type=number]").first
        box.fill(str(value))
        box.press("Enter")
    page.click("#txt2img_generate")
    page.wait_for_function("document.querySelector('#txt2img_infotext textarea').value.includes('Variation seed: 9')")
    assert "Seed: 31," in page.input_value("#txt2img_infotext textarea")
    assert "Variation seed strength: 0.3" in page.input_value("#txt2img_infotext textarea")
    page.screenshot(path=str(artifacts_dir / "page_variation.png"), full_page=True)

    # Untick Extra and clear the values; PNG Info's Send ticks it again with the picture's variation seed.
    src = page.get_attribute("#txt2img_gallery img", "src")
    png_path = tmp_path / "varied.png"
    png_path.write_bytes(page.request.get(src).body())
    page.locator("#txt2img_subseed input[type=number]").first.fill("-1")
    page.click("#txt2img_reuse_subseed")
    page.wait_for_function("document.querySelector('#txt2img_subseed input').value === '9'")
    page.locator("#txt2img_subseed input[type=number]").first.fill("-1")
    page.uncheck("#txt2img_subseed_show input")
    page.wait_for_selector("#txt2img_subseed", state="hidden")
    page.get_by_role("tab", name="PNG Info").click()
    page.set_input_files("#pnginfo_image input[type=file]", str(png_path))
    page.wait_for_function("document.querySelector('#pnginfo_text textarea').value.includes('Variation seed: 9')")
    page.click("#pnginfo_send_to_txt2img")
    page.wait_for_selector("#txt2img_subseed", state="visible")
    assert page.is_checked("#txt2img_subseed_show input")
    assert page.input_value("#txt2img_subseed input") == "9"
    assert page.input_value("#txt2img_subseed_strength input[type=number]") == "0.3"
    page.uncheck("#txt2img_subseed_show input")


def result_picture(page, mode: str) -> Image.Image:
    src = page.get_attribute(f"#{mode}_gallery img", "src")
    return Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")


def mean_colour(picture: Image.Image, box) -> np.ndarray:
    return np.asarray(picture.crop(box), dtype=float).reshape(-1, 3).mean(0)


def paint(page, editor_id: str, box: tuple[float, float, float, float]) -> None:
    """Brush strokes filling `box` (fractions of the editor's canvas: left, top, right, bottom), once the editor
    has its brush (strokes before that are lost); waits until they are recorded."""
    editor = page.locator(f"#{editor_id}")
    editor.get_by_role("button", name="Brush").and_(page.locator(".highlight")).wait_for()
    # Mouse events land only inside the window: the whole canvas must be in view, wherever the page's layout puts it.
    editor.locator("canvas").first.scroll_into_view_if_needed()
    canvas = editor.locator("canvas").first.bounding_box()
    left, top, right, bottom = (
        canvas["x"] + box[0] * canvas["width"],
        canvas["y"] + box[1] * canvas["height"],
        canvas["x"] + box[2] * canvas["width"],
        canvas["y"] + box[3] * canvas["height"],
    )
    # One straight stroke a row, rows a brush width apart less some overlap: each mouse event costs the editor a
    # redraw (about 0.15 s in software rendering), so strokes of many small moves made these tests slow.
    y = top
    while y <= bottom:
        page.mouse.move(left, y)
        page.mouse.down()
        page.mouse.move(right, y)
        page.mouse.up()
        y += 8
    page.wait_for_function(
        f"[...document.querySelectorAll('#{editor_id} button')].some("
        "b => b.getAttribute('aria-label') === 'Undo' && !b.disabled)"
    )


def test_img2img_draws_from_the_sketch_tab_and_from_the_image_tab_when_that_is_shown(
    browser,  # noqa: F811 - the fixture imported above
    micro_url,
    tmp_path,
    artifacts_dir,
):
    # A page of its own: an image editor with a picture keeps drawing (in software) while its page is open.
    context, page = open_page(browser, micro_url)
    try:
        page.get_by_role("tab", name="img2img").click()
        page.locator("#img2img_init_tabs").get_by_role("tab", name="Sketch").click()
        # The blank canvas takes strokes at once, in the first colour (black) of the brush.
        paint(page, "img2img_sketch", (0.38, 0.38, 0.62, 0.62))
        page.fill("#img2img_prompt textarea", "a square on a white background")
        _set_number(page, "img2img_seed", 1)
        _set_number(page, "img2img_steps", 12)
        _set_number(page, "img2img_denoising_strength", 0.5)
        page.click("#img2img_generate")
        page.wait_for_function(
            "document.querySelector('#img2img_infotext textarea').value.includes('Denoising strength: 0.5')"
        )
        picture = result_picture(page, "img2img")
        page.screenshot(path=str(artifacts_dir / "page_sketch.png"), full_page=True)
        # A shape where the strokes are, on the canvas's white.
        assert (255 - mean_colour(picture, (28, 28, 36, 36))).sum() > 250
        assert mean_colour(picture, (0, 0, 8, 8)).min() > 200

        # With the Image tab shown, the job takes its picture, not the sketch: from a white picture, at
        # denoising 0.5 (seed 3), the centre stays white.
        init_tabs = page.locator("#img2img_init_tabs")
        # Send to img2img shows the Image tab, where the picture sent goes.
        page.click("#img2img_send_to_img2img")
        init_tabs.get_by_role("tab", name="Image", selected=True).wait_for()
        white = tmp_path / "white.png"
        Image.new("RGB", (64, 64), "white").save(white)
        page.set_input_files("#img2img_image input[type=file]", str(white))
        page.wait_for_selector("#img2img_image img")
        _set_number(page, "img2img_seed", 3)
        page.click("#img2img_generate")
        page.wait_for_function("document.querySelector('#img2img_infotext textarea').value.includes('Seed: 3,')")
        assert (255 - mean_colour(result_picture(page, "img2img"), (28, 28, 36, 36))).sum() < 30

        # "Sketch on this picture" copies it to the canvas and shows the Sketch tab.
        page.click("#img2img_copy_to_sketch")
        init_tabs.get_by_role("tab", name="Sketch", selected=True).wait_for()
    finally:
        context.close()


def test_inpaint_sketch_paints_its_colour_into_the_picture(browser, micro_url, artifacts_dir):  # noqa: F811
    context, page = open_page(browser, micro_url)
    try:
        # Inpaint sketch on first: the editor takes its new brush while it is empty (strokes made while it
        # changes brushes are lost).
        page.get_by_role("tab", name="inpaint").click()
        assert not page.is_visible("#inpaint_mask_transparency")
        page.check("#inpaint_sketch input")
        page.wait_for_selector("#inpaint_mask_transparency", state="visible")
        page.get_by_role("tab", name="txt2img").click()
        page.fill("#txt2img_prompt textarea", "a large red circle on a white background")
        _set_number(page, "txt2img_seed", 3)
        _set_number(page, "txt2img_steps", 12)
        page.click("#txt2img_generate")
        page.wait_for_function("document.querySelector('#txt2img_infotext textarea').value.includes('Seed: 3,')")
        assert mean_colour(result_picture(page, "txt2img"), (20, 20, 30, 30))[0] > 200  # red
        page.click("#txt2img_send_to_inpaint")
        page.wait_for_function("document.querySelector('#inpaint_prompt textarea')?.value.includes('red circle')")
        paint(page, "inpaint_image", (0.3, 0.1, 0.6, 0.6))  # over the circle (upper left)
        page.fill("#inpaint_prompt textarea", "a circle on a white background")
        _set_number(page, "inpaint_seed", 1)
        _set_number(page, "inpaint_denoising_strength", 0.5)
        page.click("#inpaint_generate")
        page.wait_for_function(
            "document.querySelector('#inpaint_infotext textarea').value.includes('Denoising strength: 0.5')"
        )
        page.screenshot(path=str(artifacts_dir / "page_inpaint_sketch.png"), full_page=True)
        # The circle starts from the strokes' black, not from its red: at 0.5 it is no longer red.
        assert mean_colour(result_picture(page, "inpaint"), (20, 20, 30, 30))[0] < 100
    finally:
        context.close()
