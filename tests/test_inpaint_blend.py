"""A1111's hold on the picture outside the mask while inpainting: its k-diffusion samplers take the picture's
latents as the denoised prediction there, its DDIM, PLMS and UniPC show them to the model in place of the noisy
latents, and the sampled latents are the picture's there before decoding (engine/inpaint.py, InpaintBlend)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from engine import GenerationRequest, Progress, Result
from engine.events import PreviewSettings
from engine.inpaint import InpaintBlend, latent_mask
from engine.samplers import build_scheduler
from engine.vae import mean_latents
from tests.test_engine import SD_SCHEDULER_CONFIG, a1111_dpmpp_2m, stand_in_eps


class StandInUNet(torch.nn.Module):
    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        return (stand_in_eps(sample, timestep),)


@pytest.mark.parametrize("schedule", ["Karras", "Automatic"])
def test_the_blend_makes_the_denoised_prediction_the_pictures_latents_where_they_are_kept(schedule):
    """DPM++ 2M through the blend is k-diffusion's DPM++ 2M whose denoiser A1111 blends: its history, its steps
    between timesteps (Karras's fractional ones) and its variance-preserving latents all read the same level."""
    scheduler = build_scheduler(SD_SCHEDULER_CONFIG, "DPM++ 2M", schedule)
    picture = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    keep = torch.zeros(1, 1, 8, 8)
    keep[..., :, :3] = 1
    blend = InpaintBlend(StandInUNet(), picture, keep, scheduler.alphas_cumprod, "epsilon", before=False)
    steps = 12
    scheduler.set_timesteps(steps)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    latent = noise * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps:
        answer = blend(scheduler.scale_model_input(latent, timestep), timestep, None, return_dict=False)[0]
        latent = scheduler.step(answer, timestep, latent).prev_sample
    sigmas = scheduler.sigmas.double()

    def held(denoised):
        return denoised * (1 - keep) + picture.double() * keep

    expected = a1111_dpmpp_2m(stand_in_eps, noise.double() * sigmas[0], sigmas, scheduler.timesteps, hold=held)
    assert torch.allclose(latent, expected, atol=1e-4), (latent - expected).abs().max()
    assert torch.allclose(latent[..., :3], picture[..., :3], atol=1e-4)


def test_the_latent_mask_is_a1111s_rounded_bicubic_one():
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (20, 0, 64, 64))
    repainted = latent_mask(mask, (8, 8))[0, 0]
    # Column 2 covers pixels 16-23, 4 of them painted: rounded from 0.5 (bicubic reads a little more) up.
    assert repainted[:, 3:].eq(1).all() and repainted[:, :2].eq(0).all()
    assert set(repainted.unique().tolist()) <= {0.0, 1.0}


def inpaint_request(**fields) -> GenerationRequest:
    picture = Image.new("RGB", (64, 64), "white")
    picture.paste((255, 0, 0), (8, 8, 56, 56))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # the left half is repainted
    settings = dict(prompt="a blue square on a white background", seed=4, steps=10, mask_blur=0)
    return GenerationRequest(init_images=[picture], mask=mask, denoising_strength=0.9, **{**settings, **fields})


def picture_latents(engine, request) -> torch.Tensor:
    pipe = engine.loaded.pipeline_for("img2img", build_scheduler(engine.loaded.scheduler_config, "Euler", "Automatic"))
    return mean_latents(pipe.vae, pipe.image_processor.preprocess(request.init_images, height=64, width=64))


