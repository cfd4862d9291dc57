"""A1111's "Hires checkpoint": the hires fix's second pass runs on another model of the same kind.

micro-purple is the micro model with its purple LoRA fused in: a hires pass on it, at a high denoising strength,
turns the first pass's red circle purple, where the same checkpoint keeps it red."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from engine import Engine, GenerationRequest, InvalidRequestError, Result
from engine.infotext import parse_infotext
from tests.conftest import add_micro_and_micro_purple

PURPLE, RED = np.array([128, 0, 128]), np.array([255, 0, 0])
HIRES = dict(
    prompt="a red circle on a white background",
    steps=12,
    enable_hr=True,
    hr_scale=1.0,
    hr_upscaler="Lanczos",
    denoising_strength=0.8,
)


@pytest.fixture(scope="module")
def pair_engine(tmp_path_factory, models_dir):
    root = tmp_path_factory.mktemp("hires-checkpoint-models")
    add_micro_and_micro_purple(root)
    shutil.copytree(models_dir / "Stable-diffusion" / "tiny-sd", root / "Stable-diffusion" / "tiny-sd")
    return Engine(model="micro-shapes", models_dir=root)


def run(engine: Engine, **fields) -> Result:
    result = list(engine.generate(GenerationRequest(**{**HIRES, **fields})))[-1]
    assert isinstance(result, Result)
    return result


def centre_colour(image) -> np.ndarray:
    """The mean colour of the middle of the picture, where the prompt's circle is."""
    return np.asarray(image).astype(int)[26:38, 26:38].reshape(-1, 3).mean(axis=0)


def nearer(colour: np.ndarray, one: np.ndarray, other: np.ndarray) -> bool:
    return np.abs(colour - one).sum() < np.abs(colour - other).sum()


def test_the_hires_pass_runs_on_the_hires_checkpoint(pair_engine):
    for seed in (3, 4):
        same = run(pair_engine, seed=seed)
        other = run(pair_engine, seed=seed, hr_checkpoint_name="micro-purple")
        assert nearer(centre_colour(same.images[0]), RED, PURPLE), f"seed {seed}: the micro model draws red"
        assert nearer(centre_colour(other.images[0]), PURPLE, RED), f"seed {seed}: micro-purple repaints it purple"
        # The first pass stays the loaded model's: the infotext names both, as A1111 writes it.
        purple_title = next(info.title for info in pair_engine.list_models() if info.name == "micro-purple")
        assert "Model: micro-shapes" in other.infotexts[0]
        assert f"Hires checkpoint: {purple_title}" in other.infotexts[0]
        assert "Hires checkpoint" not in same.infotexts[0]
    assert pair_engine.model.name == "micro-shapes"


def test_its_infotext_reads_back_to_the_same_picture_and_a_batch_matches_its_seeds_alone(pair_engine):
    batch = run(pair_engine, seed=10, batch_size=2, hr_checkpoint_name="micro-purple")
    again = list(pair_engine.generate(parse_infotext(batch.infotexts[1])))[-1]
    assert again.images[0].tobytes() == batch.images[1].tobytes()
    alone = run(pair_engine, seed=11, hr_checkpoint_name="micro-purple")
    assert alone.images[0].tobytes() == batch.images[1].tobytes()


def test_names_for_the_loaded_model_mean_the_same_checkpoint(pair_engine):
    same = run(pair_engine, seed=5)
    for name in ("Use same checkpoint", "", pair_engine.model.title, "micro-shapes"):
        checked = pair_engine.validate(GenerationRequest(**HIRES, seed=5, hr_checkpoint_name=name))
        assert checked.hr_checkpoint_name == ""
    assert run(pair_engine, seed=5, hr_checkpoint_name="micro-shapes").images[0].tobytes() == same.images[0].tobytes()


def test_an_unknown_or_unfitting_checkpoint_is_refused_by_name_and_the_next_job_works(pair_engine):
    with pytest.raises(InvalidRequestError) as unknown:
        pair_engine.validate(GenerationRequest(**HIRES, hr_checkpoint_name="no-such-model"))
    assert unknown.value.field == "hr_checkpoint_name" and "micro-purple" in unknown.value.allowed

    # The tiny model's latents and prompt embeddings do not fit the micro model's: refused when it loads.
    with pytest.raises(InvalidRequestError) as unfitting:
        run(pair_engine, seed=1, hr_checkpoint_name="tiny-sd")
    assert unfitting.value.field == "hr_checkpoint_name" and "micro" in unfitting.value.allowed
    assert run(pair_engine, seed=1).images


def test_the_api_takes_hr_checkpoint_name_as_a1111_does(pair_engine, tmp_path):
    import base64
    import io
    import json

    import httpx

    from ui.server import ServerSettings, launch

    handle = launch(pair_engine, ServerSettings(host="127.0.0.1", port=0, api=True, outputs_dir=tmp_path, page=False))
    try:
        with httpx.Client(base_url=handle.url + "sdapi/v1/", timeout=120) as api:
            body = api.post("txt2img", json={**HIRES, "seed": 3, "hr_checkpoint_name": "micro-purple"}).json()
            picture = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
            assert nearer(centre_colour(picture.convert("RGB")), PURPLE, RED)
            info = json.loads(body["info"])
            assert "ignored_fields" not in info or "hr_checkpoint_name" not in info["ignored_fields"]
            assert "Hires checkpoint: micro-purple [" in info["infotexts"][0]

            refused = api.post("txt2img", json={**HIRES, "hr_checkpoint_name": "no-such-model"})
            assert refused.status_code == 422 and refused.json()["field"] == "hr_checkpoint_name"
    finally:
        handle.close()


def test_the_page_takes_a_hires_checkpoint_and_png_info_sends_it_back(pair_engine, tmp_path):
    from types import SimpleNamespace

    from gradio_client import Client

    from tests.test_browser import serve_page
    from ui.page import SAME_CHECKPOINT, ReadInfotext, _hires_settings_from_infotext, _second_model_choices

    purple_title = next(
        title for title in _second_model_choices(pair_engine, SAME_CHECKPOINT) if title.startswith("micro-purple [")
    )
    assert _second_model_choices(pair_engine, SAME_CHECKPOINT)[0] == SAME_CHECKPOINT
    demo, url = serve_page(pair_engine, SimpleNamespace(outputs_dir=tmp_path, save_images=False))
    try:
        client = Client(url, verbose=False)
        settings = (HIRES["prompt"], "", "Euler a", "Automatic", HIRES["steps"], 7.0, 3, 64, 64, 1, 1)
        hires = dict(enable_hr=True, hr_scale=1.0, hr_upscaler="Lanczos", denoising_strength=0.8)
        _preview, _progress, gallery, infotext = client.predict(
            *settings, **hires, hr_checkpoint_name=purple_title, api_name="/txt2img"
        )
    finally:
        demo.close()
    picture = Image.open(gallery[0]["image"]).convert("RGB")
    assert nearer(centre_colour(picture), PURPLE, RED)
    assert f"Hires checkpoint: {purple_title}" in infotext

    # PNG Info's Send to txt2img picks it in the Hires checkpoint list (the last of the panel's values).
    assert _hires_settings_from_infotext(ReadInfotext.of(infotext), pair_engine)[-1] == purple_title
    elsewhere = infotext.replace(purple_title, "some-model-not-here [0123456789]")
    assert _hires_settings_from_infotext(ReadInfotext.of(elsewhere), pair_engine)[-1] == SAME_CHECKPOINT
