"""A1111's composable diffusion: "a AND b :0.5", each part guiding the picture by its weight.

Exactness is tested through identities of A1111's sum (uncond + cfg * sum(w * (cond - uncond))): a part
named twice guides twice as hard, halves add up to the plain prompt. Meaning is tested on the micro
model: a colour named in its own part colours the shape, and a negative weight pushes a colour away.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from engine import GenerationRequest, Result
from engine.prompt_schedule import composable_parts
from training.dataset import classify

PLAIN = "a red circle on a white background"


def picture(engine, **fields) -> Image.Image:
    result = list(engine.generate(GenerationRequest(**fields)))[-1]
    assert isinstance(result, Result), result
    return result.images[0]


def largest_difference(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.mark.parametrize(
    "prompt, parts",
    [
        ("a red circle AND a blue background :0.5", [("a red circle", 1.0), ("a blue background", 0.5)]),
        ("a cat:  1.5 AND dog :-1", [("a cat", 1.5), ("dog", -1.0)]),
        ("(red:1.3) circle AND [cat:dog:0.5]", [("(red:1.3) circle", 1.0), ("[cat:dog:0.5]", 1.0)]),
        ("a cat :0.5", [("a cat", 0.5)]),
        ("a cat and a dog, ANDROID", [("a cat and a dog, ANDROID", 1.0)]),
        ("fox AND fox :0.5 AND owl", [("fox", 1.5), ("owl", 1.0)]),
        ("a cat AND", [("a cat", 1.0), ("", 1.0)]),
    ],
)
def test_parts_and_weights_are_read_as_a1111_reads_them(prompt, parts):
    assert composable_parts(prompt) == parts


def test_a_part_named_twice_guides_twice_as_hard(micro_engine):
    fields = {"steps": 20, "sampler_name": "Euler", "seed": 3}
    doubled = picture(micro_engine, prompt=f"{PLAIN} AND {PLAIN}", cfg_scale=7, **fields)
    assert largest_difference(doubled, picture(micro_engine, prompt=PLAIN, cfg_scale=14, **fields)) <= 1
    plain = picture(micro_engine, prompt=PLAIN, cfg_scale=7, **fields)
    assert largest_difference(doubled, plain) > 10
    halves = picture(micro_engine, prompt=f"{PLAIN} :0.5 AND {PLAIN} :0.5", cfg_scale=7, **fields)
    assert halves.tobytes() == plain.tobytes()
    half_weight = picture(micro_engine, prompt=f"{PLAIN} :0.5", cfg_scale=14, **fields)
    assert half_weight.tobytes() == plain.tobytes()
    # At CFG 1 diffusers skips the negative; the parts still guide against it, as A1111 sums them.
    low = picture(micro_engine, prompt=f"{PLAIN} AND {PLAIN}", cfg_scale=1, **fields)
    assert largest_difference(low, picture(micro_engine, prompt=PLAIN, cfg_scale=2, **fields)) <= 1


def test_a_colour_in_its_own_part_colours_the_shape(micro_engine):
    """Measured: 20 of 24 (6 colours x seeds 0-3; yellow comes out orange), 10 of 12 on the seeds 0-1
    kept here; a colour left unnamed would come out about 1 in 8."""
    right = 0
    for colour in ("red", "green", "blue", "yellow", "purple", "orange"):
        for seed in range(2):
            image = picture(micro_engine, prompt=f"a circle on a white background AND {colour}", seed=seed, steps=20)
            reading = classify(image)
            assert reading.background == "white"
            right += reading.colour == colour
    assert right >= 9, right


def test_a_negative_weight_pushes_a_colour_away(micro_engine):
    """Measured over seeds 0-23: 14 red circles without the part, 12 of them not red with it."""
    red_before = turned = 0
    for seed in range(12):
        plain = classify(picture(micro_engine, prompt="a circle on a white background", seed=seed, steps=20))
        if plain.colour != "red":
            continue
        red_before += 1
        pushed = picture(micro_engine, prompt="a circle on a white background AND red :-0.5", seed=seed, steps=20)
        turned += classify(pushed).colour != "red"
    assert red_before >= 4 and turned >= 0.8 * red_before, (turned, red_before)


def test_each_part_keeps_its_own_prompt_editing(micro_engine):
    """[red:blue:N] inside one part switches that part's colour at step N, as in A1111 (each part has its
    own schedule): switched at the end it draws red, switched at the start blue."""
    fields = {"steps": 20, "sampler_name": "Euler", "seed": 1}
    late = picture(micro_engine, prompt="a circle on a white background AND [red:blue:19]", **fields)
    early = picture(micro_engine, prompt="a circle on a white background AND [red:blue:1]", **fields)
    red = picture(micro_engine, prompt="a circle on a white background AND red", **fields)
    assert classify(red).colour == "red" and classify(late).colour == "red"
    assert classify(early).colour == "blue"
    assert largest_difference(late, red) < largest_difference(early, red)


@pytest.mark.parametrize("mode", ["img2img", "inpaint", "hires"])
def test_composable_prompts_in_every_mode(engine, mode):
    """The same identity as in txt2img, through img2img, inpaint and the hires fix pass (tiny model)."""
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
    extra = {
        "img2img": {"init_images": [init], "denoising_strength": 0.6},
        "inpaint": {"init_images": [init], "mask": mask, "denoising_strength": 0.9},
        "hires": {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5},
    }[mode]
    fields = {"steps": 6, "sampler_name": "Euler", "seed": 8, "width": 64, "height": 64, **extra}
    doubled = picture(engine, prompt="a lighthouse AND a lighthouse", cfg_scale=4, **fields)
    assert largest_difference(doubled, picture(engine, prompt="a lighthouse", cfg_scale=8, **fields)) <= 1
    assert largest_difference(doubled, picture(engine, prompt="a lighthouse", cfg_scale=4, **fields)) > 1


def test_the_token_counter_counts_each_part_as_a1111(engine):
    assert engine.token_counts("a cat AND a big dog", composable=True) == [3]
    # A negative prompt is not split: "AND" is a word there.
    assert engine.token_counts("a cat AND a big dog") == [6]


def test_the_prompt_panel_shows_each_part_with_its_weight(engine):
    from ui.page import _read_prompts

    panel = _read_prompts(engine, "a cat AND a (dog:1.2) :0.5", "fog AND rain", 20)
    assert "Prompt, part 1 of 2 (AND), weight 1" in panel and "Prompt, part 2 of 2 (AND), weight 0.5" in panel
    assert "AND" not in panel.split("Negative prompt")[0].replace("(AND)", "")
    assert "rain" in panel.split("Negative prompt")[1]
