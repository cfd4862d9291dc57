"""GenerationRequest: one job, in the field names of the A1111 API payload, and its validation."""

from __future__ import annotations

import dataclasses
import math
import secrets
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from . import loopback, outpaint, outpaint_mk2, sd_upscale
from .errors import InvalidRequestError
from .images import LATENT_RESIZE, RESIZE_MODES, to_pil
from .negative_guidance import MAX_NGMS
from .noise import RANDOM_SOURCES
from .outpaint import DIRECTIONS as OUTPAINT_DIRECTIONS
from .outpaint_mk2 import DEFAULTS as OUTPAINT_MK2_DEFAULTS
from .tiles import plan_tiles

# A1111 draws random seeds from [0, 2**32).
SEED_MAX = 2**32 - 1
# A1111's setting slider for the img2img noise multiplier goes to 1.5.
MAX_NOISE_MULTIPLIER = 1.5
# A1111's sigma noise slider goes to 1.1.
MAX_SIGMA_NOISE = 1.1
# A1111's sigma churn, tmin and tmax sliders go to 100, 10 and 999.
MAX_SIGMA_CHURN, MAX_SIGMA_TMIN, MAX_SIGMA_TMAX = 100.0, 10.0, 999.0
# A1111's schedule min and max sigma sliders go to 2 and 60; its rho box has no end, and 100 is far past any use.
MAX_SCHEDULE_SIGMA_MIN = 2.0
MAX_SCHEDULE_SIGMA_MAX = 60.0
MAX_SCHEDULE_RHO = 100.0
# A1111's Beta schedule sliders go from 0.01 to 1 (Forge's to 2, which is taken too).
MIN_BETA_SHAPE, MAX_BETA_SHAPE = 0.01, 2.0
# A1111's UniPC order slider goes to 50.
MAX_UNIPC_ORDER = 50
# A1111's Clip skip setting goes to 12 (a model's text encoder may have fewer layers: it refuses more).
MAX_CLIP_SKIP = 12

# A1111's noise schedules for sampling: the model's own, or rescaled to zero terminal SNR.
NOISE_SCHEDULES = ("Default", "Zero Terminal SNR")
# A1111's UniPC settings' choices (its "vary_coeff" variant is not offered).
UNIPC_VARIANTS = ("bh1", "bh2")
UNIPC_SKIP_TYPES = ("time_uniform", "time_quadratic", "logSNR")

PROMPT_SYNTAXES = ("a1111", "compel")
# A1111's hires fix upscalers that need no extra model: latent ones (F.interpolate mode, antialias) and
# picture ones (decode, resize with PIL, encode again).
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
PICTURE_UPSCALERS = ("None", "Lanczos", "Nearest")
HR_UPSCALERS = (*LATENT_UPSCALERS, *PICTURE_UPSCALERS)
EMPHASIS_MODES = ("Original", "No norm", "Ignore")


