"""Switching checkpoints while several users' jobs are about: a job runs on the model it was asked for.

micro-purple is the micro model with its purple LoRA fused in: it draws the micro model's red circle purple, so the
picture says which model made it, beside the infotext's "Model:"."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from engine import Engine, GenerationRequest, Result, Waiting
from tests.conftest import add_micro_and_micro_purple
from ui.server import ServerSettings, launch

PROMPT = "a red circle on a white background"
PURPLE, RED = np.array([128, 0, 128]), np.array([255, 0, 0])


@pytest.fixture(scope="module")
def pair_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("switching-models")
    add_micro_and_micro_purple(root)
    return Engine(model="micro-shapes", models_dir=root)


@pytest.fixture()
def engine(pair_engine):
    pair_engine.load_model("micro-shapes")
    yield pair_engine
    pair_engine.load_model("micro-shapes")


def drawn_by(image: Image.Image) -> str:
    """Which model drew the prompt's circle, by the colour of the picture's middle."""
    centre = np.asarray(image).astype(int)[26:38, 26:38].reshape(-1, 3).mean(axis=0)
    return "micro-purple" if np.abs(centre - PURPLE).sum() < np.abs(centre - RED).sum() else "micro-shapes"


def model_named(infotext: str) -> str:
    return next(part for part in infotext.split(", ") if part.startswith("Model: ")).removeprefix("Model: ")


def test_a_reservation_keeps_other_jobs_off_its_model_and_loads_the_one_before_back(engine):
    request = GenerationRequest(prompt=PROMPT, seed=2, steps=6)
    outside: list = []
    with engine.reserved("micro-purple") as reservation:
        assert engine.model.name == "micro-purple"
        # A job started meanwhile (another user's) waits for the reservation, and then runs on the model before it.
        other_user = threading.Thread(target=lambda: outside.extend(engine.generate(request)))
        other_user.start()
        time.sleep(1.0)
        assert outside and all(isinstance(event, Waiting) for event in outside)
        reserved = list(engine.generate(request, reservation=reservation))[-1]
    other_user.join(timeout=120)
    assert isinstance(reserved, Result) and isinstance(outside[-1], Result)
    assert drawn_by(reserved.images[0]) == model_named(reserved.infotexts[0]) == "micro-purple"
    assert drawn_by(outside[-1].images[0]) == model_named(outside[-1].infotexts[0]) == "micro-shapes"
    assert engine.model.name == "micro-shapes"
    with pytest.raises(Exception, match="reservation has ended"):
        list(engine.generate(request, reservation=reservation))


def test_a_reservation_without_restore_leaves_its_model_and_a_bad_name_holds_nothing(engine):
    with engine.reserved("micro-purple", restore=False):
        pass
    assert engine.model.name == "micro-purple"
    with pytest.raises(Exception, match="no-such-model"):
        with engine.reserved("no-such-model"):
            pass
    assert engine.model.name == "micro-purple"
    # Nothing is left held: a job and a switch go through.
    assert isinstance(list(engine.generate(GenerationRequest(prompt=PROMPT, steps=2)))[-1], Result)
    engine.load_model("micro-shapes")


def test_a_job_that_waited_through_a_switch_runs_on_the_new_model_and_says_so(engine):
    """The page's checkpoint list is shared, as in A1111: a job asked for before another user's switch runs on
    the model loaded when its turn comes, with that model's previews, and its infotext names it."""
    events: list = []
    with engine.reserved("micro-shapes", restore=False) as holding:
        waiting = threading.Thread(target=lambda: events.extend(engine.generate(GenerationRequest(prompt=PROMPT))))
        waiting.start()
        time.sleep(0.5)
        engine._switch_locked(engine.registry.resolve("micro-purple"))  # the switch another user's page made
        assert holding.active
    waiting.join(timeout=120)
    result = events[-1]
    assert isinstance(result, Result)
    assert drawn_by(result.images[0]) == model_named(result.infotexts[0]) == "micro-purple"


def test_reading_a_prompt_during_a_switch_waits_for_the_new_model(engine, monkeypatch):
    slow_load = engine._load

    def load_slowly(info):
        time.sleep(1.0)
        return slow_load(info)

    monkeypatch.setattr(engine, "_load", load_slowly)
    switching = threading.Thread(target=engine.load_model, args=("micro-purple",))
    switching.start()
    time.sleep(0.3)
    # The old model is let go of before the new one loads: a prompt read now waits, not "No model is loaded".
    assert engine.token_counts("a red circle") == [3]
    assert engine.model.name == "micro-purple"
    switching.join(timeout=60)


