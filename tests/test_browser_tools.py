"""The Compare tab and the prompt reading view in a real browser (Debian's Chromium via Playwright)."""

from __future__ import annotations

import pytest

from tests.test_browser import _set_number, browser, open_page, page_url  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def page(browser, page_url):  # noqa: F811 - the fixtures imported above
    context, page = open_page(browser, page_url, height=1400)
    yield page
    context.close()


def _choose(page, elem_id: str, option: str) -> None:
    page.click(f"#{elem_id} input")
    page.locator("ul[role='listbox'] li", has_text=option).first.click()


def test_prompt_reading_shows_fragments_weights_and_schedule(page):
    _set_number(page, "txt2img_steps", 10)
    page.fill("#txt2img_prompt textarea", "a (red:1.3) [cat:dog:0.5]")
    page.click("#txt2img_prompt_reading_box button")
    reading = page.locator("#txt2img_prompt_reading")
    reading.locator(".prompt-reading-steps").first.wait_for()
    text = reading.inner_text()
    assert "steps 1-6" in text and "steps 7-10" in text
    assert reading.locator(".prompt-fragment.up", has_text="red").count() == 2
    assert "1.3" in text and "dog" in text


def test_compare_runs_a_2x2_grid_and_sends_a_cell_to_txt2img(page, artifacts_dir):
    page.fill("#txt2img_prompt textarea", "a lighthouse")
    _set_number(page, "txt2img_steps", 3)
    _set_number(page, "txt2img_width", 64)
    _set_number(page, "txt2img_height", 64)
    _set_number(page, "txt2img_seed", 77)
    page.get_by_role("tab", name="Compare").click()
    page.fill("#compare_X_values textarea", "Euler, DDIM")
    page.fill("#compare_Y_values textarea", "2, 3")
    page.click("#compare_run")
    page.wait_for_selector("#compare_progress .job-progress.done")
    assert "4 cells" in page.inner_text("#compare_progress")
    page.locator("#compare_grid img").wait_for()
    assert page.locator("#compare_cells img").count() >= 4
    page.screenshot(path=str(artifacts_dir / "page_compare.png"), full_page=True)

    # Timeline: two cells side by side at the chosen step.
    page.locator("#compare_timeline img").first.wait_for()
    assert page.locator("#compare_timeline img").count() == 2

    # Clicking the DDIM, 3-step cell fills txt2img with its settings.
    page.locator("#compare_cells button img").nth(3).click()
    page.wait_for_function("document.querySelector('#txt2img_steps input[type=number]').value === '3'")
    page.wait_for_function(
        "document.querySelector('#txt2img_sampler input') && "
        "document.querySelector('#txt2img_sampler input').value === 'DDIM'"
    )


def test_the_style_editor_saves_a_style_that_styles_then_offers_and_applies(page):
    page.fill("#txt2img_prompt textarea", "a lighthouse")
    page.fill("#txt2img_neg_prompt textarea", "fog")
    page.click("#txt2img_style_editor button")
    page.fill("#txt2img_style_name input", "Harbour")
    page.click("#txt2img_style_from_prompts")
    page.wait_for_function("document.querySelector('#txt2img_style_prompt textarea').value === 'a lighthouse'")
    page.fill("#txt2img_style_prompt textarea", "{prompt} in a harbour")
    page.click("#txt2img_style_save")
    try:
        _choose(page, "txt2img_styles", "Harbour")
        page.click("#txt2img_style_apply")
        page.wait_for_function(
            "document.querySelector('#txt2img_prompt textarea').value === 'a lighthouse in a harbour'"
        )
        assert page.input_value("#txt2img_neg_prompt textarea") == "fog, fog"
    finally:
        page.click("#txt2img_style_delete")
        page.wait_for_function("document.querySelector('#txt2img_style_name input').value === ''")


def _stored_after(page, change) -> None:
    """Make a change and wait until the browser has stored the remembered settings again (a round trip
    to the server, which can take a while on a busy machine)."""
    read = "localStorage.getItem('lantern-settings')"
    before = page.evaluate(read)
    change()
    page.wait_for_function(f"before => {read} !== before", arg=before)


def test_each_browser_remembers_its_own_settings_across_a_reload(browser, page_url):  # noqa: F811
    context, page = open_page(browser, page_url)
    try:
        page.get_by_role("tab", name="Settings").click()
        _stored_after(page, lambda: page.locator("#setting_preview_mode label", has_text="none").click())
        _stored_after(page, lambda: _set_number(page, "clip_skip", 2))
        _stored_after(page, lambda: page.locator("#setting_ensd input").fill("31337"))
        page.reload()
        page.wait_for_selector("#txt2img_prompt textarea")
        page.wait_for_function("document.querySelector('#clip_skip input[type=number]').value === '2'")
        page.get_by_role("tab", name="Settings").click()
        page.wait_for_function("document.querySelector('#setting_ensd input')?.value === '31337'")
        assert page.locator("#setting_preview_mode input[value=none]").is_checked()
        # The session has them too, not only the widgets: the next job's infotext says so.
        page.get_by_role("tab", name="txt2img").click()
        _set_number(page, "txt2img_steps", 3)
        page.click("#txt2img_generate")
        page.wait_for_function("document.querySelector('#txt2img_infotext textarea').value.includes('Clip skip: 2')")
    finally:
        context.close()
    # Another browser has its own (none remembered: the defaults).
    other_context, other = open_page(browser, page_url)
    try:
        other.wait_for_timeout(500)
        assert other.input_value("#clip_skip input[type=number]") == "1"
    finally:
        other_context.close()
