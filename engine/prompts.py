"""A1111 prompt text -> conditioning tensors for diffusers Stable Diffusion 1.x/2.x pipelines.

Behaviour follows AUTOMATIC1111's prompt handling so that prompts written for it weigh the same here:

- attention syntax: ``(x)`` multiplies by 1.1, ``[x]`` divides by 1.1, ``(x:1.5)`` sets a factor, nesting
  multiplies, ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters, unclosed brackets still apply
  to the rest of the prompt;
- no 77-token limit: the prompt is cut into chunks of 75 tokens, each wrapped in BOS/EOS and padded to 77
  (with EOS for SD1, with the tokenizer's pad token after the first EOS for SD2); when a chunk fills up, the
  text after a comma in its last 20 tokens moves on to the next chunk; ``BREAK`` (uppercase, its own word)
  starts a new chunk;
- every chunk is encoded by CLIP separately, its hidden states are multiplied by the token weights and then
  scaled so that the chunk's mean equals the mean before weighting (A1111's "Original" emphasis);
- clip_skip counts like A1111's "Clip skip": 1 = last layer, 2 = penultimate hidden state passed through
  the final layer norm;
- positive and negative encodings are brought to the same number of chunks by appending the encoding of an
  empty prompt, as A1111 does with "pad prompt/negative prompt to be same length".

Not handled here: textual inversion embeddings, ``AND`` (composable diffusion), ``[a:b:n]`` prompt editing and
``[a|b]`` alternation - their text is encoded as ordinary weighted text. Extra-network tags such as
``<lora:name:0.8>`` or ``<hypernet:name:1>`` are removed from the text before tokenizing (loading the networks is
someone else's job; `split_extra_networks` returns them).
"""

from __future__ import annotations

import logging
import numbers
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

CHUNK_LENGTH = 75
"""Prompt tokens per chunk; with BOS and EOS a chunk is CLIP's 77 positions."""

COMMA_PADDING_BACKTRACK = 20
"""A1111's opts.comma_padding_backtrack default: how far back a comma may be to move the text after it."""

ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1

BREAK_WEIGHT = -1.0
"""Weight that marks a ("BREAK", -1) entry from `parse_prompt_attention`: not text, a chunk boundary."""

DEFAULT_CACHE_SIZE = 32

# Extra networks tags, as A1111's extra_networks.parse_prompt finds them: <kind:arg1:arg2...>.
_EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")

# One lexical unit of the attention syntax per match, tried in this order: an escaped bracket or
# backslash, a lone backslash (dropped, as A1111 does), an opening bracket, a ":number)" closing a
# weighted group, a closing bracket, a run of ordinary text, or a ":" that is just text.
_ATTENTION_UNIT = re.compile(
    r"""
    (?P<escaped>\\[()\[\]\\])
  | (?P<lone_backslash>\\)
  | (?P<open>[(\[])
  | :(?P<weight>[+-]?[.\d]+)\)
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+)
  | (?P<colon>:)
    """,
    re.VERBOSE,
)

_BREAK_SEPARATOR = re.compile(r"\s*\bBREAK\b\s*", re.S)


@dataclass(frozen=True)
class ExtraNetworkTag:
    """An ``<kind:arg1:arg2>`` tag taken out of a prompt, e.g. kind "lora", args ["name", "0.8"]."""

    kind: str
    args: list[str]


