"""Half precision as a GPU runs it, and A1111's --no-half-vae: the VAE in float32 while the UNet and the text encoder
run in float16, and SDXL's VAE (whose config asks for float32: force_upcast) kept in float32 for good.

These run on a CPU in float16 (slowly, but through the same casts a GPU's jobs take): every mode must run, and the
pictures must be the full-precision model's within what float16 sampling moves them."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from engine import Engine, GenerationRequest, NansError, PreviewSettings, Progress, Result
from engine.presets import SHIPPED_MICRO_MODEL
from tests.test_inpaint_blend import inpaint_request
from tests.test_vae import vae_models_dir  # noqa: F401 - fixture

PROMPT = "a red circle on a blue background"
RED = Image.new("RGB", (64, 64), "red")
JOBS = {
    "txt2img": GenerationRequest(prompt=PROMPT, steps=6, seed=4, sampler_name="Euler"),
    "img2img": GenerationRequest(
        prompt="a blue circle on a yellow background", steps=6, seed=4, init_images=[RED], denoising_strength=0.75
    ),
    "inpaint": inpaint_request(steps=6),
    "hires": GenerationRequest(
        prompt=PROMPT, steps=4, seed=4, enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos", denoising_strength=0.5
    ),
}


@pytest.fixture(scope="module")
def fp16_vae_models_dir(tmp_path_factory):
    """The micro model, and a copy whose VAE config says it runs in float16 (force_upcast false, as the fp16-fix VAEs
    say; diffusers' default, which every other VAE here keeps, is true)."""
    root = tmp_path_factory.mktemp("precision-models")
    checkpoints = root / "Stable-diffusion"
    shutil.copytree(SHIPPED_MICRO_MODEL, checkpoints / "micro-shapes")
    shutil.copytree(SHIPPED_MICRO_MODEL, checkpoints / "micro-fp16-vae")
    config_path = checkpoints / "micro-fp16-vae" / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "force_upcast": False}))
    return root


@pytest.fixture(scope="module")
def engines(fp16_vae_models_dir):
    """The micro model at full precision, and in float16 with --no-half-vae's float32 VAE (on the copy whose VAE
    would run in float16 without it)."""
    full = Engine(model="micro-shapes", models_dir=fp16_vae_models_dir)
    half = Engine(model="micro-fp16-vae", models_dir=fp16_vae_models_dir, dtype=torch.float16, full_precision_vae=True)
    return full, half


def pixels(engine: Engine, request: GenerationRequest) -> np.ndarray:
    result = list(engine.generate(request))[-1]
    assert isinstance(result, Result)
    return np.asarray(result.images[0]).astype(int)


def test_no_half_vae_keeps_the_vae_in_float32_and_the_rest_in_half(engines, fp16_vae_models_dir):
    _full, half = engines
    components = half.loaded.components
    assert components["unet"].dtype == torch.float16 and components["text_encoder"].dtype == torch.float16
    assert components["vae"].dtype == torch.float32
    plain = Engine(model="micro-fp16-vae", models_dir=fp16_vae_models_dir, dtype=torch.float16)
    assert plain.loaded.components["vae"].dtype == torch.float16  # the flag is what keeps it in float32
    # A VAE whose config asks for float32 (diffusers' default) gets it without the flag.
    default = Engine(model="micro-shapes", models_dir=fp16_vae_models_dir, dtype=torch.float16)
    assert default.loaded.components["vae"].dtype == torch.float32


@pytest.mark.parametrize("mode", list(JOBS))
def test_every_mode_runs_with_a_float32_vae_beside_a_half_unet(engines, mode):
    full, half = engines
    difference = np.abs(pixels(half, JOBS[mode]) - pixels(full, JOBS[mode]))
    assert difference.mean() < 3, f"{mode}: the half-precision picture is not the full-precision one"


