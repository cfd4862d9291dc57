"""Single-file checkpoints in the A1111 / original Stable Diffusion layout: saving, detecting, loading offline."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.checkpoint import (
    CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    clip_text_to_ldm,
    detect_family,
    load_single_file,
    local_tokenizers,
    read_safetensors_header,
    save_single_file,
    unet_to_ldm,
    vae_to_ldm,
)
from engine.errors import ModelLoadError
from engine.presets import CONFIGS_DIR, TOKENIZER_DIR

COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture
def no_network(monkeypatch):
    """Fail any attempt to open a network connection (HF_HUB_OFFLINE alone would only make the hub refuse)."""

    def refuse(self, address, *args, **kwargs):
        raise AssertionError(f"network connection attempted to {address!r}")

    def refuse_lookup(host, *args, **kwargs):
        raise AssertionError(f"network name lookup attempted for {host!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse_lookup)


@pytest.fixture(scope="module")
def tiny_pipe():
    from engine.tiny_model import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_pipe, tmp_path_factory):
    return save_single_file(tiny_pipe, tmp_path_factory.mktemp("single-file") / "tiny-sd.safetensors")


@pytest.fixture(scope="module")
def loaded_tiny(tiny_checkpoint):
    pipe = load_single_file(tiny_checkpoint, "tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_fake_checkpoint(path, shapes: dict[str, tuple[int, ...]]):
    """A safetensors file with the given tensor names and shapes (zeros): enough for header-only detection."""
    save_file({name: torch.zeros(shape, dtype=torch.float16) for name, shape in shapes.items()}, str(path))
    return path


# ---------------------------------------------------------------------------------------------
# Saving and loading the tiny model


def test_saved_tiny_model_is_one_file_in_the_original_layout(tiny_checkpoint):
    shapes = read_safetensors_header(tiny_checkpoint)

    assert all(name.startswith((UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX)) for name in shapes)
    # Names and shapes A1111 expects for an SD 1.x checkpoint.
    assert shapes["model.diffusion_model.input_blocks.0.0.weight"] == [32, 4, 3, 3]
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in shapes  # the first downsampler
    assert "model.diffusion_model.middle_block.2.out_layers.3.weight" in shapes
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in shapes  # upsampler after a transformer
    assert shapes["model.diffusion_model.out.2.weight"] == [4, 32, 3, 3]
    assert shapes["first_stage_model.decoder.up.3.block.0.conv1.weight"][0] == 32
    assert len(shapes["first_stage_model.encoder.mid.attn_1.q.weight"]) == 4  # a 1x1 conv in the original
    assert shapes["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] == [49408, 32]
    # Written beside the target and renamed: nothing half-written is left behind.
    assert [p.name for p in tiny_checkpoint.parent.iterdir()] == [tiny_checkpoint.name]


def test_detect_family_recognises_the_tiny_model(tiny_checkpoint):
    assert detect_family(tiny_checkpoint) == "tiny"


def test_single_file_loads_offline_with_every_weight_unchanged(tiny_pipe, tiny_checkpoint, no_network):
    from diffusers import StableDiffusionPipeline

    loaded = load_single_file(tiny_checkpoint, "tiny")

    assert isinstance(loaded, StableDiffusionPipeline)
    for component in COMPONENTS:
        original = getattr(tiny_pipe, component).state_dict()
        reloaded = getattr(loaded, component).state_dict()
        assert reloaded.keys() == original.keys(), component
        for name, tensor in original.items():
            assert torch.equal(reloaded[name], tensor), f"{component}.{name}"
    assert dict(loaded.unet.config) == dict(tiny_pipe.unet.config)
    assert loaded.scheduler.config == tiny_pipe.scheduler.config
    assert loaded.tokenizer.get_vocab() == tiny_pipe.tokenizer.get_vocab()
    assert loaded.safety_checker is None


def test_single_file_generates_the_same_pixels_as_the_original(tiny_pipe, loaded_tiny):
    def generate(pipe):
        generator = torch.Generator().manual_seed(1234)
        return pipe(
            "a red apple", num_inference_steps=2, height=64, width=64, generator=generator, output_type="np"
        ).images

    original, reloaded = generate(tiny_pipe), generate(loaded_tiny)

    assert original.shape == (1, 64, 64, 3)
    assert np.array_equal(original, reloaded)


def test_load_honours_the_requested_dtype(tiny_checkpoint):
    pipe = load_single_file(tiny_checkpoint, "tiny", torch_dtype=torch.bfloat16)

    assert {getattr(pipe, component).dtype for component in COMPONENTS} == {torch.bfloat16}


def test_half_precision_file_loads_in_float32_unless_asked(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "half.safetensors"
    save_file({name: t.half() for name, t in load_file(tiny_checkpoint).items()}, str(path))

    assert {getattr(load_single_file(path, "tiny"), c).dtype for c in COMPONENTS} == {torch.float32}
    assert {getattr(load_single_file(path, "tiny", torch_dtype=torch.float16), c).dtype for c in COMPONENTS} == {
        torch.float16
    }


def test_load_with_another_pipeline_class(tiny_checkpoint, no_network):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = load_single_file(tiny_checkpoint, "tiny", pipeline_class=StableDiffusionImg2ImgPipeline)

    assert isinstance(pipe, StableDiffusionImg2ImgPipeline)


# ---------------------------------------------------------------------------------------------
# Files that are not loadable checkpoints


def test_garbage_file_gives_a_helpful_error(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(np.random.default_rng(0).bytes(4096))

    for attempt in (lambda: detect_family(path), lambda: load_single_file(path, "sd1")):
        with pytest.raises(ModelLoadError, match="not a valid .safetensors checkpoint") as caught:
            attempt()
        assert "download the checkpoint again" in str(caught.value)


def test_empty_file_gives_a_helpful_error(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")

    with pytest.raises(ModelLoadError, match="only 0 bytes long"):
        detect_family(path)


def test_truncated_download_gives_a_helpful_error(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint.read_bytes()
    path = tmp_path / "half.safetensors"
    path.write_bytes(data[: len(data) // 2])

    for attempt in (lambda: detect_family(path), lambda: load_single_file(path, "tiny")):
        with pytest.raises(ModelLoadError, match="is incomplete") as caught:
            attempt()
        assert "download the checkpoint again" in str(caught.value)


def test_checkpoint_missing_a_component_names_it(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file

    tensors = {name: t for name, t in load_file(tiny_checkpoint).items() if not name.startswith(VAE_PREFIX)}
    path = tmp_path / "no-vae.safetensors"
    save_file(tensors, str(path))

    with pytest.raises(ModelLoadError, match="has no VAE weights"):
        load_single_file(path, "tiny")


def test_checkpoint_missing_one_tensor_is_called_incomplete(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(tiny_checkpoint)
    del tensors["model.diffusion_model.out.2.bias"]
    path = tmp_path / "almost.safetensors"
    save_file(tensors, str(path))

    with pytest.raises(ModelLoadError, match="not a complete checkpoint"):
        load_single_file(path, "tiny")


def test_unknown_family_lists_the_known_ones(tiny_checkpoint):
    with pytest.raises(ModelLoadError, match="Unknown model family 'sd9'.*sd1, sd2, sdxl, tiny"):
        load_single_file(tiny_checkpoint, "sd9")


def test_loading_as_the_wrong_family_says_which_is_right(tiny_checkpoint):
    with pytest.raises(ModelLoadError, match="load it as 'tiny'"):
        load_single_file(tiny_checkpoint, "sd1")


def test_missing_file_gives_a_helpful_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such checkpoint file"):
        load_single_file(tmp_path / "nowhere.safetensors", "sd1")


@pytest.mark.parametrize(
    ("name", "advice"),
    [
        ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "a LoRA; put it in models/Lora"),
        ("first_stage_model.decoder.conv_out.weight", "a VAE on its own; put it in models/VAE"),
        ("decoder.conv_out.weight", "a VAE on its own; put it in models/VAE"),
        ("down_blocks.0.resnets.0.conv1.weight", "load the whole diffusers folder"),
    ],
    ids=["lora", "ldm-vae", "vae", "diffusers-unet"],
)
def test_file_that_is_not_a_checkpoint_says_where_it_belongs(tmp_path, name, advice):
    path = write_fake_checkpoint(tmp_path / "other.safetensors", {name: (4, 4)})

    with pytest.raises(ModelLoadError, match="has no UNet weights") as caught:
        detect_family(path)
    assert advice in str(caught.value)


# ---------------------------------------------------------------------------------------------
# Detecting the family from the header alone

SDXL_BASE_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
    "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3),
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (1, 768),
    "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
}
SD2_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
    "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3),
    "cond_stage_model.model.token_embedding.weight": (1, 1024),
    "cond_stage_model.model.positional_embedding": (77, 1024),
}
SD1_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
    "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (1, 768),
}


@pytest.mark.parametrize(
    ("shapes", "family"),
    [
        (SDXL_BASE_KEYS, "sdxl"),
        (SD2_KEYS, "sd2"),
        (SD1_KEYS, "sd1"),
        # A UNet-only file: the cross-attention width tells the family.
        ({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)}, "sd1"),
        ({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}, "sd2"),
        ({"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048)}, "sdxl"),
    ],
    ids=["sdxl", "sd2", "sd1", "sd1-unet-only", "sd2-unet-only", "sdxl-unet-only"],
)
def test_detect_family_from_header(tmp_path, shapes, family):
    assert detect_family(write_fake_checkpoint(tmp_path / "model.safetensors", shapes)) == family


def test_sdxl_refiner_is_refused_with_a_reason(tmp_path):
    path = write_fake_checkpoint(
        tmp_path / "refiner.safetensors",
        {
            "model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3),
            "conditioner.embedders.0.model.text_projection": (1280, 1280),
        },
    )

    with pytest.raises(ModelLoadError, match="SDXL refiner"):
        detect_family(path)


def test_an_inpainting_checkpoint_is_its_family_and_instruct_pix2pix_is_refused_with_a_reason(tmp_path):
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    inpainting = write_fake_checkpoint(tmp_path / "inpainting.safetensors", {**SD1_KEYS, conv_in: (320, 9, 3, 3)})
    assert detect_family(inpainting) == "sd1"  # loaded with a 9-channel UNet: tests/test_inpainting_model.py

    pix2pix = write_fake_checkpoint(tmp_path / "pix2pix.safetensors", {**SD1_KEYS, conv_in: (320, 8, 3, 3)})
    with pytest.raises(ModelLoadError, match="8 input channels .an instruct-pix2pix model"):
        detect_family(pix2pix)


# ---------------------------------------------------------------------------------------------
# The bundled config folders


def test_sd1_configs():
    from diffusers import AutoencoderKL, DiffusionPipeline, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    folder = CONFIGS_DIR / "sd1"
    assert DiffusionPipeline.load_config(folder)["_class_name"] == "StableDiffusionPipeline"
    unet = UNet2DConditionModel.load_config(folder, subfolder="unet")
    assert unet["cross_attention_dim"] == 768
    assert unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert unet["sample_size"] == 64
    assert AutoencoderKL.load_config(folder, subfolder="vae")["scaling_factor"] == 0.18215
    assert PNDMScheduler.load_config(folder, subfolder="scheduler")["prediction_type"] == "epsilon"
    text = CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
    assert (text.hidden_size, text.num_hidden_layers, text.hidden_act) == (768, 12, "quick_gelu")


def test_sd2_configs_are_the_768_v_prediction_model():
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    folder = CONFIGS_DIR / "sd2"
    unet = UNet2DConditionModel.load_config(folder, subfolder="unet")
    assert unet["cross_attention_dim"] == 1024
    assert unet["attention_head_dim"] == [5, 10, 20, 20]
    assert unet["use_linear_projection"] is True
    assert unet["upcast_attention"] is True
    assert unet["sample_size"] == 96  # 768 px
    assert AutoencoderKL.load_config(folder, subfolder="vae")["sample_size"] == 768
    scheduler = DDIMScheduler.load_config(folder, subfolder="scheduler")
    assert scheduler["prediction_type"] == "v_prediction"
    text = CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
    assert (text.hidden_size, text.num_hidden_layers, text.hidden_act) == (1024, 23, "gelu")


def test_sdxl_configs():
    from diffusers import AutoencoderKL, DiffusionPipeline, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    folder = CONFIGS_DIR / "sdxl"
    index = DiffusionPipeline.load_config(folder)
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    unet = UNet2DConditionModel.load_config(folder, subfolder="unet")
    assert unet["addition_embed_type"] == "text_time"
    assert unet["cross_attention_dim"] == 2048
    assert unet["transformer_layers_per_block"] == [1, 2, 10]
    assert unet["projection_class_embeddings_input_dim"] == 2816
    assert AutoencoderKL.load_config(folder, subfolder="vae")["scaling_factor"] == 0.13025
    assert EulerDiscreteScheduler.load_config(folder, subfolder="scheduler")["timestep_spacing"] == "leading"
    text_2 = CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2", local_files_only=True)
    assert (text_2.hidden_size, text_2.num_hidden_layers, text_2.projection_dim) == (1280, 32, 1280)


CONFIG_FILE_NAMES = {"scheduler": "scheduler_config.json", "feature_extractor": "preprocessor_config.json"}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_model_component_has_its_config_and_no_tokenizer_is_duplicated(family):
    folder = CONFIGS_DIR / family
    index = json.loads((folder / "model_index.json").read_text())
    components = [name for name, spec in index.items() if isinstance(spec, list) and spec[0] is not None]
    for name in components:
        # Tokenizers are passed in as objects; a safety checker is never loaded from a single file.
        if not name.startswith("tokenizer") and name != "safety_checker":
            config_file = folder / name / CONFIG_FILE_NAMES.get(name, "config.json")
            assert config_file.is_file(), config_file
    # The tokenizers come from presets/configs/clip-tokenizer; no weights are bundled.
    for pattern in ("vocab.json", "merges.txt", "*.safetensors", "*.bin"):
        assert not list(folder.rglob(pattern)), pattern


def test_local_tokenizers_share_the_clip_vocabulary_and_pad_like_each_family():
    from transformers import CLIPTokenizer

    reference = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    sd1, sd2, sdxl = local_tokenizers("sd1"), local_tokenizers("sd2"), local_tokenizers("sdxl")

    assert sd1["tokenizer"].pad_token == "<|endoftext|>"
    assert sdxl["tokenizer"].pad_token == "<|endoftext|>"
    # OpenCLIP (SD 2.x, SDXL's second encoder) pads with "!", token 0.
    assert sd2["tokenizer"].pad_token == "!" and sd2["tokenizer"].pad_token_id == 0
    assert sdxl["tokenizer_2"].pad_token == "!" and sdxl["tokenizer_2"].pad_token_id == 0
    for tokenizer in (sd1["tokenizer"], sd2["tokenizer"], sdxl["tokenizer"], sdxl["tokenizer_2"]):
        assert tokenizer("a photo of a cat").input_ids == reference("a photo of a cat").input_ids


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_saved_names_are_the_ones_diffusers_reads_back_for_the_full_size_models(family):
    """The LDM names written for each real architecture convert back to exactly the diffusers names
    and shapes (built on the meta device, so no memory is spent on weights)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    folder = CONFIGS_DIR / family
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
    checkpoint = {UNET_PREFIX + name: t for name, t in unet_to_ldm(unet.state_dict(), unet.config).items()}
    checkpoint |= {VAE_PREFIX + name: t for name, t in vae_to_ldm(vae.state_dict(), vae.config).items()}

    for model, converted in (
        (unet, convert_ldm_unet_checkpoint(checkpoint, unet.config)),
        (vae, convert_ldm_vae_checkpoint(checkpoint, vae.config)),
    ):
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        assert {name: tuple(t.shape) for name, t in converted.items()} == expected


