"""The generate buttons hand each script panel's widgets to the handler parameters of the same meaning.

gradio passes a button's inputs to its handler by position, and gradio_client calls map keywords to those
positions too, so a panel wired in another order than the handler's parameters would go unnoticed by API tests:
the page would silently send, say, the loop count as the prompt matrix's margin.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest

from ui.page import build_page

# Handler parameter -> the widget's elem_id after "<tab>_".
SCRIPT_WIDGETS = {
    "prompt_list": "prompt_list_on",
    "iterate_seed": "prompt_list_iterate",
    "same_seed": "prompt_list_same",
    "prompt_position": "prompt_list_position",
    "prompt_list_text": "prompt_list_text",
    "matrix_on": "prompt_matrix_on",
    "matrix_at_start": "prompt_matrix_put_at_start",
    "matrix_random_seeds": "prompt_matrix_different_seeds",
    "matrix_prompt_type": "prompt_matrix_type",
    "matrix_joiner": "prompt_matrix_joiner",
    "matrix_margin": "prompt_matrix_margin",
    "loopback_on": "loopback_on",
    "loopback_loops": "loopback_loops",
    "loopback_final_denoising": "loopback_final",
    "loopback_curve": "loopback_curve",
    "sd_upscale": "sd_upscale",
    "sd_upscale_overlap": "sd_upscale_overlap",
    "sd_upscale_upscaler": "sd_upscale_upscaler",
    "sd_upscale_scale": "sd_upscale_scale",
    "outpaint_on": "outpaint_on",
    "outpaint_pixels": "outpaint_pixels",
    "outpaint_mask_blur": "outpaint_mask_blur",
    "outpaint_masked_content": "outpaint_fill",
    "outpaint_directions": "outpaint_direction",
    "outpaint_mk2_on": "outpaint_mk2_on",
    "outpaint_mk2_pixels": "outpaint_mk2_pixels",
    "outpaint_mk2_mask_blur": "outpaint_mk2_mask_blur",
    "outpaint_mk2_directions": "outpaint_mk2_direction",
    "outpaint_mk2_noise_q": "outpaint_mk2_noise_q",
    "outpaint_mk2_color_variation": "outpaint_mk2_color_variation",
    "refiner_checkpoint": "refiner_checkpoint",
    "refiner_switch_at": "refiner_switch_at",
    "sketch": "sketch",
    "inpaint_sketch": "sketch",
    "mask_transparency": "mask_transparency",
    "batch_input_dir": "batch_input_dir",
    "batch_mask_dir": "batch_mask_dir",
    "batch_output_dir": "batch_output_dir",
    "batch_skip_done": "batch_skip_done",
    "batch_png_info": "batch_png_info",
    "batch_png_info_dir": "batch_png_info_dir",
}
FOLDERS = {"batch_input_dir", "batch_output_dir", "batch_skip_done", "batch_png_info", "batch_png_info_dir"}
# The panels each tab has, as A1111 shows its scripts (SD upscale and outpainting: img2img only).
PANELS = {
    "txt2img": {"prompt_list", "matrix_on"},
    "img2img": {
        "prompt_list",
        "matrix_on",
        "loopback_on",
        "sd_upscale",
        "outpaint_on",
        "outpaint_mk2_on",
        "sketch",
        *FOLDERS,
    },
    "inpaint": {
        "prompt_list",
        "matrix_on",
        "loopback_on",
        "inpaint_sketch",
        "mask_transparency",
        *FOLDERS,
        "batch_mask_dir",
    },
}


@pytest.fixture(scope="module")
def handlers(engine):
    # With Batch from folders allowed, so that its fields are on the page too.
    settings = SimpleNamespace(outputs_dir=None, save_images=False, models_dir=None, server_folders=True)
    demo = build_page(engine, settings)
    return {fn.api_name: fn for fn in demo.fns.values() if fn.api_name in PANELS}


@pytest.mark.parametrize("tab", sorted(PANELS))
def test_each_script_widget_reaches_its_own_parameter(handlers, tab):
    handler = handlers[tab]
    parameters = list(inspect.signature(handler.fn).parameters)
    assert len(parameters) == len(handler.inputs)
    wired = {
        name: getattr(component, "elem_id", None)
        for name, component in zip(parameters, handler.inputs, strict=True)
        if name in SCRIPT_WIDGETS
    }
    assert wired == {name: f"{tab}_{SCRIPT_WIDGETS[name]}" for name in wired}
    img2img_only = {"loopback_on", "sd_upscale", "outpaint_on", "outpaint_mk2_on"}
    assert PANELS[tab] <= set(wired) and not (img2img_only - PANELS[tab]) & set(wired)


def test_every_range_on_the_page_names_itself_when_a_value_is_out_of_it(engine):
    import gradio as gr

    from ui.fields import FieldNumber, FieldSlider

    demo = build_page(engine)
    ranged = [block for block in demo.blocks.values() if isinstance(block, (gr.Slider, gr.Number))]
    assert len(ranged) > 30
    # gradio checks these ranges before any handler runs; these subclasses name the field in what it answers.
    assert all(isinstance(block, (FieldSlider, FieldNumber)) for block in ranged), [
        block.label for block in ranged if not isinstance(block, (FieldSlider, FieldNumber))
    ]
    # ... and the page draws them as gradio's own.
    assert {block.get_block_name() for block in ranged} == {"slider", "number"}
    steps = next(block for block in ranged if block.elem_id == "txt2img_steps")
    with pytest.raises(gr.Error, match="Sampling steps: got 500; allowed: a number from 1 to 150"):
        steps.preprocess(500)
    seed = next(block for block in ranged if block.elem_id == "txt2img_seed")
    assert seed.preprocess(-1) == -1


def test_every_choice_on_the_page_names_itself_when_a_value_is_not_one_of_them(engine):
    import gradio as gr

    from ui.fields import FieldCheckboxGroup, FieldDropdown, FieldRadio

    demo = build_page(engine, SimpleNamespace(outputs_dir=None, save_images=False, server_folders=True))
    kinds = (gr.Radio, gr.Dropdown, gr.CheckboxGroup)
    chosen = [block for block in demo.blocks.values() if isinstance(block, kinds)]
    assert len(chosen) > 30
    fields = (FieldRadio, FieldDropdown, FieldCheckboxGroup)
    assert all(isinstance(block, fields) for block in chosen), [
        block.label for block in chosen if not isinstance(block, fields)
    ]
    assert {block.get_block_name() for block in chosen} == {"radio", "dropdown", "checkboxgroup"}
    directions = next(block for block in chosen if block.elem_id == "img2img_outpaint_direction")
    with pytest.raises(gr.Error, match="Outpainting direction: got \\['sideways'\\]; allowed: any of left, right"):
        directions.preprocess(["sideways"])
    variant = next(block for block in chosen if block.elem_id == "setting_unipc_variant")
    with pytest.raises(gr.Error, match="UniPC variant: got 'bh3'; allowed: one of bh1, bh2"):
        variant.preprocess("bh3")
    assert variant.preprocess("bh2") == "bh2"
    sampler = next(block for block in chosen if block.elem_id == "txt2img_sampler")
    with pytest.raises(gr.Error, match="Sampling method: got 'Euler b'; allowed: one of DPM\\+\\+ 2M, "):
        sampler.preprocess("Euler b")


def test_read_parameters_in_img2img_fills_the_settings_and_keeps_the_picture(engine):
    import gradio as gr

    from ui.page import _paste_parameters, _send_png_info

    text = "a cat\nNegative prompt: dog\nSteps: 9, Sampler: DDIM, CFG scale: 5.5, Seed: 777, Denoising strength: 0.4"
    filled = _paste_parameters(text, "", target_mode="img2img", engine=engine)
    assert isinstance(filled[0], type(gr.skip()))  # the init picture stays as it is
    assert list(filled[1:10]) == ["a cat", "dog", "DDIM", "Automatic", 9, 5.5, 777, gr.skip(), gr.skip()]
    assert filled[10] == 0.4

    # The same values PNG Info's Send gives, and from the last generation when the prompt is empty.
    def plain(values) -> list:  # components and updates by kind: their ids differ between calls
        return [value if isinstance(value, (str, int, float, bool, type(None))) else type(value) for value in values]

    sent = plain(_send_png_info(None, text, target_mode="img2img", engine=engine))
    assert plain(filled) == sent
    assert plain(_paste_parameters("  ", text, target_mode="img2img", engine=engine)) == sent
    with pytest.raises(gr.Error, match="Nothing to read: paste generation parameters"):
        _paste_parameters("", "", target_mode="img2img", engine=engine)
    with pytest.raises(gr.Error, match="prompt: holds no generation parameters"):
        _paste_parameters("a cat, dog", "", target_mode="img2img", engine=engine)
