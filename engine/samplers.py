"""A1111 sampler names and schedule types mapped onto diffusers schedulers.

Every job builds its own scheduler with `from_config`, so no job ever changes the scheduler
another job (or the shared pipeline) sees.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler, DPMSolverSDESchedulerOutput
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_heun_discrete import HeunDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete import KDPM2AncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .errors import InvalidRequestError
from .noise import after_starting_noise

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    scheduler_class: str
    options: dict[str, Any] = field(default_factory=dict)
    # The schedule type A1111's "Automatic" picks for this sampler.
    default_schedule: str = "Uniform"
    aliases: tuple[str, ...] = ()
    # The scheduler draws its noise from one seed for the whole batch (a Brownian tree), so
    # per-image seeds only hold when each image is sampled on its own.
    batch_shares_noise: bool = False
    note: str = ""
    # A1111 runs this sampler through k-diffusion, whose sigmas span every training timestep (999 down
    # to 0: diffusers' "linspace" spacing); its DDIM, PLMS and UniPC step on the model's own timestep
    # spacing (SD's "leading", offset 1), as do samplers A1111 lacks.
    k_diffusion: bool = True
    # A1111's discard_next_to_last_sigma (its DPM2, DPM2 a and DPM++ 3M SDE): see _DiscardPenultimateSigma.
    discard_penultimate_sigma: bool = False
    # The eta this sampler takes by default (ancestral noise: 1 for Euler a, 0 for DDIM), and the infotext key
    # A1111 writes a different one under; None where this engine's sampler takes no eta.
    eta_default: float | None = None
    eta_key: str = "Eta"
    # A1111's setting (and this engine's page setting) that holds it: eta_ancestral or eta_ddim.
    eta_option: str = "eta_ancestral"
    # The infotext writes "ENSD" for this sampler, when eta is not 0: A1111's uses_ensd samplers, and Restart.
    uses_ensd: bool = False
    # A1111's second_order samplers, which it counts as two model calls a step (its total_steps).
    second_order: bool = False
    # A1111's sigma noise (s_noise) scales the fresh noise this sampler's steps add (its stochastic k-diffusion
    # samplers, and the sigma churn of Euler, Heun and DPM2).
    takes_s_noise: bool = False
    # A1111's sigma churn, tmin and tmax (its Euler, Heun and DPM2).
    takes_sigma_churn: bool = False
    # CFG++ (A1111's DDIM CFG++): guidance at cfg_scale / CFGPP_DIVISOR, and each step heads on along the negative
    # prompt's noise prediction instead of the guided one (engine/cfgpp.py).
    cfgpp: bool = False


# The training timesteps of SD models (and of every model A1111 samples), the most steps a pass from a picture spaces.
TRAIN_TIMESTEPS = 1000

_DDIM = SamplerSpec(
    "DDIM",
    "DDIMScheduler",
    {"set_alpha_to_one": False},
    "Uniform",
    ("ddim",),
    k_diffusion=False,
    eta_default=0.0,
    eta_key="Eta DDIM",
    eta_option="eta_ddim",
)

# Order as in A1111's sampler dropdown.
SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec(
        "DPM++ 2M",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        "Karras",
        ("k_dpmpp_2m",),
    ),
    SamplerSpec(
        "DPM++ SDE",
        "DPMSolverSDEScheduler",
        {},
        "Karras",
        ("k_dpmpp_sde",),
        batch_shares_noise=True,
        second_order=True,
        eta_default=1.0,
        takes_s_noise=True,
    ),
    SamplerSpec(
        "DPM++ 2M SDE",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
        "Exponential",
        ("k_dpmpp_2m_sde",),
        eta_default=1.0,
        takes_s_noise=True,
    ),
    SamplerSpec(
        "DPM++ 2M SDE Heun",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "heun"},
        "Exponential",
        ("k_dpmpp_2m_sde_heun",),
        eta_default=1.0,
        takes_s_noise=True,
    ),
    SamplerSpec(
        "DPM++ 2S a",
        "KDPM2AncestralDiscreteScheduler",  # its two calls a step, with A1111DPMpp2SAncestralScheduler's updates
        {},
        "Karras",
        ("k_dpmpp_2s_a",),
        eta_default=1.0,
        uses_ensd=True,
        second_order=True,
        takes_s_noise=True,
    ),
    SamplerSpec(
        "DPM++ 3M SDE",
        "DPMSolverMultistepScheduler",
        # k-diffusion's sampler runs third order up to its last step (diffusers would drop to second order on the
        # step before the last under 15 steps).
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "lower_order_final": False},
        "Exponential",
        ("k_dpmpp_3m_sde",),
        discard_penultimate_sigma=True,
        eta_default=1.0,
        takes_s_noise=True,
    ),
    SamplerSpec(
        "Euler a",
        "EulerAncestralDiscreteScheduler",
        {},
        "Uniform",
        ("k_euler_a", "k_euler_ancestral"),
        eta_default=1.0,
        uses_ensd=True,
    ),
    SamplerSpec(
        "Euler", "EulerDiscreteScheduler", {}, "Uniform", ("k_euler",), takes_s_noise=True, takes_sigma_churn=True
    ),
    SamplerSpec("LMS", "LMSDiscreteScheduler", {}, "Uniform", ("k_lms",)),
    SamplerSpec(
        "Heun",
        "HeunDiscreteScheduler",
        {},
        "Uniform",
        ("k_heun",),
        second_order=True,
        takes_s_noise=True,
        takes_sigma_churn=True,
    ),
    SamplerSpec(
        "DPM2",
        "KDPM2DiscreteScheduler",
        {},
        "Karras",
        ("k_dpm_2",),
        discard_penultimate_sigma=True,
        second_order=True,
        takes_s_noise=True,
        takes_sigma_churn=True,
    ),
    SamplerSpec(
        "DPM2 a",
        "KDPM2AncestralDiscreteScheduler",
        {},
        "Karras",
        ("k_dpm_2_a",),
        discard_penultimate_sigma=True,
        eta_default=1.0,
        uses_ensd=True,
        second_order=True,
        takes_s_noise=True,
    ),
    SamplerSpec(
        "DPM fast",
        "EulerDiscreteScheduler",  # its schedule's two ends; A1111DPMFastScheduler takes the steps
        {},
        "Uniform",
        ("k_dpm_fast",),
        eta_default=1.0,
        uses_ensd=True,
        takes_s_noise=True,
    ),
    SamplerSpec(
        "DPM adaptive",
        "EulerDiscreteScheduler",  # its schedule's two ends; A1111DPMAdaptiveScheduler sizes its own steps
        {},
        "Uniform",
        ("k_dpm_ad",),
        eta_default=1.0,
        uses_ensd=True,
    ),
    SamplerSpec(
        "Restart",
        "HeunDiscreteScheduler",  # its schedule; A1111RestartScheduler takes the steps
        {},
        "Karras",
        ("restart",),
        uses_ensd=True,  # its restarts draw from seed + ENSD; A1111 does not write it, so its texts cannot say so
        second_order=True,
    ),
    _DDIM,
    dataclasses.replace(_DDIM, name="DDIM CFG++", aliases=("ddim_cfgpp",), cfgpp=True),
    SamplerSpec("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, "Uniform", ("plms",), k_diffusion=False),
    SamplerSpec("UniPC", "UniPCMultistepScheduler", {}, "Uniform", ("unipc",), k_diffusion=False),
    SamplerSpec("DEIS", "DEISMultistepScheduler", {}, "Uniform", ("deis",), k_diffusion=False),
    SamplerSpec("LCM", "LCMScheduler", {}, "Uniform", ("lcm",)),
)

# Schedule types (A1111 >= 1.9, in its order) and the scheduler config keys that express them in diffusers.
# A type only applies where the scheduler's constructor takes those keys. Polyexponential, KL Optimal, Align Your
# Steps, Simple and Normal are made here, where diffusers makes Karras sigmas (_SigmaSchedule); so are Uniform and
# SGM Uniform for some samplers (build_scheduler says which).
SCHEDULE_TYPES: dict[str, dict[str, Any]] = {
    "Automatic": {},
    "Uniform": {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "Polyexponential": {"use_karras_sigmas": True},
    "SGM Uniform": {"timestep_spacing": "trailing"},
    "KL Optimal": {"use_karras_sigmas": True},
    "Align Your Steps": {"use_karras_sigmas": True},
    "Simple": {"use_karras_sigmas": True},
    "Normal": {"use_karras_sigmas": True},
    "Beta": {"use_beta_sigmas": True},
}
_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")

# Names older infotexts and clients use for sampler + schedule in one ("DPM++ 2M Karras").
_COMBINED_SUFFIXES = {" Karras": "Karras", " Exponential": "Exponential"}

_BY_NAME = {spec.name.lower(): spec for spec in SAMPLERS}
_BY_NAME.update({alias.lower(): spec for spec in SAMPLERS for alias in spec.aliases})
_SCHEDULES_BY_NAME = {name.lower(): name for name in SCHEDULE_TYPES}
_SCHEDULES_BY_NAME.update({name.lower().replace(" ", "_"): name for name in SCHEDULE_TYPES})
_SCHEDULES_BY_NAME.update({name.lower().replace(" ", ""): name for name in SCHEDULE_TYPES})  # "SGMUniform"


def sampler_names() -> list[str]:
    return [spec.name for spec in SAMPLERS]


def schedule_type_names() -> list[str]:
    return list(SCHEDULE_TYPES)


def get_sampler(name: str) -> SamplerSpec:
    spec = _BY_NAME.get(str(name).strip().lower())
    if spec is None:
        raise InvalidRequestError("sampler_name", name, "one of " + ", ".join(sampler_names()))
    return spec


def supported_schedules(spec: SamplerSpec) -> list[str]:
    if spec.cfgpp:  # A1111's own timesteps only, as A1111 runs it
        return ["Automatic", spec.default_schedule]
    params = _init_params(spec.scheduler_class)
    return [name for name, keys in SCHEDULE_TYPES.items() if all(key in params for key in keys)]


def resolve(sampler_name: Any, scheduler: Any) -> tuple[str, str]:
    """Canonical (sampler, schedule type); accepts aliases, any case, and "DPM++ 2M Karras" style names."""
    if not isinstance(sampler_name, str) or not sampler_name.strip():
        raise InvalidRequestError("sampler_name", sampler_name, "one of " + ", ".join(sampler_names()))
    if scheduler is None or scheduler == "":
        scheduler = "Automatic"
    if not isinstance(scheduler, str):
        raise InvalidRequestError("scheduler", scheduler, "one of " + ", ".join(SCHEDULE_TYPES))
    name = sampler_name.strip()
    if name.lower() not in _BY_NAME:
        for suffix, schedule in _COMBINED_SUFFIXES.items():
            if name.lower().endswith(suffix.lower()) and name[: -len(suffix)].lower() in _BY_NAME:
                name = name[: -len(suffix)]
                if scheduler.lower() == "automatic":
                    scheduler = schedule
                break
    spec = get_sampler(name)
    schedule = _SCHEDULES_BY_NAME.get(scheduler.strip().lower())
    if schedule is None:
        raise InvalidRequestError("scheduler", scheduler, "one of " + ", ".join(SCHEDULE_TYPES))
    allowed = supported_schedules(spec)
    if schedule not in allowed:
        why = "it steps on A1111's own timesteps" if spec.cfgpp else "diffusers supports no other"
        raise InvalidRequestError(
            "scheduler", scheduler, f"for sampler {spec.name}: " + ", ".join(allowed) + f" ({why})"
        )
    return spec.name, schedule


def effective_schedule(spec: SamplerSpec, schedule: str) -> str:
    return spec.default_schedule if schedule == "Automatic" else schedule


# The schedule types whose ends A1111's schedule min and max sigma set, and those rho shapes (with its default).
RANGED_SCHEDULES = ("Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal", "Normal", "Beta")
SCHEDULE_RHO = {"Karras": 7.0, "Polyexponential": 1.0}

# NVIDIA's Align Your Steps sigmas for 10 steps (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html), as
# A1111 takes them: SDXL's for SDXL models, SD 1.5's for every other.
ALIGN_YOUR_STEPS = {
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
    "sd1": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
}


# diffusers' DPM-Solver classes space steps + 1 timesteps from 999 and drop the last (A1111's SGM Uniform); A1111's
# Uniform for its DPM++ samplers is k-diffusion's, evenly spaced from 999 to 0, which _SigmaSchedule makes.
_SPACED_ONE_OVER = ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler")


@dataclass(frozen=True)
class ScheduleShape:
    """A1111's settings that shape a schedule: its min and max sigma and rho (0: the schedule's own), and the Beta
    schedule's alpha and beta (0.6 each)."""

    sigma_min: float = 0.0
    sigma_max: float = 0.0
    rho: float = 0.0
    beta_alpha: float = 0.6
    beta_beta: float = 0.6


def takes_schedule_range(sampler_name: str, schedule: str) -> bool:
    """Whether the sampler's schedule (Automatic: its default) starts and ends where schedule min/max sigma say."""
    spec = get_sampler(sampler_name)
    kind = effective_schedule(spec, schedule)
    if kind == "SGM Uniform":  # made here where the scheduler makes Karras sigmas, else diffusers' own spacing
        return "use_karras_sigmas" in _init_params(spec.scheduler_class)
    return kind in RANGED_SCHEDULES


def takes_schedule_rho(sampler_name: str, schedule: str) -> bool:
    return effective_schedule(get_sampler(sampler_name), schedule) in SCHEDULE_RHO


def t_to_sigma(timesteps: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """k-diffusion's t_to_sigma: the model's log sigmas interpolated at fractional timesteps."""
    low = np.floor(timesteps).astype(int)
    high = np.ceil(timesteps).astype(int)
    weight = timesteps - low
    return np.exp((1 - weight) * log_sigmas[low] + weight * log_sigmas[high])


def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """k-diffusion's sigma_to_t (unquantized): where `sigma` falls between the model's log sigmas."""
    log_sigma = np.log(sigma)
    low = int(np.clip(np.sum(log_sigma >= log_sigmas) - 1, 0, len(log_sigmas) - 2))
    weight = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - weight) * low + weight * (low + 1)


