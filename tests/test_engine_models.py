"""Loading models the ways users have them: the models folder, a path, a single file, a hub id."""

from __future__ import annotations

import time

import pytest

from engine import Engine, GenerationRequest, ModelLoadError, Result

REQUEST = {"prompt": "a cat", "seed": 3, "steps": 3, "width": 64, "height": 64}


def image_bytes(engine: Engine) -> bytes:
    result = list(engine.generate(GenerationRequest(**REQUEST)))[-1]
    assert isinstance(result, Result)
    return result.images[0].tobytes()


def test_models_folder_is_listed_with_a1111_titles(engine):
    models = {info.name: info for info in engine.list_models()}
    tiny = models["tiny-sd"]
    assert tiny.kind == "folder" and len(tiny.hash) == 10
    assert tiny.title == f"tiny-sd [{tiny.hash}]"
    assert engine.model.title == tiny.title and engine.model.family == "tiny"


def test_load_by_name_title_and_path_give_the_same_model(engine, models_dir):
    reference = image_bytes(engine)
    for reference_name in ("tiny-sd", engine.model.title, str(models_dir / "Stable-diffusion" / "tiny-sd")):
        assert Engine(model=reference_name, models_dir=models_dir).model.path == engine.model.path
    assert (
        image_bytes(Engine(model=str(models_dir / "Stable-diffusion" / "tiny-sd"), models_dir=models_dir)) == reference
    )


def test_single_safetensors_file_loads_offline_and_matches_the_folder(engine, models_dir, tmp_path):
    from engine.checkpoint import save_single_file

    checkpoint = models_dir / "Stable-diffusion" / "tiny-single.safetensors"
    if not checkpoint.exists():
        from diffusers import StableDiffusionPipeline

        save_single_file(StableDiffusionPipeline.from_pretrained(engine.model.path), checkpoint)
    listed = {info.name: info for info in engine.list_models()}
    assert listed["tiny-single"].kind == "single_file"
    single = Engine(model="tiny-single", models_dir=models_dir)
    assert single.model.family == "tiny"
    assert image_bytes(single) == image_bytes(engine)
    assert "Model: tiny-single" in list(single.generate(GenerationRequest(**REQUEST)))[-1].infotexts[0]


def test_unknown_model_says_what_exists(engine):
    with pytest.raises(ModelLoadError) as caught:
        engine.load_model("no-such-model")
    message = str(caught.value)
    assert "no-such-model" in message and "tiny-sd" in message


def test_pickle_checkpoints_are_refused_unless_allowed(engine, tmp_path):
    pickle_file = tmp_path / "old-model.ckpt"
    pickle_file.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelLoadError, match="pickle.*--allow-pickle"):
        engine.load_model(str(pickle_file))
    assert image_bytes(engine)  # the loaded model keeps working


def test_hub_id_offline_fails_fast_with_a_clear_message(engine, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as caught:
        engine.load_model("someone/not-cached-model")
    assert time.perf_counter() - started < 30
    assert "not in the local Hugging Face cache" in str(caught.value)
    assert engine.model.name == "tiny-sd"


def test_folder_without_model_index_is_explained(engine, tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        engine.load_model(str(tmp_path))


def test_unloading_frees_the_weights_and_the_next_job_loads_them_back(models_dir):
    import weakref

    own = Engine(model="tiny-sd", models_dir=models_dir)
    before = image_bytes(own)
    unet = weakref.ref(own.loaded.components["unet"])
    title = own.model.title

    assert own.unload_model().title == title
    assert unet() is None, "something still holds the unloaded UNet: its memory is not freed"
    # Still the checkpoint the page and API name (and list with its hash), without loading anything.
    assert not own.model_loaded and own.model.title == title
    assert {info.title for info in own.list_models()} >= {title}
    assert own.unload_model().title == title  # a second unload is harmless

    assert image_bytes(own) == before
    assert own.model_loaded


def test_reload_brings_an_unloaded_model_back_and_a_failed_switch_keeps_it_unloaded(models_dir):
    own = Engine(model="tiny-sd", models_dir=models_dir)
    title = own.model.title
    own.unload_model()
    assert own.reload_model().title == title and own.model_loaded
    assert own.reload_model().title == title  # nothing to do when loaded

    own.unload_model()
    with pytest.raises(ModelLoadError):
        own.load_model("no-such-model")
    assert not own.model_loaded and own.model.title == title
    own.load_model("tiny-sd")  # choosing the checkpoint again loads it, as in A1111
    assert own.model_loaded and own.model.title == title


def test_memory_report_has_a1111s_shape(engine):
    report = engine.memory()
    ram = report["ram"]
    assert 0 < ram["used"] < ram["total"] and 0 < ram["free"] <= ram["total"]
    assert report["cuda"] == {"error": "unavailable"} or "system" in report["cuda"]
