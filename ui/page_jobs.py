"""What the page's event handlers do, without the layout: widgets -> GenerationRequest, events -> updates.

Nothing here generates anything: requests go to `Engine.generate` and its Progress/Result events come
back as Gradio updates. Per-user state lives in a PageSession held by gr.State (one per browser
session), never in module globals.
"""

from __future__ import annotations

import dataclasses
import html
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from engine import (
    EngineError,
    GenerationRequest,
    InvalidRequestError,
    JobControl,
    PreviewSettings,
    Progress,
    Result,
    Waiting,
)
from engine.events import PREVIEW_MODES, Pacer
from engine.folder_batch import FolderBatchError, FolderItem, FolderPlan, with_png_info, write_outputs
from engine.grids import batch_grid
from engine.hypernet import with_added_hypernet
from engine.previews import preview_to_display
from engine.request import default_job_settings, with_clip_skip
from engine.samplers import get_sampler

from .fields import PageError

log = logging.getLogger(__name__)

CHUNK_TOKENS = 75
# Largest side of the live preview as shown; previews are latent-sized (1/8) and upscaled for display.
PREVIEW_DISPLAY_SIDE = 512
MASK_MODES = ("Inpaint masked", "Inpaint not masked")
# Page updates while a job runs, at most one per this many seconds (10 a second): smooth to watch, and
# a fast model (50+ steps a second) does not flood the browser and a shared link with an image per step.
LIVE_UPDATE_INTERVAL_S = 0.1
# A folder batch's gallery shows its first pictures only (A1111's img2img_batch_show_results_limit).
FOLDER_BATCH_SHOWN = 32


@dataclass
class PageSession:
    """One browser session's own settings and running jobs. Another user never sees this object."""

    preview_mode: str = "approx"
    preview_every: int = 1
    save_images: bool = False
    # A1111's batch grid (its "Show grid in gallery" and "Always save all generated image grids", both on there).
    batch_grid: bool = True
    prompt_syntax: str = "a1111"
    emphasis: str = "Original"
    # A1111's SD VAE for this session's jobs: Automatic, None or a file in the VAE folder.
    sd_vae: str = "Automatic"
    # A1111's eta of ancestral and SDE samplers and of DDIM.
    eta_ancestral: float = 1.0
    eta_ddim: float = 0.0
    # A1111's other job settings (ENSD, sigma noise, the img2img noise multipliers, colour correction, NGMS, Skip
    # Early CFG, the inpainting mask weight), by request field: see engine.request.JOB_SETTINGS.
    job_settings: dict[str, Any] = field(default_factory=default_job_settings)
    # A1111's "Clip skip" (CLIP_stop_at_last_layers): 1 is the text encoder's last layer.
    clip_skip: int = 1
    # A1111's "Add hypernetwork to prompt" ("None" or a hypernetwork's name) and the strength it adds it at.
    sd_hypernetwork: str = "None"
    extra_networks_default_multiplier: float = 1.0
    # Jobs this session queued or started and that have not ended, by job id: Stop interrupts these only.
    running: dict[int, JobControl] = field(default_factory=dict)

    def preview_settings(self, *, keep_every_frame: bool = False) -> PreviewSettings:
        """This session's previews, no more often than the page is updated unless `keep_every_frame`
        (a comparison keeps each step's preview for its timeline)."""
        interval = 0.0 if keep_every_frame else LIVE_UPDATE_INTERVAL_S
        return PreviewSettings(mode=self.preview_mode, every=self.preview_every, min_interval_s=interval)

    def settings_for(self, request: GenerationRequest) -> GenerationRequest:
        """`request` with this session's prompt syntax, emphasis mode, SD VAE, its sampler's eta, the job settings,
        clip skip and the hypernetwork it adds to every prompt."""
        try:
            spec = get_sampler(request.sampler_name)
        except EngineError:
            spec = None  # refused by name when the job is checked
        eta = None
        if spec is not None and spec.eta_default is not None:
            chosen = getattr(self, spec.eta_option)  # this session's eta_ancestral or eta_ddim
            # Left to each sampler's default unless changed: a Compare grid may switch samplers.
            eta = None if chosen == spec.eta_default else chosen
        return dataclasses.replace(
            request,
            prompt=with_added_hypernet(request.prompt, self.sd_hypernetwork, self.extra_networks_default_multiplier),
            prompt_syntax=self.prompt_syntax,
            emphasis=self.emphasis,
            sd_vae=self.sd_vae,
            eta=eta,
            **self.job_settings,
            extra_params=with_clip_skip(request.extra_params, self.clip_skip),
        )

    def start_job(self) -> JobControl:
        """A control for a job about to be queued or run; Stop reaches it from now on."""
        control = JobControl()
        self.running[control.job_id] = control
        return control

    def register(self) -> int:
        """A ticket for a click about to be queued (its first, unqueued event): Stop reaches the job from now on,
        also while it waits in the queue; the queued event takes it with take_job."""
        return self.start_job().job_id

    def take_job(self, ticket: int | None) -> JobControl:
        """The control registered when Generate was clicked (so Stop works while queued), else a new one."""
        control = self.running.get(ticket) if ticket is not None else None
        return control if control is not None else self.start_job()

    def end_job(self, control: JobControl) -> None:
        self.running.pop(control.job_id, None)

    def skip(self, running_job_id: int | None) -> bool:
        """Cut the running batch of this session's job `running_job_id` short (the job the device runs now);
        False when that job is not this session's."""
        control = self.running.get(running_job_id) if running_job_id is not None else None
        if control is None:
            return False
        control.skip()
        return True

    def stop(self) -> int:
        """Interrupt this session's queued and running jobs; returns how many were asked to stop."""
        controls = list(self.running.values())
        for control in controls:
            control.interrupt()
        return len(controls)


