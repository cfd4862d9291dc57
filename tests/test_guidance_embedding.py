"""Models that take their guidance scale as an input (LCM-distilled checkpoints such as LCM Dreamshaper: the UNet's
`time_cond_proj_dim`). diffusers' pipelines hand them the CFG scale as an embedding and ask for no negative
prediction, so a job runs one UNet row per picture, and a sampler that needs the negative one is refused.

The model here is the tiny model with that input added (random weights for it, the rest the tiny model's)."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from engine import Engine, GenerationRequest, InvalidRequestError, Result


@pytest.fixture(scope="module")
def guidance_engine(tmp_path_factory, models_dir):
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("guidance-embedding")
    folder = root / "Stable-diffusion" / "tiny-lcm"
    shutil.copytree(models_dir / "Stable-diffusion" / "tiny-sd", folder)
    plain = UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    torch.manual_seed(0)
    embedding = UNet2DConditionModel.from_config({**plain.config, "time_cond_proj_dim": 32})
    missing, unexpected = embedding.load_state_dict(plain.state_dict(), strict=False)
    assert (missing, unexpected) == (["time_embedding.cond_proj.weight"], [])
    with torch.no_grad():  # large enough that the scale visibly moves the picture
        embedding.time_embedding.cond_proj.weight.normal_(0, 1)
    shutil.rmtree(folder / "unet")
    embedding.save_pretrained(str(folder / "unet"), safe_serialization=True)
    return Engine(model="tiny-lcm", models_dir=root)


def calls_and_picture(engine: Engine, request: GenerationRequest) -> tuple[list, np.ndarray]:
    """Each UNet call's (rows, whether it was given a guidance embedding), and the picture."""
    calls = []
    handle = engine.loaded.components["unet"].register_forward_pre_hook(
        lambda _m, args, kwargs: calls.append((args[0].shape[0], kwargs.get("timestep_cond") is not None)),
        with_kwargs=True,
    )
    try:
        result = list(engine.generate(request))[-1]
    finally:
        handle.remove()
    assert isinstance(result, Result)
    return calls, np.asarray(result.images[0]).astype(int)


@pytest.mark.parametrize("sampler", ["Euler a", "LCM", "DPM++ 2M"])
def test_the_scale_reaches_the_model_as_its_input_with_no_negative_rows(guidance_engine, sampler):
    request = GenerationRequest(
        prompt="a red circle", negative_prompt="blue", sampler_name=sampler, steps=4, cfg_scale=7, seed=5
    )
    calls, at_7 = calls_and_picture(guidance_engine, request)
    assert calls == [(1, True)] * 4  # one row a step: the pipeline guides nothing itself
    _, again = calls_and_picture(guidance_engine, request)
    assert np.array_equal(at_7, again)
    _, at_2 = calls_and_picture(guidance_engine, dataclasses.replace(request, cfg_scale=2))
    assert np.abs(at_7 - at_2).mean() > 1  # the scale is what the embedding carries
    # The negative prompt is never asked, so it changes nothing.
    assert np.array_equal(at_7, calls_and_picture(guidance_engine, dataclasses.replace(request, negative_prompt=""))[1])


def test_a_cfgpp_sampler_is_refused_before_the_job_waits(guidance_engine):
    with pytest.raises(InvalidRequestError) as refused:
        guidance_engine.validate(GenerationRequest(prompt="a red circle", sampler_name="DDIM CFG++", steps=4))
    assert refused.value.field == "sampler_name" and refused.value.value == "DDIM CFG++"
    assert "embeds its guidance" in refused.value.allowed
    hires = GenerationRequest(
        prompt="a red circle", steps=4, enable_hr=True, hr_scale=2, hr_sampler_name="DDIM CFG++", denoising_strength=0.5
    )
    with pytest.raises(InvalidRequestError) as refused:
        guidance_engine.validate(hires)
    assert refused.value.field == "hr_sampler_name"
    # The next job runs.
    assert calls_and_picture(guidance_engine, GenerationRequest(prompt="a red circle", steps=2))[0] == [(1, True)] * 2


def test_a_model_without_the_input_still_runs_ddim_cfgpp(engine):
    checked = engine.validate(GenerationRequest(prompt="a red circle", sampler_name="DDIM CFG++", steps=4))
    assert checked.sampler_name == "DDIM CFG++"