def split_extra_networks(text: str) -> tuple[str, list[ExtraNetworkTag]]:
    """Remove ``<lora:...>``-style tags from `text`; returns the remaining text and the tags in order."""
    tags: list[ExtraNetworkTag] = []

    def take(match: re.Match) -> str:
        tags.append(ExtraNetworkTag(match.group(1), match.group(2).split(":")))
        return ""

    return _EXTRA_NETWORK_TAG.sub(take, text), tags


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split A1111 prompt text into (text, weight) runs.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]

    ``BREAK`` as its own uppercase word gives a ("BREAK", -1.0) entry. Runs with equal weights are merged.
    An empty prompt gives [("", 1.0)].

    Two deliberate differences from A1111, both where A1111 misbehaves: a BREAK inside brackets stays a chunk
    break (A1111 multiplies the marker's -1 and then encodes the word "BREAK" with a negative weight), and a
    malformed weight like ``(x:1.2.3)`` is kept as text instead of raising.
    """
    # Mutable [text, weight, is_break] entries while brackets are still being resolved.
    runs: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            if not run[2]:
                run[1] *= factor

    def add_text(piece: str) -> None:
        for index, part in enumerate(_BREAK_SEPARATOR.split(piece)):
            if index > 0:
                runs.append(["BREAK", BREAK_WEIGHT, True])
            runs.append([part, 1.0, False])

    for match in _ATTENTION_UNIT.finditer(text):
        unit = match.group(0)
        if match.group("escaped") is not None:
            runs.append([unit[1], 1.0, False])
        elif match.group("lone_backslash") is not None:
            runs.append(["", 1.0, False])
        elif unit == "(":
            open_round.append(len(runs))
        elif unit == "[":
            open_square.append(len(runs))
        elif match.group("weight") is not None and open_round:
            try:
                factor = float(match.group("weight"))
            except ValueError:
                add_text(unit)
            else:
                scale_from(open_round.pop(), factor)
        elif unit == ")" and open_round:
            scale_from(open_round.pop(), ROUND_BRACKET_MULTIPLIER)
        elif unit == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            add_text(unit)

    # Brackets never closed apply to everything after them.
    for start in open_round:
        scale_from(start, ROUND_BRACKET_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_BRACKET_MULTIPLIER)

    if not runs:
        return [("", 1.0)]

    merged: list[list] = [runs[0]]
    for run in runs[1:]:
        previous = merged[-1]
        if not run[2] and not previous[2] and run[1] == previous[1]:
            previous[0] += run[0]
        else:
            merged.append(run)
    return [(run[0], run[1]) for run in merged]


def is_break(text: str, weight: float) -> bool:
    return text == "BREAK" and weight == BREAK_WEIGHT


@dataclass
class PromptChunk:
    """Up to CHUNK_LENGTH prompt token ids and their weights, without BOS/EOS/padding."""

    tokens: list[int]
    weights: list[float]


def split_into_chunks(
    parsed: list[tuple[str, float]],
    token_ids: list[list[int]],
    comma_id: int | None,
    backtrack: int = COMMA_PADDING_BACKTRACK,
) -> list[PromptChunk]:
    """Cut a parsed prompt (with the token ids of each run) into chunks the way A1111's tokenize_line does.

    Always returns at least one chunk. A chunk holds at most CHUNK_LENGTH tokens. When a chunk is full and the
    next token is not a comma, the tokens after the chunk's last comma move to the next chunk if that comma is
    within `backtrack` tokens of the end, so a phrase is not cut in two. BREAK closes the current chunk.
    """
    chunks: list[PromptChunk] = []
    current = PromptChunk([], [])
    last_comma = -1

    def close_current() -> None:
        nonlocal current, last_comma
        chunks.append(current)
        current = PromptChunk([], [])
        last_comma = -1

    for (text, weight), ids in zip(parsed, token_ids, strict=True):
        if is_break(text, weight):
            close_current()
            continue
        for token in ids:
            if token == comma_id:
                last_comma = len(current.tokens)
            elif (
                backtrack
                and len(current.tokens) == CHUNK_LENGTH
                and last_comma != -1
                and CHUNK_LENGTH - last_comma <= backtrack
            ):
                keep = last_comma + 1
                moved = PromptChunk(current.tokens[keep:], current.weights[keep:])
                del current.tokens[keep:], current.weights[keep:]
                close_current()
                current = moved
            if len(current.tokens) == CHUNK_LENGTH:
                close_current()
            current.tokens.append(token)
            current.weights.append(weight)

    if current.tokens or not chunks:
        close_current()
    return chunks


class PromptEncoder:
    """Encodes A1111-syntax prompts with a CLIP tokenizer and text encoder (SD 1.x / 2.x).

        encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
        cond, uncond = encoder.encode("a (red:1.3) fox", "blurry", clip_skip=1)
        pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, ...)

    Encodings are kept in a small LRU cache on the instance, keyed by text, clip skip, device and dtype. Call
    `clear_cache` after changing the text encoder's weights (e.g. fusing a LoRA into it).
    """

    def __init__(self, tokenizer, text_encoder, *, cache_size: int = DEFAULT_CACHE_SIZE):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        # One encode at a time per instance: the cache is shared by every caller of this encoder.
        self._lock = threading.RLock()

        vocab = tokenizer.get_vocab()
        self.comma_id: int | None = vocab.get(",</w>")
        self.bos_id: int = tokenizer.bos_token_id
        self.eos_id: int = tokenizer.eos_token_id
        # SD1 tokenizers pad with EOS; SD2's pad token is "!" (id 0), which A1111 puts after the first EOS.
        pad_id = tokenizer.pad_token_id
        self.pad_id: int = self.eos_id if pad_id is None else pad_id

    # --- tokenizing -------------------------------------------------------------------------------------------

    def _chunks(self, text: str) -> list[PromptChunk]:
        """Chunks of text whose extra-network tags are already removed."""
        parsed = parse_prompt_attention(text)
        token_ids = self.tokenizer(
            [piece for piece, _weight in parsed], add_special_tokens=False, truncation=False, verbose=False
        )["input_ids"]
        return split_into_chunks(parsed, token_ids, self.comma_id)

    def token_counts(self, prompt: str) -> list[int]:
        """Prompt tokens in each 75-token chunk, e.g. "" -> [0]; 80 tokens without commas -> [75, 5]."""
        return [len(chunk.tokens) for chunk in self._chunks(split_extra_networks(prompt)[0])]

    def _chunk_ids_and_weights(self, chunk: PromptChunk) -> tuple[list[int], list[float]]:
        padding = CHUNK_LENGTH - len(chunk.tokens)
        ids = [self.bos_id, *chunk.tokens, self.eos_id, *([self.pad_id] * padding)]
        weights = [1.0, *chunk.weights, *([1.0] * (padding + 1))]
        return ids, weights

    # --- encoding ---------------------------------------------------------------------------------------------

    def _check_clip_skip(self, clip_skip: int) -> int:
        layers = self.text_encoder.config.num_hidden_layers
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, numbers.Integral) or not 1 <= clip_skip <= layers:
            raise ValueError(f"clip_skip: got {clip_skip!r}; allowed: 1..{layers}")
        return int(clip_skip)

    def _final_layer_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        # transformers < 5 nests the layers under .text_model; 5.x puts them on CLIPTextModel itself.
        owner = getattr(self.text_encoder, "text_model", self.text_encoder)
        return owner.final_layer_norm(hidden)

    def _run_text_encoder(self, chunks: list[PromptChunk], clip_skip: int) -> torch.Tensor:
        """Encode chunks (in one batch) and apply their weights; returns (len(chunks), 77, hidden)."""
        rows = [self._chunk_ids_and_weights(chunk) for chunk in chunks]
        device = self.text_encoder.device
        input_ids = torch.tensor([ids for ids, _ in rows], dtype=torch.long, device=device)
        output = self.text_encoder(input_ids=input_ids, output_hidden_states=clip_skip > 1)
        if clip_skip > 1:
            hidden = self._final_layer_norm(output.hidden_states[-clip_skip])
        else:
            hidden = output.last_hidden_state

        # Weighting in float32 like A1111 (its multipliers are float32 and promote fp16 hidden states).
        hidden = hidden.float()
        weights = torch.tensor([w for _, w in rows], dtype=torch.float32, device=hidden.device).unsqueeze(-1)
        original_mean = hidden.mean(dim=(1, 2), keepdim=True)
        weighted = hidden * weights
        new_mean = weighted.mean(dim=(1, 2), keepdim=True)
        # A1111 restores each chunk's mean; a zero mean after weighting would divide by zero, keep it unscaled.
        scale = torch.where(new_mean != 0, original_mean / new_mean, torch.ones_like(new_mean))
        return (weighted * scale).to(self.text_encoder.dtype)

    def _encode_prompts(self, prompts: list[str], clip_skip: int) -> list[torch.Tensor]:
        """(1, 77*k, hidden) per prompt, from the cache where possible; the rest in one text-encoder call."""
        device, dtype = self.text_encoder.device, self.text_encoder.dtype
        keys = [(split_extra_networks(p)[0], clip_skip, str(device), dtype) for p in prompts]
        missing = list(dict.fromkeys(key for key in keys if key not in self._cache))
        if missing:
            chunk_lists = [self._chunks(key[0]) for key in missing]
            with torch.no_grad():
                encoded = self._run_text_encoder([c for chunks in chunk_lists for c in chunks], clip_skip)
            start = 0
            for key, chunks in zip(missing, chunk_lists, strict=True):
                part = encoded[start : start + len(chunks)]
                start += len(chunks)
                self._cache[key] = part.reshape(1, -1, part.shape[-1])
        else:
            log.debug("prompt encodings served from cache")
        results = []
        for key in keys:
            self._cache.move_to_end(key)
            results.append(self._cache[key])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return results

    def encode(self, prompt: str, negative_prompt: str = "", clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (prompt_embeds, negative_prompt_embeds), each (1, 77*k, hidden) with the same k.

        The shorter one is padded with encodings of the empty prompt. The tensors are on the text encoder's
        device and dtype, and new objects each call (changing them does not change the cache).

        clip_skip 1 is the last layer, 2 the penultimate one, ... up to the encoder's layer count (ValueError
        outside that). Note that diffusers' own ``clip_skip`` argument counts one lower; do not pass both.
        A1111 ignores Clip skip for SD2's OpenCLIP encoder; here it applies to every model.
        """
        clip_skip = self._check_clip_skip(clip_skip)
        with self._lock:
            positive, negative, empty = self._encode_prompts([prompt, negative_prompt, ""], clip_skip)
            length = max(positive.shape[1], negative.shape[1])
            return self._pad_to(positive, length, empty), self._pad_to(negative, length, empty)

    @staticmethod
    def _pad_to(embeds: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
        missing_chunks = (length - embeds.shape[1]) // empty.shape[1]
        return torch.cat([embeds, empty.repeat(1, missing_chunks, 1)], dim=1)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
