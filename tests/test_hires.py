"""Hires fix (A1111's txt2img option) on the micro model: a first pass at the asked size, upscaled in
latent space or as a picture, then img2img over it at the hires size."""

from __future__ import annotations

import pytest
from PIL import Image

from engine import GenerationRequest, InvalidRequestError, JobControl, Progress, Result
from tests.test_pad_conds import unet_calls
from training import dataset

PROMPT = "a yellow square on a purple background"


def events_of(engine, control: JobControl | None = None, stop_at: int | None = None, **fields):
    request = GenerationRequest(prompt=PROMPT, seed=11, steps=10, enable_hr=True, **fields)
    control = control or JobControl()
    events = []
    for event in engine.generate(request, control=control):
        events.append(event)
        if stop_at is not None and isinstance(event, Progress) and event.step == stop_at:
            control.interrupt()
    return [e for e in events if isinstance(e, Progress)], events[-1]


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (nearest-exact)", "Lanczos", "Nearest"])
def test_hires_fix_draws_the_same_scene_bigger_with_one_progress_over_both_passes(micro_engine, upscaler):
    progress, result = events_of(micro_engine, hr_upscaler=upscaler, denoising_strength=0.5)
    assert isinstance(result, Result) and result.images[0].size == (128, 128)
    reading = dataset.classify(result.images[0])
    assert (reading.colour, reading.background) == ("yellow", "purple")
    # Euler a: 10 first-pass steps, then A1111's hires pass: its 10 steps (the last of a schedule of 10 / 0.5).
    assert [event.step for event in progress] == list(range(1, 21))
    assert {event.total for event in progress} == {20}
    assert "Size: 64x64" in result.infotexts[0] and f"Hires upscaler: {upscaler}," in result.infotexts[0] + ","


def test_hires_size_steps_and_a_zero_strength(micro_engine):
    progress, result = events_of(micro_engine, hr_resize_x=96, hr_second_pass_steps=4, denoising_strength=0.75)
    assert result.images[0].size == (96, 96)  # one side given: the other keeps the aspect ratio
    assert progress[-1].step == progress[-1].total == 10 + 4  # the hires steps, of a schedule of int(4 / 0.75)
    assert "Hires resize: 96x0, Hires steps: 4" in result.infotexts[0]
    # Strength 0: the upscaled first pass is the picture, with no second pass.
    progress, result = events_of(micro_engine, hr_upscaler="Nearest", denoising_strength=0)
    first = events_of(micro_engine, hr_scale=1, denoising_strength=0)[1].images[0]
    assert progress[-1].total == 10 and result.images[0].size == (128, 128)
    assert result.images[0].tobytes() == first.resize((128, 128), Image.Resampling.NEAREST).tobytes()


def test_stop_in_either_pass_keeps_the_picture_as_far_as_it_got(micro_engine):
    _, result = events_of(micro_engine, stop_at=4, denoising_strength=0.5)
    assert result.interrupted and result.images[0].size == (64, 64)  # in the first pass: its picture
    _, result = events_of(micro_engine, stop_at=15, denoising_strength=0.5)
    assert result.interrupted and result.images[0].size == (128, 128)  # in the hires pass: the big one


def test_hires_fields_are_checked_by_name(micro_engine):
    for fields, message in (
        ({"hr_scale": 5}, "hr_scale: got 5.0; allowed: 1.0 to 4.0"),
        (
            {"hr_upscaler": "4x-UltraSharp"},
            "hr_upscaler: got '4x-UltraSharp'; allowed: one of Latent, .*upscaler models are read from .*ESRGAN",
        ),
        ({"hr_scale": 4, "width": 2048, "height": 2048}, "hires size: got '8192x8192'"),
        ({"init_images": [Image.new("RGB", (64, 64))]}, "enable_hr: got True; allowed: false with init_images"),
    ):
        with pytest.raises(InvalidRequestError, match=message):
            micro_engine.validate(GenerationRequest(prompt="x", enable_hr=True, **fields))


def test_png_info_send_says_which_settings_of_the_text_it_does_not_set(engine):
    from ui.page import _send_png_info

    text = "a cat\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Token merging ratio: 0.5, Version: v1"
    with pytest.warns(UserWarning, match=r"Not set from the text .* picture may differ: Token merging ratio: 0\.5$"):
        _send_png_info(None, text, target_mode="txt2img", engine=engine)


