"""Inpainting models (sd-v1-5-inpainting and its kind): a UNet that also takes the mask and the masked picture,
9 input channels. A1111 runs them in every mode; so does the engine, on diffusers' inpaint pipeline.

The models here are the micro and tiny models with their UNet's input widened to 9 channels, the 5 new ones
weighted 0: such a model must draw exactly what its base model draws, which shows that the 4 latent channels
reach it as they should; hooks on the UNet show what the other 5 carry."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from engine import Engine, GenerationRequest, InvalidRequestError, ModelLoadError, Result
from engine.infotext import parse_infotext
from engine.presets import SHIPPED_MICRO_MODEL
from tests.test_api import api, ok, png_b64, server  # noqa: F401 - fixtures
from tests.test_page_client import _client, outputs_dir, page_url  # noqa: F401 - fixtures

PROMPT = "a red circle on a blue background"


def widen_unet(pipe, channels: int = 9):
    """The pipeline's UNet with `channels` inputs, all but the 4 latent ones weighted 0 (changed in place)."""
    unet = pipe.unet
    old = unet.conv_in
    wider = torch.nn.Conv2d(channels, old.out_channels, old.kernel_size, old.stride, old.padding)
    with torch.no_grad():
        wider.weight.zero_()
        wider.weight[:, :4] = old.weight[:, :4]  # the latents' channels; the rest start at 0
        wider.bias.copy_(old.bias)
    unet.conv_in = wider
    unet.register_to_config(in_channels=channels)
    return unet


@pytest.fixture(scope="module")
def inpainting_dir(tmp_path_factory, models_dir):
    from diffusers import DiffusionPipeline

    from engine.checkpoint import save_single_file

    root = tmp_path_factory.mktemp("inpainting-models")
    checkpoints = root / "Stable-diffusion"
    shutil.copytree(SHIPPED_MICRO_MODEL, checkpoints / "micro-shapes")
    micro = DiffusionPipeline.from_pretrained(str(SHIPPED_MICRO_MODEL), local_files_only=True)
    shutil.copytree(SHIPPED_MICRO_MODEL, checkpoints / "micro-inpainting")
    shutil.rmtree(checkpoints / "micro-inpainting" / "unet")
    widen_unet(micro).save_pretrained(str(checkpoints / "micro-inpainting" / "unet"), safe_serialization=True)
    # The tiny model as A1111 users have inpainting models: one .safetensors file.
    shutil.copytree(models_dir / "Stable-diffusion" / "tiny-sd", checkpoints / "tiny-sd")
    tiny = DiffusionPipeline.from_pretrained(str(checkpoints / "tiny-sd"), local_files_only=True)
    widen_unet(tiny)
    save_single_file(tiny, checkpoints / "tiny-inpainting.safetensors")
    widen_unet(tiny, 8)
    save_single_file(tiny, checkpoints / "tiny-pix2pix.safetensors")
    return root


@pytest.fixture(scope="module")
def pair(inpainting_dir):
    return (
        Engine(model="micro-shapes", models_dir=inpainting_dir),
        Engine(model="micro-inpainting", models_dir=inpainting_dir),
    )


def pixels(engine: Engine, **fields) -> np.ndarray:
    result = list(engine.generate(GenerationRequest(**fields)))[-1]
    assert isinstance(result, Result)
    return np.asarray(result.images[0]).astype(int)


