"""Hypernetworks from the hypernetworks folder, switched on per job by A1111's `<hypernet:name:strength>` tags.

The shipped `micro-squares` hypernetwork (training/train_hypernet.py) draws every shape as a square on the micro
model, in the colour and on the background the prompt names, so whether it ran, and how strongly, shows in the
pictures."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from engine import Engine, GenerationRequest, InvalidRequestError, Result
from engine.hypernet import HypernetUse, apply_hypernetworks, hypernet_uses, read_hypernetwork
from engine.presets import SHIPPED_MICRO_HYPERNET, SHIPPED_MICRO_LORA, SHIPPED_MICRO_MODEL
from training import dataset

SCENES = [
    ("red", "circle", "white"),
    ("blue", "triangle", "yellow"),
    ("orange", "circle", "blue"),
    ("white", "triangle", "purple"),
]


@pytest.fixture(scope="module")
def hypernet_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hypernetworks")
    (folder / "shapes").mkdir()  # A1111 reads subfolders too
    shutil.copy(SHIPPED_MICRO_HYPERNET, folder / "shapes" / SHIPPED_MICRO_HYPERNET.name)
    torch.save({"name": "sd15", **sd15_like_layers([768, 320])}, folder / "sd15-style.pt")
    return folder


@pytest.fixture(scope="module")
def hypernet_engine(models_dir, hypernet_dir, tmp_path_factory):
    lora_dir = tmp_path_factory.mktemp("Lora")
    shutil.copy(SHIPPED_MICRO_LORA, lora_dir)
    return Engine(
        model=str(SHIPPED_MICRO_MODEL), models_dir=models_dir, hypernetwork_dir=hypernet_dir, lora_dir=lora_dir
    )


def sd15_like_layers(widths: list[int]) -> dict:
    """A1111's layout for widths the micro model does not have: {width: (key MLP, value MLP)} of structure 1, 2, 1."""
    return {
        width: tuple(
            {
                "linear.0.weight": torch.zeros(2 * width, width),
                "linear.0.bias": torch.zeros(2 * width),
                "linear.1.weight": torch.zeros(width, 2 * width),
                "linear.1.bias": torch.zeros(width),
            }
            for _ in range(2)
        )
        for width in widths
    }


def draw(engine: Engine, prompt: str, seed: int = 1, steps: int = 12, **fields) -> Result:
    result = list(engine.generate(GenerationRequest(prompt=prompt, seed=seed, steps=steps, **fields)))[-1]
    assert isinstance(result, Result), result
    return result


def pixels(result: Result, index: int = 0) -> np.ndarray:
    return np.asarray(result.images[index])


