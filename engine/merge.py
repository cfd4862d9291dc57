"""A1111's Checkpoint Merger: a new checkpoint from two or three, tensor by tensor.

The methods are A1111's: "Weighted sum" makes A*(1-M) + B*M, "Add difference" makes A + (B-C)*M (B's tensors
missing from C count as zero difference), "No interpolation" copies A (to bake in a VAE or halve its size). As in
A1111 every weight of the UNet, the text encoder(s) and the VAE is merged; a tensor only A has stays A's, and an
inpainting or instruct-pix2pix A merged with a normal B has only the input channels the two share merged.

The models are merged as diffusers components: their names differ from the original layout's, but each tensor is
the same numbers, so the sums are the same. The result is written as one A1111-layout .safetensors file (SD 1.x
models) or a diffusers folder (any model), into the checkpoints folder, never over an existing model.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint import INPAINTING_CHANNELS, UNET_PREFIX
from .errors import InvalidRequestError, ModelLoadError
from .models import ModelInfo, ModelRegistry, detect_pipeline_family, load_pipeline, model_weights_file

# The generation request's number parsing, so both refuse a value in the same words.
from .request import _as_float, _in_range
from .vae import VaeFile, load_vae

log = logging.getLogger(__name__)

NO_INTERPOLATION, WEIGHTED_SUM, ADD_DIFFERENCE = "No interpolation", "Weighted sum", "Add difference"
INTERP_METHODS = (NO_INTERPOLATION, WEIGHTED_SUM, ADD_DIFFERENCE)
FORMAT_AUTOMATIC, FORMAT_SAFETENSORS, FORMAT_DIFFUSERS = "Automatic", "safetensors", "diffusers"
CHECKPOINT_FORMATS = (FORMAT_AUTOMATIC, FORMAT_SAFETENSORS, FORMAT_DIFFUSERS)
NO_VAE = "None"
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
# Top-level files of a diffusers folder that belong to the model, not to one component (model_index.json is
# rewritten by diffusers; its "_lantern_*" keys and these files are copied from A).
_MODEL_LEVEL_SUFFIXES = (".json", ".txt", ".md")
_UNSAFE_NAME = re.compile(r"[\\/:*?\"<>|\x00-\x1f]")


@dataclass
class MergeRequest:
    """One merge; field names and defaults are A1111's Checkpoint Merger tab's."""

    primary_model_name: str = ""
    secondary_model_name: str = ""
    tertiary_model_name: str = ""
    interp_method: str = WEIGHTED_SUM
    multiplier: float = 0.3
    save_as_half: bool = False
    custom_name: str = ""
    checkpoint_format: str = FORMAT_AUTOMATIC
    bake_in_vae: str = NO_VAE
    save_metadata: bool = True


@dataclass
class MergeResult:
    info: ModelInfo  # the new checkpoint, as the models list shows it
    recipe: dict = field(default_factory=dict)  # A1111's sd_merge_recipe
    merged_tensors: int = 0
    seconds: float = 0.0


@dataclass
class _Inputs:
    """A checked MergeRequest: the models it names, and what to write."""

    primary: ModelInfo
    secondary: ModelInfo | None
    tertiary: ModelInfo | None
    method: str
    multiplier: float
    vae: VaeFile | None
    name: str
    save_as_half: bool
    checkpoint_format: str
    save_metadata: bool


def check(req: MergeRequest, registry: ModelRegistry, vaes: dict[str, VaeFile]) -> _Inputs:
    """The request's models and output name; InvalidRequestError naming the field otherwise. Nothing is loaded."""
    if req.interp_method not in INTERP_METHODS:
        raise InvalidRequestError("interp_method", req.interp_method, ", ".join(INTERP_METHODS))
    multiplier = _as_float(req.multiplier, "multiplier")
    _in_range(multiplier, "multiplier", 0.0, 1.0)
    if req.checkpoint_format not in CHECKPOINT_FORMATS:
        raise InvalidRequestError("checkpoint_format", req.checkpoint_format, ", ".join(CHECKPOINT_FORMATS))
    needs = {
        "primary_model_name": True,
        "secondary_model_name": req.interp_method != NO_INTERPOLATION,
        "tertiary_model_name": req.interp_method == ADD_DIFFERENCE,
    }
    models: dict[str, ModelInfo | None] = {}
    for field_name, needed in needs.items():
        value = getattr(req, field_name)
        if not needed:
            models[field_name] = None
            continue
        if not value or not str(value).strip():
            raise InvalidRequestError(field_name, value, f"a checkpoint: {req.interp_method} needs one here")
        try:
            models[field_name] = registry.resolve(value)
        except ModelLoadError as exc:
            raise InvalidRequestError(field_name, value, f"a checkpoint in {registry.checkpoints_dir} ({exc})") from exc
    vae = None
    if req.bake_in_vae and req.bake_in_vae != NO_VAE:
        vae = next((found for name, found in vaes.items() if req.bake_in_vae in (name, Path(name).stem)), None)
        if vae is None:
            listed = ", ".join([NO_VAE, *vaes]) if vaes else f"{NO_VAE} (no VAEs in {registry.vae_dir})"
            raise InvalidRequestError("bake_in_vae", req.bake_in_vae, listed)
    name = str(req.custom_name or "").strip() or default_name(
        req.interp_method, multiplier, models["primary_model_name"], models["secondary_model_name"],
        models["tertiary_model_name"],
    )  # fmt: skip
    if _UNSAFE_NAME.search(name) or name.startswith(".") or len(name) > 200:
        raise InvalidRequestError(
            "custom_name", req.custom_name, "a file name: no / \\ : * ? \" < > |, not starting with a dot, 200 "
            "characters at most"
        )  # fmt: skip
    _check_free(registry.checkpoints_dir, name, req.custom_name)  # before minutes of loading; again when writing
    return _Inputs(
        primary=models["primary_model_name"],
        secondary=models["secondary_model_name"],
        tertiary=models["tertiary_model_name"],
        method=req.interp_method,
        multiplier=multiplier,
        vae=vae,
        name=name,
        save_as_half=bool(req.save_as_half),
        checkpoint_format=req.checkpoint_format,
        save_metadata=bool(req.save_metadata),
    )