def test_png_info_sends_hires_settings_to_txt2img():
    import gradio as gr

    from ui.page import ReadInfotext, _hires_settings_from_infotext

    base = "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512"
    hires = base + ", Denoising strength: 0.45, Hires upscale: 1.5, Hires steps: 14, Hires upscaler: R-ESRGAN 4x+"
    # Outside a page event gradio's warning is a Python one; on the page it is a toast.
    with pytest.warns(UserWarning, match=r"Hires upscaler R-ESRGAN 4x\+ is not available here.*using Lanczos"):
        assert _hires_settings_from_infotext(ReadInfotext.of(hires)) == [
            True,
            "Lanczos",
            14,
            0.45,
            1.5,
            0,
            0,
            "Use same sampler",
            "Use same scheduler",
            "",
            "",
            "Use same checkpoint",
        ]
    own = (
        hires.replace("R-ESRGAN 4x+", "Latent")
        + ', Hires sampler: DPM++ 2M, Hires schedule type: Karras, Hires prompt: "a dog, big"'
    )
    assert _hires_settings_from_infotext(ReadInfotext.of(own))[7:] == [
        "DPM++ 2M",
        "Karras",
        "a dog, big",
        "",
        "Use same checkpoint",
    ]
    off = _hires_settings_from_infotext(ReadInfotext.of(base))
    assert off[0] is False and all(isinstance(value, type(gr.skip())) for value in off[1:])


def test_the_hires_pass_has_its_own_sampler_schedule_and_prompts(micro_engine):
    """The hires prompt draws the second pass: "a blue ..." over a first pass of "a yellow ..." turns the
    square blue. A hires sampler of its own samples the second pass only, and counts its own steps."""
    _, plain = events_of(micro_engine, hr_scale=1.5, denoising_strength=0.7)
    _, reprompted = events_of(
        micro_engine, hr_scale=1.5, denoising_strength=0.7, hr_prompt="a blue square on a purple background"
    )
    assert dataset.classify(plain.images[0]).colour == "yellow"
    assert dataset.classify(reprompted.images[0]).colour == "blue"
    text = reprompted.infotexts[0]
    assert "Hires prompt: a blue square on a purple background" in text and "Hires negative prompt" not in text

    progress, resampled = events_of(micro_engine, hr_scale=1.5, denoising_strength=0.5, hr_sampler_name="DDIM")
    assert "Hires sampler: DDIM" in resampled.infotexts[0] and "Hires schedule type" not in resampled.infotexts[0]
    # Euler a's first pass runs 10 steps; A1111's DDIM hires pass at 0.5 of 10 runs t_enc - 1 = 10 - 1 - 1 = 8.
    assert progress[-1].step == progress[-1].total == 18
    plain_hires = events_of(micro_engine, hr_scale=1.5, denoising_strength=0.5)[1]
    assert resampled.images[0].tobytes() != plain_hires.images[0].tobytes()
    _, karras = events_of(
        micro_engine, hr_scale=1.5, denoising_strength=0.5, hr_sampler_name="DPM++ 2M", hr_scheduler="karras"
    )
    assert "Hires sampler: DPM++ 2M, Hires schedule type: Karras" in karras.infotexts[0]
    # "Use same ..." is the first pass's, and writes nothing.
    _, same = events_of(micro_engine, hr_scale=1.5, denoising_strength=0.5, hr_sampler_name="Use same sampler")
    assert "Hires sampler" not in same.infotexts[0]


def test_hires_sampler_and_prompt_read_back_from_the_infotext(micro_engine):
    from engine.infotext import parse_infotext

    fields = {"hr_scale": 1.25, "denoising_strength": 0.6, "hr_sampler_name": "Euler", "hr_negative_prompt": "blue"}
    _, first = events_of(micro_engine, **fields)
    again = list(micro_engine.generate(parse_infotext(first.infotexts[0])))[-1]
    assert again.images[0].tobytes() == first.images[0].tobytes()
    with pytest.raises(InvalidRequestError, match="hr_sampler_name: got 'Euler b'"):
        micro_engine.validate(GenerationRequest(prompt="x", enable_hr=True, hr_sampler_name="Euler b"))


def test_the_hires_pass_runs_its_steps_at_a1111s_noise_levels(micro_engine):
    # A1111 hands its hires pass the Hires steps (here Sampling steps, 10), which makes the schedule 10 / 0.5 = 20
    # steps long and runs the last of it: Euler the last 10 of linspace(999, 0, 20); DDIM, on A1111's timesteps 1,
    # 51, ... 951, the 8 below t_enc = 9 (401 down to 51).
    for hires_sampler, expected in (
        ("Euler", pytest.approx([999 * k / 19 for k in range(9, -1, -1)], abs=0.01)),
        ("DDIM", list(range(401, 50, -50))),
    ):
        request = GenerationRequest(
            prompt=PROMPT,
            seed=11,
            steps=10,
            sampler_name="Euler",
            enable_hr=True,
            hr_scale=1.25,
            denoising_strength=0.5,
            hr_sampler_name=hires_sampler,
        )
        _, timesteps = unet_calls(
            micro_engine, request, lambda args, kwargs: float(kwargs.get("timestep", args[1] if len(args) > 1 else 0))
        )
        assert timesteps[10:] == expected
