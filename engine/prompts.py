"""A1111 prompt text -> conditioning tensors for diffusers Stable Diffusion 1.x/2.x and SDXL pipelines.

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
  empty prompt, so a pipeline can batch them; the UNet is then asked at each one's own length, as A1111 asks it
  (engine/pad_conds.py), or at the longer one's with A1111's "pad prompt/negative prompt to be same length".

SDXL (`SDXLPromptEncoder`, `SDXLCompelEncoder`) follows A1111's SDXL conditioning; see its docstring. Prompt
editing ``[a:b:n]`` and alternation ``[a|b]`` are resolved into plain texts per step by `prompt_schedule` before
encoding. Not handled: textual inversion embeddings, and ``AND`` (composable diffusion; request validation
refuses it). Extra-network tags such as
``<lora:name:0.8>`` or ``<hypernet:name:1>`` are removed from the text before tokenizing (loading the networks is
someone else's job; `split_extra_networks` returns them).
"""

from __future__ import annotations

import logging
import numbers
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .embeddings import EmbeddingTokens
from .prompt_schedule import composable_parts, prompt_schedule, text_for_step
from .request import EMPHASIS_MODES

log = logging.getLogger(__name__)

SCHEDULE_PREVIEW_STEPS = 100
"""Steps assumed when a prompt's schedule is shown or counted before the real step count is known."""

CHUNK_LENGTH = 75
"""Prompt tokens per chunk; with BOS and EOS a chunk is CLIP's 77 positions."""

COMMA_PADDING_BACKTRACK = 20
"""A1111's opts.comma_padding_backtrack default: how far back a comma may be to move the text after it."""

ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1

BREAK_WEIGHT = -1.0
"""Weight that marks a ("BREAK", -1) entry from `parse_prompt_attention`: not text, a chunk boundary."""

DEFAULT_CACHE_SIZE = 32

# A1111's "Emphasis mode" setting (EMPHASIS_MODES): Original multiplies the encoder output by the weights and
# restores each chunk's mean; No norm multiplies without restoring the mean; Ignore reads the brackets but
# applies no weights.
DEFAULT_EMPHASIS = "Original"

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


def network_tags(text: str, kind: str) -> list[tuple[str, list[str], str]]:
    """The `<kind:name:...>` tags of `text`, in order: (name, the arguments after it, the tag as written)."""
    return [
        (tag.args[0].strip(), tag.args[1:], f"<{tag.kind}:{':'.join(tag.args)}>")
        for tag in split_extra_networks(text or "")[1]
        if tag.kind == kind
    ]


