"""A1111's SD VAE: files from models/VAE (or beside the checkpoint) decoding instead of the model's own.

The VAEs here are the model's own with one change: the decoder's last bias raised by 0.6, so every picture
it decodes is brighter. Each file format must give the same brighter picture; Automatic and None must pick
what A1111 picks; a VAE of another model is refused by name and the next job is as if it never happened.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine import Engine, GenerationRequest, InvalidRequestError, Result
from engine.checkpoint import VAE_PREFIX, save_single_file, vae_to_ldm
from engine.infotext import parse_infotext, parse_infotext_params
from engine.presets import SHIPPED_MICRO_MODEL
from engine.vae import near_checkpoint

REQUEST = {"prompt": "a red circle on a blue background", "steps": 8, "seed": 4, "sampler_name": "Euler"}


def brighter_state(vae) -> dict[str, torch.Tensor]:
    state = {name: tensor.detach().clone().contiguous() for name, tensor in vae.state_dict().items()}
    state["decoder.conv_out.bias"] += 0.6
    return state


@pytest.fixture(scope="module")
def vae_models_dir(tmp_path_factory):
    """A models folder whose VAE/ holds the micro model's VAE, brightened, in every format A1111 users have."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("vae-models")
    folder = root / "VAE"
    folder.mkdir()
    reference = AutoencoderKL.from_pretrained(str(SHIPPED_MICRO_MODEL / "vae"))
    state = brighter_state(reference)
    original = {name: tensor.contiguous() for name, tensor in vae_to_ldm(state, reference.config).items()}
    save_file(original, str(folder / "bright.safetensors"))
    save_file({VAE_PREFIX + name: tensor for name, tensor in original.items()}, str(folder / "prefixed.safetensors"))
    save_file(state, str(folder / "diffusers-names.safetensors"))
    training_checkpoint = {
        "state_dict": {**original, "loss.logvar": torch.zeros(()), "model_ema.decay": torch.ones(())}
    }
    torch.save(training_checkpoint, folder / "kl-f8.pt")
    bright = AutoencoderKL.from_config(reference.config)
    bright.load_state_dict(state)
    bright.save_pretrained(folder / "bright-folder")
    from engine.tiny_model import build_tiny_pipeline

    save_file(
        {k: v.contiguous() for k, v in build_tiny_pipeline().vae.state_dict().items()}, str(folder / "tiny.safetensors")
    )
    return root


@pytest.fixture(scope="module")
def vae_engine(vae_models_dir):
    return Engine(model=str(SHIPPED_MICRO_MODEL), models_dir=vae_models_dir)


def generate(engine, **fields) -> Result:
    result = list(engine.generate(GenerationRequest(**{**REQUEST, **fields})))[-1]
    assert isinstance(result, Result), result
    return result


def brightness(result: Result) -> float:
    return float(np.asarray(result.images[0], dtype=np.float32).mean())


def test_the_vae_folder_lists_files_and_diffusers_folders(vae_engine):
    assert list(vae_engine.list_vaes()) == [
        "bright-folder",
        "bright.safetensors",
        "diffusers-names.safetensors",
        "kl-f8.pt",
        "prefixed.safetensors",
        "tiny.safetensors",
    ]


def test_every_format_decodes_the_same_brighter_picture(vae_engine):
    own = generate(vae_engine)
    assert generate(vae_engine, sd_vae="None").images[0].tobytes() == own.images[0].tobytes()
    assert generate(vae_engine, sd_vae="Automatic").images[0].tobytes() == own.images[0].tobytes()
    bright = generate(vae_engine, sd_vae="bright.safetensors")
    assert brightness(bright) > brightness(own) + 30
    for name in ("prefixed.safetensors", "diffusers-names.safetensors", "kl-f8.pt", "bright-folder", "BRIGHT"):
        assert generate(vae_engine, sd_vae=name).images[0].tobytes() == bright.images[0].tobytes(), name


def test_the_infotext_names_the_vae_and_brings_it_back(vae_engine, vae_models_dir):
    import hashlib

    result = generate(vae_engine, sd_vae="bright")
    params = parse_infotext_params(result.infotexts[0])
    digest = hashlib.sha256((vae_models_dir / "VAE" / "bright.safetensors").read_bytes()).hexdigest()
    assert (params["VAE"], params["VAE hash"]) == ("bright.safetensors", digest[:10])
    again = generate(
        vae_engine, **{k: v for k, v in vars(parse_infotext(result.infotexts[0])).items() if k != "extra_params"}
    )
    assert again.images[0].tobytes() == result.images[0].tobytes()
    assert "VAE" not in generate(vae_engine).infotexts[0]


