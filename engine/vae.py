"""A1111's "SD VAE": a VAE file from models/VAE decoding (and encoding) pictures instead of the model's own.

Files: `.safetensors` in the original Stable Diffusion layout (`encoder.down.0.block.0...`, with or without
`first_stage_model.`) or in diffusers' layout, `.pt`/`.ckpt` (read with torch's weights-only loader, so no
code in them runs), and diffusers folders (config.json + weights). The choice is A1111's:

- "Automatic": a VAE beside the checkpoint named after it (`model.vae.safetensors`, `.vae.pt`, `.vae.ckpt`),
  else the model's own;
- "None": the model's own VAE;
- a file name from the VAE folder.

A VAE is built with the loaded model's VAE config and must fit it tensor for tensor (an SD 1.5 VAE fits SD
1.5 and 2.x, an SDXL VAE fits SDXL); one that does not is refused, naming the first tensor that differs.
Loaded VAEs are kept per loaded model, so choosing one again costs nothing, and each job picks its own:
one user's choice never changes another's pictures.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .checkpoint import VAE_PREFIX, vae_to_ldm
from .errors import InvalidRequestError, ModelLoadError

log = logging.getLogger(__name__)

AUTOMATIC = "Automatic"
NONE = "None"
VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt")
# A1111's names for a VAE that goes with one checkpoint, beside it.
_NEAR_CHECKPOINT_SUFFIXES = (".vae.safetensors", ".vae.pt", ".vae.ckpt")
# Keys in training checkpoints that are not part of the VAE (A1111 drops them too).
_IGNORED_PREFIXES = ("loss.", "model_ema.")
# VAEs kept loaded per model: an SD VAE is about 330 MB in float32.
MAX_LOADED_VAES = 2


@dataclass(frozen=True)
class VaeFile:
    """A VAE in the VAE folder; `name` is what A1111 shows and writes in infotext (its file name)."""

    name: str
    path: Path


def scan_vaes(folder: Path) -> dict[str, VaeFile]:
    """The VAE folder's files and diffusers folders (subfolders too), by name."""
    found: dict[str, VaeFile] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.is_file() and path.suffix.lower() in VAE_SUFFIXES and not _inside_diffusers_folder(path, folder):
            found[path.name] = VaeFile(path.name, path)
        elif path.is_dir() and (path / "config.json").is_file() and _weights_in(path) is not None:
            found[path.name] = VaeFile(path.name, path)
    return found


def _inside_diffusers_folder(path: Path, root: Path) -> bool:
    return any(
        (parent / "config.json").is_file() for parent in path.parents if parent != root and root in parent.parents
    )


def _weights_in(folder: Path) -> Path | None:
    for pattern in ("diffusion_pytorch_model*.safetensors", "*.safetensors"):
        for candidate in sorted(folder.glob(pattern)):
            return candidate
    return None


def weights_file(vae: VaeFile) -> Path:
    """The file whose sha256 is the VAE's hash (a folder's weights)."""
    return _weights_in(vae.path) if vae.path.is_dir() else vae.path


def near_checkpoint(checkpoint: str | Path) -> VaeFile | None:
    """A1111's Automatic choice: `<checkpoint stem>.vae.*` beside a single-file checkpoint."""
    path = Path(checkpoint)
    if not path.is_file():
        return None
    stem = path.with_suffix("")
    for suffix in _NEAR_CHECKPOINT_SUFFIXES:
        candidate = stem.with_name(stem.name + suffix)
        if candidate.is_file():
            return VaeFile(candidate.name, candidate)
    return None


def choose(value, available: dict[str, VaeFile], folder: Path) -> str:
    """The canonical name of a VAE choice: Automatic, None, or a file in the folder (matched without case,
    with or without its extension); InvalidRequestError naming `sd_vae` otherwise."""
    text = str(value).strip() if value is not None else AUTOMATIC
    for special in (AUTOMATIC, NONE):
        if text.lower() == special.lower() or (special == AUTOMATIC and not text):
            return special
    for name in available:
        if text.lower() in (name.lower(), Path(name).stem.lower()):
            return name
    listed = ", ".join([AUTOMATIC, NONE, *available]) if available else f"{AUTOMATIC} or {NONE} (no VAEs in {folder})"
    raise InvalidRequestError("sd_vae", value, listed)


