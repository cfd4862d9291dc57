"""A1111's Sketch (img2img from a picture painted on in colour) and Inpaint sketch (strokes in colour that are both
the mask and what the masked part starts from), in the engine and through the page's endpoints on the micro
model, where the colours mean something."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image, ImageFilter

from engine import GenerationRequest
from engine.errors import InvalidRequestError
from engine.inpaint import sketched_inpaint
from tests.test_browser import serve_page

GREEN, BLUE, RED = (0, 128, 0), (0, 0, 255), (255, 0, 0)
PALETTE = {"red": RED, "green": GREEN, "blue": BLUE, "white": (255, 255, 255), "black": (0, 0, 0)}


def nearest_colour(picture: Image.Image, box: tuple[int, int, int, int]) -> str:
    mean = np.asarray(picture.convert("RGB").crop(box), dtype=float).reshape(-1, 3).mean(0)
    return min(PALETTE, key=lambda name: float(((mean - PALETTE[name]) ** 2).sum()))


def circle_strokes(red_circle: Image.Image) -> Image.Image:
    """Strokes over the whole of the micro model's red circle, a little wider (as a person paints over it)."""
    pixels = np.asarray(red_circle, dtype=int)
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 100)
    return Image.fromarray(red.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(5))


def painted(picture: Image.Image, strokes: Image.Image, colour) -> Image.Image:
    return Image.composite(Image.new("RGB", picture.size, colour), picture, strokes)


# The engine -----------------------------------------------------------------------------------------------------


def test_the_strokes_are_the_mask_and_their_colours_go_into_the_picture():
    original = Image.new("RGB", (64, 64), RED)
    strokes = Image.new("L", (64, 64), 0)
    strokes.paste(255, (16, 16, 48, 48))
    strokes.putpixel((2, 2), 40)  # a stroke's soft edge counts in full, as A1111 takes every changed pixel
    sketched = painted(original, strokes, GREEN)

    init, mask = sketched_inpaint(original, sketched, strokes, mask_blur=0, mask_transparency=0)
    assert np.array_equal(np.asarray(mask) > 0, np.asarray(strokes) > 0)
    assert set(np.unique(np.asarray(mask))) == {0, 255}
    assert init.getpixel((32, 32)) == GREEN and init.getpixel((60, 60)) == RED

    # Mask transparency dims the mask, and the original shows through the sketch as much.
    init, mask = sketched_inpaint(original, sketched, strokes, mask_blur=0, mask_transparency=75)
    assert mask.getpixel((32, 32)) in (63, 64) and mask.getpixel((60, 60)) == 0
    red, green, _ = init.getpixel((32, 32))
    assert abs(red - 191) <= 1 and abs(green - 32) <= 1

    # Blurred, the sketch fades into the original at its edges, and far from it the original is untouched.
    init, mask = sketched_inpaint(original, sketched, strokes, mask_blur=4, mask_transparency=0)
    assert init.getpixel((32, 32)) == GREEN and init.getpixel((60, 60)) == RED
    assert 0 < init.getpixel((16, 32))[1] < 128
    assert mask.getpixel((16, 32)) == 255  # the mask itself is blurred later, by the job's own Mask blur

    _, mask = sketched_inpaint(original, sketched, strokes, mask_blur=0, mask_transparency=100)
    assert mask.getextrema() == (0, 0)


@pytest.mark.parametrize(
    ("field", "values", "allowed"),
    [
        ("mask_transparency", {"mask_transparency": 101}, "0 to 100"),
        ("mask_transparency", {"mask_transparency": "half"}, "a number"),
        ("mask_blur", {"mask_blur": -1}, "0 to 64"),
    ],
)
def test_a_bad_sketch_setting_is_refused_naming_it(field, values, allowed):
    picture = Image.new("RGB", (32, 32), RED)
    settings = {"mask_blur": 4, "mask_transparency": 0, **values}
    with pytest.raises(InvalidRequestError) as caught:
        sketched_inpaint(picture, picture, Image.new("L", (32, 32), 255), **settings)
    assert caught.value.field == field and allowed in str(caught.value)


def test_inpaint_sketch_recolours_a_shape_that_plain_inpaint_keeps(micro_engine, red_circle):
    """At denoising 0.5, the micro model keeps the colour a circle starts from: painted over in green or blue (Inpaint
    sketch) it comes out that colour, while inpainting the same area from the picture as it is leaves it red."""
    strokes = circle_strokes(red_circle)
    centre = (20, 20, 30, 30)  # inside the circle (upper left of the picture)
    assert nearest_colour(red_circle, centre) == "red"
    colours = []
    for name in ("green", "blue"):
        init, mask = sketched_inpaint(
            red_circle, painted(red_circle, strokes, PALETTE[name]), strokes, mask_blur=4, mask_transparency=0
        )
        for seed in range(4):
            common = dict(prompt="a circle on a white background", seed=seed, steps=12, denoising_strength=0.5)
            sketched = list(micro_engine.generate(GenerationRequest(init_images=[init], mask=mask, **common)))
            plain = list(micro_engine.generate(GenerationRequest(init_images=[red_circle], mask=strokes, **common)))
            colours.append(
                (name, nearest_colour(sketched[-1].images[0], centre), nearest_colour(plain[-1].images[0], centre))
            )
    assert all(asked == got for asked, got, _ in colours), colours
    assert all(plain == "red" for _, _, plain in colours), colours