def scene_prompt(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def test_tags_read_as_a1111_reads_them():
    assert hypernet_uses("a cat <hypernet:style>") == [HypernetUse("style", 1.0, "<hypernet:style>")]
    assert [use.strength for use in hypernet_uses("<hypernet:a:0.5> <lora:b:1> <hypernet:c:-1>")] == [0.5, -1.0]
    assert hypernet_uses("<hypernet:a:1> <hypernet:a:0.3>")[0].strength == 0.3  # the last tag of a name wins
    with pytest.raises(InvalidRequestError, match=r"got '<hypernet:a:lots>'; allowed: a number for the hypernetwork"):
        hypernet_uses("<hypernet:a:lots>")
    with pytest.raises(InvalidRequestError, match="<hypernet:name> or <hypernet:name:strength>"):
        hypernet_uses("<hypernet:a:1:2>")


def test_an_old_infotexts_hypernet_is_read_as_a1111_reads_it():
    """A1111's texts from before its extra networks name the hypernetwork beside the prompt."""
    from engine.infotext import parse_infotext, unread_settings

    text = (
        "a cat\nSteps: 20, Sampler: Euler a, Hypernet: micro-squares, Hypernet strength: 0.8, Hypernet hash: 1a2b3c4d"
    )
    request = parse_infotext(text)
    assert request.prompt == "a cat<hypernet:micro-squares:0.8>"
    assert unread_settings(request) == {}
    assert parse_infotext("a cat\nSteps: 20, Seed: 1, Hypernet: anime").prompt == "a cat<hypernet:anime:1.0>"


@pytest.mark.parametrize("old_names", [False, True])
def test_a_file_in_a1111s_layout_runs_as_a1111_runs_it(tmp_path, old_names):
    """Dropout and layer norm take places in A1111's Sequential (its state dict's keys count them); each projection
    then reads context + mlp(context) x strength, every network of the prompt in turn."""
    generator = torch.Generator().manual_seed(0)

    def weights(rows, columns):
        return torch.randn(rows, columns, generator=generator) * 0.1, torch.randn(rows, generator=generator) * 0.1

    if old_names:  # A1111's first files: two linear layers named linear1 and linear2, no activation
        structure, keys, activation, layer_norm = [1, 2, 1], ["linear1", "linear2"], None, False
        extra = {}
    else:  # relu after each hidden layer, layer norm after each layer, dropout 0.3 after the hidden ones
        structure, keys, activation, layer_norm = [1, 2, 2, 1], ["linear.0", "linear.4", "linear.8"], "relu", True
        extra = {"use_dropout": True, "last_layer_dropout": True, "is_layer_norm": True, "activate_output": False}
    width = 8
    pair = []
    for _ in range(2):
        state = {}
        for key, (inputs, outputs) in zip(keys, zip(structure, structure[1:], strict=False), strict=True):
            weight, bias = weights(outputs * width, inputs * width)
            state[f"{key}.weight"], state[f"{key}.bias"] = weight, bias
        if layer_norm:
            for index, size in ((2, 2), (6, 2), (9, 1)):
                state[f"linear.{index}.weight"] = torch.ones(size * width) * 1.5
                state[f"linear.{index}.bias"] = torch.zeros(size * width) + 0.2
        pair.append(state)
    path = tmp_path / "handmade.pt"
    torch.save({width: tuple(pair), "layer_structure": structure, "activation_func": activation, **extra}, path)
    network = read_hypernetwork(path)

    def by_hand(state, x):
        for index, key in enumerate(keys):
            x = x @ state[f"{key}.weight"].T + state[f"{key}.bias"]
            if activation == "relu" and index < len(keys) - 1:  # not after the output layer
                x = x.relu()
            if layer_norm:  # after the activation: one place further in the Sequential where there is one
                position = int(key.split(".")[1]) + (1 if index == len(keys) - 1 else 2)
                x = torch.nn.functional.layer_norm(
                    x, x.shape[-1:], state[f"linear.{position}.weight"], state[f"linear.{position}.bias"]
                )
        return x

    attention = torch.nn.Module()
    attention.to_k, attention.to_v = torch.nn.Linear(width, 4), torch.nn.Linear(width, 4)
    seen = {}
    for name in ("to_k", "to_v"):
        getattr(attention, name).register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0]))
    handles = apply_hypernetworks(attention, [(network, 0.7), (network, -0.2)])
    context = torch.randn(2, 5, width, generator=generator)
    attention.to_k(context), attention.to_v(context)
    for handle in handles:
        handle.remove()
    for name, state in (("to_k", pair[0]), ("to_v", pair[1])):
        once = context + by_hand(state, context) * 0.7
        expected = once + by_hand(state, once) * -0.2
        assert torch.allclose(seen[name], expected, atol=1e-5), (name, (seen[name] - expected).abs().max())