@dataclass
class ResultView:
    """What the page remembers of a tab's last result, for the gallery's selection and Send-to buttons."""

    seeds: list[int] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    selected: int = 0
    subseeds: list[int] = field(default_factory=list)

    def selected_infotext(self) -> str:
        if not self.infotexts:
            return ""
        return self.infotexts[min(self.selected, len(self.infotexts) - 1)]

    def selected_seed(self) -> int | None:
        if not self.seeds:
            return None
        return self.seeds[min(self.selected, len(self.seeds) - 1)]

    def selected_subseed(self) -> int | None:
        if not self.subseeds:
            return None
        return self.subseeds[min(self.selected, len(self.subseeds) - 1)]


ERROR_TITLES = {"InvalidRequestError": "Invalid setting", "ModelLoadError": "Model not loaded"}


def engine_error(exc: EngineError) -> PageError:
    """The engine's message names the field, the value and what is allowed: show it as it is."""
    return PageError(str(exc), title=ERROR_TITLES.get(type(exc).__name__, "Error"))


def stop_session(session: PageSession) -> None:
    """A tab's Stop (Extras, Checkpoint Merger): this session's queued and running work stops, its generations too;
    each stops where it can (a generation at its next step, an upscale at its next tile, a merge at its next tensor,
    a queued one before it starts)."""
    session.stop()


def click_with_ticket(button: gr.Button, session: gr.State, ticket: gr.State, handler, **queued):
    """Wire `button` to `handler` as a job in the device's queue whose Stop reaches it while it waits there: a quick
    unqueued event registers a ticket with the session, and the queued one (`queued` its event settings; its
    inputs hold `ticket`) takes it."""
    registered = button.click(
        lambda session: session.register(),
        inputs=[session],
        outputs=[ticket],
        queue=False,
        api_visibility="private",
        show_progress="hidden",
    )
    return registered.then(handler, **queued)


def reread_on_open(dropdown: gr.Dropdown, choices) -> None:
    """`choices()` (a folder's listing) read again whenever `dropdown` is opened, so a file added while the page
    is open is there."""
    dropdown.focus(
        lambda: gr.update(choices=choices()),
        outputs=[dropdown],
        queue=False,
        api_visibility="private",
        show_progress="hidden",
    )


# Requests -------------------------------------------------------------------------------------