def schedule_sigmas(
    kind: str, steps: int, lowest: float, highest: float, *, rho: float, model_sigmas: np.ndarray, family: str
) -> np.ndarray:
    """The `steps` sigmas of A1111's schedule type `kind` (without the final 0), from `highest` down towards
    `lowest`; `model_sigmas` are the model's own, by timestep (ascending)."""
    ramp = np.linspace(0, 1, steps)
    if kind == "Uniform":  # k-diffusion's get_sigmas: evenly spaced timesteps from the last to 0
        return t_to_sigma(np.linspace(len(model_sigmas) - 1, 0, steps), np.log(model_sigmas))
    if kind in ("Normal", "SGM Uniform"):
        # Evenly spaced timesteps between the max sigma's and the min sigma's; SGM Uniform spaces one more and
        # drops the last, as A1111's sgm_uniform does.
        log_sigmas = np.log(model_sigmas)
        start, end = _sigma_to_t(highest, log_sigmas), _sigma_to_t(lowest, log_sigmas)
        if kind == "SGM Uniform":
            return t_to_sigma(np.linspace(start, end, steps + 1)[:-1], log_sigmas)
        return t_to_sigma(np.linspace(start, end, steps), log_sigmas)
    if kind == "Karras":
        inv_rho = 1 / rho
        return (highest**inv_rho + ramp * (lowest**inv_rho - highest**inv_rho)) ** rho
    if kind == "Polyexponential":
        return np.exp((1 - ramp) ** rho * (np.log(highest) - np.log(lowest)) + np.log(lowest))
    if kind == "KL Optimal":
        # A1111 spaces n + 1 points to the min sigma and steps to it last; here the last step goes to 0, as every
        # schedule's does in diffusers (and as ComfyUI's KL Optimal does).
        shares = np.arange(steps) / steps
        return np.tan(shares * np.arctan(lowest) + (1 - shares) * np.arctan(highest))
    if kind == "Align Your Steps":
        table = np.array(ALIGN_YOUR_STEPS["sdxl" if family == "sdxl" else "sd1"], dtype=np.float64)
        if steps == len(table):
            return table
        # Log-linear interpolation over the table's positions, as NVIDIA's how-to does it.
        log_ascending = np.log(table[::-1])
        return np.exp(np.interp(ramp, np.linspace(0, 1, len(table)), log_ascending))[::-1].copy()
    if kind == "Simple":
        stride = len(model_sigmas) / steps
        return np.array([model_sigmas[-(1 + int(index * stride))] for index in range(steps)])
    raise ValueError(f"no sigma schedule {kind!r}")


def ve_denoised(prediction_type: str, model_output, sample, sigma):
    """The model's clean-picture prediction from its output at noise level `sigma`, in k-diffusion's variance-
    exploding latents (x = x0 + sigma x noise; the model is given x / sqrt(1 + sigma^2)): from a v prediction, or
    from a noise prediction."""
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    return sample - sigma * model_output


class _SigmaSchedule:
    """A1111's schedule types that diffusers has no flag for (Polyexponential, KL Optimal, Align Your Steps, Simple,
    Normal), made where diffusers makes Karras sigmas, and A1111's schedule min sigma, max sigma and rho (0: the
    schedule's own) for the schedule types that take them. diffusers makes Karras, Exponential and Beta from the
    ends of the model's sigmas (or its config's sigma_min and sigma_max), and Karras with rho 7; here the ends are
    replaced where asked, and Karras with another rho is made by k-diffusion's formula. The schedule type and the
    values are the instance's (build_scheduler sets them); diffusers turns the sigmas into timesteps."""

    schedule_kind = "Karras"
    model_family = ""
    schedule_shape = ScheduleShape()

    def _schedule_ends(self, in_sigmas) -> tuple[float, float]:
        shape = self.schedule_shape
        if len(in_sigmas) < 2:
            # One step's spaced sigmas are a single one: the ends are the model's, as A1111's always are (from two
            # steps on, the linspace spacing reaches both).
            table = model_sigmas(self.alphas_cumprod)
            in_sigmas = [float(table[-1]), float(table[0])]
        lowest = shape.sigma_min or getattr(self.config, "sigma_min", None) or float(in_sigmas[-1])
        highest = shape.sigma_max or getattr(self.config, "sigma_max", None) or float(in_sigmas[0])
        if highest <= lowest:
            field, value = ("sigma_max", highest) if shape.sigma_max else ("sigma_min", lowest)
            raise InvalidRequestError(
                field, value, f"a max sigma above the min sigma (here {lowest:.4g} to {highest:.4g})"
            )
        return lowest, highest

    def _with_ends(self, in_sigmas):
        """`in_sigmas` with the asked-for ends, where diffusers reads them."""
        lowest, highest = self._schedule_ends(in_sigmas)
        sigmas = np.array(in_sigmas if len(in_sigmas) > 1 else [0.0, 0.0], dtype=np.float64)
        sigmas[0], sigmas[-1] = highest, lowest
        return sigmas

    def _convert_to_karras(self, in_sigmas, num_inference_steps=None):
        # LMS and DPM++ SDE take no step count here: diffusers reads their own.
        steps = num_inference_steps if num_inference_steps is not None else self.num_inference_steps
        diffusers_karras = super()._convert_to_karras
        # diffusers' LMS and DPM++ SDE read their own step count: another (a discarding schedule's) is made here.
        takes_steps = "num_inference_steps" in inspect.signature(diffusers_karras).parameters
        if (
            self.schedule_kind == "Karras"
            and not self.schedule_shape.rho
            and (takes_steps or steps == self.num_inference_steps)
        ):
            given = {"num_inference_steps": steps} if takes_steps else {}
            return diffusers_karras(in_sigmas=self._with_ends(in_sigmas), **given)
        lowest, highest = self._schedule_ends(in_sigmas)
        table = ((1 - self.alphas_cumprod) / self.alphas_cumprod).double().sqrt().numpy()
        return schedule_sigmas(
            self.schedule_kind,
            steps,
            lowest,
            highest,
            rho=self.schedule_shape.rho or SCHEDULE_RHO.get(self.schedule_kind, 0.0),
            model_sigmas=table,
            family=self.model_family,
        )

    def _convert_to_exponential(self, in_sigmas, num_inference_steps):
        return super()._convert_to_exponential(
            in_sigmas=self._with_ends(in_sigmas), num_inference_steps=num_inference_steps
        )

    def _convert_to_beta(self, in_sigmas, num_inference_steps, alpha=0.6, beta=0.6):
        return super()._convert_to_beta(
            in_sigmas=self._with_ends(in_sigmas),
            num_inference_steps=num_inference_steps,
            alpha=self.schedule_shape.beta_alpha,
            beta=self.schedule_shape.beta_beta,
        )


# The last noise level A1111's Zero Terminal SNR leaves: not 0, whose sigma would be infinite (sigma 4518.8).
ZERO_TERMINAL_ALPHA_BAR = 4.8973451890853435e-08


@dataclass(frozen=True)
class NoiseLevels:
    """How a job changes the model's noise levels (alphas_cumprod) before sampling, as A1111's settings do:
    `downcast` rounds them to half precision (its "Downcast alphas_cumprod"), then `zero_terminal_snr` rescales them
    (its "Zero Terminal SNR" noise schedule, also what a model whose scheduler config sets rescale_betas_zero_snr
    gets, for every sampler)."""

    zero_terminal_snr: bool = False
    downcast: bool = False

    def alphas_cumprod(self, base_config: dict[str, Any]) -> torch.Tensor:
        """The model's noise levels by timestep, changed as asked (float64)."""
        plain = {**dict(base_config), "rescale_betas_zero_snr": False}
        alphas_cumprod = diffusers.DDPMScheduler.from_config(plain).alphas_cumprod
        if self.downcast:
            alphas_cumprod = alphas_cumprod.half()
        alphas_cumprod = alphas_cumprod.double()
        if self.zero_terminal_snr or base_config.get("rescale_betas_zero_snr"):
            alphas_cumprod = zero_terminal_snr(alphas_cumprod)
        return alphas_cumprod

    def trained_betas(self, base_config: dict[str, Any]) -> list[float] | None:
        """The betas a scheduler rebuilds these noise levels from, or None where they are the model's own."""
        if not (self.zero_terminal_snr or self.downcast or base_config.get("rescale_betas_zero_snr")):
            return None
        alphas_cumprod = self.alphas_cumprod(base_config)
        previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        return (1 - alphas_cumprod / previous).tolist()


def zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """A1111's rescale_zero_terminal_snr_abar (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are
    Flawed"): sqrt(alphas_cumprod) shifted so the last is 0 and scaled so the first stays, squared; the last then
    set to ZERO_TERMINAL_ALPHA_BAR."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    rescaled = ((root - last) * (first / (first - last))) ** 2
    rescaled[-1] = ZERO_TERMINAL_ALPHA_BAR
    return rescaled


@functools.cache
def _mixed(mixin: type, cls: type) -> type:
    """`cls` with `mixin` before it (a scheduler class that also does what the mixin adds), under `cls`'s name; `cls`
    itself where it already is one. Made once per pair: every job builds its scheduler from these."""
    if issubclass(cls, mixin):
        return cls
    return type(cls.__name__, (mixin, cls), {"__doc__": cls.__doc__})


def _with_sigma_schedule(cls: type) -> type:
    """`cls` making A1111's further schedule types and taking its schedule min/max sigma and rho (discarding
    classes already do, inside the discard)."""
    return _mixed(_SigmaSchedule, cls)


class _DiscardPenultimateSigma(_SigmaSchedule):
    """A1111's discard_next_to_last_sigma, as its DPM2, DPM2 a and DPM++ 3M SDE sample: the sigma schedule is built
    for one step more and its smallest non-zero sigma dropped, so the step count stays and the last
    step goes to 0 from a larger sigma (a second-order step at the very smallest sigma is wasted).

    diffusers' KDPM2 schedulers take no custom sigmas and derive their interleaved midpoint arrays
    from the schedule inside set_timesteps, so the drop happens where the schedule is made. A1111
    drops it on every schedule type, and so does this class: every type is made where diffusers makes Karras,
    Exponential and Beta sigmas (Uniform and SGM Uniform too, for these samplers: see build_scheduler). With A1111's
    "Always discard next-to-last sigma" every k-diffusion sampler here drops it (_discarding)."""

    def _convert_to_karras(self, in_sigmas, num_inference_steps=None):
        # LMS and DPM++ SDE take no step count here: diffusers reads their own.
        steps = num_inference_steps if num_inference_steps is not None else self.num_inference_steps
        return super()._convert_to_karras(in_sigmas=in_sigmas, num_inference_steps=steps + 1)[:-1]

    def _convert_to_exponential(self, in_sigmas, num_inference_steps):
        return super()._convert_to_exponential(in_sigmas=in_sigmas, num_inference_steps=num_inference_steps + 1)[:-1]

    def _convert_to_beta(self, in_sigmas, num_inference_steps, **shape):
        return super()._convert_to_beta(in_sigmas=in_sigmas, num_inference_steps=num_inference_steps + 1, **shape)[:-1]


class _DiscardPenultimateStep:
    """The same discard for a scheduler that makes no Karras sigmas and keeps one sigma a step (Euler a): its schedule
    made a step longer, then the sigma before the final 0 and the last step's timestep dropped."""

    def set_timesteps(self, num_inference_steps, *args, **kwargs):
        super().set_timesteps(num_inference_steps + 1, *args, **kwargs)
        self.sigmas = torch.cat([self.sigmas[:-2], self.sigmas[-1:]])
        self.timesteps = self.timesteps[:-1]
        self.num_inference_steps = num_inference_steps


def _discarding(cls: type) -> type:
    """`cls` dropping the next-to-last sigma of its schedule (classes that already do stay as they are)."""
    return _mixed(_DiscardPenultimateSigma if hasattr(cls, "_convert_to_karras") else _DiscardPenultimateStep, cls)


def discards_penultimate_sigma(sampler_name: str, always: bool = False) -> bool:
    """Whether the sampler drops the next-to-last sigma: DPM2, DPM2 a and DPM++ 3M SDE do, and with A1111's "Always
    discard next-to-last sigma" (`always`) every k-diffusion sampler but LCM, whose schedule is its own."""
    spec = get_sampler(sampler_name)
    return spec.discard_penultimate_sigma or (always and spec.k_diffusion and spec.name != "LCM")


def always_discarding_changes(sampler_name: str, schedule: str) -> bool:
    """Whether A1111's "Always discard next-to-last sigma" changes this sampler's pass: the k-diffusion samplers
    that do not drop it anyway, and DDIM, PLMS and UniPC on A1111's timesteps, which it respaces."""
    spec = get_sampler(sampler_name)
    return (
        (discards_penultimate_sigma(spec.name, always=True) and not spec.discard_penultimate_sigma)
        or runs_a1111_ddim(spec.name, schedule)
        or runs_a1111_unipc(spec.name, schedule)
        or runs_a1111_plms(spec.name, schedule)
    )


def runs_a1111_ddim(sampler_name: str, schedule: str) -> bool:
    """Whether the pass runs A1111's DDIM (A1111DDIMScheduler) or its DDIM CFG++: DDIM on its own timesteps
    (Automatic, Uniform), not on diffusers' trailing ones (SGM Uniform)."""
    spec = get_sampler(sampler_name)
    return spec.name in ("DDIM", "DDIM CFG++") and effective_schedule(spec, schedule) == "Uniform"


def runs_a1111_unipc(sampler_name: str, schedule: str) -> bool:
    """Whether the pass runs A1111's UniPC (A1111UniPCScheduler): UniPC on A1111's timesteps (Automatic, Uniform)."""
    spec = get_sampler(sampler_name)
    return spec.name == "UniPC" and effective_schedule(spec, schedule) == "Uniform"


def runs_a1111_plms(sampler_name: str, schedule: str) -> bool:
    """Whether the pass runs A1111's PLMS (A1111PLMSScheduler): PLMS on A1111's timesteps (Automatic, Uniform)."""
    spec = get_sampler(sampler_name)
    return spec.name == "PLMS" and effective_schedule(spec, schedule) == "Uniform"


class KDPM2DiscardingScheduler(_DiscardPenultimateSigma, diffusers.KDPM2DiscreteScheduler):
    pass


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """k-diffusion's get_ancestral_step: the sigma an ancestral step aims down to, and the noise it adds back up to
    `sigma_to` (eta 1: as much as a DDPM step; 0: none)."""
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


