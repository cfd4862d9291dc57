"""A1111 prompt syntax: parsing, 75-token chunking, weighting, caching, and use in a diffusers pipeline."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from engine.prompts import (
    ExtraNetworkTag,
    PromptEncoder,
    parse_prompt_attention,
    split_extra_networks,
)

BOS, EOS, COMMA = 49406, 49407, 267


@pytest.fixture(scope="module")
def pipe():
    from engine.tiny_model import build_tiny_pipeline

    pipeline = build_tiny_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def encoder(pipe):
    """A fresh encoder per test, so cache state never leaks between tests."""
    return PromptEncoder(pipe.tokenizer, pipe.text_encoder)


class CallCounter:
    """Counts forward calls of a module while installed."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.input_ids: list[torch.Tensor] = []
        self._handle = module.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, _module, args, kwargs):
        self.calls += 1
        self.input_ids.append(kwargs["input_ids"] if "input_ids" in kwargs else args[0])

    def remove(self):
        self._handle.remove()


@pytest.fixture
def encoder_calls(pipe):
    counter = CallCounter(pipe.text_encoder)
    yield counter
    counter.remove()


def raw_chunk_ids(pipe, text: str) -> torch.Tensor:
    """What diffusers itself feeds CLIP for a short prompt: BOS, tokens, EOS, padded to 77 with EOS (SD1)."""
    return pipe.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids


def raw_hidden(pipe, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return pipe.text_encoder(input_ids=input_ids).last_hidden_state


# --- parsing --------------------------------------------------------------------------------------------------

# Input/expected pairs from the docstring of A1111's modules/prompt_parser.py parse_prompt_attention.
A1111_EXAMPLES = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ["a ", 1.0],
            ["house", 1.5730000000000004],
            [" ", 1.1],
            ["on", 1.0],
            [" a ", 1.1],
            ["hill", 0.55],
            [", sun, ", 1.1],
            ["sky", 1.4641000000000006],
            [".", 1.1],
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), A1111_EXAMPLES)
def test_parse_matches_a1111_docstring_examples(text, expected):
    assert parse_prompt_attention(text) == expected


def weights_of(text: str) -> list[list]:
    return [[piece, pytest.approx(weight)] for piece, weight in parse_prompt_attention(text)]


def test_parse_brackets_multiply_and_nest():
    assert parse_prompt_attention("(cat:1.5)") == [["cat", 1.5]]
    assert parse_prompt_attention("(cat: 0.5)") == [["cat: 0.5", 1.1]]  # A1111 wants the number right after ":"
    assert weights_of("((cat))") == [["cat", 1.21]]
    assert weights_of("[[cat]]") == [["cat", 1 / 1.21]]
    assert weights_of("((cat:2))") == [["cat", 2.2]]
    assert weights_of("a ([cat] dog)") == [["a cat", 1.0], [" dog", 1.1]]  # 1.1 * (1 / 1.1) == 1.0: merged
    assert weights_of("(cat:-1)") == [["cat", -1.0]]


def test_parse_escapes_give_literal_characters():
    assert parse_prompt_attention(r"\(a\) \[b\] c\\d") == [["(a) [b] c\\d", 1.0]]
    # A backslash before anything else is dropped, as in A1111.
    assert parse_prompt_attention("a\\b") == [["ab", 1.0]]


def test_parse_unbalanced_brackets_like_a1111():
    assert parse_prompt_attention("a) b] c") == [["a) b] c", 1.0]]
    assert weights_of("a [b") == [["a ", 1.0], ["b", 1 / 1.1]]
    assert weights_of("a ((b) c") == [["a ", 1.0], ["b", 1.21], [" c", 1.1]]
    assert parse_prompt_attention("x:1.5) y") == [["x:1.5) y", 1.0]]


def test_parse_break_marker():
    assert parse_prompt_attention("a cat BREAK a dog") == [["a cat", 1.0], ["BREAK", -1.0], ["a dog", 1.0]]
    assert parse_prompt_attention("a\nBREAK\nb") == [["a", 1.0], ["BREAK", -1.0], ["b", 1.0]]
    # Only the uppercase word on its own is a break.
    assert parse_prompt_attention("a break b") == [["a break b", 1.0]]
    assert parse_prompt_attention("BREAKING news") == [["BREAKING news", 1.0]]
    # Inside brackets the break stays a break (A1111 would encode the word with weight -1.1 here).
    assert weights_of("(a BREAK b)") == [["a", 1.1], ["BREAK", -1.0], ["b", 1.1]]


def test_parse_merges_equal_weights_and_handles_empty():
    assert parse_prompt_attention("(a)(b) c") == [["ab", 1.1], [" c", 1.0]]
    assert parse_prompt_attention("") == [["", 1.0]]
    assert parse_prompt_attention("()") == [["", 1.0]]