def build_request(
    *,
    prompt: str,
    negative_prompt: str,
    sampler_name: str,
    scheduler: str,
    steps: Any,
    cfg_scale: Any,
    seed: Any,
    width: Any,
    height: Any,
    n_iter: Any,
    batch_size: Any,
    init_image: Image.Image | None = None,
    mask: Image.Image | None = None,
    denoising_strength: Any = 0.75,
    mask_blur: Any = 4,
    mask_mode: str = MASK_MODES[0],
    resize_mode: Any = 0,
    styles: list[str] | None = None,
    seed_extra: bool = False,
    subseed: Any = -1,
    subseed_strength: Any = 0,
    seed_resize_from_w: Any = 0,
    seed_resize_from_h: Any = 0,
) -> GenerationRequest:
    """Widget values as a request; the engine validates every field (and names the bad one). The variation
    seed and seed resize apply only with `seed_extra` ticked, as A1111's "Extra" box works."""
    if not seed_extra:
        subseed, subseed_strength, seed_resize_from_w, seed_resize_from_h = -1, 0, 0, 0
    return GenerationRequest(
        prompt=prompt or "",
        negative_prompt=negative_prompt or "",
        sampler_name=sampler_name,
        scheduler=scheduler,
        steps=steps,
        cfg_scale=cfg_scale,
        seed=-1 if seed is None else seed,
        width=width,
        height=height,
        n_iter=n_iter,
        batch_size=batch_size,
        init_images=[init_image] if init_image is not None else None,
        mask=mask,
        denoising_strength=denoising_strength,
        mask_blur=mask_blur,
        inpainting_mask_invert=1 if mask_mode == MASK_MODES[1] else 0,
        resize_mode=0 if resize_mode is None else resize_mode,
        styles=list(styles) if styles else None,
        subseed=-1 if subseed is None else subseed,
        subseed_strength=0 if subseed_strength is None else subseed_strength,
        seed_resize_from_w=seed_resize_from_w or 0,
        seed_resize_from_h=seed_resize_from_h or 0,
    )


def with_hires(request: GenerationRequest, enable_hr, *hires_values) -> GenerationRequest:
    """`request` with the Hires. fix panel's values, in its order: enable, upscaler, hires steps, denoising
    strength, upscale by, resize width and height, sampler, schedule type, prompt, negative prompt, checkpoint."""
    upscaler, steps, strength, scale, resize_x, resize_y, sampler, schedule, prompt, negative, checkpoint = hires_values
    return dataclasses.replace(
        request,
        enable_hr=bool(enable_hr),
        hr_upscaler=upscaler,
        hr_second_pass_steps=steps,
        denoising_strength=strength,
        hr_scale=scale,
        hr_resize_x=resize_x,
        hr_resize_y=resize_y,
        hr_sampler_name=sampler or "",
        hr_scheduler=schedule or "",
        hr_prompt=prompt or "",
        hr_negative_prompt=negative or "",
        hr_checkpoint_name=checkpoint or "",
    )


