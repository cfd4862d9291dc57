"""Starting noise from seeds, with A1111's random sources, variation seeds and "resize seed from".

An image's noise is the first draw of a generator seeded with its seed, and the noise its steps add (ancestral
samplers, DDIM's eta) the draws after it, as in A1111's ImageRNG. The generator is one of A1111's random sources
(`randn_source`):

- CPU: torch's CPU generator, the same numbers on every machine (this engine's default);
- NV: the numbers torch draws on an NVIDIA GPU (engine/philox.py), which A1111 uses by default there: a picture
  made on an NVIDIA card with A1111's default "GPU" source, or its "NV" one, comes out the same here.

A1111's two seed extras change the starting noise, and are rebuilt here to the same numbers:

- Variation seed (`subseed`, `subseed_strength`): the noise of a second seed is blended in by spherical
  interpolation; strength 0 is the seed's own noise, strength 1 the variation seed's.
- Resize seed from (`seed_resize_from_w` x `seed_resize_from_h`): the seed's noise is drawn at that size
  and pasted into the middle of the real size's noise (or cropped from its middle), so a picture keeps
  its composition at a slightly different size.

txt2img starts from this noise. img2img, inpaint and the hires fix pass add noise to a picture through
the scheduler's add_noise; `NoiseVariation.install` makes the job's scheduler vary that noise the same
way, so variation seeds work in every mode. Their noise is the first draw of each image's generator too: the
picture is encoded to its mean latents (engine.vae.encode_to_means), which draws nothing.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .philox import PhiloxNoise

# A1111's random sources this engine draws from (its "GPU" source is NV's numbers on an NVIDIA card).
RANDOM_SOURCES = ("CPU", "NV")
# Above this mean cosine the two noises count as one direction, and are mixed linearly (A1111's threshold).
_PARALLEL = 0.9995


def seed_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """The first draw of a fresh generator seeded with `seed`, float32: torch's CPU numbers, or NVIDIA's inside a
    batch drawing from the NV source (RandomSource.drawing), as every generator there draws."""
    return torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=torch.float32)


class RandomSource:
    """Where one batch's noise comes from: one of A1111's random sources (RANDOM_SOURCES). Its generators are torch
    generators whatever the source, as diffusers' pipelines and schedulers take them. With NV, while `drawing()` is
    entered every torch generator draws as a CUDA one on an NVIDIA card (PhiloxNoise, for the seed it was last
    seeded with): the batch's own, and those the SDE samplers' Brownian tree makes (torchsde seeds a fresh one
    for each draw; A1111's tree draws on the card)."""

    def __init__(self, name: str = "CPU"):
        if name not in RANDOM_SOURCES:
            raise ValueError(f"random source: got {name!r}; allowed: one of {', '.join(RANDOM_SOURCES)}")
        self.name = name

    def generators(self, seeds: Sequence[int]) -> list[torch.Generator]:
        """One generator per image, seeded with its seed: an image depends on its own seed alone, whatever the batch."""
        return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]

    def drawing(self) -> contextlib.AbstractContextManager:
        """Entered on the thread that runs the batch, around all of it: with NV, generators draw NVIDIA's noise there
        (and on no other thread: torch keeps these modes per thread)."""
        return _NvidiaDraws() if self.name == "NV" else contextlib.nullcontext()


class _NvidiaDraws(TorchFunctionMode):
    """torch.randn(..., generator=g) draws g's NVIDIA noise instead: the next draw of PhiloxNoise for the seed g was
    last seeded with (A1111's ENSD seeds the batch's generators anew after the start, and their noise starts anew
    with it). Every other call runs as it is."""

    def __init__(self):
        super().__init__()
        # Each generator drawn from, with its noise; kept for the batch, so that no other generator takes its place.
        self._noise: dict[torch.Generator, PhiloxNoise] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        generator = kwargs.get("generator")
        if not isinstance(generator, torch.Generator):
            return func(*args, **kwargs)
        if func is not torch.randn:  # nothing in the pipelines does; drawing CPU numbers would hide it
            raise RuntimeError(f"NV noise: {getattr(func, '__name__', func)} drew from a generator")
        noise = self._noise.get(generator)
        if noise is None or noise.seed != generator.initial_seed():
            noise = self._noise[generator] = PhiloxNoise(generator.initial_seed())
        size = kwargs.get("size", args[0] if len(args) == 1 and not isinstance(args[0], int) else args)
        drawn = noise.randn(tuple(size))
        return drawn.to(device=kwargs.get("device") or "cpu", dtype=kwargs.get("dtype") or torch.get_default_dtype())


