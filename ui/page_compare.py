"""The Compare tab: X/Y/Z grids over samplers, steps, CFG, ... at the txt2img tab's settings and seed.

The grid logic lives in engine.compare; this module only turns widgets into axes and grid events into
page updates. Each browser session keeps its own Comparer (its cached convergence references) and
its last grid's cells (for the timeline and Send to txt2img).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import pandas as pd
from PIL import Image

from engine import EngineError
from engine.compare import (
    AXIS_TYPES,
    Comparer,
    GridProgress,
    GridResult,
    convergence_table,
    export_timeline,
    list_presets,
    load_preset,
    parse_axis,
    save_preset,
)
from engine.events import Pacer
from engine.images import encode_png
from engine.presets import PRESETS_DIR

from .fields import FieldCheckbox, FieldDropdown, FieldSlider, PageError
from .page_jobs import (
    LIVE_UPDATE_INTERVAL_S,
    PageSession,
    build_request,
    describe_waiting,
    engine_error,
    progress_html,
    with_hires,
)

log = logging.getLogger(__name__)

PRESETS_FOLDER = PRESETS_DIR / "compare"
MAX_SIDE_BY_SIDE = 4
_PICKABLE = ("Sampler", "Schedule type", "Hires upscaler", "Hires checkpoint", "Refiner", "Model")


@dataclass
class CompareView:
    """The last grid of one session: labels, infotexts and timelines of its cells."""

    labels: list[str] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    timelines: list[list[Image.Image]] = field(default_factory=list)
    comparer: Comparer | None = None


@dataclass
class CompareWidgets:
    axis_types: list[gr.Dropdown]
    axis_values: list[gr.Textbox]
    axis_pickers: list[gr.Dropdown]
    preset: gr.Dropdown
    load_preset: gr.Button
    preset_name: gr.Textbox
    save_preset: gr.Button
    convergence: gr.Checkbox
    run: gr.Button
    stop: gr.Button
    progress: gr.HTML
    preview: gr.Image
    grid: gr.Image
    cells: gr.Gallery
    plot: gr.LinePlot
    timeline_cells: gr.Dropdown
    timeline_step: gr.Slider
    timeline: gr.Gallery
    export: gr.Button
    export_file: gr.File
    view: gr.State


def build_compare_tab(engine) -> CompareWidgets:
    """The tab's widgets (call inside a gr.Tab)."""
    gr.Markdown(
        "Grids use the **txt2img** tab's prompt and settings (Hires. fix, the seed's Extra and Tiling included), with "
        "one fixed seed, so cells differ only along "
        "the axes. Values: `Euler a, DPM++ 2M`, ranges `10-40 (+10)`, or `5-30 [4]` (4 evenly spaced)."
    )
    with gr.Row():
        preset = FieldDropdown(
            choices=list_presets(PRESETS_FOLDER), label="Preset", value=None, elem_id="compare_preset", scale=3
        )
        load = gr.Button("Load preset", size="sm", elem_id="compare_load_preset", scale=1)
        preset_name = gr.Textbox(
            label="Save axes as", placeholder="my comparison", elem_id="compare_preset_name", scale=3
        )
        save = gr.Button("Save preset", size="sm", elem_id="compare_save_preset", scale=1)
    types, values, pickers = [], [], []
    defaults = [("Sampler", "Euler a, DPM++ 2M"), ("Steps", "10, 20"), ("Nothing", "")]
    for axis_name, (kind, text) in zip("XYZ", defaults, strict=True):
        with gr.Row(equal_height=True):
            types.append(
                FieldDropdown(
                    choices=list(AXIS_TYPES),
                    value=kind,
                    label=f"{axis_name} type",
                    elem_id=f"compare_{axis_name}_type",
                    scale=2,
                )
            )
            values.append(
                gr.Textbox(value=text, label=f"{axis_name} values", elem_id=f"compare_{axis_name}_values", scale=5)
            )
            pickers.append(
                FieldDropdown(
                    choices=_pick_choices(engine, kind),
                    multiselect=True,
                    label="Pick",
                    visible=kind in _PICKABLE,
                    elem_id=f"compare_{axis_name}_pick",
                    scale=3,
                )
            )
    with gr.Row():
        convergence = FieldCheckbox(
            label="Convergence: distance (SSIM, mean pixel difference) to a 100-step DPM++ 2M Karras reference",
            value=False,
            elem_id="compare_convergence",
        )
    with gr.Row():
        run = gr.Button("Run grid", variant="primary", elem_id="compare_run")
        stop = gr.Button("Stop", variant="stop", elem_id="compare_stop")
    progress = gr.HTML(progress_html(0.0, "Idle", state="idle"), elem_id="compare_progress")
    with gr.Row(equal_height=False):
        preview = gr.Image(
            label="Current cell", interactive=False, format="jpeg", height=256, elem_id="compare_preview"
        )
        grid = gr.Image(label="Grid", interactive=False, format="png", type="pil", height=420, elem_id="compare_grid")
    cells = gr.Gallery(
        label="Cells (click one to send its settings to txt2img)",
        columns=6,
        height=300,
        object_fit="contain",
        elem_id="compare_cells",
        format="png",
    )
    plot = gr.LinePlot(
        value=_empty_plot(),
        x="steps",
        y="ssim",
        color="sampler",
        title="SSIM to the reference by steps (higher is closer)",
        visible=False,
        elem_id="compare_plot",
    )
    with gr.Accordion("Denoising timeline", open=True):
        with gr.Row():
            timeline_cells = FieldDropdown(
                choices=[],
                multiselect=True,
                max_choices=MAX_SIDE_BY_SIDE,
                label="Cells side by side (2-4)",
                scale=3,
                elem_id="compare_timeline_cells",
            )
            timeline_step = FieldSlider(1, 2, value=1, step=1, label="Step", scale=3, elem_id="compare_timeline_step")
            export = gr.Button("Export GIF", size="sm", scale=1, elem_id="compare_export")
        timeline = gr.Gallery(label="Predicted image at this step", columns=4, height=220, elem_id="compare_timeline")
        export_file = gr.File(label="Timeline", interactive=False, elem_id="compare_export_file")
    return CompareWidgets(
        axis_types=types,
        axis_values=values,
        axis_pickers=pickers,
        preset=preset,
        load_preset=load,
        preset_name=preset_name,
        save_preset=save,
        convergence=convergence,
        run=run,
        stop=stop,
        progress=progress,
        preview=preview,
        grid=grid,
        cells=cells,
        plot=plot,
        timeline_cells=timeline_cells,
        timeline_step=timeline_step,
        timeline=timeline,
        export=export,
        export_file=export_file,
        view=gr.State(CompareView()),
    )