def test_an_inpainting_model_draws_in_txt2img_hires_and_img2img_what_its_base_model_draws(pair):
    base, inpainting = pair
    assert inpainting.loaded.inpainting_unet and not base.loaded.inpainting_unet
    for sampler in ("Euler a", "DDIM"):  # a k-diffusion sampler and one that is not
        # Not the native size: the inpaint pipeline would fall back to it unless told the job's.
        txt2img = dict(prompt=PROMPT, seed=1, steps=10, sampler_name=sampler, width=80, height=72)
        drawn = pixels(base, **txt2img)
        assert drawn.shape == (72, 80, 3)
        assert np.array_equal(pixels(inpainting, **txt2img), drawn), sampler
        hires = dict(txt2img, enable_hr=True, hr_scale=1.5)
        assert np.array_equal(pixels(inpainting, **hires), pixels(base, **hires)), sampler
        init = Image.fromarray(drawn.astype(np.uint8))
        img2img = dict(prompt="a blue circle on a blue background", seed=2, steps=10, sampler_name=sampler)
        img2img.update(init_images=[init], width=80, height=72)
        # The masked picture's latents are the only input the two compute apart: at most a level in a few pixels.
        # At denoising 1 too, where the inpaint pipeline alone would start from pure noise, not the picture.
        for strength in (0.6, 1.0):
            img2img["denoising_strength"] = strength
            assert np.abs(pixels(inpainting, **img2img) - pixels(base, **img2img)).max() <= 1, (sampler, strength)


def test_an_sdxl_inpainting_model_draws_what_its_base_model_draws(tmp_path):
    from tests.test_prompts_sdxl import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline()
    pipe.save_pretrained(tmp_path / "Stable-diffusion" / "xl", safe_serialization=True)
    widen_unet(pipe)
    pipe.save_pretrained(tmp_path / "Stable-diffusion" / "xl-inpainting", safe_serialization=True)
    base = Engine(model="xl", models_dir=tmp_path)
    inpainting = Engine(model="xl-inpainting", models_dir=tmp_path)
    assert inpainting.model.family == "sdxl" and inpainting.loaded.inpainting_unet
    txt2img = dict(prompt="a cat", seed=1, steps=4, width=64, height=64)
    assert np.array_equal(pixels(inpainting, **txt2img), pixels(base, **txt2img))
    # Its hires pass starts at the top of the schedule (strength 1): from the picture, as img2img does. Like
    # img2img it encodes a masked picture the base model does not, which may move a level (on one CPU thread).
    hires = dict(txt2img, enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos")
    assert np.abs(pixels(inpainting, **hires) - pixels(base, **hires)).max() <= 1
    img2img = dict(txt2img, init_images=[Image.new("RGB", (64, 64), "red")], denoising_strength=0.5)
    assert np.abs(pixels(inpainting, **img2img) - pixels(base, **img2img)).max() <= 1


def unet_inputs(engine: Engine, **fields) -> list[torch.Tensor]:
    """The UNet's input at each call of a job (a hook also makes the job run the module, not a trace)."""
    seen = []
    handle = engine.loaded.components["unet"].register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone())
    )
    try:
        list(engine.generate(GenerationRequest(**fields)))
    finally:
        handle.remove()
    return seen


def test_the_unet_is_given_a_mask_over_everything_or_the_painted_one(pair):
    _base, inpainting = pair
    for fields in (
        dict(prompt=PROMPT, seed=1, steps=3),
        dict(prompt=PROMPT, seed=1, steps=3, init_images=[Image.new("RGB", (64, 64), "red")], denoising_strength=0.5),
    ):
        inputs = unet_inputs(inpainting, **fields)
        assert inputs and all(x.shape[1] == 9 for x in inputs)
        assert all(torch.all(x[:, 4] == 1) for x in inputs), "txt2img and img2img repaint everything"

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # the left half
    picture = Image.new("RGB", (64, 64), "blue")
    inputs = unet_inputs(
        inpainting,
        prompt=PROMPT,
        seed=1,
        steps=3,
        init_images=[picture],
        mask=mask,
        denoising_strength=1.0,
        inpaint_full_res=False,
        mask_blur=0,
    )
    mask_channel = inputs[0][0, 4]
    assert torch.all(mask_channel[:, :8] == 1) and torch.all(mask_channel[:, 8:] == 0)
    # The masked picture is the blue picture with its left half blanked: its latents differ across the halves.
    masked = inputs[0][0, 5:]
    assert not torch.allclose(masked[:, :, :6], masked[:, :, 10:], atol=0.05)


