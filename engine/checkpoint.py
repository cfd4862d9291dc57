"""Single-file checkpoints in the original Stable Diffusion ("LDM") layout: detect, load offline, save.

A1111-style `.safetensors` checkpoints hold the UNet under `model.diffusion_model.*`, the VAE under
`first_stage_model.*` and the text encoder(s) under `cond_stage_model.*` (SD 1.x: OpenAI CLIP,
SD 2.x: OpenCLIP) or `conditioner.embedders.*` (SDXL). Diffusers can read them with
`from_single_file`, but by default it fetches each architecture's configs and tokenizers from the
Hugging Face Hub. Here every family's configs come from presets/configs/<family> and the tokenizers
from presets/configs/clip-tokenizer, so loading never touches the network.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError
from .presets import CONFIGS_DIR, TOKENIZER_DIR, family_defaults

# An inpainting model's UNet input: the 4 latent channels, the mask, and the masked picture's 4.
INPAINTING_CHANNELS = 9

log = logging.getLogger(__name__)

FAMILIES = ("sd1", "sd2", "sdxl", "tiny")

# The OpenCLIP text encoders (SD 2.x, SDXL's second encoder) pad prompts with token 0, "!",
# where OpenAI CLIP pads with its end-of-text token; same vocabulary otherwise.
OPEN_CLIP_PAD_TOKEN = "!"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_PREFIX = "conditioner.embedders."

# A header bigger than this is not a model header (safetensors itself refuses over 100 MB).
_MAX_HEADER_BYTES = 100 * 1024 * 1024
TINY_WIDTH = 32


# --------------------------------------------------------------------------------------------
# Reading the header


def read_safetensors_header(path: str | os.PathLike) -> dict[str, list[int]]:
    """Tensor names and shapes of a `.safetensors` file, read from its header only (no weights).

    Raises ModelLoadError when the file is not a complete safetensors file: too short, a header
    that is not JSON, or tensor data that runs past the end of the file (an interrupted download).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as stream:
            prefix = stream.read(8)
            if len(prefix) < 8:
                raise ModelLoadError(_not_safetensors(path, f"it is only {size} bytes long"))
            header_len = int.from_bytes(prefix, "little")
            if header_len < 2 or header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise ModelLoadError(_not_safetensors(path, "it does not start with a safetensors header"))
            raw = stream.read(header_len)
    except OSError as exc:
        raise ModelLoadError(f"Could not read {path}: {exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise ModelLoadError(_not_safetensors(path, "its header is not valid JSON")) from None
    if not isinstance(header, dict):
        raise ModelLoadError(_not_safetensors(path, "its header is not a table of tensors"))

    shapes: dict[str, list[int]] = {}
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            shape = [int(dim) for dim in entry["shape"]]
            start, end = (int(offset) for offset in entry["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise ModelLoadError(_not_safetensors(path, f"its header entry for {name!r} is malformed")) from None
        shapes[name] = shape
        data_end = max(data_end, end, start)
    available = size - 8 - header_len
    if data_end > available:
        raise ModelLoadError(
            f"{path} is incomplete: its header describes {data_end} bytes of tensor data but the file holds only "
            f"{available}. The download or copy was probably interrupted; download the checkpoint again."
        )
    return shapes


def _not_safetensors(path: Path, reason: str) -> str:
    return (
        f"{path} is not a valid .safetensors checkpoint ({reason}). It may be damaged, only partly downloaded, "
        "or a different kind of file renamed; download the checkpoint again."
    )


# --------------------------------------------------------------------------------------------
# Detecting the family


def detect_family(path: str | os.PathLike) -> str:
    """The model family of a single-file checkpoint: "sdxl", "sd2", "sd1" or "tiny".

    Reads only the safetensors header (tensor names and shapes). Raises ModelLoadError with what
    to do when the file is not a Stable Diffusion checkpoint this program can load.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(
            f"{path}: the family of a {path.suffix or 'suffix-less'} file cannot be read without unpickling it; "
            "use a .safetensors checkpoint."
        )
    return family_from_shapes(read_safetensors_header(path), source=str(path))


def family_from_shapes(shapes: dict[str, list[int]], *, source: str = "checkpoint") -> str:
    """`detect_family` for an already-read table of tensor names and shapes."""
    names = shapes.keys()
    has_unet = any(name.startswith(UNET_PREFIX) for name in names)
    if not has_unet:
        raise ModelLoadError(_not_a_checkpoint(source, names))

    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] not in (4, INPAINTING_CHANNELS):
        kind = " (an instruct-pix2pix model)" if conv_in[1] == 8 else ""
        raise ModelLoadError(
            f"{source} is a UNet with {conv_in[1]} input channels{kind}; only standard (4) and inpainting (9) "
            "checkpoints are supported."
        )

    if any(name.startswith(SDXL_PREFIX) for name in names):
        if not any(
            name.startswith(SDXL_PREFIX + "1.") or name.startswith(SDXL_PREFIX + "0.transformer.") for name in names
        ):
            raise ModelLoadError(
                f"{source} is an SDXL refiner checkpoint; only SDXL base models are supported. "
                "Use an SDXL base checkpoint (such as sd_xl_base_1.0.safetensors)."
            )
        return "sdxl"
    if any(name.startswith(OPEN_CLIP_PREFIX) for name in names):
        return "sd2"

    token_embedding = shapes.get(CLIP_PREFIX + "text_model.embeddings.token_embedding.weight")
    if token_embedding is not None and len(token_embedding) == 2:
        width = token_embedding[1]
        if width == 768:
            return "sd1"
        if width == TINY_WIDTH:
            return "tiny"
        raise ModelLoadError(
            f"{source} has a CLIP text encoder of width {width}; Stable Diffusion 1.x uses 768. "
            "This architecture is not supported."
        )

    # No text encoder in the file: fall back on the UNet's own shape.
    if conv_in is not None and len(conv_in) == 4 and conv_in[0] == TINY_WIDTH:
        return "tiny"
    context_width = _cross_attention_width(shapes)
    by_context = {768: "sd1", 1024: "sd2", 2048: "sdxl", TINY_WIDTH: "tiny"}
    if context_width in by_context:
        return by_context[context_width]
    raise ModelLoadError(
        f"{source}: unrecognised UNet (cross-attention width {context_width}). "
        "Supported checkpoints are Stable Diffusion 1.x, 2.x and SDXL base."
    )


def _cross_attention_width(shapes: dict[str, list[int]]) -> int | None:
    for name, shape in shapes.items():
        if name.startswith(UNET_PREFIX) and name.endswith("attn2.to_k.weight") and len(shape) == 2:
            return shape[1]
    return None


def _not_a_checkpoint(source: str, names) -> str:
    sample = next(iter(names), "")
    if any(name.startswith("lora_") or ".lora_" in name or ".lora." in name for name in names):
        kind = "a LoRA; put it in models/Lora and use it from the prompt as <lora:name:1>"
    elif any(name.startswith(("encoder.", "decoder.", VAE_PREFIX)) for name in names):
        kind = "a VAE on its own; put it in models/VAE"
    elif any(name.startswith(("down_blocks.", "conv_in.", "text_model.")) for name in names):
        kind = "one component of a diffusers-format model; load the whole diffusers folder instead"
    elif not sample:
        kind = "empty"
    else:
        kind = f"not a Stable Diffusion checkpoint (its first tensor is {sample!r})"
    return f"{source} has no UNet weights (model.diffusion_model.*): it is {kind}."


# --------------------------------------------------------------------------------------------
# Loading


def family_config_dir(family: str) -> Path:
    """The local diffusers config folder (model_index.json and component configs) for `family`."""
    try:
        folder = CONFIGS_DIR / family_defaults(family).single_file_config
    except KeyError:
        raise ModelLoadError(
            f"Unknown model family {family!r}; single-file checkpoints can be loaded as one of {', '.join(FAMILIES)}."
        ) from None
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"The configs for model family {family!r} are missing from {folder}; reinstall the program."
        )
    return folder


def default_pipeline_class(family: str):
    if family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline


def local_tokenizers(family: str) -> dict[str, Any]:
    """The tokenizer objects a family's pipeline needs, built from the bundled CLIP vocabulary.

    Passed to `from_single_file` as components, so that it never looks for tokenizer files in the
    config folder or on the Hub.
    """
    from transformers import CLIPTokenizer

    if family == "sdxl":
        return {
            "tokenizer": CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
            "tokenizer_2": CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token=OPEN_CLIP_PAD_TOKEN),
        }
    if family == "sd2":
        return {"tokenizer": CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token=OPEN_CLIP_PAD_TOKEN)}
    return {"tokenizer": CLIPTokenizer.from_pretrained(TOKENIZER_DIR)}


def single_file_kwargs(family: str, pipeline_class=None, *, torch_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Every keyword `pipeline_class.from_single_file` needs to load a `family` checkpoint offline."""
    pipeline_class = pipeline_class or default_pipeline_class(family)
    kwargs: dict[str, Any] = {
        "config": str(family_config_dir(family)),
        "local_files_only": True,
        # Without a dtype each component keeps the dtype it has in the file, and files mixing
        # half and full precision give pipelines that fail at their first matrix product.
        "dtype": torch_dtype if torch_dtype is not None else torch.float32,
        **local_tokenizers(family),
    }
    expected_components, optional_settings = pipeline_class._get_signature_keys(pipeline_class)
    # A web UI has no use for a safety checker or IP-Adapter image encoder, and their weights are
    # not in the checkpoint: passing None keeps diffusers from looking for them.
    for name in ("safety_checker", "feature_extractor", "image_encoder"):
        if name in expected_components:
            kwargs[name] = None
    if "requires_safety_checker" in optional_settings:
        kwargs["requires_safety_checker"] = False
    if "add_watermarker" in optional_settings:
        kwargs["add_watermarker"] = False
    return kwargs


def load_single_file(
    path: str | os.PathLike,
    family: str,
    *,
    pipeline_class=None,
    torch_dtype: torch.dtype | None = None,
):
    """Load an LDM-layout checkpoint as a diffusers pipeline without any network access.

    `family` is what `detect_family` returns ("sd1", "sd2", "sdxl", "tiny"); `pipeline_class`
    defaults to StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL); every weight is cast
    to `torch_dtype` (float32 when not given). Raises ModelLoadError with what to do when the file
    is not a loadable checkpoint of that family.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such checkpoint file. Check the path, or pick a model from the list.")
    pipeline_class = pipeline_class or default_pipeline_class(family)
    kwargs = single_file_kwargs(family, pipeline_class, torch_dtype=torch_dtype)
    if path.suffix.lower() == ".safetensors":
        shapes = _check_contents(path, family)
        conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight") or []
        if len(conv_in) == 4 and conv_in[1] == INPAINTING_CHANNELS:
            # An inpainting checkpoint: the family's UNet config with the wider input (diffusers' legacy keyword,
            # which reaches the UNet alone; in_channels would widen the VAE too).
            kwargs["num_in_channels"] = INPAINTING_CHANNELS
    log.info("Loading %s checkpoint %s with configs from %s", family, path, kwargs["config"])
    try:
        pipe = pipeline_class.from_single_file(str(path), **kwargs)
    except Exception as exc:  # diffusers raises many types for a file that does not fit the architecture
        if "meta tensor" in str(exc):
            raise ModelLoadError(
                f"{path} lacks some of the weights of a {family} model: it is not a complete checkpoint. "
                "Download the full model again."
            ) from exc
        raise ModelLoadError(
            f"Could not load {path} as a {family} checkpoint: {exc}. "
            "The file may be damaged or of an unsupported architecture; try downloading it again."
        ) from exc
    missing = _weights_left_unloaded(pipe)
    if missing:
        raise ModelLoadError(
            f"{path} lacks weights for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}: "
            "it is not a complete checkpoint. Download the full model again."
        )
    return pipe


# Where each family keeps each component in a single file; diffusers' own message for a missing
# one tells the reader to pass the component in code, which helps nobody using the UI.
_COMPONENT_PREFIXES = {
    "sd1": {"UNet": UNET_PREFIX, "VAE": VAE_PREFIX, "text encoder": CLIP_PREFIX},
    "tiny": {"UNet": UNET_PREFIX, "VAE": VAE_PREFIX, "text encoder": CLIP_PREFIX},
    "sd2": {"UNet": UNET_PREFIX, "VAE": VAE_PREFIX, "text encoder": OPEN_CLIP_PREFIX},
    "sdxl": {
        "UNet": UNET_PREFIX,
        "VAE": VAE_PREFIX,
        "first text encoder": SDXL_PREFIX + "0.transformer.",
        "second text encoder": SDXL_PREFIX + "1.model.",
    },
}


def _check_contents(path: Path, family: str) -> dict[str, list[int]]:
    """The file's tensor shapes, once they are known to be a `family` checkpoint."""
    shapes = read_safetensors_header(path)
    found = family_from_shapes(shapes, source=str(path))
    if found != family:
        raise ModelLoadError(
            f"{path} holds a {family_defaults(found).label} model ({found!r}), not {family!r}; load it as {found!r}."
        )
    absent = [
        component
        for component, prefix in _COMPONENT_PREFIXES.get(family, {}).items()
        if not any(name.startswith(prefix) for name in shapes)
    ]
    if absent:
        raise ModelLoadError(
            f"{path} has no {' and no '.join(absent)} weights; only complete checkpoints (UNet, VAE and text "
            "encoder in one file) can be loaded. Download the full version of the model."
        )
    return shapes


def _weights_left_unloaded(pipe) -> list[str]:
    # Diffusers builds modules on the meta device and fills them from the file; a tensor the file
    # lacks silently stays on meta and only fails later, at the first move to a device.
    missing = []
    for component_name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            for name, tensor in [*component.named_parameters(), *component.named_buffers()]:
                if tensor.is_meta:
                    missing.append(f"{component_name}.{name}")
    return missing


# --------------------------------------------------------------------------------------------
# Saving: diffusers -> original layout


def save_single_file(pipe, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write an SD 1.x-layout diffusers pipeline (such as the tiny model) as one LDM `.safetensors` file.

    The UNet, VAE and CLIP text encoder are renamed to the original Stable Diffusion layout, so the
    file loads in A1111 and with `load_single_file`. The file is written beside `path` and renamed
    into place, so an interrupted save never leaves a half-written checkpoint. `metadata` joins the
    header's {"format": "pt"} (A1111's merger writes its recipe there).
    """
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    if "text_encoder_2" in pipe.components or not isinstance(pipe.text_encoder, CLIPTextModel):
        raise ValueError("save_single_file writes Stable Diffusion 1.x-layout pipelines (one CLIP text encoder) only")
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items():
        tensors[UNET_PREFIX + name] = tensor
    for name, tensor in vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items():
        tensors[VAE_PREFIX + name] = tensor
    for name, tensor in clip_text_to_ldm(pipe.text_encoder.state_dict()).items():
        tensors[CLIP_PREFIX + name] = tensor
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, staging, metadata={**(metadata or {}), "format": "pt"})
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    log.info("Wrote single-file checkpoint %s (%d tensors)", path, len(tensors))
    return path


# UNet tensors that keep one fixed name in each layout (diffusers -> original).
_UNET_FIXED_NAMES = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# Inside a ResNet block (diffusers -> original).
_UNET_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_BLOCK_KEY = re.compile(
    r"^(?P<side>down_blocks|up_blocks)\.(?P<block>\d+)\.(?P<kind>resnets|attentions|downsamplers|upsamplers)"
    r"\.(?P<index>\d+)\.(?P<rest>.+)$"
)
_UNET_MID_KEY = re.compile(r"^mid_block\.(?P<kind>resnets|attentions)\.(?P<index>\d+)\.(?P<rest>.+)$")


def unet_to_ldm(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet2DConditionModel state dict to the original `model.diffusion_model` layout
    (without that prefix).

    The original UNet numbers its blocks in one flat list: `input_blocks` holds conv_in, then for each
    resolution `layers_per_block` (ResNet, transformer) pairs and a downsampler; `output_blocks` holds
    `layers_per_block + 1` pairs per resolution, the last followed by the upsampler.
    """
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"unet_to_ldm needs one layers_per_block for every block, got {layers!r}")
    # An up block whose last layer has a transformer puts its upsampler third in that layer, not second.
    up_blocks_with_attention = {
        int(match["block"])
        for match in map(_UNET_BLOCK_KEY.match, state_dict)
        if match and match["side"] == "up_blocks" and match["kind"] == "attentions"
    }
    converted = {}
    for name, tensor in state_dict.items():
        converted[_unet_name_to_ldm(name, layers, up_blocks_with_attention)] = tensor
    return converted


def _unet_name_to_ldm(name: str, layers: int, up_blocks_with_attention: set[int]) -> str:
    stem, _, leaf = name.rpartition(".")
    if stem in _UNET_FIXED_NAMES:
        return f"{_UNET_FIXED_NAMES[stem]}.{leaf}"

    match = _UNET_BLOCK_KEY.match(name)
    if match:
        block, index, kind, rest = int(match["block"]), int(match["index"]), match["kind"], match["rest"]
        if match["side"] == "down_blocks":
            first = 1 + block * (layers + 1)
            if kind == "downsamplers":
                return f"input_blocks.{first + layers}.0.op.{rest.removeprefix('conv.')}"
            slot = 0 if kind == "resnets" else 1
            return f"input_blocks.{first + index}.{slot}.{_resnet_rest(rest) if slot == 0 else rest}"
        first = block * (layers + 1)
        if kind == "upsamplers":
            slot = 2 if block in up_blocks_with_attention else 1
            return f"output_blocks.{first + layers}.{slot}.{rest}"
        slot = 0 if kind == "resnets" else 1
        return f"output_blocks.{first + index}.{slot}.{_resnet_rest(rest) if slot == 0 else rest}"

    match = _UNET_MID_KEY.match(name)
    if match:
        index, rest = int(match["index"]), match["rest"]
        if match["kind"] == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * index}.{_resnet_rest(rest)}"
    raise ValueError(f"unet_to_ldm: no original-layout name for UNet tensor {name!r}")


def _resnet_rest(rest: str) -> str:
    layer, _, leaf = rest.partition(".")
    return f"{_UNET_RESNET_NAMES.get(layer, layer)}.{leaf}"


_VAE_FIXED_NAMES = {"conv_norm_out": "norm_out"}
_VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_BLOCK_KEY = re.compile(
    r"^(?P<part>encoder|decoder)\.(?P<side>down_blocks|up_blocks)\.(?P<block>\d+)\."
    r"(?P<kind>resnets|downsamplers|upsamplers)\.(?P<index>\d+)\.(?P<rest>.+)$"
)
_VAE_MID_KEY = re.compile(
    r"^(?P<part>encoder|decoder)\.mid_block\.(?P<kind>resnets|attentions)\.(?P<index>\d+)\.(?P<rest>.+)$"
)


def vae_to_ldm(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Rename a diffusers AutoencoderKL state dict to the original `first_stage_model` layout (without
    that prefix). The original decoder counts its up blocks from the lowest resolution upwards, the
    reverse of diffusers, and its mid-block attention uses 1x1 convolutions instead of linear layers.
    """
    up_count = len(config["up_block_types"])
    converted = {}
    for name, tensor in state_dict.items():
        match = _VAE_BLOCK_KEY.match(name)
        mid = _VAE_MID_KEY.match(name)
        if match:
            part, kind, rest = match["part"], match["kind"], match["rest"]
            block = int(match["block"])
            if match["side"] == "up_blocks":
                block = up_count - 1 - block
                side = "up"
            else:
                side = "down"
            if kind == "resnets":
                rest = rest.replace("conv_shortcut", "nin_shortcut")
                new_name = f"{part}.{side}.{block}.block.{match['index']}.{rest}"
            else:
                new_name = f"{part}.{side}.{block}.{'downsample' if side == 'down' else 'upsample'}.{rest}"
        elif mid:
            part, rest = mid["part"], mid["rest"]
            if mid["kind"] == "resnets":
                new_name = f"{part}.mid.block_{int(mid['index']) + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                layer, _, leaf = rest.rpartition(".")
                if layer not in _VAE_ATTENTION_NAMES:
                    raise ValueError(f"vae_to_ldm: no original-layout name for VAE tensor {name!r}")
                new_name = f"{part}.mid.attn_1.{_VAE_ATTENTION_NAMES[layer]}.{leaf}"
                if leaf == "weight" and layer != "group_norm" and tensor.ndim == 2:
                    tensor = tensor.reshape(*tensor.shape, 1, 1)
        else:
            part, dot, rest = name.partition(".")
            stem, _, leaf = rest.rpartition(".")
            if dot and stem in _VAE_FIXED_NAMES:
                new_name = f"{part}.{_VAE_FIXED_NAMES[stem]}.{leaf}"
            elif name.split(".")[-2] in ("conv_in", "conv_out", "quant_conv", "post_quant_conv"):
                new_name = name
            else:
                raise ValueError(f"vae_to_ldm: no original-layout name for VAE tensor {name!r}")
        converted[new_name] = tensor
    return converted


def clip_text_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers CLIPTextModel state dict to the original `cond_stage_model.transformer`
    layout (without that prefix). The original wraps the Hugging Face model of its day, whose tensor
    names all start with `text_model.`; recent transformers versions dropped that level.
    """
    return {
        name if name.startswith("text_model.") else f"text_model.{name}": tensor for name, tensor in state_dict.items()
    }