def wire_compare_tab(
    widgets: CompareWidgets,
    engine,
    session: gr.State,
    base_inputs: list[gr.components.Component],
    send_targets: list[gr.components.Component],
    settings_from_infotext: Callable[[str], list],
    variation_inputs: list[gr.components.Component] | None = None,
    hires_inputs: list[gr.components.Component] | None = None,
    tiling_input: gr.components.Component | None = None,
    refiner_inputs: list[gr.components.Component] | None = None,
) -> None:
    """Events. `base_inputs` are the txt2img prompt, negative prompt, sampler, schedule type, steps, CFG,
    seed, width and height; `variation_inputs` its seed extras (Extra, variation seed, strength, resize
    from width, height); `hires_inputs` its Hires. fix panel, `tiling_input` its Tiling box and `refiner_inputs` its
    Refiner panel, in the order _run_grid takes them (each needs the ones before it); `send_targets` the txt2img fields (and the tabs) a
    clicked cell fills."""
    for kind, values, picker in zip(widgets.axis_types, widgets.axis_values, widgets.axis_pickers, strict=True):
        kind.change(
            lambda k: gr.update(choices=_pick_choices(engine, k), value=[], visible=k in _PICKABLE),
            inputs=[kind],
            outputs=[picker],
            api_visibility="private",
            queue=False,
        )
        picker.input(
            lambda picked: ", ".join(picked or []), inputs=[picker], outputs=[values], api_visibility="private"
        )
    axis_inputs = [w for pair in zip(widgets.axis_types, widgets.axis_values, strict=True) for w in pair]
    widgets.load_preset.click(
        _load_preset, inputs=[widgets.preset], outputs=axis_inputs, api_visibility="private", queue=False
    )
    widgets.save_preset.click(
        _save_preset,
        inputs=[widgets.preset_name, *axis_inputs],
        outputs=[widgets.preset],
        api_visibility="private",
        queue=False,
    )
    widgets.run.click(
        functools.partial(_run_grid, engine),
        inputs=[
            session,
            widgets.view,
            *base_inputs,
            *axis_inputs,
            widgets.convergence,
            *(variation_inputs or []),
            *(hires_inputs or []),
            *([tiling_input] if tiling_input is not None else []),
            *(refiner_inputs or []),
        ],
        outputs=[
            widgets.progress,
            widgets.preview,
            widgets.grid,
            widgets.cells,
            widgets.plot,
            widgets.view,
            widgets.timeline_cells,
            widgets.timeline_step,
        ],
        api_name="compare",
        api_description="Run an X/Y/Z grid at the given settings; streams progress, ends with the grid image.",
        concurrency_limit=1,
        concurrency_id="gpu",
    )
    widgets.stop.click(
        lambda s: s.stop(), inputs=[session], api_visibility="private", concurrency_limit=None, show_progress="hidden"
    )

    def send_cell(view: CompareView, evt: gr.SelectData):
        # A plain function, not a partial: gradio finds the SelectData argument by its annotation.
        return _send_cell(settings_from_infotext, view, evt)

    widgets.cells.select(
        send_cell,
        inputs=[widgets.view],
        outputs=send_targets,
        api_visibility="private",
        show_progress="hidden",
    )
    for trigger in (widgets.timeline_cells, widgets.timeline_step):
        trigger.change(
            _timeline_frames,
            inputs=[widgets.view, widgets.timeline_cells, widgets.timeline_step],
            outputs=[widgets.timeline],
            api_visibility="private",
            show_progress="hidden",
            queue=False,
        )
    widgets.export.click(
        _export_timeline,
        inputs=[widgets.view, widgets.timeline_cells],
        outputs=[widgets.export_file],
        api_visibility="private",
    )