def test_a1111s_ddim_shows_the_model_the_picture_outside_the_mask_at_every_step(micro_engine):
    request = inpaint_request(sampler_name="DDIM")
    latents, seen = picture_latents(micro_engine, request), []
    unet = micro_engine.loaded.components["unet"]
    hook = unet.register_forward_pre_hook(lambda module, args: seen.append(args[0][:, :4].clone()))
    try:
        result = list(micro_engine.generate(request))[-1]
    finally:
        hook.remove()
    assert isinstance(result, Result) and len(seen) == 8  # A1111's DDIM at 0.9 of 10 steps
    half = latents.shape[-1] // 2  # the kept half's latent columns
    for sample in seen:
        assert torch.allclose(sample[..., half:], latents[..., half:].expand_as(sample[..., half:]), atol=1e-5)
        assert not torch.allclose(sample[..., :half], latents[..., :half].expand_as(sample[..., :half]), atol=0.1)


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M"])
def test_a_k_diffusion_samplers_denoised_prediction_is_the_picture_outside_the_mask_from_the_first_step(
    micro_engine, sampler
):
    """The live preview (the linear latent->RGB one, which reads each latent pixel alone) shows the denoised
    prediction: outside the mask it is the picture's latents from the first step on."""
    request = inpaint_request(sampler_name=sampler)
    events = list(micro_engine.generate(request, preview=PreviewSettings(mode="approx", every=1)))
    previews = [np.asarray(event.preview, dtype=float) for event in events if isinstance(event, Progress)]
    assert len(previews) == 10
    width = previews[0].shape[1]
    kept = (slice(None), slice(width * 5 // 8, None))  # inside the kept half, away from the edge a resize smooths
    for preview in previews[:-1]:
        assert np.abs(preview[kept] - previews[-1][kept]).max() <= 1
    assert isinstance(events[-1], Result) and events[-1].images


def test_the_original_is_laid_over_the_result_through_the_blurred_mask_doubled(monkeypatch):
    """A1111's mask_for_overlay (whole-picture inpaint): the painted part keeps the result's own pixels wherever the
    blurred mask reaches half way, and blends into the original over the blur's outer half only."""
    import engine.inpaint as inpaint_module

    painted = Image.new("RGB", (64, 64), (0, 0, 255))
    monkeypatch.setattr(inpaint_module, "_run", lambda *args: [painted])
    original = Image.new("RGB", (64, 64), (255, 0, 0))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))
    blurred = np.asarray(mask.filter(ImageFilter.GaussianBlur(4))).astype(int)
    request = GenerationRequest(prompt="", init_images=[original], mask=mask, mask_blur=4)
    result = np.asarray(inpaint_module.inpaint(None, {}, request, [original], [original], blurred_mask(mask), [1])[0])
    weight = np.minimum(255, 2 * blurred)
    assert (result[weight == 255] == (0, 0, 255)).all()
    assert (result[blurred == 0] == (255, 0, 0)).all()
    partly = (weight > 0) & (weight < 255)
    assert partly.any() and np.abs(result[partly][:, 2] - weight[partly]).max() <= 1


def blurred_mask(mask: Image.Image) -> Image.Image:
    return mask.filter(ImageFilter.GaussianBlur(4))


def encoded_pictures_and_result(engine, request) -> tuple[int, Result]:
    """How many pictures the job passed through the VAE's encoder, and its result."""
    calls = []
    hook = engine.loaded.components["vae"].encoder.register_forward_pre_hook(
        lambda module, args: calls.append(args[0].shape[0])
    )
    try:
        result = list(engine.generate(request))[-1]
    finally:
        hook.remove()
    assert isinstance(result, Result)
    return sum(calls), result


@pytest.mark.parametrize("fill", [0, 1, 2])  # fill, original, latent noise
def test_an_inpaint_job_encodes_each_picture_once(micro_engine, fill, monkeypatch):
    """diffusers' inpaint pipeline would encode the picture it starts from again, after the engine encoded it for
    the blend, and a masked picture for a mask input that a model without one never reads: with SD 1.5's VAE that
    is about 7.5 s a 512x512 picture each on a 2-core CPU. Both are left out, and the pictures are byte-identical to
    those of a job that encodes the start again."""
    request = inpaint_request(inpainting_fill=fill, batch_size=2)
    encoded, result = encoded_pictures_and_result(micro_engine, request)
    assert encoded == 2  # the batch's 2 pictures
    monkeypatch.setattr("engine.inpaint._encode_once", lambda pipe, pixels, latents: None)
    encoded_again, again = encoded_pictures_and_result(micro_engine, request)
    assert encoded_again == 4
    assert [image.tobytes() for image in again.images] == [image.tobytes() for image in result.images]
