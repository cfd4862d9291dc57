"""Finding and loading models: the A1111 models folder, local paths, single files and hub ids.

One loaded pipeline's components serve txt2img, img2img and inpaint: each job builds a light
pipeline object around the same modules, so switching modes never reloads weights.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import socket
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .checkpoint import INPAINTING_CHANNELS
from .embeddings import EmbeddingsReport, load_embeddings
from .errors import ModelLoadError
from .hypernet import Hypernetworks
from .lora import LoraAdapters
from .presets import FamilyDefaults, family_defaults, family_names, latent_rgb_tables
from .previews import fit_latent_rgb, load_latent_rgb_table
from .samplers import install_step_noise
from .tiny_model import TINY_MODEL_NAME
from .traced_unet import TraceBudget, TracedUNet
from .vae import LoadedVaes, encode_to_means, run_vae_in, vae_dtype

log = logging.getLogger(__name__)

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CHECKPOINTS_SUBDIR = "Stable-diffusion"
TAESD_SUBDIR = "VAE-approx"


@dataclass(frozen=True)
class ModelInfo:
    """One model the registry knows. `title` is what A1111 shows: "name [hash]"."""

    name: str
    path: str
    kind: str  # "folder" | "single_file" | "pickle" | "hub"
    family: str | None = None
    sha256: str | None = None

    @property
    def hash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        # A1111 titles name a single file with its extension: "v1-5-pruned-emaonly.safetensors [6ce0161689]".
        label = self.name + Path(self.path).suffix if self.kind in ("single_file", "pickle") else self.name
        return f"{label} [{self.hash}]" if self.hash else label


@dataclass
class LoadedModel:
    """A loaded pipeline's shared parts and what the engine knows about them."""

    info: ModelInfo
    family: str
    defaults: FamilyDefaults
    components: dict[str, Any]
    scheduler_config: dict[str, Any]
    latent_rgb: dict | None
    taesd: Any | None
    device: torch.device
    dtype: torch.dtype
    # Set by load_model for every model (make_prompt_encoders): A1111 syntax and compel syntax.
    prompt_encoder: Any | None = None
    compel_encoder: Any | None = None
    pipeline_classes: dict[str, type] = field(default_factory=dict)
    embeddings: EmbeddingsReport = field(default_factory=EmbeddingsReport)
    # The LoRAs loaded into this model as adapters, and those the current job runs (engine/lora.py).
    loras: LoraAdapters | None = None
    # The hypernetworks read for this model, and the hooks of those the current job runs (engine/hypernet.py).
    hypernets: Hypernetworks | None = None
    # What jobs' pipelines call as their UNet when the family runs it traced (engine/traced_unet.py).
    traced_unet: TracedUNet | None = None
    # VAEs from the VAE folder, loaded on this model's VAE config for the jobs that choose them (engine/vae.py).
    vaes: LoadedVaes | None = None

    @property
    def vae(self):
        return self.components["vae"]

    @property
    def inpainting_unet(self) -> bool:
        """An inpainting model (sd-v1-5-inpainting and the like): its UNet also takes the mask and the masked
        picture's latents, 9 input channels in all, so every mode runs on the inpaint pipeline."""
        return self.components["unet"].config.get("in_channels") == INPAINTING_CHANNELS

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The shape of one image's latent: the VAE's channels at its downscaling (8 for SD)."""
        config = self.vae.config
        scale = 2 ** (len(config.block_out_channels) - 1)
        return (1, config.latent_channels, height // scale, width // scale)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    def loader_pipeline(self):
        """A pipeline over the shared modules for diffusers' loaders (LoRAs, embeddings), which change
        those modules in place: its UNet is the module itself, never a trace."""
        return self.pipeline_for("txt2img", self.components["scheduler"], traced=False)

    def job_unet(self, *, traced: bool = True):
        """What a job calls as this model's UNet: the traced one where the family runs it so, unless `traced` is
        False or LoRAs are switched on (a trace holds the layers it was made with, so adapters would not run in
        it), or something hooks the module."""
        lora_on = self.loras is not None and bool(self.loras.active)
        if traced and not lora_on and self.traced_unet is not None and not self.traced_unet.hooked():
            return self.traced_unet
        return self.components["unet"]

    def pipeline_for(self, mode: str, scheduler, *, traced: bool = True, wrap_unet=None, vae=None):
        """A pipeline object for one job: shared weights, the job's own scheduler. The UNet is the
        traced one where the family runs it so, unless `traced` is False or LoRAs are switched on
        (a trace holds the layers it was made with, so adapters would not run in it). `wrap_unet`, when
        given, makes the job's stand-in for that UNet (composable prompts); `vae` replaces the model's."""
        cls = self.pipeline_classes[mode]
        accepted = set(inspect.signature(cls.__init__).parameters)
        parts = {name: module for name, module in self.components.items() if name in accepted}
        if "unet" in parts:
            parts["unet"] = self.job_unet(traced=traced)
        if wrap_unet is not None and "unet" in parts:
            parts["unet"] = wrap_unet(parts["unet"])
        if vae is not None:
            parts["vae"] = vae
        parts["scheduler"] = scheduler
        if "requires_safety_checker" in accepted:
            parts["requires_safety_checker"] = False
        for optional in ("safety_checker", "feature_extractor", "image_encoder"):
            if optional in accepted:
                parts.setdefault(optional, None)
        pipe = cls(**parts)
        pipe.set_progress_bar_config(disable=True)
        install_step_noise(pipe, scheduler)
        encode_to_means(pipe)
        return pipe


class ModelRegistry:
    """The models folder in A1111's layout, plus hashes cached on disk like A1111's cache.json."""

    def __init__(
        self,
        models_dir: Path,
        *,
        checkpoints_dir: Path | None = None,
        embeddings_dir: Path | None = None,
        lora_dir: Path | None = None,
        hypernetwork_dir: Path | None = None,
        vae_dir: Path | None = None,
        esrgan_dir: Path | None = None,
        realesrgan_dir: Path | None = None,
        styles_file: Path | None = None,
        allow_pickle: bool = False,
    ):
        self.models_dir = Path(models_dir)
        # A1111's --esrgan-models-path and --realesrgan-models-path: upscaler models instead of
        # <models_dir>/ESRGAN and <models_dir>/RealESRGAN.
        self._esrgan_dir = Path(esrgan_dir) if esrgan_dir is not None else None
        self._realesrgan_dir = Path(realesrgan_dir) if realesrgan_dir is not None else None
        # A1111's --vae-dir: VAE files from here instead of <models_dir>/VAE.
        self._vae_dir = Path(vae_dir) if vae_dir is not None else None
        # A1111's --ckpt-dir: checkpoints may live outside the models folder.
        self._checkpoints_dir = Path(checkpoints_dir) if checkpoints_dir is not None else None
        self._embeddings_dir = Path(embeddings_dir) if embeddings_dir is not None else None
        # A1111's --lora-dir: LoRAs from here instead of <models_dir>/Lora.
        self._lora_dir = Path(lora_dir) if lora_dir is not None else None
        # A1111's --hypernetwork-dir: hypernetworks from here instead of <models_dir>/hypernetworks.
        self._hypernetwork_dir = Path(hypernetwork_dir) if hypernetwork_dir is not None else None
        # A1111's --styles-file: prompt styles from here instead of styles.csv beside models/.
        self._styles_file = Path(styles_file) if styles_file is not None else None
        self.allow_pickle = allow_pickle
        self._hash_cache_path = self.models_dir / ".hashes.json"
        self._hash_lock = threading.Lock()

    @property
    def checkpoints_dir(self) -> Path:
        return self._checkpoints_dir or self.models_dir / CHECKPOINTS_SUBDIR

    @property
    def styles_file(self) -> Path:
        return self._styles_file or self.models_dir.parent / "styles.csv"

    @property
    def lora_dir(self) -> Path:
        return self._lora_dir or self.models_dir / "Lora"

    @property
    def hypernetwork_dir(self) -> Path:
        return self._hypernetwork_dir or self.models_dir / "hypernetworks"

    @property
    def vae_dir(self) -> Path:
        return self._vae_dir or self.models_dir / "VAE"

    @property
    def esrgan_dir(self) -> Path:
        return self._esrgan_dir or self.models_dir / "ESRGAN"

    @property
    def realesrgan_dir(self) -> Path:
        return self._realesrgan_dir or self.models_dir / "RealESRGAN"

    @property
    def embeddings_dir(self) -> Path:
        # A1111 keeps embeddings/ beside models/ (--embeddings-dir moves it), so pointing --models-dir at
        # an A1111 install finds its embeddings too.
        return self._embeddings_dir or self.models_dir.parent / "embeddings"

    def scan(self) -> list[ModelInfo]:
        """Every checkpoint under models/Stable-diffusion: diffusers folders and single files."""
        found: list[ModelInfo] = []
        root = self.checkpoints_dir
        if not root.is_dir():
            return found
        cache = self._read_hash_cache()
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            here = Path(dirpath)
            if "model_index.json" in filenames:
                dirnames.clear()  # a diffusers folder's subfolders are its components
                found.append(self._info_for(here, "folder", cache))
                continue
            for filename in sorted(filenames):
                path = here / filename
                suffix = path.suffix.lower()
                if suffix in SAFE_SUFFIXES:
                    found.append(self._info_for(path, "single_file", cache))
                elif suffix in (".ckpt",):  # other pickle suffixes are too generic to list as checkpoints
                    found.append(self._info_for(path, "pickle", cache))
        return found

    def resolve(self, model: str | os.PathLike) -> ModelInfo:
        """A model by title, name, file name, path or hub id ("org/name")."""
        text = str(model).strip()
        if not text:
            raise ModelLoadError("No model given: name one in models/Stable-diffusion, a local path or a hub id.")
        listed = self.scan()
        for info in listed:
            if text in (info.title, info.name, Path(info.path).name, info.path):
                return info
        # A1111 clients send titles with a hash this registry has not computed yet.
        bare = text.split(" [", 1)[0]
        for info in listed:
            if bare in (info.name, Path(info.path).name, Path(info.path).stem):
                return info
        path = Path(text).expanduser()
        if path.exists():
            if path.is_dir():
                if not (path / "model_index.json").is_file():
                    raise ModelLoadError(
                        f"{path} is a folder but not a diffusers model (no model_index.json). "
                        "Point at a diffusers folder or a .safetensors checkpoint."
                    )
                return self._info_for(path, "folder", self._read_hash_cache())
            suffix = path.suffix.lower()
            if suffix in SAFE_SUFFIXES:
                return self._info_for(path, "single_file", self._read_hash_cache())
            if suffix in PICKLE_SUFFIXES:
                return self._info_for(path, "pickle", self._read_hash_cache())
            raise ModelLoadError(f"{path}: not a model file. Use a .safetensors checkpoint or a diffusers folder.")
        if _looks_like_hub_id(text):
            return ModelInfo(name=text, path=text, kind="hub")
        names = ", ".join(info.name for info in listed) or "none"
        raise ModelLoadError(
            f"Model {text!r} not found. Models in {self.checkpoints_dir}: {names}. "
            "Give one of those, a path to a .safetensors file or diffusers folder, or a hub id like org/name."
        )

    def with_hash(self, info: ModelInfo) -> ModelInfo:
        """The same info with its sha256 filled in (computed once, then cached on disk)."""
        if info.sha256 or info.kind == "hub":
            return info
        target = model_weights_file(Path(info.path))
        if target is None:
            return info
        return replace(info, sha256=self.sha256_of(target))

    def sha256_of(self, target: Path) -> str:
        """A file's sha256, computed once and cached on disk (keyed by path, size and modification time)."""
        with self._hash_lock:
            cache = self._read_hash_cache()
            key, stamp = str(target.resolve()), _file_stamp(target)
            entry = cache.get(key)
            if entry and entry.get("stamp") == stamp:
                return entry["sha256"]
            log.info("Computing the sha256 of %s", target)
            digest = _sha256_file(target)
            cache[key] = {"stamp": stamp, "sha256": digest}
            try:
                self._hash_cache_path.parent.mkdir(parents=True, exist_ok=True)
                self._hash_cache_path.write_text(json.dumps(cache, indent=1))
            except OSError as exc:  # a read-only models folder still works, it just rehashes
                log.warning("Could not write the hash cache %s: %s", self._hash_cache_path, exc)
            return digest

    def _info_for(self, path: Path, kind: str, cache: dict) -> ModelInfo:
        root = self.checkpoints_dir
        try:
            name = path.relative_to(root).as_posix()
        except ValueError:
            name = path.name
        if kind != "folder":
            name = name.rsplit(".", 1)[0]
        sha256 = None
        target = model_weights_file(path)
        if target is not None:
            entry = cache.get(str(target.resolve()))
            if entry and entry.get("stamp") == _file_stamp(target):
                sha256 = entry["sha256"]
        return ModelInfo(name=name, path=str(path), kind=kind, sha256=sha256)

    def _read_hash_cache(self) -> dict:
        try:
            return json.loads(self._hash_cache_path.read_text())
        except (OSError, ValueError):
            return {}