def model_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The model's sigmas by training timestep, in the noise levels' dtype (as diffusers' schedulers make them):
    the first is its least noise, the last its most."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def model_log_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """The model's log sigmas by training timestep (float64), where k-diffusion's sigma_to_t looks a sigma up."""
    return np.log(model_sigmas(alphas_cumprod).double().numpy())


class _AncestralMidpoints:
    """Ancestral steps through a midpoint, with A1111's eta, on diffusers' KDPM2AncestralDiscreteScheduler: each step
    goes down to sigma_down, through the midpoint between sigma and sigma_down (in log sigma), and adds fresh noise
    of sigma_up, both from get_ancestral_step as in Euler a. diffusers builds these arrays at eta 1 in set_timesteps;
    another eta rebuilds them (and the midpoints' timesteps) from the same schedule. The eta is the instance's, as
    Euler a's is, and so is A1111's sigma noise, which scales the fresh noise (sigma_up is used for nothing else)."""

    eta = 1.0
    s_noise = 1.0

    def set_timesteps(self, *args, **kwargs):
        self._set_timesteps_at_eta(*args, **kwargs)
        if self.s_noise != 1.0:
            self.sigmas_up = self.sigmas_up * self.s_noise
        # A step before the last whose sigma_down is 0: its next sigma is below float32's resolution of its own
        # (Zero Terminal SNR's 4519, 113, then 0.03 at three steps), so its ancestral step leaves no sigma_down, and
        # its midpoint (log 0 halfway) is NaN. k-diffusion takes it as an Euler step straight to the prediction,
        # then adds its noise. The pipeline still asks the model at the midpoint (timestep 0 here); see step.
        self._flat = torch.isnan(self.sigmas_interpol)
        if self._flat.any():
            self.sigmas_interpol = torch.nan_to_num(self.sigmas_interpol, nan=0.0)
            self.timesteps = torch.nan_to_num(self.timesteps, nan=0.0)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        if self.step_index is None:
            self._init_step_index(timestep)
        first_half = self.state_in_first_order
        index = self.step_index if first_half else self.step_index - 1  # diffusers' arrays hold each step twice
        if not self._flat[index]:
            return self._midpoint_step(model_output, timestep, sample, generator, return_dict)
        if first_half:
            denoised = ve_denoised(self.config.prediction_type, model_output, sample, self.sigmas[index])
            self.sample, self._flat_denoised, prev_sample = sample, denoised, denoised
        else:
            # The midpoint's answer is not used: the step is the Euler step of its first call, and its noise.
            denoised, self.sample = self._flat_denoised, None
            prev_sample = self._noised(denoised, model_output, generator, index)
        return self._stepped(prev_sample, denoised, return_dict)

    def _midpoint_step(self, model_output, timestep, sample, generator, return_dict):
        return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)

    def _noised(self, prev_sample, model_output, generator, index):
        """The step's end with its fresh noise of sigma_up, drawn from the pass's generator as A1111 draws it."""
        noise = randn_tensor(
            model_output.shape, dtype=model_output.dtype, device=model_output.device, generator=generator
        )
        return prev_sample + noise * self.sigmas_up[index]

    def _stepped(self, prev_sample, denoised, return_dict):
        self._step_index += 1
        if not return_dict:
            return (prev_sample, denoised)
        return KDPM2AncestralDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def _set_timesteps_at_eta(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        if self.eta == 1.0:
            return
        # diffusers keeps the first sigma, then each later one twice, then the last (0) once more: one of each.
        sigmas = torch.cat([self.sigmas[:1], self.sigmas[1:-1:2]])
        timesteps = torch.cat([self.timesteps[:1], self.timesteps[2::2]])
        sigmas_next = torch.cat([sigmas[1:], sigmas.new_zeros(1)])
        sigmas_down, sigmas_up = ancestral_step(sigmas, sigmas_next, self.eta)
        sigmas_down[-1] = 0.0
        sigmas_interpol = sigmas.log().lerp(sigmas_down.log(), 0.5).exp()
        sigmas_interpol[-2:] = 0.0

        def twice(values):
            return torch.cat([values[:1], values[1:].repeat_interleave(2), values[-1:]])

        self.sigmas_interpol, self.sigmas_up, self.sigmas_down = map(twice, (sigmas_interpol, sigmas_up, sigmas_down))
        log_sigmas = self.log_sigmas.cpu()
        timesteps_interpol = torch.from_numpy(
            np.array([self._sigma_to_t(sigma, log_sigmas) for sigma in sigmas_interpol.cpu()])
        ).to(timesteps.device, dtype=timesteps.dtype)
        interleaved = torch.stack((timesteps_interpol[:-2, None], timesteps[1:, None]), dim=-1).flatten()
        self.timesteps = torch.cat([timesteps[:1], interleaved])


class KDPM2AncestralDiscardingScheduler(
    _AncestralMidpoints, _DiscardPenultimateSigma, diffusers.KDPM2AncestralDiscreteScheduler
):
    """DPM2 a with A1111's eta (k-diffusion's sample_dpm_2_ancestral): an Euler step to the midpoint, and from the step's
    start to sigma_down on the midpoint's slope (_AncestralMidpoints). At eta 0 this is DPM2."""


class A1111DPMpp2SAncestralScheduler(_AncestralMidpoints, diffusers.KDPM2AncestralDiscreteScheduler):
    """DPM++ 2S a as A1111 runs it (k-diffusion's sample_dpmpp_2s_ancestral; diffusers has no ancestral 2S solver): the
    steps of DPM2 a (_AncestralMidpoints: the model asked at sigma and at the midpoint between sigma and sigma_down,
    then the step's noise of sigma_up, drawn from the pass's generator as A1111 draws it), with DPM-Solver++'s
    exponential-integrator updates: x_mid = (s_mid / s) x + (1 - s_mid / s) D(x, s), then x = (s_down / s) x +
    (1 - s_down / s) D(x_mid, s_mid). The last step (to 0) is an Euler step, with one model call."""

    def _midpoint_step(self, model_output, timestep, sample, generator, return_dict):
        first_half = self.state_in_first_order
        index = self.step_index if first_half else self.step_index - 1  # diffusers' arrays hold each step twice
        sigma, sigma_mid = self.sigmas[index], self.sigmas_interpol[index]
        sigma_in = sigma if first_half else sigma_mid  # the noise level the model saw
        denoised = ve_denoised(self.config.prediction_type, model_output, sample, sigma_in)
        if first_half:
            # To the midpoint (to 0 on the last step, where the midpoint is 0: an Euler step gives the prediction).
            ratio = sigma_mid / sigma
            self.sample = sample
            prev_sample = ratio * sample + (1 - ratio) * denoised
        else:
            ratio = self.sigmas_down[index] / sigma
            prev_sample = self._noised(ratio * self.sample + (1 - ratio) * denoised, model_output, generator, index)
            self.sample = None
        return self._stepped(prev_sample, denoised, return_dict)


class _SigmaNoise:
    """A1111's sigma noise (s_noise) on diffusers' multistep DPM-Solver: the fresh noise its SDE updates add, scaled
    (1: as drawn). The ODE updates get no noise, and none is scaled."""

    s_noise = 1.0

    def _sigma_noise(self, noise):
        return noise if noise is None or self.s_noise == 1.0 else noise * self.s_noise

    def dpm_solver_first_order_update(self, *args, noise=None, **kwargs):
        return super().dpm_solver_first_order_update(*args, noise=self._sigma_noise(noise), **kwargs)

    def multistep_dpm_solver_second_order_update(self, *args, noise=None, **kwargs):
        return super().multistep_dpm_solver_second_order_update(*args, noise=self._sigma_noise(noise), **kwargs)

    def multistep_dpm_solver_third_order_update(self, *args, noise=None, **kwargs):
        return super().multistep_dpm_solver_third_order_update(*args, noise=self._sigma_noise(noise), **kwargs)


_TORCHSDE_ROUNDING_WARNING = r"Should have t[ab][<>]=t[01] but got"


def _ignore_torchsde_rounding_warning() -> None:
    """torchsde rounds a tree's ends to its tolerance (6 digits), so the schedule's smallest sigma can fall just below
    the tree made for it; torchsde then warns on every such job before clamping the time to the tree's start, as it
    does in A1111. The noise is A1111's either way, and the warning would only fill the server's log. Checked when a
    tree is made, not once at import, so that it holds wherever warning filters were reset since; added only when
    missing, since each change to the filters makes every module's warnings show once more."""
    ignored = (getattr(message, "pattern", None) for action, message, *_ in warnings.filters if action == "ignore")
    if _TORCHSDE_ROUNDING_WARNING not in ignored:
        warnings.filterwarnings(
            "ignore", message=_TORCHSDE_ROUNDING_WARNING, category=UserWarning, module=r"torchsde\."
        )


def a1111_noise_sampler(sample, sigmas, seed):
    """A1111's create_noise_sampler for its Brownian-noise samplers: k-diffusion's BrownianTreeNoiseSampler over the
    pass's whole schedule, from its smallest non-zero sigma to its largest, one tree per image seed (`seed` a list,
    as A1111 hands it its batch's seeds) or one for the whole `sample`."""
    positive = sigmas[sigmas > 0]
    _ignore_torchsde_rounding_warning()
    return BrownianTreeNoiseSampler(sample, positive.min().item(), sigmas.max().item(), seed)


class _BrownianStepNoise:
    """A1111's step noise for DPM++ 2M SDE, its Heun variant and 3M SDE (its brownian_noise samplers): the increment of
    a Brownian tree seeded with the image's seed between the step's two sigmas (k-diffusion's BrownianTreeNoiseSampler,
    over the pass's whole schedule, as A1111's create_noise_sampler makes it), not a draw from the pass's generator.
    So the step noise depends on the seed alone (not on ENSD, which A1111 does not apply to these samplers either).
    `brownian_seed` is the batch's seeds (one tree each, as A1111's BatchedBrownianTree) or one seed for the whole
    sample; without it (None) the steps draw from the generator, as diffusers' own."""

    brownian_seed: int | list[int] | None = None
    _brownian = None

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True):
        if (
            variance_noise is None
            and self.brownian_seed is not None
            and self.config.algorithm_type == "sde-dpmsolver++"
        ):
            if self.step_index is None:
                self._init_step_index(timestep)
            sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
            if self._brownian is None:
                self._brownian = a1111_noise_sampler(sample, self.sigmas, self.brownian_seed)
            # The last step (to sigma 0) adds none.
            variance_noise = self._brownian(sigma, sigma_next) if sigma_next > 0 else torch.zeros_like(sample)
        return super().step(
            model_output, timestep, sample, generator=generator, variance_noise=variance_noise, return_dict=return_dict
        )


class DPMSolverMultistepDiscardingScheduler(
    _DiscardPenultimateSigma, _SigmaNoise, diffusers.DPMSolverMultistepScheduler
):
    pass


_DISCARDING = {
    "KDPM2DiscreteScheduler": KDPM2DiscardingScheduler,
    "KDPM2AncestralDiscreteScheduler": KDPM2AncestralDiscardingScheduler,
    "DPMSolverMultistepScheduler": DPMSolverMultistepDiscardingScheduler,
}


