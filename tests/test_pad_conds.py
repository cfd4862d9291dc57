"""A prompt and a negative prompt of different chunk counts: the UNet asked at each one's own length, as A1111 asks it
by default, or at one length with its "Pad conds"; composable parts stacked as A1111 stacks them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engine import GenerationRequest
from engine.infotext import parse_infotext
from engine.pad_conds import CHUNK_TOKENS, NaturalLengthUNet, own_chunks, stacked_parts
from tests.test_hires_checkpoint import pair_engine  # noqa: F401 - a fixture

HIDDEN = 8
PADDING = torch.linspace(-1, 1, CHUNK_TOKENS * HIDDEN).reshape(CHUNK_TOKENS, HIDDEN)


def chunk(value: float) -> torch.Tensor:
    return torch.full((CHUNK_TOKENS, HIDDEN), value)


def test_a_rows_own_chunks_are_all_but_the_trailing_padding():
    assert own_chunks(torch.cat([chunk(1), PADDING, PADDING]), PADDING) == 1
    assert own_chunks(torch.cat([chunk(1), chunk(2), PADDING]), PADDING) == 2
    assert own_chunks(torch.cat([chunk(1), PADDING, chunk(2)]), PADDING) == 3  # only at the end
    assert own_chunks(torch.cat([PADDING, PADDING]), PADDING) == 1  # the empty prompt: one chunk, its own


class RecordingUNet(torch.nn.Module):
    """Answers each row with its token count, its first state and its timestep, and records each call's shapes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=True, added_cond_kwargs=None):
        self.calls.append((sample.shape[0], encoder_hidden_states.shape[1], added_cond_kwargs["time_ids"].shape[0]))
        rows = sample.shape[0]
        answer = torch.stack(
            [
                torch.full((rows,), float(encoder_hidden_states.shape[1])),
                encoder_hidden_states[:, 0, 0],
                timestep.float() if timestep.dim() else timestep.float().expand(rows),
                added_cond_kwargs["time_ids"][:, 0],
            ],
            dim=1,
        )
        return (answer.reshape(rows, 4, 1, 1) + sample * 0,)


def call(unet, states: torch.Tensor):
    rows = states.shape[0]
    sample = torch.zeros(rows, 4, 1, 1)
    timestep = torch.arange(rows) + 10
    time_ids = torch.arange(rows, dtype=torch.float32)[:, None].repeat(1, 6)
    answer = unet(sample, timestep, states, return_dict=False, added_cond_kwargs={"time_ids": time_ids})[0]
    return answer.reshape(rows, 4)


def test_rows_of_different_lengths_are_asked_apart_each_at_its_own_length():
    inner = RecordingUNet()
    # Two images: negative rows (one chunk, padded), then prompt rows (two chunks).
    negative = torch.cat([chunk(1), PADDING])
    prompt = torch.cat([chunk(2), chunk(3)])
    states = torch.stack([negative, negative, prompt, prompt])
    out = call(NaturalLengthUNet(inner, PADDING), states)
    assert inner.calls == [(2, CHUNK_TOKENS, 2), (2, 2 * CHUNK_TOKENS, 2)]
    # Each row's answer is back in its place, from its own rows of every batched input.
    assert out[:, 0].tolist() == [77, 77, 154, 154]
    assert out[:, 1].tolist() == [1, 1, 2, 2]
    assert out[:, 2].tolist() == [10, 11, 12, 13] and out[:, 3].tolist() == [0, 1, 2, 3]
    # A1111's Pad conds: one call, at the longer length, the shorter padded.
    inner.calls.clear()
    out = call(NaturalLengthUNet(inner, PADDING, pad=True), states)
    assert inner.calls == [(4, 2 * CHUNK_TOKENS, 4)] and out[:, 0].tolist() == [154] * 4


def test_rows_padded_beyond_their_length_together_are_trimmed_and_full_rows_go_through_as_they_are():
    inner = RecordingUNet()
    # Both one chunk, padded to three (a prompt-editing entry elsewhere is longer): one call at 77.
    states = torch.stack([torch.cat([chunk(1), PADDING, PADDING]), torch.cat([chunk(2), PADDING, PADDING])])
    call(NaturalLengthUNet(inner, PADDING), states)
    assert inner.calls == [(2, CHUNK_TOKENS, 2)]
    inner.calls.clear()
    full = torch.stack([torch.cat([chunk(1), chunk(4)]), torch.cat([chunk(2), chunk(5)])])
    call(NaturalLengthUNet(inner, PADDING), full)
    assert inner.calls == [(2, 2 * CHUNK_TOKENS, 2)]


def test_composable_parts_are_stacked_by_repeating_their_last_state():
    # A1111's stack_conds: a shorter part lengthened with its last token state, to the longest part's length.
    short = torch.cat([chunk(1), PADDING, PADDING])[None]
    long = torch.cat([chunk(2), chunk(3), PADDING])[None]
    stacked_short, stacked_long = stacked_parts([short, long], PADDING)
    assert torch.equal(stacked_long, long)
    assert torch.equal(stacked_short[0, :CHUNK_TOKENS], chunk(1))
    assert torch.equal(stacked_short[0, CHUNK_TOKENS : 2 * CHUNK_TOKENS], chunk(1))  # its last state, repeated
    assert torch.equal(stacked_short[0, 2 * CHUNK_TOKENS :], PADDING)
    assert own_chunks(stacked_short[0], PADDING) == 2


LONG_PROMPT = "a red circle on a blue background, " + ", ".join(["simple"] * 50)  # two chunks