def default_name(method: str, multiplier: float, a: ModelInfo, b: ModelInfo | None, c: ModelInfo | None) -> str:
    """A1111's name for a merge: "0.7(a) + 0.3(b)", "a + 0.3(b - c)", or A's name."""

    def short(info: ModelInfo) -> str:
        return info.name.replace("/", "_").replace("\\", "_")

    if method == WEIGHTED_SUM:
        return f"{round(1 - multiplier, 2)}({short(a)}) + {round(multiplier, 2)}({short(b)})"
    if method == ADD_DIFFERENCE:
        return f"{short(a)} + {round(multiplier, 2)}({short(b)} - {short(c)})"
    return short(a)


def merge_tensor(a: torch.Tensor, b: torch.Tensor, method: str, multiplier: float) -> str:
    """Merge `b` (B, or B - C for Add difference) into `a` in place, computing in float32. Returns "" or, when
    A has more input channels than B (an inpainting model's 9, instruct-pix2pix's 8), "inpainting" or
    "instruct-pix2pix": then only the channels both have are merged, as in A1111. ValueError when the shapes
    cannot be merged."""
    target, kind = a, ""
    if a.shape != b.shape:
        same_but_channels = a.dim() == b.dim() == 4 and a.shape[:1] + a.shape[2:] == b.shape[:1] + b.shape[2:]
        if not same_but_channels or a.shape[1] < b.shape[1]:
            raise ValueError(f"shape {tuple(b.shape)} against A's {tuple(a.shape)}")
        target = a[:, : b.shape[1]]
        kind = {9: "inpainting", 8: "instruct-pix2pix"}.get(a.shape[1], "")
    left, right = target.float(), b.float()
    merged = left * (1 - multiplier) + right * multiplier if method == WEIGHTED_SUM else left + right * multiplier
    target.copy_(merged.to(target.dtype))
    return kind


class _Progress:
    """Counts merged tensors for `report(done, total)`."""

    def __init__(self, total: int, report: Callable[[int, int], None] | None):
        self.done, self.total, self.report = 0, total, report

    def tick(self) -> None:
        self.done += 1
        if self.report is not None:
            self.report(self.done, self.total)