def load_model(
    info: ModelInfo,
    *,
    registry: ModelRegistry,
    device: torch.device,
    dtype: torch.dtype,
    trace_unet: bool = True,
    trace_budget: TraceBudget | None = None,
    full_precision_vae: bool = False,
) -> LoadedModel:
    """Load `info` onto `device`; raises ModelLoadError with what to do when it cannot.

    trace_unet=False keeps the UNet a Python module even for families that run it traced, and trace_budget is the
    traces it may still make (its loading engine's, shared by all its models); full_precision_vae runs
    the VAE in float32 whatever `dtype` is (A1111's --no-half-vae). The VAE's weights were read in `dtype` then,
    as the rest of the pipeline's were: float32 keeps its activations from overflowing, which is what the flag is
    for."""
    pipe = load_pipeline(info, registry=registry, dtype=dtype)
    info = registry.with_hash(info)
    pipe.to(device)
    # Before the prompt encoders are made: the embeddings become tokens of the model's own tokenizers.
    embeddings = load_embeddings(pipe, registry.embeddings_dir)
    components = dict(pipe.components)
    own_vae_dtype = vae_dtype(components["vae"], dtype, full_precision=full_precision_vae)
    run_vae_in(components["vae"], own_vae_dtype)
    in_channels = components["unet"].config.get("in_channels")
    if in_channels not in (4, INPAINTING_CHANNELS):
        raise ModelLoadError(
            f"{info.path} has a UNet with {in_channels} input channels"
            f"{' (an instruct-pix2pix model)' if in_channels == 8 else ''}; only standard (4) and inpainting (9) "
            "models are supported."
        )
    family = detect_pipeline_family(components, info)
    info = replace(info, family=family)
    defaults = family_defaults(family)
    latent_rgb = _latent_rgb_for(defaults, info, components["vae"])
    taesd = _load_taesd(registry.models_dir / TAESD_SUBDIR / defaults.taesd, device, dtype)
    loaded = LoadedModel(
        info=info,
        family=family,
        defaults=defaults,
        components=components,
        scheduler_config=dict(pipe.scheduler.config),
        latent_rgb=latent_rgb,
        taesd=taesd,
        device=device,
        dtype=dtype,
        pipeline_classes=_pipeline_classes(family, inpainting=in_channels == INPAINTING_CHANNELS),
        embeddings=embeddings,
        loras=LoraAdapters(registry.lora_dir),
        hypernets=Hypernetworks(registry.hypernetwork_dir),
        vaes=LoadedVaes(components["vae"], device, own_vae_dtype),
    )
    if trace_unet and defaults.cpu_traced_unet and device.type == "cpu" and "unet" in components:
        loaded.traced_unet = TracedUNet(components["unet"], trace_budget)
    from .prompts import make_prompt_encoders

    loaded.prompt_encoder, loaded.compel_encoder = make_prompt_encoders(components)
    return loaded