def test_split_extra_networks_removes_tags():
    text, tags = split_extra_networks("<lora:film grain:0.8>a cat, <hypernet:x:1>night")
    assert text == "a cat, night"
    assert tags == [ExtraNetworkTag("lora", ["film grain", "0.8"]), ExtraNetworkTag("hypernet", ["x", "1"])]
    assert split_extra_networks("a <b> c") == ("a <b> c", [])


# --- chunking -------------------------------------------------------------------------------------------------


def test_token_counts(encoder):
    assert encoder.token_counts("") == [0]
    assert encoder.token_counts("cat") == [1]
    assert encoder.token_counts("cat " * 75) == [75]
    assert encoder.token_counts("cat " * 76) == [75, 1]
    assert encoder.token_counts("cat " * 80) == [75, 5]
    assert encoder.token_counts("cat " * 160) == [75, 75, 10]
    # Brackets and weights are syntax, not tokens.
    assert encoder.token_counts("(cat:1.3) [dog]") == encoder.token_counts("cat dog") == [2]
    # Extra-network tags are removed, not tokenized.
    assert encoder.token_counts("<lora:some_style:0.7> cat") == [1]


def test_comma_backtrack_moves_the_last_phrase_to_the_next_chunk(encoder):
    # The comma is token 61; when the chunk fills, the 14 tokens after it (within 20 of the end) move on.
    assert encoder.token_counts("cat " * 60 + ", " + "dog " * 30) == [61, 30]
    # A comma 25 tokens before the end is too far back: the chunk is cut at 75 tokens.
    assert encoder.token_counts("cat " * 50 + ", " + "dog " * 40) == [75, 16]


def test_break_starts_a_new_chunk(encoder):
    assert encoder.token_counts("a cat BREAK a dog") == [2, 2]
    assert encoder.token_counts("a cat BREAK") == [2]
    assert encoder.token_counts("cat " * 75 + "BREAK dog") == [75, 1]
    assert encoder.token_counts("cat BREAK BREAK dog") == [1, 0, 1]


def test_chunk_tokens_are_bos_prompt_eos_and_eos_padding(encoder, encoder_calls):
    encoder.encode("a red fox", "")
    ids = encoder_calls.input_ids[0]
    fox_ids = encoder.tokenizer("a red fox", add_special_tokens=False)["input_ids"]
    assert ids.shape == (2, 77)  # the prompt and the empty prompt, in one batch
    assert ids[0].tolist() == [BOS, *fox_ids, EOS] + [EOS] * (77 - 2 - len(fox_ids))
    assert ids[1].tolist() == [BOS] + [EOS] * 76


def test_sd2_style_tokenizer_pads_after_the_first_eos_with_its_pad_token(pipe, encoder_calls):
    from transformers import CLIPTokenizer

    from engine.presets import TOKENIZER_DIR

    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!")  # SD2's tokenizer pads with "!" = 0
    PromptEncoder(tokenizer, pipe.text_encoder).encode("cat", "")
    assert encoder_calls.input_ids[0][0].tolist() == [BOS, 2368, EOS] + [0] * 74


def test_long_prompt_gives_several_chunks_and_negative_is_padded_to_match(encoder):
    cond, uncond = encoder.encode("cat " * 80, "blurry")
    assert cond.shape == uncond.shape == (1, 154, 32)
    empty, _ = encoder.encode("", "")
    short_negative, _ = encoder.encode("blurry", "")
    torch.testing.assert_close(uncond[:, :77], short_negative)
    torch.testing.assert_close(uncond[:, 77:], empty)

    cond, uncond = encoder.encode("cat", "blurry, " * 60)
    assert cond.shape == uncond.shape == (1, 154, 32)
    torch.testing.assert_close(cond[:, 77:], empty)


def test_break_chunks_are_encoded_separately(encoder):
    cond, _ = encoder.encode("a cat BREAK a dog", "")
    assert cond.shape == (1, 154, 32)
    torch.testing.assert_close(cond[:, :77], encoder.encode("a cat", "")[0])
    torch.testing.assert_close(cond[:, 77:], encoder.encode("a dog", "")[0])


# --- weighting ------------------------------------------------------------------------------------------------


def test_unweighted_prompt_equals_plain_clip_encoding(pipe, encoder):
    cond, uncond = encoder.encode("a photo of a cat", "ugly")
    torch.testing.assert_close(cond, raw_hidden(pipe, raw_chunk_ids(pipe, "a photo of a cat")))
    torch.testing.assert_close(uncond, raw_hidden(pipe, raw_chunk_ids(pipe, "ugly")))


def test_weight_one_everywhere_equals_the_unweighted_encoding(encoder):
    plain, _ = encoder.encode("a photo of a cat", "")
    weighted, _ = encoder.encode("(a photo of a cat:1.0)", "")
    assert torch.equal(plain, weighted)


def test_emphasis_changes_the_embedding(encoder):
    plain, _ = encoder.encode("a cat", "")
    emphasized, _ = encoder.encode("a (cat:1.5)", "")
    assert not torch.allclose(plain, emphasized)
    assert not torch.allclose(encoder.encode("a [cat]", "")[0], plain)


