"""Running one job: a diffusers pipeline call per batch, hooked with callback_on_step_end.

The pipeline's own __call__ is used as it is. Two small hooks give what a UI needs:
- the job's scheduler (its own instance) records what each step predicted, so a preview can
  show the predicted clean image (x0) rather than the noisy latent;
- callback_on_step_end emits Progress, and on Stop or Skip sets the pipeline's interrupt flag
  and hands it x0 to decode, so an interrupted job still ends with a usable picture.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image, ImageFilter

from .cfgpp import CFGppUNet, pipeline_guidance_scale
from .color_correction import corrected
from .composable import ComposedGuidance
from .errors import InvalidRequestError, NansError
from .events import JobControl, Pacer, Progress
from .images import LATENT_RESIZE, resize_to
from .inpaint import inpaint
from .models import LoadedModel
from .negative_guidance import NegativeGuidanceSkip, SkipNegativeUNet, model_calls
from .noise import NoiseVariation, RandomSource, initial_noise, reseed_after_start
from .pad_conds import NaturalLengthUNet
from .prompts import Conditioning, SDXLEmbeds, guidance_rows
from .refiner import Refiner, RefinerSwitch
from .request import LATENT_UPSCALERS, GenerationRequest
from .samplers import (
    A1111DPMAdaptiveScheduler,
    NoiseLevels,
    ScheduleShape,
    SigmaChurn,
    UniPCSettings,
    build_scheduler,
    diffusers_strength,
    eta_for,
    get_sampler,
    pass_steps,
    picture_steps,
)
from .upscalers import upscale_to
from .vae import decode_pictures, mean_latents

log = logging.getLogger(__name__)


class StepRecorder:
    """Wraps one job's scheduler.step to remember the last step's inputs and outputs.

    Only references are kept; x0 is computed when a preview or an interrupt asks for it.
    functools.wraps keeps step()'s signature visible, which pipelines inspect to decide
    whether to pass `generator` (ancestral samplers need it for reproducible noise).
    """

    def __init__(self, scheduler, prediction_type: str):
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self._last: tuple | None = None
        original_step = scheduler.step

        @functools.wraps(original_step)
        def recording_step(model_output, timestep, sample, *args, **kwargs):
            output = original_step(model_output, timestep, sample, *args, **kwargs)
            self._last = (model_output, timestep, sample, output, getattr(scheduler, "step_index", None))
            return output

        scheduler.step = recording_step

    def x0(self) -> torch.Tensor | None:
        """The clean latent the last step predicted (in the UNet's latent space)."""
        if self._last is None:
            return None
        model_output, timestep, sample, output, step_index = self._last
        predicted = getattr(output, "pred_original_sample", None)
        if predicted is None and isinstance(output, tuple) and len(output) > 1:
            predicted = output[1]
        if isinstance(predicted, torch.Tensor) and predicted.shape == sample.shape:
            return predicted
        return self._x0_from_model_output(model_output, timestep, sample, step_index)

    def _x0_from_model_output(self, model_output, timestep, sample, step_index) -> torch.Tensor:
        scheduler = self.scheduler
        sigmas = getattr(scheduler, "sigmas", None)
        sigma = None
        if sigmas is not None and step_index is not None and 0 < step_index <= len(sigmas):
            sigma = sigmas[step_index - 1].to(sample.device, torch.float32)
        sample32, output32 = sample.float(), model_output.float()
        if float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0 and sigma is not None:
            # Variance-exploding ("k-diffusion") space: x = x0 + sigma * eps.
            alpha_t, sigma_t = torch.tensor(1.0), sigma
        else:
            if sigma is not None:
                # Variance-preserving space with sigmas stored as sigma/alpha (DPM-Solver, UniPC, DEIS).
                alpha_t = 1 / torch.sqrt(sigma**2 + 1)
                sigma_t = sigma * alpha_t
            else:
                alphas = scheduler.alphas_cumprod.to(sample.device)
                index = int(timestep.item() if isinstance(timestep, torch.Tensor) else timestep)
                alpha_bar = alphas[max(0, min(index, len(alphas) - 1))].float()
                alpha_t, sigma_t = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        if self.prediction_type == "v_prediction":
            x0 = alpha_t * sample32 - sigma_t * output32
        elif self.prediction_type == "sample":
            x0 = output32
        else:
            x0 = (sample32 - sigma_t * output32) / alpha_t
        return x0.to(sample.dtype)


@dataclass
class BatchOutcome:
    images: list[Image.Image]
    stopped: bool  # ended early by Stop or Skip
    preview_seconds: float = 0.0  # time spent making previews, to show what they cost


def _scheduler_for(
    req: GenerationRequest,
    model,
    sampler_name: str,
    schedule: str,
    seeds: list[int],
    *,
    first_pass=True,
    picture_calls=0,
):
    """A pass's scheduler, with the job's eta, sigma noise, schedule min/max sigma and rho, sigma churn, discarding of
    the next-to-last sigma and noise levels; the SGM noise multiplier where A1111 applies it, to txt2img's first pass
    (a pass from a picture adds its noise to it). `seeds`: the batch's, one Brownian tree each (the SDE samplers).
    `picture_calls`: the sampling steps of a pass from a picture."""
    return build_scheduler(
        model.scheduler_config,
        sampler_name,
        schedule,
        seed=list(seeds),
        eta=req.eta,
        s_noise=req.s_noise,
        schedule_shape=ScheduleShape(req.sigma_min, req.sigma_max, req.rho, req.beta_dist_alpha, req.beta_dist_beta),
        model_family=model.family,
        churn=SigmaChurn(req.s_churn, req.s_tmin, req.s_tmax),
        sgm_noise_multiplier=req.sgm_noise_multiplier and first_pass and req.mode == "txt2img",
        always_discard_penultimate_sigma=req.always_discard_penultimate_sigma,
        noise_levels=noise_levels(req),
        from_picture=not (first_pass and req.mode == "txt2img"),
        picture_calls=picture_calls,
        unipc=UniPCSettings(req.unipc_variant, req.unipc_skip_type, req.unipc_order, req.unipc_lower_order_final),
    )


def noise_levels(req: GenerationRequest) -> NoiseLevels:
    """How the job changes the model's noise levels (A1111's Zero Terminal SNR and Downcast alphas_cumprod)."""
    return NoiseLevels(req.noise_schedule == "Zero Terminal SNR", req.downcast_alphas_cumprod)


def run_batch(model: LoadedModel, req: GenerationRequest, **batch) -> BatchOutcome:
    """One batch of `req` (_sample_batch), its noise drawn from the request's random source: every draw from the
    batch's generators, by this engine or diffusers, on this thread, while it runs."""
    source = RandomSource(req.randn_source)
    with source.drawing():
        return _sample_batch(model, req, source=source, **batch)


def _sample_batch(
    model: LoadedModel,
    req: GenerationRequest,
    *,
    source: RandomSource,
    seeds: list[int],
    subseeds: list[int] | None = None,
    vae=None,
    conditioning: Conditioning,
    control: JobControl,
    previewer: Callable[[torch.Tensor], Image.Image] | None,
    preview_every: int,
    emit: Callable[[Progress], None],
    batch_no: int,
    batch_count: int,
    started: float,
    preview_interval_s: float = 0.0,
    nan_check: bool = True,
    hires_conditioning: Conditioning | None = None,
    upscaler: torch.nn.Module | None = None,
    hires_model: LoadedModel | None = None,
    hires_vae=None,
    refiner: Refiner | None = None,
    before_hires: Callable[[], object] | None = None,
) -> BatchOutcome:
    """Sample one batch (one image per seed; `subseeds` are their variation seeds) and return its images;
    `vae`, when given, decodes and encodes pictures instead of the model's own; `hires_conditioning` is the
    hires pass's when its prompts differ from the first pass's; `upscaler` is the hires fix's upscaler
    network when it uses a model; `hires_model` (with `hires_vae`, its VAE when not its own) is A1111's hires
    checkpoint, the model the second pass runs on (`hires_conditioning` is then that model's); `refiner` takes
    over the last part of the sampling (of the hires pass, when there is one: engine/refiner.py);
    `before_hires()` runs just before the second pass (it switches that pass's LoRAs on)."""
    # Sampling steps that run: the whole pass in txt2img (A1111's DDIM, PLMS and UniPC count their own), the last of a
    # schedule in img2img and inpaint (fewer than it has, or with A1111's "exact steps" option its Sampling steps of a
    # longer one).
    picture = picture_steps(
        req.sampler_name, req.steps, req.denoising_strength, req.scheduler, exact=req.img2img_fix_steps
    )
    sampling_steps = (
        pass_steps(req.sampler_name, req.scheduler, req.steps, req.always_discard_penultimate_sigma)
        if req.mode == "txt2img"
        else picture.sampling
    )
    scheduler = _scheduler_for(req, model, req.sampler_name, req.scheduler, seeds, picture_calls=sampling_steps)
    recorder = StepRecorder(scheduler, model.prediction_type)
    composed: list[ComposedGuidance] = []  # the UNet stand-in of each pass, for a prompt with AND
    switches: list[RefinerSwitch] = []  # the refiner's stand-in for the pass it joins
    stand_ins = _StandIns(req, composed, switches)
    hires = req.mode == "txt2img" and req.enable_hr
    wrap_unet = stand_ins.for_pass(
        model, conditioning, refiner if not hires else None, req.sampler_name, sampling_steps, scheduler
    )
    # A trace holds the padding its convolutions had when traced: tiling runs the UNet as a module.
    pipe = model.pipeline_for(req.mode, scheduler, traced=not req.tiling, wrap_unet=wrap_unet, vae=vae)
    resize_from = None
    if req.seed_resize_from_w > 0 and req.seed_resize_from_h > 0:
        resize_from = model.latent_shape(req.seed_resize_from_w, req.seed_resize_from_h)[2:]
    # A1111 scales the noise of img2img and inpaint only, never a hires pass's.
    multiplier = req.initial_noise_multiplier if req.mode != "txt2img" else 1.0
    variation = NoiseVariation(
        seeds,
        subseeds or seeds,
        req.subseed_strength,
        resize_from,
        multiplier,
        extra=req.img2img_extra_noise,
    )
    if req.mode != "txt2img":
        variation.install(pipe, scheduler)
    reseed_after_start(pipe, seeds, req.eta_noise_seed_delta)
    generators = source.generators(seeds)
    stopped = False
    preview_seconds = 0.0
    preview_pacer = Pacer(preview_interval_s)
    current_conditioning = conditioning.at(0)
    # With hires fix, the steps of a pass before this one (shown as done) and the loop steps of the
    # passes after it (counted into the total), so progress runs once from 0 to 100% over both passes.
    steps_before = 0
    hr_sampler, hr_schedule = req.hires_sampler
    # A1111's hires pass runs its Hires steps (Sampling steps where 0) on a longer schedule (picture_steps).
    hires_steps = picture_steps(
        hr_sampler, req.hr_second_pass_steps or req.steps, req.denoising_strength, hr_schedule, exact=True
    )
    hires_sampling_steps = hires_steps.sampling if req.mode == "txt2img" and req.enable_hr else 0

    def on_step_end(pipeline, index, timestep, tensors):
        nonlocal stopped, preview_seconds, current_conditioning
        step, total = index + 1, pipeline.num_timesteps
        if nan_check:
            check_for_nans(tensors.get("latents"), pipeline.unet.dtype, step)
        adaptive = isinstance(pipeline.scheduler, A1111DPMAdaptiveScheduler)
        if adaptive:
            # Its loop is longer than its calls: ended once the pass is done. The total is its calls as far as they
            # can be told (the pass's sampling steps before its first step is tried).
            if pipeline.scheduler.finished:
                pipeline._interrupt = True
            estimate = pipeline.scheduler.estimated_calls()
            total = max(step + 1, sampling_steps) if estimate is None else estimate
        # Loop steps per sampling step (2 for Heun, DPM2, ...), for the pass still to come (after DPM adaptive, whose
        # calls are no guide, the model calls A1111 counts for that pass).
        steps_after = 0
        if steps_before == 0:
            steps_after = (
                model_calls(hr_sampler, hires_sampling_steps)
                if adaptive
                else round(hires_sampling_steps * total / sampling_steps)
            )
        if control.interrupted or control.take_skip():
            stopped = True
            pipeline._interrupt = True
            x0 = recorder.x0()
            return {"latents": x0} if x0 is not None else {}
        changes = {}
        # The sampling step whose prompt-editing entries the next call takes. DPM adaptive's is its call's index, as
        # A1111 counts it.
        sampling_step = step if adaptive else step * sampling_steps // total
        if composed:  # the composable parts' prompt-editing entries for the next step
            composed[-1].step_index = sampling_step
        if switches:
            switches[-1].step_index = sampling_step
            if switches[-1].switched and pipeline.vae is not refiner.vae:
                pipeline.vae = refiner.vae  # the refiner's VAE decodes, as the model loaded at the end in A1111
        if conditioning.scheduled and step < total:
            # Prompt editing: the conditioning for the next step, where the schedule says it changes.
            # Second-order samplers run more loop steps than sampling steps; scale to sampling steps. As in
            # A1111, the schedule counts all the job's steps and img2img starts at its index 0.
            upcoming = conditioning.at(sampling_step)
            if any(new is not old for new, old in zip(upcoming, current_conditioning, strict=True)):
                current_conditioning = upcoming
                changes.update(_pipeline_prompt_embeds(pipeline, upcoming, len(seeds)))
        preview = None
        wanted = previewer is not None and (step % preview_every == 0 or step == total)
        if wanted and preview_pacer.ready(force=step == total):  # the last step always has one
            preview_started = time.perf_counter()
            x0 = recorder.x0()
            if x0 is not None:
                preview = previewer(x0[0])
            preview_seconds += time.perf_counter() - preview_started
        emit(
            Progress(
                step=steps_before + step,
                total=steps_before + total + steps_after,
                preview=preview,
                batch_no=batch_no,
                batch_count=batch_count,
                elapsed=time.perf_counter() - started,
                job_id=control.job_id,
            )
        )
        return changes

    kwargs = {
        "num_inference_steps": req.steps if req.mode == "txt2img" else picture.schedule,
        "guidance_scale": pipeline_guidance_scale(req.sampler_name, req.cfg_scale),
        "generator": generators,
        "callback_on_step_end": on_step_end,
        "callback_on_step_end_tensor_inputs": ["latents"],
        "output_type": "pil",
        # DDIM's eta (its step takes it from the pipeline call); the others' is set on their scheduler.
        "eta": eta_for(req.sampler_name, req.eta) or 0.0,
    }
    kwargs.update(_conditioning_kwargs(conditioning, len(seeds)))

    if req.mode == "txt2img":
        noise = variation.vary(initial_noise(generators, model.latent_shape(req.width, req.height)))
        latents = noise.to(model.device, model.dtype)
        kwargs.update(height=req.height, width=req.width, latents=latents)
        if model.inpainting_unet:  # the inpaint pipeline, from the noise alone, as A1111 runs such a model
            blank = Image.new("RGB", (req.width, req.height), (127, 127, 127))
            kwargs.update(image=[blank] * len(seeds), strength=1.0, **_repaint_all(pipe, req.width, req.height))
        if not req.enable_hr:
            images = pipe(**kwargs).images
            return BatchOutcome(images, stopped, preview_seconds)
        # Hires fix, first pass: latents for a latent upscaler, pictures for the others.
        latent_upscale = req.hr_upscaler in LATENT_UPSCALERS
        kwargs["output_type"] = "latent" if latent_upscale else "pil"
        first = pipe(**kwargs).images
        if stopped:  # Stop or Skip in the first pass: its picture is the answer, as far as it got
            return BatchOutcome(decode_pictures(pipe, first) if latent_upscale else first, stopped, preview_seconds)

        hr_width, hr_height = req.hires_size
        if latent_upscale:
            mode, antialias = LATENT_UPSCALERS[req.hr_upscaler]
            size = model.latent_shape(hr_width, hr_height)[2:]
            start = torch.nn.functional.interpolate(first, size=size, mode=mode, antialias=antialias)
        elif upscaler is not None:
            start = [upscale_to(upscaler, picture, hr_width, hr_height) for picture in first]
        else:
            resample = Image.Resampling.NEAREST if req.hr_upscaler == "Nearest" else Image.Resampling.LANCZOS
            start = [picture.resize((hr_width, hr_height), resample) for picture in first]
        if hires_sampling_steps < 1:  # denoising strength 0: the upscaled picture is the answer
            return BatchOutcome(decode_pictures(pipe, start) if latent_upscale else start, stopped, preview_seconds)

        # Second pass: img2img over the upscaled picture, with its own scheduler (the hires sampler's) and
        # the same seeds' noise. The callback reads `conditioning` and `recorder` afresh: this pass's.
        if before_hires is not None:
            before_hires()
        steps_before = _loop_steps_run(pipe)
        sampling_steps = hires_sampling_steps
        if hires_model is not None:
            model, vae = hires_model, hires_vae
        if hires_conditioning is not None:
            conditioning = hires_conditioning
            kwargs.update(_conditioning_kwargs(conditioning, len(seeds)))
        current_conditioning = conditioning.at(0)
        scheduler = _scheduler_for(
            req, model, hr_sampler, hr_schedule, seeds, first_pass=False, picture_calls=hires_sampling_steps
        )
        wrap_unet = stand_ins.for_pass(model, conditioning, refiner, hr_sampler, hires_sampling_steps, scheduler)
        recorder = StepRecorder(scheduler, model.prediction_type)
        hires_pipe = model.pipeline_for("img2img", scheduler, traced=not req.tiling, wrap_unet=wrap_unet, vae=vae)
        variation.install(hires_pipe, scheduler)  # A1111 varies the hires pass's noise too
        reseed_after_start(hires_pipe, seeds, req.eta_noise_seed_delta)
        kwargs.update(
            num_inference_steps=hires_steps.schedule,
            generator=source.generators(seeds),  # A1111's hires pass draws from fresh generators
            output_type="pil",
            image=start,
            strength=diffusers_strength(hires_sampling_steps, hires_steps.schedule),
            eta=eta_for(hr_sampler, req.eta) or 0.0,
            guidance_scale=pipeline_guidance_scale(hr_sampler, req.cfg_scale),
        )
        for first_pass_only in ("height", "width", "latents", "mask_image", "masked_image_latents"):
            kwargs.pop(first_pass_only, None)
        if model.inpainting_unet:
            # A1111 conditions the hires pass on the upscaled picture, at the mask weight (at 1: grey alone).
            upscaled = None
            if req.inpainting_mask_weight != 1:
                upscaled = decode_pictures(hires_pipe, start) if latent_upscale else start
            kwargs.update(_repaint_all(hires_pipe, hr_width, hr_height, upscaled, weight=req.inpainting_mask_weight))
            _noise_over_the_picture(hires_pipe)
        images = hires_pipe(**kwargs).images
        return BatchOutcome(images, stopped, preview_seconds)

    sources = [req.init_images[i % len(req.init_images)] for i in range(len(seeds))]
    init_images = [resize_to(image, req.width, req.height, req.resize_mode) for image in sources]
    if sampling_steps < 1:
        # Nothing to denoise: the init image is the answer (diffusers refuses zero steps).
        return BatchOutcome([image.copy() for image in init_images], stopped)
    kwargs.update(
        image=init_images,
        strength=diffusers_strength(sampling_steps, picture.schedule),
    )
    if req.mode == "img2img":
        if model.inpainting_unet:
            kwargs.update(_repaint_all(pipe, req.width, req.height, init_images, weight=req.inpainting_mask_weight))
            _noise_over_the_picture(pipe)
        if req.resize_mode == LATENT_RESIZE:
            kwargs["image"] = _latents_resized(pipe, model, sources, req.width, req.height)
        images = corrected(req, pipe(**kwargs).images, init_images)
        return BatchOutcome(images, stopped, preview_seconds)

    kwargs.update(height=req.height, width=req.width)
    images = inpaint(pipe, kwargs, req, sources, init_images, _prepare_mask(req), seeds)
    return BatchOutcome(images, stopped, preview_seconds)


def _loop_steps_run(pipe) -> int:
    """The steps a pass's pipeline loop ran: its length, or DPM adaptive's calls."""
    scheduler = pipe.scheduler
    return scheduler.calls_made if isinstance(scheduler, A1111DPMAdaptiveScheduler) else pipe.num_timesteps


def check_for_nans(latents: torch.Tensor | None, dtype: torch.dtype, step: int) -> None:
    """NansError when a step's latents hold NaN values (A1111's NaN check): every later step and the picture would
    be NaN too, decoded as black. In half precision that is the model's numbers overflowing on the device; in
    float32, broken weights."""
    if latents is None or not torch.isnan(latents).any():
        return
    if dtype in (torch.float16, torch.bfloat16):
        advice = "in half precision the model's numbers overflow on this device: start the server with --no-half"
    else:
        advice = (
            "in float32 that points to broken weights: try the job without its LoRAs and hypernetworks, or another "
            "model file"
        )
    raise NansError(
        f"The model made NaN values at sampling step {step}, so the picture would come out black; {advice}. "
        "(--disable-nan-check turns this check off.)"
    )


def _embeds_guidance(model: LoadedModel) -> bool:
    """Whether the model's UNet takes its guidance scale as an input (LCM-distilled ones), so that no pipeline asks it
    for a negative prediction."""
    return getattr(model.components["unet"].config, "time_cond_proj_dim", None) is not None


def check_cfgpp_has_a_negative(model: LoadedModel, sampler_name: str, field: str = "sampler_name") -> None:
    """Refuse a CFG++ sampler on a model that embeds its guidance: CFG++ steps along the negative prediction, which
    such a model never makes."""
    if get_sampler(sampler_name).cfgpp and _embeds_guidance(model):
        raise InvalidRequestError(
            field,
            sampler_name,
            "another sampler for this model: it embeds its guidance, so it makes no negative prediction for "
            "DDIM CFG++ to step along",
        )


def _cfg_in_pipeline(model: LoadedModel, req: GenerationRequest, sampler_name: str) -> bool:
    """Whether diffusers' pipelines guide a pass themselves (their do_classifier_free_guidance): a batch of negative
    rows, then prompt rows."""
    return pipeline_guidance_scale(sampler_name, req.cfg_scale) > 1 and not _embeds_guidance(model)


@dataclass
class _StandIns:
    """What stands in for the UNet in each pass of a job: the refiner's switch (which Engine.validate never pairs
    with composable parts), the composable parts' guidance, or the negative-skipping UNet. Each skips the negative
    prompt where NGMS or Skip Early CFG says, counting each pass's calls afresh. The refiner's and the parts'
    stand-ins are handed to `switches` and `composed`, whose prompt-editing step the step callback moves on."""

    req: GenerationRequest
    composed: list[ComposedGuidance]
    switches: list[RefinerSwitch]

    def for_pass(
        self,
        model: LoadedModel,
        conditioning: Conditioning,
        refiner: Refiner | None,
        sampler_name: str,
        sampling_steps: int,
        scheduler,
    ) -> Callable | None:
        """A wrap_unet for pipeline_for, or None where the UNet runs as it is; `sampler_name`, `sampling_steps` and
        `scheduler` are the pass's."""
        req, cfg_in_pipeline = self.req, _cfg_in_pipeline(model, self.req, sampler_name)
        # Without the pipeline's guidance there is no negative to skip.
        skipping = (req.s_min_uncond > 0 or req.skip_early_cond > 0) and cfg_in_pipeline
        lengths = conditioning.padding is not None  # A1111's syntax: each conditioning at its own length
        cfgpp = get_sampler(sampler_name).cfgpp
        check_cfgpp_has_a_negative(model, sampler_name)  # Engine.validate checked it too, on the model loaded then
        if refiner is None and not conditioning.parts and not skipping and not lengths and not cfgpp:
            return None

        def wrap(unet):
            unet = wrap_inner(unet)
            if cfgpp:  # outermost: it sees the rows the pipeline mixes
                unet = CFGppUNet(unet, scheduler, req.cfg_scale, pipeline_guidance_scale(sampler_name, req.cfg_scale))
            return unet

        def wrap_inner(unet):
            if lengths:
                unet = NaturalLengthUNet(unet, conditioning.padding, pad=req.pad_cond_uncond)
            skip = None
            if skipping:
                alphas = noise_levels(req).alphas_cumprod(model.scheduler_config)
                skip = NegativeGuidanceSkip(
                    req.s_min_uncond,
                    req.s_min_uncond_all,
                    alphas,
                    early=req.skip_early_cond,
                    total_calls=model_calls(sampler_name, sampling_steps),
                )
            if refiner is not None:
                switch = refiner.stand_in(
                    unet, traced=not req.tiling, cfg_in_pipeline=cfg_in_pipeline, pad_conds=req.pad_cond_uncond
                )
                if skip is not None:  # one count over both UNets: each call goes to one of them
                    switch.unet = SkipNegativeUNet(switch.unet, skip)
                    switch.refiner_unet = SkipNegativeUNet(switch.refiner_unet, skip)
                self.switches.append(switch)
                return switch
            if conditioning.parts:
                guidance = ComposedGuidance(unet, conditioning, req.cfg_scale, cfg_in_pipeline, skip)
                self.composed.append(guidance)
                return guidance
            return unet if skip is None else SkipNegativeUNet(unet, skip)

        return wrap


def _conditioning_kwargs(conditioning: Conditioning, count: int) -> dict:
    positive, negative = conditioning.at(0)
    if isinstance(positive, SDXLEmbeds):
        return {
            "prompt_embeds": positive.embeds,
            "negative_prompt_embeds": negative.embeds,
            "pooled_prompt_embeds": positive.pooled,
            "negative_pooled_prompt_embeds": negative.pooled,
            "num_images_per_prompt": count,
        }
    return {"prompt_embeds": positive, "negative_prompt_embeds": negative, "num_images_per_prompt": count}


def _pipeline_prompt_embeds(pipeline, conditioning: tuple, count: int) -> dict[str, torch.Tensor]:
    """New conditioning in the layout the pipeline's denoising loop holds it (what callback_on_step_end may
    replace); SDXL's pooled output as add_text_embeds."""
    states, pooled = guidance_rows(conditioning, count, pipeline.do_classifier_free_guidance)
    return {"prompt_embeds": states} if pooled is None else {"prompt_embeds": states, "add_text_embeds": pooled}


def _repaint_all(pipe, width: int, height: int, pictures=None, *, weight: float = 1.0) -> dict:
    """What an inpainting model's UNet is given besides the latents when the whole picture is made anew (txt2img,
    img2img, a hires pass): a mask over everything and, as the masked picture, mid-grey, as A1111 conditions
    these models there; with img2img's or the hires pass's `pictures` and a mask weight below 1, A1111's
    lerp(picture, grey, weight) instead (0: the picture itself). It is encoded to its mean latents, so no random
    draw shifts the job's noise."""
    if pictures is None or weight == 1:
        pixels = torch.zeros(1, 3, height, width)  # mid-grey in the VAE's -1..1
    else:
        pixels = pipe.image_processor.preprocess(pictures, height=height, width=width) * (1 - weight)
    masked = mean_latents(pipe.vae, pixels)
    # The inpaint pipeline's size defaults to the model's native one, not the picture's: it is given.
    mask = Image.new("L", (width, height), 255)
    return {"mask_image": mask, "masked_image_latents": masked, "width": width, "height": height}


def _noise_over_the_picture(pipe) -> None:
    """Make this job's inpaint pipeline start an img2img-like pass (an inpainting model's img2img or hires pass)
    as img2img does: its noise added to the picture's latents, also at strength 1, where the inpaint pipeline
    would start from pure noise. The pipeline object is the job's own."""
    prepare = pipe.prepare_latents

    @functools.wraps(prepare)
    def prepare_over_the_picture(*args, **kwargs):
        return prepare(*args, **{**kwargs, "is_strength_max": False})

    pipe.prepare_latents = prepare_over_the_picture


def _latents_resized(pipe, model: LoadedModel, images, width: int, height: int) -> torch.Tensor:
    """A1111's "Just resize (latent upscale)": each init image encoded at its own size (to a multiple of 8)
    and its latents resized to the generation size, bilinear. Encoded to its mean latents, as the pipeline
    encodes a picture (engine.vae.encode_to_means)."""
    size = model.latent_shape(width, height)[2:]
    latents = []
    for image in images:
        fitted = image.resize((max(8, image.width // 8 * 8), max(8, image.height // 8 * 8)))
        encoded = mean_latents(pipe.vae, pipe.image_processor.preprocess(fitted))
        latents.append(torch.nn.functional.interpolate(encoded, size=size, mode="bilinear"))
    return torch.cat(latents)


def _prepare_mask(req: GenerationRequest) -> Image.Image:
    mask = req.mask
    if req.inpainting_mask_invert:
        mask = Image.eval(mask, lambda value: 255 - value)
    mask = resize_to(mask, req.width, req.height, req.resize_mode)
    if req.mask_blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(req.mask_blur))
    return mask