class LoadedVaes:
    """The VAEs loaded for one model, built on its own VAE's config and kept for the next job."""

    def __init__(self, reference, device: torch.device, dtype: torch.dtype):
        """`dtype`: the one the VAEs run in (vae_dtype's)."""
        self.reference = reference
        self.device = device
        self.dtype = dtype
        self._loaded: OrderedDict[str, object] = OrderedDict()
        # Requests are checked (and their VAE loaded) on the callers' threads.
        self._lock = threading.Lock()

    def get(self, vae: VaeFile):
        """The loaded VAE of `vae`; InvalidRequestError naming sd_vae when it does not fit this model."""
        with self._lock:
            try:
                return self._get(vae)
            except ModelLoadError as exc:
                raise InvalidRequestError("sd_vae", vae.name, f"a VAE made for this kind of model ({exc})") from exc

    def _get(self, vae: VaeFile):
        key = str(vae.path.resolve())
        if key not in self._loaded:
            loaded = load_vae(vae, self.reference).to(self.device).eval()
            run_vae_in(loaded, self.dtype)  # built in float32
            self._loaded[key] = loaded
            while len(self._loaded) > MAX_LOADED_VAES:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(key)
        return self._loaded[key]


def load_vae(vae: VaeFile, reference):
    """A new AutoencoderKL with `reference`'s config and the weights of `vae`; ModelLoadError if they do
    not fit (a VAE of another model family) or cannot be read."""
    from diffusers import AutoencoderKL

    tensors = _read_tensors(vae)
    expected = reference.state_dict()
    renamed = _to_diffusers_names(tensors, expected, reference.config, vae.name)
    model = AutoencoderKL.from_config(reference.config)
    model.load_state_dict(renamed, strict=True)
    log.info("Loaded VAE %s", vae.path)
    return model


def _read_tensors(vae: VaeFile) -> dict[str, torch.Tensor]:
    path = weights_file(vae)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
            tensors = tensors.get("state_dict", tensors) if isinstance(tensors, dict) else tensors
    except Exception as exc:  # safetensors and torch raise many kinds for a broken or foreign file
        raise ModelLoadError(f"VAE {vae.name}: could not read {path} ({exc})") from exc
    if not isinstance(tensors, dict) or not all(isinstance(value, torch.Tensor) for value in tensors.values()):
        raise ModelLoadError(f"VAE {vae.name}: {path} holds no table of tensors")
    return {
        name.removeprefix(VAE_PREFIX): tensor
        for name, tensor in tensors.items()
        if not name.startswith(_IGNORED_PREFIXES)
    }


def _to_diffusers_names(tensors: dict, expected: dict, config, name: str) -> dict[str, torch.Tensor]:
    """The file's tensors under the reference VAE's names, in its shapes. Original-layout names are found
    through vae_to_ldm (diffusers -> original) run over the reference's own names."""
    if not set(expected) <= set(tensors):
        original_names = {}
        for diffusers_name, tensor in expected.items():
            (original_name,) = vae_to_ldm({diffusers_name: tensor}, config)
            original_names[original_name] = diffusers_name
        tensors = {original_names.get(key, key): value for key, value in tensors.items()}
    missing = [key for key in expected if key not in tensors]
    if missing:
        raise ModelLoadError(
            f"VAE {name} does not fit this model: it has no tensor for {missing[0]} "
            f"({len(missing)} of {len(expected)} missing). It was made for another kind of model."
        )
    renamed = {}
    for key, target in expected.items():
        tensor = tensors[key]
        if tensor.shape != target.shape:
            if tensor.numel() != target.numel():  # 1x1 convolutions in the original layout reshape to linear
                raise ModelLoadError(
                    f"VAE {name} does not fit this model: {key} is {tuple(tensor.shape)}, the model's "
                    f"is {tuple(target.shape)}. It was made for another kind of model."
                )
            tensor = tensor.reshape(target.shape)
        renamed[key] = tensor.to(target.dtype)
    return renamed


def vae_dtype(vae, model_dtype: torch.dtype, *, full_precision: bool = False) -> torch.dtype:
    """The dtype a model's VAE runs in: float32 where A1111's --no-half-vae asks for it (`full_precision`) or the
    VAE's config does (`force_upcast`: SDXL's VAE overflows in float16 into black or NaN pictures), else the model's.
    Kept for good rather than cast for each call, as diffusers now advises: the casts cost time, and each one logs."""
    if model_dtype != torch.float32 and (full_precision or getattr(vae.config, "force_upcast", False)):
        return torch.float32
    return model_dtype


