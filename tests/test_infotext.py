"""A1111 infotext: writing, parsing, and reading it from image files. Pure tests: no model is loaded."""

from __future__ import annotations

import io
import re

import pytest
from PIL import Image

from engine.errors import InvalidRequestError
from engine.images import encode_png
from engine.infotext import format_infotext, parse_infotext, parse_infotext_params, read_infotext
from engine.request import GenerationRequest, Limits, validate_request
from engine.samplers import resolve

# Infotexts as A1111 writes them (hand-written after real ones from several versions).
A1111_HIRES_LORA = (
    "masterpiece, best quality, 1girl, solo, looking at viewer, <lora:add_detail:0.6>\n"
    "Negative prompt: (worst quality, low quality:1.4), easynegative\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3297430216, Size: 512x768, "
    "Model hash: 7f96a1a9ca, Model: anything-v5, Denoising strength: 0.45, Clip skip: 2, "
    'Hires prompt: "extra detail, sharp focus", Hires upscale: 2, Hires steps: 14, '
    "Hires upscaler: R-ESRGAN 4x+ Anime6B, "
    'Lora hashes: "add_detail: 7c6bad76eb54", TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1'
)
A1111_OLD_COMBINED_SAMPLER = (
    "a photograph of an astronaut riding a horse, highly detailed, 8k\n"
    "Negative prompt: lowres, bad anatomy, blurry\n"
    "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1234567890, Size: 768x512, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.5.1"
)
A1111_INPAINT = (
    "a red brick wall\n"
    "Negative prompt: text, watermark\n"
    "Steps: 25, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 42, Size: 512x512, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.6, Mask blur: 8, "
    "Mask mode: Inpaint not masked, Masked content: original, Inpaint area: Only masked, "
    "Masked area padding: 32, Version: v1.9.4"
)
A1111_SDXL_NO_NEGATIVE = (
    "cinematic photo of a lighthouse at dusk,\n"
    "dramatic sky, 35mm\n"
    "Steps: 40, Sampler: DPM++ 2M SDE, Schedule type: Exponential, CFG scale: 5, Seed: 987654321, "
    "Size: 1024x1024, Model hash: 31e35c80fc, Model: sd_xl_base_1.0, ADetailer model: face_yolov8n.pt, "
    'ADetailer prompt: "detailed face, sharp eyes", ADetailer version: 24.5.1, Version: v1.10.1'
)


def _request(**fields) -> GenerationRequest:
    base = dict(
        prompt="a lighthouse at dusk",
        negative_prompt="blurry",
        sampler_name="Euler a",
        scheduler="Automatic",
        steps=20,
        cfg_scale=7.0,
        width=512,
        height=512,
    )
    base.update(fields)
    return GenerationRequest(**base)


