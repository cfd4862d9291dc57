"""SDXL prompts: both text encoders, the pooled embedding, weights, cache, compel, and prompt editing in a run.

A tiny random SDXL pipeline is built here the way diffusers' own SDXL tests build theirs (small dims, the
repository's CLIP tokenizer files); nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.events import JobControl
from engine.generate import run_batch
from engine.prompt_schedule import prompt_schedule
from engine.prompts import Conditioning, SDXLCompelEncoder, SDXLEmbeds, SDXLPromptEncoder, make_prompt_encoders
from engine.request import GenerationRequest

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "presets" / "configs" / "clip-tokenizer"
HIDDEN = 32  # per encoder; the UNet sees both side by side
LONG_PROMPT = " ".join(["tree"] * 300)  # 300 tokens: four full chunks


def build_tiny_sdxl_pipeline():
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + HIDDEN,
        cross_attention_dim=2 * HIDDEN,
        norm_num_groups=1,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear", timestep_spacing="leading"
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=64,
        norm_num_groups=32,
    )
    config = CLIPTextConfig(
        bos_token_id=49406,
        eos_token_id=49407,
        hidden_size=HIDDEN,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=3,
        pad_token_id=49407,
        vocab_size=49408,
        hidden_act="gelu",
        projection_dim=HIDDEN,
    )
    text_encoder = CLIPTextModel(config).eval()
    text_encoder_2 = CLIPTextModelWithProjection(config).eval()
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    # SDXL's second tokenizer (OpenCLIP's) pads with "!" after the first EOS.
    tokenizer_2 = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!")
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_sdxl_pipeline()


@pytest.fixture
def encoder(pipe):
    return SDXLPromptEncoder(pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2)


def test_factory_picks_the_sdxl_encoders(pipe):
    a1111, compel = make_prompt_encoders(pipe.components)
    assert isinstance(a1111, SDXLPromptEncoder)
    assert isinstance(compel, SDXLCompelEncoder)


def test_short_prompt_matches_diffusers_sdxl_encoding(pipe, encoder):
    positive, negative = encoder.encode("a photo of a cat", "")
    expected, expected_negative, expected_pooled, expected_negative_pooled = pipe.encode_prompt(
        "a photo of a cat", device="cpu", do_classifier_free_guidance=True
    )
    assert positive.embeds.shape == (1, 77, 2 * HIDDEN)
    assert positive.pooled.shape == (1, HIDDEN)
    torch.testing.assert_close(positive.embeds, expected)
    torch.testing.assert_close(positive.pooled, expected_pooled)
    # An empty negative prompt is zeros, as A1111 and diffusers condition SDXL.
    torch.testing.assert_close(negative.embeds, expected_negative)
    torch.testing.assert_close(negative.pooled, expected_negative_pooled)
    assert not negative.embeds.any()


def test_long_prompt_has_four_chunks_and_the_negative_is_padded_to_match(encoder):
    positive, negative = encoder.encode(LONG_PROMPT, "blurry")
    assert encoder.token_counts(LONG_PROMPT) == [75, 75, 75, 75]
    assert positive.embeds.shape == (1, 4 * 77, 2 * HIDDEN)
    assert negative.embeds.shape == positive.embeds.shape
    assert positive.pooled.shape == negative.pooled.shape == (1, HIDDEN)
    # Chunk 2 onward of the negative is the empty prompt's encoding, not zeros.
    assert negative.embeds[:, 77:].abs().sum() > 0


def test_weights_move_both_encoders_and_leave_the_pooled_output_alone(encoder):
    plain, _ = encoder.encode("a cat on a mat")
    heavy, _ = encoder.encode("a (cat:1.8) on a mat")
    torch.testing.assert_close(heavy.pooled, plain.pooled)
    difference = (heavy.embeds - plain.embeds).abs().sum(dim=(0, 1))
    assert difference[:HIDDEN].sum() > 0 and difference[HIDDEN:].sum() > 0
    # The weighted token ("cat" at position 2) moves further from the unweighted one than any other token.
    per_token = (heavy.embeds - plain.embeds).norm(dim=-1)[0]
    assert int(per_token.argmax()) == 2


def test_emphasis_ignore_equals_the_unweighted_prompt(encoder):
    plain, _ = encoder.encode("a cat on a mat", emphasis="Ignore")
    ignored, _ = encoder.encode("a (cat:1.8) on a mat", emphasis="Ignore")
    torch.testing.assert_close(ignored.embeds, plain.embeds)


def test_repeated_prompt_does_not_rerun_either_text_encoder(pipe, encoder):
    calls = []
    handles = [
        module.register_forward_pre_hook(lambda *_: calls.append(1))
        for module in (pipe.text_encoder, pipe.text_encoder_2)
    ]
    try:
        first, _ = encoder.encode("a red fox", "blurry")
        after_first = len(calls)
        again, _ = encoder.encode("a red fox", "blurry")
    finally:
        for handle in handles:
            handle.remove()
    assert after_first > 0
    assert len(calls) == after_first
    torch.testing.assert_close(again.embeds, first.embeds)


@pytest.mark.parametrize("prompt", ["", "BREAK", "((((", "(x:1.2.3)", "[a:b:", "(cat:1e30)", "BREAK BREAK ]]]"])
def test_malformed_prompts_never_raise(encoder, prompt):
    positive, negative = encoder.encode(prompt, prompt)
    assert positive.embeds.shape[1] % 77 == 0 and positive.pooled.shape == (1, HIDDEN)


def test_compel_sdxl_weights_blends_and_long_prompts(pipe):
    compel = SDXLCompelEncoder(pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2)
    plain, empty_negative = compel.encode("a cat", "")
    assert plain.embeds.shape == (1, 77, 2 * HIDDEN) and plain.pooled.shape == (1, HIDDEN)
    assert not empty_negative.embeds.any()
    weighted, _ = compel.encode("a cat++", "")
    assert not torch.allclose(weighted.embeds, plain.embeds)
    blend, _ = compel.encode('("a cat", "a dog").blend(0.5, 0.5)', "")
    dog, _ = compel.encode("a dog", "")
    assert not torch.allclose(blend.embeds, plain.embeds) and not torch.allclose(blend.embeds, dog.embeds)
    long_positive, short_negative = compel.encode(LONG_PROMPT, "blurry")
    assert long_positive.embeds.shape[1] > 77
    assert short_negative.embeds.shape == long_positive.embeds.shape


class TinySDXLModel:
    """What run_batch needs from a loaded model, for the tiny SDXL pipeline."""

    def __init__(self, pipe):
        self.components = dict(pipe.components)
        self.scheduler_config = dict(pipe.scheduler.config)
        self.prediction_type = "epsilon"
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.family = "sdxl"
        self.inpainting_unet = False
        # As engine.models.load_model gives every loaded model its encoders.
        self.prompt_encoder, self.compel_encoder = make_prompt_encoders(self.components)

    def pipeline_for(self, mode, scheduler, traced=True, wrap_unet=None, vae=None):
        from diffusers import StableDiffusionXLPipeline

        parts = {**self.components, "scheduler": scheduler}
        if wrap_unet is not None:
            parts["unet"] = wrap_unet(parts["unet"])
        if vae is not None:
            parts["vae"] = vae
        pipeline = StableDiffusionXLPipeline(**parts)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def latent_shape(self, width, height):
        return (1, 4, height // 2, width // 2)


def _sample(model, request: GenerationRequest, conditioning: Conditioning, *, seed: int):
    """One image of `request` through run_batch, without previews or progress."""
    return run_batch(
        model,
        request,
        seeds=[seed],
        conditioning=conditioning,
        control=JobControl(),
        previewer=None,
        preview_every=1,
        emit=lambda _progress: None,
        batch_no=0,
        batch_count=1,
        started=0.0,
    )


def test_prompt_editing_switches_text_and_pooled_conditioning_at_the_stated_step(pipe, encoder):
    steps = 5
    positive_texts = prompt_schedule("a [cat:dog:2] on a mat", steps)
    positives, negatives = encoder.encode_many([text for _, text in positive_texts], ["blurry"])
    conditioning = Conditioning(
        [(end, value) for (end, _), value in zip(positive_texts, positives, strict=True)],
        [(steps, negatives[0])],
        steps,
    )
    seen = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(
            (kwargs["encoder_hidden_states"][1:].clone(), kwargs["added_cond_kwargs"]["text_embeds"][1:].clone())
        ),
        with_kwargs=True,
    )
    try:
        outcome = _sample(
            TinySDXLModel(pipe),
            GenerationRequest(prompt="a [cat:dog:2] on a mat", steps=steps, sampler_name="Euler", width=64, height=64),
            conditioning,
            seed=1,
        )
    finally:
        handle.remove()
    assert len(outcome.images) == 1
    cat, dog = positives
    names = [
        "cat" if torch.equal(embeds, cat.embeds) else "dog" if torch.equal(embeds, dog.embeds) else "?"
        for embeds, _ in seen
    ]
    # A1111: "[cat:dog:2]" keeps "cat" for step indices 0..2, "dog" from index 3 on.
    assert names == ["cat", "cat", "cat", "dog", "dog"]
    assert all(
        torch.equal(pooled, (cat if name == "cat" else dog).pooled)
        for (_, pooled), name in zip(seen, names, strict=True)
    )


def test_engine_encodes_sdxl_schedules_and_compel(engine, pipe):
    model = TinySDXLModel(pipe)
    conditioning = engine._encode_prompts(model, GenerationRequest(prompt="a [cat:dog:0.5]", steps=4))
    assert isinstance(model.prompt_encoder, SDXLPromptEncoder)
    assert len(conditioning.positive) == 2
    assert all(isinstance(value, SDXLEmbeds) for _, value in conditioning.positive + conditioning.negative)
    compel = engine._encode_prompts(model, GenerationRequest(prompt="a cat+", steps=4, prompt_syntax="compel"))
    assert isinstance(compel.positive[0][1], SDXLEmbeds)


def test_compel_sdxl_and_joins_parts_longer_than_one_chunk(pipe):
    compel = SDXLCompelEncoder(pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2)
    joined, negative = compel.encode('("a cat", "a dog").and()', "blurry")
    assert joined.embeds.shape == (1, 2 * 77, 2 * HIDDEN)
    assert negative.embeds.shape == joined.embeds.shape


def test_empty_negative_is_zeros_then_padded_with_the_empty_prompt_like_a1111(encoder):
    positive, negative = encoder.encode(LONG_PROMPT, "")
    assert negative.embeds.shape == positive.embeds.shape == (1, 4 * 77, 2 * HIDDEN)
    assert not negative.embeds[:, :77].any() and not negative.pooled.any()
    empty, _ = encoder.encode("", "blurry")
    torch.testing.assert_close(negative.embeds[:, 77:154], empty.embeds[:, :77])


def test_sdxl_composable_parts_guide_with_their_own_states_and_pooled_output(engine, pipe):
    """ "P AND P" guides twice as hard as P, so at CFG 3 it draws what P draws at CFG 6: both encoders' states
    and the pooled output (add_text_embeds) of each part reach the UNet."""
    model = TinySDXLModel(pipe)

    def draw(prompt: str, cfg_scale: float):
        request = GenerationRequest(
            prompt=prompt,
            negative_prompt="blurry",
            steps=3,
            cfg_scale=cfg_scale,
            sampler_name="Euler",
            width=64,
            height=64,
        )
        outcome = _sample(model, request, engine._encode_prompts(model, request), seed=2)
        return np.asarray(outcome.images[0], dtype=np.int16)

    doubled = draw("a cat on a mat AND a cat on a mat", 3.0)
    assert np.abs(doubled - draw("a cat on a mat", 6.0)).max() <= 1
    assert np.abs(doubled - draw("a cat on a mat", 3.0)).max() > 1
    # A second part's pooled output matters too: another part changes the picture.
    assert np.abs(draw("a cat on a mat AND a dog", 3.0) - doubled).max() > 1