def test_weighting_scales_tokens_and_restores_the_chunk_mean(pipe, encoder):
    raw = raw_hidden(pipe, raw_chunk_ids(pipe, "a cat"))
    weighted, _ = encoder.encode("a (cat:1.5)", "")
    # Same mean as before weighting (A1111 "Original" emphasis).
    torch.testing.assert_close(weighted.mean(), raw.mean())
    # "cat" (position 2 after BOS and "a") is multiplied by 1.5, then the whole chunk by one factor.
    token_weights = torch.ones(1, 77, 1)
    token_weights[0, 2] = 1.5
    expected = raw * token_weights
    expected = expected * (raw.mean() / expected.mean())
    torch.testing.assert_close(weighted, expected)


def test_mean_is_restored_per_chunk(pipe, encoder):
    weighted, _ = encoder.encode("(cat:1.4) " * 75 + "[dog]", "")
    first = raw_hidden(pipe, torch.tensor([[BOS] + [2368] * 75 + [EOS]]))
    second = raw_hidden(pipe, raw_chunk_ids(pipe, "dog"))
    torch.testing.assert_close(weighted[:, :77].mean(), first.mean())
    torch.testing.assert_close(weighted[:, 77:].mean(), second.mean())


def test_clip_skip_uses_the_penultimate_layer_through_the_final_norm(pipe, encoder):
    ids = raw_chunk_ids(pipe, "a cat")
    with torch.no_grad():
        hidden_states = pipe.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states
        expected = pipe.text_encoder.final_layer_norm(hidden_states[-2])
    skipped, _ = encoder.encode("a cat", "", clip_skip=2)
    torch.testing.assert_close(skipped, expected)
    assert not torch.allclose(skipped, encoder.encode("a cat", "", clip_skip=1)[0])


@pytest.mark.parametrize("clip_skip", [0, -1, 5, 1.5])
def test_invalid_clip_skip_is_rejected(encoder, clip_skip):
    with pytest.raises(ValueError, match="clip_skip"):
        encoder.encode("a cat", "", clip_skip=clip_skip)


def test_extra_network_tags_do_not_change_the_encoding(encoder):
    torch.testing.assert_close(encoder.encode("<lora:style:0.8>a cat", "")[0], encoder.encode("a cat", "")[0])


def test_output_follows_the_text_encoders_dtype(pipe):
    text_encoder = copy.deepcopy(pipe.text_encoder).to(torch.bfloat16)
    cond, uncond = PromptEncoder(pipe.tokenizer, text_encoder).encode("a (cat:1.2)", "dog")
    assert cond.dtype == uncond.dtype == torch.bfloat16
    assert cond.device == text_encoder.device
    assert not cond.requires_grad


# --- cache ----------------------------------------------------------------------------------------------------


def test_repeated_prompt_is_served_from_the_cache(encoder, encoder_calls):
    first = encoder.encode("a (cat:1.2), " * 30, "blurry")
    assert encoder_calls.calls == 1  # prompt, negative and the empty padding prompt in one batch
    second = encoder.encode("a (cat:1.2), " * 30, "blurry")
    assert encoder_calls.calls == 1
    torch.testing.assert_close(first, second)

    # The negative prompt is cached on its own: a new prompt with the same negative encodes only the prompt.
    encoder.encode("a dog", "blurry")
    assert encoder_calls.calls == 2
    assert encoder_calls.input_ids[-1].shape[0] == 1

    encoder.encode("a dog", "blurry", clip_skip=2)
    assert encoder_calls.calls == 3


def test_returned_tensors_are_independent_of_the_cache(encoder):
    cond, _ = encoder.encode("a cat", "")
    expected = cond.clone()
    cond.mul_(0)
    torch.testing.assert_close(encoder.encode("a cat", "")[0], expected)


def test_cache_is_bounded_and_per_instance(pipe, encoder_calls):
    small = PromptEncoder(pipe.tokenizer, pipe.text_encoder, cache_size=4)
    for word in ["cat", "dog", "fox", "owl", "bee"]:
        small.encode(word, "")
    calls = encoder_calls.calls
    small.encode("bee", "")
    assert encoder_calls.calls == calls  # recent: still cached
    small.encode("cat", "")
    assert encoder_calls.calls == calls + 1  # oldest: evicted

    other = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    other.encode("bee", "")
    assert encoder_calls.calls == calls + 2

    small.clear_cache()
    small.encode("bee", "")
    assert encoder_calls.calls == calls + 3


# --- pipeline -------------------------------------------------------------------------------------------------


def test_embeddings_work_in_a_diffusers_pipeline(pipe, encoder):
    cond, uncond = encoder.encode("a (lighthouse:1.3) at dusk, " * 12, "[blurry], lowres BREAK text")
    assert cond.shape == uncond.shape == (1, 154, 32)
    generator = torch.Generator().manual_seed(0)
    images = pipe(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=generator,
    ).images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()