def test_inpainting_with_it_repaints_the_mask_and_keeps_the_rest(pair):
    _base, inpainting = pair
    picture = Image.fromarray(pixels(inpainting, prompt=PROMPT, seed=4, steps=12).astype(np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    repainted = pixels(
        inpainting,
        prompt="a green circle on a blue background",
        seed=5,
        steps=12,
        init_images=[picture],
        mask=mask,
        denoising_strength=1.0,
        mask_blur=0,
    )
    inside, outside = np.asarray(mask) > 0, np.asarray(mask) == 0
    original = np.asarray(picture).astype(int)
    assert np.array_equal(repainted[outside], original[outside])
    assert np.abs(repainted[inside] - original[inside]).mean() > 20


def test_a_single_file_inpainting_checkpoint_loads_and_an_instruct_pix2pix_one_is_refused(inpainting_dir):
    tiny = Engine(model="tiny-sd", models_dir=inpainting_dir)
    single = Engine(model="tiny-inpainting.safetensors", models_dir=inpainting_dir)
    assert single.loaded.inpainting_unet and single.model.family == "tiny"
    request = dict(prompt="a cat", seed=3, steps=4)
    assert np.array_equal(pixels(single, **request), pixels(tiny, **request))
    with pytest.raises(ModelLoadError, match="8 input channels .an instruct-pix2pix model"):
        single.load_model("tiny-pix2pix.safetensors")
    assert single.model.name == "tiny-inpainting"


def test_the_page_header_says_it_is_an_inpainting_model(pair):
    from ui.page import _model_note

    base, inpainting = pair
    assert "inpainting model" in _model_note(inpainting) and "inpainting" not in _model_note(base)


def test_the_merger_writes_an_inpainting_merge_as_one_a1111_file(inpainting_dir):
    from engine import MergeRequest

    engine = Engine(model="tiny-sd", models_dir=inpainting_dir)
    # A1111's recipe for an inpainting version of a model: inpainting + (model - base). Here model = base, so the
    # result is the inpainting model itself.
    merged = engine.merge_checkpoints(
        MergeRequest(
            primary_model_name="tiny-inpainting",
            secondary_model_name="tiny-sd",
            tertiary_model_name="tiny-sd",
            interp_method="Add difference",
            multiplier=1.0,
            custom_name="tiny-custom",
        )
    )
    assert merged.info.kind == "single_file" and merged.info.path.endswith("tiny-custom.inpainting.safetensors")
    engine.load_model(merged.info.title)
    assert engine.loaded.inpainting_unet
    request = dict(prompt="a cat", seed=6, steps=4)
    assert np.array_equal(
        pixels(engine, **request), pixels(Engine(model="tiny-sd", models_dir=inpainting_dir), **request)
    )


def test_the_mask_weight_blanks_less_of_the_picture_the_unet_is_given(pair):
    """A1111's inpainting conditioning mask strength: the masked picture is lerp(picture, blanked, weight)."""
    base, inpainting = pair
    vae = inpainting.loaded.components["vae"]
    picture = Image.new("RGB", (64, 64), "blue")
    picture.paste((255, 0, 0), (0, 0, 32, 64))
    pixels_11 = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    img2img = dict(prompt=PROMPT, seed=1, steps=2, init_images=[picture], denoising_strength=0.5)
    for weight in (1.0, 0.5, 0.0):  # 1: mid-grey, as before; 0: the picture itself
        given = unet_inputs(inpainting, **img2img, inpainting_mask_weight=weight)[0][0, 5:]
        with torch.no_grad():
            expected = vae.encode(pixels_11 * (1 - weight)).latent_dist.mode()[0] * vae.config.scaling_factor
        assert torch.allclose(given, expected, atol=1e-4), weight

    # Inpaint: at weight 0 nothing of the masked left half is blanked, so both halves of a blue picture encode
    # alike (each channel's mean; the pipeline samples the encoding, so single latents differ by its noise).
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    inpaint = dict(img2img, init_images=[Image.new("RGB", (64, 64), "blue")], mask=mask, mask_blur=0)
    inpaint.update(inpaint_full_res=False, denoising_strength=1.0)

    def halves_apart(weight: float) -> float:
        masked = unet_inputs(inpainting, **inpaint, inpainting_mask_weight=weight)[0][0, 5:]
        return float((masked[:, :, :6].mean((1, 2)) - masked[:, :, 10:].mean((1, 2))).abs().max())

    assert halves_apart(1.0) > 1 and halves_apart(0.0) < 0.2  # measured: 1.55 and 0.07

    # The hires pass is conditioned on the upscaled picture; txt2img's first pass on grey whatever the weight.
    hires = dict(prompt=PROMPT, seed=1, steps=2, enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos")
    calls = unet_inputs(inpainting, **hires, inpainting_mask_weight=0.0)
    first, second = calls[0][0, 5:], calls[-1][0, 5:]
    grey = unet_inputs(inpainting, **{**hires, "enable_hr": False})[0][0, 5:]
    assert torch.equal(first, grey) and second.shape[-1] == 24 and second.std() > 2 * grey.std()  # 96 px / 4

    # The infotext names it for an inpainting model's picture-conditioned jobs, as A1111 does, and reads back.
    made = list(inpainting.generate(GenerationRequest(**img2img, inpainting_mask_weight=0.5)))[-1]
    assert "Conditional mask weight: 0.5" in made.infotexts[0]
    assert parse_infotext(made.infotexts[0]).inpainting_mask_weight == 0.5
    assert "Conditional mask weight: 1" in list(inpainting.generate(GenerationRequest(**img2img)))[-1].infotexts[0]
    for engine, fields in ((base, img2img), (inpainting, dict(prompt=PROMPT, seed=1, steps=2))):
        assert "Conditional mask weight" not in list(engine.generate(GenerationRequest(**fields)))[-1].infotexts[0]


@pytest.mark.parametrize("weight", [-0.1, 1.5, "half"])
def test_a_mask_weight_outside_0_to_1_is_refused_by_name(pair, weight):
    with pytest.raises(InvalidRequestError) as refused:
        pair[1].validate(GenerationRequest(prompt=PROMPT, inpainting_mask_weight=weight))
    assert refused.value.field == "inpainting_mask_weight"


def test_the_api_and_the_page_take_the_mask_weight(api, page_url):  # noqa: F811 - fixtures imported above
    from engine.request import default_job_settings
    from ui.page_jobs import PageSession

    payload = {
        "prompt": "x",
        "steps": 2,
        "width": 64,
        "height": 64,
        "init_images": [png_b64(Image.new("RGB", (64, 64)))],
    }
    body = ok(api.post("img2img", json={**payload, "override_settings": {"inpainting_mask_weight": 0.3}}))
    assert json.loads(body["info"])["ignored_fields"] == []
    ok(api.post("options", json={"inpainting_mask_weight": 0.5}))
    try:
        assert ok(api.get("options"))["inpainting_mask_weight"] == 0.5
    finally:
        ok(api.post("options", json={"inpainting_mask_weight": 1}))
    refused = api.post("img2img", json={**payload, "override_settings": {"inpainting_mask_weight": 2}})
    assert refused.status_code == 422 and refused.json()["field"] == "override_settings.inpainting_mask_weight"
    assert api.post("options", json={"inpainting_mask_weight": -1}).status_code == 422

    # The page: a Settings value of this session's own, which its jobs carry.
    session = PageSession(job_settings={**default_job_settings(), "inpainting_mask_weight": 0.25})
    assert session.settings_for(GenerationRequest(prompt="x")).inpainting_mask_weight == 0.25
    client = _client(page_url)
    client.predict(0.4, api_name="/set_inpainting_mask_weight")
    with pytest.raises(Exception, match="Inpainting conditioning mask strength: got 2; allowed: a number from 0 to 1"):
        client.predict(2, api_name="/set_inpainting_mask_weight")