def a1111_timesteps(steps: int, train_timesteps: int = TRAIN_TIMESTEPS) -> np.ndarray:
    """A1111's timesteps for its DDIM, PLMS and UniPC (CompVisSampler.get_timesteps): range(0, T, T // steps) + 1,
    clipped to the last; 31 of them at 30 steps."""
    return np.clip(np.arange(0, train_timesteps, train_timesteps // steps) + 1, 0, train_timesteps - 1)


class _A1111Timesteps:
    """What A1111's timestep samplers (its CompVisSampler: DDIM, PLMS, UniPC) share: its timesteps (a1111_timesteps,
    spaced for one step more with its "Always discard next-to-last sigma": `respaced`), steps from each timestep to
    the one below it, the model's output read as a noise prediction (its CompVisTimestepsVDenoiser turns v into one),
    and a pass from a picture: A1111 runs it over its timesteps below t_enc = int(strength x steps), on the picture
    noised to timestep t_enc. A pipeline cannot be told where such a pass starts: the scheduler is built knowing its
    model calls (`picture_calls`; 0 for txt2img) and keeps the schedule's length, of which a pipeline runs the last."""

    respaced = False
    picture_calls = 0

    def _space(self, num_inference_steps: int) -> list[int]:
        """A1111's timesteps for `num_inference_steps`, ascending; each one's timestep below is kept for the steps.
        A new pass: no call made yet."""
        points = a1111_timesteps(num_inference_steps + int(self.respaced), self.config.num_train_timesteps).tolist()
        self.num_inference_steps = num_inference_steps
        self._below = dict(zip(points[1:], points[:-1], strict=True))
        self._calls = 0
        return points

    def _below_picture(self, points: list[int], t_enc: int) -> list[int]:
        """A pass from a picture: the timesteps below t_enc, the picture noised to timestep t_enc (add_noise)."""
        t_enc = min(t_enc, len(points) - 1)
        self._noised_at = points[t_enc]
        return points[:t_enc]

    def _kept_length(self, calls: list, num_inference_steps: int) -> list:
        """A pass from a picture's `calls`, led by copies of the first to the schedule's length, which a pipeline
        skips; txt2img's as they are."""
        if not self.picture_calls or not calls:
            return calls
        return [calls[0]] * (num_inference_steps - len(calls)) + calls

    def _starts_from_picture(self) -> bool:
        return bool(self.picture_calls) and self._calls == 0

    def add_noise(self, original_samples, noise, timesteps):
        if self._starts_from_picture():  # the start of a pass from a picture, as A1111 noises it
            timesteps = torch.full_like(timesteps, self._noised_at)
        return super().add_noise(original_samples, noise, timesteps)

    def _noise_prediction(self, model_output, timestep: int, sample):
        alpha = self.alphas_cumprod[timestep]
        if self.config.prediction_type == "v_prediction":
            return alpha**0.5 * model_output + (1 - alpha) ** 0.5 * sample
        if self.config.prediction_type == "sample":
            return (sample - alpha**0.5 * model_output) / (1 - alpha) ** 0.5
        return model_output

    def _step_down(self, sample, eps, timestep: int, sigma=0.0, direction=None):
        """From `sample` at `timestep` to the timestep below along noise prediction `eps`, keeping `sigma` of it for
        fresh noise (DDIM's eta): (A1111's x_prev before that noise, its pred_x0). `direction`, when given, is the
        noise the step heads on along instead of `eps` (CFG++)."""
        alpha, alpha_prev = self.alphas_cumprod[timestep], self.alphas_cumprod[self._below[timestep]]
        denoised = (sample - (1 - alpha) ** 0.5 * eps) / alpha**0.5
        direction = eps if direction is None else direction
        return alpha_prev**0.5 * denoised + (1 - alpha_prev - sigma**2) ** 0.5 * direction, denoised


class A1111DDIMScheduler(_A1111Timesteps, diffusers.DDIMScheduler):
    """DDIM as A1111 samples it (sd_samplers_timesteps_impl.ddim). Over A1111's timesteps t_0 = 1, t_1, ... t_L-1
    (a1111_timesteps) it asks the model at t_L-1 down to t_1, each step going to the level of the timestep below,
    so the last ends at timestep 1: at 20 steps 19 model calls, 951 to 51; at 30 steps 30, 991 to 34. diffusers'
    DDIM asks at 951 to 1 and ends at timestep 0's level. A1111's img2img starts t_enc = int(strength x steps)
    timesteps up and asks the model from the one below: its picture is noised to the level above its first step
    (add_noise before the first step does that here). With A1111's "Always discard next-to-last sigma"
    (`respaced`) the timesteps are spaced for one step more, as A1111 spaces them.

    A pass from a picture (`picture_calls` = t_enc - 1) asks at t_enc - 1 down to t_1 (_A1111Timesteps)."""

    def set_timesteps(self, num_inference_steps: int, device=None):
        points = self._space(num_inference_steps)
        if self.picture_calls:
            points = self._below_picture(points, self.picture_calls + 1)
        calls = self._kept_length(points[:0:-1], num_inference_steps)
        self.timesteps = torch.tensor(calls, dtype=torch.int64, device=device)

    def step(
        self,
        model_output,
        timestep,
        sample,
        eta=0.0,
        use_clipped_model_output=False,
        generator=None,
        variance_noise=None,
        return_dict=True,
    ):
        self._calls += 1
        timestep = int(timestep)
        alpha, alpha_prev = self.alphas_cumprod[timestep], self.alphas_cumprod[self._below[timestep]]
        sigma = eta * ((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)) ** 0.5
        eps = self._noise_prediction(model_output, timestep, sample)
        prev_sample, denoised = self._step_down(sample, eps, timestep, sigma, self._direction(timestep, sample))
        if eta > 0:
            if variance_noise is None:
                variance_noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            prev_sample = prev_sample + sigma * variance_noise
        if not return_dict:
            return (prev_sample, denoised)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def _direction(self, timestep: int, sample):
        """The noise a step heads on along, where it is not the guided prediction's (None)."""
        return None


class A1111DDIMCFGppScheduler(A1111DDIMScheduler):
    """A1111's DDIM CFG++ (sd_samplers_timesteps_impl.ddim_cfgpp, after Chung et al., "CFG++: Manifold-constrained
    Classifier Free Guidance for Diffusion Models", 2024): A1111's DDIM, but each step's pred_x0 comes from the
    prediction guided at cfg_scale / 12.5, and the step heads on along the negative prompt's noise prediction, which
    `negative_prediction` holds for the call just made (CFGppUNet, engine/cfgpp.py, puts it there and scales the
    guidance)."""

    negative_prediction: torch.Tensor | None = None

    def _direction(self, timestep: int, sample):
        if self.negative_prediction is None:
            raise RuntimeError("DDIM CFG++ steps need the negative prompt's prediction: run the UNet as a CFGppUNet")
        negative, self.negative_prediction = self.negative_prediction, None  # each call's own, used once
        return self._noise_prediction(negative.to(sample.dtype), timestep, sample)


class A1111PLMSScheduler(_A1111Timesteps, diffusers.PNDMScheduler):
    """PLMS as A1111 samples it (sd_samplers_timesteps_impl.plms), on A1111's timesteps t_0 = 1, ... t_L-1
    (a1111_timesteps): from t_L-1 down to t_1, each step goes to the level of the timestep below on a noise
    prediction of Adams-Bashforth order 2, 3, then 4 over the model's last predictions; the first step is a pseudo
    improved Euler, which asks the model once more, at the timestep below, on that step's own result. At 20 steps 20
    model calls (951, 901, 901, 851, ... 51), ending at timestep 1; diffusers' PNDM makes 21, ending at 0. A pass
    from a picture (`picture_calls` = A1111's t_enc) runs the same over t_0 ... t_enc-1, on its picture noised to
    t_enc, as A1111's does: t_enc model calls (_A1111Timesteps).
    `respaced`: A1111's "Always discard next-to-last sigma", timesteps spaced for one step more."""

    def set_timesteps(self, num_inference_steps: int, device=None):
        points = self._space(num_inference_steps)
        if self.picture_calls:
            points = self._below_picture(points, self.picture_calls)
        calls = points[:0:-1]
        if calls:  # the warm-up's second call, at the timestep below the first (timestep 1 when there is no other)
            calls.insert(1, points[-2] if len(points) > 2 else points[0])
        calls = self._kept_length(calls, num_inference_steps)
        self._start = self._first_prediction = None
        self._predictions: list[torch.Tensor] = []
        self.timesteps = torch.tensor(calls, dtype=torch.int64, device=device)

    def step(self, model_output, timestep, sample, return_dict=True):
        call, timestep = self._calls, int(timestep)
        self._calls += 1
        eps = self._noise_prediction(model_output, timestep, sample)
        if call == 0:  # the warm-up: a first guess, which the model is asked about once more
            self._start, self._first_prediction, self._first_timestep = sample, eps, timestep
            prev_sample, _ = self._step_down(sample, eps, timestep)
        elif call == 1:
            prediction = (self._first_prediction + eps) / 2
            prev_sample, _ = self._step_down(self._start, prediction, self._first_timestep)
            self._predictions = [self._first_prediction]
        else:
            earlier = self._predictions
            if len(earlier) == 1:
                prediction = (3 * eps - earlier[-1]) / 2
            elif len(earlier) == 2:
                prediction = (23 * eps - 16 * earlier[-1] + 5 * earlier[-2]) / 12
            else:
                prediction = (55 * eps - 59 * earlier[-1] + 37 * earlier[-2] - 9 * earlier[-3]) / 24
            prev_sample, _ = self._step_down(sample, prediction, timestep)
            self._predictions = [*earlier, eps][-3:]
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)


@dataclass(frozen=True)
class UniPCSettings:
    """A1111's UniPC settings (its uni_pc_variant, uni_pc_skip_type, uni_pc_order, uni_pc_lower_order_final)."""

    variant: str = "bh1"
    skip_type: str = "time_uniform"
    order: int = 3
    lower_order_final: bool = True


class A1111UniPCScheduler(_A1111Timesteps, diffusers.UniPCMultistepScheduler):
    """UniPC as A1111 samples it (its own UniPC: sd_samplers_timesteps_impl.unipc), with its settings
    (UniPCSettings; by default variant bh1, order 3, lower order final, time-uniform skip). It solves in continuous
    time: SD's noise levels at t_i = (i + 1) / 1000, log alpha interpolated linearly between them. txt2img goes from
    t = 1 to t = 1/1000 in as many steps as A1111 has timesteps (a1111_timesteps: 20 at 20 steps, 31 at 30), asking
    the model at each step's start at model time (t - 1/1000) x 1000: 999, 949.05, ... 49.95 at 20 steps. diffusers'
    UniPC (bh2 by default) asks at its own spacing (941, 894, ... 48) and ends at timestep 0.

    Each step predicts the next point from the model's last `unipc_order` data predictions (lower orders at the
    start and, with `lower_order_final`, at the end). Once the model has been asked at the point reached, the
    point is corrected with that prediction, as A1111 does; the last step is not corrected. A pass from a picture
    (`picture_calls` = A1111's t_enc) starts where A1111's starts, at A1111's timestep t_enc - 1 plus one, and
    solves down in t_enc steps. Its picture is noised to A1111's timestep t_enc. A1111 refuses fewer steps than
    the order; here such a pass runs at the orders its steps allow. `respaced` is A1111's "Always discard
    next-to-last sigma": its timesteps are spaced for one step more."""

    unipc_order = 3
    variant = "bh1"
    lower_order_final = True
    skip_type = "time_uniform"

    def set_timesteps(self, num_inference_steps: int, device=None):
        points = self._space(num_inference_steps)
        train = self.config.num_train_timesteps
        self._log_alphas = 0.5 * np.log(self.alphas_cumprod.double().numpy())
        self._grid = np.arange(1, train + 1, dtype=np.float64) / train
        if self.picture_calls:
            below = self._below_picture(points, self.picture_calls)
            steps, start = len(below), (below[-1] + 1) / train
        else:
            steps, start = len(points), 1.0
        self._times = self._skip(start, 1 / train, steps)
        self._orders = [
            min(j, self.unipc_order, *([steps + 1 - j] if self.lower_order_final else [])) for j in range(steps + 1)
        ]
        model_times = self._kept_length(((self._times[:-1] - 1 / train) * train).tolist(), num_inference_steps)
        self.timesteps = torch.tensor(model_times, dtype=torch.float32, device=device)
        # Each call's noise level as diffusers' variance-preserving schedulers keep it (sigma / alpha), by the calls
        # made so far (step_index), for what reads a step's noise level.
        alphas, sigmas = self._alpha_sigma(self._times)
        self.sigmas = torch.from_numpy(sigmas / alphas).float()
        self._step_index = None
        self._history: list[torch.Tensor] = []
        self._start = None

    def _log_alpha(self, t):
        """log alpha at time(s) t: SD's levels interpolated linearly."""
        return np.interp(t, self._grid, self._log_alphas)

    def _alpha_sigma(self, t):
        """alpha and sigma (variance-preserving: alpha^2 + sigma^2 = 1) at time(s) t."""
        log_alpha = self._log_alpha(t)
        return np.exp(log_alpha), np.sqrt(-np.expm1(2 * log_alpha))

    def _lambda(self, t: float) -> float:
        """Half the log signal-to-noise ratio at time t."""
        log_alpha = self._log_alpha(t)
        return float(log_alpha - 0.5 * np.log(-np.expm1(2 * log_alpha)))

    def _skip(self, start: float, end: float, steps: int) -> np.ndarray:
        """A1111's UniPC times from `start` down to `end` in `steps` steps, by its skip type."""
        if self.skip_type == "time_quadratic":
            return np.linspace(start**0.5, end**0.5, steps + 1) ** 2
        if self.skip_type == "logSNR":
            log_alphas = -0.5 * np.logaddexp(0, -2 * np.linspace(self._lambda(start), self._lambda(end), steps + 1))
            return np.interp(log_alphas, self._log_alphas[::-1], self._grid[::-1])
        return np.linspace(start, end, steps + 1)

    def add_noise(self, original_samples, noise, timesteps):
        if self._starts_from_picture():  # the start of a pass from a picture, as A1111 noises it
            alpha_bar = float(self.alphas_cumprod[self._noised_at])
            return alpha_bar**0.5 * original_samples + (1 - alpha_bar) ** 0.5 * noise
        train = self.config.num_train_timesteps
        alpha, sigma = self._alpha_sigma(float(timesteps.reshape(-1)[0]) / train + 1 / train)
        return float(alpha) * original_samples + float(sigma) * noise

    def step(self, model_output, timestep, sample, return_dict=True, **kwargs):
        index = self._calls
        self._calls = self._step_index = index + 1
        alpha, sigma = self._alpha_sigma(self._times[index])
        # A1111 reads a v-prediction as noise at the model time's whole timestep (its CompVisTimestepsVDenoiser).
        eps = self._noise_prediction(model_output, int(float(timestep)), sample)
        denoised = (sample - float(sigma) * eps) / float(alpha)
        # The point this call was asked at, corrected with its prediction (the first is where the pass starts).
        start = sample if index == 0 else self._update(self._start, index - 1, denoised)
        self._history = [*self._history, denoised][-self.unipc_order :]
        self._start = start
        prev_sample = self._update(start, index)
        if not return_dict:
            return (prev_sample, denoised)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def _update(self, start, index: int, denoised_there: torch.Tensor | None = None):
        """A1111's multistep_uni_pc_bh_update: from `start` at time `index` to the next, over the data predictions
        of the history (the last one at `index`), at that step's order. Without `denoised_there` the predicted
        point; with it (the model's prediction at the point predicted), the corrected one."""
        order = self._orders[index + 1]
        times = self._times
        sigma_from = float(self._alpha_sigma(times[index])[1])
        alpha_to, sigma_to = map(float, self._alpha_sigma(times[index + 1]))
        lambda_from = self._lambda(times[index])
        h = self._lambda(times[index + 1]) - lambda_from
        last = self._history[-1]
        ratios = [(self._lambda(times[index - i]) - lambda_from) / h for i in range(1, order)]
        differences = [(self._history[-(i + 1)] - last) / ratio for i, ratio in enumerate(ratios, 1)]
        hh = -h
        h_phi_1 = math.expm1(hh)
        scale = hh if self.variant == "bh1" else h_phi_1
        powers, targets = [], []
        h_phi_k, factorial = h_phi_1 / hh - 1, 1
        for i in range(1, order + 1):
            powers.append([ratio ** (i - 1) for ratio in [*ratios, 1.0]])
            targets.append(h_phi_k * factorial / scale)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        powers, targets = np.array(powers), np.array(targets)
        base = sigma_to / sigma_from * start - alpha_to * h_phi_1 * last
        if denoised_there is None:
            if not differences:
                return base
            rhos = [0.5] if order == 2 else np.linalg.solve(powers[:-1, :-1], targets[:-1])
            residual = sum(float(rho) * difference for rho, difference in zip(rhos, differences, strict=True))
        else:
            rhos = [0.5] if order == 1 else np.linalg.solve(powers, targets)
            residual = float(rhos[-1]) * (denoised_there - last)
            for rho, difference in zip(rhos[:-1], differences, strict=True):
                residual = residual + float(rho) * difference
        return base - alpha_to * scale * residual


class A1111LCMScheduler(diffusers.LCMScheduler):
    """LCM as A1111 samples it (its LCM sampler, through k-diffusion).

    Both take the model's noise levels at the 50 "original" timesteps 19, 39, ... 999. diffusers steps
    on some of those timesteps (at 8 steps: 999, 879, ... 139); A1111 spreads its steps evenly from 999
    to 19 in timestep (999, 859, ... 19), reading each step's sigma between the 50 by log-linear
    interpolation, evaluating the UNet at the nearest of the 50 timesteps, and adding the next step's
    noise at that interpolated sigma. Its SGM Uniform spreads n + 1 points and drops the last. The
    steps are diffusers' (variance-preserving latents): the same arithmetic as A1111's x = x0 + sigma *
    noise, scaled by 1 / sqrt(1 + sigma^2).

    `sigmas` holds each step's sigma and a final 0, as the k-diffusion schedulers keep them, so
    previews read the predicted clean latent at the step's own noise level.
    """

    # Set by set_timesteps when it makes A1111's schedule; off, the class behaves as diffusers' own.
    _a1111_schedule = False

    def set_timesteps(
        self, num_inference_steps=None, device=None, original_inference_steps=None, timesteps=None, strength=1.0
    ):
        if num_inference_steps is None or timesteps is not None or strength != 1.0:
            self._a1111_schedule = False
            return super().set_timesteps(num_inference_steps, device, original_inference_steps, timesteps, strength)
        original = original_inference_steps or self.config.original_inference_steps
        stride = self.config.num_train_timesteps // original
        valid_alphas = self.alphas_cumprod[torch.arange(original) * stride + stride - 1].double()
        log_sigmas = ((1 - valid_alphas) / valid_alphas).sqrt().log()
        first, last = original * stride - 1, stride - 1
        if self.config.timestep_spacing == "trailing":  # SGM Uniform
            ramp = torch.linspace(first, last, num_inference_steps + 1, dtype=torch.float64)[:-1]
        else:
            ramp = torch.linspace(first, last, num_inference_steps, dtype=torch.float64)
        position = ((ramp - last) / stride).clamp(0, original - 1)
        low, high = position.floor().long(), position.ceil().long()
        weight = position - low
        log_sigma = (1 - weight) * log_sigmas[low] + weight * log_sigmas[high]
        nearest = (log_sigma[:, None] - log_sigmas[None, :]).abs().argmin(dim=1)
        self.timesteps = (nearest * stride + stride - 1).to(device=device, dtype=torch.long)
        self.sigmas = torch.cat([log_sigma.exp(), log_sigma.new_zeros(1)]).float()
        self._a1111_schedule = True
        # A1111 starts from noise * sigma_max, i.e. sqrt(1 - alpha) * noise in these latents.
        self.init_noise_sigma = float((1 - self._step_alpha(0)).sqrt())
        self.num_inference_steps = num_inference_steps
        self._step_index = None
        self._begin_index = 0  # timesteps may repeat past 50 steps: never look the first one up
        self.custom_timesteps = False

    def _step_alpha(self, index: int) -> torch.Tensor:
        """alpha_cumprod at step `index`'s sigma (1 after the last step)."""
        return 1 / (1 + self.sigmas[index].double() ** 2)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        if not self._a1111_schedule:
            return super().step(model_output, timestep, sample, generator, return_dict)
        if self.step_index is None:
            self._init_step_index(timestep)
        index = self.step_index
        alpha = self._step_alpha(index).to(sample.device, sample.dtype)
        next_alpha = self._step_alpha(index + 1).to(sample.device, sample.dtype)
        sigma = self.sigmas[index].to(sample.device, sample.dtype)
        spread = sample / alpha.sqrt()  # A1111's x: x0 + sigma * noise
        if self.config.prediction_type == "epsilon":
            predicted = spread - sigma * model_output
        elif self.config.prediction_type == "v_prediction":
            predicted = alpha.sqrt() * sample - (1 - alpha).sqrt() * model_output
        else:
            predicted = model_output
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(timestep)
        denoised = c_out * predicted + c_skip * spread
        if index < len(self.timesteps) - 1:
            noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=denoised.dtype
            )
            prev_sample = next_alpha.sqrt() * denoised + (1 - next_alpha).sqrt() * noise
        else:
            prev_sample = denoised
        self._step_index += 1
        if not return_dict:
            return (prev_sample, denoised)
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)

    def add_noise(self, original_samples, noise, timesteps):
        """Noise for the step that starts at `timesteps` (img2img's start, inpaint's next step), at that
        step's own sigma."""
        if not self._a1111_schedule:
            return super().add_noise(original_samples, noise, timesteps)
        start = self.begin_index or 0
        alphas = []
        for timestep in timesteps.reshape(-1).tolist():
            matches = (self.timesteps[start:] == timestep).nonzero()
            if len(matches) == 0:
                return super().add_noise(original_samples, noise, timesteps)
            alphas.append(self._step_alpha(start + int(matches[0])))
        alpha = torch.stack(alphas).to(original_samples.device, original_samples.dtype)
        alpha = alpha.reshape(-1, *([1] * (original_samples.ndim - 1)))
        return alpha.sqrt() * original_samples + (1 - alpha).sqrt() * noise


