"""Inpainting models (sd-v1-5-inpainting and its kind): a UNet that also takes the mask and the masked picture,
9 input channels. A1111 runs them in every mode; so does the engine, on diffusers' inpaint pipeline.

The models here are the micro and tiny models with their UNet's input widened to 9 channels, the 5 new ones
weighted 0: such a model must draw exactly what its base model draws, which shows that the 4 latent channels
reach it as they should; hooks on the UNet show what the other 5 carry."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from engine import Engine, GenerationRequest, ModelLoadError, Result
from engine.presets import SHIPPED_MICRO_MODEL

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