def batch_pictures(paths: list[str] | None, field: str) -> list[Image.Image]:
    """A batch's uploaded files as RGB pictures (their PNG text kept); gr.Error naming `field` and a file that is
    no picture."""
    pictures = []
    for path in paths or []:
        try:
            with Image.open(path) as opened:
                pictures.append(opened.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise PageError(f"{field}: got {Path(path).name!r}; allowed: pictures (PNG, JPEG, WebP) ({exc})") from exc
    return pictures


def editor_image_and_mask(editor_value: dict | None) -> tuple[Image.Image | None, Image.Image | None]:
    """The picture under the paint, and the mask: what was painted on any layer (white = repaint)."""
    if not editor_value:
        return None, None
    background = editor_value.get("background")
    if background is None:
        background = editor_value.get("composite")
    if background is None:
        return None, None
    background = background.convert("RGB")
    mask = None
    for layer in editor_value.get("layers") or []:
        if layer is None:
            continue
        alpha = layer.convert("RGBA").getchannel("A")
        if alpha.getextrema()[1] == 0:
            continue  # an empty layer
        if alpha.size != background.size:
            alpha = alpha.resize(background.size, Image.Resampling.NEAREST)
        mask = alpha if mask is None else Image.fromarray(np.maximum(np.asarray(mask), np.asarray(alpha)))
    return background, mask


def editor_composite(editor_value: dict | None) -> Image.Image | None:
    """The picture an image editor shows, strokes and all, on white where nothing is (a blank canvas); None when
    it holds neither a picture nor a stroke."""
    if not editor_value:
        return None
    composite = editor_value.get("composite")
    if composite is None:
        background, _ = editor_image_and_mask(editor_value)
        return background
    flat = Image.new("RGBA", composite.size, (255, 255, 255, 255))
    flat.alpha_composite(composite.convert("RGBA"))
    return flat.convert("RGB")


# Display ---------------------------------------------------------------------------------------


def token_counter_html(counts: list[int]) -> str:
    """A1111's counter: tokens used / room in the chunks so far, e.g. "12/75" or "80/150"."""
    counts = counts or [0]
    used = sum(counts)
    room = CHUNK_TOKENS * max(1, len(counts))
    chunks = " + ".join(str(count) for count in counts)
    title = f"{len(counts)} chunk(s) of {CHUNK_TOKENS} tokens: {chunks}"
    return f'<span class="token-count" title="{html.escape(title)}">{used}/{room}</span>'


def prompt_reading_html(readings, *, label: str) -> str:
    """Each stretch of steps with the prompt's fragments and their weights, as the engine reads them."""
    if not readings:
        return ""
    parts = [f'<div class="prompt-reading"><div class="prompt-reading-label">{html.escape(label)}</div>']
    for reading in readings:
        if len(readings) > 1:
            steps = f"steps {reading.first_step + 1}-{reading.last_step + 1}"
            parts.append(f'<div class="prompt-reading-steps">{steps}</div>')
        pieces = []
        for text, weight in reading.fragments:
            if weight == -1.0 and text == "BREAK":
                pieces.append('<span class="prompt-break">BREAK</span>')
            elif text:
                tone = "up" if weight > 1 else "down" if weight < 1 else "plain"
                title = f"weight {weight:.3g}"
                badge = f"<sub>{weight:.3g}</sub>" if weight != 1 else ""
                pieces.append(f'<span class="prompt-fragment {tone}" title="{title}">{html.escape(text)}{badge}</span>')
        counts = " + ".join(str(count) for count in reading.token_counts)
        chunks = f'<span class="prompt-chunks">tokens per chunk: {counts}</span>' if counts else ""
        parts.append(f'<div class="prompt-reading-line">{"".join(pieces) or "<i>empty</i>"} {chunks}</div>')
    parts.append("</div>")
    return "".join(parts)


def lora_reading_html(uses) -> str:
    """The LoRAs the prompt switches on, each with its text encoder and UNet weights."""
    if not uses:
        return ""
    items = ", ".join(
        f'<span class="prompt-fragment plain">{html.escape(use.name)}</span>: '
        f"text encoder {use.text_encoder:.3g}, UNet {use.unet:.3g}"
        for use in uses
    )
    return f'<div class="prompt-reading"><div class="prompt-reading-label">LoRAs</div>{items}</div>'


def hypernet_reading_html(uses) -> str:
    """The hypernetworks the prompt switches on, each with its strength."""
    if not uses:
        return ""
    items = ", ".join(
        f'<span class="prompt-fragment plain">{html.escape(use.name)}</span>: strength {use.strength:.3g}'
        for use in uses
    )
    return f'<div class="prompt-reading"><div class="prompt-reading-label">Hypernetworks</div>{items}</div>'


def progress_html(fraction: float, text: str, *, state: str = "running", job_id: int | None = None) -> str:
    """A bar and one line of text; `state` is running, done, interrupted or idle (a CSS class)."""
    percent = max(0.0, min(1.0, fraction)) * 100
    job = f' data-job="{job_id}"' if job_id is not None else ""
    return (
        f'<div class="job-progress {state}"{job}>'
        f'<div class="job-progress-track"><div class="job-progress-fill" style="width: {percent:.1f}%"></div></div>'
        f'<div class="job-progress-text">{html.escape(text)}</div></div>'
    )


def describe_progress(event: Progress) -> str:
    parts = []
    if event.batch_count > 1:
        parts.append(f"batch {event.batch_no + 1}/{event.batch_count}")
    parts.append(f"step {event.step}/{event.total}")
    if event.it_per_s > 0:
        parts.append(f"{event.it_per_s:.2f} it/s")
    parts.append(f"ETA {event.eta:.1f} s")
    return ", ".join(parts)


def describe_waiting(event: Waiting) -> str:
    """Why a job that left the page's queue has not started: the device is busy with a job the queue
    does not hold (one sent to the REST API) or with loading a model."""
    ahead = event.ahead
    if not ahead.running:
        return "Waiting for the device (a model is loading, or a job is ending)..."
    # What runs ahead, what its steps are, and what its batches are.
    job, step, batch = {
        "extras": ("an upscale", "tile", "upscaler"),
        "merge": ("a checkpoint merge", "tensor", ""),
    }.get(ahead.mode, ("another job", "step", "batch"))
    where = f"{step} {ahead.step}/{ahead.total}" if ahead.total else "starting"
    if ahead.batch_count > 1:
        where = f"{batch} {ahead.batch_no + 1}/{ahead.batch_count}, {where}"
    return f"Waiting for {job} to finish ({where}, ETA {ahead.eta:.1f} s)..."


def describe_result(result: Result) -> str:
    count = len(result.images)
    noun = "image" if count == 1 else "images"
    seeds = ", ".join(str(seed) for seed in result.seeds[:4]) + (" ..." if len(result.seeds) > 4 else "")
    text = f"{count} {noun} in {result.elapsed:.1f} s"
    if seeds:
        text += f", seed {seeds}"
    if result.interrupted:
        text = f"Stopped: {text}" if count else "Stopped before it started"
    elif result.skipped_batches:
        text += f" (skipped batch {', '.join(str(n + 1) for n in result.skipped_batches)})"
    return text


def params_table_html(params: dict[str, str]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(key)}</th><td>{html.escape(value)}</td></tr>" for key, value in params.items()
    )
    return f'<table class="png-params">{rows}</table>'


