"""A1111's img2img resize modes: how an init image of another shape becomes the generation size."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from engine import GenerationRequest, InvalidRequestError, Result
from engine.images import resize_to
from training.dataset import classify


def stripes(width: int, height: int) -> Image.Image:
    """Vertical bands of colour, so that where each part of the picture went can be seen."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    for index, colour in enumerate(colours):
        draw.rectangle((index * width // 4, 0, (index + 1) * width // 4 - 1, height - 1), fill=colour)
    return image


def test_just_resize_stretches():
    image = stripes(100, 50)
    assert resize_to(image, 50, 50, 0).tobytes() == image.resize((50, 50), Image.Resampling.LANCZOS).tobytes()


def test_crop_and_resize_keeps_the_middle():
    image = stripes(100, 50)
    assert resize_to(image, 50, 50, 1).tobytes() == image.crop((25, 0, 75, 50)).tobytes()
    # Taller than wide: the middle rows.
    tall = stripes(40, 80).rotate(90, expand=True).resize((40, 80))
    assert resize_to(tall, 40, 40, 1).tobytes() == tall.crop((0, 20, 40, 60)).tobytes()


def test_resize_and_fill_fits_the_picture_and_stretches_its_edges_outwards():
    image = stripes(100, 50)
    filled = np.asarray(resize_to(image, 50, 50, 2), dtype=np.int16)
    fitted = np.asarray(image.resize((50, 25), Image.Resampling.LANCZOS), dtype=np.int16)
    top = 50 // 2 - 25 // 2  # 13 rows above, 12 below, as A1111 places it
    assert np.array_equal(filled[top : top + 25], fitted)
    # Every band row repeats the picture's edge row, and nothing is left black.
    assert np.abs(filled[:top] - fitted[0]).max() <= 2 and np.abs(filled[top + 25 :] - fitted[-1]).max() <= 2
    assert filled.sum(axis=2).min() > 0


def generate(engine, **fields) -> Image.Image:
    result = list(engine.generate(GenerationRequest(**fields)))[-1]
    assert isinstance(result, Result), result
    return result.images[0]


def test_img2img_crop_and_resize_uses_the_middle_of_a_wide_init_image(micro_engine):
    """A 128x64 init: a red circle on blue in the middle, yellow at both sides. Cropped, img2img at low
    strength keeps the scene; stretched, the yellow sides are half the picture and the model turns the
    scene orange and purple (measured: background orange)."""
    scene = generate(micro_engine, prompt="a red circle on a blue background", seed=3, steps=20)
    wide = Image.new("RGB", (128, 64), (255, 255, 0))
    wide.paste(scene, (32, 0))
    fields = {"prompt": "a red circle on a blue background", "init_images": [wide], "denoising_strength": 0.3}
    fields.update(seed=3, steps=20, width=64, height=64, sampler_name="Euler")
    cropped = generate(micro_engine, resize_mode=1, **fields)
    stretched = generate(micro_engine, resize_mode=0, **fields)
    assert (classify(cropped).background, classify(cropped).colour) == ("blue", "red")
    assert classify(stretched).background != "blue"
    # At strength 0 the resized init is the answer: half of it yellow when stretched, none when cropped.
    fields["denoising_strength"] = 0
    assert classify(generate(micro_engine, resize_mode=0, **fields)).colour_share["yellow"] > 0.4
    assert classify(generate(micro_engine, resize_mode=1, **fields)).colour_share["yellow"] == 0


def test_img2img_latent_upscale_resizes_the_encoded_picture(micro_engine):
    scene = generate(micro_engine, prompt="a green square on a white background", seed=8, steps=20)
    big = scene.resize((128, 128), Image.Resampling.NEAREST)
    fields = {"prompt": "a green square on a white background", "init_images": [big], "denoising_strength": 0.5}
    fields.update(seed=2, steps=20, width=64, height=64, sampler_name="Euler")
    latent = generate(micro_engine, resize_mode=3, **fields)
    assert latent.size == (64, 64) and classify(latent).background == "white"
    assert latent.tobytes() == generate(micro_engine, resize_mode=3, **fields).tobytes()
    assert latent.tobytes() != generate(micro_engine, resize_mode=0, **fields).tobytes()


@pytest.mark.parametrize(
    "fields, allowed",
    [
        ({"resize_mode": 4}, "0 to 3"),
        ({"resize_mode": 3, "mask": Image.new("L", (64, 64), 255)}, "0 to 2 with a mask"),
    ],
)
def test_bad_resize_modes_are_refused_by_name(engine, fields, allowed):
    with pytest.raises(InvalidRequestError) as caught:
        engine.validate(GenerationRequest(prompt="x", init_images=[Image.new("RGB", (64, 64))], **fields))
    assert caught.value.field == "resize_mode" and allowed in str(caught.value)
