"""Every bad field gets one error type naming the field, the value and what is allowed."""

from __future__ import annotations

import base64

import pytest
from PIL import Image

from engine import Engine, GenerationRequest, InvalidRequestError, Limits, Result

GOOD = {"prompt": "a cat", "steps": 2, "seed": 1, "width": 64, "height": 64}
INIT = Image.new("RGB", (64, 64), (10, 20, 30))


@pytest.mark.parametrize(
    ("fields", "field", "shown"),
    [
        ({"width": 100}, "width", "100"),
        ({"height": 0}, "height", "0"),
        ({"width": 5000}, "width", "5000"),
        ({"width": 2048, "height": 4096}, "width x height", "2048x4096"),
        ({"steps": 0}, "steps", "0"),
        ({"steps": 151}, "steps", "151"),
        ({"steps": 2.5}, "steps", "2.5"),
        ({"steps": "many"}, "steps", "many"),
        ({"cfg_scale": "abc"}, "cfg_scale", "abc"),
        ({"cfg_scale": float("nan")}, "cfg_scale", "nan"),
        ({"sampler_name": "Euler z"}, "sampler_name", "Euler z"),
        ({"scheduler": "Sideways"}, "scheduler", "Sideways"),
        ({"seed": -5}, "seed", "-5"),
        ({"batch_size": -1}, "batch_size", "-1"),
        ({"batch_size": 0}, "batch_size", "0"),
        ({"n_iter": 0}, "n_iter", "0"),
        ({"denoising_strength": 1.5, "init_images": [INIT]}, "denoising_strength", "1.5"),
        ({"denoising_strength": -0.1}, "denoising_strength", "-0.1"),
        ({"init_images": [b"definitely not a picture"]}, "init_images[0]", "24 bytes"),
        ({"init_images": ["!!not base64!!"]}, "init_images[0]", "not base64"),
        ({"init_images": [base64.b64encode(b"GIF89a-broken").decode()]}, "init_images[0]", "bytes"),
        ({"init_images": [INIT], "mask": Image.new("L", (32, 32))}, "mask", "32x32"),
        ({"mask": Image.new("L", (64, 64))}, "mask", "image"),
        ({"init_images": "just text"}, "init_images", "just text"),
        ({"prompt": 12}, "prompt", "12"),
        ({"mask_blur": -1}, "mask_blur", "-1"),
        ({"inpainting_mask_invert": 2}, "inpainting_mask_invert", "2"),
        ({"extra_params": {"Clip skip": "two"}}, "Clip skip", "two"),
        ({"extra_params": {"Clip skip": "0"}}, "Clip skip", "0"),
    ],
)
def test_bad_field_is_named_with_its_value_and_what_is_allowed(engine, fields, field, shown):
    with pytest.raises(InvalidRequestError) as caught:
        list(engine.generate(GenerationRequest(**{**GOOD, **fields})))
    error = caught.value
    assert error.field == field
    message = str(error)
    assert message.startswith(f"{field}: got ") and shown in message and "allowed: " in message
    assert error.allowed  # says what would have been accepted
    # Nothing is left broken: the next good request works.
    assert isinstance(list(engine.generate(GenerationRequest(**GOOD)))[-1], Result)


def test_limits_are_configurable(models_dir):
    strict = Engine(models_dir=models_dir, limits=Limits(max_pixels=64 * 64, max_steps=10, max_batch_size=2))
    for fields, field in [
        ({"width": 128}, "width x height"),
        ({"steps": 11}, "steps"),
        ({"batch_size": 3}, "batch_size"),
    ]:
        with pytest.raises(InvalidRequestError) as caught:
            strict.validate(GenerationRequest(**{**GOOD, **fields}))
        assert caught.value.field == field
    assert strict.validate(GenerationRequest(**{**GOOD, "steps": 10, "batch_size": 2})).steps == 10


def test_base64_and_data_url_images_are_accepted(engine):
    import io

    buffer = io.BytesIO()
    INIT.save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    for value in (encoded, "data:image/png;base64," + encoded, buffer.getvalue()):
        checked = engine.validate(GenerationRequest(**{**GOOD, "init_images": [value]}))
        assert checked.init_images[0].size == (64, 64) and checked.mode == "img2img"


def test_painted_rgba_layer_is_used_as_the_mask(engine):
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (0, 0, 32, 64))
    checked = engine.validate(GenerationRequest(**{**GOOD, "init_images": [INIT], "mask": layer}))
    assert checked.mode == "inpaint"
    assert checked.mask.getpixel((5, 5)) == 255 and checked.mask.getpixel((50, 5)) == 0


def test_failed_job_leaves_the_engine_ready(engine, monkeypatch):
    from engine import EngineError, generate

    def explode(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(generate, "build_scheduler", explode)
    with pytest.raises(EngineError, match="device lost"):
        list(engine.generate(GenerationRequest(**GOOD)))
    monkeypatch.undo()
    assert not engine.progress().running
    assert isinstance(list(engine.generate(GenerationRequest(**GOOD)))[-1], Result)