# Running a job -----------------------------------------------------------------------------------


def run_job(
    engine,
    session: PageSession,
    request: GenerationRequest | list[GenerationRequest],
    *,
    ticket: int | None = None,
    mode: str,
    outputs_dir: Path | None,
    save_image=None,
    unit: str = "prompt",
    grid: Callable[[list[Result]], Result | None] | None = None,
) -> Iterator[tuple]:
    """Iterate engine.generate and yield page updates: previews and progress, then the results.

    Each update is a plain (preview image, progress HTML, gallery, infotext, result view) tuple, so
    gradio_client users get values, not update dicts. While running, the gallery is empty and the
    preview holds the latest preview; the last update has the gallery and no preview. `ticket` is the
    job id PageSession.start_job gave when Generate was clicked (None for API calls). A list of requests
    (a prompt list, a batch of pictures: `unit` says which) runs one after another, all checked first, into
    one gallery; Stop ends the list. `grid` makes a grid of the results (a prompt matrix's, a loopback's; by
    default, with the session's batch grid on, a batch's), shown first in the gallery and saved to the grids folder.

    On the page (a `ticket`), the gallery, infotext and result view are left as they are until results come,
    and a job stopped before it started leaves them as they were: the last pictures stay, as in A1111.
    """
    requests = request if isinstance(request, list) else [request]
    if grid is None and session.batch_grid and not isinstance(request, list):  # a list has no grid, as in A1111
        grid = batch_grid
    control = session.take_job(ticket)
    # A list's jobs all run on the model loaded when it starts, whatever another user switches to meanwhile.
    checkpoint = engine.model.path if len(requests) > 1 else None
    feed = _LiveFeed(engine, session, control, on_page=ticket is not None, checkpoint=checkpoint)
    results: list[Result] = []
    try:
        validated_all = [engine.validate(session.settings_for(each)) for each in requests]
        yield feed.update("Starting...")
        for number, validated in enumerate(validated_all, start=1):
            if control.interrupted and results:
                break
            result = yield from feed.generate(validated, number, len(validated_all), unit)
            results.append(result)
            # Saved as each job ends, so a later line's failure loses nothing made before it.
            if session.save_images and save_image is not None and outputs_dir is not None:
                _save_all(result, save_image, outputs_dir=outputs_dir, mode=mode)
    except EngineError as exc:
        if results:  # a list that failed part-way: what it made stays in the gallery under the error
            yield _final_update(results, len(requests), unit, feed.fraction, grid(results) if grid else None)
        raise engine_error(exc) from exc
    finally:
        session.end_job(control)
    if not results:  # the engine always ends with a Result; this guards the page, not the engine
        raise gr.Error("The job ended without a result.")
    grid_made = grid(results) if grid else None
    if grid_made is not None and session.save_images and save_image is not None and outputs_dir is not None:
        _save_all(grid_made, save_image, outputs_dir=outputs_dir, mode=f"{mode}-grids")
    final = _final_update(results, len(requests), unit, feed.fraction, grid_made)
    if ticket is not None and not any(result.images for result in results):
        final = (*final[:2], gr.skip(), gr.skip(), gr.skip())  # stopped before it started: keep the last pictures
    yield final