class EtaEulerAncestralScheduler(diffusers.EulerAncestralDiscreteScheduler):
    """Euler a with A1111's eta (k-diffusion's get_ancestral_step): each step goes down to sigma_down and adds
    fresh noise of sigma_up, where sigma_up = min(sigma_next, eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2)
    / sigma^2)). diffusers' own step is eta 1 and takes none. At eta 0 this is Euler; the noise is still drawn
    every step, as A1111 draws it.

    The eta is the instance's (build_scheduler sets it), not a step argument: a pipeline hands its own
    default eta (0) to any step that takes one, which would turn Euler a into Euler for every caller."""

    eta = 1.0

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        eta = self.eta
        if eta == 1.0:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        sigma_next = self.sigmas[self.step_index + 1]
        sample = sample.to(torch.float32)
        denoised = ve_denoised(self.config.prediction_type, model_output, sample, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        prev_sample = sample + (sample - denoised) / sigma * (sigma_down - sigma)
        noise = randn_tensor(
            model_output.shape, dtype=model_output.dtype, device=model_output.device, generator=generator
        )
        prev_sample = (prev_sample + noise * sigma_up).to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample, denoised)
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)


@dataclass(frozen=True)
class SigmaChurn:
    """A1111's sigma churn (s_churn: how much noise Euler adds back before a step, 0 off) on the steps whose sigma is
    from s_tmin to s_tmax (0: no upper end)."""

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = 0.0