def run_merge(
    inputs: _Inputs, registry: ModelRegistry, *, on_tensor: Callable[[int, int], None] | None = None
) -> MergeResult:
    """Load the models, merge them and write the result; InvalidRequestError naming the field of a model that
    does not fit A. `on_tensor(done, total)` counts merged tensors."""
    started = time.perf_counter()
    save_as_half, checkpoint_format = inputs.save_as_half, inputs.checkpoint_format
    dtype = torch.float16 if save_as_half else torch.float32
    fields = {"primary_model_name": inputs.primary}
    if inputs.secondary is not None:
        fields["secondary_model_name"] = inputs.secondary
    if inputs.tertiary is not None:
        fields["tertiary_model_name"] = inputs.tertiary
    pipes, families = {}, {}
    for field_name, info in fields.items():
        try:
            pipes[field_name] = load_pipeline(info, registry=registry, dtype=dtype)
        except ModelLoadError as exc:
            raise InvalidRequestError(field_name, info.name, f"a checkpoint that loads ({exc})") from exc
        families[field_name] = detect_pipeline_family(dict(pipes[field_name].components), info)
        if _architecture(pipes[field_name]) != _architecture(pipes["primary_model_name"]):
            raise InvalidRequestError(
                field_name,
                info.name,
                f"a {families['primary_model_name']} checkpoint like A ({inputs.primary.name}); this one is "
                f"{families[field_name]}, and only models of one family merge",
            )
    family = families["primary_model_name"]
    primary = pipes["primary_model_name"]
    fits_one_file = _fits_one_file(primary, family)
    if checkpoint_format == FORMAT_SAFETENSORS and not fits_one_file:
        raise InvalidRequestError(
            "checkpoint_format",
            checkpoint_format,
            f"{FORMAT_DIFFUSERS} or {FORMAT_AUTOMATIC} for this {family} model (a single A1111-layout file is "
            "written for standard SD 1.x models)",
        )
    as_file = checkpoint_format == FORMAT_SAFETENSORS or (checkpoint_format == FORMAT_AUTOMATIC and fits_one_file)

    modules = {name: module for name, module in primary.components.items() if isinstance(module, torch.nn.Module)}
    kinds: set[str] = set()
    merged_tensors = 0
    if inputs.method != NO_INTERPOLATION:
        total = sum(len(module.state_dict()) for module in modules.values())
        progress = _Progress(total, on_tensor)
        with torch.no_grad():
            for component, module in modules.items():
                others = {}
                for field_name in ("secondary_model_name", "tertiary_model_name"):
                    if field_name in pipes:
                        other = pipes[field_name].components.get(component)
                        if not isinstance(other, torch.nn.Module):
                            raise InvalidRequestError(
                                field_name, fields[field_name].name, f"a checkpoint with a {component}, like A"
                            )
                        others[field_name] = other.state_dict()
                for key, a in module.state_dict().items():
                    progress.tick()
                    b = others["secondary_model_name"].get(key)
                    if b is None or not a.is_floating_point():
                        continue  # as in A1111: what only A has stays A's
                    if inputs.method == ADD_DIFFERENCE:
                        c = others["tertiary_model_name"].get(key)
                        b = b.float() - c.float() if c is not None and c.shape == b.shape else torch.zeros_like(b)
                    try:
                        kind = merge_tensor(a, b, inputs.method, inputs.multiplier)
                    except ValueError as exc:
                        raise InvalidRequestError(
                            "secondary_model_name",
                            inputs.secondary.name,
                            f"a checkpoint of A's architecture ({component} {key}: {exc}); an inpainting model "
                            "merges with a normal one only as A",
                        ) from exc
                    kinds.add(kind)
                    merged_tensors += 1
    for field_name in ("secondary_model_name", "tertiary_model_name"):
        pipes.pop(field_name, None)  # freed before the VAE loads and the file is written
    # As A1111: the result keeps A's precision (a half-precision A gives a half-precision result), merged in
    # float32 all the same.
    stored = _stored_dtype(inputs.primary)
    if not save_as_half and stored in (torch.float16, torch.bfloat16):
        dtype = stored
        primary.to(dtype)

    if inputs.vae is not None:
        try:
            baked = load_vae(inputs.vae, primary.vae)
        except ModelLoadError as exc:
            raise InvalidRequestError("bake_in_vae", inputs.vae.name, f"a VAE made for this model ({exc})") from exc
        primary.vae.load_state_dict({key: value.to(dtype) for key, value in baked.state_dict().items()})

    name = inputs.name + "".join(f".{kind}" for kind in sorted(kinds) if kind)
    hashes = {field_name: registry.with_hash(info).sha256 for field_name, info in fields.items()}
    recipe = {
        "type": "webui",
        "primary_model_hash": hashes["primary_model_name"],
        "secondary_model_hash": hashes.get("secondary_model_name"),
        "tertiary_model_hash": hashes.get("tertiary_model_name"),
        "interp_method": inputs.method,
        "multiplier": inputs.multiplier,
        "save_as_half": save_as_half,
        "custom_name": inputs.name,
        "bake_in_vae": inputs.vae.name if inputs.vae is not None else NO_VAE,
        "is_inpainting": "inpainting" in kinds,
        "is_instruct_pix2pix": "instruct-pix2pix" in kinds,
    }
    metadata = {}
    if inputs.save_metadata:
        merged_models = {hashes[f] or info.name: {"name": info.name, "legacy_hash": None} for f, info in fields.items()}
        metadata = {"sd_merge_recipe": json.dumps(recipe), "sd_merge_models": json.dumps(merged_models)}
    registry.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    if as_file:
        path = _new_path(registry.checkpoints_dir / f"{name}.safetensors")
        from .checkpoint import save_single_file

        save_single_file(primary, path, metadata=metadata)
    else:
        path = _new_path(registry.checkpoints_dir / name)
        _save_folder(primary, path, inputs.primary, metadata)
    info = registry.with_hash(registry.resolve(str(path)))
    seconds = time.perf_counter() - started
    log.info("Merged %s into %s in %.1f s (%d tensors)", inputs.method, path, seconds, merged_tensors)
    return MergeResult(info=info, recipe=recipe, merged_tensors=merged_tensors, seconds=seconds)