@dataclass
class _LiveFeed:
    """The page updates of a job's generations: its progress bar and live preview, paced to
    LIVE_UPDATE_INTERVAL_S. On the page (a ticket) the gallery and infotext are left alone while it runs;
    API callers get empty values for them."""

    engine: Any
    session: PageSession
    control: JobControl
    on_page: bool
    # The model each of the feed's jobs runs on (None: the one loaded when it starts).
    checkpoint: str | None = None
    fraction: float = 0.0
    shown: Image.Image | None = None
    sent: Image.Image | None = None
    stop_shown: bool = False
    pacer: Pacer = field(default_factory=lambda: Pacer(LIVE_UPDATE_INTERVAL_S))

    def update(self, text: str, preview: Any = None, fraction: float | None = None) -> tuple:
        gallery, infotext = (gr.skip(), gr.skip()) if self.on_page else ([], "")
        bar = progress_html(self.fraction if fraction is None else fraction, text, job_id=self.control.job_id)
        return preview, bar, gallery, infotext, gr.skip()

    def generate(
        self, validated: GenerationRequest, number: int, count: int, unit: str, name: str | None = None
    ) -> Iterator[tuple]:
        """Run one validated request, yielding page updates; returns its Result (`number` of `count` units,
        shown by `name` when it has one)."""
        control = self.control
        if name is not None:
            prefix = f"{name} ({number}/{count}): "
        else:
            prefix = f"{unit.capitalize()} {number}/{count}: " if count > 1 else ""
        width, height = validated.width, validated.height
        result = None
        preview = self.session.preview_settings()
        for event in self.engine.generate(validated, control=control, preview=preview, checkpoint=self.checkpoint):
            if isinstance(event, Waiting):
                text = "Stopping..." if control.interrupted else prefix + describe_waiting(event)
                yield self.update(text, fraction=0.0)
            elif isinstance(event, Progress):
                self.fraction = (number - 1 + event.fraction) / count
                text = prefix + describe_progress(event)
                if control.interrupted:
                    text = f"Stopping... {text}"
                if event.preview is not None:
                    self.shown = preview_to_display(event.preview, width, height, PREVIEW_DISPLAY_SIDE)
                # Previews come paced by the engine; progress-only steps in between are dropped.
                force = event.preview is not None or event.step == event.total or control.interrupted != self.stop_shown
                if self.pacer.ready(force=force):
                    self.stop_shown = control.interrupted
                    # A preview already on the page is not sent again: it would cost its bytes once more,
                    # and gradio rewrites its cached file while the browser may still be reading it. API
                    # callers get the latest preview in every update, as a value (a skip reaches them as a dict).
                    unchanged = self.on_page and self.shown is not None and self.shown is self.sent
                    preview_update = gr.skip() if unchanged else self.shown
                    self.sent = self.shown
                    yield self.update(text, preview_update)
            elif isinstance(event, Result):
                result = event
        if result is None:  # the engine always ends with a Result; this guards the page, not the engine
            raise gr.Error("The job ended without a result.")
        return result