# Handlers ----------------------------------------------------------------------------------------


def _pick_choices(engine, kind: str) -> list[str]:
    if kind == "Sampler":
        return engine.samplers()
    if kind == "Schedule type":
        return engine.schedulers()
    if kind == "Hires upscaler":
        return engine.hires_upscalers()
    if kind in ("Model", "Hires checkpoint", "Refiner"):
        models = [model.name for model in engine.list_models()]
        return models if kind == "Model" else ["None", *models]
    return []


def _empty_plot() -> pd.DataFrame:
    return pd.DataFrame({"steps": pd.Series([], dtype=int), "ssim": pd.Series([], dtype=float), "sampler": []})


def _load_preset(name: str | None):
    if not name:
        raise PageError("preset: got nothing; allowed: pick a preset from the list")
    try:
        axes = load_preset(PRESETS_FOLDER, name)
    except EngineError as exc:
        raise engine_error(exc) from exc
    axes = (axes + [("Nothing", "")] * 3)[:3]
    return [value for axis in axes for value in axis]


def _save_preset(name: str, *axis_fields):
    pairs = list(zip(axis_fields[0::2], axis_fields[1::2], strict=True))
    try:
        save_preset(PRESETS_FOLDER, (name or "").strip(), pairs)
    except EngineError as exc:
        raise engine_error(exc) from exc
    gr.Info(f"Saved preset {name.strip()}")
    return gr.update(choices=list_presets(PRESETS_FOLDER), value=name.strip())


