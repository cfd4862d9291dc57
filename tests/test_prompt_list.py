"""A1111's "Prompts from file or textbox": one job per line, in the REST API (script_name) and on the page."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from engine import GenerationRequest, InvalidRequestError, PromptList
from engine.prompt_list import expand, read_lines
from tests.test_api import api, ok, server  # noqa: F401 - fixtures
from tests.test_page_client import _client, outputs_dir, page_url  # noqa: F401 - fixtures

SMALL = {"steps": 3, "width": 64, "height": 64}
SCRIPT = "prompts from file or textbox"


def test_lines_read_as_a1111_reads_them():
    text = """
    a red circle
    --prompt "a blue square" --negative_prompt ugly, blurry --steps 30 --cfg_scale 5.5 --tiling TRUE
    --prompt a green triangle on black --seed 7 --sampler_name "DPM++ 2M" --enable_hr true --hr_scale 1.5
    a cat -- not options, since the line does not start with them
    --styles Cinematic --outpath_samples /tmp/elsewhere --do_not_save_grid true
    """
    assert read_lines(text) == [
        (2, {"prompt": "a red circle"}),
        (3, {"prompt": "a blue square", "negative_prompt": "ugly, blurry", "steps": 30, "cfg_scale": 5.5, "tiling": True}),
        (4, {"prompt": "a green triangle on black", "seed": 7, "sampler_name": "DPM++ 2M", "enable_hr": True, "hr_scale": 1.5}),
        (5, {"prompt": "a cat -- not options, since the line does not start with them"}),
        (6, {"styles": ["Cinematic"]}),  # where files go is not the list's to say
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("--steps many", "prompt list line 2: --steps"),
        ("--cfg_scale", "prompt list line 2: --cfg_scale"),
        ("--strength 0.5", "prompt list line 2: --strength"),
        ("--sd_model other.safetensors", "prompt list line 2: --sd_model"),
        ("--restore_faces true", "prompt list line 2: --restore_faces"),
        ('--prompt "unclosed', "prompt list line 2"),
        ("--steps 20 loose words", "prompt list line 2"),
    ],
)
def test_a_line_that_cannot_be_read_is_refused_by_number_and_option(line, field):
    with pytest.raises(InvalidRequestError) as refused:
        read_lines(f"a fine first line\n{line}")
    assert refused.value.field == field


def test_prompts_join_the_pages_and_seeds_follow_a1111s_settings():
    base = GenerationRequest(prompt="oil painting", negative_prompt="blurry", seed=100, batch_size=2, n_iter=3)
    text = "a cat\n--negative_prompt dogs --seed 5\n--prompt a dog"
    at_start = [req for _, req in expand(base, PromptList(text=text))]
    assert [req.prompt for req in at_start] == ["a cat oil painting", "oil painting", "a dog oil painting"]
    assert [req.negative_prompt for req in at_start] == ["blurry", "dogs blurry", "blurry"]
    assert [req.seed for req in at_start] == [100, 5, 100]
    at_end = [req for _, req in expand(base, PromptList(text=text, position="end", iterate_seed=True))]
    assert at_end[0].prompt == "oil painting a cat" and at_end[1].negative_prompt == "blurry dogs"
    assert [req.seed for req in at_end] == [100, 5, 112]  # on by batch size x count after every line

    random_seed = GenerationRequest(prompt="", seed=-1)
    assert [req.seed for _, req in expand(random_seed, PromptList(text="a\nb"))] == [-1, -1]  # each its own
    same = [req.seed for _, req in expand(random_seed, PromptList(text="a\nb\nc", same_seed=True))]
    assert same[0] != -1 and same == [same[0]] * 3
    assert [req.prompt for _, req in expand(random_seed, PromptList(text="a\nb"))] == ["a", "b"]
    with pytest.raises(InvalidRequestError, match="prompt_position"):
        expand(base, PromptList(text="a", position="middle"))
    with pytest.raises(InvalidRequestError, match="at least one line"):
        expand(base, PromptList(text=" \n \n"))


def test_every_line_is_checked_before_any_job_runs(engine):
    base = GenerationRequest(prompt="x", steps=3, width=64, height=64)
    with pytest.raises(InvalidRequestError) as refused:
        engine.prompt_list_requests(base, PromptList(text="fine\n--steps 0\n--width 100"))
    assert str(refused.value).startswith("prompt list line 2: steps: got 0")


def test_the_api_runs_a_list_as_one_answer_and_each_line_as_its_own_request_would(api, engine):  # noqa: F811
    lines = '--prompt "a red lighthouse" --seed 11\n--prompt a blue boat --seed 12 --n_iter 2\n--prompt a green door --steps 4'
    payload = {**SMALL, "prompt": "oil painting", "seed": 40, "script_name": "Prompts from file or textbox"}
    body = ok(api.post("txt2img", json={**payload, "script_args": [False, False, "start", lines]}))
    info = json.loads(body["info"])
    assert len(body["images"]) == 4
    assert info["all_prompts"] == [
        "a red lighthouse oil painting",
        "a blue boat oil painting",
        "a blue boat oil painting",
        "a green door oil painting",
    ]
    assert info["all_seeds"] == [11, 12, 13, 40]
    assert "Steps: 4" in info["infotexts"][3] and "Steps: 3" in info["infotexts"][0]
    assert info["ignored_fields"] == []
    alone = ok(api.post("txt2img", json={**SMALL, "prompt": "a blue boat oil painting", "seed": 13}))

    def pixels(encoded: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))

    assert np.array_equal(pixels(body["images"][2]), pixels(alone["images"][0]))

    # A1111's older three arguments (no position) work too; a bad line is refused, naming it, and nothing runs.
    three = ok(api.post("txt2img", json={**payload, "script_args": [True, False, "a\nb"]}))
    assert json.loads(three["info"])["all_seeds"] == [40, 41]
    refused = api.post("txt2img", json={**payload, "script_args": [False, False, "start", "a\n--steps lots"]})
    assert refused.status_code == 422 and "prompt list line 2: --steps" in refused.text
    refused = api.post("txt2img", json={**payload, "script_args": ["a"]})
    assert refused.status_code == 422 and "script_args" in refused.text
    assert ok(api.get("scripts"))["txt2img"][0] == SCRIPT
    info = ok(api.get("script-info"))
    assert [(entry["name"], entry["is_img2img"]) for entry in info][:2] == [(SCRIPT, False), (SCRIPT, True)]
    assert [arg["label"] for arg in info[0]["args"]][-1] == "List of prompt inputs"
    other = ok(api.post("txt2img", json={**SMALL, "script_name": "x/y/z plot", "script_args": [1, 2]}))
    assert json.loads(other["info"])["ignored_fields"] == ["script_args", "script_name"]


def test_the_page_runs_a_list_into_one_gallery(page_url):  # noqa: F811
    client = _client(page_url)
    args = ("oil painting", "", "Euler a", "Automatic", 3, 7.0, 21, 64, 64, 1, 1)
    preview, progress, gallery, infotext = client.predict(
        *args,
        prompt_list=True,
        iterate_seed=True,
        prompt_position="end",
        prompt_list_text="a red lighthouse\n--prompt a blue boat --steps 4",
        api_name="/txt2img",
    )
    assert len(gallery) == 2
    assert [item["caption"] for item in gallery] == ["Seed 21", "Seed 22"]
    assert infotext.startswith("oil painting a red lighthouse\n")
    assert "2 prompts: 2 images in" in progress
    with pytest.raises(Exception, match="prompt list line 1: --steps"):
        client.predict(*args, prompt_list=True, prompt_list_text="--steps none", api_name="/txt2img")
    assert len(client.predict(*args, api_name="/txt2img")[2]) == 1  # the list off: the page's prompt alone


def test_a_list_that_fails_part_way_keeps_what_it_made(page_url, engine, monkeypatch):  # noqa: F811
    from engine import EngineError

    real, calls = engine.generate, []

    def failing_second(request, **kwargs):
        calls.append(request.prompt)
        if len(calls) == 2:
            raise EngineError("Generation failed: the second line broke")
        return real(request, **kwargs)

    monkeypatch.setattr(engine, "generate", failing_second)
    client = _client(page_url)
    args = ("", "", "Euler a", "Automatic", 3, 7.0, 21, 64, 64, 1, 1)
    job = client.submit(*args, prompt_list=True, prompt_list_text="a red lighthouse\na blue boat", api_name="/txt2img")
    with pytest.raises(Exception, match="the second line broke"):
        job.result()
    last = job.outputs()[-1]
    assert len(last[2]) == 1 and last[3].startswith("a red lighthouse\n")


def api_prompt_list(lines: str, **fields):
    """A /txt2img payload running A1111's "Prompts from file or textbox" over `lines`, at seed 2."""
    from ui.api import Txt2ImgRequest

    return Txt2ImgRequest(
        prompt="",
        seed=2,
        script_name="Prompts from file or textbox",
        script_args=[False, False, "start", lines],
        **fields,
    )


def test_an_interrupt_between_two_lines_of_an_api_prompt_list_stops_the_rest(engine):
    from ui.api import SdApi
    from ui.server import ServerSettings

    class InterruptedAfterTheFirstJob:
        def __getattr__(self, name):
            return getattr(engine, name)

        def generate(self, request, **kwargs):
            yield from engine.generate(request, **kwargs)
            sdapi.interrupt()  # the job has ended: no job runs at this moment

    sdapi = SdApi(InterruptedAfterTheFirstJob(), ServerSettings(save_images=False))
    payload = api_prompt_list("a red circle\na blue square\na green triangle", steps=3)
    assert len(json.loads(sdapi.txt2img(payload)["info"])["infotexts"]) == 1
    # The next request runs whole.
    engine_only = SdApi(engine, ServerSettings(save_images=False))
    assert len(json.loads(engine_only.txt2img(payload)["info"])["infotexts"]) == 3