def run_folder_batch(
    engine,
    session: PageSession,
    plan: FolderPlan,
    make_request: Callable[[Image.Image, Image.Image | None], GenerationRequest],
    *,
    ticket: int | None = None,
    mode: str,
    outputs_dir: Path | None,
    save_image=None,
    png_info: Sequence[str] = (),
    shown_limit: int = FOLDER_BATCH_SHOWN,
) -> Iterator[tuple]:
    """A1111's img2img Batch from folders: one job per picture of `plan` (make_request turns a picture and its
    mask into the request), each picture read only when its turn comes, so a folder of thousands of frames is
    never all in memory. Results go to the plan's output folder under the picture's name (or, without one, where
    pictures are saved normally); the gallery shows the first `shown_limit` pictures (A1111 shows 32). `png_info`
    names what to take from each picture's own infotext (engine.folder_batch.with_png_info); a picture without a
    readable one keeps the tab's settings, and is named at the end.

    A picture that cannot be read is left out and named at the end, as A1111 goes on past it. Stop ends the
    batch; the picture it stopped is not written, nor one cut short by Skip, so a rerun with "skip pictures
    already done" makes exactly those."""
    control = session.take_job(ticket)
    # Every picture of the folder on the model loaded when the batch starts, whatever another user switches to.
    feed = _LiveFeed(engine, session, control, on_page=ticket is not None, checkpoint=engine.model.path)
    shown: list[Result] = []
    report = FolderReport(plan, asked=len(plan.items))
    try:
        yield feed.update("Starting...")
        for number, item in enumerate(plan.items, start=1):
            if control.interrupted and report.ran:
                break
            if (opened := report.open(item)) is None:
                continue
            request = make_request(*opened)
            if png_info:
                request = _with_png_info(request, item, opened[0], png_info, report)
            validated = engine.validate(session.settings_for(request))
            result = yield from feed.generate(validated, number, len(plan.items), "picture", item.relative.as_posix())
            if result.interrupted and not result.images:
                break  # stopped before this picture began
            report.ran += 1
            report.seconds += result.elapsed
            if len(shown) < shown_limit:
                shown.append(result)
            if result.interrupted or result.skipped_batches:
                report.not_written.append(item.relative)
            elif plan.output_dir is not None:
                report.written += len(write_outputs(item, plan.output_dir, result.images, result.infotexts))
            elif session.save_images and save_image is not None and outputs_dir is not None:
                _save_all(result, save_image, outputs_dir=outputs_dir, mode=mode)
                report.written += len(result.images)
    except (EngineError, FolderBatchError) as exc:
        if shown:
            yield _results_update(shown, report.describe(), feed.fraction, stopped=True)
        raise engine_error(exc) if isinstance(exc, EngineError) else PageError(f"{exc}. {report.describe()}") from exc
    finally:
        session.end_job(control)
    if not report.ran and control.interrupted:
        # Stopped before its first picture began: the last pictures stay on the page, as run_job leaves them.
        bar = progress_html(0.0, f"Stopped before it started. {report.describe()}", state="interrupted")
        yield (None, bar, *((gr.skip(),) * 3 if ticket is not None else ([], "", gr.skip())))
        return
    if not report.ran:
        raise PageError(f"Nothing was made. {report.describe()}")
    stopped = control.interrupted or bool(report.not_written)
    summary = f"Stopped: {report.describe()}" if control.interrupted else report.describe()
    yield _results_update(shown, summary, 1.0 if not stopped else feed.fraction, stopped)


