"""A1111's Checkpoint Merger: weighted sum, add difference and no interpolation, written as a new checkpoint.

Model B is the micro model with the shipped micro-purple LoRA fused in at full strength: B = A + D, so a weighted
sum at M is A + M*D, what the LoRA draws at weight M, and the merge can be checked against the pictures."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import engine.merge as merge_module
from engine import Engine, GenerationRequest, InvalidRequestError, MergeRequest
from engine.events import Waiting
from engine.presets import SHIPPED_MICRO_LORA
from engine.tiny_model import ensure_tiny_model
from tests.conftest import add_micro_and_micro_purple
from tests.test_browser import browser, open_page, serve_page  # noqa: F401 - fixture
from ui.page_jobs import describe_waiting

PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def merge_dir(tmp_path_factory):
    """A models folder with the micro model (A), micro-purple (B = A with the LoRA fused), the tiny model, a VAE
    and the LoRA."""
    root = tmp_path_factory.mktemp("merge-models")
    checkpoints = root / "Stable-diffusion"
    add_micro_and_micro_purple(root)
    (root / "Lora").mkdir()
    shutil.copy(SHIPPED_MICRO_LORA, root / "Lora" / SHIPPED_MICRO_LORA.name)
    # A VAE file: the micro VAE with its decoder's last convolution's bias moved.
    vae = load_file(str(checkpoints / "micro-shapes" / "vae" / "diffusion_pytorch_model.safetensors"))
    vae["decoder.conv_out.bias"] = vae["decoder.conv_out.bias"] + 0.25
    (root / "VAE").mkdir()
    save_file(vae, str(root / "VAE" / "brighter.safetensors"))
    ensure_tiny_model(root)
    return root


@pytest.fixture(scope="module")
def merge_engine(merge_dir):
    return Engine(model=str(merge_dir / "Stable-diffusion" / "micro-shapes"), models_dir=merge_dir)


def draw(engine: Engine, prompt: str = PROMPT, seed: int = 1) -> np.ndarray:
    result = list(engine.generate(GenerationRequest(prompt=prompt, seed=seed, steps=12)))[-1]
    return np.asarray(result.images[0]).astype(int)


def unet_tensors(engine: Engine, name: str) -> dict[str, torch.Tensor]:
    folder = engine.registry.checkpoints_dir / name / "unet"
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def test_a_weighted_sum_draws_what_the_lora_draws_at_that_weight(merge_engine):
    with_lora = draw(merge_engine, PROMPT + " <lora:micro-purple:0.6>")
    plain = draw(merge_engine)
    result = merge_engine.merge_checkpoints(
        MergeRequest(primary_model_name="micro-shapes", secondary_model_name="micro-purple", multiplier=0.6)
    )
    assert result.info.name == "0.4(micro-shapes) + 0.6(micro-purple)"  # A1111's name for it
    assert result.info.kind == "folder"  # the micro model is no SD 1.5: it stays a diffusers folder
    assert result.info.title in [info.title for info in merge_engine.list_models()]
    assert result.recipe["interp_method"] == "Weighted sum" and result.recipe["multiplier"] == 0.6
    merge_engine.load_model(result.info.name)
    try:
        merged = draw(merge_engine)
        assert merge_engine.model.family == "micro"  # A's declared family and preview factors came along
        assert merge_engine.loaded.latent_rgb is not None
    finally:
        merge_engine.load_model("micro-shapes")
    assert np.abs(merged - plain).mean() > 5  # the merge moved the picture...
    assert np.abs(merged - with_lora).max() <= 3  # ...exactly as far as the LoRA at 0.6 does
    recipe = json.loads((merge_engine.registry.checkpoints_dir / result.info.name / "merge_recipe.json").read_text())
    assert json.loads(recipe["sd_merge_recipe"])["secondary_model_hash"] == result.recipe["secondary_model_hash"]


def test_add_difference_and_weighted_sum_give_a1111s_sums(merge_engine):
    a, b = unet_tensors(merge_engine, "micro-shapes"), unet_tensors(merge_engine, "micro-purple")
    key = next(name for name in a if not torch.equal(a[name], b[name]))
    # A + 1 * (B - A) is B; A + 0.5 * (B - B) is A.
    merge_engine.merge_checkpoints(
        MergeRequest(
            primary_model_name="micro-shapes",
            secondary_model_name="micro-purple",
            tertiary_model_name="micro-shapes",
            interp_method="Add difference",
            multiplier=1.0,
            custom_name="plus-difference",
        )
    )
    # A is stored in half precision, so the result is too, as in A1111: B to half precision's rounding.
    merged = unet_tensors(merge_engine, "plus-difference")[key]
    assert a[key].dtype == merged.dtype == torch.float16
    torch.testing.assert_close(merged, b[key].half(), rtol=0, atol=1e-3)
    result = merge_engine.merge_checkpoints(
        MergeRequest(
            primary_model_name="micro-shapes",
            secondary_model_name="micro-purple",
            tertiary_model_name="micro-purple",
            interp_method="Add difference",
            multiplier=0.5,
        )
    )
    assert result.info.name == "micro-shapes + 0.5(micro-purple - micro-purple)"
    assert torch.equal(unet_tensors(merge_engine, result.info.name)[key], a[key])
    merge_engine.merge_checkpoints(
        MergeRequest(
            primary_model_name="micro-purple", secondary_model_name="micro-shapes", multiplier=0.25, custom_name="q"
        )
    )
    # B as A: stored in float32, so the result is float32.
    assert b[key].dtype == torch.float32
    torch.testing.assert_close(unet_tensors(merge_engine, "q")[key], 0.75 * b[key] + 0.25 * a[key].float())


def test_no_interpolation_bakes_in_a_vae_and_halves(merge_engine, merge_dir):
    result = merge_engine.merge_checkpoints(
        MergeRequest(
            primary_model_name="micro-shapes",
            interp_method="No interpolation",
            bake_in_vae="brighter",
            save_as_half=True,
            custom_name="micro-brighter",
        )
    )
    assert result.merged_tensors == 0
    folder = merge_engine.registry.checkpoints_dir / "micro-brighter"
    vae = load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    baked = load_file(str(merge_dir / "VAE" / "brighter.safetensors"))
    assert vae["decoder.conv_out.bias"].dtype == torch.float16
    torch.testing.assert_close(vae["decoder.conv_out.bias"], baked["decoder.conv_out.bias"].half(), atol=0, rtol=0)
    assert unet_tensors(merge_engine, "micro-brighter")["conv_in.weight"].dtype == torch.float16


def test_an_sd1_layout_merge_is_one_a1111_file_with_the_recipe(merge_engine):
    result = merge_engine.merge_checkpoints(
        MergeRequest(primary_model_name="tiny-sd", secondary_model_name="tiny-sd", multiplier=0.5)
    )
    path = merge_engine.registry.checkpoints_dir / "0.5(tiny-sd) + 0.5(tiny-sd).safetensors"
    assert result.info.kind == "single_file" and result.info.path == str(path)
    with safe_open(str(path), "pt") as opened:
        metadata = opened.metadata()
        assert "model.diffusion_model.input_blocks.0.0.weight" in opened.keys()
    assert metadata["format"] == "pt"
    assert json.loads(metadata["sd_merge_recipe"])["interp_method"] == "Weighted sum"
    assert len(json.loads(metadata["sd_merge_models"])) == 1  # A and B are one model
    merge_engine.load_model(result.info.name)
    try:
        assert draw(merge_engine).shape[2] == 3
    finally:
        merge_engine.load_model("micro-shapes")


def test_merging_shows_in_progress(merge_engine, monkeypatch):
    seen = []
    real = merge_module.merge_tensor

    def recording(*args):
        seen.append(merge_engine.progress())
        return real(*args)

    monkeypatch.setattr(merge_module, "merge_tensor", recording)
    merge_engine.merge_checkpoints(
        MergeRequest(primary_model_name="micro-shapes", secondary_model_name="micro-purple", custom_name="watched")
    )
    assert all(state.running and state.mode == "merge" for state in seen)
    assert seen[-1].total > 500 and 0 < seen[0].step < seen[-1].step <= seen[-1].total
    assert not merge_engine.progress().running
    waiting = describe_waiting(Waiting(ahead=seen[-1], job_id=0))
    assert waiting.startswith(f"Waiting for a checkpoint merge to finish (tensor {seen[-1].step}/{seen[-1].total}")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"secondary_model_name": ""}, "secondary_model_name"),
        ({"secondary_model_name": "no-such-model"}, "secondary_model_name"),
        ({"interp_method": "Add difference"}, "tertiary_model_name"),
        ({"interp_method": "Sum"}, "interp_method"),
        ({"multiplier": 1.5}, "multiplier"),
        ({"multiplier": "lots"}, "multiplier"),
        ({"custom_name": "../outside"}, "custom_name"),
        ({"custom_name": "micro-purple"}, "custom_name"),  # a model of that name exists: nothing is overwritten
        ({"bake_in_vae": "no-such-vae"}, "bake_in_vae"),
        ({"secondary_model_name": "tiny-sd"}, "secondary_model_name"),  # another architecture
        ({"checkpoint_format": "safetensors"}, "checkpoint_format"),  # the micro model has no one-file layout
        ({"checkpoint_format": "ckpt"}, "checkpoint_format"),
    ],
)
def test_bad_merges_are_refused_by_field_and_write_nothing(merge_engine, fields, field):
    before = sorted(path.name for path in merge_engine.registry.checkpoints_dir.iterdir())
    request = MergeRequest(primary_model_name="micro-shapes", secondary_model_name="micro-purple", custom_name="new")
    with pytest.raises(InvalidRequestError) as refused:
        merge_engine.merge_checkpoints(MergeRequest(**{**vars(request), **fields}))
    assert refused.value.field == field
    assert sorted(path.name for path in merge_engine.registry.checkpoints_dir.iterdir()) == before
    assert not merge_engine.progress().running


@pytest.fixture(scope="module")
def merge_url(merge_engine, tmp_path_factory):
    demo, url = serve_page(merge_engine, SimpleNamespace(outputs_dir=tmp_path_factory.mktemp("out"), save_images=False))
    yield url
    demo.close()


@pytest.fixture(scope="module")
def merge_page(browser, merge_url):  # noqa: F811 - the fixture imported above
    context, page = open_page(browser, merge_url)
    yield page
    context.close()


def pick(page, dropdown: str, option: str) -> None:
    page.click(f"#{dropdown} input")
    page.locator("ul[role='listbox'] li", has_text=option).first.click()


def test_the_merger_tab_writes_a_model_the_checkpoint_list_then_offers(merge_page, merge_engine, artifacts_dir):
    page = merge_page
    page.get_by_role("tab", name="Checkpoint Merger").click()
    pick(page, "merge_primary", "micro-shapes")
    pick(page, "merge_secondary", "micro-purple")
    page.fill("#merge_custom_name textarea", "from-the-page")
    page.click("#merge_run")
    page.wait_for_function("document.querySelector('#merge_result').innerText.includes('Checkpoint saved')")
    assert "from-the-page [" in page.inner_text("#merge_result")
    assert (merge_engine.registry.checkpoints_dir / "from-the-page" / "model_index.json").is_file()
    page.screenshot(path=str(artifacts_dir / "page_merge.png"), full_page=True)
    # The checkpoint list at the top has it without a refresh.
    page.click("#model_dropdown input")
    page.locator("ul[role='listbox'] li", has_text="from-the-page").first.wait_for()
    page.keyboard.press("Escape")
    # A refused merge says why, and the tab keeps working.
    page.fill("#merge_custom_name textarea", "from-the-page")
    page.click("#merge_run")
    page.get_by_text("custom_name: got 'from-the-page'").first.wait_for()


def test_a_merge_stops_at_its_next_tensor_and_writes_nothing(merge_engine, monkeypatch):
    """A1111's Interrupt (engine.interrupt(), the API's /interrupt) and the Merger tab's Stop (the session's jobs)
    stop a running merge; nothing is written, and the next merge runs."""
    from engine import TaskStopped
    from engine import merge as merge_module
    from ui.page_jobs import PageSession
    from ui.page_merge import run_merge

    merged = []
    real_merge = merge_module.merge_tensor

    def merging(*args, stop):
        merged.append(1)
        if len(merged) == 5:
            stop()
        return real_merge(*args)

    request = MergeRequest(primary_model_name="micro-shapes", secondary_model_name="micro-purple", custom_name="halt")
    monkeypatch.setattr(merge_module, "merge_tensor", lambda *args: merging(*args, stop=merge_engine.interrupt))
    with pytest.raises(TaskStopped, match=r"Merge stopped after 5 of \d+ tensors; nothing was written"):
        merge_engine.merge_checkpoints(request)
    assert not (merge_engine.registry.checkpoints_dir / "halt").exists() and not merge_engine.progress().running
    # The page's Stop reaches the merge its session started.
    session, merged[:] = PageSession(), []
    monkeypatch.setattr(merge_module, "merge_tensor", lambda *args: merging(*args, stop=session.stop))
    args = ("micro-shapes", "micro-purple", None, "Weighted sum", 0.5, False, "halt", "Automatic", "None", True)
    text, *_ = run_merge(merge_engine, session, *args, model_titles=list)
    assert text.startswith("Merge stopped after 5 of") and not session.running
    assert not (merge_engine.registry.checkpoints_dir / "halt").exists()
    monkeypatch.setattr(merge_module, "merge_tensor", real_merge)
    # Stop while the click waits in the queue reaches it through its ticket: it does not start.
    ticket = session.register()
    session.stop()
    text, *_ = run_merge(merge_engine, session, *args, ticket, model_titles=list)
    assert text == "Merge stopped before it started; nothing was written." and not session.running
    assert merge_engine.merge_checkpoints(request).info.name == "halt"


def test_gradio_client_merges_by_model_name(merge_url, merge_engine):
    from gradio_client import Client

    client = Client(merge_url, verbose=False)
    args = ("micro-shapes", "micro-purple", None, "Weighted sum", 0.5, False, "by-client", "Automatic", "None", True)
    text, *_ = client.predict(*args, api_name="/merge")
    assert "Checkpoint saved to" in text and "by-client [" in text
    assert (merge_engine.registry.checkpoints_dir / "by-client" / "model_index.json").is_file()
    with pytest.raises(Exception, match="secondary_model_name: got 'no-such-model'"):
        client.predict("micro-shapes", "no-such-model", *args[2:6], "other", *args[7:], api_name="/merge")


def test_the_api_runs_a_request_on_its_override_checkpoint_and_restores_the_one_before(merge_engine, tmp_path):
    """Not the merger's own, but this folder has the two models it needs: A1111's per-request model switch."""
    import base64
    import io

    import httpx
    from PIL import Image

    from ui.server import ServerSettings, launch

    handle = launch(merge_engine, ServerSettings(host="127.0.0.1", port=0, api=True, outputs_dir=tmp_path, page=False))
    payload = {"prompt": PROMPT, "seed": 2, "steps": 8}

    def picture(body: dict) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"][0]))))

    try:
        with httpx.Client(base_url=handle.url + "sdapi/v1/", timeout=120) as api:
            override = {**payload, "override_settings": {"sd_model_checkpoint": "micro-purple"}}
            body = api.post("txt2img", json=override).json()
            info = json.loads(body["info"])
            assert "Model: micro-purple" in info["infotexts"][0] and info["ignored_fields"] == []
            assert merge_engine.model.name == "micro-shapes"  # restored afterwards, as A1111 does by default
            kept = api.post("txt2img", json={**override, "override_settings_restore_afterwards": False}).json()
            assert merge_engine.model.name == "micro-purple"
            assert np.array_equal(picture(kept), picture(body))
            assert np.array_equal(picture(api.post("txt2img", json=payload).json()), picture(body))
            refused = api.post("txt2img", json={**payload, "override_settings": {"sd_model_checkpoint": "nope"}})
            assert refused.status_code == 422 and refused.json()["field"] == "override_settings.sd_model_checkpoint"
            assert merge_engine.model.name == "micro-purple"  # a refused switch keeps the model there is
    finally:
        merge_engine.load_model("micro-shapes")
        handle.close()