def _image_bytes(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def _a1111_exif(text: str) -> Image.Exif:
    """EXIF as A1111 writes it into JPEG/WebP: UserComment = b"UNICODE\\0" + UTF-16 big-endian."""
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + text.encode("utf-16-be")
    return exif


# --- writing ------------------------------------------------------------------------------------


def test_format_writes_a1111_layout_for_txt2img():
    req = _request(
        prompt="a lighthouse at dusk",
        negative_prompt="blurry, lowres",
        sampler_name="DPM++ 2M",
        scheduler="Karras",
        steps=20,
        cfg_scale=7.0,
        width=512,
        height=768,
        extra_params={"Clip skip": "2", "Version": "v1.10.1"},
    )
    text = format_infotext(req, 1234, model_name="tiny-sd", model_hash="abcdef0123")
    assert text == (
        "a lighthouse at dusk\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
        "Model hash: abcdef0123, Model: tiny-sd, Clip skip: 2, RNG: CPU, Version: v1.10.1"
    )


def test_format_writes_fractional_cfg_and_img2img_fields():
    init = Image.new("RGB", (64, 64))
    img2img = _request(cfg_scale=7.5, init_images=[init], denoising_strength=0.6)
    assert format_infotext(img2img, 7).splitlines()[-1] == (
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.5, Seed: 7, Size: 512x512, "
        "Denoising strength: 0.6, RNG: CPU"
    )

    mask = Image.new("L", (64, 64), 255)
    inpaint = _request(init_images=[init], mask=mask, denoising_strength=1.0, mask_blur=8, inpainting_mask_invert=1)
    assert format_infotext(inpaint, 7, model_name="m", model_hash="0123456789").splitlines()[-1] == (
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 7, Size: 512x512, "
        "Model hash: 0123456789, Model: m, Denoising strength: 1, Mask blur: 8, Mask mode: Inpaint not masked, "
        "Masked content: original, RNG: CPU"
    )

    txt2img = format_infotext(_request(denoising_strength=0.3, mask_blur=9), 7)
    assert "Denoising strength" not in txt2img
    assert "Mask blur" not in txt2img
    assert "Model" not in txt2img


def test_no_negative_line_when_negative_is_empty():
    text = format_infotext(_request(negative_prompt=""), 1)
    assert "Negative prompt" not in text
    assert text.splitlines()[0] == "a lighthouse at dusk"
    assert len(text.splitlines()) == 2
    assert parse_infotext(text).negative_prompt == ""


def test_extra_params_never_repeat_keys_already_written():
    req = _request(extra_params={"Model": "old-model", "Model hash": "1111111111", "Steps": "99", "Clip skip": "2"})
    text = format_infotext(req, 5, model_name="new-model", model_hash="2222222222")
    last_line = text.splitlines()[-1]
    assert last_line.count("Model:") == 1 and "Model: new-model" in last_line
    assert last_line.count("Model hash:") == 1 and "Model hash: 2222222222" in last_line
    assert "Steps: 20" in last_line and "99" not in last_line
    assert last_line.endswith("Clip skip: 2, RNG: CPU")
    # Nor does a stale copy of a job setting the request does not use (Euler's Uniform takes no rho).
    stale = {"Schedule rho": "3", "Noise multiplier": "0.5", "Beta schedule alpha": "0.2"}
    assert not set(stale) & set(parse_infotext_params(format_infotext(_request(extra_params=stale), 5)))


def test_multiline_prompt_and_negative_survive_round_trip():
    req = _request(prompt="first line\nsecond line\n\nfourth line", negative_prompt="bad hands\nextra fingers, text")
    text = format_infotext(req, 99)
    assert text.splitlines()[:6] == [
        "first line",
        "second line",
        "",
        "fourth line",
        "Negative prompt: bad hands",
        "extra fingers, text",
    ]
    parsed = parse_infotext(text)
    assert parsed.prompt == req.prompt
    assert parsed.negative_prompt == req.negative_prompt


@pytest.mark.parametrize(
    "value",
    [
        "add_detail: 7c6bad76eb54, epi_noiseoffset2: d1131f7207d6",
        'say "hi", then go',
        '"quoted"',
        "line one\nline two",
        " padded ",
        "",
        "ünïcödé, 日本語",
    ],
)
def test_values_with_commas_colons_quotes_survive_round_trip(value):
    req = _request(extra_params={"Lora hashes": value, "Version": "v1.10.1"})
    text = format_infotext(req, 3, model_name="m", model_hash="0123456789")
    assert len(text.split("\n")) == 3, "a value must never break the parameter line apart"
    parsed = parse_infotext(text)
    assert parsed.extra_params == {"Model hash": "0123456789", "Model": "m", "Lora hashes": value, "Version": "v1.10.1"}


def test_values_are_json_quoted_like_a1111():
    text = format_infotext(_request(extra_params={"Lora hashes": "a: 1, b: 2", "Version": "v1.10.1"}), 1)
    assert text.endswith('Lora hashes: "a: 1, b: 2", RNG: CPU, Version: v1.10.1')


@pytest.mark.parametrize(
    ("sampler", "schedule", "cfg", "steps", "seed", "size"),
    [
        ("Euler a", "Automatic", 7.0, 20, 1234, (512, 512)),
        ("DPM++ 2M", "Karras", 7.5, 30, 0, (768, 512)),
        ("DPM++ 2M SDE", "Exponential", 4.25, 8, 2**32 - 1, (1024, 1024)),
        ("DDIM", "Uniform", 1.0, 50, 42, (64, 128)),
    ],
)
def test_round_trip_keeps_what_the_product_relies_on(sampler, schedule, cfg, steps, seed, size):
    req = _request(
        prompt="a cat, (sitting:1.2) on a mat",
        negative_prompt="dog: no",
        sampler_name=sampler,
        scheduler=schedule,
        cfg_scale=cfg,
        steps=steps,
        width=size[0],
        height=size[1],
        extra_params={"Clip skip": "2"},
    )
    parsed = parse_infotext(format_infotext(req, seed, model_name="tiny-sd", model_hash="abcdef0123"))
    assert (parsed.prompt, parsed.negative_prompt) == (req.prompt, req.negative_prompt)
    assert (parsed.sampler_name, parsed.scheduler) == (sampler, schedule)
    assert (parsed.steps, parsed.cfg_scale, parsed.seed) == (steps, cfg, seed)
    assert (parsed.width, parsed.height) == size
    assert parsed.extra_params == {"Model hash": "abcdef0123", "Model": "tiny-sd", "Clip skip": "2"}


def test_round_trip_keeps_img2img_and_inpaint_settings():
    init = Image.new("RGB", (64, 64))
    mask = Image.new("L", (64, 64), 255)
    req = _request(init_images=[init], mask=mask, denoising_strength=0.35, mask_blur=12, inpainting_mask_invert=1)
    parsed = parse_infotext(format_infotext(req, 11))
    assert parsed.denoising_strength == 0.35
    assert parsed.mask_blur == 12
    assert parsed.inpainting_mask_invert == 1
    assert parsed.extra_params == {}


# --- parsing A1111 texts ------------------------------------------------------------------------


def test_parse_modern_a1111_infotext_with_hires_and_lora_hashes():
    params = parse_infotext_params(A1111_HIRES_LORA)
    assert params["Prompt"] == "masterpiece, best quality, 1girl, solo, looking at viewer, <lora:add_detail:0.6>"
    assert params["Negative prompt"] == "(worst quality, low quality:1.4), easynegative"
    assert params["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert params["TI hashes"] == "easynegative: c74b4e810b03"
    assert params["Hires prompt"] == "extra detail, sharp focus"
    assert params["Hires upscaler"] == "R-ESRGAN 4x+ Anime6B"
    assert params["Size"] == "512x768"

    req = parse_infotext(A1111_HIRES_LORA)
    assert (req.sampler_name, req.scheduler) == ("DPM++ 2M", "Karras")
    assert (req.steps, req.cfg_scale, req.seed) == (28, 6.5, 3297430216)
    assert (req.width, req.height) == (512, 768)
    assert req.denoising_strength == 0.45
    # Hires fix is read into the request; an upscaler model's name is kept as written (the engine looks it up in
    # its upscaler folders when the request is checked).
    assert (req.enable_hr, req.hr_scale, req.hr_second_pass_steps) == (True, 2.0, 14)
    assert req.hr_upscaler == "R-ESRGAN 4x+ Anime6B"
    assert req.hr_prompt == "extra detail, sharp focus"
    assert req.extra_params == {
        "Model hash": "7f96a1a9ca",
        "Model": "anything-v5",
        "Clip skip": "2",
        "Lora hashes": "add_detail: 7c6bad76eb54",
        "TI hashes": "easynegative: c74b4e810b03",
        "Version": "v1.10.1",
    }


def test_parse_old_infotext_with_combined_sampler_name():
    req = parse_infotext(A1111_OLD_COMBINED_SAMPLER)
    assert (req.sampler_name, req.scheduler) == ("DPM++ 2M", "Karras")
    assert req.prompt == "a photograph of an astronaut riding a horse, highly detailed, 8k"
    assert req.negative_prompt == "lowres, bad anatomy, blurry"
    assert (req.steps, req.cfg_scale, req.seed, req.width, req.height) == (30, 7.5, 1234567890, 768, 512)
    assert req.extra_params == {"Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly", "Version": "v1.5.1"}


def test_parse_inpaint_infotext():
    req = parse_infotext(A1111_INPAINT)
    assert (req.sampler_name, req.scheduler) == ("Euler a", "Automatic")
    assert (req.cfg_scale, req.denoising_strength, req.mask_blur, req.inpainting_mask_invert) == (7.0, 0.6, 8, 1)
    assert req.inpainting_fill == 1 and "Masked content" not in req.extra_params
    assert req.inpaint_full_res and "Inpaint area" not in req.extra_params
    assert "Mask mode" not in req.extra_params


def test_parse_multiline_prompt_without_negative():
    req = parse_infotext(A1111_SDXL_NO_NEGATIVE)
    assert req.prompt == "cinematic photo of a lighthouse at dusk,\ndramatic sky, 35mm"
    assert req.negative_prompt == ""
    assert (req.sampler_name, req.scheduler, req.width, req.height) == ("DPM++ 2M SDE", "Exponential", 1024, 1024)
    assert req.extra_params["ADetailer prompt"] == "detailed face, sharp eyes"
    # No Denoising strength in the text: the request keeps its default.
    assert req.denoising_strength == GenerationRequest().denoising_strength


def test_parsed_a1111_requests_pass_validation():
    # Where the upscaler model a hires infotext names is there (without it, hr_upscaler is refused by name).
    upscalers = ("R-ESRGAN 4x+ Anime6B",)
    for text in (A1111_HIRES_LORA, A1111_OLD_COMBINED_SAMPLER, A1111_INPAINT, A1111_SDXL_NO_NEGATIVE):
        request = parse_infotext(text)
        req = validate_request(
            request, limits=Limits(), native_size=(512, 512), resolve_sampler=resolve, upscalers=upscalers
        )
        assert req.prompt
        assert req.hr_upscaler == request.hr_upscaler


def test_parse_windows_line_endings():
    params = parse_infotext_params(A1111_OLD_COMBINED_SAMPLER.replace("\n", "\r\n"))
    assert params["Prompt"] == "a photograph of an astronaut riding a horse, highly detailed, 8k"
    assert params["Negative prompt"] == "lowres, bad anatomy, blurry"
    assert params["Steps"] == "30"


def test_text_without_parameter_line_is_all_prompt():
    assert parse_infotext_params("just a prompt, with commas") == {
        "Prompt": "just a prompt, with commas",
        "Negative prompt": "",
    }
    # Fewer than three `Key: value` items on the last line: still prompt (A1111's rule).
    params = parse_infotext_params(
        "portrait\nstyle: oil, mood: calm\nNegative prompt: ugly\nlighting: soft, era: 1920s"
    )
    assert params == {
        "Prompt": "portrait\nstyle: oil, mood: calm",
        "Negative prompt": "ugly\nlighting: soft, era: 1920s",
    }

    req = parse_infotext("a lone tree on a hill")
    assert req.prompt == "a lone tree on a hill"
    assert (req.steps, req.sampler_name, req.width) == (20, "Euler a", None)
    assert req.extra_params == {}


def test_parameter_line_only():
    req = parse_infotext("Steps: 12, Sampler: Euler, CFG scale: 3, Seed: 5")
    assert (req.prompt, req.negative_prompt) == ("", "")
    assert (req.steps, req.sampler_name, req.cfg_scale, req.seed) == (12, "Euler", 3.0, 5)


@pytest.mark.parametrize(
    ("item", "key"),
    [
        ("Steps: twenty", "Steps"),
        ("Steps: 20.5", "Steps"),
        ("CFG scale: high", "CFG scale"),
        ("CFG scale: nan", "CFG scale"),
        ("Seed: 12ab", "Seed"),
        ("Size: 512", "Size"),
        ("Size: 512x", "Size"),
        ("Denoising strength: strong", "Denoising strength"),
        ("Mask blur: 4px", "Mask blur"),
        ("Mask mode: Inpaint everything", "Mask mode"),
    ],
)
def test_malformed_values_name_the_infotext_key(item, key):
    text = f"a cat\nSampler: Euler a, Model: m, Version: v1, {item}"
    with pytest.raises(InvalidRequestError) as caught:
        parse_infotext(text)
    error = caught.value
    assert error.field == key
    assert error.value == item.split(": ", 1)[1]
    assert error.allowed
    assert str(error).startswith(f"{key}: got ")


def test_unknown_sampler_names_the_sampler_key():
    with pytest.raises(InvalidRequestError) as caught:
        parse_infotext("a cat\nSteps: 20, Sampler: Euler SMEA Dy, CFG scale: 7, Seed: 1")  # an extension's
    assert caught.value.field == "Sampler"
    assert caught.value.value == "Euler SMEA Dy"
    assert "DPM++ 2M" in caught.value.allowed


def test_unsupported_schedule_type_names_the_schedule_key():
    with pytest.raises(InvalidRequestError) as caught:
        parse_infotext("a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: DDIM, CFG scale: 7")
    assert caught.value.field == "Schedule type"
    assert caught.value.value == "DDIM"


def test_parse_rejects_non_text():
    with pytest.raises(InvalidRequestError):
        parse_infotext_params(None)


# --- reading image files -----------------------------------------------------------------------


def test_png_round_trip_through_encode_png():
    req = _request(prompt="a cat\non a mat", extra_params={"Lora hashes": "x: 1, y: 2"})
    text = format_infotext(req, 77, model_name="tiny-sd", model_hash="abcdef0123")
    png = encode_png(Image.new("RGB", (32, 32), "red"), text)

    assert read_infotext(png) == text
    assert read_infotext(Image.open(io.BytesIO(png))) == text
    parsed = parse_infotext(read_infotext(png))
    assert (parsed.prompt, parsed.seed, parsed.extra_params["Lora hashes"]) == ("a cat\non a mat", 77, "x: 1, y: 2")


def test_image_without_infotext_gives_none():
    image = Image.new("RGB", (16, 16))
    assert read_infotext(image) is None
    assert read_infotext(encode_png(image)) is None
    assert read_infotext(_image_bytes(image, "JPEG")) is None


def test_jpeg_with_a1111_exif_user_comment():
    jpeg = _image_bytes(Image.new("RGB", (32, 32), "blue"), "JPEG", exif=_a1111_exif(A1111_HIRES_LORA))
    text = read_infotext(jpeg)
    assert text == A1111_HIRES_LORA
    assert parse_infotext(text).extra_params["Lora hashes"] == "add_detail: 7c6bad76eb54"


def test_webp_with_a1111_exif_user_comment_and_non_latin_prompt():
    text = "富士山, 夕焼け\nNegative prompt: ぼやけ\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64"
    webp = _image_bytes(Image.new("RGB", (32, 32)), "WEBP", exif=_a1111_exif(text))
    assert read_infotext(webp) == text
    assert parse_infotext(read_infotext(webp)).negative_prompt == "ぼやけ"


def test_user_comment_in_ascii_and_little_endian_unicode():
    ascii_exif = Image.Exif()
    ascii_exif.get_ifd(0x8769)[0x9286] = b"ASCII\0\0\0" + b"a cat\nSteps: 5, Sampler: Euler, Seed: 3"
    assert read_infotext(_image_bytes(Image.new("RGB", (8, 8)), "JPEG", exif=ascii_exif)).startswith("a cat\n")

    le_exif = Image.Exif()
    le_exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + "a dog, Steps: 5".encode("utf-16-le")
    assert read_infotext(_image_bytes(Image.new("RGB", (8, 8)), "JPEG", exif=le_exif)) == "a dog, Steps: 5"


def test_non_image_bytes_raise_naming_image():
    with pytest.raises(InvalidRequestError) as caught:
        read_infotext(b"this is not an image")
    assert caught.value.field == "image"


def test_unsupported_schedule_can_fall_back_to_automatic():
    text = "a cat\nSteps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512"
    with pytest.raises(InvalidRequestError) as caught:
        parse_infotext(text)
    assert caught.value.field == "Schedule type"
    request = parse_infotext(text, unsupported_schedule="automatic")
    assert (request.sampler_name, request.scheduler, request.seed) == ("Euler a", "Automatic", 1)


@pytest.mark.parametrize(
    ("fields", "written"),
    [
        (
            {"hr_scale": 1.5, "hr_second_pass_steps": 12, "hr_upscaler": "Latent (nearest)"},
            "Denoising strength: 0.6, Hires upscale: 1.5, Hires steps: 12, Hires upscaler: Latent (nearest)",
        ),
        (
            {"hr_resize_x": 1024, "hr_upscaler": "Lanczos"},
            "Denoising strength: 0.6, Hires resize: 1024x0, Hires upscaler: Lanczos",
        ),
    ],
)
def test_hires_fix_round_trips_as_a1111_writes_it(fields, written):
    req = _request(enable_hr=True, denoising_strength=0.6, **fields)
    text = format_infotext(req, 5)
    assert written in text and "Size: 512x512" in text
    back = parse_infotext(text)
    for name in ("enable_hr", "hr_scale", "hr_second_pass_steps", "hr_upscaler", "hr_resize_x", "hr_resize_y"):
        assert getattr(back, name) == getattr(req, name), name
    assert back.denoising_strength == 0.6 and not back.extra_params
    assert "Hires" not in format_infotext(_request(denoising_strength=0.6), 5)  # txt2img without it: no keys


def test_every_job_setting_has_its_request_default_reads_back_from_its_key_and_is_checked():
    import dataclasses

    from engine.request import JOB_SETTINGS

    request_defaults = {field.name: field.default for field in dataclasses.fields(GenerationRequest)}

    def checked_request(**fields) -> GenerationRequest:
        request = GenerationRequest(prompt="x", **fields)
        return validate_request(request, limits=Limits(), native_size=(64, 64), resolve_sampler=resolve)

    base = "a cat\nSteps: 20, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 64x64, Denoising strength: 0.5"
    for setting in JOB_SETTINGS:
        default = request_defaults[setting.field]
        assert default == setting.default and type(default) is type(setting.default), setting.field
        # Not the default, so reading it back is seen: the other side of a switch, the last choice, or the highest
        # value (0 where that is the default).
        if setting.is_switch or setting.is_choice:
            value = (not setting.default) if setting.is_switch else setting.choices[-1]
        else:
            value = 0 if setting.highest == setting.default else setting.highest
        assert value != setting.default
        assert getattr(parse_infotext(f"{base}, {setting.infotext_key}: {value}"), setting.field) == value
        checked = checked_request(**{setting.field: value})
        assert getattr(checked, setting.field) == value
        if setting.is_choice:  # any case, as A1111's radio names it
            assert getattr(checked_request(**{setting.field: value.upper()}), setting.field) == value
        too_much = "often" if setting.is_switch or setting.is_choice else setting.highest * 2
        with pytest.raises(
            InvalidRequestError, match=f"^{setting.field}: got .*; allowed: {re.escape(setting.allowed())}"
        ):
            checked_request(**{setting.field: too_much})


def test_settings_an_infotext_names_and_the_request_does_not_carry_are_listed():
    from engine.infotext import unread_settings

    text = (
        A1111_HIRES_LORA.replace(", Version: v1.10.1", "")
        + ", Face restoration: CodeFormer, Token merging ratio: 0.3, ADetailer model: face_yolov8n.pt"
        + ", Version: v1.10.1"
    )
    assert unread_settings(parse_infotext(text)) == {
        "Face restoration": "CodeFormer",
        "Token merging ratio": "0.3",
        "ADetailer model": "face_yolov8n.pt",
    }
    # A1111's records (model, hashes, version) and its CPU RNG, which this engine's noise is, are not settings missed.
    assert unread_settings(parse_infotext(A1111_HIRES_LORA + ", RNG: CPU")) == {}


def test_every_key_this_engine_writes_is_read_back():
    from engine.infotext import unread_settings

    requests = [
        GenerationRequest(
            prompt="a cat",
            negative_prompt="blurry",
            sampler_name="DPM++ 2M",
            scheduler="Beta",
            steps=9,
            seed=5,
            subseed=6,
            subseed_strength=0.3,
            seed_resize_from_w=32,
            seed_resize_from_h=32,
            tiling=True,
            enable_hr=True,
            hr_scale=1.5,
            hr_sampler_name="Euler",
            hr_scheduler="Karras",
            hr_prompt="a cat, detailed",
            denoising_strength=0.4,
            sigma_max=9,
            rho=3,
            s_min_uncond=1.5,
            s_min_uncond_all=True,
            skip_early_cond=0.1,
            eta_noise_seed_delta=31337,
            emphasis="No norm",
            refiner_checkpoint="other",
            refiner_switch_at=0.6,
            extra_params={"Clip skip": "2"},
        ),
        GenerationRequest(
            prompt="a dog",
            sampler_name="DPM++ SDE",
            s_noise=0.8,
            init_images=[Image.new("RGB", (64, 64))],
            mask=Image.new("L", (64, 64), 255),
            inpaint_full_res=True,
            inpaint_full_res_padding=8,
            initial_noise_multiplier=0.9,
            img2img_extra_noise=0.2,
            color_correction=True,
            prompt_syntax="compel",
        ),
    ]
    for request in requests:
        checked = validate_request(request, limits=Limits(), native_size=(64, 64), resolve_sampler=resolve)
        text = format_infotext(checked, checked.seed, model_name="micro", model_hash="abc", lora_hashes={"x": "1"})
        assert unread_settings(parse_infotext(text)) == {}, text


def test_the_noise_source_is_written_as_a1111_writes_it_and_read_back():
    from engine.infotext import unread_settings

    # A1111 writes its random source before the version and pastes it back as its randn_source setting. What a pasted
    # text's extra parameters say is not what a picture made here used: the request's source is.
    text = format_infotext(_request(extra_params={"RNG": "CPU", "Version": "v1.10.1"}, randn_source="NV"), 3)
    assert text.endswith("RNG: NV, Version: v1.10.1") and text.count("RNG") == 1
    assert parse_infotext(text).randn_source == "NV" and "RNG" not in parse_infotext(text).extra_params
    assert format_infotext(_request(), 3).endswith("RNG: CPU")
    pasted = parse_infotext(A1111_HIRES_LORA.replace(", Version", ", RNG: CPU, Version"))
    assert pasted.randn_source == "CPU" and unread_settings(pasted) == {}
