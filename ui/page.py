"""The browser page: Gradio Blocks over one shared Engine.

    demo = build_page(engine, settings)   # settings: ui.server.ServerSettings (outputs_dir, save_images, ...)

A thin adapter: widgets become a GenerationRequest, the engine's events become updates. Each browser
session keeps its own settings and running jobs in gr.State; nothing one user sets reaches another.

Endpoints for gradio_client (streamed: iterate the job for previews): /txt2img, /img2img, /inpaint,
/stop (stops the caller's own jobs), /png_info.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from PIL import Image

from engine import EngineError, GenerationRequest, PromptList, PromptMatrix
from engine.events import PREVIEW_MODES
from engine.hypernet import hypernet_uses
from engine.images import LATENT_RESIZE, RESIZE_MODES
from engine.infotext import named_job_settings, parse_infotext, parse_infotext_params, read_infotext, unread_settings
from engine.inpaint import MASKED_CONTENT, sketched_inpaint
from engine.loopback import CURVES as LOOPBACK_CURVES
from engine.loopback import MAX_LOOPS as LOOPBACK_MAX_LOOPS
from engine.loopback import grid_result as loopback_grid
from engine.lora import lora_uses
from engine.memory import describe_memory
from engine.outpaint import DIRECTIONS as OUTPAINT_DIRECTIONS
from engine.outpaint import MAX_PIXELS as OUTPAINT_MAX_PIXELS
from engine.outpaint import MIN_PIXELS as OUTPAINT_MIN_PIXELS
from engine.outpaint_mk2 import DEFAULTS as OUTPAINT_MK2_DEFAULTS
from engine.outpaint_mk2 import MAX_FALL_OFF as OUTPAINT_MK2_MAX_FALL_OFF
from engine.outpaint_mk2 import MAX_MASK_BLUR as OUTPAINT_MK2_MAX_MASK_BLUR
from engine.prompt_list import POSITIONS as PROMPT_LIST_POSITIONS
from engine.prompt_matrix import DELIMITERS as PROMPT_MATRIX_DELIMITERS
from engine.prompt_matrix import MAX_MARGIN as PROMPT_MATRIX_MAX_MARGIN
from engine.prompt_matrix import PROMPT_TYPES as PROMPT_MATRIX_TYPES
from engine.prompt_matrix import grid_result as matrix_grid
from engine.request import (
    EMPHASIS_MODES,
    HR_UPSCALERS,
    JOB_SETTING_BY_FIELD,
    JOB_SETTINGS,
    MAX_CLIP_SKIP,
    PROMPT_SYNTAXES,
    JobSetting,
)
from engine.samplers import sampler_names, schedule_type_names
from engine.sd_upscale import MAX_OVERLAP as SD_UPSCALE_MAX_OVERLAP
from engine.sd_upscale import MAX_SCALE as SD_UPSCALE_MAX_SCALE
from engine.styles import apply_styles
from engine.vae import choose as vae_choice

from .fields import FieldCheckbox, FieldCheckboxGroup, FieldDropdown, FieldNumber, FieldRadio, FieldSlider, PageError
from .page_compare import build_compare_tab, wire_compare_tab
from .page_extras import build_extras_tab, upscaler_choices, wire_extras_tab
from .page_folders import build_batch_folders, folder_plan
from .page_jobs import (
    MASK_MODES,
    PageSession,
    ResultView,
    batch_pictures,
    build_request,
    editor_composite,
    editor_image_and_mask,
    engine_error,
    hypernet_reading_html,
    lora_reading_html,
    params_table_html,
    progress_html,
    prompt_reading_html,
    reread_on_open,
    run_folder_batch,
    run_job,
    token_counter_html,
    valid_preview_mode,
    with_hires,
)
from .page_merge import build_merge_tab, wire_merge_tab
from .page_style import PAGE_CSS, PAGE_JS

log = logging.getLogger(__name__)

# A1111's "Inpaint area" choices (inpaint_full_res false / true).
INPAINT_AREAS = ("Whole picture", "Only masked")
# A1111's choices for a hires pass that samples as the first pass does.
SAME_SAMPLER = "Use same sampler"
SAME_CHECKPOINT = "Use same checkpoint"
NO_REFINER = "None"
MAX_RESIZE_BY = 4.0
SAME_SCHEDULE = "Use same scheduler"
PREVIEW_MODE_LABELS = {
    "approx": "approx (fast linear latent preview)",
    "vae": "vae (full decoder, slow)",
    "taesd": "taesd (tiny decoder)",
    "none": "none",
}


@dataclass
class SettingsWidgets:
    """One tab's generation settings: the same panel is built for txt2img, img2img and inpaint."""

    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    sampler_name: gr.Dropdown
    scheduler: gr.Dropdown
    steps: gr.Slider
    cfg_scale: gr.Slider
    seed: gr.Number
    width: gr.Slider
    height: gr.Slider
    n_iter: gr.Slider
    batch_size: gr.Slider
    prompt_tokens: gr.HTML
    negative_tokens: gr.HTML
    random_seed: gr.Button
    reuse_seed: gr.Button
    swap_size: gr.Button
    # A1111's seed "Extra": a variation seed blended in, and the size the seed's noise is drawn at. They
    # apply only while seed_extra is ticked (the row with them shows then).
    seed_extra: gr.Checkbox
    seed_extra_row: gr.Column
    subseed: gr.Number
    subseed_strength: gr.Slider
    seed_resize_from_w: gr.Slider
    seed_resize_from_h: gr.Slider
    random_subseed: gr.Button
    reuse_subseed: gr.Button
    # A1111's Tiling: a picture whose edges continue each other.
    tiling: gr.Checkbox

    def request_inputs(self) -> list[gr.components.Component]:
        """In the order of the endpoints' documented parameters."""
        return [
            self.prompt,
            self.negative_prompt,
            self.sampler_name,
            self.scheduler,
            self.steps,
            self.cfg_scale,
            self.seed,
            self.width,
            self.height,
            self.n_iter,
            self.batch_size,
        ]

    def variation_inputs(self) -> list[gr.components.Component]:
        """The seed extras, in the order the generate handlers take them (after styles)."""
        return [self.seed_extra, self.subseed, self.subseed_strength, self.seed_resize_from_w, self.seed_resize_from_h]

    def fill_targets(self) -> list[gr.components.Component]:
        """The fields filled from an infotext (Send to ...): everything an infotext says."""
        return [
            self.prompt,
            self.negative_prompt,
            self.sampler_name,
            self.scheduler,
            self.steps,
            self.cfg_scale,
            self.seed,
            self.width,
            self.height,
        ]


@dataclass
class TabWidgets:
    mode: str
    settings: SettingsWidgets
    generate: gr.Button
    stop: gr.Button
    skip: gr.Button
    forever: gr.Checkbox
    progress: gr.HTML
    preview: gr.Image
    gallery: gr.Gallery
    infotext: gr.Textbox
    results: gr.State
    # The job id registered when Generate was clicked (see PageSession.start_job).
    ticket: gr.State
    send_img2img: gr.Button
    send_inpaint: gr.Button
    send_extras: gr.Button
    # How the prompt is read: fragments and weights per stretch of steps (prompt editing).
    prompt_reading: gr.HTML
    # Picks a LoRA from the LoRA folder and adds its tag to the prompt.
    add_lora: gr.Dropdown
    # A1111's ↙: fills the tab from generation parameters pasted into the prompt, or from the last generation's.
    paste: gr.Button
    # A1111's prompt styles for this tab's jobs, and its style editor.
    styles: gr.Dropdown
    style_editor: StyleEditor
    # img2img / inpaint only
    image: gr.components.Component | None = None
    resize_by: gr.Slider | None = None
    mask: gr.Image | None = None
    denoising_strength: gr.Slider | None = None
    mask_blur: gr.Slider | None = None
    mask_mode: gr.Radio | None = None
    resize_mode: gr.Radio | None = None
    # inpaint only: A1111's Inpaint area and its padding
    inpaint_area: gr.Radio | None = None
    inpaint_padding: gr.Slider | None = None
    masked_content: gr.Radio | None = None
    # txt2img only: the hires fix settings, in the order the generate handler takes them (HIRES_FIELDS).
    hires: list[gr.components.Component] | None = None
    # A1111's "Prompts from file or textbox": on, iterate seed, same seed, position, the list.
    prompt_list: list[gr.components.Component] | None = None
    # A1111's "Prompt matrix" script (on, put at start, random seeds, prompt type, joining char, grid margins).
    prompt_matrix: list[gr.components.Component] | None = None
    # img2img and inpaint: A1111's "Loopback" script (on, loops, final denoising strength, curve).
    loopback: list[gr.components.Component] | None = None
    # img2img only: A1111's "Poor man's outpainting" (on, pixels, mask blur, masked content, directions).
    outpaint: list[gr.components.Component] | None = None
    # img2img only: A1111's "Outpainting mk2" (on, pixels, mask blur, directions, fall-off exponent, colour variation).
    outpaint_mk2: list[gr.components.Component] | None = None
    # img2img only: several init images, one job each (A1111's Batch).
    batch_images: gr.File | None = None
    # A1111's refiner: the checkpoint ("None": off) and where it takes over.
    refiner: list[gr.components.Component] | None = None
    # img2img only: A1111's SD upscale script (on, tile overlap, upscaler, scale factor).
    sd_upscale: list[gr.components.Component] | None = None
    # img2img only: A1111's Sketch, the tabs of Image and Sketch, and which of them is shown ("image" or "sketch").
    sketch: gr.ImageEditor | None = None
    init_tabs: gr.Tabs | None = None
    init_source: gr.State | None = None
    # inpaint only: A1111's Inpaint sketch (on, mask transparency).
    inpaint_sketch: list[gr.components.Component] | None = None
    # img2img and inpaint, where the server allows it: A1111's Batch from folders (input, inpaint: masks, output,
    # skip pictures already done).
    batch_folders: list[gr.components.Component] | None = None


def _theme_js(theme: str | None) -> str:
    """A1111's --theme: open the page with Gradio's `__theme` URL parameter set to it, unless the address names one
    already (so a link with another one still wins); without the flag the page follows the browser's setting."""
    if theme is None:
        return ""
    return (
        "(() => { const url = new URL(window.location.href); if (!url.searchParams.has('__theme')) "
        f"{{ url.searchParams.set('__theme', {theme!r}); window.location.replace(url.href); }} }})();"
    )