def test_concurrent_api_requests_each_run_on_their_override_checkpoint(engine, tmp_path):
    handle = launch(engine, ServerSettings(host="127.0.0.1", port=0, api=True, outputs_dir=tmp_path, page=False))
    answers: dict[int, tuple[str, dict]] = {}

    def request(number: int, checkpoint: str) -> None:
        payload = {"prompt": PROMPT, "seed": 2, "steps": 6, "override_settings": {"sd_model_checkpoint": checkpoint}}
        with httpx.Client(base_url=handle.url + "sdapi/v1/", timeout=300) as api:
            answers[number] = (checkpoint, api.post("txt2img", json=payload).json())

    try:
        users = [
            threading.Thread(target=request, args=(number, ("micro-purple", "micro-shapes")[number % 2]))
            for number in range(4)
        ]
        for user in users:
            user.start()
        for user in users:
            user.join(timeout=300)
        assert len(answers) == 4
        for number, (checkpoint, body) in answers.items():
            assert "info" in body, f"request {number}: {body}"
            picture = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
            infotext = json.loads(body["info"])["infotexts"][0]
            assert drawn_by(picture) == model_named(infotext) == checkpoint, f"request {number}"
        assert engine.model.name == "micro-shapes"  # each request loaded the model before it back
    finally:
        handle.close()


def test_a_grids_cells_all_run_on_its_model_when_another_user_switches_between_them(engine):
    """The checkpoint list is shared: another user may switch it while a Compare grid runs. A grid that mixed
    models unseen would measure nothing, so each cell runs on the grid's model."""
    from engine.compare import Comparer, GridProgress, GridResult, parse_axis

    base = GenerationRequest(prompt=PROMPT, seed=2, steps=6)
    grid = Comparer(engine).run_grid(base, [parse_axis("CFG scale", "6, 7, 8", engine)], keep_timelines=False)
    result = None
    for event in grid:
        if isinstance(event, GridProgress) and event.progress is None and event.cell_no == 1:
            engine.load_model("micro-purple")  # between the first cell and the second
        if isinstance(event, GridResult):
            result = event
    assert result is not None and len(result.cells) == 3
    for cell in result.cells:
        assert model_named(cell.infotext) == "micro-shapes"
        alone = list(engine.generate(cell.cell.request, checkpoint="micro-shapes"))[-1]
        assert np.array_equal(np.asarray(cell.image), np.asarray(alone.images[0]))


def test_a_page_lists_jobs_all_run_on_the_model_it_started_on(engine):
    """A prompt list (or a batch of pictures) on the page: another user's switch between two of its jobs does not
    reach the later ones."""
    from ui.page_jobs import PageSession, run_job

    class SwitchedByAnotherUserAfterTheFirstJob:
        def __init__(self):
            self.results: list[Result] = []

        def __getattr__(self, name):
            return getattr(engine, name)

        def generate(self, request, **kwargs):
            for event in engine.generate(request, **kwargs):
                if isinstance(event, Result):
                    self.results.append(event)
                    if len(self.results) == 1:
                        engine.load_model("micro-purple")
                yield event

    watched = SwitchedByAnotherUserAfterTheFirstJob()
    lines = [GenerationRequest(prompt=PROMPT, seed=seed, steps=6) for seed in (2, 3, 4)]
    list(run_job(watched, PageSession(), lines, mode="txt2img", outputs_dir=None))
    assert [model_named(result.infotexts[0]) for result in watched.results] == ["micro-shapes"] * 3


def test_an_api_prompt_lists_jobs_all_run_on_the_model_it_started_on(engine):
    from tests.test_prompt_list import api_prompt_list
    from ui.api import SdApi

    class SwitchedByAPageUserAfterTheFirstJob:
        def __init__(self):
            self.jobs = 0

        def __getattr__(self, name):
            return getattr(engine, name)

        def generate(self, request, **kwargs):
            for event in engine.generate(request, **kwargs):
                if isinstance(event, Result):
                    self.jobs += 1
                    if self.jobs == 1:
                        engine.load_model("micro-purple")
                yield event

    api = SdApi(SwitchedByAPageUserAfterTheFirstJob(), ServerSettings(save_images=False))
    payload = api_prompt_list(f"{PROMPT}\n{PROMPT}\n{PROMPT}", steps=6)
    infotexts = json.loads(api.txt2img(payload)["info"])["infotexts"]
    assert [model_named(text) for text in infotexts] == ["micro-shapes"] * 3
