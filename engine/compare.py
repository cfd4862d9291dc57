"""Comparisons: X/Y/Z grids of jobs at a fixed seed, their convergence, and denoising timelines.

    axes = [parse_axis("Sampler", "Euler a, DPM++ 2M, UniPC", engine), parse_axis("Steps", "10-30 (+10)", engine)]
    for event in run_grid(engine, GenerationRequest(prompt="a lighthouse", seed=7), axes):
        ...  # GridProgress while running, then one GridResult

Axis values are typed like A1111's X/Y/Z plot script: comma lists (with "quotes" for commas inside a
value), integer or decimal ranges `10-40 (+10)`, and `5-30 [4]` for four evenly spaced values. Every
cell shares the base request (seed included), so cells differ only where the axes say.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import logging
import math
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .errors import InvalidRequestError
from .events import JobControl, PreviewSettings, Progress, Result, Waiting
from .labels import centered, text_width, wrap
from .labels import font as label_font
from .request import JOB_SETTING_BY_FIELD, MAX_CLIP_SKIP, SEED_MAX, GenerationRequest, with_clip_skip

log = logging.getLogger(__name__)

AXIS_TYPES = (
    "Nothing",
    "Sampler",
    "Schedule type",
    "Steps",
    "CFG scale",
    "Seed",
    "Var. seed",
    "Var. strength",
    "Denoising strength",
    "Eta",
    "Sigma noise",
    "Sigma churn",
    "Sigma tmin",
    "Sigma tmax",
    "Schedule min sigma",
    "Schedule max sigma",
    "Schedule rho",
    "ENSD",
    "NGMS",
    "SkipEarly",
    "Extra noise",
    "Clip skip",
    "Hires upscaler",
    "Hires checkpoint",
    "Refiner",
    "Refiner switch at",
    "Prompt S/R",
    "Model",
)
# The request field each axis sets (Prompt S/R, Model and Clip skip are handled on their own).
_AXIS_FIELDS = {
    "Sampler": "sampler_name",
    "Schedule type": "scheduler",
    "Steps": "steps",
    "CFG scale": "cfg_scale",
    "Seed": "seed",
    "Var. seed": "subseed",
    "Var. strength": "subseed_strength",
    "Denoising strength": "denoising_strength",
    "Eta": "eta",
    "Sigma noise": "s_noise",
    "Sigma churn": "s_churn",
    "Sigma tmin": "s_tmin",
    "Sigma tmax": "s_tmax",
    "Schedule min sigma": "sigma_min",
    "Schedule max sigma": "sigma_max",
    "Schedule rho": "rho",
    "ENSD": "eta_noise_seed_delta",
    "NGMS": "s_min_uncond",
    "SkipEarly": "skip_early_cond",
    "Extra noise": "img2img_extra_noise",
    "Hires upscaler": "hr_upscaler",
    "Hires checkpoint": "hr_checkpoint_name",
    "Refiner": "refiner_checkpoint",
    "Refiner switch at": "refiner_switch_at",
}
# Model-valued axes whose value may also be none (the first pass's model, no refiner), and how that reads.
_NONE_MODEL = {"Hires checkpoint": ("use same checkpoint", "none"), "Refiner": ("none",)}
# Axes of A1111's job settings (ENSD, sigma noise, NGMS, ...), whose kind of number and range come from the setting.
_JOB_SETTING_AXES = {
    kind: JOB_SETTING_BY_FIELD[field] for kind, field in _AXIS_FIELDS.items() if field in JOB_SETTING_BY_FIELD
}
_INT_AXES = {"Steps", "Seed", "Var. seed", "Clip skip"} | {
    kind for kind, setting in _JOB_SETTING_AXES.items() if setting.is_whole
}
_FLOAT_AXES = {"CFG scale", "Var. strength", "Denoising strength", "Eta", "Refiner switch at"} | {
    kind for kind, setting in _JOB_SETTING_AXES.items() if not setting.is_whole and not setting.is_switch
}
# Axes whose values are shares or strengths, from 0 to 1.
_UNIT_AXES = ("Denoising strength", "Var. strength", "Eta", "Refiner switch at", "SkipEarly", "Extra noise")
MAX_CELLS = 400

_NUMBER = r"[+-]?\s*(?:\d+(?:\.\d*)?|\.\d+)"
_RANGE_STEP = re.compile(rf"^\s*({_NUMBER})\s*-\s*({_NUMBER})\s*(?:\(\s*([+-]?\s*(?:\d+(?:\.\d*)?|\.\d+))\s*\))?\s*$")
_RANGE_COUNT = re.compile(rf"^\s*({_NUMBER})\s*-\s*({_NUMBER})\s*\[\s*(\d+)\s*\]\s*$")

# Reference for convergence: what a converged image of the same request looks like.
REFERENCE_SAMPLER = "DPM++ 2M"
REFERENCE_SCHEDULE = "Karras"
REFERENCE_STEPS = 100


@dataclass(frozen=True)
class Axis:
    kind: str
    values: tuple
    labels: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.values)


def split_values(text: str) -> list[str]:
    """Comma-separated values; "double quotes" keep commas inside a value (as in A1111)."""
    rows = list(csv.reader(io.StringIO(text or ""), skipinitialspace=True))
    return [value.strip() for row in rows for value in row if value.strip()]


def _number(text: str, integer: bool) -> float:
    value = float(text.replace(" ", ""))
    if not math.isfinite(value):  # "inf", or digits past float's range
        raise ValueError(text)
    return int(value) if integer else value


def _expand(kind: str, values: list[str]) -> list:
    """Numbers and ranges for numeric axes."""
    integer = kind in _INT_AXES
    out: list = []

    def within_limit(n: int) -> int:
        # Counted before the values are made: "1-5 [100000000]" took minutes to be refused.
        if len(out) + n > MAX_CELLS:
            raise InvalidRequestError(f"{kind} axis", f"{len(out) + n} values", f"at most {MAX_CELLS}")
        return n

    for value in values:
        count = _RANGE_COUNT.match(value)
        ranged = _RANGE_STEP.match(value) if count is None else None
        try:
            if count is not None:
                start, end, n = _number(count[1], integer), _number(count[2], integer), int(count[3])
                if n < 1:
                    raise ValueError
                within_limit(n)
                points = np.linspace(start, end, num=n)
                out.extend(int(round(p)) if integer else round(float(p), 6) for p in points)
            elif ranged is not None:
                start, end = _number(ranged[1], integer), _number(ranged[2], integer)
                step = _number(ranged[3], integer) if ranged[3] is not None else (1 if end >= start else -1)
                if step == 0 or (end - start) * step < 0:
                    raise ValueError
                n = within_limit(int(np.floor((end - start) / step + 1e-9)) + 1)
                out.extend(start + i * step if integer else round(start + i * step, 6) for i in range(n))
            else:
                out.append(_number(value, integer))
        except InvalidRequestError:
            raise
        except (ValueError, TypeError, OverflowError) as exc:
            kind_word = "whole numbers" if integer else "numbers"
            raise InvalidRequestError(
                f"{kind} axis", value, f"{kind_word}, ranges like 10-40 (+10) or 5-30 [4], separated by commas"
            ) from exc
    return out


def parse_axis(kind: str, text: str, engine) -> Axis:
    """One axis from its type and typed values; InvalidRequestError names the axis, the value and what is allowed."""
    if kind not in AXIS_TYPES:
        raise InvalidRequestError("axis type", kind, ", ".join(AXIS_TYPES))
    if kind == "Nothing":
        return Axis(kind, (None,), ("",))
    values = split_values(text)
    if not values:
        raise InvalidRequestError(f"{kind} axis", text, "at least one value")
    if kind in _INT_AXES or kind in _FLOAT_AXES:
        typed = _expand(kind, values)
        if kind == "Steps" and any(not 1 <= v <= engine.limits.max_steps for v in typed):
            raise InvalidRequestError(f"{kind} axis", text, f"steps from 1 to {engine.limits.max_steps}")
        if kind in _UNIT_AXES and any(not 0 <= v <= 1 for v in typed):
            raise InvalidRequestError(f"{kind} axis", text, "values from 0 to 1")
        setting = _JOB_SETTING_AXES.get(kind)
        if setting is not None and any(not setting.lowest <= v <= setting.highest for v in typed):
            raise InvalidRequestError(f"{kind} axis", text, setting.allowed(several=True))
        if kind == "Clip skip" and any(not 1 <= v <= MAX_CLIP_SKIP for v in typed):
            raise InvalidRequestError(f"{kind} axis", text, f"whole numbers from 1 to {MAX_CLIP_SKIP}")
        labels = tuple(_format_number(v) for v in typed)
    elif kind == "Sampler":
        typed = [_match(value, engine.samplers(), kind, aliases=engine.sampler_aliases) for value in values]
        labels = tuple(typed)
    elif kind == "Schedule type":
        typed = [_match(value, engine.schedulers(), kind) for value in values]
        labels = tuple(typed)
    elif kind == "Hires upscaler":
        typed = [_match(value, engine.hires_upscalers(), kind) for value in values]
        labels = tuple(typed)
    elif kind == "Prompt S/R":
        typed, labels = values, tuple(values)
    else:  # Model, Hires checkpoint, Refiner
        models = engine.list_models()
        typed = []
        for value in values:
            if value.lower() in _NONE_MODEL.get(kind, ()):
                typed.append("")  # the request's none: the first pass's model, no refiner
                continue
            found = [m for m in models if value.lower() in (m.name.lower(), m.title.lower(), Path(m.path).name.lower())]
            if not found:
                names = ", ".join(m.name for m in models) or "none found in the models folder"
                if kind in _NONE_MODEL:
                    names += ", or None"
                raise InvalidRequestError(f"{kind} axis", value, names)
            typed.append(found[0].name)
        labels = tuple(value or "None" for value in typed)
    if len(typed) > MAX_CELLS:
        raise InvalidRequestError(f"{kind} axis", f"{len(typed)} values", f"at most {MAX_CELLS}")
    return Axis(kind, tuple(typed), labels)


def _match(value: str, options: list[str], kind: str, aliases: Callable[[str], list[str]] | None = None) -> str:
    wanted = value.strip().lower()
    for option in options:
        names = [option, *(aliases(option) if aliases else [])]
        if wanted in (name.lower() for name in names):
            return option
    raise InvalidRequestError(f"{kind} axis", value, ", ".join(options))


def _format_number(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


# Planning ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    index: int  # position in the grid, x fastest, then y, then z
    x: int
    y: int
    z: int
    request: GenerationRequest
    model: str | None  # a model name to load first, None for the loaded one
    label: str


def plan_grid(base: GenerationRequest, axes: list[Axis]) -> list[Cell]:
    """Every cell's request, in grid order. Raises InvalidRequestError for a Prompt S/R search text that is
    in neither prompt."""
    x_axis, y_axis, z_axis = (axes + [Axis("Nothing", (None,), ("",))] * 3)[:3]
    for axis in (x_axis, y_axis, z_axis):
        if axis.kind == "Prompt S/R":
            search = axis.values[0]
            if search not in base.prompt and search not in base.negative_prompt:
                raise InvalidRequestError(
                    "Prompt S/R axis", search, "a first value found in the prompt or negative prompt (it is replaced)"
                )
    kinds = (x_axis.kind, y_axis.kind, z_axis.kind)
    # Extra noise reaches a txt2img grid through its hires pass only.
    for needs_hires in ("Hires upscaler", "Hires checkpoint", "Extra noise"):
        if not base.enable_hr and needs_hires in kinds:
            raise InvalidRequestError(f"{needs_hires} axis", "Hires. fix off", "Hires. fix on (in the txt2img tab)")
    if not base.refiner_checkpoint and "Refiner switch at" in kinds and "Refiner" not in kinds:
        raise InvalidRequestError(
            "Refiner switch at axis", "no refiner", "a refiner (in the txt2img tab's Refiner panel, or a Refiner axis)"
        )
    total = len(x_axis) * len(y_axis) * len(z_axis)
    if total > MAX_CELLS:
        raise InvalidRequestError("grid", f"{total} cells", f"at most {MAX_CELLS}")
    cells = []
    for (z, zv), (y, yv), (x, xv) in itertools.product(
        enumerate(z_axis.values), enumerate(y_axis.values), enumerate(x_axis.values)
    ):
        request, model = base, None
        parts = []
        for axis, value, label in (
            (x_axis, xv, x_axis.labels[x]),
            (y_axis, yv, y_axis.labels[y]),
            (z_axis, zv, z_axis.labels[z]),
        ):
            if axis.kind == "Nothing":
                continue
            parts.append(f"{axis.kind}: {label}")
            if axis.kind == "Prompt S/R":
                search = axis.values[0]
                request = dataclasses.replace(
                    request,
                    prompt=request.prompt.replace(search, value),
                    negative_prompt=request.negative_prompt.replace(search, value),
                )
            elif axis.kind == "Model":
                model = value
            elif axis.kind == "Clip skip":  # an infotext key the request carries as A1111 writes it
                request = dataclasses.replace(request, extra_params=with_clip_skip(request.extra_params, value))
            else:
                request = dataclasses.replace(request, **{_AXIS_FIELDS[axis.kind]: value})
        cells.append(Cell(len(cells), x, y, z, request, model, ", ".join(parts)))
    return cells


def run_order(cells: list[Cell]) -> list[Cell]:
    """Cells grouped by model (first appearance order), so each model loads once."""
    models = list(dict.fromkeys(cell.model for cell in cells))
    return sorted(cells, key=lambda cell: (models.index(cell.model), cell.index))


# Running -----------------------------------------------------------------------------------------


@dataclass
class CellResult:
    cell: Cell
    image: Image.Image
    infotext: str
    seed: int
    elapsed: float
    timeline: list[Image.Image] = field(default_factory=list)
    ssim: float | None = None
    mean_abs_diff: float | None = None


@dataclass
class GridProgress:
    cell_no: int  # 0-based count of cells started
    cell_count: int
    cell: Cell
    progress: Progress | None  # the cell's own step progress (with its preview)
    waiting: Waiting | None = None  # set while the cell waits for another job (say, a REST one) to end

    @property
    def fraction(self) -> float:
        within = self.progress.fraction if self.progress is not None else 0.0
        return min(1.0, (self.cell_no + within) / max(1, self.cell_count))


@dataclass
class GridResult:
    axes: list[Axis]
    cells: list[CellResult]  # finished cells, in grid order
    grids: list[Image.Image]  # one per Z value
    infotext: str
    interrupted: bool
    reference: Image.Image | None = None


class Comparer:
    """Runs grids on one Engine, keeping converged reference images so repeated comparisons reuse them.

    State is per instance (a page session or a script), never shared between users."""

    def __init__(self, engine, *, reference_cache_size: int = 8):
        self.engine = engine
        self._references: OrderedDict[tuple, Image.Image] = OrderedDict()
        self._reference_cache_size = reference_cache_size

    def reference_image(
        self, request: GenerationRequest, control: JobControl | None = None, checkpoint: str | None = None
    ) -> Image.Image | None:
        """The same prompt and seed sampled to convergence (DPM++ 2M Karras, many steps), cached; on `checkpoint`
        (default: the loaded model)."""
        validated = self.engine.validate(request)
        reference = dataclasses.replace(
            validated,
            sampler_name=REFERENCE_SAMPLER,
            scheduler=REFERENCE_SCHEDULE,
            steps=min(REFERENCE_STEPS, self.engine.limits.max_steps),
            batch_size=1,
            n_iter=1,
            # Guided on every step: the converged picture that NGMS and SkipEarly cells are measured against.
            s_min_uncond=0.0,
            skip_early_cond=0.0,
            # On the model's own schedule, whatever the cells' schedule min/max sigma and rho.
            sigma_min=0.0,
            sigma_max=0.0,
            rho=0.0,
        )
        model = self.engine.registry.resolve(checkpoint) if checkpoint is not None else self.engine.model
        key = (
            model.sha256 or model.path,
            reference.prompt,
            reference.negative_prompt,
            reference.seed,
            reference.cfg_scale,
            reference.width,
            reference.height,
            reference.prompt_syntax,
            reference.emphasis,
            tuple(sorted(reference.extra_params.items())),
        )
        if key not in self._references:
            preview = PreviewSettings(mode="none")
            result = _last(self.engine.generate(reference, control=control, preview=preview, checkpoint=checkpoint))
            if result.interrupted or not result.images:
                return None
            self._references[key] = result.images[0]
            while len(self._references) > self._reference_cache_size:
                self._references.popitem(last=False)
        self._references.move_to_end(key)
        return self._references[key]

    def run_grid(
        self,
        base: GenerationRequest,
        axes: list[Axis],
        *,
        control: JobControl | None = None,
        preview: PreviewSettings | None = None,
        convergence: bool = False,
        keep_timelines: bool = True,
    ) -> Iterator[GridProgress | GridResult]:
        """Run every cell (each an engine job through the engine's queue) and end with a GridResult.

        The seed and variation seed are fixed once for the whole grid (random ones are drawn up front), so
        cells differ only along the axes. Stop (control.interrupt) ends the grid after the current cell's partial image.
        """
        control = control or JobControl()
        preview = preview or PreviewSettings(mode="approx", every=1)
        if base.seed in (-1, None):
            base = dataclasses.replace(base, seed=secrets.randbelow(SEED_MAX + 1))
        if base.subseed in (-1, None):
            base = dataclasses.replace(base, subseed=secrets.randbelow(SEED_MAX + 1))
        cells = plan_grid(base, axes)
        for cell in cells:  # every cell is checked before the first one runs
            self.engine.validate(cell.request)
        # Each cell runs on its model, whatever another user switched to between two cells: a grid that mixed
        # models unseen would measure nothing.
        original_path = self.engine.model.path
        finished: dict[int, CellResult] = {}
        reference = None
        try:
            for cell_no, cell in enumerate(run_order(cells)):
                if control.interrupted:
                    break
                yield GridProgress(cell_no, len(cells), cell, None)
                frames: list[Image.Image] = []
                job = JobControl()
                result = None
                checkpoint = cell.model if cell.model is not None else original_path
                events = self.engine.generate(cell.request, control=job, preview=preview, checkpoint=checkpoint)
                try:
                    for event in events:
                        if control.interrupted:
                            job.interrupt()
                        if isinstance(event, Progress):
                            if keep_timelines and event.preview is not None:
                                frames.append(event.preview)
                            yield GridProgress(cell_no, len(cells), cell, event)
                        elif isinstance(event, Waiting):
                            yield GridProgress(cell_no, len(cells), cell, None, waiting=event)
                        elif isinstance(event, Result):
                            result = event
                finally:
                    events.close()
                if result is None or not result.images:
                    break
                # Previews come at latent size; the timeline shows them at the picture's size.
                size = result.images[0].size
                frames = [
                    frame if frame.size == size else frame.resize(size, Image.Resampling.BILINEAR) for frame in frames
                ]
                finished[cell.index] = CellResult(
                    cell, result.images[0], result.infotexts[0], result.seeds[0], result.elapsed, frames
                )
                if result.interrupted:
                    break
            if convergence and finished and not control.interrupted:
                reference = self.reference_image(base, control, checkpoint=original_path)
                if reference is not None:
                    for cell_result in finished.values():
                        cell_result.ssim, cell_result.mean_abs_diff = image_distance(cell_result.image, reference)
        finally:
            if Path(self.engine.model.path) != Path(original_path):
                self.engine.load_model(original_path)
        done = [finished[index] for index in sorted(finished)]
        yield GridResult(
            axes=list(axes),
            cells=done,
            grids=draw_grids(axes, done),
            infotext=grid_infotext(base, axes, len(cells), len(done)),
            interrupted=control.interrupted or len(done) < len(cells),
            reference=reference,
        )


def _last(events):
    result = None
    for event in events:
        if isinstance(event, Result):
            result = event
    return result


# Measuring ---------------------------------------------------------------------------------------


def image_distance(image: Image.Image, reference: Image.Image) -> tuple[float, float]:
    """(SSIM, mean absolute pixel difference 0..255) between two pictures of the same size."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if image.size != reference.size:
        image = image.resize(reference.size, Image.Resampling.LANCZOS)
    a = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    b = torch.from_numpy(np.asarray(reference.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    # A window no larger than the picture: tiny models make tiny pictures.
    kernel = min(11, (min(a.shape[-2:]) // 2) * 2 - 1)
    ssim = structural_similarity_index_measure(a, b, data_range=1.0, kernel_size=kernel)
    return float(ssim), float((a - b).abs().mean() * 255)


def convergence_table(result: GridResult) -> list[dict]:
    """Rows for a distance-vs-steps plot: one per finished cell with its sampler, schedule, steps and distances."""
    rows = []
    for cell_result in result.cells:
        if cell_result.ssim is None:
            continue
        request = cell_result.cell.request
        rows.append(
            {
                "sampler": f"{request.sampler_name} ({request.scheduler})",
                "steps": int(request.steps),
                "ssim": round(cell_result.ssim, 4),
                "mean_abs_diff": round(cell_result.mean_abs_diff, 2),
            }
        )
    return rows


# Drawing -----------------------------------------------------------------------------------------


def draw_grids(axes: list[Axis], cells: list[CellResult]) -> list[Image.Image]:
    """One labelled grid per Z value: X values as column headers, Y values as row headers; empty slots
    (stopped grids) stay blank."""
    if not cells:
        return []
    x_axis, y_axis, z_axis = (list(axes) + [Axis("Nothing", (None,), ("",))] * 3)[:3]
    width, height = cells[0].image.size
    font_size = max(12, min(28, width // 10))
    font = label_font(font_size)
    header_h = 0
    if x_axis.kind != "Nothing":
        most_lines = max(len(wrap(f"{x_axis.kind}: {label}", font, width)) for label in x_axis.labels)
        header_h = most_lines * (font_size + 2) + 8
    label_w = 0
    if y_axis.kind != "Nothing":
        label_w = max(text_width(font, f"{y_axis.kind}: {label}") for label in y_axis.labels) + 16
    by_slot = {(c.cell.x, c.cell.y, c.cell.z): c for c in cells}
    grids = []
    for z in range(len(z_axis)):
        title_h = font_size + 10 if z_axis.kind != "Nothing" else 0
        grid = Image.new(
            "RGB",
            (label_w + width * len(x_axis), title_h + header_h + height * len(y_axis)),
            "white",
        )
        draw = ImageDraw.Draw(grid)
        if title_h:
            draw.text((8, 4), f"{z_axis.kind}: {z_axis.labels[z]}", fill="black", font=font)
        for x, label in enumerate(x_axis.labels if x_axis.kind != "Nothing" else []):
            centered(draw, f"{x_axis.kind}: {label}", (label_w + x * width, title_h, width, header_h), font)
        for y, label in enumerate(y_axis.labels if y_axis.kind != "Nothing" else []):
            centered(draw, f"{y_axis.kind}: {label}", (0, title_h + header_h + y * height, label_w, height), font)
        for (x, y, cz), cell in by_slot.items():
            if cz == z:
                grid.paste(cell.image.convert("RGB"), (label_w + x * width, title_h + header_h + y * height))
        grids.append(grid)
    return grids


def grid_infotext(base: GenerationRequest, axes: list[Axis], cell_count: int, done: int) -> str:
    """A1111-style parameters text for the grid PNG: the base request's prompt, and the axes."""
    axis_text = "; ".join(f"{'XYZ'[i]}: {axis.kind} = {', '.join(axis.labels)}" for i, axis in enumerate(axes))
    negative = f"\nNegative prompt: {base.negative_prompt}" if base.negative_prompt.strip() else ""
    params = {
        "Seed": base.seed,
        "Sampler": base.sampler_name,
        "Schedule type": base.scheduler,
        "Steps": base.steps,
        "CFG scale": f"{base.cfg_scale:g}",
        "Grid": json.dumps(axis_text),
        "Cells": f"{done}/{cell_count}",
    }
    return f"{base.prompt}{negative}\n" + ", ".join(f"{k}: {v}" for k, v in params.items())


# Timelines ---------------------------------------------------------------------------------------


def export_timeline(frames: list[Image.Image], path: str | Path, *, frame_ms: int = 120) -> Path:
    """An animated GIF or WebP (by the file's suffix) of a run's per-step previews; the last frame holds."""
    path = Path(path)
    if not frames:
        raise InvalidRequestError("timeline", "no frames", "a run with previews (preview mode other than none)")
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".webp"):
        raise InvalidRequestError("timeline file", path.name, "a .gif or .webp file name")
    images = [frame.convert("RGB") for frame in frames]
    durations = [frame_ms] * (len(images) - 1) + [frame_ms * 8]
    options = {"lossless": False, "quality": 85} if suffix == ".webp" else {"optimize": False}
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0, **options)
    return path


# Presets -----------------------------------------------------------------------------------------

_PRESET_NAME = re.compile(r"^[\w][\w .+-]{0,63}$")


def list_presets(folder: Path) -> list[str]:
    return sorted(path.stem for path in Path(folder).glob("*.json"))


def load_preset(folder: Path, name: str) -> list[tuple[str, str]]:
    """A preset's axes as [(axis type, values text), ...]."""
    path = Path(folder) / f"{name}.json"
    if not _PRESET_NAME.match(name or "") or not path.is_file():
        raise InvalidRequestError("preset", name, ", ".join(list_presets(folder)) or "no presets saved")
    data = json.loads(path.read_text())
    return [(axis["type"], axis["values"]) for axis in data["axes"]]


def save_preset(folder: Path, name: str, axes: list[tuple[str, str]], description: str = "") -> Path:
    if not _PRESET_NAME.match(name or ""):
        raise InvalidRequestError(
            "preset name", name, "1-64 letters, digits, spaces, '.', '+', '-' or '_', not starting with a symbol"
        )
    for kind, _values in axes:
        if kind not in AXIS_TYPES:
            raise InvalidRequestError("axis type", kind, ", ".join(AXIS_TYPES))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    body = {"description": description, "axes": [{"type": k, "values": v} for k, v in axes if k != "Nothing"]}
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path