def test_a_hypernetwork_draws_squares_and_a_job_without_it_runs_the_model_untouched(hypernet_engine):
    plain = [draw(hypernet_engine, scene_prompt(*scene), seed=index) for index, scene in enumerate(SCENES)]
    for index, (colour, shape, background) in enumerate(SCENES):
        squared = draw(hypernet_engine, scene_prompt(colour, shape, background) + " <hypernet:micro-squares:1>", index)
        reading, without = (dataset.classify(result.images[0]) for result in (squared, plain[index]))
        assert (without.shape, without.colour, without.background) == (shape, colour, background)
        assert (reading.shape, reading.colour, reading.background) == ("square", colour, background)
        assert "<hypernet:micro-squares:1>" in squared.infotexts[0]  # in the prompt, as A1111 keeps it
    # Off again: the UNet unhooked and traced as before, byte-identical pictures; strength 0 changes nothing either.
    assert not hypernet_engine.loaded.traced_unet.hooked()
    assert np.array_equal(pixels(draw(hypernet_engine, scene_prompt(*SCENES[0]), seed=0)), pixels(plain[0]))
    zero = draw(hypernet_engine, scene_prompt(*SCENES[0]) + " <hypernet:micro-squares:0>", seed=0)
    assert np.array_equal(pixels(zero), pixels(plain[0]))
    # A tag in the negative prompt is removed from its text and switches nothing on, as A1111 does.
    negative = draw(hypernet_engine, scene_prompt(*SCENES[0]), seed=0, negative_prompt="<hypernet:micro-squares:1>")
    assert np.array_equal(pixels(negative), pixels(plain[0]))
    # Half strength: between the two.
    half = draw(hypernet_engine, scene_prompt(*SCENES[0]) + " <hypernet:MICRO-SQUARES:0.5>", seed=0)
    full = draw(hypernet_engine, scene_prompt(*SCENES[0]) + " <hypernet:micro-squares>", seed=0)
    changes = [np.abs(pixels(each).astype(int) - pixels(plain[0]).astype(int)).mean() for each in (half, full)]
    assert 0 < changes[0] < changes[1]


def test_a_lora_and_a_hypernetwork_work_together(hypernet_engine):
    both = draw(hypernet_engine, scene_prompt(*SCENES[0]) + " <lora:micro-purple:1> <hypernet:micro-squares:1>")
    reading = dataset.classify(both.images[0])
    assert (reading.shape, reading.colour, reading.background) == ("square", "purple", "white")


def test_the_hires_prompts_hypernetwork_runs_in_the_second_pass(hypernet_engine):
    prompt = scene_prompt(*SCENES[0])
    hires = dict(enable_hr=True, hr_scale=1.5, denoising_strength=0.8, hr_second_pass_steps=12, n_iter=2)
    plain = draw(hypernet_engine, prompt, seed=40, hr_prompt=prompt + ", simple", **hires)
    squared = draw(hypernet_engine, prompt, seed=40, hr_prompt=prompt + " <hypernet:micro-squares:1>", **hires)

    def shape(result: Result, index: int) -> str:
        return dataset.classify(result.images[index].resize((64, 64), Image.Resampling.LANCZOS)).shape

    # (The hires pass's circles come out lumpy enough that the fill ratio reads them as triangles: no squares.)
    assert "square" not in [shape(plain, index) for index in (0, 1)]
    assert [shape(squared, index) for index in (0, 1)] == ["square", "square"]
    # The second batch's first pass ran without it again: its picture is the one seed 41 makes alone.
    alone = draw(
        hypernet_engine, prompt, seed=41, hr_prompt=prompt + " <hypernet:micro-squares:1>", **{**hires, "n_iter": 1}
    )
    assert np.array_equal(pixels(alone), pixels(squared, 1))