def run_vae_in(vae, dtype: torch.dtype) -> None:
    """Keep `vae` in `dtype` and cast what reaches its encoder and decoder to it: the pipelines hand a VAE their
    tensors in the UNet's dtype (SD's decode its latents uncast), which may be another."""
    if vae.dtype != dtype:
        # torch's own cast: diffusers' warns on every dtype it is given that modules "should be kept in float32",
        # naming none (this VAE keeps none apart).
        torch.nn.Module.to(vae, dtype=dtype)
    for part in (vae.encoder, getattr(vae, "post_quant_conv", None), vae.decoder):
        if part is not None:
            part.register_forward_pre_hook(_inputs_in_own_dtype, with_kwargs=True)
    if dtype != torch.float32:
        for part in (vae.encoder, vae.decoder):
            part.register_forward_hook(functools.partial(_float32_on_nans, vae), with_kwargs=True)


def _float32_on_nans(vae, module, args, kwargs, output):
    """A1111's automatic VAE precision: a half-precision VAE whose encoder or decoder made NaN values (it overflowed,
    which decodes to black) runs in float32 from then on, and this call is made again in float32."""
    if next(module.parameters()).dtype == torch.float32 or not torch.is_tensor(output) or not torch.isnan(output).any():
        return None
    log.warning("The VAE made NaN values in %s: it runs in float32 from now on (--no-half-vae starts it so)", vae.dtype)
    torch.nn.Module.to(vae, dtype=torch.float32)
    return module(*args, **kwargs)  # its inputs are cast to float32 on the way in


def _inputs_in_own_dtype(module, args, kwargs):
    dtype = next(module.parameters()).dtype

    def cast(value):
        return value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value

    return tuple(cast(value) for value in args), {name: cast(value) for name, value in kwargs.items()}


def mean_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The latents of `pixels` (N, 3, H, W in -1..1) as the pipelines scale them: the mean of the VAE's posterior,
    not a draw from it. A1111 samples that posterior with torch's global generator, which no seed controls; its mean
    is what every draw scatters around (closely, for SD's VAEs), and taking it draws nothing from a job's generators,
    so a pass's starting noise is its seed's first draw, as A1111's is."""
    with _upcast(vae), torch.no_grad():
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    shift, spread = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if shift is not None and spread is not None:  # a VAE whose latents the pipelines normalise channel by channel
        shift = torch.tensor(shift, dtype=latents.dtype, device=latents.device).view(1, -1, 1, 1)
        spread = torch.tensor(spread, dtype=latents.dtype, device=latents.device).view(1, -1, 1, 1)
        return (latents - shift) * vae.config.scaling_factor / spread
    return latents * vae.config.scaling_factor


def encode_to_means(pipe) -> None:
    """Make this job's img2img or inpaint pipeline encode the pictures it starts from (and an inpainting model's
    masked picture) to their mean latents (mean_latents) instead of drawing them from the job's generators; a txt2img
    pipeline has nothing to encode. The pipeline object is the job's own, so nothing is shared."""
    if hasattr(pipe, "_encode_vae_image"):  # the inpaint pipelines encode through it
        # In the pixels' dtype (the UNet's), as SDXL's own encode returns them: the VAE's may be float32.
        pipe._encode_vae_image = lambda image, generator=None: mean_latents(pipe.vae, image).to(image.dtype)
        return
    prepare_latents = pipe.prepare_latents
    if "image" not in inspect.signature(prepare_latents).parameters:
        return  # a txt2img pipeline: no picture to encode

    @functools.wraps(prepare_latents)
    def prepare_from_means(image, *args, **kwargs):
        # Latents (4 channels) are taken as they are; pixels are encoded here, and handed on as latents.
        if image.shape[1] == 3:
            image = mean_latents(pipe.vae, image).to(image.device)
        return prepare_latents(image, *args, **kwargs)

    pipe.prepare_latents = prepare_from_means


def decode_pictures(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """Pictures of latents (as the pipelines scale them), as a pipeline's own last step makes them."""
    vae = pipe.vae
    with _upcast(vae), torch.no_grad():
        pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(pixels, output_type="pil", do_denormalize=[True] * len(pixels))


@contextlib.contextmanager
def _upcast(vae):
    """Float32 for a float16 VAE that asks for it (it overflows in float16), as the SDXL pipelines run one."""
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        yield
    finally:
        if upcast:
            vae.to(dtype=torch.float16)