class _SigmaChurn:
    """A1111's sigma churn, as k-diffusion's sample_euler, sample_heun and sample_dpm_2 run it (s_churn, s_tmin, s_tmax, and
    s_noise on the churn's noise). Before each step whose sigma is from s_tmin to s_tmax, gamma = min(s_churn / steps,
    sqrt(2) - 1) raises it to sigma_hat = sigma (1 + gamma), adding fresh noise of sqrt(sigma_hat^2 - sigma^2) times
    s_noise; the model sees that sample at sigma_hat, and the step goes from sigma_hat to the next sigma. `steps`
    counts the steps the pass runs (an img2img pass's fewer), as k-diffusion counts the sigmas it is given. As in the
    k-diffusion A1111 runs (its pinned commit), every step draws the noise, also one outside s_tmin to s_tmax that
    does not use it, so each step's noise is the same whichever steps churn.

    diffusers' Euler takes s_churn too, but adds the noise after the model has seen the sample, so its prediction is
    of another sample than the one it steps from (its Heun and DPM2 take none). Here the noise goes in first:
    scale_model_input adds it (drawing from the pass's per-image generators, after the starting noise, as A1111 draws
    it), the timesteps the pipeline hands the UNet are those of the raised sigmas (k-diffusion's sigma_to_t), and the
    step goes on from the raised sample. `noise_generators` are set by install_step_noise."""

    churn = SigmaChurn()
    s_noise = 1.0
    noise_generators = None
    sigma_hats = None  # per index of self.sigmas: the raised sigma where a step churns, else the sigma
    _churned = None  # (index, the raised sample) once scale_model_input has raised it
    _plain_timesteps = None
    _starts = frozenset()  # the indices where the pass's steps start, each drawing the churn's noise
    _drawn_at = None
    # Whether the sampler's own step takes a generator (the pipeline hands this one's step a generator).
    step_takes_generator = True

    def _step_starts(self) -> range:
        """The indices of self.timesteps where a step (its first model call) starts: every one for a single-call
        sampler, every other one where diffusers interleaves a step's two calls (Heun, DPM2)."""
        return range(0, len(self.timesteps), self.order)

    def _churned_at(self, index: int, sigma_hat: torch.Tensor) -> None:
        """Anything else the sampler makes of a step's raised sigma (DPM2: its midpoint)."""

    def _second_call(self, model_output, sample, index: int):
        """The second model call's step of a churned step (prev_sample, denoised), or None for diffusers' own."""
        return None

    def _step_from(self, model_output, sample, sigma_hat, index):
        """The step of the sampler at `index` from the raised sample: (prev_sample, denoised), as doubles."""
        raise NotImplementedError

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self._churned = None
        self._plain_timesteps = self.timesteps.clone()
        self._keep_plain()
        # Steps are counted from the start, not found by timestep: raised sigmas above the model's largest all get
        # its last timestep, so several steps may share one. img2img pipelines set their own start.
        self._begin_index = 0
        self._churn_from(0)

    def set_begin_index(self, begin_index: int = 0):
        super().set_begin_index(begin_index)
        self._churn_from(begin_index)

    def _churn_from(self, begin: int) -> None:
        """Each step's raised sigma for a pass that starts at index `begin`, and the timesteps the UNet gets. The
        timesteps change in place: an img2img pipeline takes its slice of them before it names the first step."""
        churn, sigmas = self.churn, self.sigmas.double()
        starts = [index for index in self._step_starts() if index >= begin]
        self._starts, self._drawn_at = frozenset(starts), None
        gamma = min(churn.s_churn / max(1, len(starts)), 2**0.5 - 1)
        top = churn.s_tmax or math.inf
        log_sigmas = model_log_sigmas(self.alphas_cumprod)
        self.sigma_hats = sigmas.clone()
        self._restore_plain()
        timesteps = self._plain_timesteps.clone()
        for index in starts:
            if gamma > 0 and churn.s_tmin <= sigmas[index] <= top:
                self.sigma_hats[index] = sigmas[index] * (1 + gamma)
                timesteps[index] = _sigma_to_t(float(self.sigma_hats[index]), log_sigmas)
                self._churned_at(index, self.sigma_hats[index])
        for index, timestep in self._moved_timesteps(log_sigmas):
            timesteps[index] = timestep
        self.timesteps[:] = timesteps

    def _keep_plain(self) -> None:
        """Keep what _churned_at changes, as diffusers made it (set_timesteps)."""

    def _restore_plain(self) -> None:
        """Undo what _churned_at made of an earlier start (set_begin_index after set_timesteps)."""

    def _moved_timesteps(self, log_sigmas) -> list[tuple[int, float]]:
        """Other calls' timesteps that the raised sigmas move (DPM2's midpoints)."""
        return []

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        if self.step_index is None:
            self._init_step_index(timestep)
        index = self.step_index
        if index not in self._starts:
            return super().scale_model_input(sample, timestep)
        generators = self.noise_generators
        if generators is None:  # never torch's global generator: it is every user's, and no seed's
            raise RuntimeError("sigma churn needs the pass's generators (install_step_noise hands them over)")
        # The pipeline may hand over copies of the batch side by side (classifier-free guidance): one draw each.
        images = len(generators) if isinstance(generators, list) else sample.shape[0]
        sigma, sigma_hat = self.sigmas[index].double(), self.sigma_hats[index]
        if self._drawn_at != index:
            self._drawn_at = index
            latents = sample[:images]
            noise = randn_tensor(latents.shape, generator=generators, device=latents.device, dtype=torch.float32)
            if sigma_hat != sigma:
                raised = latents.double() + noise.double() * self.s_noise * (sigma_hat**2 - sigma**2) ** 0.5
                self._churned = (index, raised.to(sample.dtype))
        if sigma_hat == sigma:
            return super().scale_model_input(sample, timestep)
        self.is_scale_input_called = True
        raised = self._churned[1]
        return torch.cat([raised] * (sample.shape[0] // images)) / ((sigma_hat**2 + 1) ** 0.5).to(sample.dtype)

    def step(self, model_output, timestep, sample, *args, generator=None, return_dict=True, **kwargs):
        if self.step_index is None:
            self._init_step_index(timestep)
        index = self.step_index
        second = None
        if self._churned is not None and self._churned[0] == index - 1 and self.order == 2:
            second = self._second_call(model_output, sample.double(), index)
        if second is None and (self._churned is None or self._churned[0] != index):
            own = {"generator": generator} if self.step_takes_generator else {}
            return super().step(model_output, timestep, sample, return_dict=return_dict, **own)
        if second is not None:
            prev_sample, denoised = second
        else:
            prev_sample, denoised = self._step_from(
                model_output, self._churned[1].double(), self.sigma_hats[index], index
            )
        self._step_index += 1
        prev_sample, denoised = prev_sample.to(model_output.dtype), denoised.to(model_output.dtype)
        if not return_dict:
            return (prev_sample, denoised)
        return EulerDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def _denoised(self, model_output, sample, sigma):
        return ve_denoised(self.config.prediction_type, model_output.double(), sample, sigma)


class _EulerChurn(_SigmaChurn):
    """Euler with A1111's sigma churn (_SigmaChurn): k-diffusion's sample_euler."""

    def _step_from(self, model_output, sample, sigma_hat, index):
        denoised = self._denoised(model_output, sample, sigma_hat)
        return sample + (sample - denoised) / sigma_hat * (self.sigmas[index + 1].double() - sigma_hat), denoised


class _HeunChurn(_SigmaChurn):
    """Heun with A1111's sigma churn (_SigmaChurn): k-diffusion's sample_heun. diffusers' Heun interleaves its two
    model calls a step (sigmas s0, s1, s1, s2, s2, ...): the first call of each step, at the even indices, churns; its
    Euler half-step is taken from the raised sample and sigma, and the second call (at the next sigma) corrects it
    from there, as diffusers' own second stage does."""

    step_takes_generator = False

    def _step_from(self, model_output, sample, sigma_hat, index):
        denoised = self._denoised(model_output, sample, sigma_hat)
        derivative = (sample - denoised) / sigma_hat
        dt = self.sigmas[index + 1].double() - sigma_hat
        # What diffusers' second stage takes up (the last step, to sigma 0, is this Euler step alone).
        self.prev_derivative, self.dt, self.sample = derivative.float(), dt.float(), sample.float()
        return sample + derivative * dt, denoised


class _DPM2Churn(_SigmaChurn):
    """DPM2 with A1111's sigma churn (_SigmaChurn): k-diffusion's sample_dpm_2. diffusers' DPM2 interleaves its two
    calls a step too, the second at the midpoint sigma_mid = sqrt(sigma sigma_next); churned, the midpoint is
    sqrt(sigma_hat sigma_next), so the second call's sigma and timestep move with it, and the step to the next sigma
    goes from the raised sample over sigma_next - sigma_hat."""

    step_takes_generator = False
    _plain_interpol = None
    _moved_midpoints: tuple[int, ...] | list[int] = ()  # where _churned_at moved a step's midpoint (its second call)

    def _keep_plain(self) -> None:
        self._plain_interpol = self.sigmas_interpol.clone()

    def _restore_plain(self) -> None:
        self.sigmas_interpol[:] = self._plain_interpol
        self._moved_midpoints = []

    def _churned_at(self, index: int, sigma_hat: torch.Tensor) -> None:
        sigma_next = self.sigmas[index + 1].double()
        if sigma_next > 0:
            self.sigmas_interpol[index + 1] = (sigma_hat.log() + sigma_next.log()).div(2).exp()
            self._moved_midpoints.append(index + 1)

    def _moved_timesteps(self, log_sigmas) -> list[tuple[int, float]]:
        return [(index, _sigma_to_t(float(self.sigmas_interpol[index]), log_sigmas)) for index in self._moved_midpoints]

    def _step_from(self, model_output, sample, sigma_hat, index):
        denoised = self._denoised(model_output, sample, sigma_hat)
        derivative = (sample - denoised) / sigma_hat
        sigma_next = self.sigmas[index + 1].double()
        if sigma_next == 0:  # the last step: Euler
            return sample + derivative * (sigma_next - sigma_hat), denoised
        self.sample = sample.float()  # what the second call steps from
        return sample + derivative * (self.sigmas_interpol[index + 1].double() - sigma_hat), denoised

    def _second_call(self, model_output, sample, index: int):
        sigma_mid, sigma_hat = self.sigmas_interpol[index].double(), self.sigma_hats[index - 1]
        denoised = self._denoised(model_output, sample, sigma_mid)
        derivative = (sample - denoised) / sigma_mid
        start, self.sample = self.sample.double(), None
        return start + derivative * (self.sigmas[index].double() - sigma_hat), denoised


# A1111's Restart (sd_samplers_extra.restart_sampler): from this many steps on, a pass restarts once; from the second,
# twice, with a quarter of its steps each time.
RESTART_FROM_STEPS, RESTART_TWICE_FROM_STEPS = 20, 36
# Where it goes back up from and to (the schedule's sigmas nearest these), and its steps down again below twice.
RESTART_LOW_SIGMA, RESTART_HIGH_SIGMA, RESTART_STEPS = 0.1, 2.0, 9


def _karras_float32(count: int, lowest: float, highest: float) -> torch.Tensor:
    """k-diffusion's get_sigmas_karras (rho 7) in float32 as A1111 runs it: `count` sigmas from `highest` to `lowest`,
    then 0."""
    ramp = torch.linspace(0, 1, count)
    low, high = lowest ** (1 / 7.0), highest ** (1 / 7.0)
    return torch.cat([(high + ramp * (low - high)) ** 7.0, torch.zeros(1)])


def restart_pairs(sigmas: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (from, to) sigma of each Heun step A1111's Restart takes over a pass's `sigmas` (float32, ending in 0): with
    fewer than RESTART_FROM_STEPS steps the sigmas as they are; from there the sigmas are made anew by Karras's formula
    between the pass's ends for the steps not spent restarting, and once the pass reaches the sigma nearest 0.1 it
    goes back to the one nearest 2 and down again in RESTART_STEPS steps (steps // 4 each, twice, from 36 steps).
    The step count stays the pass's."""
    steps = len(sigmas) - 1
    restarts, restart_steps = 0, 0
    if steps >= RESTART_FROM_STEPS:
        restarts, restart_steps = (2, steps // 4) if steps >= RESTART_TWICE_FROM_STEPS else (1, RESTART_STEPS)
        sigmas = _karras_float32(steps - restart_steps * restarts, sigmas[-2].item(), sigmas[0].item())
    low = int(torch.argmin(abs(sigmas - RESTART_LOW_SIGMA)))
    high = int(torch.argmin(abs(sigmas - RESTART_HIGH_SIGMA)))
    pairs = []
    for index in range(len(sigmas) - 1):
        pairs.append((sigmas[index], sigmas[index + 1]))
        if restarts and index + 1 == low and high < low:
            again = _karras_float32(restart_steps + 1, sigmas[low].item(), sigmas[high].item())[:-1]
            pairs.extend(list(zip(again[:-1], again[1:], strict=True)) * restarts)
    return pairs


class _OwnModelCalls:
    """A scheduler that makes its own model calls (Restart, DPM fast, DPM adaptive): `sigmas` holds each call's sigma,
    then 0 (DPM adaptive places each call as it goes, and says where itself), and `_step_index` counts the calls made,
    this pass's own count wherever a pipeline says it begins. The model's input is scaled, and a picture noised (at the
    pass's start, or an inpaint pipeline's blend), at the next call's sigma: x0 + noise x sigma."""

    def _next_call_sigma(self) -> torch.Tensor:
        return self.sigmas[min(self._step_index, len(self.sigmas) - 2)]

    def scale_model_input(self, sample, timestep):
        self.is_scale_input_called = True
        return sample / ((self._next_call_sigma() ** 2 + 1) ** 0.5).to(sample.dtype)

    def add_noise(self, original_samples, noise, timesteps):
        return original_samples + noise * self._next_call_sigma().to(original_samples.device, original_samples.dtype)


class A1111RestartScheduler(_OwnModelCalls, diffusers.HeunDiscreteScheduler):
    """Restart as A1111 samples it (its sd_samplers_extra.restart_sampler, after "Restart Sampling for Improving
    Generative Processes", 2023): Heun steps (an Euler step to 0) over the pass's sigmas (restart_pairs); where a step
    starts above the sigma the last one ended at, fresh noise of sqrt(high^2 - low^2) is added first, drawn from the
    pass's generator as A1111 draws it. diffusers makes the schedule (any schedule type); the steps and model calls are
    made here. A pass from a picture runs restart_pairs over the last `picture_calls` steps of the schedule, as A1111
    runs its sigma_sched, and keeps the schedule's length, of which a pipeline runs the last."""

    picture_calls = 0

    def set_timesteps(self, num_inference_steps, device=None, *args, **kwargs):
        super().set_timesteps(num_inference_steps, device, *args, **kwargs)
        # Heun holds each step's sigma twice, after the first; A1111 holds them in float32.
        sigmas = torch.cat([self.sigmas[:1], self.sigmas[1::2]]).float().cpu()
        if self.picture_calls:
            sigmas = sigmas[-(self.picture_calls + 1) :]
        self._pairs = restart_pairs(sigmas)
        # Each model call: its sigma, its step, and whether it is the step's second (Heun's) call.
        self._calls = []
        for index, (high, low) in enumerate(self._pairs):
            self._calls.append((high, index, False))
            if low > 0:
                self._calls.append((low, index, True))
        # The model is asked at each sigma's timestep, interpolated in log sigma (k-diffusion's sigma_to_t).
        log_sigmas = model_log_sigmas(self.alphas_cumprod)
        timesteps = [float(self._sigma_to_t(np.array(sigma.item()), log_sigmas)) for sigma, _, _ in self._calls]
        if self.picture_calls:
            timesteps = [timesteps[0]] * ((num_inference_steps - len(self._pairs)) * self.order) + timesteps
        self.timesteps = torch.tensor(timesteps, dtype=torch.float32, device=device)
        self.sigmas = torch.stack([sigma for sigma, _, _ in self._calls] + [torch.zeros(())])
        self._step_index, self._first = 0, None

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        sigma, index, second = self._calls[self._step_index]
        high, low = self._pairs[index]
        denoised = ve_denoised(self.config.prediction_type, model_output, sample, sigma)
        slope = (sample - denoised) / sigma
        if not second:
            prev_sample = sample + slope * (low - high)
            self._first = (sample, slope) if low > 0 else None
        else:
            start, first_slope = self._first
            prev_sample = start + (first_slope + slope) / 2 * (low - high)
            self._first = None
        self._step_index += 1
        upcoming = self._calls[self._step_index][0] if self._step_index < len(self._calls) else None
        if self._first is None and upcoming is not None and upcoming > low:
            # A restart: back up to the next step's sigma with fresh noise, as A1111 adds it before that step.
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = prev_sample + noise * (upcoming**2 - low**2) ** 0.5
        if not return_dict:
            return (prev_sample, denoised)
        return HeunDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)


@dataclass(frozen=True)
class _FastStep:
    """One step of DPM fast, in DPM-Solver's time t = -log(sigma): from t to `aim` (below t_next by the ancestral
    step, or t_next itself), `order` model calls, then fresh noise of `up` back to t_next."""

    t: torch.Tensor
    aim: torch.Tensor
    order: int
    up: torch.Tensor

    @property
    def h(self) -> torch.Tensor:
        return self.aim - self.t

    def call_times(self) -> list[torch.Tensor]:
        """Where its model calls are: t, then t + h/2 (second order), or t + h/3 and t + 2h/3 (third)."""
        fractions = {1: (), 2: (1 / 2,), 3: (1 / 3, 2 / 3)}[self.order]
        return [self.t, *(self.t + fraction * self.h for fraction in fractions)]


def dpm_fast_steps(sigma_max: torch.Tensor, sigma_min: torch.Tensor, calls: int, eta: float) -> list[_FastStep]:
    """k-diffusion's dpm_solver_fast plan for `calls` model calls between two sigmas (float32 tensors): m = calls // 3
    + 1 equal steps in t, third order but for the last two (second and first order) or the last one (calls % 3)."""
    t_start, t_end = -sigma_max.log(), -sigma_min.log()
    count = calls // 3 + 1
    ts = torch.linspace(t_start, t_end, count + 1)
    orders = [3] * (count - 2) + [2, 1] if calls % 3 == 0 else [3] * (count - 1) + [calls % 3]
    steps = []
    for index, order in enumerate(orders):
        t, t_next = ts[index], ts[index + 1]
        aim, up = t_next, torch.zeros(())
        if eta:
            down, _ = ancestral_step((-t).exp(), (-t_next).exp(), eta)
            aim = torch.minimum(t_end, -down.log())
            up = ((-t_next).exp() ** 2 - (-aim).exp() ** 2) ** 0.5
        steps.append(_FastStep(t, aim, order, up))
    return steps


class _BetweenTwoSigmas(_OwnModelCalls):
    """k-diffusion's DPM-Solver samplers (DPM fast, DPM adaptive), to which A1111 hands two sigmas, not a schedule: the
    schedule's first and its last above 0, of its last `picture_calls` steps in a pass from a picture (sigma_sched).
    Their eta is A1111's for ancestral samplers."""

    picture_calls = 0
    eta = 1.0
    s_noise = 1.0

    def _pass_sigmas(self, num_inference_steps, device, *args, **kwargs) -> torch.Tensor:
        """The schedule the pass runs over (float32, ending in 0), from diffusers' own."""
        super().set_timesteps(num_inference_steps, device, *args, **kwargs)
        sigmas = self.sigmas.float().cpu()
        if self.picture_calls:
            return sigmas[-(self.picture_calls + 1) :]
        if len(sigmas) < 3:
            # A1111 hands a txt2img pass the model's two ends at any step count; one step's schedule has only its top.
            table = model_sigmas(self.alphas_cumprod).float().cpu()
            return torch.stack([table[-1], table[0], torch.zeros(())])
        return sigmas


class A1111DPMFastScheduler(_BetweenTwoSigmas, diffusers.EulerDiscreteScheduler):
    """DPM fast as A1111 samples it (k-diffusion's sample_dpm_fast: DPM-Solver-fast, from "DPM-Solver: A Fast ODE
    Solver for Diffusion Probabilistic Model Sampling", 2022). The pass's model calls (its steps) are spread over
    dpm_fast_steps between the schedule's first sigma and its last above 0 (the schedule type sets only those two
    ends, as in A1111); each third-order step calls the model at its start and a third and two thirds of the way.
    With A1111's eta (1 by default, its eta for ancestral samplers) each step aims below its end and fresh noise,
    scaled by sigma noise, brings it back up, drawn from the pass's generator at every step as A1111 draws it. The
    pass ends at the lowest sigma, not at 0, as k-diffusion's does. A pass from a picture runs over the last
    `picture_calls` steps of the schedule, as A1111 hands it its sigma_sched."""

    def set_timesteps(self, num_inference_steps, device=None, *args, **kwargs):
        sigmas = self._pass_sigmas(num_inference_steps, device, *args, **kwargs)
        calls = min(len(sigmas) - 1, num_inference_steps)  # one step: its call between the model's two ends
        self._steps = dpm_fast_steps(sigmas[0], sigmas[-2], calls, self.eta)
        # Each model call: its time t and its step (and which of the step's calls it is).
        self._calls = [(time, index) for index, step in enumerate(self._steps) for time in step.call_times()]
        log_sigmas = model_log_sigmas(self.alphas_cumprod)
        timesteps = [float(_sigma_to_t(float((-time).exp()), log_sigmas)) for time, _ in self._calls]
        timesteps = [timesteps[0]] * (num_inference_steps - len(timesteps)) + timesteps
        self.timesteps = torch.tensor(timesteps, dtype=torch.float32, device=device)
        self.sigmas = torch.stack([(-time).exp() for time, _ in self._calls] + [torch.zeros(())])
        self._step_index, self._start, self._eps = 0, None, []

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        time, index = self._calls[self._step_index]
        step, sigma = self._steps[index], (-time).exp()
        denoised = ve_denoised(self.config.prediction_type, model_output, sample, sigma)
        if not self._eps:
            self._start = sample
        self._eps.append((sample - denoised) / sigma)
        self._step_index += 1
        if len(self._eps) < step.order:
            prev_sample = self._towards_next_call(step)
        else:
            prev_sample = self._step_end(step)
            self._eps = []
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = prev_sample + step.up * self.s_noise * noise
        if not return_dict:
            return (prev_sample, denoised)
        return EulerDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def _towards_next_call(self, step: _FastStep) -> torch.Tensor:
        """DPM-Solver's intermediate points: u1 at t + r1 h, u2 at t + r2 h (third order only)."""
        r1, r2 = (1 / 2, None) if step.order == 2 else (1 / 3, 2 / 3)
        return dpm_solver_point(self._start, step.t, step.h, self._eps, r1, r2)

    def _step_end(self, step: _FastStep) -> torch.Tensor:
        x, eps, h = self._start, self._eps, step.h
        if step.order == 1:
            return dpm_solver_first(x, step.aim, h, eps[0])
        if step.order == 2:
            return dpm_solver_second(x, step.aim, h, 1 / 2, eps[0], eps[1])
        return dpm_solver_third(x, step.aim, h, 2 / 3, eps[0], eps[2])


# DPM-Solver's updates (k-diffusion's DPMSolver, in its time t = -log(sigma)): from x at t over h to t_next = t + h,
# with eps the noise predicted at t and eps_r at t + r h.
def dpm_solver_first(x, t_next, h, eps):
    return x - (-t_next).exp() * h.expm1() * eps


def dpm_solver_second(x, t_next, h, r1, eps, eps_r1):
    return dpm_solver_first(x, t_next, h, eps) - (-t_next).exp() / (2 * r1) * h.expm1() * (eps_r1 - eps)


def dpm_solver_third(x, t_next, h, r2, eps, eps_r2):
    return dpm_solver_first(x, t_next, h, eps) - (-t_next).exp() / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)


def dpm_solver_point(x, t, h, eps: list, r1: float, r2: float | None):
    """Where a second- or third-order step (r1; r2 for the third) calls the model next, given the `eps` it has: u1 at
    t + r1 h after the first call, u2 at t + r2 h after the second."""
    if len(eps) == 1:
        return dpm_solver_first(x, t + r1 * h, r1 * h, eps[0])
    return dpm_solver_third(x, t + r2 * h, r2 * h, r1 / r2, eps[0], eps[1])


# k-diffusion's sample_dpm_adaptive settings, which A1111 leaves at their defaults (it hands the sampler only its eta
# and its two sigmas): the tolerances, the first step (in t), and the least step-size factor at which a step is taken.
ADAPTIVE_RTOL, ADAPTIVE_ATOL, ADAPTIVE_H_INIT, ADAPTIVE_ACCEPT_SAFETY = 0.05, 0.0078, 0.05, 0.81
# The most model calls a DPM adaptive pass makes, so that no setting makes it run on without end (k-diffusion has no
# limit); the pipeline's loop is this long, and the job ends it once the pass is done. The micro model's passes make
# 39 to 111.
ADAPTIVE_MAX_CALLS = 1000


def adaptive_step_factor(error: float, order: float) -> float:
    """What k-diffusion's PIDStepSizeController multiplies the step size by after a step of scaled `error`, with the
    gains A1111 leaves at their defaults (integral only): (1 / error)^(1 / order), through its limiter 1 + atan(f - 1).
    A step is taken where the factor is at least ADAPTIVE_ACCEPT_SAFETY."""
    factor = (1 / (error + 1e-8)) ** (1 / order)
    return 1 + math.atan(factor - 1)


class A1111DPMAdaptiveScheduler(_BetweenTwoSigmas, diffusers.EulerDiscreteScheduler):
    """DPM adaptive as A1111 samples it (k-diffusion's sample_dpm_adaptive: DPM-Solver-23 with an adaptive step size,
    from "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling", 2022), between the schedule's
    first sigma and its last above 0, as DPM fast. Each step it tries calls the model three times (at its start, a
    third and two thirds of the way in t = -log(sigma)) and compares its third-order end with the second-order one;
    it is taken where they differ within the tolerances, and the difference sizes the next step. The step count
    asked for sets only the schedule's two ends and where prompt editing switches (at the model call of that index,
    as A1111 counts its steps). With A1111's eta (1 by default) each step taken aims below its end and fresh noise
    brings it back up, drawn from the pass's generator as A1111 draws it.

    How many calls a pass makes is known only as it goes, and a pipeline loops over timesteps set before it starts:
    the pipeline is given a loop of ADAPTIVE_MAX_CALLS timesteps, and each step writes the next call's timestep into
    it (the loop's timestep tensors are views of `timesteps`; a step asked at any other timestep is refused). Once the
    pass has reached its lowest sigma it is `finished`; the job's step callback then ends the loop, and a step after
    that changes nothing. A pass from a picture runs between the ends of the last `picture_calls` steps of the
    schedule, as A1111 hands it its sigma_sched."""

    def set_timesteps(self, num_inference_steps, device=None, *args, **kwargs):
        sigmas = self._pass_sigmas(num_inference_steps, device, *args, **kwargs)
        self._t_start, self._t_end = -sigmas[0].log(), -sigmas[-2].log()
        self._log_sigmas = model_log_sigmas(self.alphas_cumprod)
        # The controller's order: 1.5 where steps add noise, else the solver's 3.
        self._controller_order = 1.5 if self.eta else 3
        self._h, self._s = ADAPTIVE_H_INIT, self._t_start
        self._start = self._x_prev = None
        self._eps: list[torch.Tensor] = []
        # k-diffusion steps while s < t_end - 1e-5: a pass whose two sigmas meet (img2img below one step of strength,
        # where A1111's t_enc is 0) takes no step and gives back its noised picture. Stepping anyway would divide by
        # a step of 0 and make NaN values.
        self.finished = bool(self._t_start >= self._t_end - 1e-5)
        self.steps_taken, self.steps_refused = 0, 0
        self._plan()
        # A pass from a picture: the pipeline skips the schedule's first steps and runs the rest of the loop.
        self._first_slot = num_inference_steps - self.picture_calls if self.picture_calls else 0
        # NaN where no call has been placed yet: a model asked there gives nothing a step would take.
        self.timesteps = torch.full((self._first_slot + ADAPTIVE_MAX_CALLS,), float("nan"), device=device)
        self.timesteps[: self._first_slot + 1] = self._call_timestep()
        # Its ends: the starting noise is the first sigma's (init_noise_sigma).
        self.sigmas = torch.stack([sigmas[0], sigmas[-2], torch.zeros(())])
        self._step_index = 0

    @property
    def calls_made(self) -> int:
        """The model calls this pass has made (its step index: each step takes one call's prediction)."""
        return self._step_index

    def estimated_calls(self) -> int | None:
        """The pass's model calls as far as they can be told: all of them once it is done, else those made and three
        for each step of the present size still to go (None before the first step is tried)."""
        if self.finished:
            # A pass with no step to take still had the pipeline's one model call.
            return max(self.calls_made, 1)
        if not self.steps_taken + self.steps_refused:
            return None
        to_go = math.ceil(float(self._t_end - self._s) / self._h) * 3 - len(self._eps)
        return min(self.calls_made + max(to_go, 1), ADAPTIVE_MAX_CALLS)

    def _plan(self) -> None:
        """The next step to try, from s: to t = s + h (at most the end), aiming below t by the ancestral step (with
        eta), and the noise that brings it back up."""
        t = torch.minimum(self._t_end, self._s + self._h)
        aim, up = t, torch.zeros(())
        if self.eta:
            down, _ = ancestral_step((-self._s).exp(), (-t).exp(), self.eta)
            aim = torch.minimum(self._t_end, -down.log())
            up = ((-t).exp() ** 2 - (-aim).exp() ** 2) ** 0.5
        self._t, self._aim, self._up = t, aim, up

    def _call_time(self) -> torch.Tensor:
        """The time t of the next model call: the step's start, then a third and two thirds of the way."""
        h = self._aim - self._s
        if self.finished:
            return self._s
        return [self._s, self._s + 1 / 3 * h, self._s + 2 / 3 * h][len(self._eps)]

    def _call_timestep(self) -> float:
        return float(_sigma_to_t(float((-self._call_time()).exp()), self._log_sigmas))

    def _next_call_sigma(self) -> torch.Tensor:
        return (-self._call_time()).exp()

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        if self.finished:
            return self._output(sample, sample, return_dict)
        slot = self._first_slot + self.calls_made
        if float(timestep) != float(self.timesteps[slot]):
            raise RuntimeError(
                f"DPM adaptive placed its model call {self.calls_made} at timestep {float(self.timesteps[slot])}, "
                f"but the pipeline asked at {float(timestep)}: it must loop over views of the scheduler's timesteps"
            )
        sigma = self._next_call_sigma()
        denoised = ve_denoised(self.config.prediction_type, model_output, sample, sigma)
        if not self._eps:
            self._start = sample
            if self._x_prev is None:
                self._x_prev = sample
        self._eps.append((sample - denoised) / sigma)
        self._step_index += 1
        if len(self._eps) < 3:
            prev_sample = dpm_solver_point(self._start, self._s, self._aim - self._s, self._eps, 1 / 3, 2 / 3)
        else:
            prev_sample = self._tried(sample, generator)
        if not self.finished and self.calls_made >= ADAPTIVE_MAX_CALLS:
            log.warning(
                "DPM adaptive stopped after %d model calls at sigma %.4g, above its last %.4g",
                self.calls_made,
                float((-self._s).exp()),
                float((-self._t_end).exp()),
            )
            self.finished, self._eps, prev_sample = True, [], self._start
        if not self.finished:
            self.timesteps[slot + 1] = self._call_timestep()
        return self._output(prev_sample, denoised, return_dict)

    def _tried(self, sample, generator) -> torch.Tensor:
        """The step tried from s, after its third call: taken (the third-order end, with its noise) or refused (the
        start again), and the next one planned."""
        x, (eps, eps_r1, eps_r2), h = self._start, self._eps, self._aim - self._s
        self._eps = []
        low = dpm_solver_second(x, self._aim, h, 1 / 3, eps, eps_r1)
        high = dpm_solver_third(x, self._aim, h, 2 / 3, eps, eps_r2)
        delta = torch.maximum(
            torch.tensor(ADAPTIVE_ATOL), torch.tensor(ADAPTIVE_RTOL) * torch.maximum(low.abs(), self._x_prev.abs())
        )
        error = torch.linalg.norm((low - high) / delta) / x.numel() ** 0.5
        factor = adaptive_step_factor(float(error), self._controller_order)
        self._h *= factor
        if factor >= ADAPTIVE_ACCEPT_SAFETY:
            self._x_prev, x, self._s = low, high, self._t
            if self.eta:
                noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
                x = x + self._up * self.s_noise * noise
            self.steps_taken += 1
        else:
            self.steps_refused += 1
        self._start = x
        if self._s >= self._t_end - 1e-5:
            self.finished = True
        else:
            self._plan()
        return x

    @staticmethod
    def _output(prev_sample, denoised, return_dict):
        if not return_dict:
            return (prev_sample, denoised)
        return EulerDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)


class _A1111Start:
    """A1111's starting noise for txt2img, in the scheduler's own space: k-diffusion's x = noise x sigma_max, or with
    its SGM noise multiplier noise x sqrt(1 + sigma_max^2). diffusers' variance-exploding schedulers (Euler, Heun,
    ...) start from the former already; its DPM-Solvers, whose latents are variance-preserving (x / sqrt(1 +
    sigma^2)), start from pure noise, which is the latter: without the multiplier they are brought down to
    sigma_max / sqrt(1 + sigma_max^2) of it (0.9977 for SD's 14.6)."""

    sgm_noise_multiplier = False

    @property
    def init_noise_sigma(self) -> float:
        sigma = float(self.sigmas.max())
        start = (1 + sigma**2) ** 0.5 if self.sgm_noise_multiplier else sigma
        return start / (1 + sigma**2) ** 0.5 if isinstance(self, _VARIANCE_PRESERVING) else start

    @init_noise_sigma.setter
    def init_noise_sigma(self, value) -> None:
        pass  # diffusers' own constructors set theirs; this one follows the schedule


_VARIANCE_PRESERVING = (diffusers.DPMSolverMultistepScheduler, diffusers.DPMSolverSinglestepScheduler)


def starts_as_a1111(sampler_name: str) -> bool:
    """Whether this sampler's txt2img starts as A1111's k-diffusion samplers do (_A1111Start), and so takes its SGM
    noise multiplier; A1111's LCM start is its own (A1111LCMScheduler)."""
    spec = get_sampler(sampler_name)
    return spec.k_diffusion and spec.name != "LCM"


class _OneStepFromTheTop:
    """k-diffusion spaces a schedule's n timesteps as linspace(t_max, 0, n), which at one step is t_max. diffusers'
    "linspace" spacing is numpy's linspace(0, t_max, n) reversed, which at one step is 0: a one-step job (turbo
    models' usual setting) would start at the model's least noise and give its starting noise back. diffusers'
    "trailing" spacing is t_max at one step; from two steps on, linspace is A1111's."""

    def set_timesteps(self, num_inference_steps=None, *args, **kwargs):
        if num_inference_steps != 1 or getattr(self.config, "timestep_spacing", None) != "linspace":
            return super().set_timesteps(num_inference_steps, *args, **kwargs)
        self.register_to_config(timestep_spacing="trailing")
        try:
            return super().set_timesteps(num_inference_steps, *args, **kwargs)
        finally:
            self.register_to_config(timestep_spacing="linspace")


class _CountedFromStart:
    """A pass's steps counted from the first, not found by timestep. diffusers finds a txt2img pass's first step by
    its timestep and, where the first timesteps repeat, takes the second: sigmas above the model's largest (a
    schedule max sigma above it, Zero Terminal SNR's Karras schedule) all get its last timestep, so a pass would
    start a step late and run past its end. img2img pipelines set their own start after this."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        if hasattr(self, "_begin_index"):
            self._begin_index = 0


def install_step_noise(pipe, scheduler) -> None:
    """Hand a scheduler that draws noise outside its step (sigma churn) the generators its pass draws the
    starting noise from, as the pass begins. The pipeline object is the job's own."""
    if isinstance(scheduler, _SigmaChurn):
        after_starting_noise(pipe, functools.partial(setattr, scheduler, "noise_generators"))


class EtaDPMSolverSDEScheduler(_BrownianStepNoise, _SigmaNoise, diffusers.DPMSolverMultistepScheduler):
    """DPM++ 2M SDE (and its Heun variant) with A1111's eta (k-diffusion's sample_dpmpp_2m_sde): with eta_h = eta * h,
    a step keeps the sample times sigma_t / sigma_s * exp(-eta_h), moves towards the prediction by
    1 - exp(-h - eta_h) (plus its midpoint or Heun correction) and adds noise of sigma_t * sqrt(1 - exp(-2 eta_h)).
    diffusers' own updates are these at eta 1; at eta 0 no noise is added and the steps are DPM++ 2M's. The eta is
    the instance's, as Euler a's is; the noise is scaled by A1111's sigma noise."""

    eta = 1.0

    def _coefficients(self, sigma_next, sigma):
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigma_next)
        alpha_s, sigma_s = self._sigma_to_alpha_sigma_t(sigma)
        h = (torch.log(alpha_t) - torch.log(sigma_t)) - (torch.log(alpha_s) - torch.log(sigma_s))
        eta_h = self.eta * h if self.eta else torch.zeros_like(h)  # 0 * inf is nan at the last step
        return alpha_t, sigma_t, sigma_s, h, eta_h

    def dpm_solver_first_order_update(self, model_output, *args, sample=None, noise=None, **kwargs):
        if self.eta == 1.0 or self.config.algorithm_type != "sde-dpmsolver++":
            return super().dpm_solver_first_order_update(model_output, *args, sample=sample, noise=noise, **kwargs)
        noise = self._sigma_noise(noise)
        alpha_t, sigma_t, sigma_s, h, eta_h = self._coefficients(
            self.sigmas[self.step_index + 1], self.sigmas[self.step_index]
        )
        return (
            (sigma_t / sigma_s * torch.exp(-eta_h)) * sample
            + (alpha_t * -torch.expm1(-h - eta_h)) * model_output
            + sigma_t * torch.sqrt(-torch.expm1(-2.0 * eta_h)) * noise
        )

    def multistep_dpm_solver_second_order_update(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        if self.eta == 1.0 or self.config.algorithm_type != "sde-dpmsolver++":
            return super().multistep_dpm_solver_second_order_update(
                model_output_list, *args, sample=sample, noise=noise, **kwargs
            )
        noise = self._sigma_noise(noise)
        alpha_t, sigma_t, sigma_s0, h, eta_h = self._coefficients(
            self.sigmas[self.step_index + 1], self.sigmas[self.step_index]
        )
        alpha_s1, sigma_s1 = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index - 1])
        alpha_s0, _ = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index])
        h_0 = (torch.log(alpha_s0) - torch.log(sigma_s0)) - (torch.log(alpha_s1) - torch.log(sigma_s1))
        m0, m1 = model_output_list[-1], model_output_list[-2]
        D0, D1 = m0, (h / h_0) * (m0 - m1)
        if self.config.solver_type == "heun":
            correction = alpha_t * (-torch.expm1(-h - eta_h) / (-h - eta_h) + 1.0)
        else:
            correction = 0.5 * alpha_t * -torch.expm1(-h - eta_h)
        return (
            (sigma_t / sigma_s0 * torch.exp(-eta_h)) * sample
            + (alpha_t * -torch.expm1(-h - eta_h)) * D0
            + correction * D1
            + sigma_t * torch.sqrt(-torch.expm1(-2.0 * eta_h)) * noise
        )


