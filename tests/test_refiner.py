"""A1111's refiner: another model of the same kind takes over the sampling at a point of the noise schedule.

micro-purple (the micro model with its purple LoRA fused in) as the refiner of the micro model: taking over early it
turns a red circle purple, taking over late it leaves it red; from the start it draws exactly what micro-purple
draws alone, and at 1 it never takes over."""

from __future__ import annotations

import numpy as np
import pytest

from engine import Engine, GenerationRequest, InvalidRequestError
from engine.infotext import parse_infotext
from tests.test_hires_checkpoint import PURPLE, RED, centre_colour, nearer, pair_engine, run  # noqa: F401 - fixture

PROMPT = dict(prompt="a red circle on a white background", steps=12, seed=3)


def picture(engine: Engine, **fields) -> np.ndarray:
    result = list(engine.generate(GenerationRequest(**{**PROMPT, **fields})))[-1]
    return np.asarray(result.images[0]).astype(int)


def test_the_refiner_takes_over_where_the_schedule_says(pair_engine):  # noqa: F811 - the fixture imported above
    purple_alone = Engine(model="micro-purple", models_dir=pair_engine.models_dir)
    for sampler in ("Euler a", "DDIM"):  # a k-diffusion sampler and one that is not
        plain = picture(pair_engine, sampler_name=sampler)
        refined = dict(sampler_name=sampler, refiner_checkpoint="micro-purple")
        assert np.array_equal(picture(pair_engine, **refined, refiner_switch_at=1.0), plain), sampler
        assert np.array_equal(
            picture(pair_engine, **refined, refiner_switch_at=0.0), picture(purple_alone, sampler_name=sampler)
        ), sampler
    # Early, the refiner sets the colour; late, only details.
    assert nearer(
        centre_colour(picture(pair_engine, refiner_checkpoint="micro-purple", refiner_switch_at=0.2)), PURPLE, RED
    )
    assert nearer(
        centre_colour(picture(pair_engine, refiner_checkpoint="micro-purple", refiner_switch_at=0.8)), RED, PURPLE
    )
    assert pair_engine.model.name == "micro-shapes"


def test_its_infotext_names_it_and_reads_back_to_the_same_picture(pair_engine):  # noqa: F811
    result = list(
        pair_engine.generate(
            GenerationRequest(**PROMPT, batch_size=2, refiner_checkpoint="micro-purple", refiner_switch_at=0.5)
        )
    )[-1]
    purple = next(info for info in pair_engine.list_models() if info.name == "micro-purple")
    purple_title = pair_engine.registry.with_hash(purple).title
    assert f"Refiner: {purple_title}, Refiner switch at: 0.5" in result.infotexts[1]
    again = list(pair_engine.generate(parse_infotext(result.infotexts[1])))[-1]
    assert again.images[0].tobytes() == result.images[1].tobytes()
    # Never taking over, it is not written, as in A1111.
    never = list(
        pair_engine.generate(GenerationRequest(**PROMPT, refiner_checkpoint="micro-purple", refiner_switch_at=1))
    )
    assert "Refiner" not in never[-1].infotexts[0]


def test_with_hires_fix_the_refiner_joins_the_second_pass_only(pair_engine):  # noqa: F811
    hires = dict(enable_hr=True, hr_scale=1.0, hr_upscaler="Lanczos")
    # No second pass (denoising 0): nothing is refined.
    unrefined = picture(pair_engine, **hires, denoising_strength=0.0)
    assert np.array_equal(
        picture(pair_engine, **hires, denoising_strength=0.0, refiner_checkpoint="micro-purple", refiner_switch_at=0),
        unrefined,
    )
    second_pass = dict(hires, denoising_strength=0.8, refiner_checkpoint="micro-purple", refiner_switch_at=0.2)
    assert nearer(centre_colour(picture(pair_engine, **second_pass)), PURPLE, RED)


