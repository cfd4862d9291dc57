"""LoRAs from the LoRA folder, switched on per job by A1111's `<lora:name:weight>` tags.

The shipped `micro-purple` LoRA (training/train_lora.py) draws every shape purple on the micro model,
so whether a LoRA ran, and how strongly, shows in the pictures."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from engine import Engine, GenerationRequest, InvalidRequestError, Result
from engine.infotext import parse_infotext_params
from engine.lora import LoraUse, lora_uses
from engine.presets import SHIPPED_MICRO_LORA, SHIPPED_MICRO_MODEL
from training import dataset

SCENES = [
    ("red", "circle", "white"),
    ("blue", "square", "yellow"),
    ("green", "triangle", "black"),
    ("orange", "circle", "blue"),
]


def misfit_lora(path, module: str, width: int) -> None:
    """A kohya-format LoRA for one layer `width` wide (an SD 1.5 layer is 320-1280 wide)."""
    key = f"lora_unet_{module.replace('.', '_')}"
    tensors = {
        f"{key}.lora_down.weight": torch.zeros(4, width),
        f"{key}.lora_up.weight": torch.zeros(width, 4),
        f"{key}.alpha": torch.tensor(4.0),
    }
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("Lora")
    (folder / "styles").mkdir()  # A1111 reads subfolders too
    shutil.copy(SHIPPED_MICRO_LORA, folder / "styles" / SHIPPED_MICRO_LORA.name)
    # An SD 1.5 LoRA: its first attention block is not in the micro model at all.
    misfit_lora(folder / "sd15-detail.safetensors", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 320)
    # A layer the micro model has, at SD 1.5's width.
    misfit_lora(folder / "wide.safetensors", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 640)
    (folder / "old-style.pt").write_bytes(b"pickle")
    # A download cut short.
    (folder / "half.safetensors").write_bytes(SHIPPED_MICRO_LORA.read_bytes()[: SHIPPED_MICRO_LORA.stat().st_size // 2])
    # micro-purple cut in two: a UNet-only LoRA (as most SDXL LoRAs are) and a text-encoder-only one.
    tensors = load_file(str(SHIPPED_MICRO_LORA))
    for part, prefix in (("unet-part", "lora_unet_"), ("te-part", "lora_te_")):
        save_file(
            {key: value for key, value in tensors.items() if key.startswith(prefix)}, folder / f"{part}.safetensors"
        )
    return folder


def make_engine(models_dir, lora_dir) -> Engine:
    return Engine(model=str(SHIPPED_MICRO_MODEL), models_dir=models_dir, lora_dir=lora_dir)


@pytest.fixture(scope="module")
def lora_engine(models_dir, lora_dir):
    return make_engine(models_dir, lora_dir)


def draw(engine: Engine, prompt: str, seed: int = 1, steps: int = 12):
    result = list(engine.generate(GenerationRequest(prompt=prompt, seed=seed, steps=steps)))[-1]
    return np.asarray(result.images[0]), result.infotexts[0]


def scene_prompt(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def test_lora_tags_read_as_a1111_reads_them():
    assert lora_uses("a cat <lora:style>") == [LoraUse("style", 1.0, 1.0, "<lora:style>")]
    assert [(u.text_encoder, u.unet) for u in lora_uses("<lora:a:0.5>, <lora:b:0.2:0.7>, <lora:c:unet=0.3:te=0>")] == [
        (0.5, 0.5),
        (0.2, 0.7),
        (0.0, 0.3),
    ]
    assert lora_uses("<hypernet:x:1> <lora:a:1> <lora:a:0.4>")[0].unet == 0.4  # the last tag of a name wins
    with pytest.raises(
        InvalidRequestError, match=r"prompt: got '<lora:a:lots>'; allowed: a number for the LoRA's text encoder"
    ):
        lora_uses("<lora:a:lots>")
    with pytest.raises(InvalidRequestError, match="<lora:name:text encoder weight:unet weight>"):
        lora_uses("<lora:a:1:1:1>")


def test_a_lora_changes_the_pictures_and_a_job_without_it_runs_the_model_untouched(lora_engine):
    plain = [draw(lora_engine, scene_prompt(*scene), seed=index)[0] for index, scene in enumerate(SCENES)]
    for index, (colour, shape, background) in enumerate(SCENES):
        pixels, infotext = draw(
            lora_engine, scene_prompt(colour, shape, background) + " <lora:micro-purple:1>", seed=index
        )
        with_lora = dataset.classify(Image.fromarray(pixels))
        without = dataset.classify(Image.fromarray(plain[index]))
        assert (without.colour, without.background) == (colour, background)
        assert (with_lora.colour, with_lora.background) == ("purple", background)
    # Switched off, the adapters leave the model's own weights: byte-identical pictures, weight 0 too.
    assert np.array_equal(draw(lora_engine, scene_prompt(*SCENES[0]), seed=0)[0], plain[0])
    assert np.array_equal(draw(lora_engine, scene_prompt(*SCENES[0]) + " <lora:micro-purple:0>", seed=0)[0], plain[0])
    # The file's name in any case, and a tag in the negative prompt switches nothing on.
    upper, _ = draw(lora_engine, scene_prompt(*SCENES[0]) + " <lora:MICRO-PURPLE:1>", seed=0)
    assert dataset.classify(Image.fromarray(upper)).colour == "purple"
    negative = list(
        lora_engine.generate(
            GenerationRequest(
                prompt=scene_prompt(*SCENES[0]), negative_prompt="<lora:micro-purple:1>", seed=0, steps=12
            )
        )
    )[-1]
    assert np.array_equal(np.asarray(negative.images[0]), plain[0])


def test_text_encoder_and_unet_weights_apply_apart(lora_engine):
    prompt = scene_prompt(*SCENES[0])
    plain, _ = draw(lora_engine, prompt)
    text_only, _ = draw(lora_engine, prompt + " <lora:micro-purple:1:0>")
    unet_only, _ = draw(lora_engine, prompt + " <lora:micro-purple:te=0:unet=1>")
    both, _ = draw(lora_engine, prompt + " <lora:micro-purple:1>")
    pictures = [plain, text_only, unet_only, both]
    # Each is another picture: the text encoder's part reaches the encoding (not a cached one) and the
    # UNet's part reaches the UNet.
    assert all(not np.array_equal(a, b) for i, a in enumerate(pictures) for b in pictures[i + 1 :])
    assert np.array_equal(draw(lora_engine, prompt)[0], plain)


def test_several_loras_combine_and_one_may_lack_a_part(lora_engine):
    prompt = scene_prompt(*SCENES[2])
    whole, _ = draw(lora_engine, prompt + " <lora:micro-purple:1>")
    unet_part, _ = draw(lora_engine, prompt + " <lora:unet-part:1>")
    assert not np.array_equal(unet_part, whole) and not np.array_equal(unet_part, draw(lora_engine, prompt)[0])
    both, infotext = draw(lora_engine, prompt + " <lora:te-part:1> <lora:unet-part:1>")
    assert np.array_equal(both, whole)
    assert 'Lora hashes: "te-part: ' in infotext and ", unet-part: " in infotext


def test_infotext_names_the_loras_by_hash_as_a1111_does(lora_engine, lora_dir):
    _, infotext = draw(lora_engine, "a red circle <lora:micro-purple:0.8>", steps=2)
    digest = hashlib.sha256((lora_dir / "styles" / SHIPPED_MICRO_LORA.name).read_bytes()).hexdigest()[:12]
    assert infotext.splitlines()[0] == "a red circle <lora:micro-purple:0.8>"
    assert f'Lora hashes: "micro-purple: {digest}"' in infotext
    assert "Lora hashes" not in draw(lora_engine, "a red circle", steps=2)[1]


def test_a_lora_that_is_not_there_is_refused_before_the_job_naming_what_is(lora_engine):
    with pytest.raises(
        InvalidRequestError, match=r"got '<lora:purple:1>'; allowed: the name of a LoRA in .*micro-purple"
    ):
        lora_engine.validate(GenerationRequest(prompt="a circle <lora:purple:1>"))
    with pytest.raises(InvalidRequestError, match=r"old-style.pt is a pickle file: convert it to .safetensors"):
        lora_engine.validate(GenerationRequest(prompt="<lora:old-style:1>"))


def test_a_lora_for_another_model_is_refused_and_the_next_job_is_as_on_a_fresh_engine(
    models_dir, lora_dir, lora_engine
):
    fresh = make_engine(models_dir, lora_dir)
    with pytest.raises(
        InvalidRequestError,
        match=r"a LoRA made for this model \(micro\); sd15-detail.safetensors does not fit it: Target modules",
    ):
        draw(fresh, "a circle <lora:sd15-detail:1>", steps=2)
    with pytest.raises(InvalidRequestError, match=r"wide.safetensors does not fit it: .*size mismatch.*640"):
        draw(fresh, "a circle <lora:wide:1>", steps=2)
    # A damaged file is not blamed on the model: the message says what happened and what to do.
    with pytest.raises(InvalidRequestError, match=r"half.safetensors is incomplete: .*download the checkpoint again"):
        draw(fresh, "a circle <lora:half:1>", steps=2)
    prompt = scene_prompt(*SCENES[1]) + " <lora:micro-purple:1>"
    assert np.array_equal(draw(fresh, prompt)[0], draw(lora_engine, prompt)[0])
    assert np.array_equal(draw(fresh, scene_prompt(*SCENES[1]))[0], draw(lora_engine, scene_prompt(*SCENES[1]))[0])


def test_the_api_lists_loras_and_refuses_a_missing_one(lora_engine, lora_dir, tmp_path):
    import httpx

    from ui.server import ServerSettings, launch

    handle = launch(lora_engine, ServerSettings(host="127.0.0.1", port=0, api=True, outputs_dir=tmp_path, page=False))
    try:
        api = handle.url + "sdapi/v1/"
        listing = {item["name"]: item for item in httpx.get(api + "loras", timeout=60).json()}
        refused = httpx.post(api + "txt2img", json={"prompt": "<lora:nope:1>", "steps": 2}, timeout=60)
        made = httpx.post(
            api + "txt2img", json={"prompt": "a red circle <lora:micro-purple:1>", "steps": 2}, timeout=60
        )
        flags = httpx.get(api + "cmd-flags", timeout=60).json()
    finally:
        handle.close()
    assert sorted(listing) == ["half", "micro-purple", "sd15-detail", "te-part", "unet-part", "wide"]
    assert listing["micro-purple"]["path"] == str(lora_dir / "styles" / SHIPPED_MICRO_LORA.name)
    assert listing["micro-purple"]["metadata"]["ss_network_dim"] == "4"
    assert refused.status_code == 422 and refused.json()["field"] == "prompt"
    assert made.status_code == 200 and "Lora hashes" in made.json()["info"]
    assert flags["lora_dir"] == str(lora_dir)


def test_the_page_names_the_loras_under_the_model(lora_engine):
    from ui.page import _model_note

    assert (
        "LoRAs (&lt;lora:name:1&gt; in the prompt): half, micro-purple, sd15-detail, te-part, unet-part, wide"
        in _model_note(lora_engine)
    )


def test_the_lora_training_script_writes_a_kohya_file_the_engine_runs(tmp_path, models_dir):
    from safetensors import safe_open

    from training import train_lora

    tiny = ["--steps=2", "--images=16", "--batch=4"]
    for run in ("first", "second"):
        train_lora.main([*tiny, f"--out={tmp_path / run / 'tiny-purple.safetensors'}"])
    first, second = (tmp_path / run / "tiny-purple.safetensors" for run in ("first", "second"))
    with safe_open(str(first), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    # Deterministic: the same tensors (the header's metadata order is the writer's own).
    first_tensors, second_tensors = load_file(str(first)), load_file(str(second))
    assert first_tensors.keys() == second_tensors.keys()
    assert all(torch.equal(first_tensors[key], second_tensors[key]) for key in first_tensors)
    assert {key.split("_")[1] for key in keys} == {"unet", "te"}
    assert all(key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for key in keys)
    assert metadata["ss_network_dim"] == "4" and metadata["ss_output_name"] == "tiny-purple"
    engine = Engine(model=str(SHIPPED_MICRO_MODEL), models_dir=models_dir, lora_dir=tmp_path / "first")
    _, infotext = draw(engine, "a red circle <lora:tiny-purple:1>", steps=2)
    assert 'Lora hashes: "tiny-purple: ' in infotext


def test_an_sdxl_lora_reaches_both_text_encoders_at_its_weights(tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from engine.lora import LoraAdapters
    from engine.prompts import SDXLPromptEncoder
    from tests.test_prompts_sdxl import build_tiny_sdxl_pipeline

    # A diffusers-format SDXL LoRA with every part non-zero, made on a copy of the tiny SDXL pipeline.
    source, pipe = build_tiny_sdxl_pipeline(), build_tiny_sdxl_pipeline()
    torch.manual_seed(1)
    parts = {"unet": (source.unet, ["to_q", "to_k"])}
    parts |= {name: (getattr(source, name), ["q_proj", "out_proj"]) for name in ("text_encoder", "text_encoder_2")}
    for module, targets in parts.values():
        module.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets))
        for name, parameter in module.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.5)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path,
        **{f"{name}_lora_layers": get_peft_model_state_dict(module) for name, (module, _) in parts.items()},
        weight_name="xl-style.safetensors",
    )

    adapters = LoraAdapters(tmp_path)
    encoder = SDXLPromptEncoder(pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2)
    plain = encoder.encode("a cat")[0]
    assert adapters.activate(lambda: pipe, adapters.resolve(lora_uses("<lora:xl-style:1:0>")), "sdxl")
    assert pipe.get_list_adapters() == {"unet": ["lora0"], "text_encoder": ["lora0"], "text_encoder_2": ["lora0"]}
    scales = {
        name: {layer.scaling["lora0"] for layer in module.modules() if hasattr(layer, "scaling")}
        for name, module in (("unet", pipe.unet), ("text_encoder_2", pipe.text_encoder_2))
    }
    assert scales == {"unet": {0.0}, "text_encoder_2": {1.0}}
    encoder.clear_cache()
    styled = encoder.encode("a cat")[0]
    assert not torch.equal(styled.embeds, plain.embeds) and not torch.equal(styled.pooled, plain.pooled)
    assert adapters.activate(lambda: pipe, [], "sdxl")
    encoder.clear_cache()
    assert torch.equal(encoder.encode("a cat")[0].embeds, plain.embeds)


def test_the_lora_picker_adds_a_tag_once():
    from ui.page import _add_lora_tag

    assert _add_lora_tag("a red circle ", "micro-purple") == ("a red circle <lora:micro-purple:1>", None)
    assert _add_lora_tag("", "micro-purple") == ("<lora:micro-purple:1>", None)
    named = "a circle <lora:Micro-Purple:0.4>"
    assert _add_lora_tag(named, "micro-purple") == (named, None)  # already there: its weight is kept
    assert _add_lora_tag("a <lora:x:bad>", "micro-purple") == ("a <lora:x:bad> <lora:micro-purple:1>", None)


def test_the_hires_prompts_loras_run_in_the_second_pass(lora_engine):
    """As in A1111: LoRA tags in the hires prompt switch LoRAs for the hires pass only."""
    prompt = scene_prompt(*SCENES[0])  # a red circle on a white background
    hires = dict(enable_hr=True, hr_scale=1.5, denoising_strength=0.7, hr_second_pass_steps=12, steps=12, n_iter=2)

    def run(**fields) -> Result:
        result = list(lora_engine.generate(GenerationRequest(**{"prompt": prompt, "seed": 40, **hires, **fields})))[-1]
        assert isinstance(result, Result)
        return result

    def colour(result: Result, index: int = 0) -> str:
        return dataset.classify(result.images[index].resize((64, 64), Image.Resampling.LANCZOS)).colour

    plain = run(hr_prompt=prompt + ", simple")
    purple_hires = run(hr_prompt=prompt + " <lora:micro-purple:1>")
    assert [colour(plain, index) for index in (0, 1)] == ["red", "red"]
    assert [colour(purple_hires, index) for index in (0, 1)] == ["purple", "purple"]
    assert "micro-purple: " in parse_infotext_params(purple_hires.infotexts[0])["Lora hashes"]
    # The second batch's first pass ran without the LoRA again: its picture is the one seed 41 makes alone.
    alone = run(hr_prompt=prompt + " <lora:micro-purple:1>", seed=41, n_iter=1)
    assert np.array_equal(np.asarray(alone.images[0]), np.asarray(purple_hires.images[1]))
    # The other way round: the LoRA in the first pass only leaves the second pass without it.
    first_only = run(prompt=prompt + " <lora:micro-purple:1>", hr_prompt=prompt)
    both = run(prompt=prompt + " <lora:micro-purple:1>")
    assert [colour(first_only, index) for index in (0, 1)] == ["red", "red"]  # redrawn at 0.7 without it
    assert [colour(both, index) for index in (0, 1)] == ["purple", "purple"]
    with pytest.raises(InvalidRequestError) as refused:
        lora_engine.validate(GenerationRequest(prompt=prompt, enable_hr=True, hr_prompt="x <lora:nope:1>"))
    assert refused.value.field == "hr_prompt"
