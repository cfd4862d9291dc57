"""Textual inversion embeddings from A1111's `embeddings/` folder, loaded into a model's text encoders.

Each file's name (without its suffix) becomes a word of the prompt, as in A1111: `EasyNegative` in a
negative prompt stands for the vectors in `embeddings/EasyNegative.safetensors`. Files are read in the
formats A1111 and diffusers write: A1111's `.pt` (`string_to_param`), its `.safetensors` (`emb_params`),
SDXL's `clip_l`/`clip_g` pairs, and diffusers' one-tensor files (`learned_embeds.bin`/`.safetensors`).
diffusers' `load_textual_inversion` adds each vector as a token of the model's own tokenizer and text
encoder, so the loaded model, and nothing shared between models, holds them. An embedding made for
another model family (its vectors another width) is skipped and listed with the reason.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import read_safetensors_header
from .errors import ModelLoadError

log = logging.getLogger(__name__)

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")


@dataclass(frozen=True)
class Embedding:
    """One embeddings-folder file, as A1111's /sdapi/v1/embeddings describes it."""

    name: str
    path: str
    vectors: int
    shape: int  # the width of each vector: 768 for SD 1.x, 1024 for SD 2.x, (768 + 1280) for SDXL
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    sha256: str = ""

    @property
    def short_hash(self) -> str:
        # A1111's "TI hashes" infotext names an embedding by the first 12 hex digits of its file's sha256.
        return self.sha256[:12]

    def api_entry(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "sd_checkpoint": self.sd_checkpoint,
            "sd_checkpoint_name": self.sd_checkpoint_name,
            "shape": self.shape,
            "vectors": self.vectors,
        }


@dataclass
class EmbeddingsReport:
    """What a model made of the embeddings folder: the embeddings it took, and why it left the others."""

    folder: str | None = None
    # The folder's embedding files (path, size, mtime) when it was read: a refresh rereads it only if they differ.
    signature: tuple = ()
    loaded: dict[str, Embedding] = field(default_factory=dict)
    skipped: dict[str, Embedding] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def hashes_used(self, texts: list[str], tokenizer) -> dict[str, str]:
        """{name: short hash} of the loaded embeddings that `texts` name, for the "TI hashes" infotext."""
        if not self.loaded:
            return {}
        used = {token_id for text in texts if text for token_id in tokenizer(text, verbose=False)["input_ids"]}
        return {
            name: embedding.short_hash
            for name, embedding in self.loaded.items()
            if tokenizer.convert_tokens_to_ids(name) in used
        }