def _architecture(pipe) -> tuple:
    """What two models must share to merge (the rest is checked tensor by tensor): their networks, and the
    width of the text their UNet attends to."""
    modules = sorted(name for name, module in pipe.components.items() if isinstance(module, torch.nn.Module))
    return modules, pipe.unet.config.get("cross_attention_dim")


def _stored_dtype(info: ModelInfo) -> torch.dtype | None:
    """The precision a model's UNet weights are stored in (None when it cannot be read: a hub id, a pickle)."""
    target = model_weights_file(Path(info.path)) if info.kind != "hub" else None
    if target is None or target.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(target), framework="pt") as handle:
            names = list(handle.keys())
            unet = [name for name in names if name.startswith(UNET_PREFIX)] or names
            return _SAFETENSORS_DTYPES.get(handle.get_slice(unet[0]).get_dtype()) if unet else None
    except (OSError, ValueError):
        return None


def _fits_one_file(pipe, family: str) -> bool:
    """Whether save_single_file writes this model as a file that loads back as the same model: an SD 1.x
    layout of the sizes load_single_file knows, with a standard or an inpainting UNet."""
    config = pipe.unet.config
    widths = {"sd1": 768, "tiny": 32}
    return (
        family in widths
        and config.get("cross_attention_dim") == widths[family]
        and config.get("in_channels") in (4, INPAINTING_CHANNELS)
    )


def _check_free(folder: Path, name: str, value) -> None:
    """Refuse a name a model in `folder` has, as a file or a folder: nothing is overwritten, and two models of
    one name could not be told apart."""
    if (folder / name).exists() or (folder / f"{name}.safetensors").exists():
        raise InvalidRequestError(
            "custom_name", value or name, f"a name no model in {folder} has yet (type a new one in Custom name)"
        )


def _new_path(path: Path) -> Path:
    _check_free(path.parent, path.name.removesuffix(".safetensors"), path.name.removesuffix(".safetensors"))
    return path


def _save_folder(pipe, path: Path, primary: ModelInfo, metadata: dict[str, str]) -> None:
    """A diffusers folder, written beside `path` and renamed into place. A's model-level files (the micro model's
    preview factors, say) and its "_lantern_*" model_index.json keys are copied, as A1111 copies A's config."""
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        source = Path(primary.path)
        if primary.kind == "folder":
            index_path = staging / "model_index.json"
            index = json.loads(index_path.read_text())
            original = json.loads((source / "model_index.json").read_text())
            index.update({key: value for key, value in original.items() if key.startswith("_lantern")})
            index_path.write_text(json.dumps(index, indent=2) + "\n")
            for item in source.iterdir():
                copied = item.suffix in _MODEL_LEVEL_SUFFIXES and item.name != "merge_recipe.json"
                if item.is_file() and copied and not (staging / item.name).exists():
                    shutil.copy2(item, staging / item.name)
        if metadata:
            (staging / "merge_recipe.json").write_text(json.dumps(metadata, indent=2) + "\n")
        os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