def test_img2img_and_inpaint_take_a_refiner(pair_engine):  # noqa: F811
    from PIL import Image

    red = Image.fromarray(picture(pair_engine).astype(np.uint8))
    img2img = dict(init_images=[red], denoising_strength=0.9, refiner_checkpoint="micro-purple", refiner_switch_at=0.1)
    assert nearer(centre_colour(picture(pair_engine, **img2img)), PURPLE, RED)
    # Inpainting with the refiner from the start is inpainting with the refiner's model.
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpaint = dict(init_images=[red], denoising_strength=0.9, mask=mask, mask_blur=0, inpaint_full_res=False)
    purple_alone = Engine(model="micro-purple", models_dir=pair_engine.models_dir)
    refined = picture(pair_engine, **inpaint, refiner_checkpoint="micro-purple", refiner_switch_at=0.0)
    assert np.array_equal(refined, picture(purple_alone, **inpaint))
    assert not np.array_equal(refined, picture(pair_engine, **inpaint))
    outside = np.asarray(mask) == 0
    assert np.array_equal(refined[outside], np.asarray(red).astype(int)[outside])


@pytest.mark.parametrize(
    ("fields", "allowed"),
    [
        ({"refiner_checkpoint": "no-such-model"}, "micro-purple"),
        ({"refiner_checkpoint": "micro-purple", "refiner_switch_at": 1.5}, "0.0 to 1.0"),
        ({"refiner_checkpoint": "micro-purple", "prompt": "a red circle AND a white background"}, "AND"),
    ],
)
def test_bad_refiners_are_refused_by_field(pair_engine, fields, allowed):  # noqa: F811
    with pytest.raises(InvalidRequestError) as refused:
        pair_engine.validate(GenerationRequest(**{**PROMPT, **fields}))
    assert refused.value.field.startswith("refiner") and allowed in refused.value.allowed


def test_a_refiner_of_another_kind_is_refused_when_it_loads_and_the_next_job_works(pair_engine):  # noqa: F811
    with pytest.raises(InvalidRequestError) as refused:
        list(pair_engine.generate(GenerationRequest(**PROMPT, refiner_checkpoint="tiny-sd")))
    assert refused.value.field == "refiner_checkpoint" and "micro" in refused.value.allowed
    assert picture(pair_engine).shape == (64, 64, 3)


def test_the_api_and_the_page_take_a_refiner_and_png_info_sends_it_back(pair_engine, tmp_path):  # noqa: F811
    import base64
    import io
    import json
    from types import SimpleNamespace

    import httpx
    from gradio_client import Client
    from PIL import Image

    from tests.test_browser import serve_page
    from ui.page import (
        NO_REFINER,
        ReadInfotext,
        _sampler_parameters_from_infotext,
        _second_model_choices,
        _send_png_info,
    )
    from ui.server import ServerSettings, launch

    purple = next(info for info in pair_engine.list_models() if info.name == "micro-purple")
    purple_title = pair_engine.registry.with_hash(purple).title
    assert (
        purple_title in _second_model_choices(pair_engine, NO_REFINER)
        and _second_model_choices(pair_engine, NO_REFINER)[0] == NO_REFINER
    )
    refiner = {"refiner_checkpoint": "micro-purple", "refiner_switch_at": 0.2}
    handle = launch(pair_engine, ServerSettings(host="127.0.0.1", port=0, api=True, outputs_dir=tmp_path, page=False))
    try:
        with httpx.Client(base_url=handle.url + "sdapi/v1/", timeout=120) as api:
            body = api.post("txt2img", json={**PROMPT, **refiner}).json()
            info = json.loads(body["info"])
            assert "refiner_checkpoint" not in info.get("ignored_fields", [])
            drawn = Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).convert("RGB")
            assert nearer(centre_colour(drawn), PURPLE, RED)
            refused = api.post("txt2img", json={**PROMPT, "refiner_checkpoint": "no-such-model"})
            assert refused.status_code == 422 and refused.json()["field"] == "refiner_checkpoint"
    finally:
        handle.close()

    demo, url = serve_page(pair_engine, SimpleNamespace(outputs_dir=tmp_path, save_images=False))
    try:
        settings = (PROMPT["prompt"], "", "Euler a", "Automatic", PROMPT["steps"], 7.0, PROMPT["seed"], 64, 64, 1, 1)
        _preview, _progress, gallery, infotext = Client(url, verbose=False).predict(
            *settings, refiner_checkpoint=purple_title, refiner_switch_at=0.2, api_name="/txt2img"
        )
    finally:
        demo.close()
    assert nearer(centre_colour(Image.open(gallery[0]["image"]).convert("RGB")), PURPLE, RED)
    assert f"Refiner: {purple_title}, Refiner switch at: 0.2" in infotext

    # PNG Info's Send picks it in the Refiner panel: the two values before the session settings (the SD VAE and the
    # sampler parameters) and the tab.
    after = 1 + len(_sampler_parameters_from_infotext(ReadInfotext.of(infotext))) + 1

    def refiner_sent(text: str, mode: str) -> list:
        return list(_send_png_info(None, text, target_mode=mode, engine=pair_engine)[-after - 2 : -after])

    assert refiner_sent(infotext, "txt2img") == [purple_title, 0.2]
    assert refiner_sent(infotext.split(", Refiner:")[0], "img2img") == [NO_REFINER, 0.8]
    assert ReadInfotext.of(infotext).request.refiner_switch_at == 0.2


