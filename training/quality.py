"""Measurements of what the micro model draws, run through the Engine like a user's request.

Each function returns plain numbers; tools/measure_micro_quality.py prints them as a table over a
large sample, and tests/test_micro_model.py asserts on a smaller one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFilter

from engine import Engine, GenerationRequest

from . import dataset

# Settings a user would pick for each sampler: A1111's defaults, 20 steps at CFG 7, for every sampler
# (its two-evaluation ones, Heun, DPM2, DPM2 a, DPM++ 2S a and DPM++ SDE, included), except LCM, which is
# run at 4-8 steps and CFG 1-2 (with LCM weights; the LCM-LoRA model cards ask for guidance "between 1.0
# and 2.0"), and PLMS, which CompVis's txt2img.py (where it comes from) runs at its default of 50 steps.
USUAL_STEPS = {"LCM": 8, "PLMS": 50}
USUAL_CFG = {"LCM": 1.5}
DEFAULT_STEPS = 20
DEFAULT_CFG = 7.0


def usual_steps(sampler: str) -> int:
    return USUAL_STEPS.get(sampler, DEFAULT_STEPS)


def usual_cfg(sampler: str) -> float:
    return USUAL_CFG.get(sampler, DEFAULT_CFG)


def generate(engine: Engine, **fields) -> Image.Image:
    request = GenerationRequest(**fields)
    events = list(engine.generate(request))
    return events[-1].images[0]


def prompt_set(count: int, seed: int = 0) -> list[tuple[str, dataset.ShapeScene]]:
    """`count` prompts cycling through every shape/colour/background combination and caption style."""
    combos = [
        (shape, colour, background)
        for shape, colour, background in itertools.product(dataset.SHAPES, dataset.COLOURS, dataset.COLOURS)
        if colour != background
    ]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(combos))
    prompts = []
    for i in range(count):
        shape, colour, background = combos[order[i % len(combos)]]
        size = dataset.SIZES[i % 2]
        scene = dataset.ShapeScene(shape, colour, background, size, (0, 0, 0, 0))
        template = dataset.FULL_TEMPLATES[i % len(dataset.FULL_TEMPLATES)]
        prompts.append((dataset.fill_template(template, scene), scene))
    return prompts


@dataclass
class Accuracy:
    count: int
    background: float
    colour: float
    shape: float
    # Per shape asked for: (read right, asked), e.g. {"circle": (46, 56), ...}; which shape lags.
    shape_by_kind: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Per shape asked for: the median dataset.outline_match with that shape, how cleanly it is drawn
    # (a misshapen triangle still reads as a triangle by its fill ratio).
    outline_by_kind: dict[str, float] = field(default_factory=dict)


def attribute_accuracy(
    engine: Engine,
    count: int,
    *,
    sampler: str | None = None,
    steps: int = DEFAULT_STEPS,
    cfg_scale: float = DEFAULT_CFG,
    scheduler: str = "Automatic",
) -> Accuracy:
    """Shares of `count` prompts whose background, shape colour and shape are read right; the
    sampler is the model's default (what the page opens with) unless named, on its own schedule type unless
    `scheduler` names one."""
    sampler = sampler or engine.defaults().sampler_name
    hits = np.zeros(3)
    by_kind = {shape: [0, 0] for shape in dataset.SHAPES}
    outlines: dict[str, list[float]] = {}
    prompts = prompt_set(count)
    for i, (prompt, scene) in enumerate(prompts):
        image = generate(
            engine,
            prompt=prompt,
            seed=1000 + i,
            sampler_name=sampler,
            scheduler=scheduler,
            steps=steps,
            cfg_scale=cfg_scale,
        )
        reading = dataset.classify(image)
        hits += [reading.background == scene.background, reading.colour == scene.colour, reading.shape == scene.shape]
        by_kind[scene.shape][0] += reading.shape == scene.shape
        by_kind[scene.shape][1] += 1
        outlines.setdefault(scene.shape, []).append(dataset.outline_match(image, scene.shape))
    shape_by_kind = {shape: (right, asked) for shape, (right, asked) in by_kind.items() if asked}
    outline_by_kind = {shape: float(np.median(outlines[shape])) for shape in shape_by_kind}
    return Accuracy(len(prompts), *(hits / len(prompts)), shape_by_kind, outline_by_kind)


NEGATIVE_CHECK_PROMPT = "a circle on a white background"


@dataclass
class NegativeEffect:
    colour: str  # the colour given as the negative prompt
    drawn_without: int  # seeds whose circle was that colour with no negative prompt
    changed_with: int  # of those, how many are another colour with the negative prompt

    @property
    def share(self) -> float:
        return self.changed_with / self.drawn_without if self.drawn_without else float("nan")


def circle_colours(engine: Engine, seeds: range) -> dict[int, str]:
    """The colour each seed gives the circle when the prompt names none: what a negative prompt can take away."""
    return {s: dataset.classify(generate(engine, prompt=NEGATIVE_CHECK_PROMPT, seed=s)).colour for s in seeds}


def negative_prompt_effect(engine: Engine, colours_without: dict[int, str], colour: str) -> NegativeEffect:
    """Of the seeds that draw a `colour` circle unprompted, how many the negative prompt `colour` turns another colour.

    `colours_without` is `circle_colours` for the seeds to check: drawn once, it serves every colour checked.
    """
    drawn = [s for s, drawn_colour in colours_without.items() if drawn_colour == colour]
    changed = sum(
        dataset.classify(generate(engine, prompt=NEGATIVE_CHECK_PROMPT, negative_prompt=colour, seed=s)).colour
        != colour
        for s in drawn
    )
    return NegativeEffect(colour, len(drawn), changed)


EMPHASIS_CASES = [
    ("a ({w}) circle on a yellow background", "blue"),
    ("a red square on a ({w}) background", "blue"),
    ("({w}) triangle, white background", "blue"),
    ("a green circle on a ({w}) background", "blue"),
]


def emphasis_effect(engine: Engine, seeds: range) -> tuple[int, int]:
    """(cases where (blue:1.4) gives more blue pixels than (blue:0.6), cases), through the Engine."""
    return emphasis_moves(lambda prompt, seed: generate(engine, prompt=prompt, seed=seed), seeds)


def emphasis_moves(draw: Callable[[str, int], Image.Image], seeds: range) -> tuple[int, int]:
    """(cases where (blue:1.4) gives more blue pixels than (blue:0.6), cases); `draw(prompt, seed)`
    makes the picture, so the training script can measure a model it has not exported yet."""
    moved = total = 0
    for (template, word), seed in itertools.product(EMPHASIS_CASES, seeds):
        shares = []
        for weight in (0.6, 1.4):
            prompt = template.format(w=f"{word}:{weight}")
            shares.append(dataset.classify(draw(prompt, seed)).colour_share[word])
        moved += shares[1] > shares[0]
        total += 1
    return moved, total


@dataclass
class Img2ImgEffect:
    init_colour: str
    strong_colour: str  # at strength 0.75
    weak_colour: str  # at strength 0.1

    @property
    def follows_strength(self) -> bool:
        """Blue at the high strength, and still its own colour at the low one."""
        return self.strong_colour == "blue" and self.weak_colour == self.init_colour


def img2img_effect(engine: Engine, seed: int) -> Img2ImgEffect:
    """img2img_colours through the Engine."""

    def draw(prompt: str, seed: int, init: Image.Image | None = None, strength: float = 0.0) -> Image.Image:
        extra = {} if init is None else {"init_images": [init], "denoising_strength": strength}
        return generate(engine, prompt=prompt, seed=seed, **extra)

    return img2img_colours(draw, seed)


def img2img_colours(draw: Callable[..., Image.Image], seed: int) -> Img2ImgEffect:
    """A red circle (seed `seed`) redrawn from a "blue circle" prompt (seed + 1) at strengths 0.75 and
    0.1. `draw(prompt, seed, init=None, strength=0.0)` makes each picture, so the training script can
    measure a model it has not exported yet."""
    init = draw("a red circle on a white background", seed)
    colours = [dataset.classify(init).colour]
    for strength in (0.75, 0.1):
        colours.append(dataset.classify(draw("a blue circle on a white background", seed + 1, init, strength)).colour)
    return Img2ImgEffect(*colours)


@dataclass
class InpaintEffect:
    masked_change: float  # mean absolute change inside the mask, 0..255
    outside_change: float  # mean absolute change outside the (blurred) mask
    vae_round_trip: float  # mean absolute error of encoding and decoding the picture, outside the mask
    colour_inside: str  # dominant non-background colour inside the mask afterwards


def inpaint_effect(engine: Engine, seed: int) -> InpaintEffect:
    import torch

    init = generate(engine, prompt="a large red square on a white background", seed=seed)
    labels = dataset.nearest_palette(np.asarray(init))
    ys, xs = np.nonzero(labels == dataset.COLOURS.index(dataset.classify(init).colour))
    mask = Image.new("L", init.size, 0)
    box = (max(0, xs.min() - 3), max(0, ys.min() - 3), min(63, xs.max() + 3), min(63, ys.max() + 3))
    mask.paste(255, box)
    result = generate(
        engine,
        prompt="a large blue square on a white background",
        seed=seed,
        init_images=[init],
        mask=mask,
        denoising_strength=0.9,
        mask_blur=2,
    )
    before, after = np.asarray(init).astype(float), np.asarray(result).astype(float)
    inside = np.asarray(mask) > 0
    # Outside the mask as the blur widened it: those pixels must be the init's own.
    outside = np.asarray(mask.filter(ImageFilter.MaxFilter(9))) == 0
    vae = engine.loaded.components["vae"]
    with torch.no_grad():
        tensor = torch.from_numpy(before).permute(2, 0, 1)[None].float() / 127.5 - 1
        tensor = tensor.to(next(vae.parameters()).dtype)
        decoded = vae.decode(vae.encode(tensor).latent_dist.mean).sample.float().clamp(-1, 1)
    round_trip = ((decoded[0].permute(1, 2, 0).numpy() + 1) * 127.5).round()
    region = dataset.nearest_palette(np.asarray(result))[inside]
    counts = np.bincount(region, minlength=len(dataset.COLOURS))
    counts[dataset.COLOURS.index("white")] = 0
    return InpaintEffect(
        masked_change=float(np.abs(after - before)[inside].mean()),
        outside_change=float(np.abs(after - before)[outside].mean()),
        vae_round_trip=float(np.abs(round_trip - before)[outside].mean()),
        colour_inside=dataset.COLOURS[int(counts.argmax())],
    )


def sampler_background_accuracy(engine: Engine, sampler: str, count: int) -> float:
    """Share of `count` prompts whose background `sampler` draws right at its usual settings."""
    accuracy = attribute_accuracy(
        engine, count, sampler=sampler, steps=usual_steps(sampler), cfg_scale=usual_cfg(sampler)
    )
    return accuracy.background


@dataclass
class GuidanceStiffness:
    """How sharply guidance makes the denoiser answer a change of the latent, at one noise level.

    Samplers integrate dx/dsigma = (x - D(x)) / sigma; an eigenvalue `guided` of D's Jacobian makes
    that direction change at (1 - guided) / sigma, and explicit steps are stable only while the step
    times that rate stays small -- fourth-order multistep steps (LMS, PLMS) tolerate the least.
    """

    sigma: float
    guided: float  # the eigenvalue of the guided denoiser's Jacobian farthest from zero
    conditional: float  # how far the prompt's own denoiser follows the latent along that direction
    unconditional: float  # the same for the empty prompt's denoiser
    residual: float  # |J v - guided v| / |guided|: how well the power iteration converged


# A large shape on a background that fills most of the picture: the case where LMS breaks up.
STIFFNESS_SCENE = dataset.ShapeScene("circle", "red", "blue", "large", (12, 12, 48, 48))


def guidance_stiffness(
    engine: Engine,
    sigmas: list[float],
    *,
    scene: dataset.ShapeScene = STIFFNESS_SCENE,
    cfg_scale: float = DEFAULT_CFG,
    seed: int = 0,
    iterations: int = 30,
) -> list[GuidanceStiffness]:
    """Power iteration on the Jacobian of the CFG-guided denoiser D = u + cfg * (c - u) at latents of
    `scene`'s own picture noised to each sigma, with finite differences (epsilon-prediction models)."""
    import torch

    components = engine.loaded.components
    vae = components["vae"]
    denoised = unet_denoiser(
        components, dataset.fill_template(dataset.FULL_TEMPLATES[0], scene), engine.loaded.scheduler_config
    )
    with torch.no_grad():
        picture = torch.from_numpy(np.array(dataset.draw_scene(scene))).permute(2, 0, 1)[None].float() / 127.5 - 1
        clean = vae.encode(picture.to(vae.dtype)).latent_dist.mean.float() * vae.config.scaling_factor
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(clean.shape, generator=generator)

    def jacobian_products(latent, sigma, direction, step=1e-2):
        plus, minus = denoised(latent + step * direction, sigma), denoised(latent - step * direction, sigma)
        unconditional, conditional = ((p - m) / (2 * step) for p, m in zip(plus, minus, strict=True))
        return unconditional, conditional, unconditional + cfg_scale * (conditional - unconditional)

    readings = []
    for sigma in sigmas:
        latent = clean + sigma * noise
        direction = torch.randn(clean.shape, generator=generator)
        direction /= direction.norm()
        for _ in range(iterations):
            unconditional, conditional, guided = jacobian_products(latent, sigma, direction)
            eigenvalue = float((guided * direction).sum())
            previous, direction = direction, guided / guided.norm()
        readings.append(
            GuidanceStiffness(
                sigma=sigma,
                guided=eigenvalue,
                conditional=float((conditional * previous).sum()),
                unconditional=float((unconditional * previous).sum()),
                residual=float((guided - eigenvalue * previous).norm()) / max(abs(eigenvalue), 1e-6),
            )
        )
    return readings