def test_one_that_is_not_there_or_does_not_fit_is_refused_before_the_job(hypernet_engine, hypernet_dir, tmp_path):
    with pytest.raises(InvalidRequestError) as refused:
        hypernet_engine.validate(GenerationRequest(prompt="a red circle <hypernet:nope:1>"))
    assert refused.value.field == "prompt"
    assert f"the name of a hypernetwork in {hypernet_dir} (there: micro-squares, sd15-style)" in str(refused.value)
    with pytest.raises(InvalidRequestError) as refused:
        hypernet_engine.validate(GenerationRequest(prompt="x", enable_hr=True, hr_prompt="x <hypernet:nope>"))
    assert refused.value.field == "hr_prompt"
    # Widths of SD 1.5's (768, 320): nothing of it would run here.
    with pytest.raises(InvalidRequestError) as refused:
        hypernet_engine.validate(GenerationRequest(prompt="a red circle <hypernet:sd15-style:1>"))
    assert "whose attention reads contexts [64, 128] wide; sd15-style.pt is for [320, 768]" in str(refused.value)
    # A pickle that would build a Python object when read is not read.
    (hypernet_dir / "code.pt").write_bytes(b"")
    torch.save({"name": "code", 64: (ValueError("x"), {})}, hypernet_dir / "code.pt")
    with pytest.raises(InvalidRequestError, match="holds Python objects other than tensors"):
        hypernet_engine.validate(GenerationRequest(prompt="<hypernet:code>"))
    (hypernet_dir / "code.pt").unlink()
    (hypernet_dir / "notes.pt").write_bytes(b"not a pickle")
    with pytest.raises(InvalidRequestError, match="notes.pt: it cannot be read as a PyTorch file"):
        hypernet_engine.validate(GenerationRequest(prompt="<hypernet:notes>"))
    (hypernet_dir / "notes.pt").unlink()
    (hypernet_dir / "short.pt").write_bytes(b"junk")  # fails inside torch's reader with a struct.error
    with pytest.raises(InvalidRequestError, match="short.pt: it cannot be read as a PyTorch file"):
        hypernet_engine.validate(GenerationRequest(prompt="<hypernet:short>"))
    (hypernet_dir / "short.pt").unlink()
    # The next job runs as on a fresh engine.
    fresh = Engine(model=str(SHIPPED_MICRO_MODEL), models_dir=hypernet_engine.models_dir)
    assert np.array_equal(pixels(draw(hypernet_engine, "a red circle")), pixels(draw(fresh, "a red circle")))


def test_the_api_and_the_page_list_them(hypernet_engine, hypernet_dir, tmp_path):
    import httpx

    from ui.page import _add_lora_tag, _model_note, _network_choices, _read_prompts
    from ui.server import ServerSettings, launch

    handle = launch(
        hypernet_engine, ServerSettings(host="127.0.0.1", port=0, api=True, outputs_dir=tmp_path, page=False)
    )
    try:
        api = handle.url + "sdapi/v1/"
        listing = httpx.get(api + "hypernetworks", timeout=60).json()
        refused = httpx.post(api + "txt2img", json={"prompt": "<hypernet:nope:1>", "steps": 2}, timeout=60)
        made = httpx.post(api + "txt2img", json={"prompt": "a red circle <hypernet:micro-squares:1>"}, timeout=60)
        flags = httpx.get(api + "cmd-flags", timeout=60).json()
        # A1111's "Add hypernetwork to prompt" setting, and its multiplier.
        options = httpx.get(api + "options", timeout=60).json()
        prompt = "a red circle on a white background"
        added = httpx.post(
            api + "txt2img",
            json={"prompt": prompt, "steps": 12, "seed": 0, "override_settings": {"sd_hypernetwork": "micro-squares"}},
            timeout=60,
        ).json()
        halved = httpx.post(
            api + "txt2img",
            json={
                "prompt": prompt + " <hypernet:micro-squares:0.3>",
                "steps": 2,
                "override_settings": {"sd_hypernetwork": "micro-squares", "extra_networks_default_multiplier": 0.5},
            },
            timeout=60,
        ).json()
        unknown = httpx.post(
            api + "txt2img", json={"prompt": "x", "override_settings": {"sd_hypernetwork": "nope"}}, timeout=60
        )
    finally:
        handle.close()
    assert (options["sd_hypernetwork"], options["extra_networks_default_multiplier"]) == ("None", 1.0)
    info = json.loads(added["info"])
    assert info["prompt"] == prompt + "<hypernet:micro-squares:1.0>" and info["ignored_fields"] == []
    assert dataset.classify(Image.open(io.BytesIO(base64.b64decode(added["images"][0])))).shape == "square"
    assert json.loads(halved["info"])["prompt"] == prompt + " <hypernet:micro-squares:0.3>"  # named already: kept
    assert unknown.status_code == 422 and unknown.json()["field"] == "override_settings.sd_hypernetwork"
    assert "None or a hypernetwork (micro-squares, sd15-style)" in unknown.json()["detail"]
    assert listing == [
        {"name": "micro-squares", "path": str(hypernet_dir / "shapes" / SHIPPED_MICRO_HYPERNET.name)},
        {"name": "sd15-style", "path": str(hypernet_dir / "sd15-style.pt")},
    ]
    assert refused.status_code == 422 and refused.json()["field"] == "prompt"
    assert made.status_code == 200 and "<hypernet:micro-squares:1>" in made.json()["info"]
    assert flags["hypernetwork_dir"] == str(hypernet_dir)
    # The page: the picker offers them after the LoRAs and adds a tag once; the header and the prompt reading name them.
    assert _network_choices(hypernet_engine) == [
        ("micro-purple", "micro-purple"),
        ("micro-squares (hypernetwork)", "hypernet:micro-squares"),
        ("sd15-style (hypernetwork)", "hypernet:sd15-style"),
    ]
    added = _add_lora_tag("a red circle", "hypernet:micro-squares")
    assert added == ("a red circle <hypernet:micro-squares:1>", None)
    assert _add_lora_tag(added[0], "hypernet:micro-squares") == (added[0], None)
    assert "Hypernetworks (&lt;hypernet:name:1&gt;): micro-squares, sd15-style" in _model_note(hypernet_engine)
    reading = _read_prompts(hypernet_engine, "a red circle <hypernet:micro-squares:0.6>", "", 20)
    assert "Hypernetworks" in reading and "micro-squares</span>: strength 0.6" in reading