def build_page(engine, settings=None) -> gr.Blocks:
    """The whole page for `engine`; `settings` supplies outputs_dir, save_images and models_dir."""
    outputs_dir = getattr(settings, "outputs_dir", None)
    outputs_dir = Path(outputs_dir) if outputs_dir is not None else None
    save_default = bool(getattr(settings, "save_images", False))
    save_image = _find_save_image()
    server_folders = bool(getattr(settings, "server_folders", False))

    defaults = engine.defaults()

    with gr.Blocks(title="Stable Diffusion", analytics_enabled=False) as demo:
        # Page-wide style without depending on launch(css=...): gr.HTML injects `head` into the document.
        gr.HTML(
            "",
            head=f"<style>{PAGE_CSS}</style><script>{_theme_js(getattr(settings, 'theme', None))}{PAGE_JS}</script>",
            elem_id="page_style",
            padding=False,
        )
        # Deep-copied for each browser session (and each gradio_client Client).
        session = gr.State(PageSession(preview_mode=_default_preview_mode(engine), save_images=save_default))

        with gr.Row(elem_id="top_row", equal_height=True):
            model = FieldDropdown(
                choices=_model_titles(engine),
                value=engine.model.title,
                label="Stable Diffusion checkpoint",
                elem_id="model_dropdown",
                scale=4,
                min_width=320,
            )
            refresh_models = gr.Button("↻", elem_id="model_refresh", scale=0, min_width=48, elem_classes="tool-button")
            forced_vae = engine.forced_vae
            sd_vae = FieldDropdown(
                choices=_vae_choices(engine),
                value="Automatic" if forced_vae is None else forced_vae.name,
                label="SD VAE",
                # A1111's --vae-path sets every job's VAE: the choice here would do nothing.
                info=f"--vae-path: every job uses {forced_vae.name}" if forced_vae else "this browser session's jobs",
                interactive=None if forced_vae is None else False,
                elem_id="sd_vae",
                scale=2,
                min_width=200,
            )
            # A1111 users keep Clip skip beside the checkpoint (quicksettings): many checkpoints want 2.
            clip_skip = FieldSlider(
                1,
                MAX_CLIP_SKIP,
                value=1,
                step=1,
                label="Clip skip",
                info="this browser session's jobs",
                elem_id="clip_skip",
                scale=2,
                min_width=160,
            )
            model_note = gr.HTML(_model_note(engine), elem_id="model_note", scale=3)

        with gr.Tabs(elem_id="tabs") as tabs:
            tab_widgets: dict[str, TabWidgets] = {}
            for mode in ("txt2img", "img2img", "inpaint"):
                with gr.Tab(mode, id=mode, elem_id=f"tab_{mode}"):
                    tab_widgets[mode] = _build_generation_tab(mode, engine, defaults, server_folders)
            with gr.Tab("Compare", id="compare", elem_id="tab_compare"):
                compare = build_compare_tab(engine)
            with gr.Tab("Extras", id="extras", elem_id="tab_extras"):
                extras = build_extras_tab(engine, server_folders)
            with gr.Tab("Checkpoint Merger", id="merge", elem_id="tab_merge"):
                merge = build_merge_tab(engine)
            with gr.Tab("PNG Info", id="pnginfo", elem_id="tab_pnginfo"):
                png = _build_png_info_tab()
            with gr.Tab("Settings", id="settings", elem_id="tab_settings"):
                # A1111's job settings (engine.request.JOB_SETTINGS), by request field.
                job_widgets: dict[str, gr.components.Component] = {}
                gr.Markdown("### Previews and prompts", elem_classes="settings-heading")
                preview_mode = FieldRadio(
                    choices=[(PREVIEW_MODE_LABELS.get(m, m), m) for m in PREVIEW_MODES],
                    value=_default_preview_mode(engine),
                    label="Live preview",
                    info="How previews are drawn while a job runs (this browser session only).",
                    elem_id="setting_preview_mode",
                )
                preview_every = FieldSlider(
                    1, 50, value=1, step=1, label="Preview every N steps", elem_id="setting_preview_every"
                )
                prompt_syntax = FieldRadio(
                    choices=[("A1111: (word:1.2), [a:b:10], BREAK", "a1111"), ("compel: word++, .blend()", "compel")],
                    value="a1111",
                    label="Prompt syntax",
                    info="How prompts are read (this browser session only).",
                    elem_id="setting_prompt_syntax",
                )
                emphasis = FieldRadio(
                    choices=list(EMPHASIS_MODES),
                    value="Original",
                    label="Emphasis mode (A1111 syntax)",
                    info="Original: weights, then the mean restored. No norm: weights only. Ignore: no weights.",
                    elem_id="setting_emphasis",
                )
                gr.Markdown("### Extra networks (A1111's)", elem_classes="settings-heading")
                with gr.Row():
                    sd_hypernetwork = FieldDropdown(
                        choices=_hypernet_choices(engine),
                        value="None",
                        label="Add hypernetwork to prompt",
                        info="Its tag goes at the end of every prompt of this browser session's jobs that does not "
                        "name it",
                        elem_id="setting_sd_hypernetwork",
                    )
                    extra_networks_multiplier = FieldSlider(
                        0,
                        MAX_EXTRA_NETWORKS_MULTIPLIER,
                        value=1,
                        step=0.01,
                        label="Default multiplier for extra networks",
                        info="The strength the hypernetwork above is added at",
                        elem_id="setting_extra_networks_default_multiplier",
                    )
                gr.Markdown("### Sampler parameters (A1111's)", elem_classes="settings-heading")
                job_widgets["randn_source"] = _job_setting_widget(
                    "randn_source",
                    "Random number generator source",
                    info="CPU: the same pictures on every machine. NV: an NVIDIA GPU's numbers, which A1111 draws by "
                    "default there, so its pictures come out the same here.",
                )
                with gr.Row():
                    job_widgets["eta_noise_seed_delta"] = _job_setting_widget(
                        "eta_noise_seed_delta",
                        "Eta noise seed delta (ENSD)",
                        info="After the starting noise, steps draw their noise from seed + this (A1111's; 31337 "
                        "in many shared infotexts). 0: off.",
                    )
                    eta_ancestral = FieldSlider(
                        0,
                        1,
                        value=1,
                        step=0.01,
                        label="Eta for ancestral and SDE samplers (Euler a, DPM2 a, DPM++ 2S a, SDE, 2M SDE, 3M SDE, DPM fast, DPM adaptive)",
                        elem_id="setting_eta_ancestral",
                    )
                    eta_ddim = FieldSlider(0, 1, value=0, step=0.01, label="Eta for DDIM", elem_id="setting_eta_ddim")
                    job_widgets["s_noise"] = _job_setting_widget(
                        "s_noise",
                        "Sigma noise (DPM2 a, DPM++ 2S a, SDE, 2M SDE, 3M SDE; sigma churn)",
                        info="A1111's s_noise: scales the fresh noise their steps add. 1: as drawn.",
                        step=0.001,
                    )
                with gr.Row():
                    job_widgets["s_churn"] = _job_setting_widget(
                        "s_churn",
                        "Sigma churn (Euler, Heun, DPM2)",
                        info="A1111's s_churn: noise added back before each step, raising its sigma. 0: off.",
                    )
                    job_widgets["s_tmin"] = _job_setting_widget(
                        "s_tmin",
                        "Sigma tmin (Euler, Heun, DPM2)",
                        info="Churn acts on steps whose sigma is at least this.",
                    )
                    job_widgets["s_tmax"] = _job_setting_widget(
                        "s_tmax", "Sigma tmax (Euler, Heun, DPM2)", info="... and at most this. 0: no end."
                    )
                    job_widgets["sgm_noise_multiplier"] = _job_setting_widget(
                        "sgm_noise_multiplier",
                        "SGM noise multiplier",
                        info="txt2img starts from noise x sqrt(1 + sigma^2), as SDXL's code does: only to make such "
                        "pictures again.",
                    )
                with gr.Row():
                    job_widgets["noise_schedule"] = _job_setting_widget(
                        "noise_schedule",
                        "Noise schedule for sampling",
                        info="Zero Terminal SNR: for models trained with it (mostly v-prediction ones). A model whose "
                        "scheduler config asks for it gets it either way.",
                    )
                    job_widgets["always_discard_penultimate_sigma"] = _job_setting_widget(
                        "always_discard_penultimate_sigma",
                        "Always discard next-to-last sigma",
                        info="Every k-diffusion sampler drops it, as DPM2 and DPM++ 3M SDE do.",
                    )
                    job_widgets["downcast_alphas_cumprod"] = _job_setting_widget(
                        "downcast_alphas_cumprod",
                        "Downcast alphas_cumprod to fp16",
                        info="Noise levels rounded as older versions rounded them: only to make such pictures again.",
                    )
                with gr.Row():
                    job_widgets["sigma_min"] = _job_setting_widget(
                        "sigma_min",
                        "Schedule min sigma",
                        info="Where schedules end (Uniform, Simple and Align Your Steps keep theirs). "
                        "0: the model's own (0.03).",
                        step=0.001,
                    )
                    job_widgets["sigma_max"] = _job_setting_widget(
                        "sigma_max",
                        "Schedule max sigma",
                        info="Where they start. 0: the model's own (about 14.6).",
                        step=0.001,
                    )
                    job_widgets["rho"] = _job_setting_widget(
                        "rho",
                        "Schedule rho (Karras)",
                        info="Higher spends more of the steps at low noise, on detail. 0: its own (7).",
                        step=0.1,
                    )
                    job_widgets["beta_dist_alpha"] = _job_setting_widget(
                        "beta_dist_alpha", "Beta schedule alpha", info="The Beta schedule's shape (0.6: its own)."
                    )
                    job_widgets["beta_dist_beta"] = _job_setting_widget(
                        "beta_dist_beta", "Beta schedule beta", info="Lower alpha and beta: more steps at both ends."
                    )
                with gr.Row():
                    job_widgets["s_min_uncond"] = _job_setting_widget(
                        "s_min_uncond",
                        "Negative Guidance minimum sigma (NGMS)",
                        info="A1111's speed-up: below this noise level every other step leaves the negative prompt "
                        "out, at half the cost. 0: off.",
                    )
                    job_widgets["s_min_uncond_all"] = _job_setting_widget(
                        "s_min_uncond_all", "NGMS on all steps", info="Every step below it, not every other one."
                    )
                job_widgets["skip_early_cond"] = _job_setting_widget(
                    "skip_early_cond",
                    "Ignore negative prompt during early sampling (Skip Early CFG)",
                    info="A1111's: this share of the steps, from the first, runs without the negative prompt (and "
                    "without guidance), at half the cost. 0: off.",
                )
                with gr.Row():
                    job_widgets["unipc_variant"] = _job_setting_widget(
                        "unipc_variant", "UniPC variant", info="B(h) of its predictor and corrector (A1111's: bh1)."
                    )
                    job_widgets["unipc_skip_type"] = _job_setting_widget(
                        "unipc_skip_type",
                        "UniPC skip type",
                        info="How UniPC spaces its steps: evenly in time, quadratically or in log SNR.",
                    )
                    job_widgets["unipc_order"] = _job_setting_widget(
                        "unipc_order",
                        "UniPC order",
                        info="How many of the model's last predictions a step uses (3; at most the steps).",
                    )
                    job_widgets["unipc_lower_order_final"] = _job_setting_widget(
                        "unipc_lower_order_final", "UniPC lower order final", info="Fewer of them in the last steps."
                    )
                job_widgets["pad_cond_uncond"] = _job_setting_widget(
                    "pad_cond_uncond",
                    "Pad prompt/negative prompt to be same length",
                    info="A1111's Pad conds: a longer prompt and its negative in one UNet call, the shorter padded "
                    "with empty chunks. Off (A1111's default): each is asked at its own length.",
                )
                gr.Markdown("### img2img (A1111's)", elem_classes="settings-heading")
                job_widgets["initial_noise_multiplier"] = _job_setting_widget(
                    "initial_noise_multiplier",
                    "Noise multiplier for img2img",
                    info="Scales the noise img2img and inpaint add to the picture (A1111's; 1: off).",
                )
                job_widgets["img2img_extra_noise"] = _job_setting_widget(
                    "img2img_extra_noise",
                    "Extra noise multiplier for img2img and hires fix",
                    info="A1111's: the starting noise once more, times this, on top of what the denoising strength "
                    "adds. More detail at a low strength. 0: off.",
                )
                job_widgets["img2img_fix_steps"] = _job_setting_widget(
                    "img2img_fix_steps",
                    "With img2img, do exactly the amount of steps the slider specifies",
                    info="A1111's: img2img and inpaint run all their steps, on a schedule made steps / strength long, "
                    "as the hires pass does. Off: fewer at a lower strength.",
                )
                job_widgets["color_correction"] = _job_setting_widget(
                    "color_correction",
                    "Apply color correction to img2img results to match original colors",
                    info="A1111's: each result gets its init image's hue and saturation back, keeping its own "
                    "light and dark (Loopback: every loop the first picture's).",
                )
                job_widgets["inpainting_mask_weight"] = _job_setting_widget(
                    "inpainting_mask_weight",
                    "Inpainting conditioning mask strength",
                    info="Inpainting models only (A1111's): how much of the masked part their picture input blanks. "
                    "1: all of it; 0: none, so img2img keeps the picture's composition.",
                )
                gr.Markdown("### Saving and the gallery", elem_classes="settings-heading")
                save_images = FieldCheckbox(
                    value=save_default,
                    label="Save generated images"
                    + (f" to {outputs_dir}" if outputs_dir is not None and save_image is not None else ""),
                    interactive=save_image is not None and outputs_dir is not None,
                    info=None if save_image is not None else "Saving is not available (engine.outputs missing).",
                    elem_id="setting_save_images",
                )
                batch_grid = FieldCheckbox(
                    value=True,
                    label="Show a grid of a batch first in the gallery, and save it",
                    info="A1111's batch grid: for two or more pictures, into outputs/*-grids/ when saving.",
                    elem_id="setting_batch_grid",
                )
                # A1111's Settings > Actions: free the memory for another program; shared by everyone here.
                with gr.Row(equal_height=True):
                    unload_model = gr.Button(
                        "Unload checkpoint", elem_id="unload_checkpoint", size="sm", scale=0, min_width=200
                    )
                    reload_model = gr.Button(
                        "Reload checkpoint", elem_id="reload_checkpoint", size="sm", scale=0, min_width=200
                    )
                    memory_line = gr.Markdown(
                        "Unloading frees the checkpoint's memory for every user of this server; "
                        "the next job loads it back.",
                        elem_id="memory_line",
                    )

        # Events ---------------------------------------------------------------------------------
        for tab in tab_widgets.values():
            _wire_generation_tab(
                tab, engine, session, outputs_dir=outputs_dir, save_image=save_image, server_folders=server_folders
            )
        for source in tab_widgets.values():
            for target_mode, button in (("img2img", source.send_img2img), ("inpaint", source.send_inpaint)):
                target = tab_widgets[target_mode]
                sent = button.click(
                    functools.partial(_send_result, target_mode=target_mode),
                    inputs=[source.gallery, source.results],
                    outputs=[
                        target.image,
                        *target.settings.fill_targets(),
                        target.denoising_strength,
                        *target.settings.variation_inputs(),
                        target.settings.tiling,
                        *target.refiner,
                        tabs,
                    ],
                    api_visibility="private",
                    show_progress="hidden",
                )
                _show_init_image_after(sent, target)
            source.send_extras.click(
                _send_to_extras,
                inputs=[source.gallery, source.results],
                outputs=[extras.image, tabs],
                api_visibility="private",
                show_progress="hidden",
            )
        _wire_png_info(
            png,
            tab_widgets,
            tabs,
            session_settings=[
                sd_vae,
                eta_ancestral,
                eta_ddim,
                clip_skip,
                *(job_widgets[setting.field] for setting in JOB_SETTINGS),
            ],
            engine=engine,
        )
        wire_extras_tab(
            extras, engine, session, outputs_dir=outputs_dir, save_image=save_image, server_folders=server_folders
        )
        wire_merge_tab(
            merge, engine, session, model_dropdown=model, model_titles=functools.partial(_model_titles, engine)
        )
        txt2img = tab_widgets["txt2img"].settings
        wire_compare_tab(
            compare,
            engine,
            session,
            base_inputs=txt2img.fill_targets(),
            variation_inputs=txt2img.variation_inputs(),
            hires_inputs=tab_widgets["txt2img"].hires,
            tiling_input=txt2img.tiling,
            refiner_inputs=tab_widgets["txt2img"].refiner,
            send_targets=[*txt2img.fill_targets(), *txt2img.variation_inputs(), tabs],
            settings_from_infotext=_txt2img_settings_from_infotext,
        )

        unload_model.click(
            functools.partial(_unload_model, engine),
            outputs=[model_note, memory_line],
            api_visibility="private",
            concurrency_limit=1,
        )
        reload_model.click(
            functools.partial(_reload_model, engine),
            outputs=[model_note, memory_line],
            api_visibility="private",
            concurrency_limit=1,
        )
        model.input(
            functools.partial(_load_model, engine),
            inputs=[model],
            outputs=[model, model_note],
            concurrency_limit=1,
            concurrency_id="gpu",
            api_visibility="private",
        )
        refresh = functools.partial(_refresh_models, engine)
        refresh_models.click(
            functools.partial(_refresh_models, engine, embeddings=True),
            outputs=[model, model_note],
            api_visibility="private",
            queue=False,
        )
        reread_on_open(sd_vae, functools.partial(_vae_choices, engine))
        reread_on_open(sd_hypernetwork, functools.partial(_hypernet_choices, engine))
        # Another user may have switched the (shared) model since this page was built.
        demo.load(refresh, outputs=[model, model_note], api_visibility="private", queue=False)

        # Per-session settings; public so that gradio_client users can set them for their own session too.
        settings_widgets = {
            "preview_mode": (preview_mode, _set_preview_mode),
            "preview_every": (preview_every, _set_preview_every),
            "save_images": (save_images, _set_save_images),
            "batch_grid": (batch_grid, _set_batch_grid),
            "prompt_syntax": (prompt_syntax, _set_prompt_syntax),
            "emphasis": (emphasis, _set_emphasis),
            "vae": (sd_vae, functools.partial(_set_vae, engine)),
            "eta_ancestral": (eta_ancestral, _set_eta_ancestral),
            "eta_ddim": (eta_ddim, _set_eta_ddim),
            "clip_skip": (clip_skip, _set_clip_skip),
            "sd_hypernetwork": (sd_hypernetwork, functools.partial(_set_sd_hypernetwork, engine)),
            "extra_networks_default_multiplier": (extra_networks_multiplier, _set_extra_networks_multiplier),
            **{
                _job_setting_name(setting): (job_widgets[setting.field], _job_setting_setter(setting))
                for setting in JOB_SETTINGS
            },
        }
        # Each browser remembers its own settings (as A1111 keeps them in config.json, but per person): they are
        # stored in the browser's localStorage, and set again when the page opens, through the same setters.
        remembered = gr.BrowserState({}, storage_key="lantern-settings", secret=_REMEMBERED_SETTINGS_KEY)
        for key, (widget, setter) in settings_widgets.items():
            widget.change(
                setter,
                inputs=[session, widget],
                api_name=f"set_{key}",
                api_description=getattr(setter, "func", setter).__doc__,
                concurrency_limit=None,
                show_progress="hidden",
            )
            widget.input(
                functools.partial(_remember, key),
                inputs=[remembered, widget],
                outputs=[remembered],
                queue=False,
                api_visibility="private",
                show_progress="hidden",
            )
        demo.load(
            functools.partial(_recalled_settings, engine, list(settings_widgets)),
            inputs=[remembered],
            outputs=[widget for widget, _setter in settings_widgets.values()],
            queue=False,
            api_visibility="private",
            show_progress="hidden",
        )
    return demo


# The settings a browser remembers are no secret (they are its own choices, kept in its own localStorage); a fixed
# key lets them outlive a server restart, which gradio's default of a new random key per start would not.
_REMEMBERED_SETTINGS_KEY = "lantern-remembered-settings"


def _remember(key: str, stored: dict | None, value) -> dict:
    """The browser's remembered settings with `key` set to what its person chose."""
    return {**(stored or {}), key: value}


def _recalled_settings(engine, keys: list[str], stored: dict | None) -> list:
    """The remembered settings for the page's widgets, in `keys`' order; one not remembered, or no longer
    possible (a VAE removed from the folder, a preview mode or syntax renamed), is left as the page has it."""
    stored = stored if isinstance(stored, dict) else {}
    possible = {
        "vae": _vae_choices(engine),
        "sd_hypernetwork": _hypernet_choices(engine),
        "preview_mode": list(PREVIEW_MODES),
        "prompt_syntax": ["a1111", "compel"],
        "emphasis": list(EMPHASIS_MODES),
        **{_job_setting_name(setting): list(setting.choices) for setting in JOB_SETTINGS if setting.is_choice},
    }
    values = []
    for key in keys:
        value = stored.get(key)
        allowed = possible.get(key)
        usable = value is not None and (allowed is None or value in _choice_values(allowed))
        values.append(value if usable else gr.skip())
    return values


def _choice_values(choices: list) -> list:
    return [choice[1] if isinstance(choice, tuple) else choice for choice in choices]


# Building ------------------------------------------------------------------------------------------


