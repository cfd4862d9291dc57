"""The Checkpoint Merger tab: A1111's merge of two or three checkpoints into a new one."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import gradio as gr

from engine import EngineError, MergeRequest, TaskStopped
from engine.merge import CHECKPOINT_FORMATS, INTERP_METHODS, NO_VAE, WEIGHTED_SUM

from .fields import FieldCheckbox, FieldDropdown, FieldRadio, FieldSlider
from .page_jobs import click_with_ticket, engine_error, reread_on_open, stop_session

log = logging.getLogger(__name__)


@dataclass
class MergeWidgets:
    primary: gr.Dropdown
    secondary: gr.Dropdown
    tertiary: gr.Dropdown
    custom_name: gr.Textbox
    multiplier: gr.Slider
    interp_method: gr.Radio
    checkpoint_format: gr.Radio
    save_as_half: gr.Checkbox
    bake_in_vae: gr.Dropdown
    save_metadata: gr.Checkbox
    run: gr.Button
    result: gr.Markdown
    stop: gr.Button
    # The session's ticket for a click waiting in the queue (Stop reaches it there).
    ticket: gr.State

    def inputs(self) -> list:
        return [
            self.primary,
            self.secondary,
            self.tertiary,
            self.interp_method,
            self.multiplier,
            self.save_as_half,
            self.custom_name,
            self.checkpoint_format,
            self.bake_in_vae,
            self.save_metadata,
        ]


def model_choices(engine) -> list[str]:
    return [info.title for info in engine.list_models()]


def vae_choices(engine) -> list[str]:
    return [NO_VAE, *engine.list_vaes()]


def build_merge_tab(engine) -> MergeWidgets:
    models = model_choices(engine)
    with gr.Row(equal_height=False):
        with gr.Column():
            gr.Markdown(
                "A new checkpoint from two or three, as A1111's merger makes it: *Weighted sum* is "
                "A·(1−M) + B·M, *Add difference* is A + (B − C)·M, *No interpolation* copies A (to bake in a VAE "
                f"or halve it). The result is written to {engine.registry.checkpoints_dir} and listed at once.",
                elem_id="merge_help",
            )
            # Custom values: a gradio_client caller may name a model, a file or a path, as the API takes them
            # (the engine refuses what it cannot find, by field).
            picker = dict(value=None, allow_custom_value=True)
            with gr.Row():
                primary = FieldDropdown(models, label="Primary model (A)", elem_id="merge_primary", **picker)
                secondary = FieldDropdown(models, label="Secondary model (B)", elem_id="merge_secondary", **picker)
                tertiary = FieldDropdown(models, label="Tertiary model (C)", elem_id="merge_tertiary", **picker)
            custom_name = gr.Textbox(
                label="Custom name (optional)",
                placeholder="A1111's name: 0.7(A) + 0.3(B), A + 0.3(B - C)",
                elem_id="merge_custom_name",
            )
            multiplier = FieldSlider(0, 1, value=0.3, step=0.05, label="Multiplier (M)", elem_id="merge_multiplier")
            interp_method = FieldRadio(
                list(INTERP_METHODS), value=WEIGHTED_SUM, label="Interpolation method", elem_id="merge_method"
            )
            with gr.Row():
                checkpoint_format = FieldRadio(
                    list(CHECKPOINT_FORMATS),
                    value=CHECKPOINT_FORMATS[0],
                    label="Checkpoint format",
                    info="Automatic: one .safetensors file for SD 1.x models (A1111 reads it), a diffusers "
                    "folder for the others",
                    elem_id="merge_format",
                )
                save_as_half = FieldCheckbox(False, label="Save as float16", elem_id="merge_half")
            with gr.Row():
                bake_in_vae = FieldDropdown(
                    vae_choices(engine), value=NO_VAE, label="Bake in VAE", elem_id="merge_bake_in_vae"
                )
                save_metadata = FieldCheckbox(True, label="Save the merge recipe", elem_id="merge_metadata")
            with gr.Row():
                run = gr.Button("Merge", variant="primary", elem_id="merge_run")
                stop = gr.Button("Stop", variant="stop", elem_id="merge_stop")
        with gr.Column():
            result = gr.Markdown("", elem_id="merge_result")
    return MergeWidgets(
        primary,
        secondary,
        tertiary,
        custom_name,
        multiplier,
        interp_method,
        checkpoint_format,
        save_as_half,
        bake_in_vae,
        save_metadata,
        run,
        result,
        stop,
        gr.State(None),
    )


def wire_merge_tab(widgets: MergeWidgets, engine, session, *, model_dropdown: gr.Dropdown, model_titles) -> None:
    """`model_titles()` is the checkpoint dropdown's list, refreshed with the new model in it; `session` the page's
    session state, whose Stop (this tab's, or a generation tab's) reaches the merge it started."""
    click_with_ticket(
        widgets.run,
        session,
        widgets.ticket,
        functools.partial(run_merge, engine, model_titles=model_titles),
        inputs=[session, *widgets.inputs(), widgets.ticket],
        outputs=[widgets.result, model_dropdown, widgets.primary, widgets.secondary, widgets.tertiary],
        concurrency_limit=1,
        concurrency_id="gpu",
        api_name="merge",
    )
    widgets.stop.click(stop_session, inputs=[session], concurrency_limit=None, api_name="merge_stop")
    for dropdown in (widgets.primary, widgets.secondary, widgets.tertiary):
        reread_on_open(dropdown, functools.partial(model_choices, engine))
    reread_on_open(widgets.bake_in_vae, functools.partial(vae_choices, engine))


def run_merge(
    engine,
    session,
    primary,
    secondary,
    tertiary,
    interp_method,
    multiplier,
    save_as_half,
    custom_name,
    checkpoint_format,
    bake_in_vae,
    save_metadata,
    ticket=None,
    *,
    model_titles,
):
    """The Merge button (also /merge for gradio_client): what was written, and the model lists with it. Stop (the
    session's) reaches a click still waiting in the queue through its `ticket`."""
    control = session.take_job(ticket)
    try:
        request = MergeRequest(
            primary_model_name=primary or "",
            secondary_model_name=secondary or "",
            tertiary_model_name=tertiary or "",
            interp_method=interp_method,
            multiplier=multiplier,
            save_as_half=bool(save_as_half),
            custom_name=custom_name or "",
            checkpoint_format=checkpoint_format,
            bake_in_vae=bake_in_vae or NO_VAE,
            save_metadata=bool(save_metadata),
        )
        merged = engine.merge_checkpoints(request, control=control)
    except TaskStopped as exc:
        return str(exc), gr.skip(), gr.skip(), gr.skip(), gr.skip()
    except EngineError as exc:
        raise engine_error(exc) from exc
    finally:
        session.end_job(control)
    what = "file" if merged.info.kind == "single_file" else "diffusers folder"
    text = (
        f"Checkpoint saved to `{merged.info.path}` ({what}): **{merged.info.title}**, {merged.merged_tensors} "
        f"tensors merged in {merged.seconds:.1f} s. Pick it in the checkpoint list to use it."
    )
    # Titles gain their hash once the merge has read the models: the picks are shown under their new titles.
    listed = model_choices(engine)
    picks = [_current_title(value, listed) for value in (primary, secondary, tertiary)]
    return text, gr.update(choices=model_titles()), *(gr.update(choices=listed, value=pick) for pick in picks)


def _current_title(value: str | None, titles: list[str]) -> str | None:
    bare = (value or "").split(" [", 1)[0]
    return next((title for title in titles if title.split(" [", 1)[0] == bare), None) if bare else None