class EtaDPMppSDEScheduler(diffusers.DPMSolverSDEScheduler):
    """DPM++ SDE with A1111's eta (k-diffusion's sample_dpmpp_sde, r = 1/2). A step from sigma to sigma_next first goes
    to the midpoint s in log sigma, then from sigma to sigma_next on the midpoint's prediction; each half goes down to
    get_ancestral_step's sigma_down in log-sigma space (the sample times sigma_down / sigma, plus the prediction
    times 1 - sigma_down / sigma) and adds the Brownian tree's noise times its sigma_up, which eta scales. diffusers'
    own step is this at eta 1; at eta 0 no noise is added. The last step (to sigma 0) is an Euler step. The eta is
    the instance's, as Euler a's is, and so is A1111's sigma noise, which scales the Brownian noise."""

    eta = 1.0
    s_noise = 1.0

    def step(self, model_output, timestep, sample, return_dict=True, s_noise=None):
        s_noise = self.s_noise if s_noise is None else s_noise
        if self.noise_sampler is None:  # the tree diffusers' own step would make
            self.noise_sampler = a1111_noise_sampler(sample, self.sigmas, self.noise_sampler_seed)
        if self.eta == 1.0:
            return super().step(model_output, timestep, sample, return_dict=return_dict, s_noise=s_noise)
        if self.step_index is None:
            self._init_step_index(timestep)
        first_half = self.state_in_first_order
        if first_half:
            sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        else:
            sigma, sigma_next = self.sigmas[self.step_index - 1], self.sigmas[self.step_index]

        # In k-diffusion's t = -log(sigma), as it computes them (so the Brownian tree is asked at its sigmas).
        def sigma_of(t):
            return t.neg().exp()

        def t_of(sigma):
            return sigma.log().neg()

        t, t_next = t_of(sigma), t_of(sigma_next)
        t_mid = t + (t_next - t) * 0.5
        sigma_in = sigma if first_half else sigma_of(t_mid)  # the noise level the model saw
        denoised = ve_denoised(self.config.prediction_type, model_output, sample, sigma_in)
        if sigma_next == 0:
            prev_sample = sample + (sample - denoised) / sigma * (sigma_next - sigma)
        else:
            start = sample if first_half else self.sample  # both halves start from the step's own sample
            t_target = t_mid if first_half else t_next
            sigma_from, sigma_to = sigma_of(t), sigma_of(t_target)
            sigma_down, sigma_up = ancestral_step(sigma_from, sigma_to, self.eta)
            t_down = t_of(sigma_down)
            prev_sample = (sigma_of(t_down) / sigma_from) * start - (t - t_down).expm1() * denoised
            prev_sample = prev_sample + self.noise_sampler(sigma_from, sigma_to) * s_noise * sigma_up
            self.sample, self.mid_point_sigma = (start, sigma_of(t_mid)) if first_half else (None, None)
        self._step_index += 1
        if not return_dict:
            return (prev_sample, denoised)
        return DPMSolverSDESchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)