def _build_settings(mode: str, engine, defaults, prompts: dict) -> tuple[SettingsWidgets, dict]:
    """The settings panel under a tab's prompts; `prompts` holds the prompt boxes and their counters."""
    limits = engine.limits
    samplers = engine.samplers()
    schedulers = engine.schedulers()
    max_side = min(2048, limits.max_side)
    with gr.Row(equal_height=True):
        sampler_name = FieldDropdown(
            samplers,
            value=defaults.sampler_name if defaults.sampler_name in samplers else samplers[0],
            label="Sampling method",
            elem_id=f"{mode}_sampler",
        )
        scheduler = FieldDropdown(
            schedulers,
            value=defaults.scheduler if defaults.scheduler in schedulers else schedulers[0],
            label="Schedule type",
            elem_id=f"{mode}_scheduler",
        )
    steps = FieldSlider(
        1, limits.max_steps, value=defaults.steps, step=1, label="Sampling steps", elem_id=f"{mode}_steps"
    )
    with gr.Row(equal_height=True):
        with gr.Column(scale=6, min_width=200):
            width = FieldSlider(64, max_side, value=defaults.width, step=8, label="Width", elem_id=f"{mode}_width")
            height = FieldSlider(64, max_side, value=defaults.height, step=8, label="Height", elem_id=f"{mode}_height")
        swap_size = gr.Button(
            "⇅", elem_id=f"{mode}_swap_size", scale=0, min_width=44, elem_classes="tool-button", size="sm"
        )
        with gr.Column(scale=4, min_width=160):
            n_iter = FieldSlider(
                1, min(limits.max_n_iter, 100), value=1, step=1, label="Batch count", elem_id=f"{mode}_batch_count"
            )
            batch_size = FieldSlider(
                1, limits.max_batch_size, value=1, step=1, label="Batch size", elem_id=f"{mode}_batch_size"
            )
    cfg_scale = FieldSlider(1, 30, value=defaults.cfg_scale, step=0.5, label="CFG Scale", elem_id=f"{mode}_cfg_scale")
    extra: dict = {}
    if mode == "txt2img":
        extra["hires"] = _build_hires_fix(engine)
    if mode != "txt2img":
        extra["denoising_strength"] = FieldSlider(
            0, 1, value=0.75, step=0.01, label="Denoising strength", elem_id=f"{mode}_denoising_strength"
        )
        # A1111's resize modes; inpaint resizes pictures only (no latent upscale).
        modes = RESIZE_MODES if mode == "img2img" else RESIZE_MODES[:LATENT_RESIZE]
        extra["resize_mode"] = FieldRadio(
            [(label, index) for index, label in enumerate(modes)],
            value=0,
            label="Resize mode",
            info="for an init image of another size than Width x Height",
            elem_id=f"{mode}_resize_mode",
        )
        # A1111's "Resize by" tab: the size from the init image rather than from Width and Height.
        extra["resize_by"] = FieldSlider(
            0,
            MAX_RESIZE_BY,
            value=0,
            step=0.05,
            label="Resize by",
            info="0: Width x Height; otherwise the init image's own size times this (each of a batch its own)",
            elem_id=f"{mode}_resize_by",
        )
    if mode == "inpaint":
        with gr.Row(equal_height=True):
            extra["mask_blur"] = FieldSlider(
                0, engine.limits.max_mask_blur, value=4, step=1, label="Mask blur", elem_id="inpaint_mask_blur"
            )
            extra["mask_mode"] = FieldRadio(
                list(MASK_MODES), value=MASK_MODES[0], label="Mask mode", elem_id="inpaint_mask_mode"
            )
        with gr.Row(equal_height=True):
            extra["inpaint_area"] = FieldRadio(
                list(INPAINT_AREAS),
                value=INPAINT_AREAS[0],
                label="Inpaint area",
                info="Only masked: the region around the mask is inpainted at Width x Height and pasted back",
                elem_id="inpaint_full_res",
            )
            extra["inpaint_padding"] = FieldSlider(
                0, 256, value=32, step=4, label="Only masked padding, pixels", elem_id="inpaint_full_res_padding"
            )
        extra["masked_content"] = FieldRadio(
            list(MASKED_CONTENT),
            value=MASKED_CONTENT[1],
            label="Masked content",
            info="what the masked part starts from",
            elem_id="inpaint_inpainting_fill",
        )
    with gr.Row(equal_height=True):
        seed = FieldNumber(
            value=-1, precision=0, label="Seed (-1: random)", elem_id=f"{mode}_seed", scale=6, minimum=-1
        )
        random_seed = gr.Button("⚄", elem_id=f"{mode}_random_seed", scale=0, min_width=44, elem_classes="tool-button")
        reuse_seed = gr.Button("♻", elem_id=f"{mode}_reuse_seed", scale=0, min_width=44, elem_classes="tool-button")
        seed_extra = FieldCheckbox(False, label="Extra", elem_id=f"{mode}_subseed_show", scale=1, min_width=80)
        tiling = FieldCheckbox(False, label="Tiling", elem_id=f"{mode}_tiling", scale=1, min_width=80)
    with gr.Column(visible=False, elem_id=f"{mode}_seed_extras") as seed_extra_row:
        with gr.Row(equal_height=True):
            subseed = FieldNumber(
                value=-1, precision=0, label="Variation seed", elem_id=f"{mode}_subseed", scale=4, minimum=-1
            )
            random_subseed = gr.Button(
                "⚄", elem_id=f"{mode}_random_subseed", scale=0, min_width=44, elem_classes="tool-button"
            )
            reuse_subseed = gr.Button(
                "♻", elem_id=f"{mode}_reuse_subseed", scale=0, min_width=44, elem_classes="tool-button"
            )
            subseed_strength = FieldSlider(
                0, 1, value=0, step=0.01, label="Variation strength", elem_id=f"{mode}_subseed_strength", scale=4
            )
        with gr.Row(equal_height=True):
            seed_resize_from_w = FieldSlider(
                0, max_side, value=0, step=8, label="Resize seed from width", elem_id=f"{mode}_seed_resize_from_w"
            )
            seed_resize_from_h = FieldSlider(
                0, max_side, value=0, step=8, label="Resize seed from height", elem_id=f"{mode}_seed_resize_from_h"
            )
    return (
        SettingsWidgets(
            **prompts,
            sampler_name=sampler_name,
            scheduler=scheduler,
            steps=steps,
            cfg_scale=cfg_scale,
            seed=seed,
            width=width,
            height=height,
            n_iter=n_iter,
            batch_size=batch_size,
            random_seed=random_seed,
            reuse_seed=reuse_seed,
            swap_size=swap_size,
            seed_extra=seed_extra,
            seed_extra_row=seed_extra_row,
            subseed=subseed,
            subseed_strength=subseed_strength,
            seed_resize_from_w=seed_resize_from_w,
            seed_resize_from_h=seed_resize_from_h,
            random_subseed=random_subseed,
            reuse_subseed=reuse_subseed,
            tiling=tiling,
        ),
        extra,
    )


def _build_generation_tab(mode: str, engine, defaults, server_folders: bool = False) -> TabWidgets:
    with gr.Row(elem_classes="prompt-row"):
        with gr.Column(scale=8):
            # Each counter sits over the top-right corner of its box (see .prompt-box in page_style).
            with gr.Column(elem_classes="prompt-box"):
                prompt = gr.Textbox(
                    label="Prompt", lines=3, max_lines=12, placeholder="Prompt", elem_id=f"{mode}_prompt"
                )
                prompt_tokens = gr.HTML(
                    token_counter_html([0]), elem_id=f"{mode}_token_counter", elem_classes="token-counter"
                )
            with gr.Column(elem_classes="prompt-box"):
                negative = gr.Textbox(
                    label="Negative prompt",
                    lines=2,
                    max_lines=8,
                    placeholder="Negative prompt",
                    elem_id=f"{mode}_neg_prompt",
                )
                negative_tokens = gr.HTML(
                    token_counter_html([0]), elem_id=f"{mode}_negative_token_counter", elem_classes="token-counter"
                )
        with gr.Column(scale=2, min_width=180, elem_classes="generate-column"):
            generate = gr.Button(
                "Generate", variant="primary", elem_id=f"{mode}_generate", size="lg", elem_classes="job-button"
            )
            with gr.Row():
                stop = gr.Button(
                    "Stop", variant="stop", elem_id=f"{mode}_stop", size="md", scale=3, elem_classes="job-button"
                )
                # A1111's Skip: the running batch ends as far as it got; the job goes on with the next one.
                skip = gr.Button(
                    "Skip", elem_id=f"{mode}_skip", size="md", scale=1, min_width=60, elem_classes="job-button"
                )
            # A1111's "Generate forever" (its Generate button's context menu): Stop ends it.
            with gr.Row(equal_height=True):
                forever = FieldCheckbox(False, label="Generate forever", elem_id=f"{mode}_forever", scale=3)
                # A1111's ↙: an infotext pasted into the prompt, or the last generation's when the prompt is empty
                # (an error says so when the prompt holds no parameters).
                paste = gr.Button("↙", elem_id=f"{mode}_paste", scale=1, min_width=44, elem_classes="tool-button")
            add_lora = FieldDropdown(
                choices=_network_choices(engine),
                value=None,
                label="Add a LoRA or hypernetwork",
                info="adds its tag to the prompt",
                elem_id=f"{mode}_add_lora",
            )
            styles = FieldDropdown(
                choices=list(engine.styles()),
                value=[],
                multiselect=True,
                label="Styles",
                info="from styles.csv, added to the prompts",
                elem_id=f"{mode}_styles",
            )
            style_editor = _build_style_editor(mode, engine)
    with gr.Accordion("How the prompt is read", open=False, elem_id=f"{mode}_prompt_reading_box"):
        prompt_reading = gr.HTML("", elem_id=f"{mode}_prompt_reading")
    image = mask = batch_images = sketch = init_tabs = init_source = inpaint_sketch = batch_folders = None
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, elem_classes="settings-column"):
            if mode == "img2img":
                image, sketch, init_tabs, init_source = _build_init_image_and_sketch()
                # A1111's Batch tab without server folders: the pictures come from the browser.
                with gr.Accordion("Batch: several init images", open=False, elem_id="img2img_batch_box"):
                    batch_images = gr.File(
                        file_count="multiple",
                        file_types=["image"],
                        type="filepath",
                        label="Init images: with files here, Generate runs one job per picture (not the one above)",
                        elem_id="img2img_batch_images",
                    )
                    batch_folders = build_batch_folders(mode, server_folders)
            elif mode == "inpaint":
                image = gr.ImageEditor(
                    type="pil",
                    label=INPAINT_EDITOR_LABELS[False],
                    sources=["upload", "clipboard"],
                    brush=_mask_brush(),
                    eraser=gr.Eraser(default_size=24),
                    layers=False,
                    transforms=(),
                    elem_id="inpaint_image",
                    height=360,
                )
                inpaint_sketch = _build_inpaint_sketch(image)
                with gr.Accordion("Upload a mask instead (white = repaint)", open=False):
                    mask = gr.Image(
                        type="pil",
                        image_mode="L",
                        label="Mask",
                        sources=["upload", "clipboard"],
                        elem_id="inpaint_mask",
                        height=200,
                    )
                with gr.Accordion("Batch: pictures and masks from folders", open=False, elem_id="inpaint_batch_box"):
                    batch_folders = build_batch_folders(mode, server_folders)
            prompts = dict(
                prompt=prompt, negative_prompt=negative, prompt_tokens=prompt_tokens, negative_tokens=negative_tokens
            )
            panel, extra = _build_settings(mode, engine, defaults, prompts)
            refiner = _build_refiner(mode, engine)
            prompt_list = _build_prompt_list(mode)
            prompt_matrix = _build_prompt_matrix(mode)
            loopback_panel = _build_loopback(mode) if mode != "txt2img" else None
            outpaint_panel = _build_outpaint(engine) if mode == "img2img" else None
            outpaint_mk2_panel = _build_outpaint_mk2() if mode == "img2img" else None
            sd_upscale = _build_sd_upscale(engine) if mode == "img2img" else None
        with gr.Column(scale=5, elem_classes="output-column"):
            progress = gr.HTML(progress_html(0.0, "Idle", state="idle"), label="Progress", elem_id=f"{mode}_progress")
            preview = gr.Image(
                label="Live preview",
                interactive=False,
                visible=False,
                format="jpeg",
                height=420,
                elem_id=f"{mode}_preview",
                elem_classes="live-preview",
                buttons=[],
            )
            gallery = gr.Gallery(
                label="Results",
                format="png",
                columns=4,
                height=420,
                preview=True,
                object_fit="contain",
                interactive=False,
                elem_id=f"{mode}_gallery",
                buttons=["download", "fullscreen"],
            )
            infotext = gr.Textbox(
                label="Generation parameters",
                lines=3,
                interactive=False,
                elem_id=f"{mode}_infotext",
                buttons=["copy"],
            )
            with gr.Row():
                send_img2img = gr.Button("Send to img2img", elem_id=f"{mode}_send_to_img2img", size="sm")
                send_inpaint = gr.Button("Send to inpaint", elem_id=f"{mode}_send_to_inpaint", size="sm")
                send_extras = gr.Button("Send to extras", elem_id=f"{mode}_send_to_extras", size="sm")
    return TabWidgets(
        mode=mode,
        settings=panel,
        generate=generate,
        stop=stop,
        skip=skip,
        forever=forever,
        progress=progress,
        preview=preview,
        gallery=gallery,
        infotext=infotext,
        results=gr.State(ResultView()),
        ticket=gr.State(None),
        send_img2img=send_img2img,
        send_inpaint=send_inpaint,
        send_extras=send_extras,
        prompt_reading=prompt_reading,
        add_lora=add_lora,
        paste=paste,
        styles=styles,
        style_editor=style_editor,
        image=image,
        mask=mask,
        denoising_strength=extra.get("denoising_strength"),
        mask_blur=extra.get("mask_blur"),
        mask_mode=extra.get("mask_mode"),
        resize_mode=extra.get("resize_mode"),
        resize_by=extra.get("resize_by"),
        inpaint_area=extra.get("inpaint_area"),
        inpaint_padding=extra.get("inpaint_padding"),
        masked_content=extra.get("masked_content"),
        hires=extra.get("hires"),
        prompt_list=prompt_list,
        prompt_matrix=prompt_matrix,
        loopback=loopback_panel,
        outpaint=outpaint_panel,
        outpaint_mk2=outpaint_mk2_panel,
        batch_images=batch_images,
        refiner=refiner,
        sd_upscale=sd_upscale,
        sketch=sketch,
        init_tabs=init_tabs,
        init_source=init_source,
        inpaint_sketch=inpaint_sketch,
        batch_folders=batch_folders,
    )


# The sketch brushes' colours to start from (the micro model's palette; the picker offers any other).
SKETCH_COLOURS = ["#000000", "#ffffff", "#ff0000", "#008000", "#0000ff", "#ffff00", "#800080", "#ffa500"]
INIT_SOURCES = ("image", "sketch")
INPAINT_EDITOR_LABELS = {
    False: "Image (paint the area to repaint; white = repaint)",
    True: "Image (paint in colour: the strokes are repainted, starting from their colours)",
}
SKETCH_CANVAS = (512, 512)


def _mask_brush() -> gr.Brush:
    return gr.Brush(colors=["#ffffff"], default_color="#ffffff", color_mode="fixed", default_size=24)


def _sketch_brush() -> gr.Brush:
    return gr.Brush(colors=SKETCH_COLOURS, default_color=SKETCH_COLOURS[0], color_mode="defaults", default_size=12)


def _build_init_image_and_sketch() -> tuple[gr.Image, gr.ImageEditor, gr.Tabs, gr.State]:
    """img2img's init image as A1111 offers it: an uploaded picture (Image), or one drawn on in colour (Sketch: a
    blank white canvas, or a picture to paint over). The job takes the one whose tab is shown."""
    init_source = gr.State(INIT_SOURCES[0])
    with gr.Tabs(elem_id="img2img_init_tabs") as init_tabs:
        with gr.Tab("Image", id="image", elem_id="img2img_init_tab_image") as image_tab:
            image = gr.Image(
                type="pil",
                label="Init image",
                sources=["upload", "clipboard"],
                elem_id="img2img_image",
                height=320,
            )
            copy_to_sketch = gr.Button("Sketch on this picture", size="sm", elem_id="img2img_copy_to_sketch")
        with gr.Tab("Sketch", id="sketch", elem_id="img2img_init_tab_sketch") as sketch_tab:
            sketch = gr.ImageEditor(
                # A white canvas to draw on at once (an empty editor waits for its brush to be picked).
                value=_editor_value(Image.new("RGB", SKETCH_CANVAS, "white")),
                type="pil",
                label="Sketch (the picture with the strokes is the init image)",
                sources=["upload", "clipboard"],
                brush=_sketch_brush(),
                eraser=gr.Eraser(default_size=12),
                layers=False,
                transforms=(),
                canvas_size=SKETCH_CANVAS,
                elem_id="img2img_sketch",
                height=320,
            )
    for tab, source in ((image_tab, "image"), (sketch_tab, "sketch")):
        tab.select(
            functools.partial(lambda chosen: chosen, source),
            outputs=[init_source],
            queue=False,
            api_visibility="private",
            show_progress="hidden",
        )
    copy_to_sketch.click(
        _copy_to_sketch,
        inputs=[image],
        outputs=[sketch, init_tabs, init_source],
        api_visibility="private",
        show_progress="hidden",
    )
    return image, sketch, init_tabs, init_source