def _run_grid(
    engine,
    session: PageSession,
    view: CompareView,
    prompt: str,
    negative_prompt: str,
    sampler_name: str,
    scheduler: str,
    steps,
    cfg_scale,
    seed,
    width,
    height,
    x_type: str,
    x_values: str,
    y_type: str,
    y_values: str,
    z_type: str,
    z_values: str,
    convergence: bool,
    seed_extra: bool = False,
    subseed: int = -1,
    subseed_strength: float = 0.0,
    seed_resize_from_w: int = 0,
    seed_resize_from_h: int = 0,
    enable_hr: bool = False,
    hr_upscaler: str = "Latent",
    hr_second_pass_steps: int = 0,
    hr_denoising_strength: float = 0.7,
    hr_scale: float = 2.0,
    hr_resize_x: int = 0,
    hr_resize_y: int = 0,
    hr_sampler_name: str = "",
    hr_scheduler: str = "",
    hr_prompt: str = "",
    hr_negative_prompt: str = "",
    hr_checkpoint_name: str = "",
    tiling: bool = False,
    refiner_checkpoint: str = "",
    refiner_switch_at: float = 0.8,
):
    """Streams (progress, current cell preview, grid, cells, plot, view, timeline choices, step slider).
    The seed extras, the Hires. fix settings, Tiling and the Refiner are the txt2img tab's (Var. seed and Var. strength axes
    change the first per cell; with hires fix on, the Denoising strength axis is its second pass's)."""
    base = build_request(
        prompt=prompt,
        negative_prompt=negative_prompt,
        sampler_name=sampler_name,
        scheduler=scheduler,
        steps=steps,
        cfg_scale=cfg_scale,
        seed=seed,
        width=width,
        height=height,
        n_iter=1,
        batch_size=1,
        seed_extra=seed_extra,
        subseed=subseed,
        subseed_strength=subseed_strength,
        seed_resize_from_w=seed_resize_from_w,
        seed_resize_from_h=seed_resize_from_h,
    )
    base = with_hires(
        session.settings_for(base),
        enable_hr,
        hr_upscaler,
        hr_second_pass_steps,
        hr_denoising_strength if enable_hr else base.denoising_strength,
        hr_scale,
        hr_resize_x,
        hr_resize_y,
        hr_sampler_name,
        hr_scheduler,
        hr_prompt,
        hr_negative_prompt,
        hr_checkpoint_name,
    )
    base = dataclasses.replace(
        base, tiling=bool(tiling), refiner_checkpoint=refiner_checkpoint or "", refiner_switch_at=refiner_switch_at
    )
    try:
        axes = [
            parse_axis(kind, text, engine)
            for kind, text in ((x_type, x_values), (y_type, y_values), (z_type, z_values))
        ]
        while len(axes) > 1 and axes[-1].kind == "Nothing":
            axes.pop()
        base = engine.validate(base)
    except EngineError as exc:
        raise engine_error(exc) from exc
    comparer = view.comparer or Comparer(engine)
    control = session.start_job()
    skip = gr.skip()
    result = None
    pacer = Pacer(LIVE_UPDATE_INTERVAL_S)
    try:
        # Every step's preview is kept for the timeline; the page is shown them at its usual pace.
        settings = session.preview_settings(keep_every_frame=True)
        for event in comparer.run_grid(base, axes, control=control, preview=settings, convergence=convergence):
            if isinstance(event, GridProgress):
                last_step = event.progress is None or event.progress.step == event.progress.total
                if not pacer.ready(force=last_step):
                    continue
                text = f"cell {event.cell_no + 1}/{event.cell_count}: {event.cell.label}"
                if event.progress is not None:
                    text += f" - step {event.progress.step}/{event.progress.total}"
                elif event.waiting is not None:
                    text += f" - {describe_waiting(event.waiting)}"
                shown = event.progress.preview if event.progress is not None else None
                preview = skip if shown is None else shown
                yield progress_html(event.fraction, text, job_id=control.job_id), preview, *(skip,) * 6
            elif isinstance(event, GridResult):
                result = event
    except EngineError as exc:
        raise engine_error(exc) from exc
    finally:
        session.end_job(control)
    cells = [(cell.image, _caption(cell)) for cell in result.cells]
    labels = [f"{i + 1}. {cell.cell.label}" for i, cell in enumerate(result.cells)]
    new_view = CompareView(
        labels=labels,
        infotexts=[cell.infotext for cell in result.cells],
        timelines=[cell.timeline for cell in result.cells],
        comparer=comparer,
    )
    rows = convergence_table(result)
    plot = gr.update(value=pd.DataFrame(rows), visible=True) if rows else gr.update(visible=False)
    grid = result.grids[0] if result.grids else None
    if grid is not None:
        # The grid carries its own parameters text, as A1111's grids do.
        grid = Image.open(_as_png_file(grid, result.infotext))
    state = "interrupted" if result.interrupted else "done"
    most_frames = max((len(t) for t in new_view.timelines), default=1) or 1
    yield (
        progress_html(1.0, f"{'Stopped' if result.interrupted else 'Done'}: {len(result.cells)} cells", state=state),
        None,
        grid,
        cells,
        plot,
        new_view,
        gr.update(choices=labels, value=labels[: min(2, len(labels))]),
        gr.update(minimum=1, maximum=max(2, most_frames), value=most_frames),
    )