def rows_and_tokens(args, kwargs) -> tuple[int, int]:
    return args[0].shape[0], kwargs["encoder_hidden_states"].shape[1]


def unet_calls(engine, request: GenerationRequest, record=rows_and_tokens):
    """The job's result and `record(args, kwargs)` of each UNet call it made."""
    calls = []
    handle = engine.loaded.components["unet"].register_forward_pre_hook(
        lambda _m, args, kwargs: calls.append(record(args, kwargs)), with_kwargs=True
    )
    try:
        result = list(engine.generate(request))[-1]
    finally:
        handle.remove()
    return result, calls


def test_a_long_prompt_with_a_short_negative_is_asked_apart_unless_pad_conds_is_on(micro_engine):
    request = GenerationRequest(prompt=LONG_PROMPT, negative_prompt="green", steps=4, seed=3)
    apart, calls = unet_calls(micro_engine, request)
    assert calls == [(1, 77), (1, 154)] * 4
    assert "Pad conds" not in apart.infotexts[0]
    padded, calls = unet_calls(micro_engine, dataclasses.replace(request, pad_cond_uncond=True))
    assert calls == [(2, 154)] * 4
    assert "Pad conds: True" in padded.infotexts[0]
    assert not np.array_equal(np.asarray(apart.images[0]), np.asarray(padded.images[0]))
    again = parse_infotext(padded.infotexts[0])
    assert again.pad_cond_uncond
    assert np.array_equal(np.asarray(unet_calls(micro_engine, again)[0].images[0]), np.asarray(padded.images[0]))


@pytest.mark.parametrize("negative", ["green", ""])
def test_prompts_of_one_length_make_the_same_picture_either_way(micro_engine, negative):
    request = GenerationRequest(prompt="a red circle", negative_prompt=negative, steps=4, seed=3)
    plain, calls = unet_calls(micro_engine, request)
    assert calls == [(2, 77)] * 4
    padded, _ = unet_calls(micro_engine, dataclasses.replace(request, pad_cond_uncond=True))
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(padded.images[0]))
    # As A1111 writes it: only where it padded.
    assert "Pad conds" not in padded.infotexts[0]


def test_pad_conds_is_written_where_the_lengths_differ_at_some_step(micro_engine):
    request = GenerationRequest(prompt="a red circle", negative_prompt="green", steps=4, seed=3, pad_cond_uncond=True)
    # Long from the third step on (prompt editing): padded from there, so written.
    edited = dataclasses.replace(request, prompt=f"[a red circle:{LONG_PROMPT}:2]")
    assert "Pad conds: True" in unet_calls(micro_engine, edited)[0].infotexts[0]
    # Both long: one length, nothing padded, nothing written.
    both = dataclasses.replace(request, prompt=LONG_PROMPT, negative_prompt=LONG_PROMPT.replace("red", "green"))
    result, calls = unet_calls(micro_engine, both)
    assert calls == [(2, 154)] * 4 and "Pad conds" not in result.infotexts[0]


def test_composable_parts_and_ngms_keep_each_length(micro_engine):
    request = GenerationRequest(prompt="a red circle AND " + LONG_PROMPT, negative_prompt="green", steps=3, seed=3)
    _, calls = unet_calls(micro_engine, request)
    assert calls == [(1, 77), (2, 154)] * 3  # the negative alone; both parts, stacked to the longer one's length
    # NGMS leaves the negative out of every other call: the prompt's rows alone, at their length.
    _, calls = unet_calls(micro_engine, dataclasses.replace(request, prompt=LONG_PROMPT, s_min_uncond=15))
    assert calls == [(1, 77), (1, 154), (1, 154), (1, 77), (1, 154)]


def test_the_refiner_asks_at_each_length_too(pair_engine):  # noqa: F811 - the fixture imported above
    from engine import Engine

    # From the start the refiner draws what it draws alone, long prompt and short negative asked apart by both.
    request = GenerationRequest(prompt=LONG_PROMPT, negative_prompt="green", steps=4, seed=3)
    alone = Engine(model="micro-purple", models_dir=pair_engine.models_dir)
    refined = dataclasses.replace(request, refiner_checkpoint="micro-purple", refiner_switch_at=0.0)
    for pad in (False, True):
        expected = list(alone.generate(dataclasses.replace(request, pad_cond_uncond=pad)))[-1].images[0]
        made = list(pair_engine.generate(dataclasses.replace(refined, pad_cond_uncond=pad)))[-1].images[0]
        assert np.array_equal(np.asarray(made), np.asarray(expected)), pad


def test_sdxl_rows_carry_their_own_pooled_output_and_time_ids(engine):
    from tests.test_prompts_sdxl import TinySDXLModel, _sample, build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline()
    model = TinySDXLModel(pipe)
    calls = []

    def record(_module, args, kwargs):
        added = kwargs["added_cond_kwargs"]
        calls.append((args[0].shape[0], kwargs["encoder_hidden_states"].shape[1], added["text_embeds"].shape[0]))

    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for pad in (False, True):
            request = GenerationRequest(
                prompt=LONG_PROMPT, negative_prompt="blurry", steps=2, width=64, height=64, pad_cond_uncond=pad
            )
            outcome = _sample(model, request, engine._encode_prompts(model, request), seed=2)
            assert outcome.images[0].size == (64, 64)
    finally:
        handle.remove()
    assert calls == [(1, 77, 1), (1, 154, 1)] * 2 + [(2, 154, 2)] * 2
