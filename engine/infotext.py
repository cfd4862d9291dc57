"""A1111 infotext: the "parameters" text stored with each image, written and read back.

Layout (as AUTOMATIC1111's web UI writes it, so files move between the two programs):

    <prompt, possibly several lines>
    Negative prompt: <negative prompt, possibly several lines>     (only when there is one)
    Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1234, Size: 512x512, ...

The last line is a comma-separated list of `Key: value`; a value that holds a comma, colon, quote or
newline is written as a JSON string. PNG files keep the text in the `parameters` text chunk; JPEG and
WebP files in the EXIF UserComment.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from PIL import Image

from .errors import InvalidRequestError
from .images import to_pil
from .inpaint import MASKED_CONTENT
from .request import JOB_SETTING_BY_FIELD, JOB_SETTINGS, GenerationRequest
from .samplers import (
    always_discarding_changes,
    effective_schedule,
    eta_for,
    get_sampler,
    resolve,
    runs_a1111_unipc,
    starts_as_a1111,
    takes_schedule_range,
    takes_schedule_rho,
)

log = logging.getLogger(__name__)

NEGATIVE_PREFIX = "Negative prompt:"

# One `Key: value` item of the parameter line. Keys start with a word character and go on with word
# characters, spaces, '-' or '/'; a value is either a JSON string (which may hold commas) or
# everything up to the next comma. Same grammar as A1111's reader, so the two accept the same texts.
_PARAM_ITEM = re.compile(
    r"""
    \s*
    (?P<key>\w[\w /-]+)
    :\s*
    (?P<value>"(?:\\.|[^\\"])+" | [^,]*)
    (?:,|$)
    """,
    re.VERBOSE,
)
_KEY = re.compile(r"\w[\w /-]+")
# A1111 only treats the last line as parameters when it holds at least this many items; otherwise
# a prompt line such as "a: b, c: d" would be mistaken for parameters.
_MIN_PARAM_ITEMS = 3
_SIZE = re.compile(r"(\d+)x(\d+)")

MASK_MODES = {"Inpaint masked": 0, "Inpaint not masked": 1}

# Keys whose values come from request fields. Copies of them in extra_params are never written:
# the request's own fields are what the image was made with.
_REQUEST_KEYS = frozenset(
    {
        "Steps",
        "Sampler",
        "Schedule type",
        "CFG scale",
        "Seed",
        "Variation seed",
        "Variation seed strength",
        "Seed resize from",
        "VAE",
        "VAE hash",
        "Size",
        "Denoising strength",
        "Mask blur",
        "Mask mode",
        "Inpaint area",
        "Masked area padding",
        "Masked content",
        "Emphasis",
        "Tiling",
        "Eta",
        "Eta DDIM",
        "Prompt syntax",
        "Hires upscale",
        "Hires resize",
        "Hires steps",
        "Hires upscaler",
        "Hires checkpoint",
        "Hires sampler",
        "Hires schedule type",
        "Hires prompt",
        "Hires negative prompt",
        "Refiner",
        "Refiner switch at",
        *(setting.infotext_key for setting in JOB_SETTINGS),
    }
)
# A "Prompt" item on the parameter line would replace the prompt when read back (A1111 reads it so too).
_PROMPT_KEYS = frozenset({"Prompt", "Negative prompt"})

# EXIF tags: the Exif sub-IFD and its UserComment (what A1111 writes into JPEG/WebP files).
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
# UserComment starts with an 8-byte character-code prefix (EXIF 2.3, section 4.6.5).
_PREFIX_UNICODE = b"UNICODE\0"
_PREFIX_ASCII = b"ASCII\0\0\0"
_PREFIX_JIS = b"JIS\0\0\0\0\0"


# ---------------------------------------------------------------------------------------------
# Writing


def format_infotext(
    req: GenerationRequest,
    seed: int,
    *,
    subseed: int | None = None,
    model_name: str | None = None,
    model_hash: str | None = None,
    vae_name: str | None = None,
    vae_hash: str | None = None,
    embedding_hashes: dict[str, str] | None = None,
    lora_hashes: dict[str, str] | None = None,
    inpainting_model: bool = False,
    zero_terminal_snr_model: bool = False,
    lengths_differ: bool = False,
) -> str:
    """A1111's "parameters" text for one image of a validated request, made with `seed` (and variation seed
    `subseed`, the request's when not given); `vae_name` and `vae_hash` the VAE file that decoded it, when
    not the model's own; `embedding_hashes` and `lora_hashes` the textual inversion embeddings and LoRAs it
    used, by name; `inpainting_model` whether the model was an inpainting model (its mask weight is written then);
    `zero_terminal_snr_model` whether the model's own scheduler config rescales its noise levels to zero terminal SNR
    (written as the Noise Schedule, which the job then had, whatever it asked for); `lengths_differ` whether the
    prompt's and the negative prompt's states differed in length at some step (Pad conds is written then)."""
    if req.width is None or req.height is None:
        raise InvalidRequestError(
            "width x height", f"{req.width}x{req.height}", "a validated request (Engine.validate fills in the size)"
        )
    params: dict[str, Any] = {
        "Steps": int(req.steps),
        "Sampler": req.sampler_name,
        "Schedule type": req.scheduler,
        "CFG scale": _format_number(req.cfg_scale),
        "Seed": int(seed),
        "Size": f"{int(req.width)}x{int(req.height)}",
    }
    if model_hash:
        params["Model hash"] = model_hash
    if model_name:
        params["Model"] = model_name
    if vae_name:
        if vae_hash:
            params["VAE hash"] = vae_hash
        params["VAE"] = vae_name
    # Only when they change the noise, as A1111 writes them.
    if req.subseed_strength > 0:
        params["Variation seed"] = int(req.subseed if subseed is None else subseed)
        params["Variation seed strength"] = _format_number(req.subseed_strength)
    if req.seed_resize_from_w > 0 and req.seed_resize_from_h > 0:
        params["Seed resize from"] = f"{int(req.seed_resize_from_w)}x{int(req.seed_resize_from_h)}"
    if req.mode in ("img2img", "inpaint") or (req.mode == "txt2img" and req.enable_hr):
        params["Denoising strength"] = _format_number(req.denoising_strength)
    if req.mode == "txt2img" and req.enable_hr:
        # As A1111 writes them: Size is the first pass's; the hires pass's comes from the scale or resize.
        if req.hr_resize_x or req.hr_resize_y:
            params["Hires resize"] = f"{int(req.hr_resize_x)}x{int(req.hr_resize_y)}"
        else:
            params["Hires upscale"] = _format_number(req.hr_scale)
        if req.hr_second_pass_steps:
            params["Hires steps"] = int(req.hr_second_pass_steps)
        params["Hires upscaler"] = req.hr_upscaler
        if req.hr_checkpoint_name:
            params["Hires checkpoint"] = req.hr_checkpoint_name
        # As A1111 writes them: only where the hires pass differs from the first.
        hr_sampler, hr_schedule = req.hires_sampler
        if hr_sampler != req.sampler_name:
            params["Hires sampler"] = hr_sampler
        if hr_schedule != req.scheduler:
            params["Hires schedule type"] = hr_schedule
        hr_prompt, hr_negative = req.hires_prompts
        if hr_prompt != req.prompt:
            params["Hires prompt"] = hr_prompt
        if hr_negative != req.negative_prompt:
            params["Hires negative prompt"] = hr_negative
    if req.refiner_checkpoint and req.refiner_switch_at < 1:  # at 1 it never takes over: A1111 writes nothing
        params["Refiner"] = req.refiner_checkpoint
        params["Refiner switch at"] = _format_number(req.refiner_switch_at)
    if req.sd_upscale and req.mode == "img2img":
        # A1111's script writes overlap and upscaler; the scale too, so that the picture can be made again.
        params["SD upscale overlap"] = int(req.sd_upscale_overlap)
        params["SD upscale upscaler"] = req.sd_upscale_upscaler
        params["SD upscale scale factor"] = _format_number(req.sd_upscale_scale)
    if req.outpaint and req.mode == "img2img":
        # A1111's script writes nothing of its own; these make the picture again from the infotext and init image.
        params["Outpaint pixels"] = int(req.outpaint_pixels)
        params["Outpaint direction"] = " ".join(req.outpaint_directions)
        params["Mask blur"] = int(req.mask_blur)
        params["Masked content"] = MASKED_CONTENT[req.inpainting_fill]
    if req.mode == "inpaint":
        params["Mask blur"] = int(req.mask_blur)
        if req.inpainting_mask_invert:
            params["Mask mode"] = "Inpaint not masked"
        params["Masked content"] = MASKED_CONTENT[req.inpainting_fill]
        if req.inpaint_full_res:
            params["Inpaint area"] = "Only masked"
            params["Masked area padding"] = int(req.inpaint_full_res_padding)
    if req.tiling:
        params["Tiling"] = "True"
    # As A1111 writes them: eta when not the sampler's default; ENSD for its uses_ensd samplers, when eta is not 0.
    spec, eta = get_sampler(req.sampler_name), eta_for(req.sampler_name, req.eta)
    if eta is not None and eta != spec.eta_default:
        params[spec.eta_key] = _format_number(eta)
    passes = [(req.sampler_name, req.scheduler)] + (
        [req.hires_sampler] if req.mode == "txt2img" and req.enable_hr else []
    )
    # Where a pass's sampler takes it (the hires pass's may).
    if req.s_noise != 1 and any(get_sampler(sampler).takes_s_noise for sampler, _ in passes):
        params["Sigma noise"] = _format_number(req.s_noise)
    # As A1111 writes it: where txt2img's first pass ran a k-diffusion sampler.
    if req.sgm_noise_multiplier and req.mode == "txt2img" and starts_as_a1111(req.sampler_name):
        params["SGM noise multiplier"] = "True"
    # As A1111 writes it: where it changed a pass.
    if req.always_discard_penultimate_sigma and any(always_discarding_changes(*chosen) for chosen in passes):
        params["Discard penultimate sigma"] = "True"
    if req.downcast_alphas_cumprod:
        params["Downcast alphas_cumprod"] = "True"
    # A1111's UniPC settings where a pass ran its UniPC and they are not its defaults. A1111 writes none of them; they
    # are written here so that the infotext makes the picture again.
    if any(runs_a1111_unipc(*chosen) for chosen in passes):
        for field in _UNIPC_FIELDS:
            setting, value = JOB_SETTING_BY_FIELD[field], getattr(req, field)
            if value != setting.default:
                params[setting.infotext_key] = str(value)
    noise_schedule = "Zero Terminal SNR" if zero_terminal_snr_model else req.noise_schedule
    if noise_schedule != "Default":
        params["Noise Schedule"] = noise_schedule
    # Sigma churn, tmin and tmax where a pass's sampler takes them, as A1111 writes them (when not 0).
    if any(get_sampler(sampler).takes_sigma_churn for sampler, _ in passes):
        for key, value in (("Sigma churn", req.s_churn), ("Sigma tmin", req.s_tmin), ("Sigma tmax", req.s_tmax)):
            if value:
                params[key] = _format_number(value)
    # A pass's schedule min/max sigma and rho, where its schedule takes them (the hires pass's may differ).
    if any(takes_schedule_range(*chosen) for chosen in passes):
        for key, value in (("Schedule min sigma", req.sigma_min), ("Schedule max sigma", req.sigma_max)):
            if value:
                params[key] = _format_number(value)
    if req.rho and any(takes_schedule_rho(*chosen) for chosen in passes):
        params["Schedule rho"] = _format_number(req.rho)
    if any(effective_schedule(get_sampler(sampler), schedule) == "Beta" for sampler, schedule in passes):
        # As A1111 writes them whenever the Beta schedule is used.
        params["Beta schedule alpha"] = _format_number(req.beta_dist_alpha)
        params["Beta schedule beta"] = _format_number(req.beta_dist_beta)
    # Also where sigma churn (Euler, Heun, DPM2) draws from the ENSD's noise: A1111 draws it so but does not write
    # it, so its infotext cannot make the picture again.
    churned = spec.takes_sigma_churn and req.s_churn
    if req.eta_noise_seed_delta and ((spec.uses_ensd and (eta is None or eta != 0)) or churned):
        params["ENSD"] = int(req.eta_noise_seed_delta)
    if req.mode != "txt2img" and req.initial_noise_multiplier != 1:
        params["Noise multiplier"] = _format_number(req.initial_noise_multiplier)
    if req.mode != "txt2img" and req.img2img_fix_steps:
        # A1111 does not write it; written here so that the infotext makes the picture again.
        params["Img2img fix steps"] = "True"
    if inpainting_model and (req.mode != "txt2img" or req.enable_hr):
        # As A1111 writes it wherever an inpainting model was conditioned on a picture (not txt2img's first pass).
        params["Conditional mask weight"] = _format_number(req.inpainting_mask_weight)
    if req.skip_early_cond > 0:
        params["Skip Early CFG"] = _format_number(req.skip_early_cond)
    if req.pad_cond_uncond and lengths_differ:  # as A1111 writes it: where it padded
        params["Pad conds"] = "True"
    if req.s_min_uncond > 0:
        params["NGMS"] = _format_number(req.s_min_uncond)
        if req.s_min_uncond_all:
            params["NGMS all steps"] = "True"
    if req.img2img_extra_noise > 0 and (req.mode != "txt2img" or req.enable_hr):
        params["Extra noise"] = _format_number(req.img2img_extra_noise)
    if req.mode != "txt2img" and req.color_correction:
        # A1111 keeps it a setting and writes nothing; written here so the infotext makes the same picture again.
        params["Color correction"] = "True"
    # Written only when not the default, as A1111 writes "Emphasis".
    if req.emphasis != "Original":
        params["Emphasis"] = req.emphasis
    if req.prompt_syntax != "a1111":
        params["Prompt syntax"] = req.prompt_syntax
    for key, hashes in (("Lora hashes", lora_hashes), ("TI hashes", embedding_hashes)):
        if hashes:
            params[key] = ", ".join(f"{name}: {digest}" for name, digest in hashes.items())

    for key, value in (req.extra_params or {}).items():
        key = str(key)
        if value is None or key in params or key in _REQUEST_KEYS or key in _PROMPT_KEYS or key == "RNG":
            continue
        if not _KEY.fullmatch(key):
            # It could not be read back (and might break the line apart); say so rather than corrupt the text.
            log.warning("infotext: leaving out extra parameter %r: not a key A1111 can read back", key)
            continue
        params[key] = value
    # The random source the noise came from (engine/noise.py), where A1111 writes it: before the version. A1111 reads
    # it back as its setting, so that there this text draws the same noise. Written for both sources: A1111 writes
    # nothing for its default GPU source, which without a key this engine reads as NV only from A1111's own texts.
    version = params.pop("Version", None)
    params["RNG"] = req.randn_source
    if version is not None:
        params["Version"] = version

    param_line = ", ".join(f"{key}: {_quote(str(value))}" for key, value in params.items())
    prompt = req.prompt or ""
    negative = req.negative_prompt or ""
    negative_line = f"\n{NEGATIVE_PREFIX} {negative}" if negative.strip() else ""
    return f"{prompt}{negative_line}\n{param_line}".strip()


def _format_number(value: float) -> str:
    """Numbers as A1111 shows them: 7 rather than 7.0, 7.5 stays 7.5."""
    number = float(value)
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    return repr(number)


def _quote(value: str) -> str:
    """A value as it can stand in the comma-separated line; JSON-quoted where it must be."""
    needs_quotes = not value or value != value.strip() or any(char in value for char in ',:"\n\r')
    return json.dumps(value, ensure_ascii=False) if needs_quotes else value


# ---------------------------------------------------------------------------------------------
# Reading text


def parse_infotext_params(text: str) -> dict[str, str]:
    """The raw items of an infotext: "Prompt", "Negative prompt" and every `Key: value` of the last line.

    Follows A1111's parse_generation_parameters: each line is stripped; lines from the one starting
    with "Negative prompt:" on make up the negative prompt; the last line counts as parameters only
    when it holds at least three items (otherwise the whole text is prompt); JSON-quoted values are
    unquoted; a later duplicate key wins. Unlike A1111 it adds no defaults for missing keys and keeps
    sizes ("Size: 512x512") as one value.
    """
    if not isinstance(text, str):
        raise InvalidRequestError("infotext", text, "text")
    *lines, last_line = text.replace("\r\n", "\n").strip().split("\n")
    items = [(match["key"], match["value"]) for match in _PARAM_ITEM.finditer(last_line)]
    if len(items) < _MIN_PARAM_ITEMS:
        lines.append(last_line)
        items = []

    prompt = negative = ""
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX) :].strip()
        # Lines join with newlines, except onto a still-empty text (as A1111 does).
        if in_negative:
            negative = f"{negative}\n{line}" if negative else line
        else:
            prompt = f"{prompt}\n{line}" if prompt else line

    params = {"Prompt": prompt, "Negative prompt": negative}
    for key, raw_value in items:
        # A1111 drops items with an empty value.
        if raw_value:
            params[key] = _unquote(raw_value)
    return params


def _unquote(value: str) -> str:
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        decoded = json.loads(value)
    except ValueError:
        return value
    return decoded if isinstance(decoded, str) else value


def parse_infotext(text: str, *, unsupported_schedule: str = "error") -> GenerationRequest:
    """A GenerationRequest from an A1111 infotext (not yet validated: pass it to Engine.validate).

    A1111 pairs any sampler with any schedule type; diffusers cannot (e.g. Euler a + Karras). With
    `unsupported_schedule="automatic"` such a pair falls back to the sampler's Automatic schedule
    (the caller can tell by comparing with the text's "Schedule type") instead of raising.

    Keys the engine acts on fill request fields; all others (Model, Model hash, Clip skip, Version,
    Hires ..., Lora hashes, ...) go to `extra_params` as text. Keys that are missing keep the request's
    defaults (no Size means the model's native size). A malformed value raises InvalidRequestError
    naming the infotext key.
    """
    params = parse_infotext_params(text)
    req = GenerationRequest(prompt=params.pop("Prompt"), negative_prompt=params.pop("Negative prompt"))
    # A1111's first texts named a hypernetwork beside the prompt; A1111 reads that as its tag at the prompt's end.
    hypernet = params.pop("Hypernet", None)
    if hypernet is not None:
        req.prompt += f"<hypernet:{hypernet}:{params.pop('Hypernet strength', '1.0')}>"

    if "Steps" in params:
        req.steps = _parse_int("Steps", params.pop("Steps"))
    sampler = params.pop("Sampler", None)
    schedule = params.pop("Schedule type", None)
    if sampler is not None or schedule is not None:
        try:
            req.sampler_name, req.scheduler = _resolve_sampler(sampler, schedule, default_sampler=req.sampler_name)
        except InvalidRequestError as exc:
            if unsupported_schedule != "automatic" or exc.field != "Schedule type":
                raise
            req.sampler_name, req.scheduler = _resolve_sampler(sampler, "Automatic", default_sampler=req.sampler_name)
    if "CFG scale" in params:
        req.cfg_scale = _parse_float("CFG scale", params.pop("CFG scale"))
    if "Seed" in params:
        req.seed = _parse_int("Seed", params.pop("Seed"))
    if "Size" in params:
        req.width, req.height = _parse_size(params.pop("Size"))
    if "VAE" in params:
        req.sd_vae = params.pop("VAE")
        params.pop("VAE hash", None)  # the file's own hash says which it is; a copy would go stale
    if "Variation seed" in params:
        req.subseed = _parse_int("Variation seed", params.pop("Variation seed"))
    if "Variation seed strength" in params:
        req.subseed_strength = _parse_float("Variation seed strength", params.pop("Variation seed strength"))
    if "Seed resize from" in params:
        size = _parse_size(params.pop("Seed resize from"), key="Seed resize from")
        req.seed_resize_from_w, req.seed_resize_from_h = size
    if "Denoising strength" in params:
        req.denoising_strength = _parse_float("Denoising strength", params.pop("Denoising strength"))
    if "Mask blur" in params:
        req.mask_blur = _parse_int("Mask blur", params.pop("Mask blur"))
    if "Mask mode" in params:
        mode = params.pop("Mask mode")
        if mode not in MASK_MODES:
            raise InvalidRequestError("Mask mode", mode, " or ".join(MASK_MODES))
        req.inpainting_mask_invert = MASK_MODES[mode]
    if "Masked content" in params:
        content = params.pop("Masked content")
        if content not in MASKED_CONTENT:
            raise InvalidRequestError("Masked content", content, ", ".join(MASKED_CONTENT))
        req.inpainting_fill = MASKED_CONTENT.index(content)
    if "Inpaint area" in params:
        req.inpaint_full_res = params.pop("Inpaint area") == "Only masked"
    if "Masked area padding" in params:
        req.inpaint_full_res_padding = _parse_int("Masked area padding", params.pop("Masked area padding"))
    for key in ("Eta", "Eta DDIM"):
        if key in params:
            req.eta = _parse_float(key, params.pop(key))
    for key, (field, parse) in _NUMBER_KEYS.items():
        if key in params:
            setattr(req, field, parse(key, params.pop(key)))
    for key, field in _SWITCH_KEYS.items():
        if key in params:
            setattr(req, field, params.pop(key).strip().lower() == "true")
    if "RNG" not in params and _from_a1111(params):
        # A1111 writes no RNG for its default GPU source: such a text's noise is an NVIDIA card's (other cards' GPU
        # noise differs, and cannot be drawn here). This engine's texts write their RNG.
        req.randn_source = "NV"
    for key, setting in _CHOICE_KEYS.items():
        if key in params:
            setattr(req, setting.field, setting.checked(params.pop(key), key))
    if "Emphasis" in params:
        req.emphasis = params.pop("Emphasis")
    if "Prompt syntax" in params:
        req.prompt_syntax = params.pop("Prompt syntax")
    if "Hires upscale" in params or "Hires resize" in params:
        req.enable_hr = True
        if "Hires upscale" in params:
            req.hr_scale = _parse_float("Hires upscale", params.pop("Hires upscale"))
        if "Hires resize" in params:
            req.hr_resize_x, req.hr_resize_y = _parse_size(params.pop("Hires resize"), key="Hires resize")
        if "Hires steps" in params:
            req.hr_second_pass_steps = _parse_int("Hires steps", params.pop("Hires steps"))
        if "Hires upscaler" in params:
            # Kept as written: an upscaler model's name (R-ESRGAN 4x+, 4x-UltraSharp) is checked against
            # the upscaler folders when the request is, where a missing one is named.
            req.hr_upscaler = params.pop("Hires upscaler")
        for key, name in (
            ("Hires checkpoint", "hr_checkpoint_name"),
            ("Hires sampler", "hr_sampler_name"),
            ("Hires schedule type", "hr_scheduler"),
            ("Hires prompt", "hr_prompt"),
            ("Hires negative prompt", "hr_negative_prompt"),
        ):
            if key in params:
                setattr(req, name, params.pop(key))

    if "Refiner" in params:
        req.refiner_checkpoint = params.pop("Refiner")
        if "Refiner switch at" in params:
            req.refiner_switch_at = _parse_float("Refiner switch at", params.pop("Refiner switch at"))

    if "Outpaint pixels" in params:
        req.outpaint = True
        req.outpaint_pixels = _parse_int("Outpaint pixels", params.pop("Outpaint pixels"))
        if "Outpaint direction" in params:
            req.outpaint_directions = tuple(params.pop("Outpaint direction").split())

    if "SD upscale upscaler" in params:
        req.sd_upscale = True
        req.sd_upscale_upscaler = params.pop("SD upscale upscaler")
        if "SD upscale overlap" in params:
            req.sd_upscale_overlap = _parse_int("SD upscale overlap", params.pop("SD upscale overlap"))
        if "SD upscale scale factor" in params:
            req.sd_upscale_scale = _parse_float("SD upscale scale factor", params.pop("SD upscale scale factor"))

    req.extra_params = params
    return req


# Keys that parse_infotext leaves in extra_params and that say nothing of how the picture is drawn (or, Clip skip,
# are read from there): every other key it leaves names a setting it did not read (an extension's, face restoration).
_RECORD_KEYS = frozenset(
    {"Clip skip", "Model", "Model hash", "Version", "Lora hashes", "TI hashes", "Hashes", "Hypernet hash"}
)


def _from_a1111(params: dict) -> bool:
    """Whether an infotext's parameters are A1111's: it always writes its version, this engine only a pasted one."""
    return "Version" in params


def named_job_settings(params: dict) -> set[str]:
    """The job settings (request fields) an infotext's parameters (parse_infotext_params) set when read: those it
    names, and the random source of every A1111 text (its default GPU source goes unnamed)."""
    named = {setting.field for setting in JOB_SETTINGS if setting.infotext_key in params}
    return named | {"randn_source"} if _from_a1111(params) else named


def unread_settings(request: GenerationRequest) -> dict[str, str]:
    """The settings an infotext read into `request` (parse_infotext) named that the request does not carry, by key:
    an extension's (ADetailer, ControlNet), A1111's that this engine does not run (Face restoration,
    Token merging ratio) and a script's (Loopback's final denoising strength). A picture made
    from the request may come out differently."""
    return {key: str(value) for key, value in (request.extra_params or {}).items() if key not in _RECORD_KEYS}


def _resolve_sampler(sampler: str | None, schedule: str | None, *, default_sampler: str) -> tuple[str, str]:
    """Canonical sampler and schedule type; old infotexts say "DPM++ 2M Karras" with no Schedule type."""
    try:
        return resolve(sampler if sampler is not None else default_sampler, schedule)
    except InvalidRequestError as exc:
        # Name the infotext key the reader can find in the text, not the request field.
        key = "Schedule type" if exc.field == "scheduler" and schedule is not None else "Sampler"
        value = schedule if key == "Schedule type" else sampler
        raise InvalidRequestError(key, value, exc.allowed) from exc


def _parse_int(key: str, value: str) -> int:
    text = value.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or not number.is_integer():
        raise InvalidRequestError(key, value, "a whole number, e.g. 20")
    return int(number)


def _parse_float(key: str, value: str) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise InvalidRequestError(key, value, "a number, e.g. 7 or 0.75")
    return number


_UNIPC_FIELDS = ("unipc_variant", "unipc_skip_type", "unipc_order", "unipc_lower_order_final")

# Infotext keys read back into the request field of the same meaning: the job settings' numbers (with how each is
# read), choices (checked by name), and switches ("True").
_NUMBER_KEYS = {
    setting.infotext_key: (setting.field, _parse_int if setting.is_whole else _parse_float)
    for setting in JOB_SETTINGS
    if not setting.is_switch and not setting.is_choice
}
_CHOICE_KEYS = {setting.infotext_key: setting for setting in JOB_SETTINGS if setting.is_choice}
_SWITCH_KEYS = {"Tiling": "tiling"} | {
    setting.infotext_key: setting.field for setting in JOB_SETTINGS if setting.is_switch
}


def _parse_size(value: str, *, key: str = "Size") -> tuple[int, int]:
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise InvalidRequestError(key, value, "WIDTHxHEIGHT in pixels, e.g. 512x512")
    return int(match[1]), int(match[2])


# ---------------------------------------------------------------------------------------------
# Reading images


def read_infotext(image_or_bytes: Image.Image | bytes | str) -> str | None:
    """The infotext stored in an image, or None when it has none.

    Accepts a PIL image or anything engine.images.to_pil decodes (file bytes, base64); what is not an
    image raises InvalidRequestError naming "image". Looks at the PNG `parameters` text chunk, then
    the EXIF UserComment (JPEG/WebP, as A1111 writes them), then a GIF comment.
    """
    image = to_pil(image_or_bytes, "image")
    info = image.info or {}

    parameters = info.get("parameters")
    if isinstance(parameters, bytes):
        parameters = parameters.decode("utf-8", errors="replace")
    if isinstance(parameters, str) and parameters.strip():
        return parameters

    comment = _exif_user_comment(image)
    if comment:
        return comment

    gif_comment = info.get("comment")
    if isinstance(gif_comment, bytes):
        gif_comment = gif_comment.decode("utf-8", errors="ignore")
    if isinstance(gif_comment, str) and gif_comment.strip():
        return gif_comment
    return None


def _exif_user_comment(image: Image.Image) -> str | None:
    try:
        raw = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except Exception as exc:  # Pillow raises many kinds on broken EXIF; for us it only means "no text"
        log.debug("infotext: unreadable EXIF: %s", exc)
        return None
    if raw is None:
        return None
    text = _decode_user_comment(raw) if isinstance(raw, bytes) else str(raw)
    text = text.strip("\0")
    return text if text.strip() else None


def _decode_user_comment(raw: bytes) -> str:
    """EXIF UserComment bytes to text; A1111 (through piexif) writes b"UNICODE\\0" + UTF-16 big-endian."""
    prefix, body = raw[:8], raw[8:]
    if prefix == _PREFIX_UNICODE:
        return _decode_utf16(body)
    if prefix == _PREFIX_ASCII:
        return body.decode("ascii", errors="replace")
    if prefix == _PREFIX_JIS:
        return body.decode("shift_jis", errors="replace")
    # Unknown or undefined prefix: A1111 falls back to reading the bytes as UTF-8.
    return raw.decode("utf-8", errors="ignore")


def _decode_utf16(body: bytes) -> str:
    if body.startswith(b"\xfe\xff"):
        return body[2:].decode("utf-16-be", errors="replace")
    if body.startswith(b"\xff\xfe"):
        return body[2:].decode("utf-16-le", errors="replace")
    # EXIF says big-endian (what A1111 writes), but some tools write little-endian without a BOM. For
    # mostly-Latin text the zero bytes then sit at odd offsets instead of even ones.
    zeros_even = body[0::2].count(0)
    zeros_odd = body[1::2].count(0)
    encoding = "utf-16-le" if zeros_odd > zeros_even else "utf-16-be"
    return body.decode(encoding, errors="replace")
