"""REST: the prompt settings A1111 clients send (override_settings.emphasis, /options) and prompt_syntax."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from PIL import Image

from ui.server import ServerSettings, launch

SMALL = {"steps": 3, "width": 64, "height": 64, "seed": 5}


@pytest.fixture(scope="module")
def api(engine, tmp_path_factory):
    settings = ServerSettings(
        host="127.0.0.1", port=0, api=True, outputs_dir=tmp_path_factory.mktemp("outputs"), page=False
    )
    handle = launch(engine, settings)
    with httpx.Client(base_url=handle.url + "sdapi/v1/", timeout=120) as client:
        yield client
    handle.close()


def txt2img(api, **payload) -> httpx.Response:
    return api.post("txt2img", json={**SMALL, **payload})


def infotext(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return json.loads(response.json()["info"])["infotexts"][0]


def pixels(response: httpx.Response) -> bytes:
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    return image.convert("RGB").tobytes()


def test_override_settings_emphasis_is_applied_and_recorded(api):
    weighted = {"prompt": "a (red:1.6) fox"}
    original = txt2img(api, **weighted)
    ignore = txt2img(api, **weighted, override_settings={"emphasis": "Ignore"})
    plain = txt2img(api, prompt="a red fox")
    assert "Emphasis: Ignore" in infotext(ignore)
    assert "override_settings.emphasis" not in json.loads(ignore.json()["info"]).get("ignored_fields", [])
    # Ignore drops the weight: the same picture as the unweighted prompt, unlike Original.
    assert pixels(ignore) == pixels(plain)
    assert pixels(original) != pixels(plain)


def test_emphasis_option_is_the_default_until_changed_back(api):
    assert api.get("options").json()["emphasis"] == "Original"
    assert api.post("options", json={"emphasis": "No norm"}).status_code == 200
    try:
        assert "Emphasis: No norm" in infotext(txt2img(api, prompt="(a:1.2) b"))
    finally:
        api.post("options", json={"emphasis": "Original"})
    bad = api.post("options", json={"emphasis": "loud"})
    assert bad.status_code == 422 and "emphasis" in bad.text
    assert api.get("options").json()["emphasis"] == "Original"


def test_prompt_syntax_field_and_bad_values(api):
    assert "Prompt syntax: compel" in infotext(txt2img(api, prompt="a red++ fox", prompt_syntax="compel"))
    bad = txt2img(api, prompt="x", prompt_syntax="midjourney")
    assert bad.status_code == 422 and "prompt_syntax" in bad.text
    composed = txt2img(api, prompt="a cat AND a dog :0.5")
    assert composed.status_code == 200 and infotext(composed).startswith("a cat AND a dog :0.5\n")
    assert txt2img(api, prompt="a [cat:dog:2]").status_code == 200