def load_pipeline(info: ModelInfo, *, registry: ModelRegistry, dtype: torch.dtype):
    """The diffusers pipeline of `info` (folder, single file or hub id), on the CPU; ModelLoadError with what
    to do when it cannot be loaded."""
    if info.kind == "pickle" and not registry.allow_pickle:
        raise ModelLoadError(
            f"{info.path} is a pickle checkpoint ({Path(info.path).suffix}): loading one can run arbitrary code. "
            "Use a .safetensors version of it, or start with --allow-pickle (Engine(allow_pickle=True)) "
            "if you trust where it came from."
        )
    try:
        if info.kind == "folder":
            pipe = _load_folder(info.path, dtype, allow_pickle=registry.allow_pickle)
        elif info.kind in ("single_file", "pickle"):
            from .checkpoint import detect_family, load_single_file

            family = detect_family(info.path) if info.kind == "single_file" else "sd1"
            pipe = load_single_file(info.path, family, torch_dtype=dtype)
        else:
            pipe = _load_hub(info.path, dtype)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"Could not load model {info.name!r} from {info.path}: {exc}") from exc
    return pipe


def detect_pipeline_family(components: dict[str, Any], info: ModelInfo) -> str:
    declared = _declared_family(info)
    if declared:
        return declared
    unet_config = components["unet"].config
    if unet_config.get("addition_embed_type") == "text_time" or "text_encoder_2" in components:
        return "sdxl"
    cross_attention_dim = unet_config.get("cross_attention_dim")
    if cross_attention_dim == 1024:
        return "sd2"
    if cross_attention_dim == 768:
        return "sd1"
    if Path(info.path).name.split(".")[0] == TINY_MODEL_NAME or cross_attention_dim == 32:
        return "tiny"
    log.warning("Unrecognised model architecture (cross_attention_dim=%s); using SD 1.x defaults", cross_attention_dim)
    return "sd1"


