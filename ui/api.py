"""The AUTOMATIC1111-compatible REST API, /sdapi/v1, as a thin adapter over Engine.

Request and response shapes follow A1111's modules/api/models.py, so existing clients (webuiapi,
scripts, other front ends) work unchanged. What differs, on purpose:
- A field A1111 knows but this engine does not act on (restore_faces, firstphase_width, ...) is
  accepted, ignored, and named in the response's info under "ignored_fields" whenever its value
  would have changed A1111's result. Unknown fields are accepted and listed the same way.
- A bad value is an HTTP 422 whose JSON body names the field, the value and what is allowed,
  never a 500; the server stays ready for the next request.
- Without width/height/steps/cfg_scale/sampler the loaded model's own defaults apply (A1111: 512x512,
  50 steps, CFG 7, Euler), which suits SD 1.x, SDXL and the tiny model alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import html
import json
import logging
import math
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, ConfigDict, Field

from engine import (
    EngineError,
    GenerationRequest,
    InvalidRequestError,
    JobControl,
    ModelLoadError,
    Result,
    TaskStopped,
)
from engine.extras import ExtrasRequest
from engine.extras import describe as describe_postprocessing
from engine.hypernet import with_added_hypernet
from engine.images import encode_base64_png, to_pil
from engine.infotext import parse_infotext, parse_infotext_params, read_infotext, unread_settings
from engine.inpaint import MASKED_CONTENT
from engine.loopback import CURVES as LOOPBACK_CURVES
from engine.loopback import MAX_LOOPS as LOOPBACK_MAX_LOOPS
from engine.loopback import SCRIPT_NAME as LOOPBACK_SCRIPT
from engine.loopback import fields_from_script_args as loopback_fields
from engine.loopback import grid_result as loopback_grid
from engine.outpaint import DIRECTIONS as OUTPAINT_DIRECTIONS
from engine.outpaint import MAX_PIXELS as OUTPAINT_MAX_PIXELS
from engine.outpaint import MIN_PIXELS as OUTPAINT_MIN_PIXELS
from engine.outpaint import SCRIPT_NAME as OUTPAINT_SCRIPT
from engine.outpaint import fields_from_script_args as outpaint_fields
from engine.outpaint_mk2 import DEFAULTS as OUTPAINT_MK2_DEFAULTS
from engine.outpaint_mk2 import MAX_FALL_OFF as OUTPAINT_MK2_MAX_FALL_OFF
from engine.outpaint_mk2 import MAX_MASK_BLUR as OUTPAINT_MK2_MAX_MASK_BLUR
from engine.outpaint_mk2 import SCRIPT_NAME as OUTPAINT_MK2_SCRIPT
from engine.outpaint_mk2 import fields_from_script_args as outpaint_mk2_fields
from engine.outputs import FORMATS, output_folder, save_image
from engine.prompt_list import SCRIPT_NAME as PROMPT_LIST_SCRIPT
from engine.prompt_list import PromptList
from engine.prompt_matrix import DELIMITERS as PROMPT_MATRIX_DELIMITERS
from engine.prompt_matrix import MAX_MARGIN as PROMPT_MATRIX_MAX_MARGIN
from engine.prompt_matrix import PROMPT_TYPES as PROMPT_MATRIX_TYPES
from engine.prompt_matrix import SCRIPT_NAME as PROMPT_MATRIX_SCRIPT
from engine.prompt_matrix import PromptMatrix, grid_result
from engine.request import (
    EMPHASIS_MODES,
    JOB_SETTINGS,
    LATENT_UPSCALERS,
    PICTURE_UPSCALERS,
    JobSetting,
)
from engine.samplers import SamplerSpec, get_sampler
from engine.samplers import resolve as resolve_sampler
from engine.sd_upscale import MAX_OVERLAP as SD_UPSCALE_MAX_OVERLAP
from engine.sd_upscale import MAX_SCALE as SD_UPSCALE_MAX_SCALE
from engine.sd_upscale import SCRIPT_NAME as SD_UPSCALE_SCRIPT
from engine.sd_upscale import fields_from_script_args as sd_upscale_fields
from engine.upscalers import scale_from_name
from engine.vae import choose as vae_choice

if TYPE_CHECKING:
    from engine import Engine, ModelInfo
    from engine.engine import DeviceReservation

    from .server import ServerSettings

log = logging.getLogger(__name__)

API_PREFIX = "/sdapi/v1"

# Infotext keys every image has; the others are A1111's "extra_generation_params".
_STANDARD_INFOTEXT_KEYS = {
    "Prompt",
    "Negative prompt",
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Seed",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Size",
    "VAE hash",
    "VAE",
    "Model hash",
    "Model",
}

# A1111's schedule-type table (modules/sd_schedulers.py): API name, rho, whether it needs the model.
_SCHEDULE_META = {
    "Automatic": ("automatic", -1.0, False, None),
    "Uniform": ("uniform", -1.0, True, None),
    "Karras": ("karras", 7.0, False, None),
    "Exponential": ("exponential", -1.0, False, None),
    "Polyexponential": ("polyexponential", 1.0, False, None),
    "SGM Uniform": ("sgm_uniform", -1.0, True, ["SGMUniform"]),
    "KL Optimal": ("kl_optimal", -1.0, False, None),
    "Align Your Steps": ("align_your_steps", -1.0, False, None),
    "Simple": ("simple", -1.0, True, None),
    "Normal": ("normal", -1.0, True, None),
    "DDIM": ("ddim", -1.0, True, None),
    "Beta": ("beta", -1.0, True, None),
}

# Keys in /options that come from the engine and settings; the rest are stored per server.
_COMPUTED_OPTIONS = {
    "sd_model_checkpoint",
    "sd_checkpoint_hash",
    "samples_format",
    "CLIP_stop_at_last_layers",
    "outdir_txt2img_samples",
    "outdir_img2img_samples",
}
_MAX_CLIP_SKIP = 12


# Request models --------------------------------------------------------------------------------
# Fields the engine acts on are typed (a wrong type is a 422 naming the field); fields it ignores
# are `Any`, so nothing a client sends for them is ever refused.


class _GenerationPayload(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(-1, description="-1 for a random seed")
    sampler_name: str | None = Field(None, description="A1111 sampler name or alias, any case (e.g. 'Euler a')")
    sampler_index: str | None = Field(None, description="older name of sampler_name")
    scheduler: str | None = Field(None, description="schedule type: Automatic, Karras, Exponential, ...")
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = Field(None, description="default: the model's")
    cfg_scale: float | None = Field(None, description="default: the model's")
    width: int | None = Field(None, description="default: the model's native size")
    height: int | None = Field(None, description="default: the model's native size")
    send_images: bool = True
    save_images: bool = False
    infotext: str | None = Field(None, description="A1111 parameters text filling the fields not given")
    prompt_syntax: str | None = Field(None, description="'a1111' (default) or 'compel'")
    override_settings: dict[str, Any] | None = Field(
        None,
        description="acted on: sd_model_checkpoint (loaded for the request), CLIP_stop_at_last_layers, emphasis "
        "('Original', 'No norm', 'Ignore'), sd_vae ('Automatic', 'None' or a file from /sdapi/v1/sd-vae), "
        "eta_ancestral (Euler a, DPM2 a, DPM++ 2S a, SDE, 2M SDE, 3M SDE, DPM fast, DPM adaptive), eta_ddim, "
        + ", ".join(setting.option for setting in JOB_SETTINGS)
        + " (see /sdapi/v1/options)",
    )
    override_settings_restore_afterwards: Any = Field(
        True, description="false: a model chosen by override_settings.sd_model_checkpoint stays loaded"
    )
    styles: Any = None
    subseed: Any = Field(-1, description="variation seed; -1: random")
    subseed_strength: Any = Field(0, description="0 (off) to 1: how much of the variation seed's noise")
    seed_resize_from_h: Any = Field(-1, description="draw the seed's noise at this size (-1 or 0: off)")
    seed_resize_from_w: Any = Field(-1, description="draw the seed's noise at this size (-1 or 0: off)")
    tiling: Any = None
    eta: Any = Field(
        None,
        description=(
            "fresh noise of Euler a, DPM2 a, the DPM++ SDE samplers, DPM fast and DPM adaptive (default 1) or DDIM and "
            "DDIM CFG++ (default 0), "
            "0 to 1"
        ),
    )
    refiner_checkpoint: Any = Field(None, description="a model of the same kind that takes over at refiner_switch_at")
    refiner_switch_at: Any = Field(None, description="0 to 1: the share of the schedule before the refiner (0.8)")
    s_min_uncond: Any = Field(None, description="NGMS: below this sigma every other step leaves the negative out")
    s_noise: Any = Field(None, description="sigma noise: the fresh noise of DPM2 a and the SDE samplers, 0 to 1.1")
    # Accepted, not acted on.
    restore_faces: Any = None
    do_not_save_samples: Any = False
    do_not_save_grid: Any = False
    s_churn: Any = None
    s_tmax: Any = None
    s_tmin: Any = None
    disable_extra_networks: Any = False
    firstpass_image: Any = None
    comments: Any = None
    script_name: Any = None
    script_args: Any = Field(default_factory=list)
    alwayson_scripts: Any = Field(default_factory=dict)
    force_task_id: Any = None


class Txt2ImgRequest(_GenerationPayload):
    """POST /sdapi/v1/txt2img (A1111's StableDiffusionTxt2ImgProcessingAPI)."""

    enable_hr: Any = False
    denoising_strength: Any = None
    firstphase_width: Any = 0
    firstphase_height: Any = 0
    hr_scale: Any = 2.0
    hr_upscaler: Any = None
    hr_second_pass_steps: Any = 0
    hr_resize_x: Any = 0
    hr_resize_y: Any = 0
    hr_checkpoint_name: Any = None
    hr_sampler_name: Any = None
    hr_scheduler: Any = None
    hr_prompt: Any = ""
    hr_negative_prompt: Any = ""


class Img2ImgRequest(_GenerationPayload):
    """POST /sdapi/v1/img2img (A1111's StableDiffusionImg2ImgProcessingAPI); a mask makes it inpaint."""

    init_images: list[Any] | None = Field(None, description="base64 images (data URLs too)")
    mask: str | None = Field(None, description="base64 image, white = repaint")
    denoising_strength: float = 0.75
    mask_blur: int | None = None
    mask_blur_x: Any = 4
    mask_blur_y: Any = 4
    inpainting_mask_invert: int = 0
    include_init_images: bool = False
    resize_mode: Any = Field(
        0, description="0 just resize, 1 crop and resize, 2 resize and fill, 3 just resize (latent upscale)"
    )
    image_cfg_scale: Any = None
    mask_round: Any = True
    inpainting_fill: Any = Field(0, description="masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing")
    inpaint_full_res: Any = Field(True, description="A1111's API default: Only masked (false: Whole picture)")
    inpaint_full_res_padding: Any = Field(0, description="pixels around the mask for Only masked")
    initial_noise_multiplier: Any = Field(None, description="scales the noise added to the picture (0 to 1.5; 1: off)")
    latent_mask: Any = None


class _ExtrasPayload(BaseModel):
    """A1111's extras fields (the face restorers' are accepted and do nothing: there are none here)."""

    model_config = ConfigDict(extra="allow")

    resize_mode: Any = Field(0, description="0: scale by upscaling_resize; 1: scale to upscaling_resize_w x _h")
    show_extras_results: Any = True
    gfpgan_visibility: Any = 0
    codeformer_visibility: Any = 0
    codeformer_weight: Any = 0
    upscaling_resize: Any = 2
    upscaling_resize_w: Any = 512
    upscaling_resize_h: Any = 512
    upscaling_crop: Any = True
    upscaler_1: Any = "None"
    upscaler_2: Any = "None"
    extras_upscaler_2_visibility: Any = 0
    upscale_first: Any = False

    def extras_request(self, image: Any) -> ExtrasRequest:
        return ExtrasRequest(
            image=image,
            resize_mode=self.resize_mode,
            upscaling_resize=self.upscaling_resize,
            upscaling_resize_w=self.upscaling_resize_w,
            upscaling_resize_h=self.upscaling_resize_h,
            upscaling_crop=self.upscaling_crop,
            upscaler_1=self.upscaler_1,
            upscaler_2=self.upscaler_2,
            extras_upscaler_2_visibility=self.extras_upscaler_2_visibility,
        )


class ExtrasSingleImageRequest(_ExtrasPayload):
    image: str = Field("", description="base64 image (PNG, JPEG or WebP)")


class _ExtrasImage(BaseModel):
    data: str = Field(description="base64 image")
    name: str = ""


class ExtrasBatchImagesRequest(_ExtrasPayload):
    imageList: list[_ExtrasImage] = Field(default_factory=list)  # noqa: N815 (A1111's field name)


class PngInfoRequest(BaseModel):
    image: str = Field(description="base64 image (PNG, JPEG or WebP)")


# Which ignored fields matter: each rule says whether the value given would have changed A1111's result.


def _set(value: Any) -> bool:
    return bool(value) and value not in ("None", "none")


def _not_in(*neutral: Any):
    def differs(value: Any, payload: Any) -> bool:
        return value is not None and not any(_same(value, other) for other in neutral)

    return differs


def _sampler_spec(name: Any) -> SamplerSpec | None:
    """The sampler a payload names (aliases and "DPM++ 2M Karras" style too); None for none or an unknown one,
    which the engine refuses by name when it checks the request."""
    if not name:
        return None
    try:
        return get_sampler(resolve_sampler(name, None)[0])
    except InvalidRequestError:
        return None


def _eta_ignored(value: Any, payload: Any) -> bool:
    """eta acts on Euler a, DPM2 a, DPM++ 2S a, DPM++ SDE, DPM++ 2M SDE (and Heun), DPM++ 3M SDE, DPM fast, DPM
    adaptive, DDIM and DDIM CFG++ here; with another sampler a value given is listed as ignored."""
    spec = _sampler_spec(payload.sampler_name or payload.sampler_index)
    return value is not None and spec is not None and spec.eta_default is None


def _pass_samplers(payload: Any) -> list:
    """The samplers of the payload's passes that name one here: its own, and its hires pass's."""
    names = [payload.sampler_name or payload.sampler_index]
    if getattr(payload, "enable_hr", False):
        names.append(getattr(payload, "hr_sampler_name", None))
    return [spec for spec in map(_sampler_spec, names) if spec is not None]


def _takes_s_noise(payload: Any) -> bool:
    """Whether the payload's sampler, or its hires pass's, scales its fresh noise by sigma noise here."""
    return any(spec.takes_s_noise for spec in _pass_samplers(payload))


def _takes_sigma_churn(payload: Any) -> bool:
    """Whether the payload's sampler, or its hires pass's, runs sigma churn (and its tmin and tmax) here."""
    return any(spec.takes_sigma_churn for spec in _pass_samplers(payload))


def _same(value: Any, other: Any) -> bool:
    # True == 1 in Python; a flag and a number are not the same setting here.
    if isinstance(value, bool) or isinstance(other, bool):
        return value is other
    return value == other


# A1111 settings a job reads from override_settings (or /options): see _setting_for, _eta_for and _job_setting_for.
_SETTINGS_READ_BY_JOBS = (
    "emphasis",
    "sd_vae",
    "sd_hypernetwork",
    "extra_networks_default_multiplier",
    "eta_ancestral",
    "eta_ddim",
    *(setting.option for setting in JOB_SETTINGS),
)


def _script(payload: Any) -> str:
    return str(getattr(payload, "script_name", None) or "").strip().lower()


def _is_prompt_list(payload: Any) -> bool:
    return _script(payload) == PROMPT_LIST_SCRIPT


# The img2img scripts run here, and how each reads A1111's script_args into request fields.
_IMG2IMG_SCRIPTS = {
    SD_UPSCALE_SCRIPT: lambda args, engine: sd_upscale_fields(args, list(engine.list_upscalers())),
    LOOPBACK_SCRIPT: lambda args, engine: loopback_fields(args),
    OUTPAINT_SCRIPT: lambda args, engine: outpaint_fields(args),
    OUTPAINT_MK2_SCRIPT: lambda args, engine: outpaint_mk2_fields(args),
}


def _runs_script(payload: Any) -> bool:
    """A script this server runs: the prompt list, the prompt matrix, and on img2img SD upscale, Loopback, poor man's
    outpainting and Outpainting mk2."""
    script = _script(payload)
    return script in (PROMPT_LIST_SCRIPT, PROMPT_MATRIX_SCRIPT) or (
        script in _IMG2IMG_SCRIPTS and isinstance(payload, Img2ImgRequest)
    )


def _with_mask(rule):
    return lambda value, payload: bool(getattr(payload, "mask", None)) and rule(value, payload)


_IGNORED_RULES = {
    "restore_faces": lambda v, p: _set(v),
    "eta": _eta_ignored,
    "s_churn": lambda v, p: _not_in(0)(v, p) and not _takes_sigma_churn(p),
    "s_tmax": lambda v, p: _not_in(0, math.inf)(v, p) and not _takes_sigma_churn(p),
    "s_tmin": lambda v, p: _not_in(0)(v, p) and not _takes_sigma_churn(p),
    "s_noise": lambda v, p: _not_in(1)(v, p) and not _takes_s_noise(p),
    "firstpass_image": lambda v, p: _set(v),
    # Scripts this server runs (_runs_script) are not ignored; any other is.
    "script_name": lambda v, p: _set(v) and not _runs_script(p),
    "script_args": lambda v, p: _set(v) and not _runs_script(p),
    "alwayson_scripts": lambda v, p: _set(v),
    "firstphase_width": _not_in(0),
    "firstphase_height": _not_in(0),
    "latent_mask": lambda v, p: _set(v),
}


def _nothing_installed() -> list:
    return []


# A1111 routes with nothing behind them here, and what to do instead: answered 501, not 404, so that a client's
# log says why.
_NOT_HERE = {
    ("/interrogate", "POST"): "CLIP and DeepBooru interrogation needs their captioning models, which this program "
    "does not run; caption the picture elsewhere and paste the text into the prompt",
    ("/create/embedding", "POST"): "training is not part of this program; train with kohya-ss or A1111 and put the "
    "file in the embeddings folder",
    ("/create/hypernetwork", "POST"): "training is not part of this program; train with A1111 and put the file in "
    "the hypernetworks folder",
    ("/train/embedding", "POST"): "training is not part of this program; train with kohya-ss or A1111 and put the "
    "file in the embeddings folder",
    ("/train/hypernetwork", "POST"): "training is not part of this program; train with A1111 and put the file in "
    "the hypernetworks folder",
    ("/server-kill", "POST"): "the server is stopped from where it runs (Ctrl+C, or SIGTERM)",
    ("/server-restart", "POST"): "the server is restarted from where it runs (Ctrl+C, then start it again)",
    ("/server-stop", "POST"): "the server is stopped from where it runs (Ctrl+C, or SIGTERM)",
}


def _not_here(route: str, why: str):
    def answer():
        raise ApiError(501, "route", f"{API_PREFIX}{route}", why, f"{API_PREFIX}{route} is not available here: {why}.")

    return answer


def _upscaler_entries(engine) -> list[dict[str, Any]]:
    """A1111's /upscalers entries: its built-in upscalers, which need no model file, then the model files."""
    built_in = [
        {"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
        for name in PICTURE_UPSCALERS
    ]
    models = [
        {
            "name": name,
            "model_name": "RealESRGAN" if upscaler.path.is_relative_to(engine.registry.realesrgan_dir) else "ESRGAN",
            "model_path": str(upscaler.path),
            "model_url": None,
            "scale": scale_from_name(upscaler.path.stem),
        }
        for name, upscaler in engine.list_upscalers().items()
    ]
    return built_in + models


def _realesrgan_entries(engine) -> list[dict[str, Any]]:
    """A1111's /realesrgan-models: the Real-ESRGAN files there are, by A1111's names."""
    return [
        {"name": name, "path": str(upscaler.path), "scale": scale_from_name(upscaler.path.stem)}
        for name, upscaler in engine.list_upscalers().items()
        if upscaler.path.is_relative_to(engine.registry.realesrgan_dir)
    ]


def _script_info(engine) -> list[dict[str, Any]]:
    """A1111's /script-info for the scripts run here: the prompt list and the prompt matrix (txt2img and img2img),
    SD upscale, Loopback, poor man's outpainting and Outpainting mk2 (img2img)."""

    def arg(
        label: str | None, value: Any, choices: list[str] | None = None, limits: tuple = (None, None, None)
    ) -> dict[str, Any]:
        minimum, maximum, step = limits
        return {
            "label": label,
            "value": value,
            "minimum": minimum,
            "maximum": maximum,
            "step": step,
            "choices": choices,
        }

    args = [
        arg("Iterate seed every line", False),
        arg("Use same random seed for all lines", False),
        arg("Insert prompts at the", "start", ["start", "end"]),
        arg("List of prompt inputs", ""),
    ]
    sd_upscale_args = [
        arg(None, None),  # the script's explanation (HTML)
        arg("Tile overlap", 64, limits=(0, SD_UPSCALE_MAX_OVERLAP, 16)),
        arg("Upscaler", "None", [*PICTURE_UPSCALERS, *engine.list_upscalers()]),
        arg("Scale Factor", 2.0, limits=(1.0, SD_UPSCALE_MAX_SCALE, 0.05)),
    ]
    loopback_args = [
        arg("Loops", 4, limits=(1, LOOPBACK_MAX_LOOPS, 1)),
        arg("Final denoising strength", 0.5, limits=(0, 1, 0.01)),
        arg("Denoising strength curve", "Linear", list(LOOPBACK_CURVES)),
        arg("Append interrogated prompt at each iteration", "None", ["None"]),
    ]
    outpaint_args = [
        arg("Pixels to expand", 128, limits=(OUTPAINT_MIN_PIXELS, OUTPAINT_MAX_PIXELS, 8)),
        arg("Mask blur", 4, limits=(0, engine.limits.max_mask_blur, 1)),
        arg("Masked content", "fill", list(MASKED_CONTENT)),
        arg("Outpainting direction", list(OUTPAINT_DIRECTIONS), list(OUTPAINT_DIRECTIONS)),
    ]
    outpaint_mk2_args = [
        arg(None, None),  # the script's recommended settings (HTML)
        arg("Pixels to expand", OUTPAINT_MK2_DEFAULTS["pixels"], limits=(OUTPAINT_MIN_PIXELS, OUTPAINT_MAX_PIXELS, 8)),
        arg("Mask blur", OUTPAINT_MK2_DEFAULTS["mask_blur"], limits=(0, OUTPAINT_MK2_MAX_MASK_BLUR, 1)),
        arg("Outpainting direction", list(OUTPAINT_DIRECTIONS), list(OUTPAINT_DIRECTIONS)),
        arg(
            "Fall-off exponent (lower=higher detail)",
            OUTPAINT_MK2_DEFAULTS["noise_q"],
            limits=(0.0, OUTPAINT_MK2_MAX_FALL_OFF, 0.01),
        ),
        arg("Color variation", OUTPAINT_MK2_DEFAULTS["color_variation"], limits=(0.0, 1.0, 0.01)),
    ]
    matrix_args = [
        arg("Set at prompt start", False),
        arg("Random seeds", False),
        arg("Prompt type", "positive", list(PROMPT_MATRIX_TYPES)),
        arg("Joining char", "comma", list(PROMPT_MATRIX_DELIMITERS)),
        arg("Grid margins", 0, limits=(0, PROMPT_MATRIX_MAX_MARGIN, 2)),
    ]
    return [
        {"name": name, "is_alwayson": False, "is_img2img": img2img, "args": script_args}
        for name, script_args in ((PROMPT_LIST_SCRIPT, args), (PROMPT_MATRIX_SCRIPT, matrix_args))
        for img2img in (False, True)
    ] + [
        {"name": name, "is_alwayson": False, "is_img2img": True, "args": script_args}
        for name, script_args in (
            (SD_UPSCALE_SCRIPT, sd_upscale_args),
            (LOOPBACK_SCRIPT, loopback_args),
            (OUTPAINT_SCRIPT, outpaint_args),
            (OUTPAINT_MK2_SCRIPT, outpaint_mk2_args),
        )
    ]


# Errors ----------------------------------------------------------------------------------------


class ApiError(Exception):
    """An answer other than 200, with the A1111-style body plus the field at fault."""

    def __init__(
        self,
        status: int,
        field: str,
        value: Any,
        allowed: str,
        detail: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        self.status = status
        self.field = field
        self.value = value
        self.allowed = allowed
        self.detail = detail or f"{field}: got {_shown(value)}; allowed: {allowed}"
        self.headers = headers
        super().__init__(self.detail)


# What pydantic's error types mean, said the way the engine says it.
_PYDANTIC_ALLOWED = {
    "int_parsing": "a whole number",
    "int_type": "a whole number",
    "int_from_float": "a whole number",
    "float_parsing": "a number",
    "float_type": "a number",
    "finite_number": "a finite number",
    "string_type": "text",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a JSON object",
    "model_attributes_type": "a JSON object with A1111's fields",
    "json_invalid": "valid JSON",
    "missing": "a value (this field is required)",
}


def _field_path(parts: list[str]) -> str:
    """("init_images", "0") -> "init_images[0]", the way the engine names list items."""
    path = ""
    for part in parts:
        path += f"[{part}]" if part.isdigit() and path else (f".{part}" if path else part)
    return path


def _shown(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_safe(value: Any, limit: int = 200) -> Any:
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return value if len(value) <= limit else value[: limit - 3] + "..."
    return _shown(value, limit)


def _error_response(
    status: int, error: str, field: str, value: Any, allowed: str, detail: str, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        headers=headers,
        content={
            "error": error,
            "detail": detail,
            "field": field,
            "value": _json_safe(value),
            "allowed": allowed,
            "errors": detail,
        },
    )


def _install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        error = {401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed", 501: "NotImplemented"}.get(
            exc.status, "InvalidRequestError"
        )
        return _error_response(exc.status, error, exc.field, exc.value, exc.allowed, exc.detail, exc.headers)

    async def on_invalid_request(request: Request, exc: InvalidRequestError) -> JSONResponse:
        return _error_response(422, "InvalidRequestError", exc.field, exc.value, exc.allowed, str(exc))

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problem = exc.errors()[0] if exc.errors() else {}
        location = [str(part) for part in problem.get("loc", ()) if part != "body"]
        if problem.get("type") == "json_invalid":
            location = []  # its location is a character offset, not a field
        field = _field_path(location) or "body"
        allowed = _PYDANTIC_ALLOWED.get(problem.get("type", ""), problem.get("msg", "a JSON object"))
        value = problem.get("input")
        detail = f"{field}: got {_shown(value)}; allowed: {allowed}"
        return _error_response(422, "InvalidRequestError", field, value, allowed, detail)

    async def on_engine_error(request: Request, exc: EngineError) -> JSONResponse:
        log.error("%s %s failed: %s", request.method, request.url.path, exc)
        detail = str(exc)
        return JSONResponse(status_code=500, content={"error": type(exc).__name__, "detail": detail, "errors": detail})

    async def on_stopped(request: Request, exc: TaskStopped) -> JSONResponse:
        # Asked for (/interrupt), not a failure: 409, as the request ended without its result.
        log.info("%s %s: %s", request.method, request.url.path, exc)
        detail = str(exc)
        return JSONResponse(status_code=409, content={"error": "TaskStopped", "detail": detail, "errors": detail})

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not a bad request: log it whole, answer in JSON like every other error.
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        detail = f"{type(exc).__name__}: {exc}"
        return JSONResponse(status_code=500, content={"error": type(exc).__name__, "detail": detail, "errors": detail})

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(Exception, on_unexpected)
    app.add_exception_handler(InvalidRequestError, on_invalid_request)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(EngineError, on_engine_error)
    app.add_exception_handler(TaskStopped, on_stopped)


# The API ---------------------------------------------------------------------------------------


class SdApi:
    """The /sdapi/v1 routes for one server: options set through the API live here, not in module globals."""

    def __init__(self, engine: Engine, settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self._lock = threading.Lock()
        self._samples_format = "png"
        self._clip_skip = 1
        # Options this server does not act on, kept so GET /options echoes what was set.
        self._stored_options: dict[str, Any] = {
            "samples_save": settings.save_images,
            "emphasis": "Original",
            "sd_vae": "Automatic",
            "sd_hypernetwork": "None",
            "extra_networks_default_multiplier": 1.0,
            "eta_ancestral": 1.0,
            "eta_ddim": 0.0,
            **{setting.option: setting.default for setting in JOB_SETTINGS},
        }
        self._jobs: dict[int, _ApiJob] = {}  # the jobs started here, by job id
        # One per request running here: /interrupt sets them all, so that a prompt list stops before its next line
        # even when the interrupt came between two lines, as A1111's flag stays set until the next request.
        self._stops: set[threading.Event] = set()
        self._last_job_timestamp = "0"

    # Generation --------------------------------------------------------------------------------

    def txt2img(self, payload: Txt2ImgRequest) -> dict[str, Any]:
        return self._generate(payload)

    def img2img(self, payload: Img2ImgRequest) -> dict[str, Any]:
        if not payload.init_images:
            raise ApiError(
                422, "init_images", payload.init_images, "a list of at least one base64 image (data URLs too)"
            )
        return self._generate(payload)

    def _generate(self, payload: _GenerationPayload) -> dict[str, Any]:
        with self._model_for(payload) as reservation:
            req, ignored, clip_skip = self._to_request(payload)
            requests, matrix = [req], None
            if _is_prompt_list(payload):  # every line is checked before the first job runs
                requests = self.engine.prompt_list_requests(req, PromptList.from_script_args(payload.script_args))
            elif _script(payload) == PROMPT_MATRIX_SCRIPT:  # so is every picture of a prompt matrix
                matrix = self.engine.prompt_matrix_plan(req, PromptMatrix.from_script_args(payload.script_args))
                requests = list(matrix.requests)
            timestamp = dt.datetime.now().strftime("%Y%m%d%H%M%S")
            self._last_job_timestamp = timestamp
            results = []
            started = dt.datetime.now().timestamp()
            # A list's jobs all run on the model loaded when it starts, whatever a page user switches to meanwhile.
            checkpoint = self.engine.model.path if reservation is None and len(requests) > 1 else None
            stop = threading.Event()
            self._stops.add(stop)
            try:
                for line, request in enumerate(requests):
                    if line and stop.is_set():  # /interrupt stops the whole list, as in A1111
                        break
                    job = _ApiJob(req.mode, timestamp, line, len(requests), started)
                    results.append(self._run(request, job, reservation, checkpoint))
                    if results[-1].interrupted:
                        break
            finally:
                self._stops.discard(stop)
        # A prompt matrix's grid (a loopback's, of its loops) comes first, with the first picture's infotext, as
        # A1111 gives it.
        grid = grid_result(matrix, results) if matrix is not None else None
        if _script(payload) == LOOPBACK_SCRIPT and isinstance(payload, Img2ImgRequest):
            grid = loopback_grid(results)
        shown = [grid, *results] if grid is not None else results

        not_saved: list[str] = []
        if payload.save_images:
            if self.settings.save_images:
                for result in results:
                    not_saved += self._save(result)
                if grid is not None:
                    not_saved += self._save(grid, grid_of=grid.request.mode)
            else:
                ignored.append("save_images")  # the server was started with --no-save
        images = []
        if payload.send_images:
            images = [
                encode_base64_png(image, text)
                for result in shown
                for image, text in zip(result.images, result.infotexts, strict=True)
            ]

        parameters = payload.model_dump()
        if isinstance(payload, Img2ImgRequest) and not payload.include_init_images:
            parameters["init_images"] = None
            parameters["mask"] = None
        styles = payload.styles if isinstance(payload.styles, list) else [payload.styles] if payload.styles else []
        # A prompt list's jobs get one answer, as A1111's script gives.
        info = self._info(results, ignored, clip_skip, timestamp, styles=styles)
        if grid is not None:
            info["infotexts"] = [*grid.infotexts, *info["infotexts"]]
            info["index_of_first_image"] = 1
        if not_saved:
            info["save_errors"] = not_saved
        return {"images": images, "parameters": parameters, "info": json.dumps(info)}

    @contextlib.contextmanager
    def _model_for(self, payload: _GenerationPayload) -> Iterator[DeviceReservation | None]:
        """A1111's override_settings.sd_model_checkpoint: that model is loaded for the request and, unless
        override_settings_restore_afterwards is false, the one before it loaded again afterwards. The request
        holds the device meanwhile (A1111 queues every request), so that no other job runs on its model or
        switches it away between its jobs. Yields the reservation its jobs run under (None: no override)."""
        wanted = (payload.override_settings or {}).get("sd_model_checkpoint")
        if wanted is None:
            yield None
            return
        field = "override_settings.sd_model_checkpoint"
        if not isinstance(wanted, str) or not wanted.strip():
            raise ApiError(422, field, wanted, "a model title or name from /sdapi/v1/sd-models")
        restore = payload.override_settings_restore_afterwards is not False
        reserved = False
        try:
            with self.engine.reserved(wanted, restore=restore) as reservation:
                reserved = True
                yield reservation
        except ModelLoadError as exc:
            if reserved:  # the jobs' own, not the switch's
                raise
            raise ApiError(422, field, wanted, "a model title or name from /sdapi/v1/sd-models", str(exc)) from exc

    def _run(
        self, req: GenerationRequest, job: _ApiJob, reservation: DeviceReservation | None, checkpoint: str | None
    ) -> Result:
        control = JobControl()
        self._jobs[control.job_id] = job
        result: Result | None = None
        try:
            for event in self.engine.generate(req, control=control, reservation=reservation, checkpoint=checkpoint):
                if isinstance(event, Result):
                    result = event
        finally:
            self._jobs.pop(control.job_id, None)
        if result is None:
            raise EngineError("The job ended without a result")
        return result

    def _to_request(self, payload: _GenerationPayload) -> tuple[GenerationRequest, list[str], int]:
        given = payload.model_fields_set
        defaults = self.engine.defaults()
        from_text = self._from_infotext(payload.infotext) if payload.infotext else None
        # The keys the infotext names: one written at its default value (RNG: CPU) still says what made the picture.
        named = set(parse_infotext_params(payload.infotext)) if payload.infotext else set()

        def pick(name: str, fallback: Any) -> Any:
            if name in given and getattr(payload, name) is not None:
                return getattr(payload, name)
            if from_text is not None and getattr(from_text, name) is not None:
                return getattr(from_text, name)
            return fallback

        sampler = payload.sampler_name or payload.sampler_index
        scheduler = payload.scheduler
        if not sampler and from_text is not None:
            sampler = from_text.sampler_name
            scheduler = scheduler or from_text.scheduler
        ignored = self._ignored_fields(payload)
        if from_text is not None:  # the infotext's settings no request field carries
            ignored += [f"infotext.{key}" for key in unread_settings(from_text)]
        clip_skip = self._clip_skip_for(payload, ignored, from_text)
        # An infotext's other keys (Hires prompt, Lora hashes, Version, ...) are not copied: the engine
        # writes its own for what it does (a LoRA's hash from its tag), and a copy could claim work not done.
        extra = {"Clip skip": str(clip_skip)} if clip_skip > 1 else {}

        fields: dict[str, Any] = dict(
            prompt=pick("prompt", ""),
            negative_prompt=pick("negative_prompt", ""),
            sampler_name=sampler or defaults.sampler_name,
            scheduler=scheduler or "Automatic",
            steps=pick("steps", defaults.steps),
            cfg_scale=pick("cfg_scale", defaults.cfg_scale),
            seed=pick("seed", -1),
            subseed=pick("subseed", -1),
            subseed_strength=pick("subseed_strength", 0),
            seed_resize_from_w=pick("seed_resize_from_w", 0),
            seed_resize_from_h=pick("seed_resize_from_h", 0),
            width=pick("width", None),
            height=pick("height", None),
            batch_size=payload.batch_size,
            n_iter=payload.n_iter,
            extra_params=extra,
            prompt_syntax=pick("prompt_syntax", "a1111"),
            emphasis=self._setting_for("emphasis", payload, from_text, "Original"),
            sd_vae=self._setting_for("sd_vae", payload, from_text, "Automatic"),
            tiling=pick("tiling", False),
            eta=self._eta_for(payload, from_text, sampler or defaults.sampler_name),
            **{setting.field: self._job_setting_for(setting, payload, from_text, named) for setting in JOB_SETTINGS},
            styles=payload.styles or None,
            refiner_checkpoint=pick("refiner_checkpoint", ""),
            refiner_switch_at=pick("refiner_switch_at", 0.8),
        )
        fields["prompt"] = self._with_added_hypernet(fields["prompt"], payload)
        if isinstance(payload, Txt2ImgRequest):
            fields.update(
                enable_hr=pick("enable_hr", False),
                hr_scale=pick("hr_scale", 2.0),
                hr_upscaler=pick("hr_upscaler", "Latent"),
                hr_second_pass_steps=pick("hr_second_pass_steps", 0),
                hr_resize_x=pick("hr_resize_x", 0),
                hr_resize_y=pick("hr_resize_y", 0),
                hr_sampler_name=pick("hr_sampler_name", ""),
                hr_scheduler=pick("hr_scheduler", ""),
                hr_prompt=pick("hr_prompt", ""),
                hr_negative_prompt=pick("hr_negative_prompt", ""),
                hr_checkpoint_name=pick("hr_checkpoint_name", ""),
                # A1111's page starts hires fix at 0.7.
                denoising_strength=pick("denoising_strength", 0.7),
            )
        if isinstance(payload, Img2ImgRequest):
            mask_blur = payload.mask_blur if payload.mask_blur is not None else payload.mask_blur_x
            if payload.mask and not _same(payload.mask_blur_y, mask_blur) and "mask_blur_y" in given:
                ignored.append("mask_blur_y")
            fields.update(
                init_images=list(payload.init_images or []),
                mask=payload.mask or None,
                denoising_strength=pick("denoising_strength", 0.75),
                mask_blur=mask_blur,
                inpainting_mask_invert=payload.inpainting_mask_invert,
                resize_mode=payload.resize_mode,
                inpaint_full_res=pick("inpaint_full_res", True),
                inpaint_full_res_padding=pick("inpaint_full_res_padding", 0),
                # A1111's API default is fill (0); its page starts on original (1).
                inpainting_fill=pick("inpainting_fill", 0),
            )
            script_fields = _IMG2IMG_SCRIPTS.get(_script(payload))
            if script_fields is not None:
                fields.update(script_fields(payload.script_args, self.engine))
        elif _script(payload) in _IMG2IMG_SCRIPTS:
            raise ApiError(
                422,
                "script_name",
                payload.script_name,
                f"{payload.script_name.strip()} on /sdapi/v1/img2img (it redraws an init image)",
            )
        return GenerationRequest(**fields), ignored, clip_skip

    @staticmethod
    def _from_infotext(text: str) -> GenerationRequest:
        try:
            return parse_infotext(text)
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"infotext ({exc.field})", exc.value, exc.allowed) from exc

    def _ignored_fields(self, payload: _GenerationPayload) -> list[str]:
        ignored = []
        declared = type(payload).model_fields
        for name in payload.model_fields_set:
            if name not in declared:
                ignored.append(name)  # not an A1111 field of this endpoint either
                continue
            rule = _IGNORED_RULES.get(name)
            if rule is not None and rule(getattr(payload, name), payload):
                ignored.append(name)
        return sorted(ignored)

    def _clip_skip_for(
        self, payload: _GenerationPayload, ignored: list[str], from_text: GenerationRequest | None
    ) -> int:
        """Clip skip from override_settings (CLIP_stop_at_last_layers), else the infotext, else the options."""
        clip_skip = self._clip_skip
        if from_text is not None and "Clip skip" in from_text.extra_params:
            clip_skip = _clip_skip_value(from_text.extra_params["Clip skip"], "infotext (Clip skip)")
        for key, value in (payload.override_settings or {}).items():
            if key == "CLIP_stop_at_last_layers":
                clip_skip = _clip_skip_value(value, "override_settings.CLIP_stop_at_last_layers")
            elif key in _SETTINGS_READ_BY_JOBS:
                continue  # read by _setting_for and _eta_for
            elif key == "sd_model_checkpoint":
                continue  # loaded for the request by _model_for
            else:
                ignored.append(f"override_settings.{key}")
        return clip_skip

    def _eta_for(self, payload: _GenerationPayload, from_text, sampler: str) -> Any:
        """The job's eta: the payload's `eta`, else the infotext's, else A1111's setting for its sampler
        (`eta_ancestral` for Euler a, DPM2 a and DPM++ 2M SDE, `eta_ddim` for DDIM and DDIM CFG++) from
        override_settings or /options."""
        if payload.eta is not None:
            return payload.eta
        if from_text is not None and from_text.eta is not None:
            return from_text.eta
        spec = _sampler_spec(sampler)
        if spec is None or spec.eta_default is None:
            return None
        overrides = payload.override_settings or {}
        with self._lock:
            value = overrides.get(spec.eta_option, self._stored_options.get(spec.eta_option))
        return None if value is None or _same(value, spec.eta_default) else value

    def _job_setting_for(self, setting: JobSetting, payload: _GenerationPayload, from_text, named: set[str]) -> Any:
        """A job setting's value: the payload's field of that name where A1111's payload has one (s_noise,
        s_min_uncond, img2img's initial_noise_multiplier), else override_settings, else the infotext where it names
        the setting (its key among `named`, or a value it implies, as A1111's Version without RNG implies NV), else
        /options. The engine checks the payload's value and the infotext's, naming the field."""
        if setting.field in type(payload).model_fields and getattr(payload, setting.field) is not None:
            value = getattr(payload, setting.field)
            # A1111's processing objects hold "no upper end" as infinity, which some clients send back.
            return 0.0 if setting.field == "s_tmax" and _same(value, math.inf) else value
        overrides = payload.override_settings or {}
        if setting.option in overrides:
            return setting.checked(overrides[setting.option], f"override_settings.{setting.option}")
        if from_text is not None and (
            setting.infotext_key in named or getattr(from_text, setting.field) != setting.default
        ):
            return getattr(from_text, setting.field)
        with self._lock:
            return self._stored_options[setting.option]

    def _with_added_hypernet(self, prompt: str, payload: _GenerationPayload) -> str:
        """A1111's "Add hypernetwork to prompt" (sd_hypernetwork, from override_settings or /options): that
        hypernetwork's tag, at extra_networks_default_multiplier, at the prompt's end, unless the prompt names it."""
        name = self._setting_for("sd_hypernetwork", payload, None, "None")
        if name in (None, "", "None"):
            return prompt
        names = [found.name for found in self.engine.list_hypernets()]
        if name not in names:
            listed = ", ".join(names) or "none in the hypernetwork folder"
            raise ApiError(422, "override_settings.sd_hypernetwork", name, f"None or a hypernetwork ({listed})")
        multiplier = self._setting_for("extra_networks_default_multiplier", payload, None, 1.0)
        if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)):
            raise ApiError(422, "override_settings.extra_networks_default_multiplier", multiplier, "a number")
        return with_added_hypernet(prompt, name, multiplier)

    def _setting_for(self, name: str, payload: _GenerationPayload, from_text, default: str) -> Any:
        """An A1111 setting a job uses: override_settings, else the infotext, else /options, else `default`.
        The engine checks the value and names the field when it is not allowed."""
        overrides = payload.override_settings or {}
        if name in overrides:
            return overrides[name]
        if from_text is not None and getattr(from_text, name) != default:
            return getattr(from_text, name)
        with self._lock:
            return self._stored_options.get(name, default)

    def _save(self, result: Result, grid_of: str | None = None) -> list[str]:
        """A result's pictures, into their mode's folder; a grid (`grid_of` a mode) into that mode's grids folder.
        Returns why any could not be saved: the pictures still go back in the answer, made as they were."""
        not_saved = []
        for image, seed, text in zip(result.images, result.seeds, result.infotexts, strict=True):
            try:
                path = save_image(
                    image,
                    text,
                    outputs_dir=self.settings.outputs_dir,
                    mode=result.request.mode if grid_of is None else f"{grid_of}-grids",
                    seed=seed,
                    fmt=self._samples_format,
                )
            except (OSError, EngineError) as exc:
                log.warning("Could not save the picture for seed %s: %s", seed, exc)
                not_saved.append(f"seed {seed}: {exc}")
            else:
                log.info("Saved %s", path)
        return not_saved

    def _info(
        self, results: list[Result], ignored: list[str], clip_skip: int, timestamp: str, styles: list[str]
    ) -> dict[str, Any]:
        """A1111's info for one request's jobs (several for a prompt list): the first job's settings, and the
        per-image lists over them all."""
        result = results[0]
        req = result.request
        written = parse_infotext_params(result.infotexts[0]) if result.infotexts else {}
        extra = {k: v for k, v in written.items() if k not in _STANDARD_INFOTEXT_KEYS}
        model = result.model
        return {
            "prompt": req.prompt,
            "all_prompts": [r.request.prompt for r in results for _ in r.seeds],
            "negative_prompt": req.negative_prompt,
            "all_negative_prompts": [r.request.negative_prompt for r in results for _ in r.seeds],
            "seed": result.seeds[0] if result.seeds else req.seed,
            "all_seeds": [seed for r in results for seed in r.seeds],
            "subseed": result.subseeds[0] if result.subseeds else req.subseed,
            "all_subseeds": [subseed for r in results for subseed in r.subseeds],
            "subseed_strength": req.subseed_strength,
            "width": req.width,
            "height": req.height,
            "sampler_name": req.sampler_name,
            "scheduler": req.scheduler,
            "cfg_scale": req.cfg_scale,
            "steps": req.steps,
            "batch_size": req.batch_size,
            "n_iter": req.n_iter,
            "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": Path(model.name).name if model else None,
            "sd_model_hash": model.hash if model else None,
            "sd_vae_name": written.get("VAE"),
            "sd_vae_hash": written.get("VAE hash"),
            "seed_resize_from_w": req.seed_resize_from_w or -1,
            "seed_resize_from_h": req.seed_resize_from_h or -1,
            "denoising_strength": req.denoising_strength if req.mode != "txt2img" else None,
            "extra_generation_params": extra,
            "index_of_first_image": 0,
            "infotexts": [text for r in results for text in r.infotexts],
            "styles": styles,
            "job_timestamp": timestamp,
            "clip_skip": clip_skip,
            "is_using_inpainting_conditioning": False,
            "version": None,
            # Not in A1111's answer:
            "mode": req.mode,
            "interrupted": any(r.interrupted for r in results),
            "skipped_batches": [batch for r in results for batch in r.skipped_batches],
            "elapsed": round(sum(r.elapsed for r in results), 3),
            "ignored_fields": sorted(set(ignored)),
        }

    # Progress and control ----------------------------------------------------------------------

    def progress(self, skip_current_image: bool = False) -> dict[str, Any]:
        state = self.engine.progress()
        api_job = self._jobs.get(state.job_id)
        job, timestamp = (api_job.kind, api_job.timestamp) if api_job is not None else ("", None)
        if not state.running:
            return {
                "progress": 0.0,
                "eta_relative": 0.0,
                "state": _state_dict(state, job="", job_count=0, timestamp=self._last_job_timestamp),
                "current_image": None,
                "textinfo": None,
            }
        if timestamp is None:
            started = state.started_at or dt.datetime.now().timestamp()
            timestamp = dt.datetime.fromtimestamp(started).strftime("%Y%m%d%H%M%S")
        current_image = None
        if state.preview is not None and not skip_current_image:
            current_image = encode_base64_png(state.preview)
        if state.mode == "extras":
            job = job or "extras"
            textinfo = f"Upscaling, tile {state.step}/{state.total}"
            if state.batch_count > 1:
                textinfo += f", upscaler {state.batch_no + 1}/{state.batch_count}"
        elif state.mode == "merge":
            job = job or "merge"
            textinfo = f"Merging, tensor {state.step}/{state.total}"
        else:
            textinfo = f"Sampling step {state.step}/{state.total}"
            if state.batch_count > 1:
                textinfo += f", batch {state.batch_no + 1}/{state.batch_count}"
        answer = {
            # A1111 reports at least 0.01 while a job runs: clients read 0 as "idle".
            "progress": max(0.01, state.fraction),
            "eta_relative": state.eta,
            "state": _state_dict(state, job=job, job_count=max(1, state.batch_count), timestamp=timestamp),
            "current_image": current_image,
            "textinfo": textinfo,
        }
        if api_job is not None and api_job.lines > 1:
            # A prompt list is one request: its progress runs once over all its lines, each line a job.
            overall = (api_job.line + state.fraction) / api_job.lines
            elapsed = dt.datetime.now().timestamp() - api_job.started
            answer["progress"] = max(0.01, overall)
            answer["eta_relative"] = elapsed / overall - elapsed if overall > 0 else state.eta
            answer["state"].update(job_count=api_job.lines, job_no=api_job.line)
            answer["textinfo"] = f"Line {api_job.line + 1}/{api_job.lines}: {textinfo}"
        return answer

    def interrupt(self) -> dict[str, Any]:
        for stop in list(self._stops):
            stop.set()
        self.engine.interrupt()
        return {}

    def skip(self) -> dict[str, Any]:
        self.engine.skip()
        return {}

    # Models, samplers, options -----------------------------------------------------------------

    def sd_models(self) -> list[dict[str, Any]]:
        listed = self.engine.list_models()
        loaded = self.engine.model
        if not any(info.path == loaded.path for info in listed):
            listed.append(loaded)  # loaded from a path or hub id outside the models folder
        return [_model_item(info) for info in listed]

    def refresh_checkpoints(self) -> None:
        self.engine.list_models()

    def unload_checkpoint(self) -> dict[str, Any]:
        """A1111's unload: the weights leave memory; the next job (or /reload-checkpoint) loads them back."""
        self.engine.unload_model()
        return {}

    def reload_checkpoint(self) -> dict[str, Any]:
        self.engine.reload_model()  # a file gone meanwhile is a ModelLoadError: a 500 saying so
        return {}

    def prompt_styles(self) -> list[dict[str, str]]:
        return [
            {"name": style.name, "prompt": style.prompt, "negative_prompt": style.negative_prompt}
            for style in self.engine.styles().values()
        ]

    def refresh_embeddings(self) -> None:
        self.engine.refresh_embeddings()

    def loras(self) -> list[dict[str, Any]]:
        """A1111's LoRA listing: name, alias, path and the file's safetensors metadata."""
        return [
            {"name": lora.name, "alias": lora.name, "path": str(lora.path), "metadata": lora.metadata()}
            for lora in self.engine.list_loras()
        ]

    def embeddings(self) -> dict[str, dict[str, Any]]:
        """A1111's embeddings listing: the loaded model's textual inversion embeddings, and those it skipped."""
        report = self.engine.loaded.embeddings
        return {
            "loaded": {name: embedding.api_entry() for name, embedding in report.loaded.items()},
            "skipped": {name: embedding.api_entry() for name, embedding in report.skipped.items()},
        }

    def hypernetworks(self) -> list[dict[str, str]]:
        """A1111's listing: each hypernetwork's name (for <hypernet:name:strength>) and file."""
        return [{"name": found.name, "path": str(found.path)} for found in self.engine.list_hypernets()]

    def samplers(self) -> list[dict[str, Any]]:
        from engine.samplers import get_sampler

        items = []
        for name in self.engine.samplers():
            spec = get_sampler(name)
            options = {}
            if spec.default_schedule not in ("Uniform", "Automatic"):
                options["scheduler"] = _SCHEDULE_META.get(spec.default_schedule, (spec.default_schedule.lower(),))[0]
            items.append({"name": name, "aliases": self.engine.sampler_aliases(name), "options": options})
        return items

    def schedulers(self) -> list[dict[str, Any]]:
        items = []
        for label in self.engine.schedulers():
            name, rho, needs_model, aliases = _SCHEDULE_META.get(
                label, (label.lower().replace(" ", "_"), -1.0, False, None)
            )
            items.append(
                {"name": name, "label": label, "aliases": aliases, "default_rho": rho, "need_inner_model": needs_model}
            )
        return items

    def sd_vae(self) -> list[dict[str, str]]:
        """The VAE folder's files, in A1111's shape: [{"model_name", "filename"}]."""
        return [{"model_name": vae.name, "filename": str(vae.path)} for vae in self.engine.list_vaes().values()]

    @property
    def _vae_dir(self) -> Path:
        return self.engine.registry.vae_dir

    def get_options(self) -> dict[str, Any]:
        model = self.engine.model
        with self._lock:
            options = dict(self._stored_options)
            options.update(
                sd_model_checkpoint=model.title,
                sd_checkpoint_hash=model.sha256,
                samples_format=self._samples_format,
                CLIP_stop_at_last_layers=self._clip_skip,
                outdir_txt2img_samples=str(output_folder(self.settings.outputs_dir, "txt2img").parent),
                outdir_img2img_samples=str(output_folder(self.settings.outputs_dir, "img2img").parent),
            )
        return options

    def set_options(self, options: dict[str, Any]) -> None:
        # Check everything before changing anything, so a bad request leaves all options as they were.
        samples_format = options.get("samples_format", self._samples_format)
        if str(samples_format).lower() not in FORMATS:
            raise ApiError(422, "samples_format", samples_format, ", ".join(FORMATS))
        clip_skip = self._clip_skip
        if "CLIP_stop_at_last_layers" in options:
            clip_skip = _clip_skip_value(options["CLIP_stop_at_last_layers"], "CLIP_stop_at_last_layers")
        if "emphasis" in options and options["emphasis"] not in EMPHASIS_MODES:
            raise ApiError(422, "emphasis", options["emphasis"], ", ".join(EMPHASIS_MODES))
        for key in ("eta_ancestral", "eta_ddim"):
            value = options.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ApiError(422, key, value, "a number from 0 to 1")
        options = {
            **options,
            **{s.option: s.checked(options[s.option], s.option) for s in JOB_SETTINGS if s.option in options},
        }
        if "sd_vae" in options:
            options = {**options, "sd_vae": vae_choice(options["sd_vae"], self.engine.list_vaes(), self._vae_dir)}
        checkpoint = options.get("sd_model_checkpoint")
        if checkpoint is not None:
            if not isinstance(checkpoint, str) or not checkpoint.strip():
                raise ApiError(422, "sd_model_checkpoint", checkpoint, "a model title or name from /sdapi/v1/sd-models")
            try:
                self.engine.load_model(checkpoint)
            except ModelLoadError as exc:
                raise ApiError(
                    422, "sd_model_checkpoint", checkpoint, "a model title or name from /sdapi/v1/sd-models", str(exc)
                ) from exc
        with self._lock:
            self._samples_format = str(samples_format).lower()
            self._clip_skip = clip_skip
            self._stored_options.update({k: v for k, v in options.items() if k not in _COMPUTED_OPTIONS})

    def cmd_flags(self) -> dict[str, Any]:
        s = self.settings
        return {
            "host": s.host,
            "port": s.port,
            "listen": s.host == "0.0.0.0",
            "share": s.share,
            "api": s.api,
            "gradio_auth": bool(s.auth),
            "api_auth": bool(s.api_auth),
            "model": s.model,
            "models_dir": str(s.models_dir) if s.models_dir else str(self.engine.models_dir),
            "embeddings_dir": str(self.engine.registry.embeddings_dir),
            "lora_dir": str(self.engine.registry.lora_dir),
            "hypernetwork_dir": str(self.engine.registry.hypernetwork_dir),
            "vae_dir": str(self.engine.registry.vae_dir),
            "vae_path": str(s.vae_path) if s.vae_path else None,
            "max_batch_count": self.engine.limits.max_n_iter,
            "subpath": s.subpath.lstrip("/") or None,
            "outputs_dir": str(s.outputs_dir),
            "no_save": not s.save_images,
            "allow_pickle": s.allow_pickle,
            "hide_ui_dir_config": s.hide_ui_dir_config,
            "device": str(self.engine.device),
        }

    # PNG info ----------------------------------------------------------------------------------

    def png_info(self, payload: PngInfoRequest) -> dict[str, Any]:
        image = to_pil(payload.image.strip(), "image")
        text = read_infotext(image) or ""
        items = {
            key: value
            for key, value in (image.info or {}).items()
            if key != "parameters" and key not in _IGNORED_INFO_KEYS and isinstance(value, (str, int, float))
        }
        parameters: dict[str, Any] = {}
        if text:
            parameters = dict(parse_infotext_params(text))
            width, sep, height = str(parameters.get("Size", "")).partition("x")
            if sep:
                parameters["Size-1"], parameters["Size-2"] = width.strip(), height.strip()
        return {"info": text, "items": items, "parameters": parameters}

    def extra_single_image(self, payload: ExtrasSingleImageRequest) -> dict[str, Any]:
        image, html_info = self._extras(payload, payload.image or None, "image", JobControl())
        return {"html_info": html_info, "image": image}

    def extra_batch_images(self, payload: ExtrasBatchImagesRequest) -> dict[str, Any]:
        if not payload.imageList:
            raise InvalidRequestError("imageList", [], "at least one {data, name} image")
        control = JobControl()  # one for the batch: /interrupt ends it, not only its running picture
        results = []
        for index, entry in enumerate(payload.imageList):
            try:
                results.append(self._extras(payload, entry.data, f"imageList[{index}]", control))
            except TaskStopped:
                if not results:
                    raise
                # As an interrupted txt2img answers with the pictures it made: those finished before the stop.
                log.info("Extras batch stopped after %d of %d pictures", len(results), len(payload.imageList))
                break
        return {"html_info": results[-1][1], "images": [image for image, _ in results]}

    def _extras(self, payload: _ExtrasPayload, data: str | None, field: str, control: JobControl) -> tuple[str, str]:
        """One picture through Extras: (base64 PNG, A1111's html_info). The PNG keeps the source's infotext
        and records what was done in a `postprocessing` chunk, as A1111's does. /interrupt stops it (TaskStopped,
        answered 409)."""
        source = to_pil(data.strip(), field) if data else None
        result, info = self.engine.upscale(payload.extras_request(source), control=control)
        text = describe_postprocessing(info)
        encoded = encode_base64_png(result, read_infotext(source) if source is not None else None, text)
        return encoded, f"<p>{html.escape(text)}</p>"

    # Wiring ------------------------------------------------------------------------------------

    def router(self) -> APIRouter:
        dependencies = [Depends(_basic_auth(self.settings.api_credentials))] if self.settings.api_credentials else []
        router = APIRouter(prefix=API_PREFIX, dependencies=dependencies, tags=["sdapi"])
        router.add_api_route("/txt2img", self.txt2img, methods=["POST"])
        router.add_api_route("/img2img", self.img2img, methods=["POST"])
        router.add_api_route("/progress", self.progress, methods=["GET"])
        router.add_api_route("/interrupt", self.interrupt, methods=["POST"])
        router.add_api_route("/skip", self.skip, methods=["POST"])
        router.add_api_route("/samplers", self.samplers, methods=["GET"])
        router.add_api_route("/schedulers", self.schedulers, methods=["GET"])
        router.add_api_route("/sd-models", self.sd_models, methods=["GET"])
        router.add_api_route("/refresh-checkpoints", self.refresh_checkpoints, methods=["POST"])
        router.add_api_route("/unload-checkpoint", self.unload_checkpoint, methods=["POST"])
        router.add_api_route("/reload-checkpoint", self.reload_checkpoint, methods=["POST"])
        router.add_api_route("/memory", self.engine.memory, methods=["GET"])
        router.add_api_route("/embeddings", self.embeddings, methods=["GET"])
        router.add_api_route("/refresh-embeddings", self.refresh_embeddings, methods=["POST"])
        router.add_api_route("/loras", self.loras, methods=["GET"])
        # The folder is read on each request and each job, so there is nothing to refresh.
        router.add_api_route("/refresh-loras", lambda: None, methods=["POST"])
        router.add_api_route("/sd-vae", self.sd_vae, methods=["GET"])
        # The folder is read on each request and each job, so there is nothing to refresh.
        router.add_api_route("/refresh-vae", lambda: None, methods=["POST"])
        router.add_api_route("/options", self.get_options, methods=["GET"])
        router.add_api_route("/options", self.set_options, methods=["POST"])
        router.add_api_route("/cmd-flags", self.cmd_flags, methods=["GET"])
        router.add_api_route("/png-info", self.png_info, methods=["POST"])
        router.add_api_route("/extra-single-image", self.extra_single_image, methods=["POST"])
        router.add_api_route("/extra-batch-images", self.extra_batch_images, methods=["POST"])
        # Clients probe these at start-up: the scripts run here (_runs_script), and no extensions.
        router.add_api_route(
            "/scripts",
            lambda: {
                "txt2img": [PROMPT_LIST_SCRIPT, PROMPT_MATRIX_SCRIPT],
                "img2img": [PROMPT_LIST_SCRIPT, PROMPT_MATRIX_SCRIPT, *_IMG2IMG_SCRIPTS],
            },
            methods=["GET"],
        )
        router.add_api_route("/script-info", lambda: _script_info(self.engine), methods=["GET"])
        router.add_api_route("/extensions", _nothing_installed, methods=["GET"])
        router.add_api_route("/realesrgan-models", lambda: _realesrgan_entries(self.engine), methods=["GET"])
        # The hires fix upscalers, in A1111's two lists: picture upscalers (no models) and latent modes.
        router.add_api_route("/upscalers", lambda: _upscaler_entries(self.engine), methods=["GET"])
        router.add_api_route(
            "/latent-upscale-modes", lambda: [{"name": name} for name in LATENT_UPSCALERS], methods=["GET"]
        )
        router.add_api_route("/prompt-styles", self.prompt_styles, methods=["GET"])
        router.add_api_route("/hypernetworks", self.hypernetworks, methods=["GET"])
        # A list clients read at start-up of what this engine has none of (no face restorers): empty, as A1111
        # answers with none installed.
        router.add_api_route("/face-restorers", _nothing_installed, methods=["GET"])
        for (route, method), why in _NOT_HERE.items():
            router.add_api_route(route, _not_here(route, why), methods=[method], include_in_schema=False)
        # Last: any other path under the prefix is answered in the API's own error shape, naming the routes there are.
        known = {}
        for route in router.routes:
            path = route.path.removeprefix(API_PREFIX)
            known.setdefault(path, set()).update(route.methods)

        def unknown_route(request: Request, unknown: str):
            path = "/" + unknown.strip("/")
            if path in known:
                methods = ", ".join(sorted(known[path]))
                raise ApiError(405, "method", request.method, f"{methods} for {API_PREFIX}{path}")
            routes = ", ".join(sorted(known))
            raise ApiError(404, "route", f"{API_PREFIX}{path}", f"one of {routes} under {API_PREFIX}")

        router.add_api_route(
            "/{unknown:path}",
            unknown_route,
            methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            include_in_schema=False,
        )
        return router


# PIL info keys that are file-format details rather than text a person wrote (A1111 drops them too).
_IGNORED_INFO_KEYS = {
    "jfif",
    "jfif_version",
    "jfif_unit",
    "jfif_density",
    "dpi",
    "exif",
    "loop",
    "background",
    "timestamp",
    "duration",
    "progressive",
    "progression",
    "icc_profile",
    "chromaticity",
    "photoshop",
}


def install_api(app: FastAPI, engine: Engine, settings: ServerSettings) -> SdApi:
    """Add /sdapi/v1 to `app` (call before mounting the page at "/")."""
    api = SdApi(engine, settings)
    app.include_router(api.router())
    app.state.sdapi = api
    _install_error_handlers(app)
    return api


# Reads the Authorization header; a missing one gives None, answered below with 401 like a wrong one.
_BASIC_SCHEME = HTTPBasic(auto_error=False, realm="sdapi")


def _basic_auth(credentials: tuple[tuple[str, str], ...]):
    users = dict(credentials)

    def check(given: Annotated[HTTPBasicCredentials | None, Depends(_BASIC_SCHEME)]) -> None:
        if given is not None:
            expected = users.get(given.username)
            # Compare even for unknown users, so timing does not tell which user names exist.
            valid = secrets.compare_digest(given.password.encode(), (expected or "\0invalid").encode())
            if expected is not None and valid:
                return
        raise _Unauthorized()

    return check


class _Unauthorized(ApiError):
    def __init__(self) -> None:
        super().__init__(
            401,
            "Authorization",
            None,
            "HTTP Basic credentials from --auth or --api-auth",
            "Incorrect or missing username and password",
            headers={"WWW-Authenticate": 'Basic realm="sdapi"'},
        )


@dataclasses.dataclass(frozen=True)
class _ApiJob:
    """A job this API started: its kind and timestamp, and its place in the request's prompt list (line of lines;
    one line for a plain request) with when the request began."""

    kind: str
    timestamp: str
    line: int = 0
    lines: int = 1
    started: float = 0.0


def _state_dict(state, *, job: str, job_count: int, timestamp: str) -> dict[str, Any]:
    return {
        "skipped": state.skipped,
        "interrupted": state.interrupted,
        "job": job,
        "job_count": job_count,
        "job_timestamp": timestamp,
        "job_no": state.batch_no if job_count else 0,
        "sampling_step": state.step if job_count else 0,
        "sampling_steps": state.total if job_count else 0,
    }


def _model_item(info: ModelInfo) -> dict[str, Any]:
    return {
        "title": info.title,
        "model_name": info.name.replace("/", "_").replace("\\", "_"),
        "hash": info.hash,
        "sha256": info.sha256,
        "filename": info.path,
        "config": None,
    }


def _clip_skip_value(value: Any, field: str) -> int:
    allowed = f"a whole number from 1 to {_MAX_CLIP_SKIP}"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ApiError(422, field, value, allowed)
    try:
        number = float(value)
    except ValueError:
        raise ApiError(422, field, value, allowed) from None
    if not number.is_integer() or not 1 <= number <= _MAX_CLIP_SKIP:
        raise ApiError(422, field, value, allowed)
    return int(number)
