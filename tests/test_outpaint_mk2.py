"""A1111's "Outpainting mk2" img2img script: its matched noise, its passes' geometry, and whole jobs on the micro
model, through the engine and the API."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from engine import GenerationRequest, InvalidRequestError
from engine.events import Progress
from engine.outpaint_mk2 import (
    fields_from_script_args,
    grown_size,
    matched_histograms,
    matched_noise,
    side_pass,
    side_pixels,
)


@pytest.mark.parametrize(
    ("size", "pixels", "directions", "expected"),
    [
        # Both sides of an axis share its rounding up to a multiple of 64, the first side its share, the second the rest.
        ((100, 64), 128, ("left", "right", "up", "down"), {"left": 142, "right": 142, "up": 128, "down": 128}),
        ((64, 64), 32, ("right",), {"right": 64}),
        ((520, 512), 128, ("left", "right"), {"left": 156, "right": 156}),
        ((512, 512), 64, ("up",), {"up": 64}),
    ],
)
def test_each_side_grows_by_its_share_of_a1111s_rounding(size, pixels, directions, expected):
    assert side_pixels(size, pixels, directions) == expected
    grown = grown_size(size, pixels, directions)
    assert all(side % 64 == 0 for side, axis in zip(grown, ("x", "y"), strict=True) if axis in _axes(directions))


def _axes(directions) -> set[str]:
    return {"x" if side in ("left", "right") else "y" for side in directions}


def test_matched_histograms_gives_each_value_the_references_value_at_its_quantile():
    rng = np.random.default_rng(1)
    source = rng.permutation(np.linspace(0, 1, 50))[:, None].repeat(3, axis=1)
    reference = rng.random((50, 3)) * 0.2 + 0.7
    matched = matched_histograms(source, reference)
    for channel in range(3):
        ranks = np.argsort(np.argsort(source[:, channel]))
        assert np.array_equal(matched[:, channel], np.sort(reference[:, channel])[ranks])


def picture_with_new_border():
    """A 64x64 picture, red on its left half and white on its right, whose rightmost 16 columns are new (masked)."""
    picture = np.ones((64, 64, 3))
    picture[:, :24] = (1.0, 0.0, 0.0)
    mask = np.zeros((64, 64, 3))
    mask[:, 48:] = 1.0
    return picture, mask


def test_matched_noise_keeps_the_picture_and_fills_the_new_part_with_its_colours():
    picture, mask = picture_with_new_border()
    noised = matched_noise(picture, mask)
    assert np.array_equal(noised[:, :48], picture[:, :48])
    new = noised[:, 48:].reshape(-1, 3)
    # The kept part is half red and half white: each channel of the new part takes the kept part's values at the same
    # quantiles (red all 1; green and blue 0 in the lower half, and between 0 and 1 above it).
    assert (new[:, 0] == 1.0).all()
    assert (new[:, 1] == 0.0).mean() == 0.5 and (new[:, 2] == 0.0).mean() == 0.5
    assert np.array_equal(noised, matched_noise(picture, mask))  # its own generator, seeded 0
    assert not np.array_equal(noised, matched_noise(picture, mask, noise_q=3.0))


def test_a_side_pass_paints_the_new_part_in_a_window_at_the_growing_side():
    picture = Image.new("RGB", (64, 64), (255, 0, 0))
    grown = side_pass([picture], "right", 64, 4, (96, 64))
    assert grown.box == (32, 0, 128, 64) and grown.grown == (128, 64)
    assert grown.crops[0].size == grown.mask.size == grown.latent_mask.size == (96, 64)
    mask, latent = np.asarray(grown.mask), np.asarray(grown.latent_mask)
    # The mask covers the new part and mask blur into the picture (from 61, after A1111's rectangle to 60 inclusive);
    # the latents are held up to 2 x mask blur into it (from 57); the window starts at 32.
    assert (mask[:, : 61 - 32] == 0).all() and (mask[:, 61 - 32 :] == 255).all()
    assert (latent[:, : 57 - 32] == 0).all() and (latent[:, 57 - 32 :] == 255).all()
    canvas = np.asarray(grown.canvases[0])
    assert (canvas[:, :64] == (255, 0, 0)).all()  # the picture, and matched noise after it
    painted = [Image.new("RGB", (96, 64), (0, 0, 255))]
    finished = np.asarray(grown.finished(painted)[0])
    assert finished.shape == (64, 128, 3)
    assert (finished[:, :32] == (255, 0, 0)).all() and (finished[:, 32:] == (0, 0, 255)).all()


def test_a_window_that_is_not_a_multiple_of_8_is_made_smaller():
    picture = Image.new("RGB", (520, 64), (0, 128, 0))
    first = side_pass([picture], "left", 156, 8, (1024, 64))
    assert first.grown == (676, 64) and first.box == (0, 0, 672, 64)


def test_script_args_fill_in_a1111s_defaults():
    assert fields_from_script_args([None, 64]) == {
        "outpaint_mk2": True,
        "outpaint_mk2_pixels": 64,
        "outpaint_mk2_mask_blur": 8,
        "outpaint_mk2_directions": ["left", "right", "up", "down"],
        "outpaint_mk2_noise_q": 1.0,
        "outpaint_mk2_color_variation": 0.05,
    }
    with pytest.raises(InvalidRequestError, match="script_args"):
        fields_from_script_args([None, 64, 8, ["left"], 1.0, 0.05, "extra"])


# Whole jobs --------------------------------------------------------------------------------------------------------


def outpainting(red_circle, **changes) -> GenerationRequest:
    request = GenerationRequest(
        prompt="a large red circle on a white background",
        init_images=[red_circle],
        width=128,
        height=64,
        steps=12,
        seed=5,
        denoising_strength=0.8,
        outpaint_mk2=True,
        outpaint_mk2_pixels=64,
        outpaint_mk2_mask_blur=4,
        outpaint_mk2_directions=("right",),
    )
    return dataclasses.replace(request, **changes)


def test_outpainting_mk2_grows_the_picture_and_paints_the_new_part(micro_engine, red_circle):
    events = list(micro_engine.generate(outpainting(red_circle)))
    result = events[-1]
    grown = np.asarray(result.images[0].convert("RGB")).astype(int)
    assert grown.shape == (64, 128, 3)
    original = np.asarray(red_circle.convert("RGB")).astype(int)
    # Far from the new part the picture is as it was; the new part is painted in the picture's white background.
    assert np.abs(grown[:, :24] - original[:, :24]).mean() < 4
    new = grown[:, 80:]
    assert (new.min(axis=2) > 200).mean() > 0.9
    assert "Denoising strength: 0.8" in result.infotexts[0]
    progress = [event for event in events if isinstance(event, Progress)]
    assert progress and progress[-1].step == progress[-1].total


def test_each_side_is_a_pass_on_the_picture_the_side_before_made(micro_engine, red_circle):
    request = outpainting(red_circle, outpaint_mk2_directions=("left", "down"), outpaint_mk2_pixels=32, n_iter=2)
    result = list(micro_engine.generate(request))[-1]
    assert [image.size for image in result.images] == [(128, 128), (128, 128)]
    assert result.seeds == [5, 6]  # each picture of a batch count on from the one before
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(result.images[1]))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"outpaint_mk2_pixels": 4}, "outpaint_mk2_pixels"),
        ({"outpaint_mk2_mask_blur": 65}, "outpaint_mk2_mask_blur"),
        ({"outpaint_mk2_directions": ("sideways",)}, "outpaint_mk2_directions"),
        ({"outpaint_mk2_noise_q": 5}, "outpaint_mk2_noise_q"),
        ({"outpaint_mk2_color_variation": -0.1}, "outpaint_mk2_color_variation"),
        ({"loopback": True}, "outpaint_mk2"),
        ({"mask": Image.new("L", (64, 64), 255)}, "outpaint_mk2"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(micro_engine, red_circle, changes, field):
    with pytest.raises(InvalidRequestError) as caught:
        micro_engine.validate(outpainting(red_circle, **changes))
    assert caught.value.field == field
