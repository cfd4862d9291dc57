"""The page's model dropdown: refresh lists the models folder, choosing one loads it, errors are shown."""

from __future__ import annotations

import shutil

import gradio as gr
import pytest

from engine import Engine
from ui.page import _load_model, _refresh_models, _reload_model, _unload_model


@pytest.fixture(scope="module")
def two_model_engine(models_dir, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    from engine.checkpoint import save_single_file

    root = tmp_path_factory.mktemp("two-models")
    shutil.copytree(models_dir / "Stable-diffusion" / "tiny-sd", root / "Stable-diffusion" / "tiny-sd")
    engine = Engine(model=str(root / "Stable-diffusion" / "tiny-sd"), models_dir=root)
    pipe = StableDiffusionPipeline.from_pretrained(engine.model.path)
    save_single_file(pipe, root / "Stable-diffusion" / "second.safetensors")
    return engine


def test_refresh_lists_every_model_and_choosing_one_loads_it(two_model_engine):
    dropdown, note = _refresh_models(two_model_engine)
    titles = dropdown["choices"]
    assert dropdown["value"] == two_model_engine.model.title
    assert any(
        str(title).startswith("second.safetensors") for title in (c[0] if isinstance(c, tuple) else c for c in titles)
    )
    assert "random weights" in note

    dropdown, _ = _load_model(two_model_engine, "second.safetensors")
    assert two_model_engine.model.name == "second"
    assert dropdown["value"] == two_model_engine.model.title


def test_an_unknown_model_is_an_error_shown_on_the_page(two_model_engine):
    loaded = two_model_engine.model
    with pytest.raises(gr.Error, match="no-such-model"):
        _load_model(two_model_engine, "no-such-model")
    assert two_model_engine.model == loaded


def test_settings_unload_and_reload_buttons_say_what_happened(two_model_engine):
    title = two_model_engine.model.title
    note, line = _unload_model(two_model_engine)
    assert not two_model_engine.model_loaded
    assert "Unloaded from memory" in note and line.startswith(f"Unloaded {title}.") and "RAM: this program" in line
    # The ↻ button and the header read nothing that would load the model back.
    dropdown, note = _refresh_models(two_model_engine, embeddings=True)
    assert dropdown["value"] == title and "Unloaded" in note and not two_model_engine.model_loaded
    assert _unload_model(two_model_engine)[1].startswith(f"Unloaded {title}.")

    note, line = _reload_model(two_model_engine)
    assert two_model_engine.model_loaded and "Model family" in note and line.startswith(f"Loaded {title}.")


def test_png_info_with_a_schedule_diffusers_lacks_falls_back_to_automatic():
    from ui.page import ReadInfotext, _settings_from_infotext

    text = "a cat\nSteps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 5, Size: 512x512"
    with pytest.warns(UserWarning, match="Karras is not available for Euler a"):  # shown to the user as a toast
        prompt, _negative, sampler, schedule, steps, _cfg, seed, *_ = _settings_from_infotext(
            ReadInfotext.of(text), with_denoising=False
        )
    assert (prompt, sampler, schedule, steps, seed) == ("a cat", "Euler a", "Automatic", 20, 5)