def _declared_family(info: ModelInfo) -> str | None:
    """A family named in a folder's model_index.json ("_lantern_family"), for models whose
    architecture alone does not say which defaults suit them (the micro model is SD 1.x-shaped)."""
    if info.kind != "folder":
        return None
    try:
        index = json.loads((Path(info.path) / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    family = index.get("_lantern_family")
    return family if family in family_names() else None


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # Half precision halves memory and time on GPUs; CPUs compute it slowly or not at all.
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


def _pipeline_classes(family: str, *, inpainting: bool = False) -> dict[str, type]:
    """The diffusers pipeline class of each mode; an inpainting model runs every mode on the inpaint one (the
    others would feed its UNet 4 channels, not 9; generate.py gives it a mask that repaints everything)."""
    import diffusers

    prefix = "StableDiffusionXL" if family == "sdxl" else "StableDiffusion"
    inpaint = getattr(diffusers, f"{prefix}InpaintPipeline")
    if inpainting:
        return {"txt2img": inpaint, "img2img": inpaint, "inpaint": inpaint}
    return {
        "txt2img": getattr(diffusers, f"{prefix}Pipeline"),
        "img2img": getattr(diffusers, f"{prefix}Img2ImgPipeline"),
        "inpaint": inpaint,
    }


def _load_folder(path: str, dtype: torch.dtype, *, allow_pickle: bool):
    from diffusers import DiffusionPipeline

    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    index = json.loads((Path(path) / "model_index.json").read_text())
    if "safety_checker" in index:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    return DiffusionPipeline.from_pretrained(path, **kwargs)


def _load_hub(repo_id: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    kwargs = {"dtype": dtype, "safety_checker": None, "requires_safety_checker": False}
    try:
        return DiffusionPipeline.from_pretrained(repo_id, local_files_only=True, **kwargs)
    except (OSError, ValueError) as cached_error:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        if offline or not _hub_reachable():
            raise ModelLoadError(
                f"Model {repo_id!r} is not in the local Hugging Face cache and the hub cannot be reached "
                f"({'HF_HUB_OFFLINE is set' if offline else 'no connection to huggingface.co'}). "
                f"Download it where there is internet (huggingface-cli download {repo_id}) or put a "
                ".safetensors checkpoint in models/Stable-diffusion/."
            ) from cached_error
    return DiffusionPipeline.from_pretrained(repo_id, **kwargs)


def _hub_reachable(timeout: float = 3.0) -> bool:
    # One quick TCP connect, so an offline machine fails in seconds instead of retrying for minutes.
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://", 1)[-1].split("/", 1)[0]
    host, _, port = endpoint.partition(":")
    try:
        with socket.create_connection((host, int(port or 443)), timeout=timeout):
            return True
    except OSError:
        return False


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~")) and "\\" not in text


def _latent_rgb_for(defaults: FamilyDefaults, info: ModelInfo, vae) -> dict | None:
    table = latent_rgb_tables().get(defaults.latent_rgb)
    if table is not None:
        return table
    # A VAE no published table fits (the tiny model): use the table fitted when it was built,
    # or fit one now.
    if info.kind == "folder":
        table = load_latent_rgb_table(Path(info.path) / "latent_rgb.json")
        if table is not None:
            return table
    log.info("Fitting a latent->RGB preview table for %s", info.name)
    return fit_latent_rgb(vae)


def _load_taesd(folder: Path, device: torch.device, dtype: torch.dtype):
    if not (folder / "config.json").is_file():
        return None
    from diffusers import AutoencoderTiny

    try:
        return AutoencoderTiny.from_pretrained(folder, dtype=dtype, local_files_only=True).to(device).eval()
    except (OSError, ValueError) as exc:
        log.warning("TAESD in %s could not be loaded (%s); TAESD previews are off", folder, exc)
        return None


def model_weights_file(path: Path) -> Path | None:
    """The file whose sha256 names a model: the checkpoint itself, or a folder's UNet weights."""
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in sorted((path / "unet").glob("diffusion_pytorch_model*.safetensors")):
            return candidate
        for candidate in sorted((path / "unet").glob("diffusion_pytorch_model*")):
            return candidate
    return None


def _file_stamp(path: Path) -> list:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
