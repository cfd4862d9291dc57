"""LoRA networks from A1111's `models/Lora` folder, switched on per job by `<lora:name:weight>` tags.

A1111's tag syntax: `<lora:name>` (weight 1), `<lora:name:0.8>`, `<lora:name:te:unet>` (the text
encoder's and the UNet's weights apart), or named, `<lora:name:unet=0.5:te=1>`. Tags in the prompt
switch LoRAs on; tags in the negative prompt are removed from its text, as A1111 does, and switch
nothing on.

Files are read by diffusers' `load_lora_weights` (kohya-ss/A1111 `lora_unet_*`/`lora_te_*` files and
diffusers/PEFT ones, SD 1.x, 2.x and SDXL) into PEFT adapters beside the model's own weights, never
fused into them: a job without LoRAs switches the adapters off and runs exactly the weights it ran
before any LoRA was loaded, so its pictures stay byte-identical. Adapters stay loaded for the model's
life, so the second job with a LoRA does not read the file again. Jobs run one at a time, so the
adapters set for a job are what that job, and only it, runs with.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import read_safetensors_header
from .errors import InvalidRequestError, ModelLoadError
from .prompts import network_tags

log = logging.getLogger(__name__)

LORA_SUFFIXES = (".safetensors",)
# Refused by name: a pickle can run code when read, and A1111 LoRAs are published as safetensors.
PICKLE_SUFFIXES = (".pt", ".ckpt", ".bin")
_NAMED_WEIGHT = re.compile(r"^(te|unet)=(.*)$")


@dataclass(frozen=True)
class LoraUse:
    """One `<lora:...>` tag: which file, and how strongly on the text encoder and on the UNet."""

    name: str
    text_encoder: float
    unet: float
    tag: str


def lora_uses(prompt: str) -> list[LoraUse]:
    """The LoRAs a prompt's tags ask for, in order (a name given twice: the last tag wins).
    Raises InvalidRequestError naming the tag when a weight is not a number."""
    uses: dict[str, LoraUse] = {}
    for name, rest, text in network_tags(prompt, "lora"):
        weights: dict[str, float] = {}
        positional = ["te", "unet"]
        for arg in rest:
            named = _NAMED_WEIGHT.match(arg.strip())
            key, value = (named.group(1), named.group(2)) if named else (positional.pop(0) if positional else "", arg)
            if not key:
                raise InvalidRequestError(
                    "prompt", text, "<lora:name>, <lora:name:weight> or <lora:name:text encoder weight:unet weight>"
                )
            try:
                weights[key] = float(value)
            except ValueError:
                part = {"te": "text encoder", "unet": "UNet"}[key]
                raise InvalidRequestError("prompt", text, f"a number for the LoRA's {part} weight") from None
        te = weights.get("te", 1.0)
        uses[name] = LoraUse(name, te, weights.get("unet", te), text)
    return list(uses.values())


@dataclass(frozen=True)
class LoraFile:
    name: str
    path: Path

    def metadata(self) -> dict[str, str]:
        """The safetensors header's metadata (kohya-ss writes its training settings there)."""
        try:
            with open(self.path, "rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                return json.loads(handle.read(length)).get("__metadata__", {}) or {}
        except (OSError, ValueError):
            return {}


def files_by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Every file under `folder` (subfolders too, as A1111 reads its extra networks) with one of `suffixes`, by its
    stem; where two share a stem, the one whose path sorts last."""
    if not folder.is_dir():
        return {}
    files = sorted(
        (path for path in folder.rglob("*") if path.suffix in suffixes and path.is_file()),
        key=lambda path: (path.stem.lower(), str(path)),
    )
    return {path.stem: path for path in files}


def named(available: dict, name: str):
    """The entry of `available` (by file stem) that `name` names: exactly, else in any case; None where none does."""
    found = available.get(name)
    if found is None:
        found = {stem.lower(): entry for stem, entry in available.items()}.get(name.lower())
    return found


def scan_loras(folder: Path) -> dict[str, LoraFile]:
    """Every LoRA under `folder`, by name (the file's stem)."""
    return {name: LoraFile(name, path) for name, path in files_by_stem(folder, LORA_SUFFIXES).items()}


@dataclass
class LoraAdapters:
    """The LoRAs loaded into one model as PEFT adapters, and which of them the current job runs."""

    folder: Path
    adapter_names: dict[str, str] = field(default_factory=dict)  # LoRA file path -> adapter name
    hashes: dict[tuple, str] = field(default_factory=dict)  # (path, size, mtime) -> sha256
    active: tuple = ()
    attempts: int = 0  # adapter names are never reused, not even a failed load's

    def short_hash(self, lora: LoraFile) -> str:
        """A1111's "Lora hashes" infotext names a LoRA by the first 12 hex digits of its file's sha256."""
        stat = lora.path.stat()
        key = (str(lora.path), stat.st_size, stat.st_mtime_ns)
        if key not in self.hashes:
            with open(lora.path, "rb") as handle:
                self.hashes[key] = hashlib.file_digest(handle, "sha256").hexdigest()
        return self.hashes[key][:12]

    def resolve(self, uses: list[LoraUse]) -> list[tuple[LoraUse, LoraFile]]:
        """The files `uses` name; raises InvalidRequestError naming an unknown one and listing what there is."""
        if not uses:
            return []  # most prompts: no need to read the folder
        available = scan_loras(self.folder)
        found = []
        for use in uses:
            lora = named(available, use.name)
            if lora is None:
                pickled = [p for p in self.folder.rglob(f"{use.name}.*") if p.suffix in PICKLE_SUFFIXES]
                if pickled:
                    allowed = f"a .safetensors LoRA ({pickled[0].name} is a pickle file: convert it to .safetensors)"
                else:
                    names = ", ".join(sorted(available)) or "none"
                    allowed = f"the name of a LoRA in {self.folder} (there: {names})"
                raise InvalidRequestError("prompt", use.tag, allowed)
            found.append((use, lora))
        return found

    def activate(self, make_pipeline, found: list[tuple[LoraUse, LoraFile]], family: str) -> bool:
        """Set the adapters of the pipeline `make_pipeline()` gives (called only when they change) to
        exactly the LoRAs in `found` at their weights (none: all off). Returns whether the set changed.
        Raises InvalidRequestError for a LoRA this model cannot take."""
        wanted = tuple((str(lora.path), use.text_encoder, use.unet) for use, lora in found)
        if wanted == self.active:
            return False
        pipe = make_pipeline()
        names, weights = [], []
        for use, lora in found:
            names.append(self._load(pipe, use, lora, family))
        # Weights only for the parts each LoRA has (many have no text encoder part): diffusers warns of others.
        parts = pipe.get_list_adapters()
        for name, (use, _lora) in zip(names, found, strict=True):
            weight_of = {"unet": use.unet, "text_encoder": use.text_encoder, "text_encoder_2": use.text_encoder}
            weights.append({part: weight_of[part] for part, adapters in parts.items() if name in adapters})
        if names:
            pipe.enable_lora()
            pipe.set_adapters(names, adapter_weights=weights)
        elif self.adapter_names:
            pipe.disable_lora()
        self.active = wanted
        return True

    def _load(self, pipe, use: LoraUse, lora: LoraFile, family: str) -> str:
        key = str(lora.path)
        if key in self.adapter_names:
            return self.adapter_names[key]
        if lora.path.suffix.lower() == ".safetensors":
            try:  # a damaged or half-downloaded file is told apart from one made for another model
                read_safetensors_header(lora.path)
            except ModelLoadError as exc:
                raise InvalidRequestError("prompt", use.tag, f"a LoRA file that reads: {exc}") from exc
        adapter = f"lora{self.attempts}"
        self.attempts += 1
        try:
            with warnings.catch_warnings(), _without_loader_notes():
                # PEFT warns whenever a second adapter joins a model: several LoRAs are what this is for.
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                pipe.load_lora_weights(str(lora.path), adapter_name=adapter)
        except (ValueError, RuntimeError, KeyError, OSError) as exc:
            _forget_adapter(pipe, adapter)
            raise InvalidRequestError(
                "prompt",
                use.tag,
                f"a LoRA made for this model ({family}); {lora.path.name} does not fit it: {_first_lines(str(exc))}",
            ) from exc
        if not any(adapter in adapters for adapters in pipe.get_list_adapters().values()):
            raise InvalidRequestError(
                "prompt", use.tag, f"a LoRA made for this model ({family}); none of {lora.path.name}'s layers are in it"
            )
        # LoRA files are usually float16; the adapters must run at the model's own precision.
        dtype = pipe.unet.dtype
        for module in (pipe.unet, *(getattr(pipe, name) for name in _text_encoders(pipe))):
            for name, parameter in module.named_parameters():
                if "lora_" in name and parameter.dtype != dtype:
                    parameter.data = parameter.data.to(dtype)
        self.adapter_names[key] = adapter
        log.info("Loaded LoRA %s from %s", lora.name, lora.path)
        return adapter


class _DropNotes(logging.Filter):
    """Drops log records whose message contains one of `parts`."""

    def __init__(self, *parts: str):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in self.parts)


# Notes the loaders log for every ordinary LoRA: that a UNet-only LoRA has no text encoder keys, and
# transformers' load report, which lists the adapters already loaded as keys "missing" from the new one.
_LOADER_NOTES = {
    "diffusers.loaders.lora_base": ("No LoRA keys associated",),
    "diffusers.loaders.peft": ("No LoRA keys associated",),
    "transformers.integrations.peft": ("LOAD REPORT",),
}


@contextlib.contextmanager
def _without_loader_notes():
    filters = [(logging.getLogger(name), _DropNotes(*parts)) for name, parts in _LOADER_NOTES.items()]
    for logger, note_filter in filters:
        logger.addFilter(note_filter)
    try:
        yield
    finally:
        for logger, note_filter in filters:
            logger.removeFilter(note_filter)


def _first_lines(message: str, lines: int = 2) -> str:
    """The start of a loader's error: torch lists every mismatched layer, which would bury the point."""
    parts = [line.strip() for line in message.strip().splitlines() if line.strip()]
    more = f" (and {len(parts) - lines} more)" if len(parts) > lines else ""
    return " ".join(parts[:lines]) + more


def _text_encoders(pipe) -> list[str]:
    return [name for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None]


def _forget_adapter(pipe, adapter: str) -> None:
    """Take out whatever part of a LoRA got in before loading it failed."""
    try:
        pipe.delete_adapters(adapter)
    except (ValueError, KeyError, AttributeError):
        pass
    # A half-loaded adapter may be left on a component that never registered it.
    for module in (getattr(pipe, "unet", None), *(getattr(pipe, name) for name in _text_encoders(pipe))):
        if module is not None and adapter in getattr(module, "peft_config", {}):
            try:
                module.delete_adapters(adapter)
            except (ValueError, KeyError, AttributeError):
                pass
        # As diffusers does when its last adapter goes: an empty config would make PEFT warn at the next load.
        if module is not None and getattr(module, "peft_config", None) == {}:
            del module.peft_config