class KDiffusion3MSDEScheduler(
    _BrownianStepNoise, _DiscardPenultimateSigma, _SigmaNoise, diffusers.DPMSolverMultistepScheduler
):
    """DPM++ 3M SDE as k-diffusion's sample_dpmpp_3m_sde, which A1111 runs, with its eta, in diffusers' variance-
    preserving latents. With h the step in log(alpha / sigma) and h_eta = (1 + eta) h, a step keeps the sample
    times sigma_t / sigma_s * exp(-eta h), moves towards the prediction D0 by 1 - exp(-h_eta), adds
    phi_2 d (second step) or phi_2 d1 - phi_3 d2 (from the third: first and second differences of the last three
    predictions over the earlier steps' sizes), with phi_2 = 1 + expm1(-h_eta) / h_eta and phi_3 = phi_2 / h_eta -
    1/2, and noise of sigma_t * sqrt(1 - exp(-2 eta h)). diffusers' own third-order SDE update has the sign of its
    second-difference term the other way round, and its second step is DPM++ 2M's; this class follows k-diffusion
    at every eta. The eta and the sigma noise are the instance's."""

    eta = 1.0

    def _update(self, predictions, sample, noise):
        """One step from the last `len(predictions)` (at most 3) data predictions, newest last."""
        order = len(predictions)
        sigmas = [self.sigmas[self.step_index + 1 - k] for k in range(order + 1)]  # t, then s0, s1, s2
        alphas_sigmas = [self._sigma_to_alpha_sigma_t(sigma) for sigma in sigmas]
        lambdas = [torch.log(alpha) - torch.log(sigma) for alpha, sigma in alphas_sigmas]
        steps = [lambdas[k] - lambdas[k + 1] for k in range(order)]  # h, then the step before, and before that
        (alpha_t, sigma_t), (_, sigma_s) = alphas_sigmas[0], alphas_sigmas[1]
        h = steps[0]
        eta_h = self.eta * h if self.eta else torch.zeros_like(h)  # 0 * inf is nan at the last step
        h_eta = h + eta_h
        x = (sigma_t / sigma_s * torch.exp(-eta_h)) * sample + (alpha_t * -torch.expm1(-h_eta)) * predictions[-1]
        phi_2 = torch.expm1(-h_eta) / h_eta + 1
        if order == 2:
            d = (predictions[-1] - predictions[-2]) / (steps[1] / h)
            x = x + alpha_t * phi_2 * d
        elif order == 3:
            r0, r1 = steps[1] / h, steps[2] / h
            d1_0 = (predictions[-1] - predictions[-2]) / r0
            d1_1 = (predictions[-2] - predictions[-3]) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            x = x + alpha_t * (phi_2 * d1 - phi_3 * d2)
        if self.eta and noise is not None:
            x = x + sigma_t * torch.sqrt(-torch.expm1(-2.0 * eta_h)) * self._sigma_noise(noise)
        return x

    def dpm_solver_first_order_update(self, model_output, *args, sample=None, noise=None, **kwargs):
        return self._update([model_output], sample, noise)

    def multistep_dpm_solver_second_order_update(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        return self._update(list(model_output_list[-2:]), sample, noise)

    def multistep_dpm_solver_third_order_update(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        return self._update(list(model_output_list[-3:]), sample, noise)


# Samplers whose A1111 schedule (or eta) diffusers' own class does not make.
_A1111_CLASSES = {
    "LCM": A1111LCMScheduler,
    "Euler a": EtaEulerAncestralScheduler,
    "DPM++ 2S a": A1111DPMpp2SAncestralScheduler,
    "Restart": A1111RestartScheduler,
    "DPM fast": A1111DPMFastScheduler,
    "DPM adaptive": A1111DPMAdaptiveScheduler,
    "DPM++ 2M SDE": EtaDPMSolverSDEScheduler,
    "DPM++ 2M SDE Heun": EtaDPMSolverSDEScheduler,
    "DPM++ SDE": EtaDPMppSDEScheduler,
    "DPM++ 3M SDE": KDiffusion3MSDEScheduler,
}
_ETA_CLASSES = (
    EtaEulerAncestralScheduler,
    _BetweenTwoSigmas,
    _AncestralMidpoints,
    EtaDPMSolverSDEScheduler,
    EtaDPMppSDEScheduler,
    KDiffusion3MSDEScheduler,
)
_SIGMA_NOISE_CLASSES = (_AncestralMidpoints, _SigmaNoise, EtaDPMppSDEScheduler, _SigmaChurn, A1111DPMFastScheduler)
# The samplers A1111's sigma churn runs on here, by diffusers' scheduler class.
_CHURNING = {
    "EulerDiscreteScheduler": _EulerChurn,
    "HeunDiscreteScheduler": _HeunChurn,
    "KDPM2DiscreteScheduler": _DPM2Churn,
}


def build_scheduler(
    base_config: dict[str, Any],
    sampler_name: str,
    schedule: str,
    seed: int | list[int] | None = None,
    eta: float | None = None,
    s_noise: float = 1.0,
    schedule_shape: ScheduleShape = ScheduleShape(),
    model_family: str = "",
    churn: SigmaChurn = SigmaChurn(),
    sgm_noise_multiplier: bool = False,
    always_discard_penultimate_sigma: bool = False,
    noise_levels: NoiseLevels = NoiseLevels(),
    from_picture: bool = False,
    picture_calls: int = 0,
    unipc: UniPCSettings = UniPCSettings(),
):
    """A new scheduler instance for one job; `base_config` is the model's own scheduler config. `seed` is the pass's
    image seeds (or one seed), from which the SDE samplers grow their Brownian trees, one an image. `eta` is that of
    Euler a, DPM2 a and the DPM++ SDE samplers (None: 1); DDIM takes its eta from the pipeline call. `s_noise` is
    A1111's sigma noise, for the samplers that take it (SamplerSpec.takes_s_noise). `schedule_shape` is A1111's
    schedule min sigma, max sigma and rho (0: the schedule's own; RANGED_SCHEDULES take them) and Beta's alpha and
    beta. `model_family` picks Align Your Steps' table (SDXL's or SD 1.5's). `churn` is A1111's sigma churn, for the
    samplers that take it (SamplerSpec.takes_sigma_churn; pipelines hand it their generators: install_step_noise).
    k-diffusion samplers start txt2img as A1111 does (_A1111Start), with its `sgm_noise_multiplier` or without. With
    `always_discard_penultimate_sigma` every k-diffusion sampler drops its schedule's next-to-last sigma
    (discards_penultimate_sigma). `noise_levels` may rescale or round the model's noise levels (NoiseLevels).
    `from_picture`: the pass starts from a picture (img2img, inpaint, a hires pass); `picture_calls` such a pass's
    sampling steps, from which A1111's DDIM, PLMS and UniPC place it (_A1111Timesteps). `unipc`: A1111's UniPC
    settings."""
    spec = get_sampler(sampler_name)
    discards = discards_penultimate_sigma(spec.name, always_discard_penultimate_sigma)
    if runs_a1111_ddim(spec.name, schedule):
        cls = A1111DDIMCFGppScheduler if spec.cfgpp else A1111DDIMScheduler
    elif runs_a1111_plms(spec.name, schedule):
        cls = A1111PLMSScheduler
    elif runs_a1111_unipc(spec.name, schedule):
        cls = A1111UniPCScheduler
    elif spec.name in _A1111_CLASSES:
        cls = _A1111_CLASSES[spec.name]
    elif spec.discard_penultimate_sigma:
        cls = _DISCARDING[spec.scheduler_class]
    else:
        cls = getattr(diffusers, spec.scheduler_class)
    if discards:
        cls = _discarding(cls)
    if spec.takes_sigma_churn and churn.s_churn > 0:
        cls = _mixed(_CHURNING[spec.scheduler_class], cls)
    params = _init_params(spec.scheduler_class)
    overrides: dict[str, Any] = dict(spec.options)
    # Start from a clean sigma schedule: a model's config may itself ask for Karras sigmas.
    overrides.update({flag: False for flag in _SIGMA_FLAGS if flag in params})
    if spec.k_diffusion:
        # Also where the Karras/Exponential sigmas are derived from the spaced ones (Euler, LMS, Heun,
        # DPM2, DPM++ SDE in diffusers): the range is then A1111's, sigma(999) down to sigma(0).
        overrides["timestep_spacing"] = "linspace"
    kind = effective_schedule(spec, schedule)
    overrides.update(SCHEDULE_TYPES[kind])
    if kind == "Uniform" and (spec.scheduler_class in _SPACED_ONE_OVER or discards):
        overrides["use_karras_sigmas"] = True  # made by _SigmaSchedule, where the discard can drop a sigma of it
    if kind == "SGM Uniform" and "use_karras_sigmas" in params:
        # A1111's fractional timesteps, between its ends, and dropping DPM2's next-to-last sigma; diffusers'
        # trailing spacing (999, 949, ...) stays for the samplers that make no Karras sigmas (LCM's own).
        overrides.update(timestep_spacing="linspace", use_karras_sigmas=True)
    if "noise_sampler_seed" in params and seed is not None:
        overrides["noise_sampler_seed"] = seed
    # Where the config has its own ends, diffusers reads them there first.
    ends = (("sigma_min", schedule_shape.sigma_min), ("sigma_max", schedule_shape.sigma_max))
    overrides.update({key: value for key, value in ends if value})
    betas = noise_levels.trained_betas(base_config)
    if betas is not None:
        # Every scheduler class takes its noise levels as betas; its own rescale would be applied on top of them.
        overrides.update(trained_betas=betas, rescale_betas_zero_snr=False)
    overrides = {key: value for key, value in overrides.items() if key in params}
    made_here = bool(overrides.get("use_karras_sigmas")) and kind != "Karras"
    shaped = schedule_shape != ScheduleShape()
    if made_here or shaped:
        cls = _with_sigma_schedule(cls)
    if starts_as_a1111(spec.name):
        cls = _mixed(_A1111Start, cls)
    if spec.k_diffusion:
        cls = _mixed(_OneStepFromTheTop, cls)
    cls = _mixed(_CountedFromStart, cls)
    scheduler = cls.from_config(dict(base_config), **overrides)
    if made_here or shaped:
        scheduler.schedule_kind, scheduler.model_family, scheduler.schedule_shape = kind, model_family, schedule_shape
    if eta is not None and isinstance(scheduler, _ETA_CLASSES):
        scheduler.eta = float(eta)
    if spec.takes_s_noise and isinstance(scheduler, _SIGMA_NOISE_CLASSES):
        scheduler.s_noise = float(s_noise)
    if isinstance(scheduler, _SigmaChurn):
        scheduler.churn = churn
    if isinstance(scheduler, _BrownianStepNoise):
        scheduler.brownian_seed = seed
    if isinstance(scheduler, _A1111Start):
        scheduler.sgm_noise_multiplier = bool(sgm_noise_multiplier)
    if isinstance(scheduler, _A1111Timesteps):
        scheduler.respaced = bool(always_discard_penultimate_sigma)
    if isinstance(scheduler, (_A1111Timesteps, A1111RestartScheduler, _BetweenTwoSigmas)):
        scheduler.picture_calls = int(picture_calls) if from_picture else 0
    if isinstance(scheduler, A1111UniPCScheduler):
        scheduler.variant, scheduler.skip_type = unipc.variant, unipc.skip_type
        scheduler.unipc_order, scheduler.lower_order_final = int(unipc.order), bool(unipc.lower_order_final)
    return scheduler


def eta_for(sampler_name: str, eta: float | None) -> float | None:
    """The eta a job's sampler runs with (None: it takes none here)."""
    default = get_sampler(sampler_name).eta_default
    return None if default is None else (default if eta is None else float(eta))


def pass_steps(sampler_name: str, schedule: str, steps: int, always_discard: bool = False) -> int:
    """How many sampling steps txt2img's pass over the whole schedule runs: `steps`, but A1111's DDIM runs one fewer
    than its timesteps (19 at 20 steps, 30 at 30, 62 at 60; `always_discard` spaces them for one more step), its
    PLMS and UniPC as many. (A pass from a picture keeps the schedule's length: _A1111Timesteps.)"""
    if runs_a1111_ddim(sampler_name, schedule):
        return len(a1111_timesteps(steps + int(always_discard))) - 1
    if runs_a1111_plms(sampler_name, schedule) or runs_a1111_unipc(sampler_name, schedule):
        return len(a1111_timesteps(steps + int(always_discard)))  # PLMS: the warm-up's second call
    return steps


@dataclass(frozen=True)
class PictureSteps:
    """A pass from a picture as A1111 counts it (its setup_img2img_steps): the steps its schedule is made for, and how
    many of them, the last ones, run."""

    schedule: int
    sampling: int


def picture_steps(
    sampler_name: str, steps: int, strength: float, schedule: str = "Automatic", *, exact: bool = False
) -> PictureSteps:
    """A pass from a picture at `strength`, asked for `steps`, as A1111 counts it.

    img2img and inpaint: a schedule of `steps`, and t_enc = int(min(strength, 0.999) * steps). The hires pass
    (`exact`: A1111 hands it its Hires steps, which takes its "exact steps" branch): a schedule of
    int(steps / min(strength, 0.999)) steps, at most one per training timestep, and t_enc = steps - 1. The
    k-diffusion samplers start at sigmas[schedule - t_enc - 1] and run t_enc + 1 steps (`steps` in the hires pass),
    one more than diffusers' int(strength * steps). A1111's DDIM asks the model at t_enc - 1 of its timesteps
    (A1111DDIMScheduler), its UniPC and PLMS at t_enc (PLMS: t_enc - 1 steps and the warm-up's second call; none
    where t_enc is 1). Samplers A1111 lacks (DEIS) and those on schedule types A1111 does not give them run
    diffusers' int(strength * steps) (t_enc in the hires pass). Strength 0 runs none."""
    if strength <= 0:
        return PictureSteps(steps, 0)
    capped = min(strength, 0.999)
    if exact:
        whole, t_enc = min(int(steps / capped), TRAIN_TIMESTEPS), steps - 1
    else:
        whole, t_enc = steps, int(capped * steps)
    if get_sampler(sampler_name).k_diffusion:
        return PictureSteps(whole, t_enc + 1)
    if runs_a1111_ddim(sampler_name, schedule):
        return PictureSteps(whole, max(t_enc - 1, 0))
    if runs_a1111_unipc(sampler_name, schedule):
        return PictureSteps(whole, t_enc)
    if runs_a1111_plms(sampler_name, schedule):
        return PictureSteps(whole, t_enc if t_enc > 1 else 0)
    return PictureSteps(whole, t_enc if exact else min(int(strength * steps), steps))


def img2img_steps(sampler_name: str, steps: int, strength: float, schedule: str = "Automatic") -> int:
    """How many sampling steps img2img and inpaint run at `strength` of `steps`, as A1111 counts them
    (picture_steps)."""
    return picture_steps(sampler_name, steps, strength, schedule).sampling


def diffusers_strength(sampling_steps: int, steps: int) -> float:
    """The `strength` at which a diffusers img2img or inpaint pipeline runs exactly the last `sampling_steps` of a
    schedule made for `steps` (every scheduler keeps that length for a pass from a picture), from the matching noise
    level: it skips the first steps - int(strength * steps), so aim half a step over."""
    return 1.0 if sampling_steps >= steps else (sampling_steps + 0.5) / steps


def _init_params(class_name: str) -> set[str]:
    return set(inspect.signature(getattr(diffusers, class_name).__init__).parameters)
