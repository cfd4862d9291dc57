"""A1111's "Inpaint area: Only masked": the region around the mask inpainted at the generation size and
pasted back into the picture at its own size."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from engine import GenerationRequest, Result
from engine.infotext import parse_infotext, parse_infotext_params
from engine.inpaint import inpaint_region


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


# Masked content ------------------------------------------------------------------------------------


def test_fill_paints_the_masked_part_with_the_colours_around_it():
    from engine.inpaint import fill_masked

    picture = Image.new("RGB", (64, 64), (200, 20, 20))
    picture.paste((20, 20, 200), (32, 0, 64, 64))  # red left half, blue right half
    filled = np.asarray(fill_masked(picture, painted((64, 64), (32, 0, 64, 64))), dtype=np.int16)
    assert np.array_equal(filled[:, :32], np.asarray(picture, dtype=np.int16)[:, :32])  # kept as it was
    right = filled[:, 32:].reshape(-1, 3)
    assert (right[:, 0] > right[:, 2]).all()  # the masked blue is gone: red from the left, blurred in


def test_masked_content_changes_what_the_masked_part_starts_from(micro_engine):
    """A red circle masked and inpainted at 0.6 with "a red circle on a blue background": from the original
    it stays mostly red; filled with the blue around it first, it mostly does not (measured, seeds 3-5:
    red in 0.54-0.63 of the mask from the original, 0.17-0.23 from fill)."""
    from training.dataset import COLOURS, nearest_palette

    scene = generate(micro_engine, prompt="a red circle on a blue background", seed=3, steps=20).images[0]
    red = nearest_palette(np.asarray(scene)) == COLOURS.index("red")
    ys, xs = np.nonzero(red)
    mask = painted((64, 64), (xs.min() - 2, ys.min() - 2, xs.max() + 3, ys.max() + 3))
    inside = np.asarray(mask) > 0
    fields = {"prompt": "a red circle on a blue background", "init_images": [scene], "mask": mask, "seed": 3}
    fields.update(steps=20, denoising_strength=0.6, mask_blur=0, sampler_name="Euler")
    shares, pictures = {}, {}
    for content in range(4):
        result = generate(micro_engine, inpainting_fill=content, **fields)
        pictures[content] = result.images[0].tobytes()
        labels = nearest_palette(np.asarray(result.images[0]))
        shares[content] = float((labels[inside] == COLOURS.index("red")).mean())
        assert parse_infotext(result.infotexts[0]).inpainting_fill == content
    assert shares[1] > 0.5 and shares[0] < shares[1] - 0.3, shares
    assert len(set(pictures.values())) == 4  # latent noise and latent nothing start elsewhere again
    assert generate(micro_engine, inpainting_fill=2, **fields).images[0].tobytes() == pictures[2]
    assert "Masked content: latent nothing" in generate(micro_engine, inpainting_fill=3, **fields).infotexts[0]
