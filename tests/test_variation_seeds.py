"""A1111's variation seed (subseed, subseed_strength) and "Resize seed from", in every mode.

Meaning is tested on the micro model: strength 0 draws the seed's picture and strength 1 the variation
seed's, with pictures in between moving from one to the other; a seed resized to a nearby size keeps its
shape where it was. The noise itself is checked against A1111's formulas, written out here on their own.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from engine import GenerationRequest, InvalidRequestError, Result
from engine.compare import Comparer, parse_axis
from engine.infotext import parse_infotext, parse_infotext_params
from engine.noise import NoiseVariation, paste_centred, seed_noise
from training.dataset import nearest_palette

SCENE = {"prompt": "a red circle on a blue background", "steps": 20, "sampler_name": "Euler"}


def generate(engine, **fields) -> Result:
    result = list(engine.generate(GenerationRequest(**fields)))[-1]
    assert isinstance(result, Result), result
    return result


def picture(engine, **fields) -> Image.Image:
    return generate(engine, **fields).images[0]


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.tobytes() == b.tobytes()


def distance(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


# The noise, against A1111's formulas -----------------------------------------------------------------


def a1111_slerp(strength: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """A1111's slerp over one image's (C, H, W) noise, as loops: each channel's column (the values down
    its height) is one vector, turned from `low` towards `high` by `strength` of the angle between them."""
    out = np.empty_like(low)
    for channel in range(low.shape[0]):
        for column in range(low.shape[2]):
            a, b = low[channel, :, column], high[channel, :, column]
            angle = np.arccos(np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b)))
            out[channel, :, column] = (np.sin((1 - strength) * angle) * a + np.sin(strength * angle) * b) / np.sin(
                angle
            )
    return out


def test_seed_noise_is_what_a1111_draws_from_a_seed_on_the_cpu():
    torch.manual_seed(1234)  # A1111's randn(seed, shape) with its CPU random source
    expected = torch.randn((4, 8, 8))
    assert torch.equal(seed_noise(1234, (4, 8, 8)), expected)


@pytest.mark.parametrize("strength", [0.25, 0.5, 0.8])
def test_variation_blends_the_two_seeds_noise_as_a1111(strength):
    base = seed_noise(7, (1, 4, 6, 5))
    varied = NoiseVariation([7], [99], strength).vary(base)
    expected = a1111_slerp(strength, base[0].numpy(), seed_noise(99, (4, 6, 5)).numpy())
    np.testing.assert_allclose(varied[0].numpy(), expected, rtol=1e-4, atol=1e-5)


def test_seed_resize_pastes_the_seed_noise_in_the_middle_or_crops_its_middle():
    seed = 21
    base = torch.randn((1, 4, 12, 10), generator=torch.Generator().manual_seed(5))
    grown = NoiseVariation([seed], [0], 0.0, resize_from_latent=(8, 6)).vary(base)[0]
    small = seed_noise(seed, (4, 8, 6))
    assert torch.equal(grown[:, 2:10, 2:8], small)  # offsets (12-8)//2 and (10-6)//2
    outside = torch.ones((12, 10), dtype=torch.bool)
    outside[2:10, 2:8] = False
    assert torch.equal(grown[:, outside], base[0][:, outside])

    shrunk = NoiseVariation([seed], [0], 0.0, resize_from_latent=(16, 14)).vary(base)[0]
    assert torch.equal(shrunk, seed_noise(seed, (4, 16, 14))[:, 2:14, 2:12])
    # A1111 floors half the difference. Growing by an odd amount puts the extra row at the far side;
    # shrinking by one leaves the last row and column of the real size's noise as they were.
    grown_odd = paste_centred(torch.zeros((1, 5, 5)), torch.ones((1, 2, 2)))
    assert grown_odd[0, 1:3, 1:3].all() and grown_odd.sum() == 4
    shrunk_odd = paste_centred(torch.zeros((1, 4, 4)), torch.arange(25.0).reshape(1, 5, 5) + 1)
    assert torch.equal(shrunk_odd[0, :3, :3], torch.arange(25.0).reshape(5, 5)[1:4, 1:4] + 1)
    assert shrunk_odd[0, 3].sum() == 0 and shrunk_odd[0, :, 3].sum() == 0


# Pictures (micro model) ------------------------------------------------------------------------------


def test_strength_0_is_the_seed_and_strength_1_the_variation_seed(micro_engine):
    plain_seed, plain_variation = picture(micro_engine, seed=1, **SCENE), picture(micro_engine, seed=2, **SCENE)
    assert same(picture(micro_engine, seed=1, subseed=2, subseed_strength=0, **SCENE), plain_seed)
    # Euler adds no noise after the first, so the variation seed's noise gives its picture exactly.
    assert same(picture(micro_engine, seed=1, subseed=2, subseed_strength=1, **SCENE), plain_variation)


def test_strength_moves_the_picture_from_the_seed_towards_the_variation_seed(micro_engine):
    plain_seed, plain_variation = picture(micro_engine, seed=1, **SCENE), picture(micro_engine, seed=2, **SCENE)
    steps = [picture(micro_engine, seed=1, subseed=2, subseed_strength=s, **SCENE) for s in (0.1, 0.5, 0.9)]
    to_seed = [distance(image, plain_seed) for image in steps]
    to_variation = [distance(image, plain_variation) for image in steps]
    assert to_seed == sorted(to_seed) and to_variation == sorted(to_variation, reverse=True), (to_seed, to_variation)
    assert to_seed[0] < 3 < to_seed[-1] and to_variation[-1] < 10 < to_variation[0]


def test_a_batch_keeps_its_seed_and_counts_up_the_variation_seed(micro_engine):
    fields = {**SCENE, "sampler_name": "Euler a", "seed": 5, "subseed": 40, "subseed_strength": 0.3}
    batch = generate(micro_engine, batch_size=2, n_iter=2, **fields)
    assert batch.seeds == [5, 5, 5, 5] and batch.subseeds == [40, 41, 42, 43]
    for index, text in enumerate(batch.infotexts):
        params = parse_infotext_params(text)
        assert (params["Seed"], params["Variation seed"], params["Variation seed strength"]) == (
            "5",
            str(40 + index),
            "0.3",
        )
    alone = picture(micro_engine, **{**fields, "subseed": 42})
    assert same(batch.images[2], alone)
    assert len({image.tobytes() for image in batch.images}) == 4


def test_without_strength_a_batch_counts_up_the_seed_and_writes_no_variation(micro_engine):
    result = generate(micro_engine, seed=5, subseed=40, batch_size=2, **{**SCENE, "steps": 4})
    assert result.seeds == [5, 6] and result.subseeds == [40, 41]
    assert all("Variation seed" not in text for text in result.infotexts)


def test_a_random_variation_seed_is_drawn_and_reported(micro_engine):
    result = generate(micro_engine, seed=3, subseed=-1, subseed_strength=0.5, **{**SCENE, "steps": 4})
    subseed = result.subseeds[0]
    assert 0 <= subseed < 2**32 and result.request.subseed == subseed
    assert f"Variation seed: {subseed}," in result.infotexts[0]


def shape_mask(image: Image.Image) -> np.ndarray:
    labels = nearest_palette(np.asarray(image.convert("RGB")))
    second = np.argsort(-np.bincount(labels.ravel(), minlength=8), kind="stable")[1]
    return labels == second


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_a_seed_resized_from_the_native_size_keeps_the_shape_where_it_was(micro_engine):
    """72x72 with "Resize seed from 64x64": the 64x64 picture's shape, placed in the middle, overlaps the
    new picture's shape more than the plain 72x72 picture's (measured: 10 of 10 seeds, 0.39 to 0.95
    against 0 to 0.56)."""
    resized_overlaps, plain_overlaps = [], []
    for seed in range(4):
        native = shape_mask(picture(micro_engine, seed=seed, **SCENE))
        placed = np.zeros((72, 72), dtype=bool)
        placed[4:68, 4:68] = native
        resized = picture(
            micro_engine, seed=seed, width=72, height=72, seed_resize_from_w=64, seed_resize_from_h=64, **SCENE
        )
        plain = picture(micro_engine, seed=seed, width=72, height=72, **SCENE)
        resized_overlaps.append(overlap(placed, shape_mask(resized)))
        plain_overlaps.append(overlap(placed, shape_mask(plain)))
    assert all(r > p for r, p in zip(resized_overlaps, plain_overlaps, strict=True)), (resized_overlaps, plain_overlaps)
    assert np.mean(resized_overlaps) > 0.5


def test_the_infotext_reproduces_a_varied_resized_picture(micro_engine):
    fields = dict(SCENE, seed=8, subseed=77, subseed_strength=0.35, width=72, height=72)
    first = generate(micro_engine, seed_resize_from_w=64, seed_resize_from_h=64, **fields)
    params = parse_infotext_params(first.infotexts[0])
    assert params["Seed resize from"] == "64x64" and params["Variation seed strength"] == "0.35"
    again = picture(micro_engine, **dataclasses.asdict(parse_infotext(first.infotexts[0])))
    assert same(again, first.images[0])


def test_variation_seeds_change_img2img_inpaint_and_hires_reproducibly(micro_engine):
    red = picture(micro_engine, seed=1, **SCENE)
    mask = Image.new("L", red.size, 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)
    variation = {"subseed": 12, "subseed_strength": 0.6}
    cases = {
        "img2img": {"init_images": [red], "denoising_strength": 0.6},
        "inpaint": {"init_images": [red], "mask": mask, "denoising_strength": 0.8, "mask_blur": 0},
        # At strength 1 diffusers' inpaint starts from pure noise without add_noise; it is varied too.
        "inpaint at 1": {"init_images": [red], "mask": mask, "denoising_strength": 1.0, "mask_blur": 0},
        "hires": {"enable_hr": True, "hr_scale": 1.25, "hr_upscaler": "Latent", "denoising_strength": 0.5},
    }
    for name, fields in cases.items():
        request = {**SCENE, "seed": 4, **fields}
        plain = picture(micro_engine, **request)
        varied = picture(micro_engine, **request, **variation)
        assert not same(varied, plain), name
        assert same(varied, picture(micro_engine, **request, **variation)), name
        if "mask" in fields:  # outside the mask the picture stays as it was
            right = (32, 0, 64, 64)
            assert varied.crop(right).tobytes() == red.crop(right).tobytes(), name


# Checks and Compare (tiny model: mechanics) -----------------------------------------------------------


@pytest.mark.parametrize(
    "fields, field, allowed",
    [
        ({"subseed_strength": 1.5}, "subseed_strength", "0.0 to 1.0"),
        ({"subseed_strength": "lots"}, "subseed_strength", "a number"),
        ({"subseed": -7}, "subseed", "0 to"),
        ({"seed_resize_from_w": 100, "seed_resize_from_h": 64}, "seed_resize_from_w", "multiple of 8"),
        ({"seed_resize_from_w": 64}, "seed_resize_from_h", "give both"),
    ],
)
def test_bad_seed_extras_are_refused_by_name(engine, fields, field, allowed):
    with pytest.raises(InvalidRequestError) as caught:
        engine.validate(GenerationRequest(prompt="x", **fields))
    assert caught.value.field == field and allowed in str(caught.value)


def test_a1111_off_values_for_seed_resize_are_accepted(engine):
    request = engine.validate(GenerationRequest(prompt="x", seed_resize_from_w=-1, seed_resize_from_h=-1))
    assert (request.seed_resize_from_w, request.seed_resize_from_h) == (0, 0)


def test_compare_var_strength_axis_runs_one_variation_seed_for_the_whole_grid(engine):
    base = GenerationRequest(prompt="a red lighthouse", seed=11, steps=3, width=64, height=64, sampler_name="Euler")
    axis = parse_axis("Var. strength", "0, 1", engine)
    result = list(Comparer(engine).run_grid(base, [axis]))[-1]
    no_variation, all_variation = (cell.image for cell in result.cells)
    subseed = int(parse_infotext_params(result.cells[1].infotext)["Variation seed"])
    assert same(no_variation, picture(engine, **dataclasses.asdict(base)))
    assert same(all_variation, picture(engine, **{**dataclasses.asdict(base), "seed": subseed}))
