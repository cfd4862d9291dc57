"""img2img's and inpaint's Batch from folders on this machine (A1111's img2img Batch tab): the fields, and the
checked plan the generate handlers run with page_jobs.run_folder_batch.

The fields exist only where ServerSettings.server_folders allows them; a handler called with a folder where they
do not (an API client) is refused, since it would read and write this machine's files for whoever asks.
"""

from __future__ import annotations

import gradio as gr

from engine import InvalidRequestError
from engine.folder_batch import PNG_INFO_PARAMETERS, FolderPlan, plan_folder_batch

from .fields import FieldCheckbox, FieldCheckboxGroup, PageError

# What Generate (or Upscale) does with each picture of the input folder, by tab.
FOLDER_JOBS = {"img2img": "one job each", "inpaint": "one job each", "extras": "each upscaled"}
FOLDERS_OFF = (
    "folders of this machine are off on this server (started with --hide-ui-dir-config, or others reach it "
    "without a login); upload the pictures instead"
)


def build_batch_folders(mode: str, enabled: bool) -> list[gr.components.Component] | None:
    """The folder fields in the order the handler takes them: input, (inpaint: masks,) output, skip done, and for
    a generation the PNG info parameters and folder. None where folders are off: a line then says why."""
    if not enabled:
        gr.Markdown(f"*From folders:* {FOLDERS_OFF}.", elem_id=f"{mode}_batch_folders_off")
        return None
    with gr.Group(elem_id=f"{mode}_batch_folders"):
        fields = [
            gr.Textbox(
                "",
                label="Input directory (on this machine)",
                placeholder=f"e.g. /home/me/frames: every picture in it and its subfolders, {FOLDER_JOBS[mode]}",
                elem_id=f"{mode}_batch_input_dir",
            )
        ]
        if mode == "inpaint":
            fields.append(
                gr.Textbox(
                    "",
                    label="Mask directory",
                    placeholder="one mask for every picture, or masks named as the pictures (white = repaint)",
                    elem_id="inpaint_batch_mask_dir",
                )
            )
        fields.append(
            gr.Textbox(
                "",
                label="Output directory",
                placeholder="results under the pictures' names (empty: the outputs folder, as usual)",
                elem_id=f"{mode}_batch_output_dir",
            )
        )
        fields.append(
            FieldCheckbox(
                False,
                label="Skip pictures already done",
                info="those whose results are in the output directory: to go on with a stopped batch",
                elem_id=f"{mode}_batch_skip_done",
            )
        )
        if mode == "extras":
            return fields
        # A1111's "PNG info" of its Batch tab (its "Append png info to prompts" is: any parameter ticked).
        fields.append(
            FieldCheckboxGroup(
                list(PNG_INFO_PARAMETERS),
                value=[],
                label="Parameters to take from each picture's PNG info",
                info="its prompts are added after the tab's; a picture without PNG info keeps the tab's settings",
                elem_id=f"{mode}_batch_png_info",
            )
        )
        fields.append(
            gr.Textbox(
                "",
                label="PNG info directory",
                placeholder="empty: each picture's own; else the picture of the same name in this folder",
                elem_id=f"{mode}_batch_png_info_dir",
            )
        )
    return fields


def folder_plan(
    enabled: bool,
    input_dir: str | None,
    output_dir: str | None,
    *,
    mask_dir: str | None = None,
    skip_done: bool = False,
    png_info: list[str] | None = None,
    png_info_dir: str | None = None,
    counts: tuple = (1, 1, {}),
    refused_with: dict[str, bool] | None = None,
    mask_needed: bool = False,
) -> FolderPlan | None:
    """The checked plan of a folder batch, or None when no folder is named. gr.Error naming the field (the
    handler's batch_* parameter) for folders that are off here, missing or in the way, and for a folder batch
    asked for together with something it cannot run with (`refused_with`: what, and whether it is on). `counts`:
    the batch count, the batch size and the Loopback fields, for the names of each picture's results."""
    named = {
        "batch_input_dir": (input_dir or "").strip(),
        "batch_mask_dir": (mask_dir or "").strip(),
        "batch_output_dir": (output_dir or "").strip(),
        "batch_png_info_dir": (png_info_dir or "").strip(),
    }
    if not any(named.values()):
        return None
    field, value = next((field, value) for field, value in named.items() if value)
    if not enabled:
        raise PageError(f"{field}: got {value!r}; allowed: nothing here: {FOLDERS_OFF}")
    if not named["batch_input_dir"]:
        raise PageError(f"batch_input_dir: got nothing with {field} {value!r}; allowed: a folder of pictures")
    if mask_needed and not named["batch_mask_dir"]:
        raise PageError(
            "batch_mask_dir: got nothing; allowed: a folder of masks, one for every picture or one per picture "
            "by name (for a batch without masks, use img2img's Batch)"
        )
    if named["batch_png_info_dir"] and not png_info:
        raise PageError(
            f"batch_png_info: got none with batch_png_info_dir {named['batch_png_info_dir']!r}; allowed: the "
            f"parameters to take from the PNG info there (any of {', '.join(PNG_INFO_PARAMETERS)})"
        )
    for what, on in (refused_with or {}).items():
        if on:
            raise PageError(
                f"batch_input_dir: got a folder batch with {what}; allowed: one of the two (clear the batch's "
                f"folders, or turn off {what})"
            )
    try:
        return plan_folder_batch(
            named["batch_input_dir"],
            named["batch_output_dir"] or None,
            mask_dir=named["batch_mask_dir"] or None,
            info_dir=named["batch_png_info_dir"] or None,
            outputs_per_picture=outputs_per_picture(*counts),
            skip_done=bool(skip_done),
        )
    except InvalidRequestError as exc:
        raise PageError(f"batch_{exc}") from exc


def outputs_per_picture(n_iter, batch_size, looping: dict) -> int:
    """How many pictures one job of the batch makes: batch count x batch size, or with Loopback and a batch count
    of 1 every loop's pictures (engine.loopback keeps them all then)."""
    try:
        count, size = int(n_iter), int(batch_size)
        if looping and count == 1:
            return int(looping["loopback_loops"]) * size
        return count * size
    except (TypeError, ValueError):
        return 1  # a bad value is refused, naming its field, when the first picture's request is checked