@dataclass
class FolderReport:
    """What a folder batch did, for its last progress line."""

    plan: FolderPlan
    asked: int
    ran: int = 0
    written: int = 0
    seconds: float = 0.0
    unreadable: list[Path] = field(default_factory=list)
    not_written: list[Path] = field(default_factory=list)
    without_info: list[Path] = field(default_factory=list)

    def open(self, item: FolderItem) -> tuple[Image.Image, Image.Image | None] | None:
        """`item`'s picture and mask; None where it cannot be read, which is named at the end (A1111 goes on)."""
        try:
            return item.open()
        except FolderBatchError as exc:
            log.warning("Folder batch: %s", exc)
            self.unreadable.append(item.relative)
            return None

    def describe(self) -> str:
        plan = self.plan
        where = f" to {plan.output_dir}" if plan.output_dir is not None else ""
        text = (
            f"{self.ran} of {self.asked} picture{'s' if self.asked != 1 else ''} in {self.seconds:.1f} s; "
            f"{self.written} image{'s' if self.written != 1 else ''} written{where}"
        )
        notes = [
            (len(self.not_written), "stopped or skipped, not written", self.not_written),
            (len(self.unreadable), "unreadable", self.unreadable),
            (len(self.without_info), "without PNG info, the tab's settings used", self.without_info),
            (len(plan.without_mask), "without a mask, left out", plan.without_mask),
            (len(plan.done_before), "already done, left out", plan.done_before),
        ]
        for count, what, names in notes:
            if count:
                listed = ", ".join(name.as_posix() for name in names[:3]) + (", ..." if count > 3 else "")
                text += f"; {count} {what} ({listed})"
        return text


def _with_png_info(
    request: GenerationRequest, item: FolderItem, picture: Image.Image, parameters: Sequence[str], report: FolderReport
):
    text = item.infotext(picture)
    try:
        if text:
            return with_png_info(request, text, parameters)
    except InvalidRequestError as exc:
        log.warning("Folder batch: the PNG info of %s cannot be read (%s); the tab's settings are used", item.path, exc)
    report.without_info.append(item.relative)
    return request


def _final_update(results: list[Result], asked: int, unit: str, fraction: float, grid: Result | None = None) -> tuple:
    """The last update of a job (run_job): its results, said in a line, as far as it got when stopped."""
    interrupted = any(result.interrupted for result in results)
    summary = describe_result(results[-1]) if asked == 1 else _describe_results(results, asked, unit)
    return _results_update(results, summary, fraction if interrupted else 1.0, interrupted, grid)


def _results_update(
    results: list[Result], summary: str, fraction: float, stopped: bool, grid: Result | None = None
) -> tuple:
    """An update showing `results`: the gallery of their pictures (a `grid` of them first), the first one's infotext
    and the progress bar at `fraction` with `summary`."""
    shown = [grid, *results] if grid is not None else results
    view = ResultView(
        seeds=[seed for result in shown for seed in result.seeds],
        infotexts=[text for result in shown for text in result.infotexts],
        # Send to and Reuse seed take the first picture, not its grid, until another is picked.
        selected=1 if grid is not None else 0,
        subseeds=[subseed for result in shown for subseed in result.subseeds],
    )
    gallery = [(image, _caption(result, index)) for result in results for index, image in enumerate(result.images)]
    if grid is not None:
        gallery.insert(0, (grid.images[0], "Grid"))
    bar = progress_html(fraction, summary, state="interrupted" if stopped else "done")
    return None, bar, gallery, view.selected_infotext(), view


def _describe_results(results: list[Result], asked: int, unit: str) -> str:
    images = sum(len(result.images) for result in results)
    seconds = sum(result.elapsed for result in results)
    ran = f"{len(results)} of {asked} {unit}s" if len(results) < asked else f"{asked} {unit}s"
    stopped = ", stopped" if any(result.interrupted for result in results) else ""
    return f"{ran}: {images} image{'s' if images != 1 else ''} in {seconds:.1f} s{stopped}"


def _caption(result: Result, index: int) -> str:
    caption = f"Seed {result.seeds[index]}"
    if result.request.subseed_strength > 0 and index < len(result.subseeds):
        caption += f", variation {result.subseeds[index]}"
    return caption


def _save_all(result: Result, save_image, *, outputs_dir: Path, mode: str) -> None:
    for image, infotext, seed in zip(result.images, result.infotexts, result.seeds, strict=True):
        try:
            path = save_image(image, infotext, outputs_dir=outputs_dir, mode=mode, seed=seed)
            log.info("Saved %s", path)
        except (OSError, EngineError) as exc:
            log.warning("Could not save image for seed %s: %s", seed, exc)
            gr.Warning(f"Could not save the image for seed {seed}: {exc}")


def valid_preview_mode(mode: str) -> str:
    if mode not in PREVIEW_MODES:
        raise PageError(f"preview mode: got {mode!r}; allowed: one of {', '.join(PREVIEW_MODES)}")
    return mode
