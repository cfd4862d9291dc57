"""Shared fixtures (CPU only, no network): a tiny random-weight Engine for tests of mechanics, and one on the
shipped micro model for tests that need pictures to mean something."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ARTIFACTS_DIR = Path(__file__).resolve().parent / "artifacts"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on a 2-core machine: one torch thread each keeps them from
    # fighting over the cores (the tiny models' jobs already run on one thread; training does not).
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A models folder in A1111 layout holding the embedded tiny model, built once per session."""
    from engine.tiny_model import ensure_tiny_model

    root = tmp_path_factory.mktemp("models")
    ensure_tiny_model(root)
    return root


@pytest.fixture(scope="session")
def engine(models_dir):
    from engine import Engine
    from engine.tiny_model import tiny_model_path

    return Engine(model=str(tiny_model_path(models_dir)), models_dir=models_dir)


@pytest.fixture(scope="session")
def micro_engine(models_dir):
    """The embedded micro model (trained on coloured shapes), as `python app.py` serves it."""
    from engine import Engine
    from engine.presets import SHIPPED_MICRO_MODEL

    if not (SHIPPED_MICRO_MODEL / "model_index.json").is_file():
        pytest.fail(f"{SHIPPED_MICRO_MODEL} is missing: it ships with the repository (see training/)")
    return Engine(model=str(SHIPPED_MICRO_MODEL), models_dir=models_dir)


@pytest.fixture(scope="session")
def red_circle(micro_engine):
    """A large red circle on white drawn by the micro model (seed 3, 12 steps): the init image of the img2img
    scripts' tests."""
    from engine import GenerationRequest

    request = GenerationRequest(prompt="a large red circle on a white background", seed=3, steps=12)
    return list(micro_engine.generate(request))[-1].images[0]


def add_micro_and_micro_purple(root: Path) -> None:
    """Put the micro model and micro-purple (the micro model with the shipped micro-purple LoRA fused in at full
    strength: the same kind of model, drawing purple shapes) into the models folder `root`."""
    import json
    import shutil

    from diffusers import DiffusionPipeline

    from engine.presets import SHIPPED_MICRO_LORA, SHIPPED_MICRO_MODEL

    checkpoints = root / "Stable-diffusion"
    shutil.copytree(SHIPPED_MICRO_MODEL, checkpoints / "micro-shapes")
    pipe = DiffusionPipeline.from_pretrained(str(checkpoints / "micro-shapes"), local_files_only=True)
    pipe.load_lora_weights(str(SHIPPED_MICRO_LORA))
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    pipe.save_pretrained(checkpoints / "micro-purple", safe_serialization=True)
    index_path = checkpoints / "micro-purple" / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_lantern_family"] = "micro"
    index_path.write_text(json.dumps(index))


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    return ARTIFACTS_DIR


@pytest.fixture
def job_ahead(engine):
    """A long job holding the tiny engine, as one sent to the REST API does (REST jobs go to the engine
    directly, not through the page's queue). Yields its JobControl once it runs; stopped at teardown."""
    from engine import GenerationRequest, JobControl, Progress

    control, started = JobControl(), threading.Event()

    def run():
        request = GenerationRequest(prompt="a cat", seed=5, steps=150, width=256, height=256)
        for event in engine.generate(request, control=control):
            if isinstance(event, Progress):
                started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert started.wait(60), "the job ahead did not start"
        yield control
    finally:
        control.interrupt()
        thread.join(timeout=60)