def unet_denoiser(components: dict, prompt: str, scheduler_config: dict):
    """The model's UNet and text encoder as a function (A1111's x = y + sigma * noise, sigma) -> (the
    empty prompt's denoised latent, `prompt`'s), for epsilon-prediction models."""
    import torch
    from diffusers import DDPMScheduler

    unet, tokenizer, text_encoder = components["unet"], components["tokenizer"], components["text_encoder"]
    dtype = next(unet.parameters()).dtype
    alphas = DDPMScheduler.from_config(scheduler_config).alphas_cumprod.double()
    log_sigmas = (((1 - alphas) / alphas) ** 0.5).log().numpy()

    def embed(text: str) -> torch.Tensor:
        ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
        return text_encoder(ids.input_ids)[0]

    with torch.no_grad():
        conditioning = torch.cat([embed(""), embed(prompt)]).to(dtype)

    def denoise(latent: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        # A1111's k-diffusion wrapper: the timestep whose sigma this is, interpolated in log sigma.
        timestep = torch.tensor(float(np.interp(np.log(sigma), log_sigmas, np.arange(len(log_sigmas)))))
        scaled = (latent / (1 + sigma**2) ** 0.5).repeat(2, 1, 1, 1).to(dtype)
        with torch.no_grad():
            eps = unet(scaled, timestep, encoder_hidden_states=conditioning).sample.float()
        return latent - sigma * eps[:1], latent - sigma * eps[1:]

    return denoise