def read_embedding(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The vectors of an embedding file by text encoder ("" for SD 1.x/2.x's one, "clip_l"/"clip_g" for
    SDXL's two), each (vectors, width), and what A1111 records about its training. Raises ValueError."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            read_safetensors_header(path)  # says what is wrong with a damaged or half-downloaded file
            data: dict[str, Any] = load_file(str(path))
        except ModelLoadError as exc:
            raise ValueError(str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - safetensors' own errors derive from Exception alone
            raise ValueError(f"not a readable safetensors file ({exc})") from exc
    else:
        # A1111's .pt embeddings hold only tensors, numbers and strings, so torch's weights-only loader
        # reads them without running any code from the file.
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing to the user
            raise ValueError(f"not a weights-only torch file ({exc.__class__.__name__})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"holds a {type(data).__name__}, not a dict of tensors")

    details = {key: data.get(key) for key in ("step", "sd_checkpoint", "sd_checkpoint_name")}
    if "clip_l" in data and "clip_g" in data:
        vectors = {"clip_l": data["clip_l"], "clip_g": data["clip_g"]}
    elif "string_to_param" in data:
        params = data["string_to_param"]
        vectors = {"": params["*"] if "*" in params else next(iter(params.values()))}
    elif "emb_params" in data:
        vectors = {"": data["emb_params"]}
    elif len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        vectors = {"": next(iter(data.values()))}
    else:
        raise ValueError(f"no embedding in it (keys: {', '.join(sorted(map(str, data)))})")
    vectors = {key: _as_rows(value) for key, value in vectors.items()}
    return vectors, details


def _as_rows(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() not in (1, 2) or value.numel() == 0:
        raise ValueError("its vectors are not a (vectors, width) tensor")
    return (value.unsqueeze(0) if value.dim() == 1 else value).detach().float()


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _embedding_files(folder: Path | None) -> list[Path]:
    if folder is None or not folder.is_dir():
        return []
    return sorted(path for path in folder.rglob("*") if path.suffix in EMBEDDING_SUFFIXES and path.is_file())


def folder_signature(folder: Path | None) -> tuple:
    """What a refresh compares: each embedding file's path, size and modification time."""
    return tuple((str(path), path.stat().st_size, path.stat().st_mtime_ns) for path in _embedding_files(folder))


def _encoder_pairs(pipe) -> dict[str, tuple]:
    """The model's (tokenizer, text encoder) pairs, keyed as read_embedding keys the vectors meant for them."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return {"clip_l": (pipe.tokenizer, pipe.text_encoder), "clip_g": (pipe.tokenizer_2, pipe.text_encoder_2)}
    return {"": (pipe.tokenizer, pipe.text_encoder)}


def unload_embeddings(pipe, report: EmbeddingsReport) -> None:
    """Take the embeddings `report` loaded back out of `pipe`'s tokenizers and text encoders."""
    if report.loaded:
        for tokenizer, text_encoder in _encoder_pairs(pipe).values():
            pipe.unload_textual_inversion(tokenizer=tokenizer, text_encoder=text_encoder)


def load_embeddings(pipe, folder: Path | None) -> EmbeddingsReport:
    """Add every embedding in `folder` (and its subfolders, as A1111 reads them) that fits `pipe`'s text
    encoders to them; the rest are skipped with a reason. A missing folder is no embeddings."""
    report = EmbeddingsReport(folder=str(folder) if folder is not None else None, signature=folder_signature(folder))
    if folder is None or not folder.is_dir() or getattr(pipe, "tokenizer", None) is None:
        return report
    encoders = _encoder_pairs(pipe)
    widths = {key: encoder.get_input_embeddings().weight.shape[-1] for key, (_tok, encoder) in encoders.items()}

    files = _embedding_files(folder)
    accepted: dict[str, dict[str, torch.Tensor]] = {}
    for path in files:
        name = path.stem
        try:
            vectors, details = read_embedding(path)
        except (ValueError, KeyError, OSError, RuntimeError) as exc:
            report.reasons[name] = f"{path.name} could not be read: {exc}"
            log.warning("Embedding %s skipped: %s", name, report.reasons[name])
            continue
        embedding = Embedding(
            name=name,
            path=str(path),
            vectors=next(iter(vectors.values())).shape[0],
            shape=sum(rows.shape[-1] for rows in vectors.values()),
            sha256=_sha256(path),
            **details,
        )
        reason = _why_not(name, vectors, widths, encoders[next(iter(encoders))][0], report)
        if reason is None:
            report.loaded[name] = embedding
            accepted[name] = vectors
        else:
            report.skipped[name] = embedding
            report.reasons[name] = reason
            log.info("Embedding %s skipped: %s", name, reason)
    if accepted:
        # One call per text encoder: each call resizes the encoder's token table once.
        names = list(accepted)
        # transformers warns that it fills the new rows from a normal distribution; they are overwritten.
        resizing_log = logging.getLogger("transformers.modeling_utils")
        level = resizing_log.level
        resizing_log.setLevel(logging.ERROR)
        try:
            for key, (tokenizer, text_encoder) in encoders.items():
                rows = [accepted[name][key] for name in names]
                pipe.load_textual_inversion(rows, token=names, tokenizer=tokenizer, text_encoder=text_encoder)
        finally:
            resizing_log.setLevel(level)
        log.info("Loaded %d textual inversion embedding(s) from %s", len(names), folder)
    return report


def _why_not(name: str, vectors: dict, widths: dict, tokenizer, report: EmbeddingsReport) -> str | None:
    """Why an embedding cannot be added to this model, or None when it can."""
    # Prompts are read in lower case, so names that differ only in case would be one word.
    same = next((other for other in report.loaded.values() if other.name.lower() == name.lower()), None)
    if same is not None:
        return f"another file already gave an embedding named {same.name!r} ({same.path})"
    if set(vectors) != set(widths):
        made_for = "SDXL" if "clip_l" in vectors else "SD 1.x/2.x"
        return f"made for {made_for}; this model's text encoders need {' and '.join(sorted(widths)) or 'one'} vectors"
    for key, rows in vectors.items():
        if rows.shape[-1] != widths[key]:
            return f"vectors {rows.shape[-1]} wide; this model's text encoder takes {widths[key]}"
    if name in tokenizer.get_vocab() or f"{name}_1" in tokenizer.get_vocab():
        return f"{name!r} is already a token of this model's tokenizer"
    return None


class EmbeddingTokens:
    """Expands an embedding's first token into all of its vectors' tokens, the way diffusers names them
    (`name`, `name_1`, `name_2`, ...). Also compel's textual inversion manager."""

    def __init__(self, tokenizer):
        special = set(getattr(tokenizer, "all_special_ids", []))
        added = {
            token: token_id for token, token_id in tokenizer.added_tokens_encoder.items() if token_id not in special
        }
        self.expansions: dict[int, list[int]] = {}
        for token, token_id in added.items():
            if f"{token}_1" not in added:
                continue
            ids, index = [token_id], 1
            while f"{token}_{index}" in added:
                ids.append(added[f"{token}_{index}"])
                index += 1
            self.expansions[token_id] = ids
        self.first_ids = frozenset(added.values()) - {
            token_id for ids in self.expansions.values() for token_id in ids[1:]
        }

    def group(self, token_id: int) -> list[int] | None:
        """All the tokens of the embedding that starts with `token_id`, or None for an ordinary token."""
        if token_id in self.expansions:
            return self.expansions[token_id]
        return [token_id] if token_id in self.first_ids else None

    def expand_textual_inversion_token_ids_if_necessary(self, token_ids: list[int]) -> list[int]:
        expanded: list[int] = []
        for token_id in token_ids:
            expanded.extend(self.expansions.get(token_id, [token_id]))
        return expanded