def slerp(strength: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's spherical interpolation of one image's noise (C, H, W): the angle is taken per channel and
    column (norms along the height axis), which is what A1111 computes, so the numbers match it."""
    low_direction = low / torch.norm(low, dim=1, keepdim=True)
    high_direction = high / torch.norm(high, dim=1, keepdim=True)
    cosine = (low_direction * high_direction).sum(1)
    if cosine.mean() > _PARALLEL:
        # A1111 writes this near-parallel case with the weights this way round; kept so the numbers match.
        return low * strength + high * (1 - strength)
    angle = torch.acos(cosine)
    sine = torch.sin(angle)
    low_weight = (torch.sin((1.0 - strength) * angle) / sine).unsqueeze(1)
    high_weight = (torch.sin(strength * angle) / sine).unsqueeze(1)
    return low_weight * low + high_weight * high


def paste_centred(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """`target` (C, H, W) with `source` (C, h, w) laid over its middle; a larger source is cropped to its
    middle. Offsets round as A1111's do (floor of half the difference)."""
    result = target.clone()
    rows = _overlap(target.shape[1], source.shape[1])
    cols = _overlap(target.shape[2], source.shape[2])
    (to_y, from_y, height), (to_x, from_x, width) = rows, cols
    result[:, to_y : to_y + height, to_x : to_x + width] = source[:, from_y : from_y + height, from_x : from_x + width]
    return result


def _overlap(target_side: int, source_side: int) -> tuple[int, int, int]:
    """(start in target, start in source, length) of a source centred on a target along one axis."""
    offset = (target_side - source_side) // 2
    if offset >= 0:
        return offset, 0, source_side
    return 0, -offset, source_side + 2 * offset


class NoiseVariation:
    """A1111's variation seed and seed resize for one batch: image i has seed `seeds[i]` and variation
    seed `subseeds[i]`. `resize_from_latent` is the latent (height, width) of the size the seed's noise
    is drawn at, or None. `multiplier` is A1111's noise multiplier for img2img: the noise added to the
    picture is scaled by it once varied, as A1111 scales the noise it drew. `extra` is A1111's extra noise
    multiplier for img2img and hires fix: the pass's starting latents get that noise once more, times `extra`
    (in k-diffusion's space, where the picture gets it times sigma; diffusers' variance-preserving schedulers
    scale both by their alpha, as A1111's DDIM does)."""

    def __init__(
        self,
        seeds: Sequence[int],
        subseeds: Sequence[int],
        strength: float,
        resize_from_latent: tuple[int, int] | None = None,
        multiplier: float = 1.0,
        extra: float = 0.0,
    ):
        self.seeds = list(seeds)
        self.subseeds = list(subseeds)
        self.strength = float(strength)
        self.resize_from_latent = resize_from_latent
        self.multiplier = float(multiplier)
        self.extra = float(extra)
        self._starting = False  # in the pipeline's prepare_latents: the add_noise that makes the start
        # The noise last varied and what it became: a pipeline hands the same noise tensor to add_noise
        # on every step of an inpaint, and must get the same varied noise back each time.
        self._source: torch.Tensor | None = None
        self._varied: torch.Tensor | None = None

    @property
    def varies(self) -> bool:
        return self.strength != 0 or self.resize_from_latent is not None

    @property
    def active(self) -> bool:
        return self.varies or self.multiplier != 1 or self.extra != 0

    def vary(self, noise: torch.Tensor) -> torch.Tensor:
        """The batch's noise (N, C, H, W), each image's changed by its variation seed and seed resize."""
        if not self.varies:
            return noise
        if noise is self._source or noise is self._varied:
            return self._varied
        images = [self._vary_one(image.float().cpu(), index) for index, image in enumerate(noise)]
        varied = torch.stack(images).to(noise.device, noise.dtype)
        self._source, self._varied = noise, varied
        return varied

    def _vary_one(self, base: torch.Tensor, index: int) -> torch.Tensor:
        # A batch larger than the seed list repeats it (num_images_per_prompt over one seed list).
        seed = self.seeds[index % len(self.seeds)]
        subseed = self.subseeds[index % len(self.subseeds)]
        channels = base.shape[0]
        resized = self.resize_from_latent is not None and tuple(self.resize_from_latent) != tuple(base.shape[1:])
        # With a seed resize the seed's noise is drawn afresh at the other size; otherwise it is `base`.
        noise = seed_noise(seed, (channels, *self.resize_from_latent)) if resized else base
        if self.strength != 0:
            noise = slerp(self.strength, noise, seed_noise(subseed, noise.shape))
        return paste_centred(base, noise) if resized else noise

    def _scaled(self, noise: torch.Tensor) -> torch.Tensor:
        varied = self.vary(noise)
        return varied * self.multiplier if self.multiplier != 1 else varied

    def install(self, pipe, scheduler) -> None:
        """Vary (and scale) the noise that this job's img2img, inpaint or hires pass adds to its picture. Both
        objects belong to one job (the pipeline object and scheduler are made per job), so nothing is shared."""
        if not self.active:
            return
        scheduler.add_noise = self._varied_add_noise(scheduler.add_noise)
        if "is_strength_max" in inspect.signature(pipe.prepare_latents).parameters:
            # An inpaint pipeline at strength 1 starts from pure noise without calling add_noise.
            pipe.prepare_latents = self._wrap_inpaint_latents(pipe.prepare_latents, scheduler)
        if self.extra:
            pipe.prepare_latents = self._marking_the_start(pipe.prepare_latents)

    def _varied_add_noise(self, add_noise: Callable) -> Callable:
        """add_noise(original_samples, noise, timesteps) with `noise` varied, passed by position or name; at the
        start of a pass, with the extra noise added."""
        signature = inspect.signature(add_noise)

        @functools.wraps(add_noise)
        def varied_add_noise(*args, **kwargs):
            original, noise, timesteps = signature.bind(*args, **kwargs).args[:3]
            noise = self._scaled(noise)
            noisy = add_noise(original, noise, timesteps)
            if self.extra and self._starting:
                # 1 for a variance-exploding scheduler, the alpha of `timesteps` for a variance-preserving one.
                unit = add_noise(torch.ones_like(original), torch.zeros_like(noise), timesteps)
                noisy = noisy + noise * self.extra * unit
            return noisy

        return varied_add_noise

    def _marking_the_start(self, prepare_latents: Callable) -> Callable:
        """prepare_latents, during which add_noise makes the pass's start (an inpaint pipeline calls add_noise
        on every step too, to blend the picture back in; those get no extra noise)."""

        @functools.wraps(prepare_latents)
        def marked_prepare_latents(*args, **kwargs):
            self._starting = True
            try:
                return prepare_latents(*args, **kwargs)
            finally:
                self._starting = False

        return marked_prepare_latents

    def _wrap_inpaint_latents(self, prepare_latents: Callable, scheduler) -> Callable:
        @functools.wraps(prepare_latents)
        def varied_prepare_latents(*args, **kwargs):
            outputs = prepare_latents(*args, **kwargs)
            if not kwargs.get("is_strength_max", True) or not isinstance(outputs, tuple) or len(outputs) < 2:
                return outputs  # below strength 1 the noise went through add_noise, already varied
            _latents, noise, *rest = outputs
            varied = self.vary(noise)
            # The noise handed back is scaled again where add_noise uses it.
            return (self._scaled(noise) * scheduler.init_noise_sigma, varied, *rest)

        return varied_prepare_latents


def reseed_after_start(pipe, seeds: Sequence[int], delta: int) -> None:
    """A1111's eta noise seed delta (ENSD) for this job's pipeline: once a pass has drawn its starting noise
    (prepare_latents; txt2img's was drawn before it), each image's generator is seeded with its seed + `delta`,
    so the noise its steps add comes from there, as in A1111's ImageRNG. The pipeline object is the job's own."""
    if not delta:
        return

    def reseed(generators) -> None:
        generators = generators if isinstance(generators, list) else [generators]
        for index, generator in enumerate(generators):
            generator.manual_seed(int(seeds[index % len(seeds)]) + int(delta))

    after_starting_noise(pipe, reseed)


def after_starting_noise(pipe, hook: Callable[[Any], None]) -> None:
    """Call `hook` with the generator(s) a pass draws from, each time the job's pipeline has drawn its starting noise
    (prepare_latents; txt2img's was drawn before it). The pipeline object is the job's own."""
    prepare = pipe.prepare_latents
    position = list(inspect.signature(prepare).parameters).index("generator")

    @functools.wraps(prepare)
    def prepare_latents_then(*args, **kwargs):
        outputs = prepare(*args, **kwargs)
        hook(kwargs["generator"] if "generator" in kwargs else args[position])
        return outputs

    pipe.prepare_latents = prepare_latents_then


def initial_noise(generators: Sequence[torch.Generator], shape: Sequence[int]) -> torch.Tensor:
    """txt2img's starting noise: one draw of `shape` (1, C, H, W) from each image's generator."""
    return torch.cat([torch.randn(tuple(shape), generator=generator, dtype=torch.float32) for generator in generators])