def parse_prompt_attention(text: str) -> list[list]:
    """Split A1111 prompt text into [text, weight] runs, as A1111's function of the same name does.

    >>> parse_prompt_attention("an (important) word")
    [['an ', 1.0], ['important', 1.1], [' word', 1.0]]

    ``BREAK`` as its own uppercase word gives a ["BREAK", -1.0] entry. Runs with equal weights are merged.
    An empty prompt gives [["", 1.0]].

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
        return [["", 1.0]]

    merged: list[list] = [runs[0]]
    for run in runs[1:]:
        previous = merged[-1]
        if not run[2] and not previous[2] and run[1] == previous[1]:
            previous[0] += run[0]
        else:
            merged.append(run)
    return [[run[0], run[1]] for run in merged]


def _check_emphasis(emphasis: str) -> None:
    if emphasis not in EMPHASIS_MODES:
        raise ValueError(f"emphasis: got {emphasis!r}; allowed: {', '.join(EMPHASIS_MODES)}")


def is_break(text: str, weight: float) -> bool:
    return text == "BREAK" and weight == BREAK_WEIGHT


def apply_emphasis(hidden: torch.Tensor, weights: list[list[float]], emphasis: str) -> torch.Tensor:
    """Token weights applied to encoder output (chunks, 77, hidden) as A1111's emphasis modes do.

    Original: multiply, then scale each chunk so its mean is what it was; No norm: multiply only;
    Ignore: unchanged. Weighting happens in float32 like A1111 (its multipliers promote fp16 states).
    """
    if emphasis == "Ignore":
        return hidden
    hidden = hidden.float()
    multipliers = torch.tensor(weights, dtype=torch.float32, device=hidden.device).unsqueeze(-1)
    original_mean = hidden.mean(dim=(1, 2), keepdim=True)
    weighted = hidden * multipliers
    if emphasis == "No norm":
        return weighted
    new_mean = weighted.mean(dim=(1, 2), keepdim=True)
    # A zero mean after weighting would divide by zero: keep that chunk unscaled.
    scale = torch.where(new_mean != 0, original_mean / new_mean, torch.ones_like(new_mean))
    return weighted * scale


@dataclass
class PromptChunk:
    """Up to CHUNK_LENGTH prompt token ids and their weights, without BOS/EOS/padding."""

    tokens: list[int]
    weights: list[float]


def split_into_chunks(
    parsed: list[list],
    token_ids: list[list[int]],
    comma_id: int | None,
    backtrack: int = COMMA_PADDING_BACKTRACK,
    embedding_group: Callable[[int], list[int] | None] | None = None,
) -> list[PromptChunk]:
    """Cut a parsed prompt (with the token ids of each run) into chunks the way A1111's tokenize_line does.

    Always returns at least one chunk. A chunk holds at most CHUNK_LENGTH tokens. When a chunk is full and the
    next token is not a comma, the tokens after the chunk's last comma move to the next chunk if that comma is
    within `backtrack` tokens of the end, so a phrase is not cut in two. BREAK closes the current chunk.
    `embedding_group(token)` gives a textual inversion embedding's tokens (one per vector) for its first
    token: they go in as one piece, starting a new chunk when they would not fit in the current one.
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
            group = embedding_group(token) if embedding_group is not None else None
            if group is not None and len(current.tokens) + len(group) > CHUNK_LENGTH:
                close_current()
            for piece in group or [token]:
                current.tokens.append(piece)
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
        # Textual inversion embeddings loaded into this tokenizer (engine/embeddings.py).
        self.embedding_tokens = EmbeddingTokens(tokenizer)

    # --- tokenizing -------------------------------------------------------------------------------------------

    def _chunks(self, text: str) -> list[PromptChunk]:
        """Chunks of text whose extra-network tags are already removed."""
        parsed = parse_prompt_attention(text)
        token_ids = self.tokenizer(
            [piece for piece, _weight in parsed], add_special_tokens=False, truncation=False, verbose=False
        )["input_ids"]
        return split_into_chunks(parsed, token_ids, self.comma_id, embedding_group=self.embedding_tokens.group)

    def token_counts(self, prompt: str, composable: bool = False) -> list[int]:
        """Prompt tokens in each 75-token chunk, e.g. "" -> [0]; 80 tokens without commas -> [75, 5].

        With prompt editing, the counts of the longest text the prompt turns into at some step; with
        `composable` (a prompt, not a negative prompt), of the longest of its AND parts, as A1111 counts."""
        plain = split_extra_networks(prompt)[0]
        parts = [text for text, _weight in composable_parts(plain)] if composable else [plain]
        texts = [text for part in parts for _end, text in prompt_schedule(part, SCHEDULE_PREVIEW_STEPS)]
        counts = [[len(chunk.tokens) for chunk in self._chunks(text)] for text in texts]
        return max(counts, key=lambda per_chunk: (len(per_chunk), sum(per_chunk)))

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

    def _run_text_encoder(self, chunks: list[PromptChunk], clip_skip: int, emphasis: str) -> torch.Tensor:
        """Encode chunks (in one batch) and apply their weights; returns (len(chunks), 77, hidden)."""
        rows = [self._chunk_ids_and_weights(chunk) for chunk in chunks]
        device = self.text_encoder.device
        input_ids = torch.tensor([ids for ids, _ in rows], dtype=torch.long, device=device)
        output = self.text_encoder(input_ids=input_ids, output_hidden_states=clip_skip > 1)
        if clip_skip > 1:
            hidden = self._final_layer_norm(output.hidden_states[-clip_skip])
        else:
            hidden = output.last_hidden_state

        return apply_emphasis(hidden, [w for _, w in rows], emphasis).to(self.text_encoder.dtype)

    def _encode_prompts(self, prompts: list[str], clip_skip: int, emphasis: str) -> list[torch.Tensor]:
        """(1, 77*k, hidden) per prompt, from the cache where possible; the rest in one text-encoder call."""
        device, dtype = self.text_encoder.device, self.text_encoder.dtype
        keys = [(split_extra_networks(p)[0], clip_skip, emphasis, str(device), dtype) for p in prompts]
        missing = list(dict.fromkeys(key for key in keys if key not in self._cache))
        if missing:
            chunk_lists = [self._chunks(key[0]) for key in missing]
            with torch.no_grad():
                encoded = self._run_text_encoder([c for chunks in chunk_lists for c in chunks], clip_skip, emphasis)
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

    def encode(
        self, prompt: str, negative_prompt: str = "", clip_skip: int = 1, emphasis: str = DEFAULT_EMPHASIS
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (prompt_embeds, negative_prompt_embeds), each (1, 77*k, hidden) with the same k.

        The shorter one is padded with encodings of the empty prompt. The tensors are on the text encoder's
        device and dtype, and new objects each call (changing them does not change the cache).

        clip_skip 1 is the last layer, 2 the penultimate one, ... up to the encoder's layer count (ValueError
        outside that). Note that diffusers' own ``clip_skip`` argument counts one lower; do not pass both.
        A1111 ignores Clip skip for SD2's OpenCLIP encoder; here it applies to every model.
        """
        (positive,), (negative,) = self.encode_many([prompt], [negative_prompt], clip_skip, emphasis)
        return positive, negative

    def encode_many(
        self,
        prompts: list[str],
        negative_prompts: list[str],
        clip_skip: int = 1,
        emphasis: str = DEFAULT_EMPHASIS,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Encodings of several prompts and negative prompts (the entries of prompt-editing schedules), all
        padded to the same number of chunks so that any positive can be paired with any negative."""
        clip_skip = self._check_clip_skip(clip_skip)
        _check_emphasis(emphasis)
        with self._lock:
            encoded = self._encode_prompts([*prompts, *negative_prompts, ""], clip_skip, emphasis)
            empty = encoded.pop()
            length = max(embeds.shape[1] for embeds in encoded)
            padded = [self._pad_to(embeds, length, empty) for embeds in encoded]
            return padded[: len(prompts)], padded[len(prompts) :]

    def padding(self, clip_skip: int = 1, emphasis: str = DEFAULT_EMPHASIS) -> torch.Tensor:
        """The chunk encode_many pads with: the empty prompt's encoding (1, 77, hidden)."""
        clip_skip = self._check_clip_skip(clip_skip)
        with self._lock:
            return self._encode_prompts([""], clip_skip, emphasis)[0].clone()

    @staticmethod
    def _pad_to(embeds: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
        missing_chunks = (length - embeds.shape[1]) // empty.shape[1]
        return torch.cat([embeds, empty.repeat(1, missing_chunks, 1)], dim=1)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()


def encode_prompt_a1111(
    prompt: str, tokenizer, text_encoder, clip_skip: int = 1, emphasis: str = DEFAULT_EMPHASIS
) -> torch.Tensor:
    """A1111's conditioning for one prompt: a tensor [1, 77*k, hidden] for k 75-token chunks.

    Attention weights, BREAK, comma back-tracking, clip skip and the emphasis mode as A1111 applies
    them. No cache: for repeated use keep a PromptEncoder.
    """
    encoder = PromptEncoder(tokenizer, text_encoder, cache_size=0)
    (embeds,), _ = encoder.encode_many([prompt], [], clip_skip, emphasis)
    return embeds


@dataclass
class Conditioning:
    """What one job conditions on: schedules of (end_step, embeddings) for the prompt and the negative
    prompt (SDXLEmbeds for SDXL).

    End steps count `steps` sampling steps, 0-based, as `prompt_schedule` makes them; without prompt
    editing each schedule has one entry.
    """

    positive: list[tuple[int, object]]
    negative: list[tuple[int, object]]
    steps: int
    # A1111's composable diffusion ("a AND b :0.5"): each part's schedule and its weight; empty for a plain
    # prompt. `positive` then holds the first part's schedule, which keeps the pipeline's shapes.
    parts: list[tuple[list[tuple[int, object]], float]] = field(default_factory=list)
    # The chunk the encodings are padded with to one length (the empty prompt's token states, (1, 77, hidden)),
    # by which the UNet's stand-in finds each one's own length (engine/pad_conds.py); None with compel's syntax.
    padding: torch.Tensor | None = None

    @property
    def scheduled(self) -> bool:
        return any(len(schedule) > 1 for schedule in (self.positive, self.negative, *(s for s, _ in self.parts)))

    def at(self, step_index: int) -> tuple[object, object]:
        return text_for_step(self.positive, step_index), text_for_step(self.negative, step_index)

    def parts_at(self, step_index: int) -> list[tuple[object, float]]:
        """Each composable part's embeddings at a step, with its weight."""
        return [(text_for_step(schedule, step_index), weight) for schedule, weight in self.parts]


class CompelEncoder:
    """compel's syntax (word+, word-, (words)1.3, .blend(), .and()) for SD 1.x/2.x, long prompts not
    truncated and both sides padded to the same length; encodings cached per instance like PromptEncoder."""

    def __init__(self, tokenizer, text_encoder, *, cache_size: int = DEFAULT_CACHE_SIZE):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._compel: dict[int, object] = {}
        self._lock = threading.RLock()

    def _compel_for(self, clip_skip: int):
        from compel import Compel, ReturnedEmbeddingsType

        if clip_skip not in (1, 2):
            raise ValueError(f"clip_skip: got {clip_skip!r}; allowed: 1 or 2 with the compel syntax")
        if clip_skip not in self._compel:
            returned = (
                ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED
                if clip_skip == 1
                else ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NORMALIZED
            )
            self._compel[clip_skip] = Compel(
                tokenizer=self.tokenizer,
                text_encoder=self.text_encoder,
                truncate_long_prompts=False,
                returned_embeddings_type=returned,
                device=str(self.text_encoder.device),
                textual_inversion_manager=EmbeddingTokens(self.tokenizer),
            )
        return self._compel[clip_skip]

    def _encode(self, text: str, clip_skip: int) -> torch.Tensor:
        key = (text, clip_skip, str(self.text_encoder.device), self.text_encoder.dtype)
        if key not in self._cache:
            with torch.no_grad():
                self._cache[key] = self._compel_for(clip_skip)(text)
        self._cache.move_to_end(key)
        embeds = self._cache[key]
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return embeds

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def encode(self, prompt: str, negative_prompt: str = "", clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            positive = self._encode(prompt, clip_skip)
            negative = self._encode(negative_prompt, clip_skip)
            positive, negative = self._compel_for(clip_skip).pad_conditioning_tensors_to_same_length(
                [positive, negative]
            )
            return positive.clone(), negative.clone()


class SDXLEmbeds(NamedTuple):
    """SDXL conditioning: per-token states of both encoders side by side, and encoder 2's pooled output."""

    embeds: torch.Tensor  # (1, 77*k, hidden_1 + hidden_2)
    pooled: torch.Tensor  # (1, projection_dim of encoder 2)


def guidance_rows(conditioning: tuple, images: int, cfg: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (positive, negative) conditioning in the layout a pipeline's denoising loop holds it: one row per image,
    the negatives' rows first when the pipeline runs CFG; (states, SDXL's pooled output or None)."""
    positive, negative = conditioning

    def rows(positive_rows: torch.Tensor, negative_rows: torch.Tensor) -> torch.Tensor:
        repeated = positive_rows.repeat(images, *([1] * (positive_rows.dim() - 1)))
        if not cfg:
            return repeated
        return torch.cat([negative_rows.repeat(images, *([1] * (negative_rows.dim() - 1))), repeated])

    if isinstance(positive, SDXLEmbeds):
        return rows(positive.embeds, negative.embeds), rows(positive.pooled, negative.pooled)
    return rows(positive, negative), None


def _zeroed(value: SDXLEmbeds) -> SDXLEmbeds:
    return SDXLEmbeds(torch.zeros_like(value.embeds), torch.zeros_like(value.pooled))


class SDXLPromptEncoder:
    """The A1111 syntax for SDXL's two text encoders, as A1111 conditions SDXL:

    - each encoder reads the prompt on its own (same chunking, BREAK, comma back-tracking, weights and
      emphasis per encoder); encoder 1 pads with EOS, encoder 2 with its pad token after the first EOS;
    - both use the penultimate hidden state without the final layer norm, concatenated per token;
    - the pooled embedding is encoder 2's projected output for the first chunk, before any weighting;
    - an empty negative prompt is all zeros (A1111's force_zero_negative_prompt, diffusers'
      force_zeros_for_empty_prompt);
    - "Clip skip" is not applied, like A1111's default for SDXL (SDXL already uses the penultimate layer).

    Same interface as PromptEncoder; values are SDXLEmbeds.
    """

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, *, cache_size: int = DEFAULT_CACHE_SIZE):
        self.parts = [PromptEncoder(tokenizer, text_encoder, cache_size=0), PromptEncoder(tokenizer_2, text_encoder_2)]
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, SDXLEmbeds] = OrderedDict()
        self._lock = threading.RLock()

    def token_counts(self, prompt: str, composable: bool = False) -> list[int]:
        return self.parts[0].token_counts(prompt, composable)

    def _chunks(self, text: str) -> list[PromptChunk]:
        return self.parts[0]._chunks(text)

    def _run_part(self, part: PromptEncoder, text: str, emphasis: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = [part._chunk_ids_and_weights(chunk) for chunk in part._chunks(text)]
        encoder = part.text_encoder
        input_ids = torch.tensor([ids for ids, _ in rows], dtype=torch.long, device=encoder.device)
        output = encoder(input_ids=input_ids, output_hidden_states=True)
        hidden = apply_emphasis(output.hidden_states[-2], [w for _, w in rows], emphasis).to(encoder.dtype)
        pooled = getattr(output, "text_embeds", None)
        return hidden, None if pooled is None else pooled[:1]

    def _encode(self, text: str, emphasis: str) -> SDXLEmbeds:
        key = (text, emphasis, str(self.text_encoder.device), self.text_encoder.dtype)
        if key not in self._cache:
            with torch.no_grad():
                (first, _), (second, pooled) = (self._run_part(part, text, emphasis) for part in self.parts)
            chunks = max(first.shape[0], second.shape[0])
            # Tokenizers with different vocabularies could chunk differently: repeat the last chunk's layout
            # with the empty prompt so the two can sit side by side.
            first, second = (
                self._pad_chunks(part, hidden, chunks, emphasis)
                for part, hidden in zip(self.parts, (first, second), strict=True)
            )
            embeds = torch.cat([first, second], dim=-1).reshape(1, -1, first.shape[-1] + second.shape[-1])
            self._cache[key] = SDXLEmbeds(embeds, pooled)
        self._cache.move_to_end(key)
        value = self._cache[key]
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return value

    def _pad_chunks(self, part: PromptEncoder, hidden: torch.Tensor, chunks: int, emphasis: str) -> torch.Tensor:
        if hidden.shape[0] == chunks:
            return hidden
        empty, _ = self._run_part(part, "", emphasis)
        return torch.cat([hidden, empty.repeat(chunks - hidden.shape[0], 1, 1)])

    def encode(
        self, prompt: str, negative_prompt: str = "", clip_skip: int = 1, emphasis: str = DEFAULT_EMPHASIS
    ) -> tuple[SDXLEmbeds, SDXLEmbeds]:
        (positive,), (negative,) = self.encode_many([prompt], [negative_prompt], clip_skip, emphasis)
        return positive, negative

    def encode_many(
        self,
        prompts: list[str],
        negative_prompts: list[str],
        clip_skip: int = 1,
        emphasis: str = DEFAULT_EMPHASIS,
    ) -> tuple[list[SDXLEmbeds], list[SDXLEmbeds]]:
        """Like PromptEncoder.encode_many; clip_skip is checked but, as in A1111 for SDXL, not applied."""
        self.parts[0]._check_clip_skip(clip_skip)
        _check_emphasis(emphasis)
        with self._lock:
            texts = [split_extra_networks(text)[0] for text in [*prompts, *negative_prompts, ""]]
            encoded = [self._encode(text, emphasis) for text in texts]
            empty = encoded.pop()
            # A1111 zeroes the negative when its text (extra-network tags removed) is exactly empty; padding
            # to the positive's length then appends the empty prompt's (non-zero) encoding, as its
            # pad_cond_uncond does.
            if all(not text for text in texts[len(prompts) : -1]):
                encoded[len(prompts) :] = [_zeroed(value) for value in encoded[len(prompts) :]]
            length = max(value.embeds.shape[1] for value in encoded)
            padded = [
                SDXLEmbeds(PromptEncoder._pad_to(value.embeds, length, empty.embeds), value.pooled.clone())
                for value in encoded
            ]
            return padded[: len(prompts)], padded[len(prompts) :]

    def padding(self, clip_skip: int = 1, emphasis: str = DEFAULT_EMPHASIS) -> torch.Tensor:
        """The chunk encode_many pads with: the empty prompt's token states (1, 77, hidden)."""
        with self._lock:
            return self._encode("", emphasis).embeds.clone()

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()


class SDXLCompelEncoder:
    """compel's syntax for SDXL: both encoders' penultimate states (not normalized) and encoder 2's pooled
    output, long prompts not truncated, both sides padded to the same length; an empty negative is zeros."""

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, *, cache_size: int = DEFAULT_CACHE_SIZE):
        self.tokenizers = [tokenizer, tokenizer_2]
        self.text_encoders = [text_encoder, text_encoder_2]
        self.text_encoder = text_encoder
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, SDXLEmbeds] = OrderedDict()
        self._compel = None
        self._lock = threading.RLock()

    def _compel_instances(self):
        # Two single-encoder Compel objects, as compel's own CompelForSDXL does: compel 2.5's multi-encoder
        # Compel fails on .blend() and .and().
        if self._compel is None:
            from compel import Compel, ReturnedEmbeddingsType

            self._compel = [
                Compel(
                    tokenizer=tokenizer,
                    text_encoder=text_encoder,
                    returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                    requires_pooled=index == 1,
                    truncate_long_prompts=False,
                    device=str(text_encoder.device),
                    textual_inversion_manager=EmbeddingTokens(tokenizer),
                )
                for index, (tokenizer, text_encoder) in enumerate(zip(self.tokenizers, self.text_encoders, strict=True))
            ]
        return self._compel

    def _encode(self, text: str) -> SDXLEmbeds:
        key = (text, str(self.text_encoder.device), self.text_encoder.dtype)
        if key not in self._cache:
            compel_1, compel_2 = self._compel_instances()
            with torch.no_grad():
                left = compel_1(text)
                right, pooled = compel_2(text)
                # The two encoders may read a blend or conjunction to different lengths: pad the shorter one
                # with its own encoding of the empty prompt.
                if left.shape[1] != right.shape[1]:
                    length = max(left.shape[1], right.shape[1])
                    left = _pad_with(left, length, compel_1(""))
                    right = _pad_with(right, length, compel_2("")[0])
            self._cache[key] = SDXLEmbeds(torch.cat([left, right], dim=-1), pooled)
        self._cache.move_to_end(key)
        value = self._cache[key]
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return value

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def encode(self, prompt: str, negative_prompt: str = "", clip_skip: int = 1) -> tuple[SDXLEmbeds, SDXLEmbeds]:
        """clip_skip is accepted for the same interface and not applied (SDXL uses the penultimate layer)."""
        with self._lock:
            positive, negative = self._encode(prompt), self._encode(negative_prompt)
            if not negative_prompt:
                negative = _zeroed(negative)  # zeros first, then padding, as for the A1111 syntax
            empty = self._encode("").embeds
            length = max(positive.embeds.shape[1], negative.embeds.shape[1])
            positive = SDXLEmbeds(_pad_with(positive.embeds, length, empty), positive.pooled.clone())
            negative = SDXLEmbeds(_pad_with(negative.embeds, length, empty), negative.pooled.clone())
            return positive, negative


