"""Grids over axes at a fixed seed, convergence to a reference, timelines and presets (engine side)."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest
from PIL import Image

from engine import GenerationRequest, InvalidRequestError, JobControl
from engine.compare import (
    AXIS_TYPES,
    Axis,
    Comparer,
    GridProgress,
    GridResult,
    convergence_table,
    export_timeline,
    image_distance,
    list_presets,
    load_preset,
    parse_axis,
    plan_grid,
    run_order,
    save_preset,
    split_values,
)
from engine.presets import PRESETS_DIR
from engine.samplers import pass_steps

BASE = GenerationRequest(prompt="a red lighthouse at dusk", seed=11, steps=4, width=64, height=64, sampler_name="Euler")


def run(comparer, axes, **kwargs) -> tuple[list[GridProgress], GridResult]:
    events = list(comparer.run_grid(BASE, axes, **kwargs))
    return events[:-1], events[-1]


# Axis values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "text", "values"),
    [
        ("Steps", "10, 20,30", (10, 20, 30)),
        ("Steps", "10-40 (+10)", (10, 20, 30, 40)),
        ("Steps", "5-30 [4]", (5, 13, 22, 30)),
        ("Steps", "1-3, 8", (1, 2, 3, 8)),
        ("Seed", "3-1 (-1)", (3, 2, 1)),
        ("CFG scale", "1-13 [5]", (1.0, 4.0, 7.0, 10.0, 13.0)),
        ("CFG scale", "2.5-4 (+0.5)", (2.5, 3.0, 3.5, 4.0)),
        ("Denoising strength", "0.2, .5", (0.2, 0.5)),
        ("Sampler", "euler A, DPM++ 2M , unipc", ("Euler a", "DPM++ 2M", "UniPC")),
        ("Schedule type", "automatic, KARRAS", ("Automatic", "Karras")),
        ("Prompt S/R", 'red, "blue, bright", green', ("red", "blue, bright", "green")),
        ("Eta", "0-1 [3]", (0.0, 0.5, 1.0)),
        ("Sigma noise", "0.9, 1.1", (0.9, 1.1)),
        ("ENSD", "0, 31337", (0, 31337)),
        ("NGMS", "0-3 [4]", (0.0, 1.0, 2.0, 3.0)),
        ("SkipEarly", "0, 0.25", (0.0, 0.25)),
        ("Extra noise", "0-0.5 (+0.25)", (0.0, 0.25, 0.5)),
        ("Hires upscaler", "latent, LANCZOS", ("Latent", "Lanczos")),
        ("Clip skip", "1-3", (1, 2, 3)),
    ],
)
def test_axis_values_parse_like_a1111(engine, kind, text, values):
    assert parse_axis(kind, text, engine).values == values


@pytest.mark.parametrize(
    ("kind", "text", "allowed"),
    [
        ("Steps", "ten", "ranges like 10-40 (+10)"),
        ("Steps", "40-10 (+10)", "ranges like"),
        ("Steps", "0, 5", "steps from 1"),
        ("CFG scale", "a-b", "numbers"),
        ("Sampler", "Euler z", "DPM++ 2M"),
        ("Schedule type", "Curvy", "Karras"),
        ("Model", "no-such-model", "tiny-sd"),
        ("Steps", "", "at least one value"),
        ("Eta", "0.5, 2", "values from 0 to 1"),
        ("Sigma noise", "1.2", "numbers from 0 to 1.1"),
        ("ENSD", "-1", "whole numbers from 0 to 4294967295"),
        ("NGMS", "1, 16", "numbers from 0 to 15"),
        ("Schedule max sigma", "10, 70", "numbers from 0 to 60"),
        ("SkipEarly", "1.5", "values from 0 to 1"),
        ("Hires upscaler", "R-ESRGAN 4x+", "Lanczos"),
        ("Clip skip", "0, 2", "from 1 to 12"),
        # Infinite, or digits past float's range: whole-number axes failed on them with an OverflowError.
        ("Seed", "inf", "whole numbers"),
        ("Steps", "1" * 400, "whole numbers"),
        ("ENSD", "1e309", "whole numbers"),
        # Counted before the values are made: these took minutes to be refused.
        ("Seed", "1-5 [100000000]", "at most 400"),
        ("CFG scale", "1-100000000 (+1)", "at most 400"),
        ("Seed", "1-300, 1-300", "at most 400"),
    ],
)
def test_bad_axis_values_name_the_axis_and_what_is_allowed(engine, kind, text, allowed):
    with pytest.raises(InvalidRequestError) as error:
        parse_axis(kind, text, engine)
    assert error.value.field == f"{kind} axis"
    assert allowed in str(error.value.allowed)


def test_unknown_axis_type_is_refused(engine):
    with pytest.raises(InvalidRequestError, match="Sampler"):
        parse_axis("Colour", "red", engine)
    assert "Nothing" in AXIS_TYPES


def test_split_values_keeps_quoted_commas():
    assert split_values('a, "b, c",d') == ["a", "b, c", "d"]


# Planning ----------------------------------------------------------------------------------------


def test_plan_shares_everything_but_the_axes(engine):
    axes = [parse_axis("Sampler", "Euler, DDIM", engine), parse_axis("CFG scale", "3, 9", engine)]
    cells = plan_grid(BASE, axes)
    assert [(c.x, c.y) for c in cells] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert [(c.request.sampler_name, c.request.cfg_scale) for c in cells] == [
        ("Euler", 3.0),
        ("DDIM", 3.0),
        ("Euler", 9.0),
        ("DDIM", 9.0),
    ]
    assert {c.request.seed for c in cells} == {11} and {c.request.prompt for c in cells} == {BASE.prompt}


def test_eta_ensd_and_hires_upscaler_axes_set_their_fields(engine):
    noise = plan_grid(BASE, [parse_axis("Sigma noise", "0.5, 1", engine)])
    assert [c.request.s_noise for c in noise] == [0.5, 1.0]
    axes = [parse_axis("Eta", "0, 1", engine), parse_axis("ENSD", "0, 31337", engine)]
    cells = plan_grid(BASE, axes)
    assert [(c.request.eta, c.request.eta_noise_seed_delta) for c in cells] == [
        (0.0, 0),
        (1.0, 0),
        (0.0, 31337),
        (1.0, 31337),
    ]
    assert cells[3].label == "Eta: 1, ENSD: 31337"
    upscalers = [parse_axis("Hires upscaler", "Latent, Nearest", engine)]
    with pytest.raises(InvalidRequestError, match="Hires. fix on"):
        plan_grid(BASE, upscalers)
    cells = plan_grid(dataclasses.replace(BASE, enable_hr=True), upscalers)
    assert [c.request.hr_upscaler for c in cells] == ["Latent", "Nearest"]


def test_negative_guidance_axes_and_extra_noise_set_their_fields_and_cells_match_single_runs(engine, comparer):
    axes = [parse_axis("NGMS", "0, 15", engine), parse_axis("SkipEarly", "0, 0.5", engine)]
    cells = plan_grid(BASE, axes)
    assert [(c.request.s_min_uncond, c.request.skip_early_cond) for c in cells] == [
        (0.0, 0.0),
        (15.0, 0.0),
        (0.0, 0.5),
        (15.0, 0.5),
    ]
    assert cells[3].label == "NGMS: 15, SkipEarly: 0.5"
    _progress, result = run(comparer, axes)
    for cell in result.cells:
        single = list(engine.generate(cell.cell.request))[-1]
        assert np.array_equal(np.asarray(single.images[0]), np.asarray(cell.image)), cell.cell.label
    assert "NGMS: 15" in result.cells[1].infotext and "Skip Early CFG: 0.5" in result.cells[2].infotext
    assert len({np.asarray(cell.image).tobytes() for cell in result.cells}) == 4  # each setting draws its own
    extra = [parse_axis("Extra noise", "0, 0.5", engine)]
    with pytest.raises(InvalidRequestError, match="Hires. fix on"):
        plan_grid(BASE, extra)
    assert [c.request.img2img_extra_noise for c in plan_grid(dataclasses.replace(BASE, enable_hr=True), extra)] == [
        0.0,
        0.5,
    ]


def test_the_clip_skip_axis_sets_what_the_infotext_writes(engine):
    base = dataclasses.replace(BASE, extra_params={"Clip skip": "2", "Version": "x"})
    cells = plan_grid(base, [parse_axis("Clip skip", "1, 3", engine)])
    assert [c.request.extra_params for c in cells] == [
        {"Version": "x"},
        {"Version": "x", "Clip skip": "3"},
    ]
    results = [list(engine.generate(c.request))[-1] for c in cells]
    assert "Clip skip" not in results[0].infotexts[0] and "Clip skip: 3" in results[1].infotexts[0]
    assert not np.array_equal(np.asarray(results[0].images[0]), np.asarray(results[1].images[0]))


def test_prompt_search_replace(engine):
    cells = plan_grid(BASE, [parse_axis("Prompt S/R", "red, blue, green", engine)])
    assert [c.request.prompt for c in cells] == [
        "a red lighthouse at dusk",
        "a blue lighthouse at dusk",
        "a green lighthouse at dusk",
    ]
    with pytest.raises(InvalidRequestError, match="Prompt S/R"):
        plan_grid(BASE, [parse_axis("Prompt S/R", "purple, blue", engine)])


def test_model_axis_runs_each_model_once_in_a_row(engine):
    axes = [Axis("Model", ("m1", "m2"), ("m1", "m2")), Axis("Steps", (4, 6), ("4", "6"))]
    order = [c.model for c in run_order(plan_grid(BASE, axes))]
    assert order == ["m1", "m1", "m2", "m2"]  # grid order would be m1, m2, m1, m2


# Running -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def comparer(engine):
    return Comparer(engine)


@pytest.fixture(scope="module")
def two_by_two(engine, comparer):
    axes = [parse_axis("Sampler", "Euler, DDIM", engine), parse_axis("Steps", "3, 5", engine)]
    return run(comparer, axes)


def test_a_random_seed_is_drawn_once_and_leaves_torch_s_global_generator_alone(engine, comparer):
    """Like a single job's -1, a grid's random seed and variation seed come from the system's randomness: drawing them
    from torch's global generator would make them follow a user's torch.manual_seed, and move that generator under
    every other user of the process."""
    import torch

    base = dataclasses.replace(BASE, seed=-1, subseed=-1, steps=2)
    axes = [parse_axis("CFG scale", "3, 7", engine)]
    torch.manual_seed(0)
    state = torch.get_rng_state()
    result = list(comparer.run_grid(base, axes))[-1]
    assert torch.equal(torch.get_rng_state(), state)
    seeds = {(cell.cell.request.seed, cell.cell.request.subseed) for cell in result.cells}
    assert len(seeds) == 1 and -1 not in next(iter(seeds))
    torch.manual_seed(0)
    again = list(comparer.run_grid(base, axes))[-1]
    assert {(cell.cell.request.seed, cell.cell.request.subseed) for cell in again.cells} != seeds


def test_each_cell_is_identical_to_a_single_run(engine, two_by_two):
    _progress, result = two_by_two
    assert len(result.cells) == 4 and not result.interrupted
    for cell in result.cells:
        single = list(engine.generate(cell.cell.request))[-1]
        assert np.array_equal(np.asarray(single.images[0]), np.asarray(cell.image)), cell.cell.label
        assert cell.infotext == single.infotexts[0]


def test_grid_image_has_headers_and_every_cell_in_place(two_by_two):
    _progress, result = two_by_two
    (grid,) = result.grids
    width, height = 64, 64
    label_w = grid.width - 2 * width
    header_h = grid.height - 2 * height
    assert label_w > 20 and header_h > 10  # room for "Steps: 3" on the left and "Sampler: Euler" on top
    for cell in result.cells:
        box = (label_w + cell.cell.x * width, header_h + cell.cell.y * height)
        crop = grid.crop((*box, box[0] + width, box[1] + height))
        assert np.array_equal(np.asarray(crop), np.asarray(cell.image.convert("RGB")))
    # Header areas hold drawn text (dark pixels on white).
    assert np.asarray(grid.crop((label_w, 0, grid.width, header_h)).convert("L")).min() < 128
    assert "Sampler = Euler, DDIM" in result.infotext and "Steps = 3, 5" in result.infotext


def test_progress_counts_cells_and_carries_previews(two_by_two):
    progress, _result = two_by_two
    assert {p.cell_count for p in progress} == {4}
    assert [p.cell_no for p in progress if p.progress is None] == [0, 1, 2, 3]
    assert any(p.progress is not None and p.progress.preview is not None for p in progress)
    fractions = [p.fraction for p in progress]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)


def test_timeline_keeps_one_frame_per_step_and_exports(two_by_two, tmp_path):
    _progress, result = two_by_two
    for cell in result.cells:
        request = cell.cell.request  # one frame per step: A1111's DDIM runs 4 at 5 steps
        assert len(cell.timeline) == pass_steps(request.sampler_name, request.scheduler, request.steps)
        assert all(frame.size == cell.image.size for frame in cell.timeline)
    frames = result.cells[-1].timeline
    for name in ("timeline.gif", "timeline.webp"):
        path = export_timeline(frames, tmp_path / name, frame_ms=100)
        with Image.open(path) as animation:
            # Identical neighbouring frames may be merged into one longer frame.
            assert 2 <= animation.n_frames <= len(frames)
            assert animation.size == frames[0].size
            if name.endswith(".gif"):  # and the running time stays: the last frame holds 8x longer
                total = 0
                for index in range(animation.n_frames):
                    animation.seek(index)
                    total += animation.info["duration"]
                assert total == 100 * (len(frames) - 1) + 800
    with pytest.raises(InvalidRequestError, match="timeline file"):
        export_timeline(frames, tmp_path / "timeline.png")


def test_stop_ends_the_grid_and_keeps_finished_cells(engine, comparer):
    control = JobControl()
    axes = [parse_axis("Steps", "3, 4, 5, 6", engine)]
    kept = []
    for event in comparer.run_grid(BASE, axes, control=control):
        if isinstance(event, GridProgress) and event.cell_no == 1 and event.progress is not None:
            control.interrupt()
        if isinstance(event, GridResult):
            kept = event
    assert kept.interrupted
    assert 1 <= len(kept.cells) <= 2 and kept.cells[0].cell.request.steps == 3
    assert len(kept.grids) == 1
    # The next grid runs normally.
    _progress, again = run(comparer, [parse_axis("Steps", "3", engine)])
    assert len(again.cells) == 1 and not again.interrupted


def test_a_grid_behind_another_job_says_so_and_its_cell_times_leave_the_wait_out(engine, comparer, job_ahead):
    events = []
    began = time.perf_counter()
    for event in comparer.run_grid(BASE, [parse_axis("Steps", "3", engine)]):
        events.append(event)
        if isinstance(event, GridProgress) and event.waiting is not None and not job_ahead.interrupted:
            time.sleep(1.0)  # let it wait a while
            job_ahead.interrupt()
    total = time.perf_counter() - began
    waits = [event for event in events if isinstance(event, GridProgress) and event.waiting is not None]
    assert waits and waits[0].waiting.ahead.running and waits[0].cell_no == 0
    result = events[-1]
    assert isinstance(result, GridResult) and len(result.cells) == 1 and not result.interrupted
    assert result.cells[0].elapsed < total - 1.0


def test_convergence_measures_distance_to_a_cached_reference(engine, monkeypatch):
    comparer = Comparer(engine)
    monkeypatch.setattr("engine.compare.REFERENCE_STEPS", 12)
    base = dataclasses.replace(BASE, sampler_name="DPM++ 2M")
    axes = [parse_axis("Steps", "2, 12", engine), parse_axis("Schedule type", "Karras", engine)]
    runs = []
    original = engine.generate

    def counting(request, **kwargs):
        runs.append(request.steps)
        return original(request, **kwargs)

    monkeypatch.setattr(engine, "generate", counting)
    result = list(comparer.run_grid(base, axes, convergence=True))[-1]
    by_steps = {cell.cell.request.steps: cell for cell in result.cells}
    # The 12-step DPM++ 2M Karras cell is the reference itself.
    assert by_steps[12].ssim == pytest.approx(1.0, abs=1e-4) and by_steps[12].mean_abs_diff == pytest.approx(0.0)
    assert by_steps[2].ssim < 1.0 and by_steps[2].mean_abs_diff > 0
    assert {row["steps"] for row in convergence_table(result)} == {2, 12}
    # A second grid reuses the cached reference: only its own 12-step cell runs again.
    first = runs.count(12)
    list(comparer.run_grid(base, axes, convergence=True))
    assert runs.count(12) == first + 1


def test_the_reference_is_guided_on_every_step_whatever_ngms_and_skip_early_say(engine, monkeypatch):
    monkeypatch.setattr("engine.compare.REFERENCE_STEPS", 6)
    seen = []
    original = engine.generate

    def recording(request, **kwargs):
        seen.append(request)
        return original(request, **kwargs)

    monkeypatch.setattr(engine, "generate", recording)
    skipping = dataclasses.replace(BASE, s_min_uncond=15.0, skip_early_cond=0.5)
    Comparer(engine).reference_image(skipping)
    (reference,) = seen
    assert (reference.s_min_uncond, reference.skip_early_cond) == (0.0, 0.0) and reference.steps == 6


def test_image_distance_bounds():
    image = Image.new("RGB", (32, 32), (200, 10, 10))
    assert image_distance(image, image) == (pytest.approx(1.0, abs=1e-4), pytest.approx(0.0))
    other = Image.new("RGB", (32, 32), (10, 10, 200))
    ssim, mad = image_distance(image, other)
    assert ssim < 0.5 and mad == pytest.approx((190 + 0 + 190) / 3, abs=0.5)


# Presets ---------------------------------------------------------------------------------------------


def test_shipped_presets_parse(engine):
    names = list_presets(PRESETS_DIR / "compare")
    assert {"classic-vs-fast-samplers", "karras-vs-default-schedule", "cfg-sweep"} <= set(names)
    for name in names:
        for kind, values in load_preset(PRESETS_DIR / "compare", name):
            parse_axis(kind, values, engine)


def test_save_and_load_a_preset(tmp_path):
    path = save_preset(tmp_path, "my sweep", [("Steps", "4-8 (+2)"), ("Nothing", ""), ("Sampler", "Euler")])
    assert json.loads(path.read_text())["axes"][0] == {"type": "Steps", "values": "4-8 (+2)"}
    assert load_preset(tmp_path, "my sweep") == [("Steps", "4-8 (+2)"), ("Sampler", "Euler")]
    for bad in ("../escape", "", "a/b"):
        with pytest.raises(InvalidRequestError, match="preset name"):
            save_preset(tmp_path, bad, [("Steps", "4")])
    with pytest.raises(InvalidRequestError, match="preset"):
        load_preset(tmp_path, "missing")


def test_a_model_axis_loads_each_model_once_and_restores_the_first(models_dir, tmp_path, monkeypatch):
    import shutil

    from engine import Engine
    from engine.tiny_model import tiny_model_path

    folder = tmp_path / "Stable-diffusion"
    for name in ("first", "second"):
        shutil.copytree(tiny_model_path(models_dir), folder / name)
    engine = Engine(model=str(folder / "first"), models_dir=tmp_path)
    loads = []
    real_load = __import__("engine.engine", fromlist=["load_model"]).load_model

    def counting_load(info, **kwargs):
        loads.append(info.name)
        return real_load(info, **kwargs)

    monkeypatch.setattr("engine.engine.load_model", counting_load)
    axes = [parse_axis("Model", "first, second", engine), parse_axis("Steps", "2, 3", engine)]
    result = list(Comparer(engine).run_grid(BASE, axes))[-1]
    assert len(result.cells) == 4
    assert loads == ["second", "first"]  # second once for its two cells, then the original back
    assert engine.model.name == "first"
    assert [c.infotext.split("Model: ")[1].split(",")[0] for c in result.cells] == ["first", "second"] * 2