def test_compare_has_refiner_and_switch_axes_whose_cells_match_single_runs(pair_engine):  # noqa: F811
    from engine.compare import Comparer, parse_axis, plan_grid

    base = GenerationRequest(**PROMPT)
    refiners = parse_axis("Refiner", "None, micro-purple", pair_engine)
    assert refiners.labels == ("None", "micro-purple") and refiners.values == ("", "micro-purple")
    switches = parse_axis("Refiner switch at", "0.2, 0.8", pair_engine)
    with pytest.raises(InvalidRequestError, match="a refiner"):
        plan_grid(base, [switches])
    with pytest.raises(InvalidRequestError, match="Hires. fix on"):
        plan_grid(base, [parse_axis("Hires checkpoint", "micro-purple", pair_engine)])
    with pytest.raises(InvalidRequestError, match="or None"):
        parse_axis("Refiner", "no-such-model", pair_engine)

    result = list(Comparer(pair_engine).run_grid(base, [refiners, switches]))[-1]
    assert [cell.cell.label for cell in result.cells] == [
        "Refiner: None, Refiner switch at: 0.2",
        "Refiner: micro-purple, Refiner switch at: 0.2",
        "Refiner: None, Refiner switch at: 0.8",
        "Refiner: micro-purple, Refiner switch at: 0.8",
    ]
    for cell in result.cells[1::2]:  # the refined cells (the others are plain jobs, checked in test_compare.py)
        alone = list(pair_engine.generate(cell.cell.request))[-1]
        assert np.array_equal(np.asarray(alone.images[0]), np.asarray(cell.image)), cell.cell.label
    assert nearer(centre_colour(result.cells[1].image), PURPLE, RED)
    assert nearer(centre_colour(result.cells[0].image), RED, PURPLE)


def test_send_to_img2img_carries_the_refiner(pair_engine, tmp_path):  # noqa: F811
    from ui.page import NO_REFINER, _send_result
    from ui.page_jobs import ResultView

    result = list(
        pair_engine.generate(GenerationRequest(**PROMPT, refiner_checkpoint="micro-purple", refiner_switch_at=0.3))
    )[-1]
    saved = tmp_path / "result.png"
    result.images[0].save(saved)
    view = ResultView(seeds=result.seeds, infotexts=result.infotexts)
    sent = _send_result([(str(saved), "caption")], view, target_mode="img2img")
    assert list(sent[-3:-1]) == [result.request.refiner_checkpoint, 0.3]
    assert result.request.refiner_checkpoint.startswith("micro-purple [")

    plain = list(pair_engine.generate(GenerationRequest(**PROMPT)))[-1]
    view = ResultView(seeds=plain.seeds, infotexts=plain.infotexts)
    assert list(_send_result([(str(saved), "")], view, target_mode="inpaint")[-3:-1]) == [NO_REFINER, 0.8]