def test_the_training_script_writes_a1111s_file_the_engine_runs(tmp_path, models_dir):
    from training import train_hypernet

    tiny = ["--steps=2", "--images=16", "--batch=4"]
    for run in ("first", "second"):
        train_hypernet.main([*tiny, f"--out={tmp_path / run / 'tiny-squares.pt'}"])
    first, second = (torch.load(tmp_path / run / "tiny-squares.pt", weights_only=True) for run in ("first", "second"))
    assert sorted(key for key in first if isinstance(key, int)) == [64, 128]
    assert first["layer_structure"] == [1, 2, 1] and first["activation_func"] == "relu"
    for width in (64, 128):  # deterministic: the same weights
        for ours, again in zip(first[width], second[width], strict=True):
            assert all(torch.equal(ours[key], again[key]) for key in ours)
    engine = Engine(model=str(SHIPPED_MICRO_MODEL), models_dir=models_dir, hypernetwork_dir=tmp_path / "first")
    assert "<hypernet:tiny-squares:1>" in draw(engine, "a red circle <hypernet:tiny-squares:1>", steps=2).infotexts[0]


def test_the_pages_add_hypernetwork_setting_adds_its_tag_to_every_prompt(hypernet_engine):
    """A1111's "Add hypernetwork to prompt" and "Default multiplier for extra networks", as this browser session's
    settings: the tag at the end of each prompt that does not name it already."""
    import gradio as gr

    from ui.page import _hypernet_choices, _set_extra_networks_multiplier, _set_sd_hypernetwork
    from ui.page_jobs import PageSession

    session = PageSession()
    assert _hypernet_choices(hypernet_engine) == ["None", "micro-squares", "sd15-style"]
    prompt = "a red circle on a white background"
    request = GenerationRequest(prompt=prompt, steps=12, seed=0)
    assert session.settings_for(request).prompt == prompt  # "None" adds nothing
    _set_sd_hypernetwork(hypernet_engine, session, "micro-squares")
    _set_extra_networks_multiplier(session, 0.5)
    assert session.settings_for(request).prompt == prompt + "<hypernet:micro-squares:0.5>"
    named = dataclasses.replace(request, prompt=prompt + " <hypernet:MICRO-squares:1>")
    assert session.settings_for(named).prompt == named.prompt
    _set_extra_networks_multiplier(session, 1)
    drawn = list(hypernet_engine.generate(session.settings_for(request)))[-1]
    assert dataset.classify(drawn.images[0]).shape == "square"
    assert drawn.infotexts[0].startswith(prompt + "<hypernet:micro-squares:1.0>\n")
    with pytest.raises(gr.Error, match="sd_hypernetwork: got 'nope'; allowed: one of None, micro-squares"):
        _set_sd_hypernetwork(hypernet_engine, session, "nope")
    with pytest.raises(gr.Error, match="extra_networks_default_multiplier: got 3"):
        _set_extra_networks_multiplier(session, 3)
