"""A1111's "Inpaint area: Only masked": the region around the mask inpainted at the generation size and
pasted back into the picture at its own size."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from engine import GenerationRequest, Result
from engine.generate import inpaint_region
from engine.infotext import parse_infotext, parse_infotext_params


def painted(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=255)
    return mask


@pytest.mark.parametrize(
    "box, padding, size, region",
    [
        # 64x32 painted, 512x512 generation: the region grows to 64 tall, half above and half below.
        ((100, 100, 164, 132), 0, (512, 512), (100, 84, 164, 148)),
        ((100, 100, 164, 132), 32, (512, 512), (68, 52, 196, 180)),
        # Against the left edge: grown to 40 wide, pushed back inside the picture.
        ((0, 0, 10, 40), 0, (512, 512), (0, 0, 40, 40)),
        # A wide generation size: the region takes its aspect ratio.
        ((200, 200, 232, 232), 0, (768, 384), (184, 200, 248, 232)),
    ],
)
def test_the_region_is_a1111s(box, padding, size, region):
    assert inpaint_region(painted((512, 512), box), padding, *size) == region


def test_a_blank_mask_has_no_region():
    assert inpaint_region(Image.new("L", (64, 64), 0), 32, 64, 64) is None


def generate(engine, **fields) -> Result:
    result = list(engine.generate(GenerationRequest(**fields)))[-1]
    assert isinstance(result, Result), result
    return result


def test_only_masked_repaints_the_region_at_full_size_and_keeps_the_rest(micro_engine):
    scene = generate(micro_engine, prompt="a red circle on a blue background", seed=3, steps=20).images[0]
    picture = scene.resize((128, 128), Image.Resampling.NEAREST)
    mask = painted((128, 128), (80, 16, 112, 48))
    fields = {"prompt": "a yellow square on a white background", "init_images": [picture], "mask": mask}
    fields.update(steps=20, seed=5, width=64, height=64, denoising_strength=1.0, mask_blur=0)
    result = generate(micro_engine, inpaint_full_res=True, inpaint_full_res_padding=16, **fields)
    out = result.images[0]
    assert out.size == (128, 128)  # the picture's own size, not the generation size
    before, after = np.asarray(picture, dtype=np.int16), np.asarray(out, dtype=np.int16)
    inside = np.asarray(mask) > 0
    assert np.array_equal(before[~inside], after[~inside])  # every pixel outside the mask is the original's
    assert np.abs(before[inside] - after[inside]).mean() > 20  # the masked square was repainted
    params = parse_infotext_params(result.infotexts[0])
    assert (params["Inpaint area"], params["Masked area padding"]) == ("Only masked", "16")
    again = parse_infotext(result.infotexts[0])
    assert again.inpaint_full_res and again.inpaint_full_res_padding == 16
    # Whole picture, for comparison: made at 64x64.
    assert generate(micro_engine, **fields).images[0].size == (64, 64)


def test_only_masked_with_nothing_painted_leaves_the_picture_as_it_was(engine):
    picture = Image.new("RGB", (64, 64), (10, 200, 30))
    fields = {"prompt": "x", "init_images": [picture], "mask": Image.new("L", (64, 64), 0), "steps": 3}
    out = generate(engine, inpaint_full_res=True, width=64, height=64, **fields).images[0]
    assert out.tobytes() == picture.tobytes()