def _show_init_image_after(sent, target: TabWidgets) -> None:
    """After a picture is sent to img2img, its Image tab is shown, so that the job takes the picture sent."""
    if target.init_tabs is not None:
        sent.then(
            lambda: (gr.Tabs(selected="image"), "image"),
            outputs=[target.init_tabs, target.init_source],
            queue=False,
            api_visibility="private",
            show_progress="hidden",
        )


def _copy_to_sketch(image: Image.Image | None):
    if image is None:
        raise PageError("Sketch on this picture: upload a picture into Image first (or draw on the blank Sketch).")
    return _editor_value(image), gr.Tabs(selected="sketch"), "sketch"


def _build_inpaint_sketch(editor: gr.ImageEditor) -> list[gr.components.Component]:
    """A1111's Inpaint sketch, as a switch on the inpaint editor: its brush paints colours, the strokes are the
    mask, and their colours go into the picture the masked part starts from (Mask transparency dims the mask)."""
    with gr.Row():
        on = FieldCheckbox(
            False,
            label="Inpaint sketch: the brush paints colours into the picture",
            info="the strokes are the mask and what it starts from (keep masked content: original)",
            elem_id="inpaint_sketch",
        )
        transparency = FieldSlider(
            0,
            100,
            value=0,
            step=1,
            label="Mask transparency",
            info="% (A1111's): dims the mask, so the original shows through",
            visible=False,
            elem_id="inpaint_mask_transparency",
        )
    on.change(
        _inpaint_sketch_switched,
        inputs=[on],
        outputs=[editor, transparency],
        queue=False,
        api_visibility="private",
        show_progress="hidden",
    )
    return [on, transparency]


def _inpaint_sketch_switched(sketching: bool):
    """The editor's brush (colours, or the mask's white) and whether Mask transparency shows."""
    brush = _sketch_brush() if sketching else _mask_brush()
    return gr.update(brush=brush, label=INPAINT_EDITOR_LABELS[sketching]), gr.update(visible=sketching)


@dataclass
class StyleEditor:
    """A1111's style editor: a style's name (one to edit, or a new one), its prompt and negative prompt."""

    name: gr.Dropdown
    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    save: gr.Button
    delete: gr.Button
    from_prompts: gr.Button
    apply: gr.Button


def _build_style_editor(mode: str, engine) -> StyleEditor:
    with gr.Accordion("Edit styles", open=False, elem_id=f"{mode}_style_editor"):
        name = FieldDropdown(
            choices=list(engine.styles()),
            value=None,
            allow_custom_value=True,
            label="Style",
            info="pick one to edit, or type a new name",
            elem_id=f"{mode}_style_name",
        )
        prompt = gr.Textbox(
            label="Style prompt", lines=2, placeholder="{prompt} stands for the prompt", elem_id=f"{mode}_style_prompt"
        )
        negative = gr.Textbox(label="Style negative prompt", lines=2, elem_id=f"{mode}_style_negative")
        with gr.Row():
            save = gr.Button("Save", size="sm", elem_id=f"{mode}_style_save", min_width=60)
            delete = gr.Button("Delete", size="sm", elem_id=f"{mode}_style_delete", min_width=60)
        with gr.Row():
            from_prompts = gr.Button("From the prompts", size="sm", elem_id=f"{mode}_style_from_prompts", min_width=60)
            apply = gr.Button("Apply to the prompts", size="sm", elem_id=f"{mode}_style_apply", min_width=60)
    return StyleEditor(name, prompt, negative, save, delete, from_prompts, apply)


def _wire_style_editor(tab: TabWidgets, engine) -> None:
    editor, panel = tab.style_editor, tab.settings
    quick = dict(api_visibility="private", show_progress="hidden")
    editor.name.focus(lambda: gr.update(choices=list(engine.styles())), outputs=[editor.name], queue=False, **quick)
    editor.name.input(
        functools.partial(_pick_style, engine),
        inputs=[editor.name],
        outputs=[editor.prompt, editor.negative_prompt],
        queue=False,
        **quick,
    )
    editor.save.click(
        functools.partial(_save_style, engine),
        inputs=[editor.name, editor.prompt, editor.negative_prompt],
        outputs=[editor.name, tab.styles],
        **quick,
    )
    editor.delete.click(
        functools.partial(_delete_style, engine),
        inputs=[editor.name, tab.styles],
        outputs=[editor.name, editor.prompt, editor.negative_prompt, tab.styles],
        **quick,
    )
    editor.from_prompts.click(
        lambda prompt, negative: (prompt, negative),
        inputs=[panel.prompt, panel.negative_prompt],
        outputs=[editor.prompt, editor.negative_prompt],
        queue=False,
        **quick,
    )
    editor.apply.click(
        functools.partial(_apply_styles, engine),
        inputs=[panel.prompt, panel.negative_prompt, tab.styles],
        outputs=[panel.prompt, panel.negative_prompt, tab.styles],
        **quick,
    )


def _pick_style(engine, name: str | None):
    """The editor's prompts for the style picked; a new name keeps what is typed."""
    style = engine.styles().get((name or "").strip())
    if style is None:
        return gr.skip(), gr.skip()
    return style.prompt, style.negative_prompt


def _save_style(engine, name: str | None, prompt: str, negative_prompt: str):
    try:
        style = engine.save_style(name, prompt, negative_prompt)
    except EngineError as exc:
        raise engine_error(exc) from exc
    gr.Info(f"Saved style {style.name} to {engine.registry.styles_file}")
    names = list(engine.styles())
    return gr.update(choices=names, value=style.name), gr.update(choices=names)


def _delete_style(engine, name: str | None, selected: list[str] | None):
    try:
        engine.delete_style(name)
    except EngineError as exc:
        raise engine_error(exc) from exc
    gr.Info(f"Deleted style {name.strip()}")
    names = list(engine.styles())
    kept = [each for each in selected or [] if each in names]
    return gr.update(choices=names, value=None), "", "", gr.update(choices=names, value=kept)


def _apply_styles(engine, prompt: str, negative_prompt: str, selected: list[str] | None):
    """A1111's "apply styles": the selected styles merged into the prompts, and the selection cleared, so the
    styles are not added a second time when the job runs."""
    if not selected:
        raise PageError("styles: got none; allowed: pick the styles to apply in Styles first")
    try:
        prompt, negative_prompt = apply_styles(
            prompt or "", negative_prompt or "", selected, engine.styles(), engine.registry.styles_file
        )
    except EngineError as exc:
        raise engine_error(exc) from exc
    return prompt, negative_prompt, []


def _build_refiner(mode: str, engine) -> list[gr.components.Component]:
    """A1111's Refiner: (checkpoint, switch at), in the order the generate handlers take them."""
    with gr.Accordion("Refiner", open=False, elem_id=f"{mode}_refiner_box"):
        with gr.Row():
            checkpoint = FieldDropdown(
                _second_model_choices(engine, NO_REFINER),
                value=NO_REFINER,
                label="Refiner checkpoint",
                info="a model of the same kind that finishes the picture"
                + (" (in the second pass, with Hires. fix on)" if mode == "txt2img" else ""),
                elem_id=f"{mode}_refiner_checkpoint",
            )
            reread_on_open(checkpoint, functools.partial(_second_model_choices, engine, NO_REFINER))
            switch_at = FieldSlider(
                0.01,
                1,
                value=0.8,
                step=0.01,
                label="Switch at",
                info="the share of the noise schedule before it takes over",
                elem_id=f"{mode}_refiner_switch_at",
            )
    return [checkpoint, switch_at]