# ---------------------------------------------------------------------------------------------
# SD 2.x and SDXL single files, on shrunken architectures (the real ones are gigabytes)

TINY_TEXT = {
    "torch_dtype": "float32",  # SDXL's configs say float16, which would build these test models in half precision
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": 32,
}
TINY_UNET = {
    "block_out_channels": [32, 64],
    "attention_head_dim": [2, 4],
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "sample_size": 8,
}
TINY_VAE = {"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 16, "sample_size": 64}


def shrunken_configs(family: str, folder):
    """A copy of presets/configs/<family> whose models are tiny; returns the component classes' configs."""
    import shutil

    shutil.copytree(CONFIGS_DIR / family, folder)

    def shrink(component: str, changes: dict) -> dict:
        path = folder / component / "config.json"
        config = {**json.loads(path.read_text()), **changes}
        path.write_text(json.dumps(config))
        return config

    blocks = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]}
    blocks["up_block_types"] = ["CrossAttnUpBlock2D", "UpBlock2D"]
    vae = shrink("vae", {**TINY_VAE, "down_block_types": ["DownEncoderBlock2D"] * 2})
    vae = shrink("vae", {"up_block_types": ["UpDecoderBlock2D"] * 2})
    configs = {"vae": vae, "text_encoder": shrink("text_encoder", TINY_TEXT)}
    if family == "sdxl":
        # Diffusers tells SDXL's two encoders apart by width (768 and 1280), so they must differ here too.
        configs["text_encoder_2"] = shrink("text_encoder_2", {**TINY_TEXT, "hidden_size": 48, "projection_dim": 48})
        # SDXL's UNet reads both encoders' hidden states side by side, and the pooled embedding of
        # the second plus six size/crop numbers (each embedded in addition_time_embed_dim).
        extra = {"cross_attention_dim": 80, "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 96}
        configs["unet"] = shrink("unet", {**TINY_UNET, **blocks, **extra, "transformer_layers_per_block": 1})
    else:
        configs["unet"] = shrink("unet", {**TINY_UNET, **blocks, "cross_attention_dim": 32})
    return configs


def open_clip_tensors(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model under the OpenCLIP names that SD 2.x and SDXL checkpoints use."""
    state = {name.removeprefix("text_model."): t for name, t in text_encoder.state_dict().items()}
    tensors = {
        prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["final_layer_norm.weight"],
        prefix + "ln_final.bias": state["final_layer_norm.bias"],
    }
    if "text_projection.weight" in state:
        tensors[prefix + "text_projection"] = state["text_projection.weight"].T.contiguous()
    renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    renames["self_attn.out_proj"] = "attn.out_proj"
    for layer in range(text_encoder.config.num_hidden_layers):
        ours, theirs = f"encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for leaf in ("weight", "bias"):
            projections = [state[f"{ours}self_attn.{p}_proj.{leaf}"] for p in "qkv"]
            tensors[f"{theirs}attn.in_proj_{leaf}"] = torch.cat(projections)
            for name, their_name in renames.items():
                tensors[f"{theirs}{their_name}.{leaf}"] = state[f"{ours}{name}.{leaf}"]
    return tensors


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_sd2_and_sdxl_single_files_load_offline(family, tmp_path, monkeypatch, no_network):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    import engine.checkpoint

    configs = shrunken_configs(family, tmp_path / "configs")
    monkeypatch.setattr(engine.checkpoint, "family_config_dir", lambda name: tmp_path / "configs")
    torch.manual_seed(0)
    models = {
        "unet": UNet2DConditionModel.from_config(configs["unet"]),
        "vae": AutoencoderKL.from_config(configs["vae"]),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
    }
    tensors = {UNET_PREFIX + n: t for n, t in unet_to_ldm(models["unet"].state_dict(), configs["unet"]).items()}
    tensors |= {VAE_PREFIX + n: t for n, t in vae_to_ldm(models["vae"].state_dict(), configs["vae"]).items()}
    if family == "sdxl":
        models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
        first = "conditioner.embedders.0.transformer."
        tensors |= {first + n: t for n, t in clip_text_to_ldm(models["text_encoder"].state_dict()).items()}
        tensors |= open_clip_tensors(models["text_encoder_2"], "conditioner.embedders.1.model.")
    else:
        tensors |= open_clip_tensors(models["text_encoder"], "cond_stage_model.model.")
    path = tmp_path / f"{family}.safetensors"
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(path))

    assert detect_family(path) == family
    pipe = load_single_file(path, family)

    assert isinstance(pipe, StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline)
    for component, model in models.items():
        loaded = getattr(pipe, component).state_dict()
        assert loaded.keys() == model.state_dict().keys(), component
        assert all(torch.equal(loaded[name], t) for name, t in model.state_dict().items()), component
    open_clip_tokenizer = pipe.tokenizer_2 if family == "sdxl" else pipe.tokenizer
    assert open_clip_tokenizer.pad_token == "!"
    expected_prediction = "epsilon" if family == "sdxl" else "v_prediction"
    assert pipe.scheduler.config.prediction_type == expected_prediction
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=1, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
