"""A1111's Prompt matrix script: a picture per combination of the prompt's | parts, and their labelled grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from engine import GenerationRequest, InvalidRequestError, PromptMatrix, Result
from engine.prompt_matrix import draw_grid, grid_result, plan
from tests.test_api import api, decode, ok, server  # noqa: F401 - fixtures
from tests.test_page_client import _client, outputs_dir, page_url, txt2img_args  # noqa: F401 - fixtures
from training import dataset

GREY = (153, 153, 153)


def test_the_pictures_are_a1111s_combinations_in_a1111s_order():
    base = GenerationRequest(prompt="a house | at night | in snow, ", seed=5, subseed=100, n_iter=3, batch_size=2)
    matrix = plan(base, PromptMatrix())
    assert matrix.parts == ("a house", "at night", "in snow")
    assert [request.prompt for request in matrix.requests] == [
        "a house",
        "a house, at night",
        "a house, in snow",
        "a house, at night, in snow",
    ]
    # One picture each, all at the seed; the variation seed counts up, as A1111 gives them.
    assert {(request.seed, request.n_iter, request.batch_size) for request in matrix.requests} == {(5, 1, 1)}
    assert [request.subseed for request in matrix.requests] == [100, 101, 102, 103]
    settings = PromptMatrix(put_at_start=True, different_seeds=True, delimiter="space")
    at_start = plan(base, settings).requests
    assert [request.prompt for request in at_start][1:] == [
        "at night a house",
        "in snow a house",
        "at night in snow a house",
    ]
    assert [request.seed for request in at_start] == [5, 6, 7, 8]
    negative = plan(
        GenerationRequest(prompt="a house", negative_prompt="blur | fog"), PromptMatrix(prompt_type="negative")
    )
    assert [(request.prompt, request.negative_prompt) for request in negative.requests] == [
        ("a house", "blur"),
        ("a house", "blur, fog"),
    ]
    # A random seed is drawn once for the whole matrix.
    assert len({request.seed for request in plan(GenerationRequest(prompt="a | b | c"), PromptMatrix()).requests}) == 1


@pytest.mark.parametrize(
    ("prompt", "matrix", "field", "allowed"),
    [
        ("a house", PromptMatrix(), "prompt", "parts separated by |"),
        ("a house", PromptMatrix(prompt_type="negative"), "negative_prompt", "parts separated by |"),
        ("a" + " | b" * 9, PromptMatrix(), "prompt", "at most 8 parts after the first"),
        ("a | b", PromptMatrix(prompt_type="both"), "prompt_matrix_prompt_type", "positive or negative"),
        ("a | b", PromptMatrix(delimiter="tab"), "prompt_matrix_delimiter", "comma or space"),
        ("a | b", PromptMatrix(margin=501), "prompt_matrix_margin", "0 to 500"),
    ],
)
def test_a_matrix_it_cannot_make_is_refused_by_field(prompt, matrix, field, allowed):
    with pytest.raises(InvalidRequestError) as refused:
        plan(GenerationRequest(prompt=prompt), matrix)
    assert refused.value.field == field and allowed in refused.value.allowed


def test_script_args_read_as_a1111s_api_sends_them():
    assert PromptMatrix.from_script_args([True, True, "negative", "space", 8]) == PromptMatrix(
        True, True, "negative", "space", 8
    )
    assert PromptMatrix.from_script_args([False, True]) == PromptMatrix(different_seeds=True)
    assert PromptMatrix.from_script_args(None) == PromptMatrix()
    with pytest.raises(InvalidRequestError, match="at most 5 values"):
        PromptMatrix.from_script_args([False] * 6)


def test_the_grid_puts_each_picture_under_its_parts_and_strikes_out_those_left_out():
    matrix = plan(GenerationRequest(prompt="a | b | c | d", seed=1), PromptMatrix(margin=6))
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "cyan"]
    pictures = [Image.new("RGB", (64, 64), colour) for colour in colours]
    grid = draw_grid(matrix, pictures)
    pixels = np.asarray(grid)
    # Three parts after the first: b and c across (4 columns), d down (2 rows), 6 pixels apart.
    left, top = grid.width - (4 * 64 + 3 * 6), grid.height - (2 * 64 + 6)
    assert left > 0 and top > 0
    for number, colour in enumerate(colours):
        row, column = divmod(number, 4)
        x, y = left + column * 70 + 32, top + row * 70 + 32
        assert tuple(pixels[y, x]) == Image.new("RGB", (1, 1), colour).getpixel((0, 0)), number
    assert tuple(pixels[top + 32, left + 64 + 3]) == (255, 255, 255)  # the margin
    # Column 0 leaves b and c out (grey, struck through); column 3 holds both (black only).
    first, last = pixels[:top, left : left + 64], pixels[:top, left + 3 * 70 : left + 3 * 70 + 64]
    assert first.min() == GREY[0] and last.min() < 60  # grey text only, and black text
    grey = (first == GREY).all(axis=2).astype(np.int8)
    runs = [max(len(run) for run in "".join(map(str, row)).split("0")) for row in grey]
    assert max(runs) >= 5  # the strike through a part's name
    assert not (np.abs(last.astype(int) - GREY).sum(axis=2) == 0).sum(axis=1).max() >= 5
    # A stopped matrix: the pictures not made are blank cells.
    partial = np.asarray(draw_grid(matrix, pictures[:3] + [None] * 5))
    assert (partial[top + 70 + 32, left + 32] == 255).all()


def test_each_picture_is_the_job_of_its_own_prompt(micro_engine):
    base = GenerationRequest(prompt="a large circle on a white background | red | blue", seed=11, steps=12)
    matrix = micro_engine.prompt_matrix_plan(base, PromptMatrix())
    results = []
    for request in matrix.requests:
        results.append(list(micro_engine.generate(request))[-1])
    # Exactly the picture its prompt makes alone, so its infotext makes it again.
    alone = list(micro_engine.generate(GenerationRequest(prompt=matrix.requests[1].prompt, seed=11, steps=12)))[-1]
    assert alone.images[0].tobytes() == results[1].images[0].tobytes()
    assert "a large circle on a white background, red\n" in results[1].infotexts[0]
    assert dataset.classify(results[1].images[0]).colour == "red"
    assert dataset.classify(results[2].images[0]).colour == "blue"
    grid = grid_result(matrix, results)
    assert isinstance(grid, Result) and grid.seeds == [11] and grid.infotexts == results[0].infotexts[:1]
    assert grid.images[0].width > 2 * 64 and grid.images[0].height > 2 * 64


def test_a_picture_the_model_refuses_is_named_before_any_job_runs(micro_engine):
    with pytest.raises(InvalidRequestError) as refused:
        micro_engine.prompt_matrix_plan(GenerationRequest(prompt="a | b", steps=0), PromptMatrix())
    assert refused.value.field == "prompt matrix picture 1: steps"


def test_the_api_answers_with_the_grid_first_as_a1111_does(api, tmp_path_factory):  # noqa: F811
    payload = {
        "prompt": "a boat | at sea | at dawn",
        "steps": 3,
        "width": 64,
        "height": 64,
        "seed": 21,
        "script_name": "Prompt matrix",
        "script_args": [False, False, "positive", "comma", 0],
        "save_images": True,
    }
    body = ok(api.post("txt2img", json=payload))
    info = json.loads(body["info"])
    images = [decode(image) for image in body["images"]]
    assert len(images) == 5 and images[0].size[0] > 128 and {image.size for image in images[1:]} == {(64, 64)}
    assert info["index_of_first_image"] == 1 and info["infotexts"][0] == info["infotexts"][1]
    assert info["all_prompts"] == ["a boat", "a boat, at sea", "a boat, at dawn", "a boat, at sea, at dawn"]
    assert info["all_seeds"] == [21] * 4 and info["ignored_fields"] == []
    grids = list(tmp_path_factory.getbasetemp().glob("api-outputs[0-9]*/txt2img-grids/*/*-21.png"))
    assert len(grids) == 1 and Image.open(grids[0]).size == images[0].size
    refused = api.post("txt2img", json={**payload, "prompt": "a boat"})
    assert refused.status_code == 422 and refused.json()["field"] == "prompt"
    assert "prompt matrix" in ok(api.get("scripts"))["txt2img"]


def test_the_page_shows_the_grid_first_and_refuses_it_with_a_prompt_list(page_url, outputs_dir):  # noqa: F811
    client = _client(page_url)
    args = txt2img_args("a kite | red", steps=3, seed=8)
    _, _, gallery, infotext = client.predict(*args, matrix_on=True, matrix_margin=4, api_name="/txt2img")
    sizes = [Image.open(item["image"]).size for item in gallery]
    assert len(sizes) == 3 and sizes[1:] == [(64, 64)] * 2 and sizes[0][0] == 64 + 4 + 64  # no row headers for one part
    assert infotext.startswith("a kite\n")
    assert list(outputs_dir.glob("txt2img-grids/*/*-8.png"))
    with pytest.raises(Exception, match="one script at a time"):
        client.predict(*args, matrix_on=True, prompt_list=True, prompt_list_text="x", api_name="/txt2img")