def test_img2img_encodes_with_the_chosen_vae_too(vae_engine):
    own = generate(vae_engine)
    fields = {"init_images": [own.images[0]], "denoising_strength": 0.3}
    assert (
        generate(vae_engine, sd_vae="bright", **fields).images[0].tobytes()
        != generate(vae_engine, **fields).images[0].tobytes()
    )


def test_an_unknown_or_misfit_vae_is_refused_by_name_and_the_next_job_is_unchanged(vae_engine):
    with pytest.raises(InvalidRequestError) as unknown:
        vae_engine.validate(GenerationRequest(prompt="x", sd_vae="vae-ft-mse-840000-ema-pruned.safetensors"))
    assert unknown.value.field == "sd_vae" and "bright.safetensors" in str(unknown.value)
    before = generate(vae_engine)
    with pytest.raises(InvalidRequestError) as misfit:
        generate(vae_engine, sd_vae="tiny.safetensors")
    assert misfit.value.field == "sd_vae"
    assert "VAE tiny.safetensors does not fit this model: it has no tensor for encoder.down_blocks" in str(misfit.value)
    assert generate(vae_engine).images[0].tobytes() == before.images[0].tobytes()


def test_automatic_takes_the_vae_named_after_a_single_file_checkpoint(tmp_path, engine):
    from engine.tiny_model import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    checkpoint = save_single_file(pipe, tmp_path / "Stable-diffusion" / "tiny-sd.safetensors")
    assert near_checkpoint(checkpoint) is None
    state = brighter_state(pipe.vae)
    save_file(vae_to_ldm(state, pipe.vae.config), str(checkpoint.with_name("tiny-sd.vae.safetensors")))
    assert near_checkpoint(checkpoint).name == "tiny-sd.vae.safetensors"
    tiny = Engine(model=str(checkpoint), models_dir=tmp_path)
    fields = {"prompt": "a lighthouse", "steps": 3, "seed": 1, "width": 64, "height": 64}
    automatic = generate(tiny, **fields)
    own = generate(tiny, sd_vae="None", **fields)
    assert brightness(automatic) > brightness(own) + 30
    assert "VAE: tiny-sd.vae.safetensors" in automatic.infotexts[0] and "VAE" not in own.infotexts[0]


def test_the_api_lists_vaes_and_takes_sd_vae_from_override_settings_or_options(vae_engine, tmp_path):
    from ui.server import ServerSettings, launch

    handle = launch(vae_engine, ServerSettings(host="127.0.0.1", port=0, api=True, outputs_dir=tmp_path, page=False))
    try:
        with httpx.Client(base_url=handle.url + "sdapi/v1/", timeout=120) as api:
            listed = api.get("sd-vae").json()
            assert {
                "model_name": "bright.safetensors",
                "filename": str(vae_engine.list_vaes()["bright.safetensors"].path),
            } in listed
            payload = {**REQUEST, "override_settings": {"sd_vae": "bright.safetensors"}}
            info = json.loads(api.post("txt2img", json=payload).json()["info"])
            assert info["sd_vae_name"] == "bright.safetensors" and len(info["sd_vae_hash"]) == 10
            assert info["ignored_fields"] == []
            assert api.post("options", json={"sd_vae": "kl-f8"}).status_code == 200
            assert api.get("options").json()["sd_vae"] == "kl-f8.pt"
            info = json.loads(api.post("txt2img", json=REQUEST).json()["info"])
            assert info["sd_vae_name"] == "kl-f8.pt"
            refused = api.post("options", json={"sd_vae": "nope"})
            assert refused.status_code == 422 and refused.json()["field"] == "sd_vae"
            refused = api.post("txt2img", json={**REQUEST, "override_settings": {"sd_vae": "nope"}})
            assert refused.status_code == 422 and "bright.safetensors" in refused.json()["detail"]
            api.post("options", json={"sd_vae": "Automatic"})
    finally:
        handle.close()


