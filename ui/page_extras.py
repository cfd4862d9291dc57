"""The Extras tab: A1111's upscale of one picture, with the same upscalers as the hires fix."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import gradio as gr

from engine import EngineError, ExtrasRequest, TaskStopped
from engine.extras import SCALE_BY, SCALE_TO
from engine.extras import describe as describe_postprocessing
from engine.folder_batch import FolderBatchError, FolderPlan, write_outputs
from engine.infotext import read_infotext
from engine.request import PICTURE_UPSCALERS

from .fields import FieldCheckbox, FieldDropdown, FieldRadio, FieldSlider, PageError
from .page_folders import build_batch_folders, folder_plan
from .page_jobs import (
    FOLDER_BATCH_SHOWN,
    FolderReport,
    batch_pictures,
    click_with_ticket,
    engine_error,
    reread_on_open,
    stop_session,
)

log = logging.getLogger(__name__)


@dataclass
class ExtrasWidgets:
    image: gr.Image
    resize_mode: gr.Radio
    scale: gr.Slider
    width: gr.Slider
    height: gr.Slider
    crop: gr.Checkbox
    upscaler_1: gr.Dropdown
    upscaler_2: gr.Dropdown
    visibility: gr.Slider
    run: gr.Button
    stop: gr.Button
    result: gr.Image
    info: gr.Textbox
    # A1111's Batch Process: several pictures, each upscaled with the same settings.
    batch_files: gr.File
    batch_results: gr.Gallery
    # The session's ticket for a click waiting in the queue (Stop reaches it there).
    ticket: gr.State
    # A1111's Batch from Directory, where the server allows it: input, output, skip pictures already done.
    batch_folders: list[gr.components.Component] | None = None

    def inputs(self) -> list:
        return [
            self.image,
            self.resize_mode,
            self.scale,
            self.width,
            self.height,
            self.crop,
            self.upscaler_1,
            self.upscaler_2,
            self.visibility,
            self.batch_files,
        ]


def upscaler_choices(engine) -> list[str]:
    return [*PICTURE_UPSCALERS, *engine.list_upscalers()]


def build_extras_tab(engine, server_folders: bool = False) -> ExtrasWidgets:
    choices = upscaler_choices(engine)
    with gr.Row(equal_height=False):
        with gr.Column():
            # PNG, so that a picture's infotext (a result sent here, an uploaded PNG) reaches the job.
            image = gr.Image(
                type="pil",
                label="Source",
                sources=["upload", "clipboard"],
                format="png",
                elem_id="extras_image",
                height=360,
            )
            resize_mode = FieldRadio(
                [("Scale by", SCALE_BY), ("Scale to", SCALE_TO)],
                value=SCALE_BY,
                label="Resize",
                elem_id="extras_resize_mode",
            )
            scale = FieldSlider(1, 8, value=2, step=0.05, label="Scale by", elem_id="extras_upscaling_resize")
            # Shown for "Scale to" only, as A1111 shows one mode's settings at a time.
            with gr.Row(visible=False) as size_row:
                width = FieldSlider(64, engine.limits.max_side, value=512, step=8, label="Width", elem_id="extras_w")
                height = FieldSlider(64, engine.limits.max_side, value=512, step=8, label="Height", elem_id="extras_h")
                crop = FieldCheckbox(True, label="Crop to fit", elem_id="extras_crop")
            with gr.Row():
                upscaler_1 = FieldDropdown(choices, value="Lanczos", label="Upscaler 1", elem_id="extras_upscaler_1")
                upscaler_2 = FieldDropdown(choices, value="None", label="Upscaler 2", elem_id="extras_upscaler_2")
                visibility = FieldSlider(
                    0, 1, value=0, step=0.01, label="Upscaler 2 visibility", elem_id="extras_upscaler_2_visibility"
                )
            gr.Markdown(
                f"Upscaler models (ESRGAN, Real-ESRGAN, 4x-UltraSharp, ...) are read from {engine.upscaler_folders()}.",
                elem_id="extras_folders",
            )
            with gr.Accordion("Batch: several pictures", open=False, elem_id="extras_batch_box"):
                batch_files = gr.File(
                    file_count="multiple",
                    file_types=["image"],
                    label="Pictures (in place of Source), each upscaled with these settings",
                    elem_id="extras_batch_files",
                )
                batch_folders = build_batch_folders("extras", server_folders)
            with gr.Row():
                run = gr.Button("Upscale", variant="primary", elem_id="extras_generate")
                stop = gr.Button("Stop", variant="stop", elem_id="extras_stop")
        with gr.Column():
            result = gr.Image(type="pil", label="Result", interactive=False, format="png", elem_id="extras_result")
            info = gr.Textbox(label="Postprocessing", interactive=False, elem_id="extras_info")
            batch_results = gr.Gallery(
                label="Batch results", format="png", columns=4, interactive=False, elem_id="extras_batch_results"
            )
    resize_mode.change(
        lambda mode: (gr.update(visible=mode == SCALE_BY), gr.update(visible=mode == SCALE_TO)),
        inputs=[resize_mode],
        outputs=[scale, size_row],
        queue=False,
        api_visibility="private",
        show_progress="hidden",
    )
    return ExtrasWidgets(
        image,
        resize_mode,
        scale,
        width,
        height,
        crop,
        upscaler_1,
        upscaler_2,
        visibility,
        run,
        stop,
        result,
        info,
        batch_files,
        batch_results,
        gr.State(None),
        batch_folders,
    )


def wire_extras_tab(
    widgets: ExtrasWidgets, engine, session: gr.State, *, outputs_dir=None, save_image=None, server_folders=False
) -> None:
    """`save_image` and `outputs_dir` save results (outputs/extras-images) when the session saves images;
    `server_folders`: whether a batch may name folders of this machine (ServerSettings.server_folders)."""
    run = functools.partial(
        run_extras, engine, outputs_dir=outputs_dir, save_image=save_image, server_folders=server_folders
    )
    click_with_ticket(
        widgets.run,
        session,
        widgets.ticket,
        run,
        # The folders come after the ticket, so that a page without them still hands the ticket its place.
        inputs=[session, *widgets.inputs(), widgets.ticket, *(widgets.batch_folders or [])],
        outputs=[widgets.result, widgets.info, widgets.batch_results],
        concurrency_limit=1,
        concurrency_id="gpu",
        api_name="extras",
    )
    widgets.stop.click(stop_session, inputs=[session], concurrency_limit=None, api_name="extras_stop")
    for dropdown in (widgets.upscaler_1, widgets.upscaler_2):
        reread_on_open(dropdown, functools.partial(upscaler_choices, engine))


def run_extras(
    engine,
    session,
    image,
    resize_mode,
    scale,
    width,
    height,
    crop,
    upscaler_1,
    upscaler_2,
    visibility,
    batch_files=None,
    ticket=None,
    batch_input_dir="",
    batch_output_dir="",
    batch_skip_done=False,
    *,
    outputs_dir=None,
    save_image=None,
    server_folders=False,
):
    """The Extras button (also /extras for gradio_client): the upscaled picture, what was done to it, and with
    batch_files (several pictures, in place of image) every result as a gallery, the first shown as the picture.
    Saved to outputs/extras-images when this session saves images, with each source's infotext and what was
    done. Stop (the session's) ends it at the running upscale's next tile: the pictures finished before are
    kept and shown; it reaches a click still waiting in the queue through its `ticket`. batch_input_dir (A1111's
    Batch from Directory, where the server allows it) upscales every picture in that folder of the server and its
    subfolders, writing each under its own name into batch_output_dir (empty: the outputs folder);
    batch_skip_done leaves out those already there."""
    control = session.take_job(ticket)
    try:
        plan = folder_plan(
            server_folders,
            batch_input_dir,
            batch_output_dir,
            skip_done=batch_skip_done,
            refused_with={"uploaded batch files": bool(batch_files)},
        )
        pictures = batch_pictures(batch_files, "batch_files")
        if image is None and not pictures and plan is None:
            raise PageError("Upscale: drop a picture into Source first (or several into Batch).")
        settings = dict(
            resize_mode=resize_mode,
            upscaling_resize=scale,
            upscaling_resize_w=width,
            upscaling_resize_h=height,
            upscaling_crop=crop,
            upscaler_1=upscaler_1,
            upscaler_2=upscaler_2,
            extras_upscaler_2_visibility=visibility,
        )
        if plan is not None:
            return _upscale_folder(
                engine, session, plan, settings, control, outputs_dir=outputs_dir, save_image=save_image
            )
        sources, done, stopped = pictures or [image], [], ""
        for source in sources:
            try:
                done.append(
                    _upscale_one(
                        engine, session, source, settings, control, outputs_dir=outputs_dir, save_image=save_image
                    )
                )
            except TaskStopped as exc:
                stopped = str(exc)
                break
    finally:
        session.end_job(control)
    if not done:
        return gr.skip(), stopped, gr.skip()
    result, shown, _ = done[0]
    if stopped:
        shown = f"{stopped} Finished before the stop: {len(done)} of {len(sources)} pictures: {shown}"
    elif pictures:
        shown = f"{len(done)} pictures: {shown}"
    return result, shown, [picture for picture, *_ in done] if pictures else []


def _upscale_folder(engine, session, plan: FolderPlan, settings: dict, control, *, outputs_dir, save_image):
    """Batch from Directory: each picture of `plan` read in its turn, upscaled, and written under its own name to
    the plan's output folder (or saved where Extras saves); the first FOLDER_BATCH_SHOWN shown. A picture that
    cannot be read is left out; Stop ends the batch and the picture it cut is not written."""
    report, shown, stopped, started = FolderReport(plan, asked=len(plan.items)), [], "", time.monotonic()
    saver = dict(outputs_dir=outputs_dir, save_image=save_image) if plan.output_dir is None else {}
    for item in plan.items:
        if (opened := report.open(item)) is None:
            continue
        source = opened[0]
        try:
            result, _, saved = _upscale_one(engine, session, source, settings, control, **saver)
        except TaskStopped as exc:
            report.not_written.append(item.relative)
            stopped = f"{exc} "
            break
        report.ran += 1
        if plan.output_dir is not None:
            infotext, postprocessing = result.info.get("parameters"), result.info.get("postprocessing")
            try:
                report.written += len(write_outputs(item, plan.output_dir, [result], [infotext], postprocessing))
            except FolderBatchError as exc:
                raise PageError(f"{exc}. {report.describe()}") from exc
        elif saved is not None:
            report.written += 1
        if len(shown) < FOLDER_BATCH_SHOWN:
            shown.append(result)
    report.seconds = time.monotonic() - started
    if not shown:
        if stopped:
            return gr.skip(), stopped + report.describe(), gr.skip()
        raise PageError(f"Nothing was upscaled. {report.describe()}")
    return shown[0], stopped + report.describe(), shown


def _upscale_one(engine, session, image, settings: dict, control, *, outputs_dir=None, save_image=None):
    """One picture upscaled, with the text the Postprocessing box shows and where it was saved (None: not saved);
    TaskStopped where `control` stopped it."""
    try:
        result, info = engine.upscale(ExtrasRequest(image=image, **settings), control=control)
    except TaskStopped:
        raise
    except EngineError as exc:
        raise engine_error(exc) from exc
    text = describe_postprocessing(info)
    source_infotext = read_infotext(image)
    # The shown result keeps both texts, so that its download button gives the PNG a saved copy would be.
    if source_infotext:
        result.info["parameters"] = source_infotext
    if text:
        result.info["postprocessing"] = text
    path = None
    if info and session.save_images and save_image is not None and outputs_dir is not None:
        path = save_image(
            result, source_infotext, outputs_dir=outputs_dir, mode="extras", seed=None, postprocessing=text
        )
        log.info("Saved %s", path)
    shown = text or "Upscaler 1 is None: the picture is unchanged."
    saved = f", saved as {path.name}" if path is not None else ""
    return result, f"{shown} ({result.width}x{result.height}{saved})", path