def test_the_full_vae_preview_and_a_chosen_vae_file_decode_in_float32_too(vae_models_dir):  # noqa: F811
    half = Engine(
        model=str(SHIPPED_MICRO_MODEL), models_dir=vae_models_dir, dtype=torch.float16, full_precision_vae=True
    )
    events = list(half.generate(JOBS["txt2img"], preview=PreviewSettings(mode="vae", every=2)))
    assert [event for event in events if isinstance(event, Progress) and event.preview is not None]
    assert isinstance(events[-1], Result)
    bright = half.generate(dataclasses.replace(JOBS["txt2img"], sd_vae="bright.safetensors"))
    assert isinstance(list(bright)[-1], Result)
    assert all(vae.dtype == torch.float32 for vae in half.loaded.vaes._loaded.values())


def test_sdxls_vae_stays_in_float32_in_a_half_precision_model(tmp_path):
    from tests.test_prompts_sdxl import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline()
    assert pipe.vae.config.force_upcast
    pipe.save_pretrained(tmp_path / "Stable-diffusion" / "xl", safe_serialization=True)
    half = Engine(model="xl", models_dir=tmp_path, dtype=torch.float16)
    assert half.loaded.components["vae"].dtype == torch.float32
    assert half.loaded.components["unet"].dtype == torch.float16
    for mode in ("txt2img", "img2img", "inpaint"):
        request = dataclasses.replace(JOBS[mode], prompt="a cat", width=64, height=64)
        assert isinstance(list(half.generate(request))[-1], Result), mode
    assert half.loaded.components["vae"].dtype == torch.float32  # no job cast it back


def nan_output(module, args, output):
    """A forward hook that turns the UNet's prediction into NaN values, as a float16 overflow does."""
    if isinstance(output, tuple):
        return (output[0] * float("nan"), *output[1:])
    output.sample = output.sample * float("nan")
    return output


@pytest.mark.parametrize("half", [False, True], ids=["float32", "float16"])
def test_a_job_whose_model_makes_nans_stops_with_what_to_try_and_the_next_job_runs(engines, half):
    full, half_engine = engines
    engine = half_engine if half else full
    hook = engine.loaded.components["unet"].register_forward_hook(nan_output)
    try:
        with pytest.raises(NansError) as stopped:
            list(engine.generate(JOBS["txt2img"]))
    finally:
        hook.remove()
    message = str(stopped.value)
    assert "NaN values at sampling step 1" in message and "--disable-nan-check" in message
    assert ("--no-half" in message) == half and ("broken weights" in message) != half
    assert pixels(engine, JOBS["txt2img"]).std() > 10  # the next job draws its picture


def test_without_the_nan_check_the_job_runs_on_to_a_black_picture(fp16_vae_models_dir):
    unchecked = Engine(model="micro-shapes", models_dir=fp16_vae_models_dir, nan_check=False)
    hook = unchecked.loaded.components["unet"].register_forward_hook(nan_output)
    try:
        assert pixels(unchecked, JOBS["txt2img"]).max() == 0
    finally:
        hook.remove()


def test_a_half_precision_vae_that_makes_nans_runs_in_float32_from_then_on(fp16_vae_models_dir, caplog):
    """A1111's automatic VAE precision. The overflow is simulated: the decoder's output turns NaN while it runs in
    float16."""
    half = Engine(model="micro-fp16-vae", models_dir=fp16_vae_models_dir, dtype=torch.float16)
    vae = half.loaded.components["vae"]
    assert vae.dtype == torch.float16

    def overflow(module, args, output):
        return output * float("nan") if next(module.parameters()).dtype == torch.float16 else None

    hook = vae.decoder.register_forward_hook(overflow, prepend=True)  # before the engine's check, as an overflow is
    try:
        picture = pixels(half, JOBS["txt2img"])
    finally:
        hook.remove()
    assert picture.std() > 10  # not the black picture NaN values decode to
    assert vae.dtype == torch.float32
    assert "The VAE made NaN values in torch.float16" in caplog.text
    assert pixels(half, JOBS["img2img"]).std() > 10  # and it stays in float32 for the next job