def test_the_page_vae_choice_belongs_to_one_session(vae_engine, tmp_path):
    from types import SimpleNamespace

    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from ui.page import build_page

    demo = build_page(vae_engine, SimpleNamespace(outputs_dir=tmp_path, save_images=False, models_dir=None))
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        user_a, user_b = Client(url, verbose=False), Client(url, verbose=False)
        user_a.predict("bright.safetensors", api_name="/set_vae")
        args = (REQUEST["prompt"], "", "Euler", "Automatic", 8, 7.0, 4, 64, 64, 1, 1)
        assert "VAE: bright.safetensors" in user_a.predict(*args, api_name="/txt2img")[3]
        assert "VAE" not in user_b.predict(*args, api_name="/txt2img")[3]
        # Gradio refuses a value the list does not hold, naming the choices.
        with pytest.raises(AppError, match="nope.*bright.safetensors"):
            user_b.predict("nope", api_name="/set_vae")
    finally:
        demo.close()


def test_in_the_browser_the_vae_list_and_png_info_bring_a_vae_back(vae_engine, tmp_path):
    from types import SimpleNamespace

    from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, open_page
    from ui.page import build_page

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make chromium` to install Debian's Chromium for the browser tests")
    from playwright.sync_api import sync_playwright

    demo = build_page(vae_engine, SimpleNamespace(outputs_dir=tmp_path, save_images=False, models_dir=None))
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            _context, page = open_page(browser, url)

            def choose_vae(name: str) -> None:
                page.click("#sd_vae input")
                page.locator("ul[role='listbox'] li", has_text=name).first.click()
                page.wait_for_function(f"document.querySelector('#sd_vae input').value === {name!r}")

            page.fill("#txt2img_prompt textarea", REQUEST["prompt"])
            choose_vae("bright.safetensors")
            page.click("#txt2img_generate")
            page.wait_for_function("document.querySelector('#txt2img_infotext textarea').value.includes('VAE: ')")
            assert "VAE: bright.safetensors" in page.input_value("#txt2img_infotext textarea")
            png_path = tmp_path / "bright.png"
            png_path.write_bytes(page.request.get(page.get_attribute("#txt2img_gallery img", "src")).body())

            choose_vae("None")
            page.get_by_role("tab", name="PNG Info").click()
            page.set_input_files("#pnginfo_image input[type=file]", str(png_path))
            page.wait_for_function("document.querySelector('#pnginfo_text textarea').value.includes('VAE: ')")
            page.click("#pnginfo_send_to_txt2img")
            page.wait_for_function("document.querySelector('#sd_vae input').value === 'bright.safetensors'")
            # The session's jobs use it again.
            page.fill("#txt2img_prompt textarea", "a green square on a white background")
            page.click("#txt2img_generate")
            page.wait_for_function(
                "document.querySelector('#txt2img_infotext textarea').value.startsWith('a green square')"
            )
            assert "VAE: bright.safetensors" in page.input_value("#txt2img_infotext textarea")
            browser.close()
    finally:
        demo.close()


def test_vae_path_decodes_every_job_with_its_vae_whatever_sd_vae_says(vae_models_dir, tmp_path):
    """A1111's --vae-path: a VAE file anywhere (not only in the VAE folder) for every job."""
    import shutil

    from ui.server import parse_args

    outside = tmp_path / "elsewhere" / "mine.safetensors"
    outside.parent.mkdir()
    shutil.copy(vae_models_dir / "VAE" / "bright.safetensors", outside)
    settings = parse_args(["--vae-path", str(outside), "--models-dir", str(vae_models_dir)], environ={})
    assert settings.vae_path == outside
    forced = Engine(model=str(SHIPPED_MICRO_MODEL), models_dir=vae_models_dir, vae_path=settings.vae_path)
    usual = Engine(model=str(SHIPPED_MICRO_MODEL), models_dir=vae_models_dir)
    bright = generate(usual, sd_vae="bright.safetensors").images[0].tobytes()
    for choice in ("None", "Automatic", "tiny.safetensors"):
        result = generate(forced, sd_vae=choice)
        assert result.images[0].tobytes() == bright, choice
        assert parse_infotext_params(result.infotexts[0])["VAE"] == "mine.safetensors"
    with pytest.raises(SystemExit):
        parse_args(["--vae-path", str(tmp_path / "missing.safetensors")], environ={})