@dataclass
class GenerationRequest:
    """What to generate. `width`/`height` None means the model's native size; `seed` -1 means random.

    Modes follow from the fields: no `init_images` is txt2img; `init_images` is img2img;
    `init_images` plus `mask` (white = repaint) is inpaint.
    """

    prompt: str = ""
    negative_prompt: str = ""
    sampler_name: str = "Euler a"
    scheduler: str = "Automatic"
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = -1
    # A1111's variation seed: `subseed`'s noise blended into the seed's at `subseed_strength` (0: off,
    # 1: all the variation seed's); -1 is random. With a strength above 0 a batch keeps one seed and
    # counts up the variation seed instead, so it shows variations of one picture.
    subseed: int = -1
    subseed_strength: float = 0.0
    # A1111's "Resize seed from": draw the seed's noise at this size (both above 0; 0 or -1 is off) and
    # centre it in the real size's, so a picture keeps its layout at a nearby size.
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1
    init_images: list[Any] | None = None
    mask: Any | None = None
    denoising_strength: float = 0.75
    mask_blur: int = 4
    inpainting_mask_invert: int = 0
    # A1111's img2img resize mode (engine.images.RESIZE_MODES): how an init image (and mask) of another
    # size is brought to width x height. 3 resizes img2img's latents instead of its pixels.
    resize_mode: int = 0
    # A1111's "Inpaint area": False is "Whole picture"; True is "Only masked", which inpaints the region
    # around the mask (inpaint_full_res_padding pixels wider) at the generation size and pastes it back.
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 32
    # A1111's "Masked content" (engine.inpaint.MASKED_CONTENT): what the masked part starts from; 1 is
    # the original picture.
    inpainting_fill: int = 1
    # Infotext keys this engine does not act on (Clip skip, Version, ...), kept so that
    # reading an image's parameters and writing them again loses nothing.
    extra_params: dict[str, str] = field(default_factory=dict)
    # How prompt text is read: "a1111" (attention brackets, BREAK, prompt editing) or "compel"
    # (word+, (words)1.3, .blend(), .and()); and A1111's emphasis mode for the a1111 syntax.
    prompt_syntax: str = "a1111"
    emphasis: str = "Original"
    # A1111's "Tiling": pictures whose edges continue each other, so they tile seamlessly.
    tiling: bool = False
    # A1111's eta: how much fresh noise an ancestral step adds (Euler a, DPM2 a: 1 by default) or DDIM's (0 by default);
    # None is the sampler's default. Samplers that take none here ignore it.
    eta: float | None = None
    # A1111's "sigma noise" (s_noise): scales the fresh noise the steps of its stochastic samplers add (DPM2 a,
    # DPM++ SDE, DPM++ 2M SDE and its Heun variant, DPM++ 3M SDE, the sigma churn of Euler, Heun and DPM2); 1 is as drawn.
    s_noise: float = 1.0
    # A1111's sigma churn (s_churn; Euler, Heun and DPM2): noise added back before each step whose sigma is from s_tmin to
    # s_tmax (0: no upper end), raising it by up to sqrt(2) times; 0 is off.
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = 0.0
    # A1111's "SGM noise multiplier": txt2img's k-diffusion samplers start from noise x sqrt(1 + sigma^2) rather than
    # noise x sigma, as SDXL's own code does.
    sgm_noise_multiplier: bool = False
    # A1111's "Always discard next-to-last sigma": every k-diffusion sampler makes its schedule one step longer and
    # drops the sigma before the last, as DPM2, DPM2 a and DPM++ 3M SDE always do.
    always_discard_penultimate_sigma: bool = False
    # A1111's "Noise schedule for sampling" (NOISE_SCHEDULES): "Zero Terminal SNR" rescales the model's noise levels so
    # the last one is (almost) pure noise, for models trained so; "Default" is the model's own.
    noise_schedule: str = "Default"
    # A1111's "Downcast model alphas_cumprod to fp16 before sampling": the noise levels rounded as half precision
    # rounds them, to make pictures of older versions again.
    downcast_alphas_cumprod: bool = False
    # A1111's schedule min sigma, max sigma and rho (its sigma_min, sigma_max and rho settings): the ends of the
    # Karras, Exponential and Beta schedules, and the Karras curve's rho. 0 is the schedule's own (the model's
    # sigma range; rho 7).
    sigma_min: float = 0.0
    sigma_max: float = 0.0
    rho: float = 0.0
    # A1111's Beta schedule's alpha and beta (its beta_dist_alpha and beta_dist_beta): the shape of the beta
    # distribution whose quantiles space the Beta schedule's sigmas.
    beta_dist_alpha: float = 0.6
    beta_dist_beta: float = 0.6
    # A1111's "Eta noise seed delta" (ENSD): after each picture's starting noise is drawn, the noise its steps
    # draw comes from seed + this, as A1111 does it (31337 in NovelAI-era infotexts); 0 leaves it.
    eta_noise_seed_delta: int = 0
    # A1111's "Noise multiplier for img2img": the noise img2img and inpaint add to the picture, scaled (1 leaves it).
    initial_noise_multiplier: float = 1.0
    # A1111's "Inpainting conditioning mask strength" (inpainting_mask_weight), for inpainting models only: how much
    # of the masked part their masked-picture input blanks, 1 all of it (the default), 0 none (the whole picture,
    # which keeps img2img's composition on such a model). txt2img is unaffected, as in A1111.
    inpainting_mask_weight: float = 1.0
    # A1111's "Negative Guidance minimum sigma" (NGMS, engine/negative_guidance.py): every other UNet call below this
    # noise level leaves the negative prompt out, or every such call with `s_min_uncond_all`. 0 is off.
    s_min_uncond: float = 0.0
    s_min_uncond_all: bool = False
    # A1111's "Pad prompt/negative prompt to be same length" (Pad conds): a prompt and a negative prompt of different
    # chunk counts are padded to one length with empty-prompt chunks and batched; off, the UNet is asked at each one's
    # own length, separately (A1111's default; engine/pad_conds.py). A1111's prompt syntax only.
    pad_cond_uncond: bool = False
    # A1111's "With img2img, do exactly the amount of steps the slider specifies" (img2img_fix_steps): img2img and
    # inpaint run their Sampling steps, the last of a schedule made steps / strength long, as the hires pass always
    # does (engine.samplers.picture_steps); off, they run about strength x steps of a schedule of steps.
    img2img_fix_steps: bool = False
    # A1111's UniPC settings (engine.samplers.A1111UniPCScheduler): its variant (UNIPC_VARIANTS), skip type
    # (UNIPC_SKIP_TYPES), order (at most the steps) and lower order final.
    unipc_variant: str = "bh1"
    unipc_skip_type: str = "time_uniform"
    unipc_order: int = 3
    unipc_lower_order_final: bool = True
    # A1111's "Random number generator source" (engine/noise.py): CPU (torch's CPU generator, the same on every
    # machine) or NV (the numbers an NVIDIA GPU draws, A1111's default there).
    randn_source: str = "CPU"
    # A1111's "Ignore negative prompt during early sampling" (Skip Early CFG): the share of each pass's UNet calls,
    # from the first, that leave the negative prompt out. 0 is off.
    skip_early_cond: float = 0.0
    # A1111's "Extra noise multiplier for img2img and hires fix" (img2img_extra_noise): a pass that starts from a
    # picture gets its noise once more, times this, on top of what its denoising strength adds. 0 is off.
    img2img_extra_noise: float = 0.0
    # A1111's "Apply color correction to img2img results to match original colors" (engine/color_correction.py):
    # img2img and inpaint results get their init image's colour distribution, keeping their own luminosity.
    color_correction: bool = False
    # The picture colour correction matches instead of each init image (Loopback's first picture, for every
    # loop, as A1111 keeps it); set by the engine, not asked for.
    color_reference: Image.Image | None = None
    # A1111's "SD VAE": "Automatic" (a VAE named after the checkpoint beside it, else the model's own),
    # "None" (the model's own), or a file in the VAE folder. Engine.validate checks it against the folder.
    sd_vae: str = "Automatic"
    # A1111's prompt styles (names in styles.csv): Engine.validate merges them into prompt and
    # negative_prompt and empties this, so what runs, and its infotext, holds the merged prompts.
    styles: list[str] | None = None
    # A1111's hires fix (txt2img): make the picture at width x height, upscale it by hr_scale (or to
    # hr_resize_x x hr_resize_y) and run img2img over it at denoising_strength for hr_second_pass_steps
    # (0: as many as steps).
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    # The hires pass's own sampler, schedule type and prompts; empty (or A1111's "Use same sampler" /
    # "Use same scheduler") means the first pass's.
    hr_sampler_name: str = ""
    hr_scheduler: str = ""
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    # A1111's "Hires checkpoint": the hires pass runs on this model (a title or name from the checkpoint list);
    # empty, or "Use same checkpoint", is the loaded one. Engine.validate resolves it to the model's title.
    hr_checkpoint_name: str = ""
    # A1111's refiner: this model (a title or name; empty or "None" for none) takes over the sampling at
    # refiner_switch_at of the schedule (engine/refiner.py). Engine.validate resolves it to the model's title.
    refiner_checkpoint: str = ""
    refiner_switch_at: float = 0.8
    # A1111's "SD upscale" script (img2img, engine/sd_upscale.py): the init image upscaled sd_upscale_scale times by
    # sd_upscale_upscaler, cut into width x height tiles overlapping by sd_upscale_overlap pixels, each tile redrawn
    # by img2img, and the tiles joined again.
    sd_upscale: bool = False
    sd_upscale_overlap: int = 64
    sd_upscale_upscaler: str = "Lanczos"
    sd_upscale_scale: float = 2.0
    # A1111's "Loopback" script (img2img and inpaint, engine/loopback.py): each picture the init image of the
    # next, loopback_loops times, the denoising strength moving to loopback_final_denoising along loopback_curve.
    loopback: bool = False
    loopback_loops: int = 4
    loopback_final_denoising: float = 0.5
    loopback_curve: str = "Linear"
    # A1111's "Poor man's outpainting" script (img2img, engine/outpaint.py): the picture grown by outpaint_pixels on
    # outpaint_directions, the new border inpainted tile by tile (mask_blur and inpainting_fill are the script's).
    outpaint: bool = False
    outpaint_pixels: int = 128
    outpaint_directions: tuple[str, ...] = OUTPAINT_DIRECTIONS
    # A1111's "Outpainting mk2" script (img2img, engine/outpaint_mk2.py): the picture grown by outpaint_mk2_pixels on
    # outpaint_mk2_directions, one side after another, each new border inpainted from noise matched to the picture
    # (its fall-off exponent and colour variation); outpaint_mk2_mask_blur is the script's mask blur.
    outpaint_mk2: bool = False
    outpaint_mk2_pixels: int = OUTPAINT_MK2_DEFAULTS["pixels"]
    outpaint_mk2_mask_blur: int = OUTPAINT_MK2_DEFAULTS["mask_blur"]
    outpaint_mk2_directions: tuple[str, ...] = OUTPAINT_DIRECTIONS
    outpaint_mk2_noise_q: float = OUTPAINT_MK2_DEFAULTS["noise_q"]
    outpaint_mk2_color_variation: float = OUTPAINT_MK2_DEFAULTS["color_variation"]
    # Where an inpaint job holds the picture's latents, where that is not under its mask (Outpainting mk2's latent
    # mask: white where it paints, unblurred); set by the engine, not asked for.
    latent_mask: Image.Image | None = None

    @property
    def hires_sampler(self) -> tuple[str, str]:
        """The hires pass's sampler and schedule type."""
        return self.hr_sampler_name or self.sampler_name, self.hr_scheduler or self.scheduler

    @property
    def hires_prompts(self) -> tuple[str, str]:
        """The hires pass's prompt and negative prompt."""
        return self.hr_prompt or self.prompt, self.hr_negative_prompt or self.negative_prompt

    def with_seeds_drawn(self) -> GenerationRequest:
        """This request with a random seed and variation seed drawn where they are -1 (A1111's fix_seed), so that
        every part of a job made of several (a loopback's loops, a prompt matrix's pictures) shares them."""
        seed = self.seed if self.seed != -1 else secrets.randbelow(SEED_MAX + 1)
        subseed = self.subseed if self.subseed != -1 else secrets.randbelow(SEED_MAX + 1)
        return dataclasses.replace(self, seed=seed, subseed=subseed)

    def hires_pass(self) -> GenerationRequest:
        """This request with the hires pass's prompts, for what encodes them and switches their LoRAs."""
        prompt, negative = self.hires_prompts
        return dataclasses.replace(self, prompt=prompt, negative_prompt=negative)

    @property
    def hires_size(self) -> tuple[int, int]:
        """The hires pass's width and height, as A1111 works them out (multiples of 8)."""
        width, height = int(self.width or 0), int(self.height or 0)
        if not self.hr_resize_x and not self.hr_resize_y:
            target = (width * self.hr_scale, height * self.hr_scale)
        elif not self.hr_resize_y:
            target = (self.hr_resize_x, self.hr_resize_x * height / width)
        elif not self.hr_resize_x:
            target = (self.hr_resize_y * width / height, self.hr_resize_y)
        else:
            target = (self.hr_resize_x, self.hr_resize_y)
        return tuple(max(8, int(side) // 8 * 8) for side in target)

    @property
    def mode(self) -> str:
        if not self.init_images:
            return "txt2img"
        return "inpaint" if self.mask is not None else "img2img"


@dataclass(frozen=True)
class Limits:
    """Bounds on a request, set per Engine (a shared server may want smaller ones)."""

    max_pixels: int = 2048 * 2048
    max_side: int = 4096
    max_steps: int = 150
    max_batch_size: int = 8
    max_n_iter: int = 100
    max_prompt_chars: int = 20_000
    max_mask_blur: int = 64


def _as_int(req_value: Any, name: str) -> int:
    if isinstance(req_value, bool) or not isinstance(req_value, (int, float, str)):
        raise InvalidRequestError(name, req_value, "a whole number")
    try:
        number = float(req_value)
    except ValueError as exc:
        raise InvalidRequestError(name, req_value, "a whole number") from exc
    if not math.isfinite(number) or number != int(number):
        raise InvalidRequestError(name, req_value, "a whole number")
    return int(number)


def _as_flag(req_value: Any, name: str) -> bool:
    """A switch: true or false (1 and 0 too, as JSON clients send them)."""
    if not isinstance(req_value, (bool, int)) or req_value not in (True, False, 0, 1):
        raise InvalidRequestError(name, req_value, "true or false")
    return bool(req_value)


def _as_float(req_value: Any, name: str) -> float:
    if isinstance(req_value, bool) or not isinstance(req_value, (int, float, str)):
        raise InvalidRequestError(name, req_value, "a number")
    try:
        number = float(req_value)
    except ValueError as exc:
        raise InvalidRequestError(name, req_value, "a number") from exc
    if not math.isfinite(number):
        raise InvalidRequestError(name, req_value, "a finite number")
    return number


def with_clip_skip(extra_params: dict[str, str], clip_skip: int) -> dict[str, str]:
    """A request's extra infotext keys with A1111's "Clip skip" set (kept only when it is not 1, as A1111 writes
    it)."""
    extra = {key: value for key, value in (extra_params or {}).items() if key != "Clip skip"}
    if clip_skip != 1:
        extra["Clip skip"] = str(clip_skip)
    return extra


def _in_range(value: int | float, name: str, low: float, high: float) -> None:
    if not low <= value <= high:
        raise InvalidRequestError(name, value, f"{low} to {high}")


@dataclass(frozen=True)
class JobSetting:
    """One of A1111's Settings that a job reads (from its Settings page, /sdapi/v1/options or override_settings)
    rather than from its own payload, and the request field it fills. The engine's check, the infotext's keys, the
    API's options and the page's per-session Settings are all made from these."""

    # The GenerationRequest field.
    field: str
    # A1111's name for it in /sdapi/v1/options and override_settings.
    option: str
    # The key the infotext writes it under; reading that key back sets the field.
    infotext_key: str
    # What it is and does, for the API's and the page's descriptions.
    summary: str
    default: float | int | bool | str
    # A number from `lowest` to this (a whole number when `default` is an int); None for a switch (on or off) or a
    # choice.
    highest: float | None = None
    lowest: float = 0
    # The names a choice takes (`default` one of them); empty for a number or a switch.
    choices: tuple[str, ...] = ()
    # Other names a choice is given by (A1111's), each with the choice it means.
    aliases: tuple[tuple[str, str], ...] = ()

    @property
    def is_switch(self) -> bool:
        return self.highest is None and not self.choices

    @property
    def is_choice(self) -> bool:
        return bool(self.choices)

    @property
    def is_whole(self) -> bool:
        return isinstance(self.default, int) and not isinstance(self.default, bool)

    def allowed(self, *, several: bool = False) -> str:
        """What the setting takes, said of one value or (`several`) of a list of them."""
        if self.is_switch:
            return "true or false"
        if self.is_choice:
            also = "".join(f" ({alias} means {choice})" for alias, choice in self.aliases)
            return "one of " + ", ".join(self.choices) + also
        kind = "whole number" if self.is_whole else "number"
        lowest, highest = (f"{end:g}" if isinstance(end, float) else str(end) for end in (self.lowest, self.highest))
        return f"{kind}s from {lowest} to {highest}" if several else f"a {kind} from {lowest} to {highest}"

    def checked(self, value: Any, name: str | None = None) -> float | int | bool:
        """`value` as this setting takes it; InvalidRequestError naming `name` (default: the field) otherwise."""
        name = name or self.field
        if self.is_switch:
            return _as_flag(value, name)
        if self.is_choice:
            names = {choice.lower(): choice for choice in self.choices} | {a.lower(): c for a, c in self.aliases}
            chosen = names.get(str(value).strip().lower())
            if not isinstance(value, str) or chosen is None:
                raise InvalidRequestError(name, value, self.allowed())
            return chosen
        number = _as_int(value, name) if self.is_whole else _as_float(value, name)
        if not self.lowest <= number <= self.highest:
            raise InvalidRequestError(name, value, self.allowed())
        return number


# Each GenerationRequest field below is one of these, with the same default.
JOB_SETTINGS = (
    JobSetting(
        "eta_noise_seed_delta",
        "eta_noise_seed_delta",
        "ENSD",
        "eta noise seed delta (ENSD): the steps draw their noise from seed + this (31337 in many shared infotexts); "
        "0 is off",
        0,
        SEED_MAX,
    ),
    JobSetting(
        "s_noise",
        "s_noise",
        "Sigma noise",
        "sigma noise: scales the fresh noise the steps of DPM2 a, the SDE samplers and sigma churn add; 1 is as drawn",
        1.0,
        MAX_SIGMA_NOISE,
    ),
    JobSetting(
        "s_churn",
        "s_churn",
        "Sigma churn",
        "sigma churn (Euler, Heun, DPM2): noise added back before each step, raising its sigma by up to sqrt(2) times; 0 is off",
        0.0,
        MAX_SIGMA_CHURN,
    ),
    JobSetting(
        "s_tmin",
        "s_tmin",
        "Sigma tmin",
        "sigma tmin (Euler, Heun, DPM2): sigma churn acts on steps whose sigma is at least this",
        0.0,
        MAX_SIGMA_TMIN,
    ),
    JobSetting(
        "s_tmax",
        "s_tmax",
        "Sigma tmax",
        "sigma tmax (Euler, Heun, DPM2): sigma churn acts on steps whose sigma is at most this; 0 is no end",
        0.0,
        MAX_SIGMA_TMAX,
    ),
    JobSetting(
        "sgm_noise_multiplier",
        "sgm_noise_multiplier",
        "SGM noise multiplier",
        "SGM noise multiplier: txt2img starts from noise x sqrt(1 + sigma^2), as SDXL's own code does, rather than "
        "noise x sigma (k-diffusion samplers; only for making such pictures again)",
        False,
    ),
    JobSetting(
        "always_discard_penultimate_sigma",
        "always_discard_next_to_last_sigma",
        "Discard penultimate sigma",
        "always discard next-to-last sigma: k-diffusion samplers make their schedule a step longer and drop the sigma "
        "before the last, as DPM2 and DPM++ 3M SDE always do",
        False,
    ),
    JobSetting(
        "noise_schedule",
        "sd_noise_schedule",
        "Noise Schedule",
        "noise schedule for sampling: Zero Terminal SNR rescales the model's noise levels so the last is pure noise "
        "(for models trained so, mostly v-prediction ones); Default is the model's own",
        "Default",
        choices=NOISE_SCHEDULES,
    ),
    JobSetting(
        "downcast_alphas_cumprod",
        "use_downcasted_alpha_bar",
        "Downcast alphas_cumprod",
        "downcast alphas_cumprod: the model's noise levels rounded to half precision before sampling, as older "
        "versions of A1111 ran them (to make their pictures again)",
        False,
    ),
    JobSetting(
        "sigma_min",
        "sigma_min",
        "Schedule min sigma",
        "schedule min sigma: where the Karras, Exponential, Beta and other schedules end; 0 is the model's own "
        "(about 0.03)",
        0.0,
        MAX_SCHEDULE_SIGMA_MIN,
    ),
    JobSetting(
        "sigma_max",
        "sigma_max",
        "Schedule max sigma",
        "schedule max sigma: where the Karras, Exponential, Beta and other schedules start; 0 is the model's own "
        "(about 14.6)",
        0.0,
        MAX_SCHEDULE_SIGMA_MAX,
    ),
    JobSetting(
        "rho",
        "rho",
        "Schedule rho",
        "schedule rho: the Karras and Polyexponential schedules' curve, higher spending more steps at low noise; 0 "
        "is the schedule's own (7; Polyexponential's 1)",
        0.0,
        MAX_SCHEDULE_RHO,
    ),
    JobSetting(
        "beta_dist_alpha",
        "beta_dist_alpha",
        "Beta schedule alpha",
        "Beta schedule alpha: the alpha of the beta distribution that spaces the Beta schedule's sigmas; 0.6 its own",
        0.6,
        MAX_BETA_SHAPE,
        MIN_BETA_SHAPE,
    ),
    JobSetting(
        "beta_dist_beta",
        "beta_dist_beta",
        "Beta schedule beta",
        "Beta schedule beta: the beta of the beta distribution that spaces the Beta schedule's sigmas; 0.6 its own",
        0.6,
        MAX_BETA_SHAPE,
        MIN_BETA_SHAPE,
    ),
    JobSetting(
        "initial_noise_multiplier",
        "initial_noise_multiplier",
        "Noise multiplier",
        "noise multiplier for img2img: scales the noise img2img and inpaint add to the picture; 1 leaves it",
        1.0,
        MAX_NOISE_MULTIPLIER,
    ),
    JobSetting(
        "img2img_extra_noise",
        "img2img_extra_noise",
        "Extra noise",
        "extra noise multiplier for img2img and hires fix: the starting noise once more, times this, on top of what "
        "the denoising strength adds; 0 is off",
        0.0,
        1.0,
    ),
    JobSetting(
        "img2img_fix_steps",
        "img2img_fix_steps",
        "Img2img fix steps",
        "with img2img, do exactly the amount of steps the slider specifies: img2img and inpaint run all their "
        "sampling steps, the last of a schedule made steps / strength long (off: about strength x steps)",
        False,
    ),
    JobSetting(
        "color_correction",
        "img2img_color_correction",
        "Color correction",
        "img2img colour correction: img2img and inpaint results get their init image's hue and saturation back, "
        "keeping their own luminosity",
        False,
    ),
    JobSetting(
        "s_min_uncond",
        "s_min_uncond",
        "NGMS",
        "Negative Guidance minimum sigma (NGMS): below this noise level every other UNet call leaves the negative "
        "prompt out, at half the cost; 0 is off",
        0.0,
        MAX_NGMS,
    ),
    JobSetting(
        "s_min_uncond_all",
        "s_min_uncond_all",
        "NGMS all steps",
        "NGMS on all steps: every UNet call below the NGMS sigma leaves the negative prompt out, not every other one",
        False,
    ),
    JobSetting(
        "skip_early_cond",
        "skip_early_cond",
        "Skip Early CFG",
        "ignore the negative prompt during early sampling (Skip Early CFG): the share of each pass's UNet calls, "
        "from the first, that leave the negative prompt out; 0 is off",
        0.0,
        1.0,
    ),
    JobSetting(
        "pad_cond_uncond",
        "pad_cond_uncond",
        "Pad conds",
        "pad prompt/negative prompt to be same length: the shorter padded with empty-prompt chunks and both asked in "
        "one UNet call (A1111's option); off, each is asked at its own length, as A1111 does by default",
        False,
    ),
    JobSetting(
        "randn_source",
        "randn_source",
        "RNG",
        "random number generator source: CPU draws torch's CPU numbers, the same on every machine; NV draws the "
        "numbers an NVIDIA GPU draws (A1111's GPU source on such a card, its default), so its pictures come out the "
        "same here",
        "CPU",
        choices=RANDOM_SOURCES,
        aliases=(("GPU", "NV"),),
    ),
    JobSetting(
        "unipc_variant",
        "uni_pc_variant",
        "UniPC variant",
        "UniPC variant: bh1 (A1111's default) or bh2, the B(h) of UniPC's predictor and corrector",
        "bh1",
        choices=UNIPC_VARIANTS,
    ),
    JobSetting(
        "unipc_skip_type",
        "uni_pc_skip_type",
        "UniPC skip type",
        "UniPC skip type: how UniPC spaces its steps in time: time_uniform (A1111's default), time_quadratic (more "
        "at low noise) or logSNR",
        "time_uniform",
        choices=UNIPC_SKIP_TYPES,
    ),
    JobSetting(
        "unipc_order",
        "uni_pc_order",
        "UniPC order",
        "UniPC order: how many of the model's last predictions each UniPC step uses (A1111's default 3; at most the "
        "steps)",
        3,
        MAX_UNIPC_ORDER,
        1,
    ),
    JobSetting(
        "unipc_lower_order_final",
        "uni_pc_lower_order_final",
        "UniPC lower order final",
        "UniPC lower order final: UniPC's last steps use fewer predictions (A1111's default: on)",
        True,
    ),
    JobSetting(
        "inpainting_mask_weight",
        "inpainting_mask_weight",
        "Conditional mask weight",
        "inpainting conditioning mask strength (inpainting models): how much of the masked part their "
        "masked-picture input blanks; 1 is all of it, 0 none",
        1.0,
        1.0,
    ),
)
JOB_SETTING_BY_FIELD = {setting.field: setting for setting in JOB_SETTINGS}


def default_job_settings() -> dict[str, float | int | bool]:
    """Each job setting's default, by request field."""
    return {setting.field: setting.default for setting in JOB_SETTINGS}


def validate_request(
    req: GenerationRequest,
    *,
    limits: Limits,
    native_size: tuple[int, int],
    resolve_sampler,
    upscalers: tuple[str, ...] = (),
) -> GenerationRequest:
    """Check every field and return a normalized copy (sizes resolved, images decoded).

    `resolve_sampler(sampler_name, scheduler)` returns the canonical pair or raises
    InvalidRequestError; it is passed in so that this module knows nothing of diffusers.
    `upscalers` names the upscaler models there are, allowed as hr_upscaler beside the built-in ones.
    """
    for name in ("prompt", "negative_prompt"):
        text = getattr(req, name)
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise InvalidRequestError(name, text, "text")
        if len(text) > limits.max_prompt_chars:
            raise InvalidRequestError(name, f"{len(text)} characters", f"at most {limits.max_prompt_chars} characters")

    prompt_syntax = _choice(req.prompt_syntax, "prompt_syntax", PROMPT_SYNTAXES)
    emphasis = _choice(req.emphasis, "emphasis", EMPHASIS_MODES)

    steps = _as_int(req.steps, "steps")
    _in_range(steps, "steps", 1, limits.max_steps)
    cfg_scale = _as_float(req.cfg_scale, "cfg_scale")
    _in_range(cfg_scale, "cfg_scale", 0.0, 30.0)
    seed = _as_int(req.seed, "seed")
    if seed != -1:
        _in_range(seed, "seed", 0, SEED_MAX)
    seed_extras = _seed_extras(req, limits)
    batch_size = _as_int(req.batch_size, "batch_size")
    _in_range(batch_size, "batch_size", 1, limits.max_batch_size)
    n_iter = _as_int(req.n_iter, "n_iter")
    _in_range(n_iter, "n_iter", 1, limits.max_n_iter)
    strength = _as_float(req.denoising_strength, "denoising_strength")
    _in_range(strength, "denoising_strength", 0.0, 1.0)
    mask_blur = _as_int(req.mask_blur, "mask_blur")
    _in_range(mask_blur, "mask_blur", 0, limits.max_mask_blur)
    mask_invert = _as_int(req.inpainting_mask_invert, "inpainting_mask_invert")
    _in_range(mask_invert, "inpainting_mask_invert", 0, 1)
    tiling = _as_flag(req.tiling, "tiling")
    eta = None
    if req.eta is not None:
        eta = _as_float(req.eta, "eta")
        _in_range(eta, "eta", 0.0, 1.0)
    job_settings = {setting.field: setting.checked(getattr(req, setting.field)) for setting in JOB_SETTINGS}
    if 0 < job_settings["sigma_max"] <= job_settings["sigma_min"]:
        raise InvalidRequestError(
            "sigma_max", req.sigma_max, f"0 (the model's own) or more than sigma_min ({job_settings['sigma_min']})"
        )
    if req.color_reference is not None and not isinstance(req.color_reference, Image.Image):
        raise InvalidRequestError("color_reference", type(req.color_reference).__name__, "a picture (PIL image)")
    full_res = req.inpaint_full_res
    if not isinstance(full_res, (bool, int)) or full_res not in (True, False, 0, 1):
        raise InvalidRequestError("inpaint_full_res", full_res, "true (Only masked) or false (Whole picture)")
    padding = _as_int(req.inpaint_full_res_padding, "inpaint_full_res_padding")
    _in_range(padding, "inpaint_full_res_padding", 0, 256)
    fill = _as_int(req.inpainting_fill, "inpainting_fill")
    _in_range(fill, "inpainting_fill", 0, 3)
    resize_mode = _as_int(req.resize_mode, "resize_mode")
    _in_range(resize_mode, "resize_mode", 0, len(RESIZE_MODES) - 1)
    if resize_mode == LATENT_RESIZE and req.mask is not None:
        raise InvalidRequestError(
            "resize_mode", resize_mode, "0 to 2 with a mask: inpaint resizes pictures, not latents (3 is img2img's)"
        )

    sampler_name, scheduler = resolve_sampler(req.sampler_name, req.scheduler)

    init_images = None
    if req.init_images is not None:
        if not isinstance(req.init_images, (list, tuple)):
            raise InvalidRequestError("init_images", req.init_images, "a list of images")
        init_images = [to_pil(image, f"init_images[{i}]").convert("RGB") for i, image in enumerate(req.init_images)]
        if not init_images:
            init_images = None

    width, height = req.width, req.height
    if width is None or height is None:
        if init_images:
            # img2img without a size keeps the init image's size, rounded down to a multiple of 8.
            base_w, base_h = init_images[0].size
            native_w, native_h = max(8, base_w // 8 * 8), max(8, base_h // 8 * 8)
        else:
            native_w, native_h = native_size
        width = native_w if width is None else width
        height = native_h if height is None else height
    width = _as_int(width, "width")
    height = _as_int(height, "height")
    for name, side in (("width", width), ("height", height)):
        if side < 8 or side % 8:
            raise InvalidRequestError(name, side, "a multiple of 8, at least 8")
        if side > limits.max_side:
            raise InvalidRequestError(name, side, f"at most {limits.max_side}")
    if width * height > limits.max_pixels:
        raise InvalidRequestError(
            "width x height", f"{width}x{height}", f"at most {limits.max_pixels} pixels (e.g. 1024x1024)"
        )

    mask = None
    if req.mask is not None:
        if not init_images:
            raise InvalidRequestError("mask", req.mask, "a mask only together with init_images (inpaint)")
        mask = to_pil(req.mask, "mask")
        if mask.size != init_images[0].size:
            raise InvalidRequestError(
                "mask",
                f"{mask.size[0]}x{mask.size[1]}",
                f"the size of init_images[0], {init_images[0].size[0]}x{init_images[0].size[1]}",
            )
        mask = _mask_to_l(mask)

    hires = _hires_fields(req, limits, width, height, bool(init_images), resolve_sampler, upscalers)
    refiner = _named_model(req.refiner_checkpoint, "refiner_checkpoint")
    switch_at = _as_float(req.refiner_switch_at, "refiner_switch_at")
    _in_range(switch_at, "refiner_switch_at", 0.0, 1.0)

    sd_upscale = _sd_upscale_fields(req, limits, width, height, init_images, mask, upscalers)
    loopback_fields = _loopback_fields(req, init_images, sd_upscale["sd_upscale"])
    outpaint_fields = _outpaint_fields(req, limits, width, height, init_images, mask, sd_upscale, loopback_fields)
    mk2_fields = _outpaint_mk2_fields(
        req, limits, width, height, init_images, mask, sd_upscale, loopback_fields, outpaint_fields
    )

    extra = req.extra_params or {}
    if not isinstance(extra, dict):
        raise InvalidRequestError("extra_params", extra, "a mapping of infotext keys to text")
    if "Clip skip" in extra:
        _in_range(_as_int(extra["Clip skip"], "Clip skip"), "Clip skip", 1, MAX_CLIP_SKIP)

    return dataclasses.replace(
        req,
        prompt=req.prompt or "",
        negative_prompt=req.negative_prompt or "",
        sampler_name=sampler_name,
        scheduler=scheduler,
        steps=steps,
        cfg_scale=cfg_scale,
        seed=seed,
        **seed_extras,
        width=width,
        height=height,
        batch_size=batch_size,
        n_iter=n_iter,
        init_images=init_images,
        mask=mask,
        denoising_strength=strength,
        mask_blur=mask_blur,
        inpainting_mask_invert=mask_invert,
        resize_mode=resize_mode,
        tiling=tiling,
        eta=eta,
        **job_settings,
        inpaint_full_res=bool(full_res),
        inpaint_full_res_padding=padding,
        inpainting_fill=fill,
        extra_params=dict(extra),
        prompt_syntax=prompt_syntax,
        emphasis=emphasis,
        **hires,
        refiner_checkpoint=refiner,
        refiner_switch_at=switch_at,
        **sd_upscale,
        **loopback_fields,
        **outpaint_fields,
        **mk2_fields,
    )


def _directions(directions: Any, name: str) -> tuple[str, ...]:
    """The sides an outpainting script grows, in A1111's order: a list of them, or one text ("left, up")."""
    if isinstance(directions, str):
        directions = directions.replace(",", " ").split()
    if (
        not isinstance(directions, (list, tuple))
        or not directions
        or any(not isinstance(side, str) or side.strip().lower() not in outpaint.DIRECTIONS for side in directions)
    ):
        raise InvalidRequestError(name, directions, "one or more of " + ", ".join(outpaint.DIRECTIONS))
    chosen = {side.strip().lower() for side in directions}
    return tuple(side for side in outpaint.DIRECTIONS if side in chosen)


def _outpaint_mk2_fields(req: GenerationRequest, limits: Limits, width, height, init_images, mask, *others) -> dict:
    fields = {"outpaint_mk2": _as_flag(req.outpaint_mk2, "outpaint_mk2")}
    pixels = fields["outpaint_mk2_pixels"] = _as_int(req.outpaint_mk2_pixels, "outpaint_mk2_pixels")
    _in_range(pixels, "outpaint_mk2_pixels", outpaint_mk2.MIN_PIXELS, outpaint_mk2.MAX_PIXELS)
    blur = fields["outpaint_mk2_mask_blur"] = _as_int(req.outpaint_mk2_mask_blur, "outpaint_mk2_mask_blur")
    _in_range(blur, "outpaint_mk2_mask_blur", 0, outpaint_mk2.MAX_MASK_BLUR)
    fields["outpaint_mk2_directions"] = _directions(req.outpaint_mk2_directions, "outpaint_mk2_directions")
    fall_off = fields["outpaint_mk2_noise_q"] = _as_float(req.outpaint_mk2_noise_q, "outpaint_mk2_noise_q")
    _in_range(fall_off, "outpaint_mk2_noise_q", 0.0, outpaint_mk2.MAX_FALL_OFF)
    variation = _as_float(req.outpaint_mk2_color_variation, "outpaint_mk2_color_variation")
    _in_range(variation, "outpaint_mk2_color_variation", 0.0, 1.0)
    fields["outpaint_mk2_color_variation"] = variation
    if not fields["outpaint_mk2"]:
        return fields
    if not init_images or mask is not None:
        raise InvalidRequestError(
            "outpaint_mk2", True, "img2img only: an init image and no mask (the script paints its own)"
        )
    if any(other.get("sd_upscale") or other.get("loopback") or other.get("outpaint") for other in others):
        raise InvalidRequestError(
            "outpaint_mk2", True, "false with SD upscale, Loopback or Poor man's outpainting on: one script at a time"
        )
    picture = init_images[0]
    grown = outpaint_mk2.grown_size(picture.size, pixels, fields["outpaint_mk2_directions"])
    windows = outpaint_mk2.pass_windows(picture.size, pixels, fields["outpaint_mk2_directions"], (width, height))
    largest = max(windows, key=lambda size: size[0] * size[1])
    if max(grown) > limits.max_side or largest[0] * largest[1] > limits.max_pixels:
        raise InvalidRequestError(
            "outpaint_mk2_pixels",
            pixels,
            f"few enough to keep the picture within {limits.max_side} pixels a side and each pass within "
            f"{limits.max_pixels} pixels (this {picture.width}x{picture.height} picture would become "
            f"{grown[0]}x{grown[1]}, painted {largest[0]}x{largest[1]} at most; lower width or height to paint less "
            "at a time)",
        )
    return fields


def _outpaint_fields(req: GenerationRequest, limits: Limits, width, height, init_images, mask, *others) -> dict:
    fields = {"outpaint": _as_flag(req.outpaint, "outpaint")}
    pixels = fields["outpaint_pixels"] = _as_int(req.outpaint_pixels, "outpaint_pixels")
    _in_range(pixels, "outpaint_pixels", outpaint.MIN_PIXELS, outpaint.MAX_PIXELS)
    fields["outpaint_directions"] = _directions(req.outpaint_directions, "outpaint_directions")
    if not fields["outpaint"]:
        return fields
    if not init_images or mask is not None:
        raise InvalidRequestError(
            "outpaint", True, "img2img only: an init image and no mask (the script paints its own)"
        )
    if any(other.get("sd_upscale") or other.get("loopback") for other in others):
        raise InvalidRequestError("outpaint", True, "false with SD upscale or Loopback on: one script at a time")
    if pixels >= min(width, height):
        raise InvalidRequestError(
            "outpaint_pixels", pixels, f"less than the tile size, {width}x{height} (width and height set it)"
        )
    picture = init_images[0]
    canvas = outpaint.canvas_size(picture.size, pixels, fields["outpaint_directions"])[:2]
    if canvas[0] < width or canvas[1] < height:
        raise InvalidRequestError(
            "outpaint_pixels",
            pixels,
            f"enough to make the {picture.width}x{picture.height} picture at least one tile, {width}x{height} "
            f"(it would become {canvas[0]}x{canvas[1]}; lower width and height, which set the tile size)",
        )
    if max(canvas) > limits.max_side:
        raise InvalidRequestError(
            "outpaint_pixels",
            pixels,
            f"few enough to keep the picture within {limits.max_side} pixels a side "
            f"(this {picture.width}x{picture.height} picture would become {canvas[0]}x{canvas[1]})",
        )
    tiles = len(outpaint.layout(picture.size, pixels, fields["outpaint_directions"], width, height).redrawn)
    if tiles > sd_upscale.MAX_TILES:
        raise InvalidRequestError(
            "outpaint_pixels",
            pixels,
            f"tiles that number at most {sd_upscale.MAX_TILES} ({tiles} tiles of {width}x{height} would be "
            "painted: raise width and height, or expand less)",
        )
    return fields


def _loopback_fields(req: GenerationRequest, init_images, sd_upscale_on: bool) -> dict:
    fields = {"loopback": _as_flag(req.loopback, "loopback")}
    fields["loopback_loops"] = _as_int(req.loopback_loops, "loopback_loops")
    _in_range(fields["loopback_loops"], "loopback_loops", 1, loopback.MAX_LOOPS)
    fields["loopback_final_denoising"] = _as_float(req.loopback_final_denoising, "loopback_final_denoising")
    _in_range(fields["loopback_final_denoising"], "loopback_final_denoising", 0.0, 1.0)
    fields["loopback_curve"] = _choice(req.loopback_curve, "loopback_curve", loopback.CURVES)
    if fields["loopback"] and not init_images:
        raise InvalidRequestError("loopback", True, "img2img or inpaint only: an init image to loop back into")
    if fields["loopback"] and sd_upscale_on:
        raise InvalidRequestError("loopback", True, "false with SD upscale on: one script at a time, as in A1111")
    return fields


def _sd_upscale_fields(
    req: GenerationRequest, limits: Limits, width: int, height: int, init_images, mask, upscalers
) -> dict:
    fields = {"sd_upscale": _as_flag(req.sd_upscale, "sd_upscale")}
    fields["sd_upscale_overlap"] = _as_int(req.sd_upscale_overlap, "sd_upscale_overlap")
    _in_range(fields["sd_upscale_overlap"], "sd_upscale_overlap", 0, sd_upscale.MAX_OVERLAP)
    fields["sd_upscale_scale"] = _as_float(req.sd_upscale_scale, "sd_upscale_scale")
    _in_range(fields["sd_upscale_scale"], "sd_upscale_scale", 1.0, sd_upscale.MAX_SCALE)
    fields["sd_upscale_upscaler"] = _choice(
        req.sd_upscale_upscaler, "sd_upscale_upscaler", (*PICTURE_UPSCALERS, *upscalers)
    )
    if not fields["sd_upscale"]:
        return fields
    if not init_images or mask is not None:
        raise InvalidRequestError(
            "sd_upscale", True, "img2img only: an init image and no mask (the tiles are img2img jobs)"
        )
    overlap = fields["sd_upscale_overlap"]
    if overlap >= min(width, height):
        raise InvalidRequestError(
            "sd_upscale_overlap", overlap, f"less than the tile size, {width}x{height} (width and height set it)"
        )
    picture = init_images[0]
    upscaled = sd_upscale.upscaled_size(picture.size, fields["sd_upscale_scale"], fields["sd_upscale_upscaler"])
    if upscaled[0] < width or upscaled[1] < height:
        raise InvalidRequestError(
            "sd_upscale_scale",
            fields["sd_upscale_scale"],
            f"a scale that makes the {picture.width}x{picture.height} picture at least one tile, {width}x{height} "
            f"(it would become {upscaled[0]}x{upscaled[1]}; width and height set the tile size)",
        )
    if max(upscaled) > limits.max_side:
        raise InvalidRequestError(
            "sd_upscale_scale",
            fields["sd_upscale_scale"],
            f"a scale that keeps the picture within {limits.max_side} pixels a side "
            f"(this {picture.width}x{picture.height} picture would become {upscaled[0]}x{upscaled[1]})",
        )
    tiles = plan_tiles(*upscaled, width, height, overlap).count
    if tiles > sd_upscale.MAX_TILES:
        raise InvalidRequestError(
            "sd_upscale_overlap",
            overlap,
            f"tiles that number at most {sd_upscale.MAX_TILES} (this would cut {upscaled[0]}x{upscaled[1]} into "
            f"{tiles} tiles of {width}x{height}: raise width and height, or lower the overlap or the scale)",
        )
    return fields


def _named_model(value: Any, name: str) -> str:
    """A second model's name as given; "" for none (None, empty, or A1111's "None")."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRequestError(name, value, "a model title or name from the checkpoint list, or empty for none")
    return "" if value.strip().lower() in ("", "none") else value.strip()


def _seed_extras(req: GenerationRequest, limits: Limits) -> dict:
    fields = {"subseed": _as_int(req.subseed, "subseed")}
    if fields["subseed"] != -1:
        _in_range(fields["subseed"], "subseed", 0, SEED_MAX)
    fields["subseed_strength"] = _as_float(req.subseed_strength, "subseed_strength")
    _in_range(fields["subseed_strength"], "subseed_strength", 0.0, 1.0)
    for name in ("seed_resize_from_w", "seed_resize_from_h"):
        # A1111 sends -1 for "off"; kept as 0 here.
        side = max(0, _as_int(getattr(req, name), name))
        if side and (side < 8 or side % 8 or side > limits.max_side):
            raise InvalidRequestError(name, side, f"0 (off) or a multiple of 8 from 8 to {limits.max_side}")
        fields[name] = side
    if bool(fields["seed_resize_from_w"]) != bool(fields["seed_resize_from_h"]):
        unset = "seed_resize_from_h" if fields["seed_resize_from_w"] else "seed_resize_from_w"
        raise InvalidRequestError(
            unset, getattr(req, unset), "a size too: give both seed_resize_from_w and seed_resize_from_h, or neither"
        )
    return fields


def _hires_fields(
    req: GenerationRequest, limits: Limits, width: int, height: int, has_init: bool, resolve_sampler, upscalers
) -> dict:
    fields = {"enable_hr": _as_flag(req.enable_hr, "enable_hr")}
    fields["hr_scale"] = _as_float(req.hr_scale, "hr_scale")
    _in_range(fields["hr_scale"], "hr_scale", 1.0, 4.0)
    fields["hr_upscaler"] = _choice(req.hr_upscaler, "hr_upscaler", (*HR_UPSCALERS, *upscalers))
    fields["hr_second_pass_steps"] = _as_int(req.hr_second_pass_steps, "hr_second_pass_steps")
    _in_range(fields["hr_second_pass_steps"], "hr_second_pass_steps", 0, limits.max_steps)
    for name in ("hr_resize_x", "hr_resize_y"):
        fields[name] = _as_int(getattr(req, name), name)
        _in_range(fields[name], name, 0, limits.max_side)
    for name in ("hr_prompt", "hr_negative_prompt"):
        text = getattr(req, name) or ""
        if not isinstance(text, str):
            raise InvalidRequestError(name, text, "text")
        if len(text) > limits.max_prompt_chars:
            raise InvalidRequestError(name, f"{len(text)} characters", f"at most {limits.max_prompt_chars} characters")
        fields[name] = text
    fields["hr_checkpoint_name"] = _same_as_first_pass(req.hr_checkpoint_name, "hr_checkpoint_name")
    sampler = _same_as_first_pass(req.hr_sampler_name, "hr_sampler_name")
    schedule = _same_as_first_pass(req.hr_scheduler, "hr_scheduler")
    fields["hr_sampler_name"] = fields["hr_scheduler"] = ""
    if sampler or schedule:
        try:
            sampler_name, scheduler = resolve_sampler(sampler or req.sampler_name, schedule or req.scheduler)
        except InvalidRequestError as exc:
            if schedule or exc.field != "scheduler":
                name = "hr_scheduler" if exc.field == "scheduler" else "hr_sampler_name"
                raise InvalidRequestError(name, exc.value, exc.allowed) from exc
            # The first pass's schedule type does not go with the hires sampler here: its own default does.
            sampler_name, scheduler = resolve_sampler(sampler, "Automatic")
            schedule = scheduler
        fields["hr_sampler_name"] = sampler_name if sampler else ""
        fields["hr_scheduler"] = scheduler if schedule else ""
    if fields["enable_hr"]:
        if has_init:
            raise InvalidRequestError("enable_hr", True, "false with init_images: hires fix is a txt2img option")
        target_w, target_h = dataclasses.replace(req, width=width, height=height, **fields).hires_size
        if target_w > limits.max_side or target_h > limits.max_side or target_w * target_h > limits.max_pixels:
            raise InvalidRequestError(
                "hires size",
                f"{target_w}x{target_h}",
                f"at most {limits.max_side} a side and {limits.max_pixels} pixels (lower hr_scale or the size)",
            )
    return fields


def _same_as_first_pass(value: Any, name: str) -> str:
    """A hires sampler or schedule type as given; "" for the first pass's (None, "", A1111's "Use same ...")."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRequestError(name, value, "a name, or empty (or 'Use same ...') for the first pass's")
    return "" if not value.strip() or value.strip().lower().startswith("use same") else value.strip()


def _choice(value: Any, name: str, allowed: tuple[str, ...]) -> str:
    """`value` matched case-insensitively against `allowed`; returns the canonical spelling."""
    if isinstance(value, str):
        for option in allowed:
            if value.strip().lower() == option.lower():
                return option
    raise InvalidRequestError(name, value, ", ".join(allowed))


def _mask_to_l(mask: Image.Image) -> Image.Image:
    """A grey mask; for an RGBA drawing layer, what was painted (alpha) is the mask."""
    if mask.mode in ("RGBA", "LA") and mask.getchannel("A").getextrema() != (255, 255):
        return mask.getchannel("A")
    return mask.convert("L")