def _default_tile_overlap(defaults) -> int:
    """A1111's 64 pixels, or a quarter of a smaller model's tile (its native size, where Width and Height start),
    so that turning SD upscale on works as it opens: the overlap must stay below the tile."""
    return min(64, min(defaults.width, defaults.height) // 4 // 16 * 16)


def _build_sd_upscale(engine) -> list[gr.components.Component]:
    """A1111's SD upscale script: (on, tile overlap, upscaler, scale factor), in the order img2img takes them."""
    with gr.Accordion("SD upscale", open=False, elem_id="img2img_sd_upscale_box"):
        on = FieldCheckbox(
            False,
            label="Upscale the init image, then redraw it tile by tile",
            info="Width and Height set the tile size; each tile is an img2img job at the denoising strength",
            elem_id="img2img_sd_upscale",
        )
        with gr.Row():
            overlap = FieldSlider(
                0,
                SD_UPSCALE_MAX_OVERLAP,
                value=_default_tile_overlap(engine.defaults()),
                step=16,
                label="Tile overlap",
                elem_id="img2img_sd_upscale_overlap",
            )
            scale = FieldSlider(
                1, SD_UPSCALE_MAX_SCALE, value=2, step=0.05, label="Scale Factor", elem_id="img2img_sd_upscale_scale"
            )
        upscaler = FieldDropdown(
            upscaler_choices(engine), value="Lanczos", label="Upscaler", elem_id="img2img_sd_upscale_upscaler"
        )
        reread_on_open(upscaler, functools.partial(upscaler_choices, engine))
    return [on, overlap, upscaler, scale]


def _second_model_choices(engine, none: str) -> list[str]:
    """The Hires checkpoint and Refiner lists: their choice of none ("Use same checkpoint", "None"), then the models."""
    return [none, *(info.title for info in engine.list_models())]


def _build_prompt_list(mode: str) -> list[gr.components.Component]:
    """A1111's "Prompts from file or textbox" script: (on, iterate seed, same seed, position, the list), in the
    order the generate handlers take them."""
    with gr.Accordion("Prompts from file or textbox", open=False, elem_id=f"{mode}_prompt_list_box"):
        on = FieldCheckbox(False, label="Run one job per line of the list", elem_id=f"{mode}_prompt_list_on")
        with gr.Row():
            iterate = FieldCheckbox(False, label="Iterate seed every line", elem_id=f"{mode}_prompt_list_iterate")
            same = FieldCheckbox(False, label="Use same random seed for all lines", elem_id=f"{mode}_prompt_list_same")
            position = FieldRadio(
                list(PROMPT_LIST_POSITIONS),
                value="start",
                label="Insert prompts at the",
                elem_id=f"{mode}_prompt_list_position",
            )
        text = gr.Textbox(
            "",
            label="List of prompt inputs",
            lines=4,
            placeholder='a red circle\n--prompt "a blue square" --steps 30 --seed 7 --cfg_scale 5',
            info="One line a job: a prompt, or A1111's options (--prompt, --negative_prompt, --seed, --steps, "
            "--cfg_scale, --sampler_name, --width, --height, --n_iter, --batch_size, ...).",
            elem_id=f"{mode}_prompt_list_text",
        )
        upload = gr.File(
            label="Upload prompt inputs (.txt)", file_types=[".txt"], type="binary", elem_id=f"{mode}_prompt_list_file"
        )
    upload.upload(
        _read_prompt_file,
        inputs=[upload],
        outputs=[text, on],
        queue=False,
        api_visibility="private",
        show_progress="hidden",
    )
    return [on, iterate, same, position, text]


def _build_prompt_matrix(mode: str) -> list[gr.components.Component]:
    """A1111's "Prompt matrix" script: (on, put at start, random seeds, prompt type, joining char, grid margins), in
    the order the generate handlers take them."""
    with gr.Accordion("Prompt matrix", open=False, elem_id=f"{mode}_prompt_matrix_box"):
        on = FieldCheckbox(
            False,
            label="Make every combination of the prompt's | parts, and a grid of them",
            info="'a house | at night | in snow' makes 4 pictures: the first part in each, every later part in half",
            elem_id=f"{mode}_prompt_matrix_on",
        )
        with gr.Row():
            at_start = FieldCheckbox(False, label="Set at prompt start", elem_id=f"{mode}_prompt_matrix_put_at_start")
            random_seeds = FieldCheckbox(False, label="Random seeds", elem_id=f"{mode}_prompt_matrix_different_seeds")
        with gr.Row():
            prompt_type = FieldRadio(
                list(PROMPT_MATRIX_TYPES), value="positive", label="Prompt type", elem_id=f"{mode}_prompt_matrix_type"
            )
            delimiter = FieldRadio(
                list(PROMPT_MATRIX_DELIMITERS),
                value="comma",
                label="Joining char",
                elem_id=f"{mode}_prompt_matrix_joiner",
            )
        margin = FieldSlider(
            0, PROMPT_MATRIX_MAX_MARGIN, value=0, step=2, label="Grid margins", elem_id=f"{mode}_prompt_matrix_margin"
        )
    return [on, at_start, random_seeds, prompt_type, delimiter, margin]


def _build_outpaint(engine) -> list[gr.components.Component]:
    """A1111's "Poor man's outpainting": (on, pixels to expand, mask blur, masked content, directions), in the order
    the img2img handler takes them."""
    with gr.Accordion("Poor man's outpainting", open=False, elem_id="img2img_outpaint_box"):
        on = FieldCheckbox(
            False,
            label="Grow the picture and paint the new border",
            info="Width and Height set the tile size; each tile that reaches the border is inpainted",
            elem_id="img2img_outpaint_on",
        )
        with gr.Row():
            pixels = FieldSlider(
                OUTPAINT_MIN_PIXELS,
                OUTPAINT_MAX_PIXELS,
                value=128,
                step=8,
                label="Pixels to expand",
                elem_id="img2img_outpaint_pixels",
            )
            blur = FieldSlider(
                0, engine.limits.max_mask_blur, value=4, step=1, label="Mask blur", elem_id="img2img_outpaint_mask_blur"
            )
        content = FieldRadio(
            list(MASKED_CONTENT), value="fill", label="Masked content", elem_id="img2img_outpaint_fill"
        )
        directions = FieldCheckboxGroup(
            list(OUTPAINT_DIRECTIONS),
            value=list(OUTPAINT_DIRECTIONS),
            label="Outpainting direction",
            elem_id="img2img_outpaint_direction",
        )
    return [on, pixels, blur, content, directions]


def _build_outpaint_mk2() -> list[gr.components.Component]:
    """A1111's "Outpainting mk2": (on, pixels to expand, mask blur, directions, fall-off exponent, colour variation),
    in the order the img2img handler takes them."""
    with gr.Accordion("Outpainting mk2", open=False, elem_id="img2img_outpaint_mk2_box"):
        on = FieldCheckbox(
            False,
            label="Grow the picture one side at a time, painting each new border from matched noise",
            info="Recommended: Euler a, 80-100 sampling steps, denoising strength 0.8. Width and Height set how much "
            "of the picture each side's pass paints",
            elem_id="img2img_outpaint_mk2_on",
        )
        with gr.Row():
            pixels = FieldSlider(
                OUTPAINT_MIN_PIXELS,
                OUTPAINT_MAX_PIXELS,
                value=OUTPAINT_MK2_DEFAULTS["pixels"],
                step=8,
                label="Pixels to expand",
                elem_id="img2img_outpaint_mk2_pixels",
            )
            blur = FieldSlider(
                0,
                OUTPAINT_MK2_MAX_MASK_BLUR,
                value=OUTPAINT_MK2_DEFAULTS["mask_blur"],
                step=1,
                label="Mask blur",
                elem_id="img2img_outpaint_mk2_mask_blur",
            )
        directions = FieldCheckboxGroup(
            list(OUTPAINT_DIRECTIONS),
            value=list(OUTPAINT_DIRECTIONS),
            label="Outpainting direction",
            elem_id="img2img_outpaint_mk2_direction",
        )
        with gr.Row():
            fall_off = FieldSlider(
                0.0,
                OUTPAINT_MK2_MAX_FALL_OFF,
                value=OUTPAINT_MK2_DEFAULTS["noise_q"],
                step=0.01,
                label="Fall-off exponent (lower=higher detail)",
                elem_id="img2img_outpaint_mk2_noise_q",
            )
            variation = FieldSlider(
                0.0,
                1.0,
                value=OUTPAINT_MK2_DEFAULTS["color_variation"],
                step=0.01,
                label="Color variation",
                elem_id="img2img_outpaint_mk2_color_variation",
            )
    return [on, pixels, blur, directions, fall_off, variation]


def _outpainting_mk2(on, pixels, mask_blur, directions, noise_q, color_variation) -> dict:
    """The request fields of the Outpainting mk2 panel (none while it is off)."""
    if not on:
        return {}
    return {
        "outpaint_mk2": True,
        "outpaint_mk2_pixels": pixels,
        "outpaint_mk2_mask_blur": mask_blur,
        "outpaint_mk2_directions": directions,
        "outpaint_mk2_noise_q": noise_q,
        "outpaint_mk2_color_variation": color_variation,
    }


def _outpainting(on, pixels, mask_blur, masked_content, directions) -> dict:
    """The request fields of the outpainting panel (none while it is off)."""
    if not on:
        return {}
    fill = MASKED_CONTENT.index(masked_content) if masked_content in MASKED_CONTENT else masked_content
    return {
        "outpaint": True,
        "outpaint_pixels": pixels,
        "outpaint_directions": directions,
        "mask_blur": mask_blur,
        "inpainting_fill": fill,
    }


def _looping(on, loops, final_denoising, curve) -> dict:
    """The request fields of the Loopback panel (none while it is off)."""
    if not on:
        return {}
    return {
        "loopback": True,
        "loopback_loops": loops,
        "loopback_final_denoising": final_denoising,
        "loopback_curve": curve,
    }


def _build_loopback(mode: str) -> list[gr.components.Component]:
    """A1111's "Loopback" script: (on, loops, final denoising strength, curve), in the order the img2img and inpaint
    handlers take them."""
    with gr.Accordion("Loopback", open=False, elem_id=f"{mode}_loopback_box"):
        on = FieldCheckbox(
            False,
            label="Feed each picture back in as the next init image",
            info="The denoising strength moves from the tab's to the final one; the seed goes up by 1 each loop",
            elem_id=f"{mode}_loopback_on",
        )
        with gr.Row():
            loops = FieldSlider(1, LOOPBACK_MAX_LOOPS, value=4, step=1, label="Loops", elem_id=f"{mode}_loopback_loops")
            final = FieldSlider(
                0, 1, value=0.5, step=0.01, label="Final denoising strength", elem_id=f"{mode}_loopback_final"
            )
        curve = FieldDropdown(
            list(LOOPBACK_CURVES), value="Linear", label="Denoising strength curve", elem_id=f"{mode}_loopback_curve"
        )
    return [on, loops, final, curve]


def _read_prompt_file(data: bytes | None):
    """An uploaded list into the textbox (as A1111 reads it: UTF-8, lines stripped), switched on."""
    if not data:
        return gr.skip(), gr.skip()
    lines = [line.strip() for line in data.decode("utf-8", errors="replace").splitlines()]
    return "\n".join(lines), True


def _scripted(engine, request, prompt_list: tuple, prompt_matrix: tuple, loopback_settings: tuple = (False,)) -> dict:
    """run_job's arguments for the page's request: as it is; with the prompt list on, one request per line; with
    the prompt matrix on, one per combination of the prompt's parts (every one checked first) and their grid; with
    Loopback on, the looping request and the grid of its loops. One script at a time, as A1111's Script list."""
    list_on, iterate, same, position, text = prompt_list
    matrix_on, *matrix_settings = prompt_matrix
    loopback_on = loopback_settings[0]
    chosen = [
        name for name, on in (("prompt list", list_on), ("prompt matrix", matrix_on), ("loopback", loopback_on)) if on
    ]
    if len(chosen) > 1:
        raise PageError(
            f"scripts: got {' and '.join(chosen)} on together; allowed: one script at a time, as in A1111 (untick all "
            "but one of Prompts from file or textbox, Prompt matrix and Loopback)"
        )
    if loopback_on:
        return {"request": dataclasses.replace(request, **_looping(*loopback_settings)), "grid": loopback_grid}
    try:
        if list_on:
            prompt_list_settings = PromptList(
                text=text or "", iterate_seed=bool(iterate), same_seed=bool(same), position=position
            )
            return {"request": engine.prompt_list_requests(request, prompt_list_settings)}
        if matrix_on:
            at_start, random_seeds, prompt_type, delimiter, margin = matrix_settings
            matrix = PromptMatrix(bool(at_start), bool(random_seeds), prompt_type, delimiter, margin)
            matrix_plan = engine.prompt_matrix_plan(request, matrix)
            return {
                "request": list(matrix_plan.requests),
                "unit": "picture",
                "grid": functools.partial(matrix_grid, matrix_plan),
            }
    except EngineError as exc:
        raise engine_error(exc) from exc
    return {"request": request}


@dataclass
class PngInfoWidgets:
    image: gr.Image
    text: gr.Textbox
    table: gr.HTML
    send_txt2img: gr.Button
    send_img2img: gr.Button
    send_inpaint: gr.Button


def _build_png_info_tab() -> PngInfoWidgets:
    with gr.Row(equal_height=False):
        with gr.Column():
            # image_mode=None and type="filepath": the uploaded file as it is, text chunks intact.
            image = gr.Image(
                type="filepath",
                image_mode=None,
                label="Source image",
                sources=["upload", "clipboard"],
                elem_id="pnginfo_image",
                height=420,
            )
        with gr.Column():
            text = gr.Textbox(label="Parameters", lines=6, interactive=False, elem_id="pnginfo_text", buttons=["copy"])
            table = gr.HTML("", elem_id="pnginfo_params", apply_default_css=False)
            with gr.Row():
                send_txt2img = gr.Button("Send to txt2img", elem_id="pnginfo_send_to_txt2img", size="md")
                send_img2img = gr.Button("Send to img2img", elem_id="pnginfo_send_to_img2img", size="md")
                send_inpaint = gr.Button("Send to inpaint", elem_id="pnginfo_send_to_inpaint", size="md")
    return PngInfoWidgets(image, text, table, send_txt2img, send_img2img, send_inpaint)


def _build_hires_fix(engine) -> list[gr.components.Component]:
    """A1111's Hires. fix settings: the picture is made at the size above, upscaled, and denoised again."""
    limits = engine.limits
    with gr.Accordion("Hires. fix", open=False, elem_id="txt2img_hires_box"):
        enable = FieldCheckbox(
            False, label="Hires. fix: upscale the picture and denoise it again", elem_id="txt2img_enable_hr"
        )
        with gr.Row():
            upscaler = FieldDropdown(
                engine.hires_upscalers(), value="Latent", label="Upscaler", elem_id="txt2img_hr_upscaler"
            )
            reread_on_open(upscaler, engine.hires_upscalers)
            steps = FieldSlider(
                0,
                limits.max_steps,
                value=0,
                step=1,
                label="Hires steps",
                info="0: as many as Sampling steps",
                elem_id="txt2img_hr_second_pass_steps",
            )
            strength = FieldSlider(
                0, 1, value=0.7, step=0.01, label="Denoising strength", elem_id="txt2img_hr_denoising"
            )
        with gr.Row():
            scale = FieldSlider(1, 4, value=2, step=0.05, label="Upscale by", elem_id="txt2img_hr_scale")
            resize_x = FieldSlider(
                0,
                2048,
                value=0,
                step=8,
                label="Resize width to",
                info="0: by Upscale by",
                elem_id="txt2img_hr_resize_x",
            )
            resize_y = FieldSlider(0, 2048, value=0, step=8, label="Resize height to", elem_id="txt2img_hr_resize_y")
        with gr.Row():
            sampler = FieldDropdown(
                [SAME_SAMPLER, *engine.samplers()],
                value=SAME_SAMPLER,
                label="Hires sampling method",
                elem_id="txt2img_hr_sampler",
            )
            schedule = FieldDropdown(
                [SAME_SCHEDULE, *engine.schedulers()],
                value=SAME_SCHEDULE,
                label="Hires schedule type",
                elem_id="txt2img_hr_scheduler",
            )
        hr_prompt = gr.Textbox(
            "", label="Hires prompt", placeholder="empty: the prompt above", lines=2, elem_id="txt2img_hr_prompt"
        )
        hr_negative = gr.Textbox(
            "",
            label="Hires negative prompt",
            placeholder="empty: the negative prompt above",
            lines=2,
            elem_id="txt2img_hr_negative_prompt",
        )
        checkpoint = FieldDropdown(
            _second_model_choices(engine, SAME_CHECKPOINT),
            value=SAME_CHECKPOINT,
            label="Hires checkpoint",
            info="the model the second pass runs on: one of the same kind as the checkpoint above",
            elem_id="txt2img_hr_checkpoint",
        )
        reread_on_open(checkpoint, functools.partial(_second_model_choices, engine, SAME_CHECKPOINT))
    return [
        enable,
        upscaler,
        steps,
        strength,
        scale,
        resize_x,
        resize_y,
        sampler,
        schedule,
        hr_prompt,
        hr_negative,
        checkpoint,
    ]


# Wiring --------------------------------------------------------------------------------------------


def _wire_generation_tab(
    tab: TabWidgets, engine, session: gr.State, *, outputs_dir, save_image, server_folders: bool = False
) -> None:
    panel = tab.settings
    outputs = [tab.preview, tab.progress, tab.gallery, tab.infotext, tab.results]
    handler = _make_generate_handler(
        tab.mode, engine, outputs_dir=outputs_dir, save_image=save_image, server_folders=server_folders
    )
    inputs = [session, tab.ticket, *panel.request_inputs()]
    if tab.mode == "txt2img":
        inputs += tab.hires
    if tab.mode == "img2img":
        inputs += [tab.image, tab.denoising_strength]
    elif tab.mode == "inpaint":
        inputs += [tab.image, tab.mask, tab.denoising_strength, tab.mask_blur, tab.mask_mode]
    inputs += [tab.styles, *panel.variation_inputs()]
    if tab.resize_mode is not None:
        inputs.append(tab.resize_mode)
    if tab.inpaint_area is not None:
        inputs += [tab.inpaint_area, tab.inpaint_padding, tab.masked_content]
    inputs.append(panel.tiling)
    inputs += tab.prompt_list
    if tab.batch_images is not None:
        inputs.append(tab.batch_images)
    inputs += tab.refiner
    if tab.resize_by is not None:
        inputs.append(tab.resize_by)
    if tab.sd_upscale is not None:
        inputs += tab.sd_upscale
    inputs += tab.prompt_matrix
    if tab.loopback is not None:
        inputs += tab.loopback
    if tab.outpaint is not None:
        inputs += tab.outpaint
    if tab.outpaint_mk2 is not None:
        inputs += tab.outpaint_mk2
    if tab.sketch is not None:
        inputs += [tab.sketch, tab.init_source]
    if tab.inpaint_sketch is not None:
        inputs += tab.inpaint_sketch
    if tab.batch_folders is not None:
        inputs += tab.batch_folders
    # Showing the preview (and hiding the gallery) around the job is done by separate quick events, so
    # that the streamed endpoint returns plain values to API clients rather than visibility updates.
    # The click registers the job with the session at once, so that Stop also cancels it while it waits
    # in the queue behind other users' jobs.
    running_view = [tab.preview, tab.gallery, tab.generate]
    started = tab.generate.click(
        _show_running,
        inputs=[session],
        outputs=[*running_view, tab.progress, tab.ticket],
        queue=False,
        api_visibility="private",
        show_progress="hidden",
    )
    job = started.then(
        handler,
        inputs=inputs,
        outputs=outputs,
        api_name=tab.mode,
        api_description=handler.__doc__,
        concurrency_limit=1,
        concurrency_id="gpu",
        # Gradio's own tracker shows the queue position over the (empty) preview while the job waits.
        show_progress="full",
        show_progress_on=[tab.preview],
    )
    # Gradio 6 runs .then() listeners only after success; .failure() covers errors.
    finished = job.then(
        _show_finished, outputs=running_view, queue=False, api_visibility="private", show_progress="hidden"
    )
    # Generate forever: the browser presses Generate again once a job has ended well (a failed one ends it),
    # so each round queues like any click and Stop reaches it.
    finished.then(
        None,
        inputs=[tab.forever],
        js=f"(on) => {{ if (on) setTimeout(() => document.querySelector('#{tab.mode}_generate').click(), 100); }}",
        queue=False,
        api_visibility="private",
        show_progress="hidden",
    )
    job.failure(lambda: False, outputs=[tab.forever], queue=False, api_visibility="private", show_progress="hidden")
    job.failure(
        _show_failed,
        outputs=[*running_view, tab.progress],
        queue=False,
        api_visibility="private",
        show_progress="hidden",
    )
    tab.stop.click(lambda: False, outputs=[tab.forever], queue=False, api_visibility="private", show_progress="hidden")
    tab.stop.click(
        _stop,
        inputs=[session],
        api_name="stop" if tab.mode == "txt2img" else None,
        api_visibility="public" if tab.mode == "txt2img" else "private",
        concurrency_limit=None,
        show_progress="hidden",
    )
    tab.skip.click(
        functools.partial(_skip, engine),
        inputs=[session],
        api_name="skip" if tab.mode == "txt2img" else None,
        api_visibility="public" if tab.mode == "txt2img" else "private",
        concurrency_limit=None,
        show_progress="hidden",
    )
    for box, counter, composable in (
        (panel.prompt, panel.prompt_tokens, True),
        (panel.negative_prompt, panel.negative_tokens, False),
    ):
        box.change(
            functools.partial(_count_tokens, engine, composable=composable),
            inputs=[box],
            outputs=[counter],
            trigger_mode="always_last",
            show_progress="hidden",
            api_visibility="private",
            concurrency_id="tokens",
            concurrency_limit=4,
        )
    # The folder is read again whenever the list is opened, so a LoRA added meanwhile is there.
    tab.add_lora.focus(
        lambda: gr.update(choices=_network_choices(engine)),
        outputs=[tab.add_lora],
        queue=False,
        api_visibility="private",
        show_progress="hidden",
    )
    tab.styles.focus(
        lambda: gr.update(choices=list(engine.styles())),
        outputs=[tab.styles],
        queue=False,
        api_visibility="private",
        show_progress="hidden",
    )
    _wire_style_editor(tab, engine)
    tab.add_lora.input(
        _add_lora_tag,
        inputs=[panel.prompt, tab.add_lora],
        outputs=[panel.prompt, tab.add_lora],
        queue=False,
        api_visibility="private",
        show_progress="hidden",
    )
    read = functools.partial(_read_prompts, engine)
    for trigger in (panel.prompt, panel.negative_prompt, panel.steps):
        trigger.change(
            read,
            inputs=[panel.prompt, panel.negative_prompt, panel.steps],
            outputs=[tab.prompt_reading],
            trigger_mode="always_last",
            show_progress="hidden",
            api_visibility="private",
            concurrency_id="tokens",
            concurrency_limit=4,
        )
    panel.random_seed.click(lambda: -1, outputs=[panel.seed], api_visibility="private", queue=False)
    panel.reuse_seed.click(_reuse_seed, inputs=[tab.results], outputs=[panel.seed], api_visibility="private")
    panel.seed_extra.change(
        lambda shown: gr.update(visible=bool(shown)),
        inputs=[panel.seed_extra],
        outputs=[panel.seed_extra_row],
        api_visibility="private",
        queue=False,
    )
    panel.random_subseed.click(lambda: -1, outputs=[panel.subseed], api_visibility="private", queue=False)
    panel.reuse_subseed.click(
        functools.partial(_reuse_seed, variation=True),
        inputs=[tab.results],
        outputs=[panel.subseed],
        api_visibility="private",
    )
    panel.swap_size.click(
        lambda w, h: (h, w),
        inputs=[panel.width, panel.height],
        outputs=[panel.width, panel.height],
        api_visibility="private",
        queue=False,
    )
    tab.gallery.select(_select_result, inputs=[tab.results], outputs=[tab.infotext], api_visibility="private")


def _make_generate_handler(mode: str, engine, *, outputs_dir, save_image, server_folders: bool = False):
    """A generator function per mode, with the endpoint's parameters named and documented. `server_folders`:
    whether a batch may name folders of this machine (ServerSettings.server_folders)."""
    common = dict(engine=engine, mode=mode, outputs_dir=outputs_dir, save_image=save_image)

    if mode == "txt2img":

        def txt2img(
            session: PageSession,
            ticket: int | None,
            prompt: str,
            negative_prompt: str,
            sampler_name: str,
            scheduler: str,
            steps: int,
            cfg_scale: float,
            seed: int,
            width: int,
            height: int,
            n_iter: int,
            batch_size: int,
            enable_hr: bool = False,
            hr_upscaler: str = "Latent",
            hr_second_pass_steps: int = 0,
            denoising_strength: float = 0.7,
            hr_scale: float = 2.0,
            hr_resize_x: int = 0,
            hr_resize_y: int = 0,
            hr_sampler_name: str = "Use same sampler",
            hr_scheduler: str = "Use same scheduler",
            hr_prompt: str = "",
            hr_negative_prompt: str = "",
            hr_checkpoint_name: str = SAME_CHECKPOINT,
            styles: list[str] | None = None,
            seed_extra: bool = False,
            subseed: int = -1,
            subseed_strength: float = 0.0,
            seed_resize_from_w: int = 0,
            seed_resize_from_h: int = 0,
            tiling: bool = False,
            prompt_list: bool = False,
            iterate_seed: bool = False,
            same_seed: bool = False,
            prompt_position: str = "start",
            prompt_list_text: str = "",
            refiner_checkpoint: str = NO_REFINER,
            refiner_switch_at: float = 0.8,
            matrix_on: bool = False,
            matrix_at_start: bool = False,
            matrix_random_seeds: bool = False,
            matrix_prompt_type: str = "positive",
            matrix_joiner: str = "comma",
            matrix_margin: int = 0,
        ):
            """Text to image. Streams (preview, progress HTML, gallery, infotext) updates; the last has the
            gallery of PNGs (each with its A1111 "parameters" text chunk) and the first image's infotext.
            seed -1 is random; n_iter is the batch count. enable_hr and the hr_* values are A1111's
            hires fix (denoising_strength is its second pass's). With seed_extra, subseed is blended in at
            subseed_strength and the seed's noise is drawn at seed_resize_from_w x _h (0: off), as in A1111.
            tiling makes a picture whose edges continue each other (A1111's Tiling). With prompt_list, each line of
            prompt_list_text is a job (A1111's "Prompts from file or textbox": a prompt, or --options; iterate_seed,
            same_seed and prompt_position are its settings), all into one gallery. refiner_checkpoint ("None": off)
            takes over at refiner_switch_at of the noise schedule (A1111's refiner; in the hires pass with hires fix).
            matrix_* are A1111's Prompt matrix (on, set at start, random seeds, prompt type, joining char, margins):
            a picture per combination of the prompt's | parts, their grid first."""
            variation = _variation(seed_extra, subseed, subseed_strength, seed_resize_from_w, seed_resize_from_h)
            request = build_request(
                prompt=prompt,
                negative_prompt=negative_prompt,
                sampler_name=sampler_name,
                scheduler=scheduler,
                steps=steps,
                cfg_scale=cfg_scale,
                seed=seed,
                width=width,
                height=height,
                n_iter=n_iter,
                batch_size=batch_size,
                styles=styles,
                **variation,
                denoising_strength=denoising_strength,
            )
            request = with_hires(
                request,
                enable_hr,
                hr_upscaler,
                hr_second_pass_steps,
                denoising_strength,
                hr_scale,
                hr_resize_x,
                hr_resize_y,
                hr_sampler_name,
                hr_scheduler,
                hr_prompt,
                hr_negative_prompt,
                hr_checkpoint_name,
            )
            request = dataclasses.replace(
                request, tiling=bool(tiling), **_refiner_fields(refiner_checkpoint, refiner_switch_at)
            )
            listed = (prompt_list, iterate_seed, same_seed, prompt_position, prompt_list_text)
            matrix = (matrix_on, matrix_at_start, matrix_random_seeds, matrix_prompt_type, matrix_joiner, matrix_margin)
            yield from run_job(session=session, ticket=ticket, **_scripted(engine, request, listed, matrix), **common)

        return txt2img

    if mode == "img2img":

        def img2img(
            session: PageSession,
            ticket: int | None,
            prompt: str,
            negative_prompt: str,
            sampler_name: str,
            scheduler: str,
            steps: int,
            cfg_scale: float,
            seed: int,
            width: int,
            height: int,
            n_iter: int,
            batch_size: int,
            init_image: Image.Image | None,
            denoising_strength: float,
            styles: list[str] | None = None,
            seed_extra: bool = False,
            subseed: int = -1,
            subseed_strength: float = 0.0,
            seed_resize_from_w: int = 0,
            seed_resize_from_h: int = 0,
            resize_mode: int = 0,
            tiling: bool = False,
            prompt_list: bool = False,
            iterate_seed: bool = False,
            same_seed: bool = False,
            prompt_position: str = "start",
            prompt_list_text: str = "",
            batch_images: list[str] | None = None,
            refiner_checkpoint: str = NO_REFINER,
            refiner_switch_at: float = 0.8,
            resize_by: float = 0.0,
            sd_upscale: bool = False,
            sd_upscale_overlap: int = 64,
            sd_upscale_upscaler: str = "Lanczos",
            sd_upscale_scale: float = 2.0,
            matrix_on: bool = False,
            matrix_at_start: bool = False,
            matrix_random_seeds: bool = False,
            matrix_prompt_type: str = "positive",
            matrix_joiner: str = "comma",
            matrix_margin: int = 0,
            loopback_on: bool = False,
            loopback_loops: int = 4,
            loopback_final_denoising: float = 0.5,
            loopback_curve: str = "Linear",
            outpaint_on: bool = False,
            outpaint_pixels: int = 128,
            outpaint_mask_blur: int = 4,
            outpaint_masked_content: str = "fill",
            outpaint_directions: list[str] | None = None,
            outpaint_mk2_on: bool = False,
            outpaint_mk2_pixels: int = OUTPAINT_MK2_DEFAULTS["pixels"],
            outpaint_mk2_mask_blur: int = OUTPAINT_MK2_DEFAULTS["mask_blur"],
            outpaint_mk2_directions: list[str] | None = None,
            outpaint_mk2_noise_q: float = OUTPAINT_MK2_DEFAULTS["noise_q"],
            outpaint_mk2_color_variation: float = OUTPAINT_MK2_DEFAULTS["color_variation"],
            sketch: dict | None = None,
            init_source: str = INIT_SOURCES[0],
            batch_input_dir: str = "",
            batch_output_dir: str = "",
            batch_skip_done: bool = False,
            batch_png_info: list[str] | None = None,
            batch_png_info_dir: str = "",
        ):
            """Image to image: like /txt2img plus the init image and the denoising strength (0..1); resize_mode
            is A1111's (0 just resize, 1 crop and resize, 2 resize and fill, 3 just resize (latent upscale)).
            batch_images (files) run one job each, in place of init_image, into one gallery. With sd_upscale
            (A1111's SD upscale script) the init image is upscaled sd_upscale_scale times by sd_upscale_upscaler
            and redrawn in width x height tiles overlapping by sd_upscale_overlap pixels. matrix_* are A1111's Prompt
            matrix, loopback_* its Loopback (loops, final denoising strength, curve) and outpaint_* its Poor man's
            outpainting (pixels to expand, mask blur, masked content, directions), outpaint_mk2_* its Outpainting mk2
            (pixels to expand, mask blur, directions, fall-off exponent, colour variation). `sketch` is A1111's Sketch, an
            image-editor value (a picture, or a blank canvas, with strokes in colour): the picture with its strokes
            is the init image when init_image is None (on the page: when the Sketch tab is shown).
            batch_input_dir (A1111's Batch from folders, where the server allows it) runs one job per picture in
            that folder of the server and its subfolders, writing the results under the pictures' names into
            batch_output_dir (empty: the outputs folder); batch_skip_done leaves out those already there;
            batch_png_info names what to take from each picture's own infotext (Prompt, Negative prompt, Seed, CFG
            scale, Sampler, Steps), or from its namesake's in batch_png_info_dir."""
            looping = _looping(loopback_on, loopback_loops, loopback_final_denoising, loopback_curve)
            plan = folder_plan(
                server_folders,
                batch_input_dir,
                batch_output_dir,
                skip_done=batch_skip_done,
                png_info=batch_png_info,
                png_info_dir=batch_png_info_dir,
                counts=(n_iter, batch_size, looping),
                refused_with={
                    "uploaded batch files": bool(batch_images),
                    "a prompt list": prompt_list,
                    "the prompt matrix": matrix_on,
                },
            )
            pictures = batch_pictures(batch_images, "batch_images")
            if pictures and (prompt_list or matrix_on):
                script = "a prompt list" if prompt_list else "the prompt matrix"
                raise PageError(
                    f"batch_images: got a batch with {script}; allowed: one of the two (clear the batch's files, "
                    f"or untick {'the prompt list' if prompt_list else 'Prompt matrix'})"
                )
            init_image = pictures[0] if pictures else _init_picture(init_image, sketch, init_source)
            if plan is not None:
                init_image = None  # each picture of the folder in turn
            elif init_image is None:
                raise PageError("init_images: got nothing; allowed: an image (upload one in img2img, or draw a Sketch)")
            variation = _variation(seed_extra, subseed, subseed_strength, seed_resize_from_w, seed_resize_from_h)
            request = build_request(
                prompt=prompt,
                negative_prompt=negative_prompt,
                sampler_name=sampler_name,
                scheduler=scheduler,
                steps=steps,
                cfg_scale=cfg_scale,
                seed=seed,
                width=width,
                height=height,
                n_iter=n_iter,
                batch_size=batch_size,
                styles=styles,
                **variation,
                init_image=init_image,
                denoising_strength=denoising_strength,
                resize_mode=resize_mode,
            )
            request = dataclasses.replace(
                request,
                tiling=bool(tiling),
                **_refiner_fields(refiner_checkpoint, refiner_switch_at),
                sd_upscale=sd_upscale,
                sd_upscale_overlap=sd_upscale_overlap,
                sd_upscale_upscaler=sd_upscale_upscaler,
                sd_upscale_scale=sd_upscale_scale,
                **_outpainting(
                    outpaint_on,
                    outpaint_pixels,
                    outpaint_mask_blur,
                    outpaint_masked_content,
                    list(OUTPAINT_DIRECTIONS) if outpaint_directions is None else outpaint_directions,
                ),
                **_outpainting_mk2(
                    outpaint_mk2_on,
                    outpaint_mk2_pixels,
                    outpaint_mk2_mask_blur,
                    list(OUTPAINT_DIRECTIONS) if outpaint_mk2_directions is None else outpaint_mk2_directions,
                    outpaint_mk2_noise_q,
                    outpaint_mk2_color_variation,
                ),
            )
            # A batch's pictures share one seed, drawn once where it is -1 (A1111's fix_seed), and with Loopback
            # on, each picture loops back on its own.
            if plan is not None:
                yield from _folder_job(
                    plan, request, looping, resize_by, batch_png_info, session=session, ticket=ticket, **common
                )
                return
            if pictures:
                request = dataclasses.replace(request, **looping).with_seeds_drawn()
                batch = [
                    _folder_request(request, picture, None, resize_by=resize_by, engine=engine) for picture in pictures
                ]
                yield from run_job(session=session, request=batch, ticket=ticket, unit="init image", **common)
                return
            request = _resized_by(request, resize_by, engine)
            listed = (prompt_list, iterate_seed, same_seed, prompt_position, prompt_list_text)
            matrix = (matrix_on, matrix_at_start, matrix_random_seeds, matrix_prompt_type, matrix_joiner, matrix_margin)
            looping = (loopback_on, loopback_loops, loopback_final_denoising, loopback_curve)
            yield from run_job(
                session=session, ticket=ticket, **_scripted(engine, request, listed, matrix, looping), **common
            )

        return img2img

    def inpaint(
        session: PageSession,
        ticket: int | None,
        prompt: str,
        negative_prompt: str,
        sampler_name: str,
        scheduler: str,
        steps: int,
        cfg_scale: float,
        seed: int,
        width: int,
        height: int,
        n_iter: int,
        batch_size: int,
        image: dict | None,
        mask: Image.Image | None,
        denoising_strength: float,
        mask_blur: int,
        mask_mode: str,
        styles: list[str] | None = None,
        seed_extra: bool = False,
        subseed: int = -1,
        subseed_strength: float = 0.0,
        seed_resize_from_w: int = 0,
        seed_resize_from_h: int = 0,
        resize_mode: int = 0,
        inpaint_area: str = "Whole picture",
        inpaint_full_res_padding: int = 32,
        inpainting_fill: str = "original",
        tiling: bool = False,
        prompt_list: bool = False,
        iterate_seed: bool = False,
        same_seed: bool = False,
        prompt_position: str = "start",
        prompt_list_text: str = "",
        refiner_checkpoint: str = NO_REFINER,
        refiner_switch_at: float = 0.8,
        resize_by: float = 0.0,
        matrix_on: bool = False,
        matrix_at_start: bool = False,
        matrix_random_seeds: bool = False,
        matrix_prompt_type: str = "positive",
        matrix_joiner: str = "comma",
        matrix_margin: int = 0,
        loopback_on: bool = False,
        loopback_loops: int = 4,
        loopback_final_denoising: float = 0.5,
        loopback_curve: str = "Linear",
        inpaint_sketch: bool = False,
        mask_transparency: float = 0,
        batch_input_dir: str = "",
        batch_mask_dir: str = "",
        batch_output_dir: str = "",
        batch_skip_done: bool = False,
        batch_png_info: list[str] | None = None,
        batch_png_info_dir: str = "",
    ):
        """Inpaint: like /img2img; `image` is an image-editor value whose painted layer is the mask
        (white = repaint), or give `mask` (a white-on-black image of the same size). inpaint_area is
        A1111's: "Whole picture", or "Only masked" (the region around the mask, inpaint_full_res_padding
        pixels wider, inpainted at width x height and pasted back); inpainting_fill is A1111's masked content:
        "fill", "original", "latent noise" or "latent nothing". matrix_* are A1111's Prompt matrix and loopback_* its
        Loopback (loops, final denoising strength, curve), as on /img2img. With inpaint_sketch (A1111's Inpaint
        sketch) the strokes on `image` are painted in colour: they are the mask, dimmed by mask_transparency (0 to
        100 %), and their colours go into the picture the masked part starts from. batch_input_dir and
        batch_mask_dir (A1111's Batch from folders, where the server allows it) inpaint every picture in that folder
        of the server with its mask (the mask folder's only picture, or the one named as the picture), writing the
        results under the pictures' names into batch_output_dir (empty: the outputs folder); batch_skip_done leaves
        out those already there; batch_png_info and batch_png_info_dir as on /img2img."""
        looping = _looping(loopback_on, loopback_loops, loopback_final_denoising, loopback_curve)
        plan = folder_plan(
            server_folders,
            batch_input_dir,
            batch_output_dir,
            mask_dir=batch_mask_dir,
            skip_done=batch_skip_done,
            png_info=batch_png_info,
            png_info_dir=batch_png_info_dir,
            counts=(n_iter, batch_size, looping),
            refused_with={
                "Inpaint sketch": inpaint_sketch,
                "a prompt list": prompt_list,
                "the prompt matrix": matrix_on,
            },
            mask_needed=True,
        )
        init_image, painted = editor_image_and_mask(image)
        if plan is not None:
            init_image = chosen_mask = None  # each picture's, and its mask, from the folders in turn
        elif init_image is None:
            raise PageError("init_images: got nothing; allowed: an image (upload one in inpaint)")
        elif inpaint_sketch:
            sketched = (init_image, painted, mask, mask_blur, mask_transparency)
            init_image, chosen_mask = _inpaint_sketched(image, *sketched, limits=engine.limits)
        else:
            chosen_mask = mask if mask is not None else painted
            if chosen_mask is None:
                raise PageError("mask: got nothing; allowed: paint over the image, or upload a mask (white = repaint)")
        variation = _variation(seed_extra, subseed, subseed_strength, seed_resize_from_w, seed_resize_from_h)
        request = build_request(
            prompt=prompt,
            negative_prompt=negative_prompt,
            sampler_name=sampler_name,
            scheduler=scheduler,
            steps=steps,
            cfg_scale=cfg_scale,
            seed=seed,
            width=width,
            height=height,
            n_iter=n_iter,
            batch_size=batch_size,
            styles=styles,
            **variation,
            init_image=init_image,
            mask=chosen_mask,
            denoising_strength=denoising_strength,
            mask_blur=mask_blur,
            mask_mode=mask_mode,
            resize_mode=resize_mode,
        )
        request = dataclasses.replace(
            request,
            inpaint_full_res=inpaint_area == INPAINT_AREAS[1],
            inpaint_full_res_padding=inpaint_full_res_padding,
            inpainting_fill=MASKED_CONTENT.index(inpainting_fill)
            if inpainting_fill in MASKED_CONTENT
            else inpainting_fill,
        )
        request = dataclasses.replace(
            request, tiling=bool(tiling), **_refiner_fields(refiner_checkpoint, refiner_switch_at)
        )
        if plan is not None:
            yield from _folder_job(
                plan, request, looping, resize_by, batch_png_info, session=session, ticket=ticket, **common
            )
            return
        request = _resized_by(request, resize_by, engine)
        listed = (prompt_list, iterate_seed, same_seed, prompt_position, prompt_list_text)
        matrix = (matrix_on, matrix_at_start, matrix_random_seeds, matrix_prompt_type, matrix_joiner, matrix_margin)
        looping = (loopback_on, loopback_loops, loopback_final_denoising, loopback_curve)
        yield from run_job(
            session=session, ticket=ticket, **_scripted(engine, request, listed, matrix, looping), **common
        )

    return inpaint


def _init_picture(image: Image.Image | None, sketch: dict | None, init_source: str) -> Image.Image | None:
    """img2img's init image: the uploaded picture, or the sketch (its picture with the strokes) when the Sketch
    tab is shown. Without an uploaded picture, a sketch with strokes is taken from either tab (an API call)."""
    drawn = editor_composite(sketch)
    if init_source == "sketch":
        return drawn if drawn is not None else image
    if image is None and editor_image_and_mask(sketch)[1] is not None:
        return drawn
    return image


def _inpaint_sketched(
    editor: dict, picture: Image.Image, strokes, uploaded_mask, mask_blur, mask_transparency, *, limits
):
    """Inpaint sketch's (init image, mask) from the editor's strokes; gr.Error naming the field that is wrong."""
    if uploaded_mask is not None:
        raise PageError(
            "mask: got an uploaded mask with Inpaint sketch on; allowed: one of the two (the sketch's strokes are its "
            "mask: remove the uploaded mask, or untick Inpaint sketch)"
        )
    if strokes is None:
        raise PageError("image: got no strokes; allowed: paint over the picture in colour (Inpaint sketch is on)")
    try:
        return sketched_inpaint(
            picture,
            editor_composite(editor),
            strokes,
            mask_blur=mask_blur,
            mask_transparency=mask_transparency,
            limits=limits,
        )
    except EngineError as exc:
        raise PageError(str(exc)) from exc


def _folder_job(plan, request: GenerationRequest, looping: dict, resize_by, png_info, *, engine, **run):
    """A folder batch's run (page_jobs.run_folder_batch): every picture with one seed, drawn once where it is -1
    (A1111's fix_seed), and with Loopback on, each picture looping on its own."""
    request = dataclasses.replace(request, **looping).with_seeds_drawn()
    made = functools.partial(_folder_request, request, resize_by=resize_by, engine=engine)
    return run_folder_batch(engine=engine, plan=plan, make_request=made, png_info=tuple(png_info or ()), **run)


def _folder_request(
    request: GenerationRequest, picture: Image.Image, mask: Image.Image | None, *, resize_by, engine
) -> GenerationRequest:
    """A batch's request for one of its pictures (and its mask), sized by Resize by from that picture."""
    with_picture = dataclasses.replace(request, init_images=[picture], mask=mask if mask is not None else request.mask)
    return _resized_by(with_picture, resize_by, engine)


def _resized_by(request: GenerationRequest, scale, engine) -> GenerationRequest:
    """A1111's "Resize by": the request's size is its init image's times `scale`, each side down to a multiple of
    8 (0: the request keeps Width x Height). gr.Error naming resize_by for a scale that leaves the size allowed."""
    if not scale:
        return request
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= MAX_RESIZE_BY:
        raise PageError(f"resize_by: got {scale!r}; allowed: 0 (off) or a scale up to {MAX_RESIZE_BY}")
    picture = request.init_images[0]
    width, height = int(picture.width * scale) // 8 * 8, int(picture.height * scale) // 8 * 8
    limits = engine.limits
    if min(width, height) < 8 or max(width, height) > limits.max_side or width * height > limits.max_pixels:
        raise PageError(
            f"resize_by: got {scale:g}, which makes the {picture.width}x{picture.height} picture {width}x{height}; "
            f"allowed: a scale that keeps each side from 8 to {limits.max_side} and at most {limits.max_pixels} pixels"
        )
    return dataclasses.replace(request, width=width, height=height)


def _refiner_fields(checkpoint: str | None, switch_at: float) -> dict:
    """The Refiner panel's values as request fields ("None" is no refiner)."""
    return {"refiner_checkpoint": checkpoint or "", "refiner_switch_at": switch_at}


def _variation(seed_extra, subseed, subseed_strength, seed_resize_from_w, seed_resize_from_h) -> dict:
    """The seed extras as build_request's keywords."""
    return dict(
        seed_extra=bool(seed_extra),
        subseed=subseed,
        subseed_strength=subseed_strength,
        seed_resize_from_w=seed_resize_from_w,
        seed_resize_from_h=seed_resize_from_h,
    )


def _wire_png_info(
    png: PngInfoWidgets,
    tab_widgets: dict[str, TabWidgets],
    tabs: gr.Tabs,
    *,
    session_settings: list,
    engine,
) -> None:
    """`session_settings`: the SD VAE list, the two etas, clip skip and the job settings (JOB_SETTINGS' order),
    which Send sets from the infotext."""
    png.image.change(
        _read_png_info,
        inputs=[png.image],
        outputs=[png.text, png.table],
        api_name="png_info",
        api_description="The A1111 parameters stored in an image (PNG text chunk or EXIF), raw and as a table.",
        show_progress="hidden",
    )
    for mode, button in (
        ("txt2img", png.send_txt2img),
        ("img2img", png.send_img2img),
        ("inpaint", png.send_inpaint),
    ):
        target = tab_widgets[mode]
        outputs = [*target.settings.fill_targets()]
        if mode == "txt2img":
            outputs += target.hires
        else:
            outputs = [target.image, *outputs, target.denoising_strength]
        outputs += [*target.settings.variation_inputs(), target.settings.tiling]
        if target.inpaint_area is not None:
            outputs += [target.inpaint_area, target.inpaint_padding, target.masked_content]
        outputs += target.refiner
        sent = button.click(
            functools.partial(_send_png_info, target_mode=mode, engine=engine),
            inputs=[png.image, png.text],
            outputs=[*outputs, *session_settings, tabs],
            api_visibility="private",
            show_progress="hidden",
        )
        _show_init_image_after(sent, target)
        # The same filling from the tab's own prompt box (or its last generation), its picture left as it is.
        target.paste.click(
            functools.partial(_paste_parameters, target_mode=mode, engine=engine),
            inputs=[target.settings.prompt, target.infotext],
            outputs=[*outputs, *session_settings, tabs],
            api_visibility="private",
            show_progress="hidden",
        )


# Handlers ------------------------------------------------------------------------------------------


def _show_running(session: PageSession):
    control = session.start_job()
    return (
        gr.update(value=None, visible=True),
        gr.update(visible=False),
        gr.update(interactive=False),
        progress_html(0.0, "Waiting for a free slot...", job_id=control.job_id),
        control.job_id,
    )


def _show_finished():
    return gr.update(visible=False), gr.update(visible=True), gr.update(interactive=True)


def _show_failed():
    failed = progress_html(0.0, "Not run: see the error message", state="idle")
    return (*_show_finished(), failed)


def _stop(session: PageSession) -> None:
    """Stop this session's running job; the job still shows what it made so far."""
    stopped = session.stop()
    log.info("Stop requested for %d job(s) of one session", stopped)


def _skip(engine, session: PageSession) -> None:
    """Cut this session's running batch short (A1111's Skip); the job goes on with its next batch. A job of
    another user, or one still waiting in the queue, is left alone."""
    if session.skip(engine.progress().job_id):
        log.info("Skip requested for one session's running job")


# A hypernetwork's entry in the network picker: its name after this (a tag's name never holds a colon).
_HYPERNET_CHOICE = "hypernet:"


def _network_choices(engine) -> list[tuple[str, str]]:
    """The network picker's (label, value) entries: the LoRAs by name, then the hypernetworks."""
    loras = [(lora.name, lora.name) for lora in engine.list_loras()]
    return loras + [(f"{net.name} (hypernetwork)", _HYPERNET_CHOICE + net.name) for net in engine.list_hypernets()]


def _add_lora_tag(prompt: str, name: str | None):
    """The prompt with `<lora:name:1>` (or, for a hypernetwork's entry, `<hypernet:name:1>`) added at the end
    (unless it already names that network), and the picker cleared for the next pick."""
    if not name:
        return gr.skip(), gr.skip()
    prompt = prompt or ""
    kind, uses = ("hypernet", hypernet_uses) if name.startswith(_HYPERNET_CHOICE) else ("lora", lora_uses)
    name = name.removeprefix(_HYPERNET_CHOICE)
    try:
        present = {use.name.lower() for use in uses(prompt)}
    except EngineError:  # a malformed tag already there: the prompt panel says what is wrong with it
        present = set()
    if name.lower() in present:
        return prompt, None
    return f"{prompt.rstrip()} <{kind}:{name}:1>".strip(), None


def _count_tokens(engine, text: str, *, composable: bool = False) -> str:
    try:
        return token_counter_html(engine.token_counts(text or "", composable))
    except EngineError as exc:
        # A prompt the parser rejects shows why next to the counter instead of a pop-up on every keystroke.
        return f'<span class="token-count error" title="{html.escape(str(exc))}">?/75</span>'


def _read_prompts(engine, prompt: str, negative_prompt: str, steps) -> str:
    """The parsed view: fragments with weights for each stretch of steps, and tokens per chunk."""
    try:
        steps = int(steps or 20)
        parts = engine.composable_parts(prompt)
        if len(parts) == 1 and parts[0][1] == 1.0:
            readings = prompt_reading_html(engine.describe_prompt(prompt, steps), label="Prompt")
        else:  # AND: each part guides the picture on its own, by its weight
            readings = "".join(
                prompt_reading_html(
                    engine.describe_prompt(text, steps),
                    label=f"Prompt, part {index} of {len(parts)} (AND), weight {weight:.3g}",
                )
                for index, (text, weight) in enumerate(parts, start=1)
            )
        return (
            readings
            + prompt_reading_html(engine.describe_prompt(negative_prompt, steps), label="Negative prompt")
            + lora_reading_html(engine.describe_loras(prompt))
            + hypernet_reading_html(engine.describe_hypernets(prompt))
        )
    except (EngineError, ValueError, TypeError) as exc:
        return f'<span class="token-count error">{html.escape(str(exc))}</span>'


def _reuse_seed(view: ResultView | None, *, variation: bool = False):
    """The selected result's seed (or variation seed) for the ♻ button."""
    if view is None:
        seed = None
    else:
        seed = view.selected_subseed() if variation else view.selected_seed()
    if seed is None:
        gr.Info("No result yet: generate an image first.")
        return gr.skip()
    return seed


def _select_result(view: ResultView | None, evt: gr.SelectData) -> str:
    if view is None or not view.infotexts:
        return ""
    view.selected = int(evt.index) if evt.index is not None else 0
    return view.selected_infotext()


def _set_prompt_syntax(session: PageSession, syntax: str) -> None:
    """Prompt syntax for this session's jobs: "a1111" or "compel"."""
    if syntax not in PROMPT_SYNTAXES:
        raise PageError(f"prompt_syntax: got {syntax!r}; allowed: {', '.join(PROMPT_SYNTAXES)}")
    session.prompt_syntax = syntax


def _set_emphasis(session: PageSession, emphasis: str) -> None:
    """A1111 emphasis mode for this session's jobs: "Original", "No norm" or "Ignore"."""
    if emphasis not in EMPHASIS_MODES:
        raise PageError(f"emphasis: got {emphasis!r}; allowed: {', '.join(EMPHASIS_MODES)}")
    session.emphasis = emphasis


def _set_eta_ancestral(session: PageSession, eta: float) -> None:
    """Eta for Euler a in this session's jobs: 0 (no fresh noise: Euler) to 1 (A1111's default)."""
    session.eta_ancestral = _eta_value(eta)


def _set_eta_ddim(session: PageSession, eta: float) -> None:
    """Eta for DDIM in this session's jobs: 0 (A1111's default, deterministic) to 1."""
    session.eta_ddim = _eta_value(eta)


def _set_clip_skip(session: PageSession, clip_skip) -> None:
    """A1111's Clip skip for this session's jobs: 1 (the text encoder's last layer) to 12. A model whose text
    encoder has fewer layers refuses a larger one when the job is checked; SDXL models ignore it, as in A1111."""
    session.clip_skip = _whole_setting(clip_skip, "Clip skip", 1, MAX_CLIP_SKIP)


# The page's short names of the job settings, in its /set_<name> endpoints, its remembered settings and its
# `setting_<name>` elements; the others go by their request field.
_JOB_SETTING_NAMES = {
    "eta_noise_seed_delta": "ensd",
    "initial_noise_multiplier": "noise_multiplier",
    "img2img_extra_noise": "extra_noise",
    "s_min_uncond": "ngms",
    "s_min_uncond_all": "ngms_all",
}


def _job_setting_name(setting: JobSetting) -> str:
    return _JOB_SETTING_NAMES.get(setting.field, setting.field)


def _job_setting_widget(field: str, label: str, *, info: str, step: float = 0.01) -> gr.components.Component:
    """The Settings tab's widget for a job setting, with its range and default: a checkbox for a switch, radio
    buttons for a choice, a whole number box, or a slider."""
    setting = JOB_SETTING_BY_FIELD[field]
    elem_id = f"setting_{_job_setting_name(setting)}"
    if setting.is_switch:
        return FieldCheckbox(value=setting.default, label=label, info=info, elem_id=elem_id)
    if setting.is_choice:
        return FieldRadio(list(setting.choices), value=setting.default, label=label, info=info, elem_id=elem_id)
    if setting.is_whole:
        return FieldNumber(
            setting.default,
            precision=0,
            minimum=setting.lowest,
            maximum=setting.highest,
            label=label,
            info=info,
            elem_id=elem_id,
        )
    return FieldSlider(
        setting.lowest, setting.highest, value=setting.default, step=step, label=label, info=info, elem_id=elem_id
    )


def _job_setting_setter(setting: JobSetting):
    """The page's setter of a job setting for one session, described for gradio_client users."""

    def set_job_setting(session: PageSession, value) -> None:
        try:
            session.job_settings[setting.field] = setting.checked(value)
        except EngineError as exc:
            raise engine_error(exc) from exc

    set_job_setting.__doc__ = f"A1111's {setting.summary}. For this session's jobs: {setting.allowed()}."
    return set_job_setting


def _eta_value(eta) -> float:
    return _number_setting(eta, "eta", 0, 1)


def _whole_setting(value, name: str, low: int, high: int) -> int:
    """A whole number from a Settings widget, from `low` to `high`; gr.Error naming the setting otherwise."""
    try:
        whole = not isinstance(value, bool) and float(value) == int(float(value))
    except (TypeError, ValueError):
        whole = False
    if not whole or not low <= int(float(value)) <= high:
        raise PageError(f"{name}: got {value!r}; allowed: a whole number from {low} to {high}")
    return int(float(value))


def _number_setting(value, name: str, low: float, high: float) -> float:
    """A number from a Settings widget, from `low` to `high`; gr.Error naming the setting otherwise."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not low <= number <= high:  # NaN too
        raise PageError(f"{name}: got {value!r}; allowed: {low} to {high}")
    return number


def _vae_choices(engine) -> list[str]:
    if engine.forced_vae is not None:  # A1111's --vae-path: no other choice does anything
        return [engine.forced_vae.name]
    return ["Automatic", "None", *engine.list_vaes()]


def _hypernet_choices(engine) -> list[str]:
    return ["None", *(found.name for found in engine.list_hypernets())]


# A1111's slider for extra_networks_default_multiplier.
MAX_EXTRA_NETWORKS_MULTIPLIER = 2.0


def _set_sd_hypernetwork(engine, session: PageSession, name: str) -> None:
    """A1111's "Add hypernetwork to prompt" for this session's jobs: "None" or a hypernetwork in the folder, whose tag
    then goes at the end of every prompt that does not name it."""
    choices = _hypernet_choices(engine)
    if name not in choices:
        raise PageError(f"sd_hypernetwork: got {name!r}; allowed: one of {', '.join(choices)}")
    session.sd_hypernetwork = name


def _set_extra_networks_multiplier(session: PageSession, multiplier) -> None:
    """The strength "Add hypernetwork to prompt" adds its hypernetwork at, in this session's jobs: 0 to 2."""
    session.extra_networks_default_multiplier = _number_setting(
        multiplier, "extra_networks_default_multiplier", 0, MAX_EXTRA_NETWORKS_MULTIPLIER
    )


def _set_vae(engine, session: PageSession, sd_vae: str) -> None:
    """A1111's SD VAE for this session's jobs: "Automatic", "None" or a file in the VAE folder."""
    try:
        session.sd_vae = vae_choice(sd_vae, engine.list_vaes(), engine.registry.vae_dir)
    except EngineError as exc:
        raise engine_error(exc) from exc


def _set_preview_mode(session: PageSession, mode: str) -> None:
    """Live preview mode for this session's jobs: approx, vae, taesd or none."""
    session.preview_mode = valid_preview_mode(mode)


def _set_preview_every(session: PageSession, every: float) -> None:
    """Make a live preview every N steps (this session only)."""
    session.preview_every = max(1, int(every or 1))


def _set_save_images(session: PageSession, enabled: bool) -> None:
    """Save this session's results to the outputs folder."""
    session.save_images = bool(enabled)


def _set_batch_grid(session: PageSession, enabled: bool) -> None:
    """Show a grid of a job's pictures first in the gallery (and save it with them), as A1111 does by default."""
    session.batch_grid = bool(enabled)


def _model_titles(engine) -> list[str]:
    titles = [info.title for info in engine.list_models()]
    current = engine.model.title
    return titles if current in titles else [current, *titles]


def _model_note(engine) -> str:
    if not engine.model_loaded:
        # Reading the family or embeddings would load the model back: say what happened instead.
        return '<div class="model-note">Unloaded from memory: the next job loads it back.</div>'
    family = engine.defaults().label + (", inpainting model" if engine.loaded.inpainting_unet else "")
    lines = [f"Model family: {html.escape(family)}"]
    embeddings = engine.loaded.embeddings
    # Names only (reasons on hover and in the log), and only the first few: an A1111 embeddings folder
    # can hold dozens, and a folder of SD 1.5 embeddings on an SDXL model would otherwise fill the header.
    if embeddings.loaded:
        lines.append(f"Embeddings: {html.escape(_first_names(list(embeddings.loaded)))}")
    if embeddings.reasons:
        why = "; ".join(f"{name}: {reason}" for name, reason in embeddings.reasons.items())
        names = html.escape(_first_names(list(embeddings.reasons)))
        lines.append(f'<span title="{html.escape(why)}">Embeddings skipped: {names}</span>')
    loras = [lora.name for lora in engine.list_loras()]
    if loras:
        lines.append(f"LoRAs (&lt;lora:name:1&gt; in the prompt): {html.escape(_first_names(loras))}")
    hypernets = [net.name for net in engine.list_hypernets()]
    if hypernets:
        lines.append(f"Hypernetworks (&lt;hypernet:name:1&gt;): {html.escape(_first_names(hypernets))}")
    return f'<div class="model-note">{"<br>".join(lines)}</div>'


def _unload_model(engine) -> tuple[str, str]:
    before = engine.memory()
    info = engine.unload_model()
    if info is None:
        return _model_note(engine), "No checkpoint is loaded."
    after = engine.memory()
    return _model_note(engine), f"Unloaded {info.title}. {_memory_change(before, after)}"


def _reload_model(engine) -> tuple[str, str]:
    before = engine.memory()
    try:
        info = engine.reload_model()
    except EngineError as exc:
        raise engine_error(exc) from exc
    return _model_note(engine), f"Loaded {info.title}. {_memory_change(before, engine.memory())}"


def _memory_change(before: dict, after: dict) -> str:
    """The memory line after an unload or reload, with how much this program's memory changed."""
    line = describe_memory(after)
    if "error" in before["ram"] or "error" in after["ram"]:
        return line
    change = (after["ram"]["used"] - before["ram"]["used"]) / 1024**2
    return f"{line} ({change:+.0f} MB)"


def _first_names(names: list[str], shown: int = 8) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _refresh_models(engine, *, embeddings: bool = False):
    """The model list rescanned, and the model loaded now (shared by all users: one engine); with
    `embeddings`, the embeddings folder read again if it changed (the ↻ button, as A1111's refresh)."""
    if embeddings:
        engine.refresh_embeddings()
    return gr.update(choices=_model_titles(engine), value=engine.model.title), _model_note(engine)


def _load_model(engine, title: str):
    try:
        info = engine.load_model(title)
    except EngineError as exc:
        raise engine_error(exc) from exc
    gr.Info(f"Loaded {info.title}")
    return gr.update(choices=_model_titles(engine), value=info.title), _model_note(engine)


def _read_png_info(path: str | None):
    if not path:
        return "", ""
    try:
        text = read_infotext(Path(path).read_bytes())
    except (OSError, EngineError) as exc:
        raise PageError(f"Could not read that image: {exc}") from exc
    if not text:
        return "", '<div class="png-params-empty">No generation parameters in this image.</div>'
    return text, params_table_html(parse_infotext_params(text))


@dataclass(frozen=True)
class ReadInfotext:
    """An infotext read once for a Send button: the request it describes and its parameters as written."""

    request: GenerationRequest
    params: dict[str, str]

    @classmethod
    def of(cls, text: str) -> ReadInfotext:
        """gr.Error naming the field when the text cannot be read."""
        try:
            return cls(parse_infotext(text, unsupported_schedule="automatic"), parse_infotext_params(text))
        except EngineError as exc:
            raise engine_error(exc) from exc


def _settings_from_infotext(read: ReadInfotext, *, with_denoising: bool) -> list:
    """Field values for SettingsWidgets.fill_targets (and denoising strength) from an A1111 infotext."""
    request, params = read.request, read.params
    written = params.get("Schedule type", "")
    if written and written.lower().replace("_", " ") != request.scheduler.lower():
        gr.Warning(
            f"Schedule type {written} is not available for {request.sampler_name} here (diffusers has no such "
            f"scheduler); using {request.scheduler}, the sampler's A1111 default."
        )
    keep = gr.skip()
    values = [
        request.prompt,
        request.negative_prompt,
        request.sampler_name,
        request.scheduler,
        request.steps,
        request.cfg_scale,
        request.seed,
        request.width if request.width is not None else keep,
        request.height if request.height is not None else keep,
    ]
    if with_denoising:
        values.append(request.denoising_strength if "Denoising strength" in params else keep)
    return values


def _send_png_info(path: str | None, text: str, *, target_mode: str, engine):
    if not text:
        raise PageError("No generation parameters to send: drop a PNG made by this app (or A1111) first.")
    read = ReadInfotext.of(text)
    unread = unread_settings(read.request)
    if unread:
        listed = ", ".join(f"{key}: {value}" for key, value in unread.items())
        gr.Warning(f"Not set from the text (not run here, or an extension's), so the picture may differ: {listed}")
    named = named_job_settings(read.params)
    if named:
        # They stay the session's (and this browser's) for the jobs after this one too: say which.
        listed = ", ".join(
            f"{setting.infotext_key}: {getattr(read.request, setting.field)}"
            for setting in JOB_SETTINGS
            if setting.field in named
        )
        gr.Info(f"Set from the text as this session's settings (Settings tab): {listed}")
    values = _settings_from_infotext(read, with_denoising=target_mode != "txt2img")
    variation = [*_variation_from_infotext(read), read.request.tiling]
    refiner = [
        _model_from_infotext(read.request.refiner_checkpoint, engine, none=NO_REFINER, label="Refiner"),
        read.request.refiner_switch_at,
    ]
    session_settings = (
        _vae_from_infotext(engine, read),
        *_sampler_parameters_from_infotext(read),
        gr.Tabs(selected=target_mode),
    )
    if target_mode == "txt2img":
        return (*values, *_hires_settings_from_infotext(read, engine), *variation, *refiner, *session_settings)
    image = _open_image(path) if path else None
    if target_mode == "inpaint":
        variation = [*variation, *_inpaint_area_from_infotext(read)]
    return (_image_for(target_mode, image), *values, *variation, *refiner, *session_settings)


def _paste_parameters(prompt: str | None, last_infotext: str | None, *, target_mode: str, engine):
    """A1111's ↙ (its paste button): the tab's fields from the generation parameters pasted into the prompt box, or,
    when it is empty, from the tab's last generation, as PNG Info's Send sets them; the init picture stays."""
    text = (prompt or "").strip() or (last_infotext or "").strip()
    if not text:
        raise PageError(
            "Nothing to read: paste generation parameters (an A1111 infotext, as PNG Info shows one) into the prompt, "
            "or generate once and press it with the prompt empty."
        )
    if "Steps" not in parse_infotext_params(text):
        raise PageError(
            "prompt: holds no generation parameters (no line like 'Steps: 20, Sampler: Euler a, ...'); paste a whole "
            "infotext, as PNG Info shows one, or empty the prompt to read the last generation's."
        )
    return _send_png_info(None, text, target_mode=target_mode, engine=engine)


def _sampler_parameters_from_infotext(read: ReadInfotext) -> list:
    """The Settings tab's Eta for Euler a and Eta for DDIM from an infotext, each set where the infotext names it
    (A1111 pastes them as overrides), else left as it is; then Clip skip, 1 where the infotext names none (A1111
    writes it only when it is not 1, and pastes 1 then); then the job settings (JOB_SETTINGS' order), each set where
    the infotext names it (an A1111 text always sets the random source: engine.infotext.named_job_settings), else
    left as it is."""
    params = read.params
    values = []
    for key in ("Eta", "Eta DDIM"):
        try:
            values.append(float(params[key]))
        except (KeyError, ValueError):
            values.append(gr.skip())
    try:
        clip_skip = int(params.get("Clip skip", 1))
    except ValueError:
        clip_skip = 0
    named = named_job_settings(params)
    job_settings = [
        getattr(read.request, setting.field) if setting.field in named else gr.skip() for setting in JOB_SETTINGS
    ]
    return [*values, clip_skip if 1 <= clip_skip <= MAX_CLIP_SKIP else gr.skip(), *job_settings]


def _inpaint_area_from_infotext(read: ReadInfotext) -> list:
    """Inpaint area, its padding and the masked content, as the picture was made (Whole picture and original
    when the text says nothing)."""
    request = read.request
    content = MASKED_CONTENT[request.inpainting_fill]
    if not request.inpaint_full_res:
        return [INPAINT_AREAS[0], gr.skip(), content]
    return [INPAINT_AREAS[1], request.inpaint_full_res_padding, content]


def _vae_from_infotext(engine, read: ReadInfotext):
    """The SD VAE list's value for an infotext: the VAE it names when the VAE folder has it (else left as it
    is, with a warning), or Automatic when it names none (the model's own VAE, or one beside it)."""
    written = read.params.get("VAE")
    if not written:
        return "Automatic"
    try:
        return vae_choice(written, engine.list_vaes(), engine.registry.vae_dir)
    except EngineError:
        gr.Warning(f"VAE {written} is not in {engine.registry.vae_dir}: the SD VAE choice is left as it was.")
        return gr.skip()


def _variation_from_infotext(read: ReadInfotext) -> list:
    """Values for SettingsWidgets.variation_inputs from an infotext: Extra ticked with the picture's
    variation seed and seed resize where it had them, else unticked (the other values left as they are)."""
    request = read.request
    resized = request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0
    if request.subseed_strength <= 0 and not resized:
        return [False, *[gr.skip()] * 4]
    return [True, request.subseed, request.subseed_strength, request.seed_resize_from_w, request.seed_resize_from_h]


def _txt2img_settings_from_infotext(text: str) -> list:
    """The txt2img fields a Compare cell fills: the settings and the seed extras."""
    read = ReadInfotext.of(text)
    return [*_settings_from_infotext(read, with_denoising=False), *_variation_from_infotext(read)]


def _hires_settings_from_infotext(read: ReadInfotext, engine=None) -> list:
    """Values for the Hires. fix panel (TabWidgets.hires) from an infotext: switched on or off as the
    picture was made, and its settings where it was on. An upscaler model that is not in `engine`'s upscaler
    folders becomes Lanczos, with a warning saying where it would go."""
    request = read.request
    if not request.enable_hr:
        return [False, *[gr.skip()] * 11]
    upscaler = request.hr_upscaler
    available = engine.hires_upscalers() if engine is not None else list(HR_UPSCALERS)
    if upscaler not in available:
        where = f"put it in {engine.upscaler_folders()}" if engine is not None else "no upscaler models here"
        gr.Warning(f"Hires upscaler {upscaler} is not available here ({where}); using Lanczos.")
        upscaler = "Lanczos"
    return [
        True,
        upscaler,
        request.hr_second_pass_steps,
        request.denoising_strength,
        request.hr_scale,
        request.hr_resize_x,
        request.hr_resize_y,
        _listed(request.hr_sampler_name, sampler_names(), SAME_SAMPLER),
        _listed(request.hr_scheduler, schedule_type_names(), SAME_SCHEDULE),
        request.hr_prompt,
        request.hr_negative_prompt,
        _model_from_infotext(request.hr_checkpoint_name, engine, none=SAME_CHECKPOINT, label="Hires checkpoint"),
    ]


def _model_from_infotext(name: str, engine, *, none: str, label: str) -> str:
    """The model list's entry (Hires checkpoint, Refiner) for a model an infotext names (A1111 writes "name [hash]");
    one that is not here becomes `none` ("Use same checkpoint", "None"), with a warning."""
    if not name:
        return none
    try:
        info = engine.registry.resolve(name) if engine is not None else None
    except EngineError:
        info = None
    if info is None or info.kind == "hub":
        gr.Warning(f"{label} {name} is not in the model list: {none!r} is picked instead.")
        return none
    return engine.registry.with_hash(info).title


def _listed(name: str, choices: list[str], same: str) -> str:
    """A hires sampler or schedule type as its list shows it (an infotext writes none for "same")."""
    if not name:
        return same
    for choice in choices:
        if choice.lower() == name.strip().lower():
            return choice
    gr.Warning(f"{name} is not available here; the hires pass uses the first pass's.")
    return same


def _selected_picture(gallery, view: ResultView | None) -> Image.Image:
    """The result picked in a tab's gallery; gr.Error when there is none yet."""
    if not gallery or view is None or not view.infotexts:
        raise PageError("No result to send yet: generate an image first.")
    item = gallery[min(view.selected, len(gallery) - 1)]
    return _open_image(item[0] if isinstance(item, (tuple, list)) else item)


def _send_result(gallery, view: ResultView | None, *, target_mode: str):
    image = _selected_picture(gallery, view)
    read = ReadInfotext.of(view.selected_infotext())
    values = _settings_from_infotext(read, with_denoising=True)
    extras = [*_variation_from_infotext(read), read.request.tiling]
    # The refiner as the job ran it (its title is one this server listed).
    refiner = [read.request.refiner_checkpoint or NO_REFINER, read.request.refiner_switch_at]
    return (_image_for(target_mode, image), *values, *extras, *refiner, gr.Tabs(selected=target_mode))


def _send_to_extras(gallery, view: ResultView | None):
    """The selected result, with its infotext, into the Extras tab's source, as A1111's "Send to extras"."""
    picture = _selected_picture(gallery, view)
    picture.info["parameters"] = view.selected_infotext()
    return picture, gr.Tabs(selected="extras")


def _open_image(path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _image_for(target_mode: str, image: Image.Image | None):
    if image is None:
        return gr.skip()
    return _editor_value(image) if target_mode == "inpaint" else image


def _editor_value(image: Image.Image) -> dict:
    """An image editor's value holding `image` with nothing painted on it."""
    return {"background": image, "layers": [], "composite": image}


def _default_preview_mode(engine) -> str:
    mode = getattr(getattr(engine, "preview", None), "mode", "approx")
    return mode if mode in PREVIEW_MODES else "approx"


def _find_save_image():
    """engine.outputs.save_image when that module exists (it is written alongside this page)."""
    try:
        from engine.outputs import save_image
    except ImportError:
        log.info("engine.outputs is not available: the page will not save images")
        return None
    return save_image