def _pad_with(embeds: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    """`embeds` (1, n, hidden) lengthened to `length` tokens with copies of the empty prompt's encoding, as compel's
    pad_conditioning_tensors_to_same_length does for untruncated prompts."""
    missing = length - embeds.shape[1]
    if missing <= 0:
        return embeds.clone()
    copies = -(-missing // empty.shape[1])
    return torch.cat([embeds, empty.repeat(1, copies, 1)[:, :missing]], dim=1)


def make_prompt_encoders(components: dict) -> tuple[object, object]:
    """(A1111-syntax encoder, compel encoder) for a pipeline's components: SDXL when it has text_encoder_2."""
    if components.get("text_encoder_2") is not None and components.get("tokenizer_2") is not None:
        parts = (
            components["tokenizer"],
            components["text_encoder"],
            components["tokenizer_2"],
            components["text_encoder_2"],
        )
        return SDXLPromptEncoder(*parts), SDXLCompelEncoder(*parts)
    return (
        PromptEncoder(components["tokenizer"], components["text_encoder"]),
        CompelEncoder(components["tokenizer"], components["text_encoder"]),
    )


@dataclass
class PromptReading:
    """How a prompt is read during steps first..last (0-based): its text there, the weighted fragments,
    and the tokens in each 75-token chunk. One reading per prompt-editing schedule entry."""

    first_step: int
    last_step: int
    text: str
    fragments: list[list]
    token_counts: list[int]


def describe_prompt(prompt: str, steps: int, encoder: PromptEncoder | None = None) -> list[PromptReading]:
    """What the A1111 syntax makes of `prompt` over `steps` steps, for showing it to the user."""
    readings = []
    first = 0
    for end_step, text in prompt_schedule(prompt, steps):
        plain, _tags = split_extra_networks(text)
        counts = [len(chunk.tokens) for chunk in encoder._chunks(plain)] if encoder is not None else []
        last = min(end_step, steps - 1)
        readings.append(PromptReading(first, last, text, parse_prompt_attention(plain), counts))
        first = last + 1
    return readings
