"""Prompt editing and alternation, emphasis modes, the compel syntax, and A1111 parity of the encoding."""

from __future__ import annotations

import copy

import pytest
import torch

from engine import GenerationRequest, InvalidRequestError
from engine.infotext import format_infotext, parse_infotext
from engine.prompt_schedule import prompt_schedule, text_for_step
from engine.prompts import CompelEncoder, PromptEncoder, apply_emphasis, encode_prompt_a1111

# --- schedules: the cases from the docstring of A1111's get_learned_conditioning_prompt_schedules ------------

A1111_SCHEDULES = [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(step, "a" if step % 2 else "(b:1.1)") for step in range(1, 11)]),
]


@pytest.mark.parametrize(("prompt", "expected"), A1111_SCHEDULES)
def test_schedules_match_a1111_docstring(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


def test_schedule_forms_and_fractions():
    assert prompt_schedule("a [cat:dog:0.25] b", 20) == [(5, "a cat b"), (20, "a dog b")]
    assert prompt_schedule("[from::4]x", 8) == [(4, "fromx"), (8, "x")]
    assert prompt_schedule("x[to:4]", 8) == [(4, "x"), (8, "xto")]
    # A number with a decimal point is a fraction of the steps, even 1.0.
    assert prompt_schedule("[a:b:1.0]", 8) == [(8, "a")]
    # Steps past the end clamp to the last step; step 0 never switches.
    assert prompt_schedule("[a:b:50]", 8) == [(8, "a")]
    assert prompt_schedule("[a:b:0]", 8) == [(8, "b")]
    # Attention syntax inside is left for the attention parser.
    assert prompt_schedule("[(red:1.3):blue:2]", 4) == [(2, "(red:1.3)"), (4, "blue")]
    assert prompt_schedule("[a:b]", 4) == [(4, "[a:b]")]  # no number: plain text, as in A1111


def test_text_for_step_follows_a1111_reconstruct_cond_batch():
    schedule = prompt_schedule("[cat:dog:3]", 6)
    assert [text_for_step(schedule, index) for index in range(6)] == ["cat"] * 4 + ["dog"] * 2


@pytest.mark.parametrize(
    "prompt",
    ["", "BREAK", "[[[[", "]]]]", "[a:b:c:d:1]", "[a|b:1]", "\\[a:b:1\\]", "(((", "[" * 5000, "[a:" * 300],
)
def test_malformed_schedules_never_raise(prompt):
    schedule = prompt_schedule(prompt, 20)
    assert schedule[-1][0] == 20
    assert all(isinstance(text, str) for _, text in schedule)


# --- encoding parity with an independent reference --------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    from engine.tiny_model import build_tiny_pipeline

    return build_tiny_pipeline()


@pytest.fixture(scope="module")
def text_encoder(pipe):
    """The tiny encoder with a bias on its final layer norm. With zero bias (random init) every token's
    mean is ~0, so A1111's mean restoration divides ~0 by ~0 (on some CPUs exactly 0 by 0); a trained
    CLIP's mean is well away from zero."""
    encoder = copy.deepcopy(pipe.text_encoder)
    with torch.no_grad():
        encoder.final_layer_norm.bias.fill_(0.3)
    return encoder


def reference_a1111(pipe, text_encoder, weighted_words: list[tuple[str, float]]) -> torch.Tensor:
    """A1111's "Original" emphasis written out for a short prompt of whole words: one chunk of BOS, tokens,
    EOS padding; z * weights, then z * (mean before / mean after)."""
    tokenizer, encoder = pipe.tokenizer, text_encoder
    ids, weights = [tokenizer.bos_token_id], [1.0]
    for word, weight in weighted_words:
        word_ids = tokenizer(word, add_special_tokens=False).input_ids
        ids += word_ids
        weights += [weight] * len(word_ids)
    ids += [tokenizer.eos_token_id] * (77 - len(ids))
    weights += [1.0] * (77 - len(weights))
    with torch.no_grad():
        z = encoder(input_ids=torch.tensor([ids])).last_hidden_state
    before = z.mean()
    z = z * torch.tensor(weights).reshape(1, -1, 1)
    return z * (before / z.mean())


def test_encode_prompt_a1111_matches_the_reference(pipe, text_encoder):
    got = encode_prompt_a1111("a (red:1.3) fox [sleeping]", pipe.tokenizer, text_encoder)
    expected = reference_a1111(pipe, text_encoder, [("a", 1.0), ("red", 1.3), ("fox", 1.0), ("sleeping", 1 / 1.1)])
    assert got.shape == (1, 77, pipe.text_encoder.config.hidden_size)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_chunk_whose_mean_is_zero_is_weighted_but_not_rescaled():
    # A1111 would divide by zero here and send infinities to the UNet; the engine keeps the weighting.
    hidden = torch.tensor([[[1.0, -1.0], [2.0, -2.0]]])
    weighted = apply_emphasis(hidden, [[1.0, 1.5]], "Original")
    torch.testing.assert_close(weighted, torch.tensor([[[1.0, -1.0], [3.0, -3.0]]]))


def test_a_300_token_prompt_gives_four_chunks(pipe):
    prompt = " ".join(["tree"] * 300)
    embeds = encode_prompt_a1111(prompt, pipe.tokenizer, pipe.text_encoder)
    assert embeds.shape[1] == 77 * 4


def test_emphasis_modes(pipe, text_encoder):
    def encode(prompt, emphasis):
        return encode_prompt_a1111(prompt, pipe.tokenizer, text_encoder, emphasis=emphasis)

    plain = encode("a red fox", "Original")
    # Ignore: brackets are read (and removed) but weigh nothing.
    torch.testing.assert_close(encode("a (red:1.5) fox", "Ignore"), plain)
    original, no_norm = encode("a (red:1.5) fox", "Original"), encode("a (red:1.5) fox", "No norm")
    assert not torch.equal(original, no_norm)
    # Original restores the chunk mean; No norm does not.
    assert original.mean().item() == pytest.approx(plain.mean().item(), rel=1e-4)
    assert no_norm.mean().item() != pytest.approx(plain.mean().item(), rel=1e-4)
    # The weighted token moves the same way under both: scaled by the weight (before renormalising).
    red_position = 2
    ratio = no_norm[0, red_position] / plain[0, red_position]
    torch.testing.assert_close(ratio, torch.full_like(ratio, 1.5), atol=1e-4, rtol=1e-4)


def test_schedule_entries_are_padded_to_one_length(pipe):
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    long_text = " ".join(["tree"] * 100)
    positives, negatives = encoder.encode_many(["a cat", long_text], ["blurry"])
    assert {embeds.shape[1] for embeds in [*positives, *negatives]} == {154}


# --- prompt editing inside a real generation --------------------------------------------------------------


class ConditioningRecorder:
    """Records the text conditioning the UNet sees at each call (the positive half under CFG)."""

    def __init__(self, unet):
        self.seen: list[torch.Tensor] = []
        self._handle = unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _module, args, kwargs):
        hidden = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        self.seen.append(hidden[hidden.shape[0] // 2 :].clone())

    def remove(self):
        self._handle.remove()


def run_and_record(engine, **fields) -> list[torch.Tensor]:
    recorder = ConditioningRecorder(engine.loaded.components["unet"])
    try:
        events = list(engine.generate(GenerationRequest(width=64, height=64, seed=3, **fields)))
    finally:
        recorder.remove()
    assert not events[-1].interrupted
    return recorder.seen


def encoded(engine, text: str) -> torch.Tensor:
    positive, _ = engine.loaded.prompt_encoder.encode(text, "")
    return positive


def which(seen: list[torch.Tensor], candidates: dict[str, torch.Tensor]) -> list[str]:
    return [next(name for name, embeds in candidates.items() if torch.equal(s, embeds)) for s in seen]


def test_prompt_editing_switches_at_the_stated_step(engine):
    seen = run_and_record(engine, prompt="a [cat:dog:3] on a mat", steps=6, sampler_name="Euler")
    names = which(seen, {"cat": encoded(engine, "a cat on a mat"), "dog": encoded(engine, "a dog on a mat")})
    assert names == ["cat"] * 4 + ["dog"] * 2


def test_alternation_changes_every_step(engine):
    seen = run_and_record(engine, prompt="a [cat|dog]", steps=5, sampler_name="Euler")
    names = which(seen, {"cat": encoded(engine, "a cat"), "dog": encoded(engine, "a dog")})
    # A1111 pairs step index i with the entry ending at step >= i, so the first two steps share "cat".
    assert names == ["cat", "cat", "dog", "cat", "dog"]


def test_negative_prompt_editing(engine):
    recorder = ConditioningRecorder(engine.loaded.components["unet"])
    negatives = []
    handle = engine.loaded.components["unet"].register_forward_pre_hook(
        lambda _m, _a, kwargs: negatives.append(kwargs["encoder_hidden_states"][:1].clone()), with_kwargs=True
    )
    try:
        list(
            engine.generate(
                GenerationRequest(prompt="x", negative_prompt="[blurry::0.5]", steps=4, width=64, height=64, seed=1)
            )
        )
    finally:
        handle.remove()
        recorder.remove()
    _, blurry = engine.loaded.prompt_encoder.encode("x", "blurry")
    _, empty = engine.loaded.prompt_encoder.encode("x", "")
    assert which(negatives, {"blurry": blurry, "empty": empty}) == ["blurry"] * 3 + ["empty"]


def test_img2img_schedules_over_all_steps_as_a1111(engine):
    from PIL import Image

    init = Image.new("RGB", (64, 64), (200, 30, 30))
    seen = run_and_record(
        engine,
        prompt="[cat:dog:0.25]",
        steps=8,
        sampler_name="Euler",
        init_images=[init],
        denoising_strength=0.5,
    )
    # A1111 lays the schedule over all 8 steps (0.25 -> "cat" up to index 2) and starts img2img's
    # 5 steps (int(0.5 x 8) + 1) at index 0: "cat", "cat", "cat", "dog", "dog".
    names = which(seen, {"cat": encoded(engine, "cat"), "dog": encoded(engine, "dog")})
    assert names == ["cat"] * 3 + ["dog"] * 2


def test_schedule_is_reproducible_and_differs_from_either_prompt(engine):
    def image(prompt):
        events = list(engine.generate(GenerationRequest(prompt=prompt, steps=6, width=64, height=64, seed=9)))
        return events[-1].images[0].tobytes()

    edited = image("[a red apple:a blue car:3]")
    assert edited == image("[a red apple:a blue car:3]")
    assert edited not in (image("a red apple"), image("a blue car"))


def test_prompt_encodings_are_cached_across_jobs(engine):
    calls = []
    handle = engine.loaded.components["text_encoder"].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        request = GenerationRequest(prompt="a [lighthouse|castle] at dusk, 31337", steps=3, width=64, height=64)
        list(engine.generate(request))
        first = len(calls)
        list(engine.generate(request))
    finally:
        handle.remove()
    assert first >= 1
    assert len(calls) == first  # the second job reran no text encoder


# --- validation, AND, infotext -----------------------------------------------------------------------------


def test_composable_and_is_read_into_weighted_parts(engine):
    request = engine.validate(GenerationRequest(prompt="a cat AND a dog :0.5", negative_prompt="fog AND rain"))
    conditioning = engine._encode_prompts(engine.loaded, request)
    assert [weight for _schedule, weight in conditioning.parts] == [1.0, 0.5]
    assert len(conditioning.negative) == 1  # the negative prompt is one text, "AND" a word in it
    plain = engine._encode_prompts(engine.loaded, engine.validate(GenerationRequest(prompt="a cat and a dog")))
    assert plain.parts == []  # lower case is just a word


@pytest.mark.parametrize(("field", "value"), [("emphasis", "loud"), ("prompt_syntax", "midjourney"), ("emphasis", 3)])
def test_bad_prompt_settings_are_named(engine, field, value):
    with pytest.raises(InvalidRequestError) as error:
        engine.validate(GenerationRequest(prompt="x", **{field: value}))
    assert error.value.field == field


def test_settings_are_matched_case_insensitively(engine):
    request = engine.validate(GenerationRequest(prompt="x", emphasis="no NORM", prompt_syntax="Compel"))
    assert (request.emphasis, request.prompt_syntax) == ("No norm", "compel")


def test_infotext_records_syntax_and_emphasis_when_not_default():
    plain = format_infotext(GenerationRequest(prompt="x", width=64, height=64), 1, model_name=None, model_hash=None)
    assert "Emphasis" not in plain and "Prompt syntax" not in plain
    request = GenerationRequest(prompt="x+ y", width=64, height=64, emphasis="No norm", prompt_syntax="compel")
    text = format_infotext(request, 1, model_name=None, model_hash=None)
    assert "Emphasis: No norm" in text and "Prompt syntax: compel" in text
    parsed = parse_infotext(text)
    assert (parsed.emphasis, parsed.prompt_syntax) == ("No norm", "compel")


# --- compel --------------------------------------------------------------------------------------------------


def test_compel_weights_blends_and_long_prompts(pipe):
    compel = CompelEncoder(pipe.tokenizer, pipe.text_encoder)
    plain, _ = compel.encode("a red fox")
    up, _ = compel.encode("a red++ fox")
    assert not torch.allclose(plain, up)
    blend, _ = compel.encode('("a red fox", "a blue car").blend(0.5, 0.5)')
    fox, car = compel.encode("a red fox")[0], compel.encode("a blue car")[0]
    assert blend.shape == fox.shape
    # A blend lies between its parts.
    assert (blend - fox).norm() < (car - fox).norm() and (blend - car).norm() < (car - fox).norm()
    long_positive, short_negative = compel.encode(" ".join(["tree"] * 150), "blurry")
    assert long_positive.shape[1] > 77 and long_positive.shape == short_negative.shape


def test_compel_syntax_generates_through_the_engine(engine):
    request = GenerationRequest(
        prompt='("a red fox", "a blue car").blend(0.7, 0.3)', prompt_syntax="compel", steps=3, width=64, height=64
    )
    result = list(engine.generate(request))[-1]
    assert result.images[0].size == (64, 64)
    assert "Prompt syntax: compel" in result.infotexts[0]


@pytest.mark.parametrize(
    "prompt",
    ["", "BREAK", "BREAK BREAK", "(((a", ")))", "[a:b:", "(a:1e30)", "(a:-1e30)", "(x:1.2.3)", "\\", "a" * 3000],
)
def test_malformed_prompts_never_raise_when_encoded(pipe, prompt):
    embeds = encode_prompt_a1111(prompt, pipe.tokenizer, pipe.text_encoder)
    assert embeds.shape[0] == 1 and embeds.shape[1] % 77 == 0


def test_compel_and_concatenates_its_parts(pipe):
    compel = CompelEncoder(pipe.tokenizer, pipe.text_encoder)
    joined, _ = compel.encode('("a red fox", "a blue car").and()')
    fox, _ = compel.encode("a red fox")
    assert joined.shape[1] == 2 * fox.shape[1]