def _caption(cell) -> str:
    if cell.ssim is None:
        return cell.cell.label
    return f"{cell.cell.label} | SSIM {cell.ssim:.3f}, diff {cell.mean_abs_diff:.1f}"


def _as_png_file(image: Image.Image, infotext: str) -> str:
    handle = tempfile.NamedTemporaryFile(suffix=".png", delete=False)
    with handle:
        handle.write(encode_png(image, infotext))
    return handle.name


def _send_cell(settings_from_infotext, view: CompareView, evt: gr.SelectData):
    index = evt.index if isinstance(evt.index, int) else evt.index[0]
    if not view.infotexts or index >= len(view.infotexts):
        raise PageError("No cell to send: run a grid first.")
    return (*settings_from_infotext(view.infotexts[index]), gr.Tabs(selected="txt2img"))


def _chosen(view: CompareView, labels: list[str] | None) -> list[list[Image.Image]]:
    return [view.timelines[view.labels.index(label)] for label in labels or [] if label in view.labels]


def _timeline_frames(view: CompareView, labels: list[str] | None, step):
    frames = []
    for label, timeline in zip(labels or [], _chosen(view, labels), strict=False):
        if timeline:
            frames.append((timeline[min(int(step), len(timeline)) - 1], label))
    return frames


def _export_timeline(view: CompareView, labels: list[str] | None):
    timelines = [t for t in _chosen(view, labels) if t]
    if not timelines:
        raise PageError("timeline: got no cells; allowed: pick 1-4 cells of a finished grid (previews on)")
    steps = max(len(t) for t in timelines)
    # The chosen cells side by side, all moving one step per frame (a shorter run holds its last frame).
    frames = []
    for step in range(steps):
        row = [t[min(step, len(t) - 1)] for t in timelines]
        canvas = Image.new("RGB", (sum(f.width for f in row), max(f.height for f in row)), "white")
        x = 0
        for frame in row:
            canvas.paste(frame.convert("RGB"), (x, 0))
            x += frame.width
        frames.append(canvas)
    path = Path(tempfile.mkdtemp(prefix="timeline-")) / "timeline.gif"
    return str(export_timeline(frames, path))