# The page --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro_page_url(micro_engine, tmp_path_factory):
    settings = SimpleNamespace(outputs_dir=tmp_path_factory.mktemp("sketch-outputs"), save_images=False)
    demo, url = serve_page(micro_engine, settings)
    yield url
    demo.close()


def _saved(picture: Image.Image, path) -> str:
    picture.save(path)
    return handle_file(str(path))


def _editor(tmp_path, background: Image.Image, strokes: Image.Image, colour) -> dict:
    """An image-editor value as the page sends it: the picture, one layer of strokes, and the two together."""
    layer = Image.new("RGBA", background.size, (*colour, 255))
    layer.putalpha(strokes)
    composite = background.convert("RGBA")
    composite.alpha_composite(layer)
    return {
        "background": _saved(background, tmp_path / "background.png"),
        "layers": [_saved(layer, tmp_path / "layer.png")],
        "composite": _saved(composite, tmp_path / "composite.png"),
    }


def _picture(result) -> Image.Image:
    with Image.open(result[2][0]["image"]) as picture:
        return picture.convert("RGB")


COMMON = ("a circle on a white background", "", "Euler a", "Automatic", 12, 7.0, 1, 64, 64, 1, 1)


def test_the_inpaint_endpoint_takes_the_sketch_colours_when_inpaint_sketch_is_on(micro_page_url, red_circle, tmp_path):
    client = Client(micro_page_url, verbose=False)
    editor = _editor(tmp_path, red_circle, circle_strokes(red_circle), GREEN)
    inpaint = dict(image=editor, mask=None, denoising_strength=0.5, mask_blur=4, api_name="/inpaint")
    sketched = client.predict(*COMMON, inpaint_sketch=True, **inpaint)
    assert nearest_colour(_picture(sketched), (20, 20, 30, 30)) == "green"
    # Off, the same strokes are only a mask: the picture starts from the red circle.
    plain = client.predict(*COMMON, inpaint_sketch=False, **inpaint)
    assert nearest_colour(_picture(plain), (20, 20, 30, 30)) == "red"
    # All transparent, the mask is empty: nothing is repainted.
    unchanged = client.predict(*COMMON, inpaint_sketch=True, mask_transparency=100, **inpaint)
    assert np.array_equal(np.asarray(_picture(unchanged)), np.asarray(red_circle))

    with pytest.raises(AppError, match="Mask transparency: got 150; allowed: a number from 0 to 100"):
        client.predict(*COMMON, inpaint_sketch=True, mask_transparency=150, **inpaint)
    uploaded = {**inpaint, "mask": _saved(circle_strokes(red_circle), tmp_path / "mask.png")}
    with pytest.raises(AppError, match="mask: got an uploaded mask with Inpaint sketch on"):
        client.predict(*COMMON, inpaint_sketch=True, **uploaded)
    no_strokes = {**inpaint, "image": {**editor, "layers": []}}
    with pytest.raises(AppError, match="image: got no strokes"):
        client.predict(*COMMON, inpaint_sketch=True, **no_strokes)
    assert len(client.predict(*COMMON, inpaint_sketch=True, **inpaint)[2]) == 1  # and the next job works


def test_the_img2img_endpoint_draws_from_a_sketch_when_no_init_image_is_given(micro_page_url, tmp_path):
    client = Client(micro_page_url, verbose=False)
    canvas = Image.new("RGB", (512, 512), "white")
    strokes = Image.new("L", canvas.size, 0)
    strokes.paste(255, (160, 160, 352, 352))
    sketch = _editor(tmp_path, canvas, strokes, BLUE)
    prompt = ("a square on a white background", *COMMON[1:])
    # At denoising 0.5 the micro model keeps the colour it starts from: blue comes from the sketch alone.
    result = client.predict(*prompt, None, 0.5, sketch=sketch, api_name="/img2img")
    picture = _picture(result)
    assert picture.size == (64, 64)
    assert nearest_colour(picture, (26, 26, 38, 38)) == "blue" and nearest_colour(picture, (0, 0, 8, 8)) == "white"
    with pytest.raises(AppError, match="init_images: got nothing"):
        client.predict(*prompt, None, 0.75, sketch={**sketch, "layers": []}, api_name="/img2img")
