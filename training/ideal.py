"""The ideal denoiser of the shapes dataset, and a sampling loop that runs any denoiser through the
engine's own schedulers.

The denoiser that minimises the training loss exactly, for pictures drawn uniformly from a finite set of
clean latents y_i, is the posterior mean E[y | x] with x = y + sigma * noise: a softmax over -|x - y_i|^2
/ (2 sigma^2) weighting the y_i. Given a full caption the set is the training pictures that match it;
for the empty prompt it is all of them. Sampling it shows what the bars ask of the data itself: where
the ideal denoiser fails, no training can do better by fitting the data more closely.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from engine.cfgpp import CFGPP_DIVISOR
from engine.previews import DecoderPreviewer
from engine.samplers import build_scheduler, get_sampler

from . import dataset, quality
from .train_micro import encode_pictures, training_pictures

# (latent, sigma) -> (the empty prompt's denoised latent, the prompt's), both in A1111's x = y + sigma * n.
Denoiser = Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


class IdealDenoiser:
    """Posterior means over a set of clean latents [count, 4, h, w] (already scaled by the VAE's factor)."""

    def __init__(self, latents: torch.Tensor, scenes: list[dataset.ShapeScene]):
        self.flat = latents.reshape(len(latents), -1).double()
        self.squared_norms = (self.flat**2).sum(1)
        self.scenes = scenes

    def matching(self, scene: dataset.ShapeScene, size_named: bool) -> torch.Tensor:
        """Indices of the pictures a full caption of `scene` describes (its size only if named); ValueError when
        none does, since the posterior mean over no pictures has no value."""
        rows = [
            i
            for i, other in enumerate(self.scenes)
            if (other.shape, other.colour, other.background) == (scene.shape, scene.colour, scene.background)
            and (other.size == scene.size or not size_named)
        ]
        if not rows:
            size = f"{scene.size} " if size_named else ""
            raise ValueError(
                f"no picture of the {len(self.scenes)} is a {size}{scene.colour} {scene.shape} on {scene.background}: "
                "use more pictures (tools/ideal_denoiser_samplers.py --pictures)"
            )
        return torch.tensor(rows, dtype=torch.long)

    def mean(self, latent: torch.Tensor, sigma: float, rows: torch.Tensor | None = None) -> torch.Tensor:
        """E[y | latent] over `rows` (all pictures when None)."""
        flat = self.flat if rows is None else self.flat[rows]
        squared = self.squared_norms if rows is None else self.squared_norms[rows]
        # |x - y|^2 without |x|^2, which is the same for every y and cancels in the softmax.
        logits = -(squared - 2 * flat @ latent.reshape(-1).double()) / (2 * sigma**2)
        return (torch.softmax(logits, 0) @ flat).to(latent.dtype).reshape(latent.shape)

    def for_scene(self, scene: dataset.ShapeScene, size_named: bool) -> Denoiser:
        rows = self.matching(scene, size_named)
        return lambda latent, sigma: (self.mean(latent, sigma), self.mean(latent, sigma, rows))


def sample(
    denoiser: Denoiser,
    scheduler_config: dict,
    sampler: str,
    *,
    steps: int,
    cfg_scale: float,
    seed: int,
    latent_shape: tuple[int, ...] = (1, 4, 16, 16),
) -> torch.Tensor:
    """The latent `sampler` ends on at A1111's settings, with `denoiser` in place of UNet and prompt.

    Works in every scheduler's own space: k-diffusion-style ones scale the model's input (A1111's x is
    their sample), the others keep variance-preserving samples, x * sqrt(alpha)."""
    scheduler = build_scheduler(scheduler_config, sampler, "Automatic", seed=seed)
    scheduler.set_timesteps(steps)
    cfgpp = get_sampler(sampler).cfgpp
    if cfgpp:  # A1111's CFG++ guides at CFG scale / 12.5 (engine/cfgpp.py)
        cfg_scale = cfg_scale / CFGPP_DIVISOR
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(latent_shape, generator=generator) * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps:
        if getattr(scheduler, "finished", False):  # DPM adaptive's pass is done: a job's step callback ends it there
            break
        scaled = scheduler.scale_model_input(latent, timestep)
        if not torch.equal(scaled, latent):  # scaled by 1 / sqrt(sigma^2 + 1)
            sigma = float(((latent.norm() / scaled.norm()) ** 2 - 1).clamp(min=1e-12).sqrt())
            spread = latent
        else:
            if hasattr(scheduler, "sigmas"):
                sigma = float(scheduler.sigmas[scheduler.step_index or 0])
            else:
                alpha = float(scheduler.alphas_cumprod[int(timestep)])
                sigma = ((1 - alpha) / alpha) ** 0.5
            spread = latent * (sigma**2 + 1) ** 0.5
        unconditional, conditional = denoiser(spread, sigma)
        guided = unconditional + cfg_scale * (conditional - unconditional)
        noise_prediction = (spread - guided) / sigma
        if cfgpp:  # what CFGppUNet hands the scheduler in a pipeline
            scheduler.negative_prediction = (spread - unconditional) / sigma
        extra = {"generator": generator} if takes_generator else {}
        latent = scheduler.step(noise_prediction, timestep, latent, **extra).prev_sample
    return latent


def background_hits(
    denoiser_for: Callable[[str, dataset.ShapeScene], Denoiser],
    vae,
    scheduler_config: dict,
    sampler: str,
    *,
    cfg_scale: float,
    steps: int,
    prompts: int,
) -> int:
    """How many of quality.prompt_set(prompts) `sampler` draws on the right background, seeds 1000 on."""
    decode = DecoderPreviewer(vae, vae.config.scaling_factor)
    hits = 0
    for index, (prompt, scene) in enumerate(quality.prompt_set(prompts)):
        latent = sample(
            denoiser_for(prompt, scene), scheduler_config, sampler, steps=steps, cfg_scale=cfg_scale, seed=1000 + index
        )
        hits += dataset.classify(decode(latent[0])).background == scene.background
    return hits


def training_set_denoiser(vae, pictures: int, seed: int = 0) -> IdealDenoiser:
    """The ideal denoiser of the first `pictures` training pictures of `seed`, encoded by `vae`."""
    scenes, images = training_pictures(pictures, seed)
    return IdealDenoiser(encode_pictures(vae, images.to(vae.dtype)).float(), scenes)
