"""The shipped micro model draws what the prompt says (a smaller sample of tools/measure_micro_quality.py).

Every check goes through the Engine as a user's request would; pictures are graded by the classifier in
training/dataset.py (background = most common palette colour, shape colour = second, shape from fill).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine.presets import SHIPPED_MICRO_MODEL
from engine.prompts import apply_emphasis
from tools import measure_micro_quality
from training import architecture, dataset, quality, train_micro


def test_model_folder_is_a_standard_small_diffusers_model():
    index = json.loads((SHIPPED_MICRO_MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["_lantern_family"] == "micro"
    files = [path for path in SHIPPED_MICRO_MODEL.rglob("*") if path.is_file()]
    assert {path.suffix for path in files} <= {".json", ".safetensors", ".txt"}, files
    # The size bar, in decimal megabytes, for the whole folder: weights, configs and tokenizer.
    assert sum(path.stat().st_size for path in files) <= 25_000_000
    from transformers import CLIPTokenizer

    # SD's own tokenizer layout: vocab.json and merges.txt.
    assert {path.name for path in (SHIPPED_MICRO_MODEL / "tokenizer").iterdir()} >= {"vocab.json", "merges.txt"}
    tokenizer = CLIPTokenizer.from_pretrained(SHIPPED_MICRO_MODEL / "tokenizer")
    # The real CLIP vocabulary: SD's token ids.
    assert len(tokenizer) == 49408 and tokenizer.eos_token_id == 49407
    assert tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]


def test_it_is_the_default_and_loads_by_name(micro_engine, models_dir):
    from engine import Engine

    assert micro_engine.model.family == "micro"
    assert micro_engine.defaults().native_size == (64, 64)
    # The sampler it draws shapes best with (README: 88.7% against DPM++ 2M's 83.9% on held-out seeds).
    assert micro_engine.defaults().sampler_name == "Euler a"
    assert Engine(models_dir=models_dir).model.path == str(SHIPPED_MICRO_MODEL)


def test_prompts_get_the_named_colours_and_shapes(micro_engine):
    accuracy = quality.attribute_accuracy(micro_engine, 24)
    assert accuracy.background >= BACKGROUND_BAR, accuracy
    assert accuracy.colour >= COLOUR_BAR, accuracy
    assert accuracy.shape >= SHAPE_BAR, accuracy
    # The per-kind counts are the same readings split by the shape each prompt asked for.
    asked = collections.Counter(scene.shape for _, scene in quality.prompt_set(24))
    assert {shape: count for shape, (_, count) in accuracy.shape_by_kind.items()} == asked
    assert sum(right for right, _ in accuracy.shape_by_kind.values()) == round(accuracy.shape * 24)
    # Its shapes match their outlines, not only their fill ratios (on all 168 prompts: circles 0.94,
    # squares 0.94, triangles 0.79, whose thin tips come out rounded).
    assert all(match >= 0.75 for match in accuracy.outline_by_kind.values()), accuracy.outline_by_kind


def test_the_quality_tool_refuses_counts_it_cannot_use_by_name(capsys):
    for flag, message in [
        ("--prompts=0", "--prompts must be 1 or more, not 0"),
        ("--seeds=-1", "--seeds must be 0 or more, not -1"),
        ("--sampler-prompts=-2", "--sampler-prompts must be 0 or more, not -2"),
    ]:
        with pytest.raises(SystemExit):
            measure_micro_quality.main([flag])
        assert message in capsys.readouterr().err


def test_negative_prompt_removes_the_colour(micro_engine):
    # 20 seeds (12 red circles); tools/measure_micro_quality.py tries 300.
    colours = quality.circle_colours(micro_engine, range(20))
    effect = quality.negative_prompt_effect(micro_engine, colours, "red")
    assert effect.drawn_without == list(colours.values()).count("red")
    assert effect.drawn_without >= 2, "too few red circles to judge: widen the seed range"
    assert effect.share >= NEGATIVE_BAR, effect


def test_emphasis_moves_the_weighted_colours_share(micro_engine):
    # (blue:1.4) against (blue:0.6), blue as the shape's colour in two cases and the background's in two.
    moved, total = quality.emphasis_effect(micro_engine, range(2))
    assert moved / total >= EMPHASIS_BAR, (moved, total)


def test_img2img_follows_the_new_prompt_at_high_strength_and_keeps_the_picture_at_low(micro_engine):
    effects = [quality.img2img_effect(micro_engine, seed) for seed in range(4)]
    red_inits = [effect for effect in effects if effect.init_colour == "red"]
    assert len(red_inits) >= 3, effects
    assert all(effect.strong_colour == "blue" for effect in red_inits), effects
    # Strength 0.1 runs A1111's 3 of 20 steps from timestep 105: the picture's colour must win.
    assert all(effect.weak_colour == "red" for effect in red_inits), effects


def test_inpaint_repaints_the_mask_and_keeps_the_rest(micro_engine):
    effect = quality.inpaint_effect(micro_engine, seed=3)
    assert effect.colour_inside == "blue"
    assert effect.masked_change > 40
    assert effect.outside_change <= effect.vae_round_trip


# Euler a, the default sampler, is held to the bar by test_prompts_get_the_named_colours_and_shapes (the same
# prompts, seeds and settings). LCM at its own usual settings (8 steps, CFG 1.5): at CFG 7 it misses a quarter of
# the backgrounds.
# DPM2 a overshot into neighbouring colours at CFG 7 until the empty-prompt fine-tunes (lab notes, Samplers);
# it still misses one prompt in 24, among the first 8, so it is held to the README's whole sample.
@pytest.mark.parametrize(
    ("sampler", "prompts"),
    [("DDIM", 8), ("DDIM CFG++", 8), ("UniPC", 8), ("DPM++ SDE", 8), ("DPM2 a", 24), ("LCM", 8), ("DPM adaptive", 8)],
)
def test_other_samplers_get_the_background(micro_engine, sampler, prompts):
    assert quality.sampler_background_accuracy(micro_engine, sampler, prompts) >= BACKGROUND_BAR


def test_guidance_stiffness_finds_the_direction_that_makes_lms_oscillate(micro_engine):
    """At CFG 7 the empty prompt's denoiser follows the latent's colour and the prompt's does not, so
    guidance turns that direction's eigenvalue strongly negative, less so at CFG 4 (the README's account
    of LMS; the lab notes' Samplers section); the reading is a converged eigenvector. Sigma 6, because at
    sigma 3 and CFG 4 another direction (eigenvalue about +1.6) is the largest, and the power iteration
    finds that one instead."""
    strong, weak = (quality.guidance_stiffness(micro_engine, [6.0], cfg_scale=cfg)[0] for cfg in (7.0, 4.0))
    assert strong.residual < 0.05
    assert strong.unconditional > 0.8 and strong.conditional < 0.5
    assert strong.guided < -3.0 < weak.guided < -1.0


def test_classifier_reads_the_training_pictures_exactly():
    scenes, pixels = dataset.make_images(60, seed=123)
    from PIL import Image

    readings = [dataset.classify(Image.fromarray(p)) for p in pixels]
    assert all(r.background == s.background and r.colour == s.colour for r, s in zip(readings, scenes, strict=True))
    assert all(r.shape == s.shape for r, s in zip(readings, scenes, strict=True))


def test_outline_match_tells_a_clean_shape_from_a_misshapen_one():
    from PIL import Image

    scenes, pixels = dataset.make_images(60, seed=123)
    for scene, picture in zip(scenes, pixels, strict=True):
        image = Image.fromarray(picture)
        own = dataset.outline_match(image, scene.shape)
        assert own >= 0.93 > 0.83 >= max(dataset.outline_match(image, s) for s in dataset.SHAPES if s != scene.shape)
    # A triangle with a bite out of one side still reads as a triangle by its fill, but matches one worse.
    triangle = next(i for i, s in enumerate(scenes) if s.shape == "triangle" and s.size == "large")
    scene, bitten = scenes[triangle], pixels[triangle].copy()
    left, top, right, bottom = scene.box
    bitten[top + (bottom - top) // 2 : bottom - 2, left : (left + right) // 2] = dataset.PALETTE[scene.background]
    assert dataset.classify(Image.fromarray(bitten)).shape == "triangle"
    assert dataset.outline_match(Image.fromarray(bitten), "triangle") < 0.8
    # Nothing of a second colour: no shape to match.
    assert dataset.outline_match(Image.new("RGB", (64, 64), dataset.PALETTE["red"]), "circle") == 0.0


def test_training_captions_weight_colour_words_the_way_the_picture_goes():
    """Emphasised training captions agree with their pictures: a heavier shape colour goes with a
    larger shape, a heavier background colour with a smaller one; the weight sits on the colour word."""
    rng = random.Random(0)
    scenes = [dataset.random_scene(rng) for _ in range(800)]
    template = dataset.FULL_TEMPLATES[0]  # "{a:c} {c} {s} on a {b} background"
    drawn = [(scene, dataset.emphasis_weights(scene, template, rng, 0.25)) for scene in scenes]
    low, high = dataset.EMPHASIS_RANGE
    for word, increases_with_size in (("colour", True), ("background", False)):
        pairs = sorted(
            (scene.box[2] - scene.box[0] + 100 * dataset.SIZES.index(scene.size), weights[getattr(scene, word)])
            for scene, weights in drawn
            if getattr(scene, word) in weights
        )
        assert 0.15 < len(pairs) / len(scenes) < 0.35, (word, len(pairs))
        ordered = [weight for _size, weight in pairs]
        assert ordered == sorted(ordered, reverse=not increases_with_size), word
        assert low <= min(ordered) < 0.7 and 1.3 < max(ordered) <= high, (word, min(ordered), max(ordered))
    # A caption that does not name the background never weights it.
    assert all(s.background not in dataset.emphasis_weights(s, "{c} {s}", rng, 0.25) for s in scenes)

    tokenizer = architecture.build_tokenizer()
    captions = train_micro.CaptionBatcher(tokenizer, random.Random(1), random.Random(2), emphasis_share=0.25)
    input_ids, weights, _labels = captions.draw(scenes[:200])
    colour_ids = set(captions.colour_ids.values())
    weighted = [
        (ids[i], w) for ids, row in zip(input_ids.tolist(), weights, strict=True) for i, w in enumerate(row) if w != 1.0
    ]
    assert weighted and all(token in colour_ids for token, _w in weighted)
    # Off by default: the recipe's main training uses unweighted captions (only the emphasis fine-tune weights them).
    unweighted = train_micro.CaptionBatcher(tokenizer, random.Random(1), random.Random(2))
    assert all(w == 1.0 for row in unweighted.draw(scenes[:200])[1] for w in row)


def test_cross_attention_maps_keep_the_unet_output_and_show_where_it_looks():
    _vae, unet, text_encoder = train_micro.load_exported(train_micro.DEFAULT_OUT)
    tokenizer = architecture.build_tokenizer()
    input_ids = tokenizer(
        ["a blue circle on a yellow background", "red square"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([900, 400])
    with torch.no_grad():
        hidden = text_encoder(input_ids).last_hidden_state
        expected = unet(latents, timesteps, hidden).sample
        maps = train_micro.CrossAttentionMaps(unet)
        recorded = unet(latents, timesteps, hidden).sample
    torch.testing.assert_close(recorded, expected, atol=1e-5, rtol=1e-4)
    attn2_layers = [name for name in unet.attn_processors if ".attn2." in name]
    assert len(maps.maps) == len(attn2_layers) == 7  # 2 down, 1 middle, 4 up
    for layer in maps.maps:
        assert layer.shape[0] == 2 and layer.shape[-1] == 77
        torch.testing.assert_close(layer.sum(-1), torch.ones(layer.shape[:-1]))

    on_colour_word = torch.isin(input_ids, torch.tensor([tokenizer.get_vocab()[f"{c}</w>"] for c in dataset.COLOURS]))
    assert on_colour_word.sum().item() == 3  # blue, yellow; red
    share = train_micro.colour_attention_share(maps.maps, on_colour_word.float())
    # The shipped model reads the colour words themselves (what emphasis scales), not only the nouns.
    assert (share >= 0.2).all(), share
    assert train_micro.colour_attention_shortfall(share, torch.tensor([True, True])) < 0.1
    # No shortfall is asked of captions that name no colour, and a share at the target costs nothing.
    assert train_micro.colour_attention_shortfall(torch.tensor([0.0]), torch.tensor([False])) == 0
    at_target = torch.tensor([train_micro.COLOUR_ATTENTION_TARGET])
    assert train_micro.colour_attention_shortfall(at_target, torch.tensor([True])) == 0


def test_export_lifts_an_encoder_that_averages_zero_so_emphasis_keeps_its_scale_and_pictures_stay():
    # An encoder whose output for a caption averages almost exactly zero, though its tokens do not: what one
    # own-VAE model's did for this caption, where A1111's "Original" emphasis (rescale by old mean / new mean)
    # turned the whole prompt around.
    tokenizer = architecture.build_tokenizer()
    torch.manual_seed(0)
    text_encoder = architecture.build_text_encoder(len(tokenizer)).eval()
    unet = train_micro.load_exported(train_micro.DEFAULT_OUT)[1]
    prompts = ["a green circle on a blue background", ""]
    input_ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    final_norm = text_encoder.final_layer_norm
    with torch.no_grad():
        final_norm.weight.copy_(1 + torch.randn(final_norm.weight.shape, generator=torch.Generator().manual_seed(1)))
        final_norm.bias -= text_encoder(input_ids[:1]).last_hidden_state.mean()
    weights = [[1.0] * 77, [1.0] * 77]
    weights[0][input_ids[0].tolist().index(tokenizer.get_vocab()["blue</w>"])] = 1.4
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([800, 100])

    def encode_and_predict() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoder output, the UNet's prediction from it, and Original's rescaling of "(blue:1.4)"."""
        with torch.no_grad():
            hidden = text_encoder(input_ids).last_hidden_state
            rescaling = apply_emphasis(hidden, weights, "Original") / apply_emphasis(hidden, weights, "No norm")
            return hidden, unet(latents, timesteps, hidden).sample, rescaling.mean(dim=(1, 2))

    hidden_before, predicted_before, rescaling_before = encode_and_predict()
    assert rescaling_before[0].abs() < 0.01  # the weighted prompt all but wiped out
    shift = train_micro.lift_text_mean(text_encoder, unet, tokenizer)
    hidden_after, predicted_after, rescaling_after = encode_and_predict()

    captions = train_micro.caption_sample()
    assert train_micro.caption_means(text_encoder, tokenizer, captions).min() >= train_micro.TEXT_MEAN_FLOOR - 1e-6
    torch.testing.assert_close(hidden_after, hidden_before + shift)
    # The UNet takes the shift back out: a prompt without weights draws what it drew.
    torch.testing.assert_close(predicted_after, predicted_before, atol=1e-4, rtol=1e-4)
    # Original's rescaling now stays within a few percent of multiplying alone.
    assert (rescaling_after - 1).abs().max() < 0.03, rescaling_after
    # A lifted encoder, like the shipped one, is left as it is.
    assert train_micro.lift_text_mean(text_encoder, unet, tokenizer) == 0


# Floors on these small samples, below what the model measures (README: 168 prompts, 300 seeds).
BACKGROUND_BAR = 0.9
COLOUR_BAR = 0.9
SHAPE_BAR = 0.85
NEGATIVE_BAR = 0.9
EMPHASIS_BAR = 0.85


def test_the_training_check_draws_what_the_page_draws(micro_engine):
    """The check during training samples as the page and tools/measure_micro_quality.py do (sampler,
    schedule, steps, guidance, img2img's step count), so its numbers predict the table's."""
    vae, unet, text_encoder = train_micro.load_exported(train_micro.DEFAULT_OUT)
    pipe = train_micro.check_pipeline(vae, text_encoder, unet, architecture.build_tokenizer())

    def assert_same(checked, on_page, what):
        difference = np.abs(np.asarray(checked, dtype=float) - np.asarray(on_page, dtype=float)).mean()
        assert difference < 2.0, (what, difference)

    prompts, seeds = ["a red circle on a blue background", "a green background with a small white square"], [3, 4]
    for prompt, seed, picture in zip(prompts, seeds, train_micro.check_pictures(pipe, prompts, seeds), strict=True):
        assert_same(picture, quality.generate(micro_engine, prompt=prompt, seed=seed), prompt)
    draw = train_micro.check_drawer(pipe)
    init = draw(prompts[0], seeds[0])
    for strength in (0.1, 0.75):
        on_page = quality.generate(
            micro_engine, prompt="a blue circle", seed=5, init_images=[init], denoising_strength=strength
        )
        assert_same(draw("a blue circle", 5, init, strength), on_page, strength)


def test_the_training_check_reads_the_shipped_model_as_the_table_does(monkeypatch):
    vae, unet, text_encoder = train_micro.load_exported(train_micro.DEFAULT_OUT)
    # Emphasis on one seed (8 pictures) where a training run draws three.
    emphasis_score = train_micro.emphasis_score
    monkeypatch.setattr(train_micro, "emphasis_score", lambda *args: emphasis_score(*args, seeds=1))
    scores = train_micro.evaluate(
        vae, text_encoder, unet, architecture.build_tokenizer(), seed=12345, count=12, emphasis=True
    )
    # The table: 100% backgrounds and shape colours, 12/12 img2img both ways, emphasis 24/24.
    assert scores["background"] == scores["img2img"] == 1.0
    assert scores["colour"] >= 0.9 and scores["emphasis"] >= 0.9


def test_shape_coverage_marks_the_shapes_pixels_and_the_balanced_loss_gives_them_half_the_weight():
    scenes, pixels = dataset.make_images(40, seed=7)
    for scene, picture in zip(scenes, pixels, strict=True):
        # At picture size the coverage is the shape as drawn (edges anti-aliased either way).
        drawn_shape = dataset.nearest_palette(picture) == dataset.COLOURS.index(scene.colour)
        covered = dataset.shape_coverage(scene, dataset.IMAGE_SIZE) > 0.5
        assert (drawn_shape == covered).mean() > 0.98, scene
        # At the latent grid's side each cell holds the share of its 4x4 pixels the shape covers.
        latent_cells = dataset.shape_coverage(scene, 16)
        assert latent_cells.shape == (16, 16) and 0 <= latent_cells.min() and latent_cells.max() <= 1
        assert latent_cells.mean() == pytest.approx(dataset.shape_coverage(scene, 64).mean(), abs=1e-3)

    coverage = torch.from_numpy(np.stack([dataset.shape_coverage(s, 16) for s in scenes]))[:, None]
    area = coverage.mean(dim=(1, 2, 3))
    assert area.min() < 0.1 and area.max() > 0.25  # small and large shapes alike
    assert torch.equal(train_micro.shape_balanced_weights(coverage, 0.0), torch.ones_like(coverage))
    # Cells wholly inside or outside the shape: its pixels get exactly `balance` of the way from their
    # plain share of the loss (their area) to half of it.
    whole_cells = (coverage > 0.5).float()
    whole_area = whole_cells.mean(dim=(1, 2, 3))
    for balance in (0.5, 1.0):
        for cells in (coverage, whole_cells):
            weights = train_micro.shape_balanced_weights(cells, balance)
            # The loss's scale is kept (mean weight 1 per picture): only where it is spent changes.
            assert torch.allclose(weights.mean(dim=(1, 2, 3)), torch.ones(len(scenes)), atol=1e-5)
        weights = train_micro.shape_balanced_weights(whole_cells, balance)
        shape_share = (weights * whole_cells).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3))
        assert torch.allclose(shape_share, (1 - balance) * whole_area + balance * 0.5, atol=1e-5)
    # Edge cells count partly as background, so with soft coverage the shape gets a little under half.
    weights = train_micro.shape_balanced_weights(coverage, 1.0)
    shape_share = (weights * coverage).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3))
    assert 0.35 < shape_share.min() and shape_share.max() <= 0.5
    with pytest.raises(SystemExit):
        train_micro.parse_args(["--shape-balance=1.5"])


def test_min_snr_weighting_spares_the_noisy_timesteps_and_its_gamma_moves_the_line(capsys):
    alphas_cumprod = train_micro.architecture.build_scheduler().alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    default = train_micro.min_snr_weights(alphas_cumprod, train_micro.parse_args([]).snr_gamma)
    # The default is min-SNR-5: every timestep at SNR 5 or below counts fully, the cleaner ones less
    # and less (a nearly clean picture's loss is weighed 5 / SNR).
    assert torch.equal(default[snr <= 5], torch.ones(int((snr <= 5).sum())))
    assert torch.allclose(default[snr > 5], 5 / snr[snr > 5])
    assert default[0] < 0.01 and 100 < int((snr > 5).sum()) < 300
    # A larger gamma gives the nearly clean timesteps (where a rim is drawn) more of the loss; 0 weighs all alike.
    assert torch.all(train_micro.min_snr_weights(alphas_cumprod, 20) >= default)
    assert torch.equal(train_micro.min_snr_weights(alphas_cumprod, 0), torch.ones(1000))
    with pytest.raises(SystemExit):
        train_micro.parse_args(["--snr-gamma=-1"])
    assert "--snr-gamma must be 0 or more, not -1.0" in capsys.readouterr().err


def test_shape_shares_draw_the_batches_shapes_in_the_asked_shares(capsys):
    rng = random.Random(0)
    scenes = [train_micro.dataset.random_scene(rng) for _ in range(600)]
    shares = train_micro.parse_args(["--shape-shares=circle=2,square=1.5,triangle=0.5"]).shape_shares
    assert shares == pytest.approx({"circle": 0.5, "square": 0.375, "triangle": 0.125})
    weights = train_micro.scene_draw_weights(scenes, shares)
    drawn = torch.multinomial(weights, 20_000, replacement=True, generator=torch.Generator().manual_seed(0))
    counts = collections.Counter(scenes[i].shape for i in drawn.tolist())
    # Whatever the dataset's own counts, the batches hold the shapes in the asked shares.
    assert {shape: count / 20_000 for shape, count in counts.items()} == pytest.approx(shares, abs=0.015)
    # A shape left out keeps its third before the shares are normalised; without the option nothing changes.
    assert train_micro.parse_shape_shares("circle=0.6666666666666666")["circle"] == pytest.approx(0.5)
    assert train_micro.parse_args([]).shape_shares is None
    for bad, message in [
        ("hexagon=1", "shape 'hexagon' in 'hexagon=1'; allowed: circle, square, triangle"),
        ("circle=lots", "share of circle 'lots' in 'circle=lots'; allowed: a number"),
        ("circle=-1", "share of circle '-1' in 'circle=-1'; allowed: 0 or more"),
        ("circle=0,square=0,triangle=0", "gives every shape a share of 0"),
    ]:
        with pytest.raises(SystemExit):
            train_micro.parse_args([f"--shape-shares={bad}"])
        assert message in capsys.readouterr().err


def test_training_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_micro.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--colour-attention" in capsys.readouterr().out


def test_training_can_start_from_an_exported_model(tmp_path):
    # How the shipped model's last fine-tune was run: only the low-noise phase, from the folder's weights,
    # with weighted colour words and the colour-word attention loss.
    out = tmp_path / "out"
    train_micro.main(
        [
            f"--init-from={train_micro.DEFAULT_OUT}",
            f"--work={tmp_path / 'work'}",
            f"--out={out}",
            "--images=16",
            "--batch=4",
            "--unet-steps=0",
            "--low-noise-steps=3",
            "--recolour-share=1",
            "--emphasis-share=1",
            "--colour-attention=1",
            "--text-lr=0",
            "--eval-every=1000",
        ]
    )
    before, after = train_micro.load_exported(train_micro.DEFAULT_OUT), train_micro.load_exported(out)
    changes = {}
    for name, original, trained in zip(("vae", "unet", "text_encoder"), before, after, strict=True):
        original, trained = original.state_dict(), trained.state_dict()
        assert original.keys() == trained.keys()
        changes[name] = max((original[key] - trained[key]).abs().max().item() for key in original)
    # The UNet moved, but only a little: it started from the folder's weights, not from scratch. VAE and
    # frozen text encoder come back as they were (half precision both ways).
    assert 0 < changes["unet"] < 0.01
    assert changes["vae"] == 0 and changes["text_encoder"] == 0
    # The same VAE, so the folder's preview table comes along instead of being fit again.
    shipped_table = json.loads((train_micro.DEFAULT_OUT / "latent_rgb.json").read_text())
    assert json.loads((out / "latent_rgb.json").read_text()) == shipped_table


def test_training_can_reuse_a_finished_vae_and_train_the_rest_from_scratch(tmp_path, monkeypatch):
    work, out = tmp_path / "work", tmp_path / "out"
    flags = ["--images=16", "--batch=4", "--unet-steps=2", "--low-noise-steps=0", "--eval-every=1000"]
    train_micro.main([f"--vae-from={train_micro.DEFAULT_OUT}", *flags, f"--work={work}", f"--out={out}"])
    shipped, trained = train_micro.load_exported(train_micro.DEFAULT_OUT), train_micro.load_exported(out)
    shipped_vae, trained_vae = shipped[0].state_dict(), trained[0].state_dict()
    assert all(torch.equal(shipped_vae[key], trained_vae[key]) for key in shipped_vae)
    assert not (work / "vae").exists() and not (work / "vae-finetuned").exists()
    # Two steps from fresh weights: nothing like the shipped UNet.
    shipped_unet, trained_unet = shipped[1].state_dict(), trained[1].state_dict()
    assert max((shipped_unet[key] - trained_unet[key]).abs().max().item() for key in shipped_unet) > 0.1
    # Its own vae folder works too, and --init-from (which brings a VAE already) cannot be combined with it.
    assert train_micro.load_vae(out / "vae").config.scaling_factor == shipped[0].config.scaling_factor
    with pytest.raises(SystemExit):
        train_micro.parse_args([f"--vae-from={out}", f"--init-from={out}"])
    # The shape-balanced loss reaches the training: the same steps on the same data end elsewhere.
    balanced = tmp_path / "balanced"
    train_micro.main(
        [f"--vae-from={train_micro.DEFAULT_OUT}", *flags, "--shape-balance=1", f"--work={work}-b", f"--out={balanced}"]
    )
    balanced_unet = train_micro.load_exported(balanced)[1].state_dict()
    assert any(not torch.equal(balanced_unet[key], trained_unet[key]) for key in trained_unet)
    # The checks draw pictures between steps but take nothing from the training's random streams, so a
    # recipe can leave them out to save time and still end on the weights its measured run ended on.
    checked = tmp_path / "checked"
    # A smaller check (2 prompts, 1 img2img seed) runs the same code at a tenth of the pictures.
    evaluate, img2img_score = train_micro.evaluate, train_micro.img2img_score
    monkeypatch.setattr(train_micro, "evaluate", lambda *args, **kwargs: evaluate(*args, **kwargs, count=2))
    monkeypatch.setattr(train_micro, "img2img_score", lambda *args: img2img_score(*args, seeds=1))
    # The last --eval-every on the command line wins over the one in `flags`.
    train_micro.main(
        [f"--vae-from={train_micro.DEFAULT_OUT}", *flags, "--eval-every=1", f"--work={work}-c", f"--out={checked}"]
    )
    checked_unet = train_micro.load_exported(checked)[1].state_dict()
    assert all(torch.equal(checked_unet[key], trained_unet[key]) for key in trained_unet)


def test_training_from_scratch_keeps_the_main_phase_and_reruns_the_low_noise_phase_exactly(tmp_path):
    """A tiny run of every stage: the checkpoint kept at the end of the main phase, put over
    checkpoint.pt in a copy of the work folder, reruns the low-noise phase to the same weights."""
    import shutil

    flags = ["--images=16", "--batch=4", "--vae-steps=2", "--decoder-steps=2", "--unet-steps=2"]
    flags += ["--low-noise-steps=2", "--recolour-share=1", "--eval-every=1000"]
    work = tmp_path / "work"
    train_micro.main([*flags, f"--work={work}", f"--out={tmp_path / 'out'}"])
    kept = torch.load(work / "checkpoint-step2.pt", weights_only=False)
    assert kept["step"] == 2 and torch.load(work / "checkpoint.pt", weights_only=False)["step"] == 4
    # Its latents are the exported encoder's, so a stage started from the export reads them back.
    exported_vae = train_micro.load_exported(tmp_path / "out")[0]
    pictures = train_micro.training_pictures(16, seed=0)[1]
    assert train_micro.latents_key(exported_vae, pictures) == torch.load(work / "latents.pt")["key"]

    def rerun_low_noise_phase(name: str, *extra_flags: str) -> Path:
        rerun = tmp_path / name
        shutil.copytree(work, rerun)
        shutil.copyfile(work / "checkpoint-step2.pt", rerun / "checkpoint.pt")
        train_micro.main([*flags, *extra_flags, f"--work={rerun}", f"--out={tmp_path / f'out-{name}'}"])
        return rerun

    rerun_low_noise_phase("rerun")
    first, second = (train_micro.load_exported(tmp_path / name)[1].state_dict() for name in ("out", "out-rerun"))
    assert all(torch.equal(first[key], second[key]) for key in first)

    # Rerun with other rates, the command line's win over the checkpoint's: --text-lr 0 freezes the text encoder.
    frozen = rerun_low_noise_phase("frozen", "--text-lr=0")
    at_step2, at_end = (
        torch.load(path, weights_only=False) for path in (work / "checkpoint-step2.pt", frozen / "checkpoint.pt")
    )
    assert at_end["step"] == 4
    assert all(
        torch.equal(at_step2["text_encoder"][key], at_end["text_encoder"][key]) for key in at_end["text_encoder"]
    )
    assert not all(torch.equal(at_step2["unet"][key], at_end["unet"][key]) for key in at_end["unet"])
    # Its own VAE gets a preview table fit to it: a row of latent->RGB factors per latent channel.
    table = json.loads((tmp_path / "out" / "latent_rgb.json").read_text())
    assert len(table["factors"]) == 4 and len(table["bias"]) == 3
    assert table != json.loads((train_micro.DEFAULT_OUT / "latent_rgb.json").read_text())
    # The tokenizer is exported in SD's layout, the files it was built from.
    assert {path.name for path in (tmp_path / "out" / "tokenizer").iterdir()} == {
        path.name for path in architecture.TOKENIZER_DIR.iterdir()
    }


def test_the_vae_seed_picks_the_vae_alone_and_the_unet_still_learns_from_the_seeds_pictures(tmp_path, capsys):
    """--vae-seed: the VAE stages are those of a run at that --seed (its start, order and pictures), and the
    latents the UNet trains on are still made from --seed's pictures."""
    flags = ["--images=16", "--batch=4", "--vae-steps=2", "--decoder-steps=2", "--unet-steps=0"]
    flags += ["--low-noise-steps=0", "--eval-every=1000"]

    def trained(name: str, *seeds: str) -> Path:
        train_micro.main([*flags, *seeds, f"--work={tmp_path / name}", f"--out={tmp_path / name / 'model'}"])
        return tmp_path / name

    seed_1, vae_seed_1 = trained("seed-1", "--seed=1"), trained("vae-seed-1", "--vae-seed=1")
    for stage in ("vae", "vae-finetuned"):
        weights = {run: train_micro.load_vae(run / stage).state_dict() for run in (seed_1, vae_seed_1)}
        assert all(torch.equal(weights[seed_1][key], weights[vae_seed_1][key]) for key in weights[seed_1])
    # The same encoder in both runs; the latents differ, each made from its own --seed's pictures.
    encoder = train_micro.round_to_export_precision(train_micro.load_vae(vae_seed_1 / "vae"))
    for run, seed in ((seed_1, 1), (vae_seed_1, 0)):
        pictures = train_micro.training_pictures(16, seed=seed)[1]
        assert torch.equal(torch.load(run / "latents.pt")["latents"], train_micro.encode_pictures(encoder, pictures))
    # A VAE brought from elsewhere is not trained here, so there is nothing for the seed to pick.
    for brought in ("--vae-from", "--init-from"):
        with pytest.raises(SystemExit):
            train_micro.parse_args([f"{brought}={train_micro.DEFAULT_OUT}", "--vae-seed=1"])
        assert "--vae-seed seeds a VAE trained here" in capsys.readouterr().err


def test_a_new_vaes_posterior_starts_narrow_so_every_latent_channel_carries_colour():
    torch.manual_seed(0)
    vae = architecture.build_vae()
    train_micro.narrow_posterior(vae)
    _scenes, images = train_micro.training_pictures(8, seed=0)
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    # exp(-4 / 2): a twentieth of a unit-variance latent's spread, where the default init starts at 1.
    assert posterior.std.mean().item() == pytest.approx(0.135, abs=0.02)


class _MergesGreenIntoBlack:
    """A VAE stand-in that round-trips every pixel exactly except green ones, which come back black:
    what a VAE whose latents for the two colours coincide does."""

    def encode(self, images):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=images))

    def decode(self, latents):
        green = torch.tensor(dataset.PALETTE["green"]).view(1, 3, 1, 1) / 127.5 - 1
        is_green = ((latents - green).abs() < 0.02).all(1, keepdim=True)
        return SimpleNamespace(sample=torch.where(is_green, torch.full_like(latents, -1.0), latents))


def test_the_vae_colour_check_names_a_colour_the_vae_merges(caplog):
    caplog.set_level(logging.INFO, logger="train_micro")
    scenes, images = train_micro.training_pictures(64, seed=0)
    errors = train_micro.report_colour_errors("VAE decoder", _MergesGreenIntoBlack(), scenes, images, final=True)
    # Green (0, 128, 0) coming back black is 128 / 3 off per channel; its anti-aliased edge pixels come
    # back as they were, so the mean is a little lower. The rest is exact.
    assert 30 < errors["green"] < 128 / 3
    assert all(error < 1 for name, error in errors.items() if name != "green")
    assert f"green comes back {errors['green']:.1f} off" in caplog.text and "--vae-steps" in caplog.text
    # Before the decoder fine-tune errors are still high, and only logged.
    caplog.clear()
    train_micro.report_colour_errors("VAE", _MergesGreenIntoBlack(), scenes, images, final=False)
    assert "green 3" in caplog.text and "comes back" not in caplog.text


class _DrawsSmallBlackShapesGreen(_MergesGreenIntoBlack):
    """A VAE stand-in that round-trips every picture exactly except that a black shape comes back green:
    black backgrounds stay black, so per pixel black is mostly right."""

    def decode(self, latents):
        black = torch.tensor(dataset.PALETTE["black"]).view(1, 3, 1, 1) / 127.5 - 1
        green = torch.tensor(dataset.PALETTE["green"]).view(1, 3, 1, 1) / 127.5 - 1
        is_black = ((latents - black).abs() < 0.02).all(1, keepdim=True)
        in_shape = is_black & (is_black.float().mean(dim=(1, 2, 3), keepdim=True) < 0.5)
        return SimpleNamespace(sample=torch.where(in_shape, green.expand_as(latents), latents))


def test_the_vae_colour_check_names_a_colour_whose_shapes_come_back_as_another(caplog):
    caplog.set_level(logging.INFO, logger="train_micro")
    scenes, images = train_micro.training_pictures(256, seed=0)
    misreads = train_micro.shape_colour_misreads(_DrawsSmallBlackShapesGreen(), scenes, images)
    # (A black shape on a green background comes back as a blank green picture, read any which way.)
    assert misreads["black"] > 0.9 and all(share == 0.0 for name, share in misreads.items() if name != "black")
    # The per-pixel check alone passes such a VAE: black's pixels are mostly backgrounds, which come back.
    errors = train_micro.report_colour_errors("VAE decoder", _DrawsSmallBlackShapesGreen(), scenes, images, final=True)
    assert errors["black"] < train_micro.COLOUR_ERROR_WARNING
    assert f"{misreads['black']:.0%} of the black shapes come back read as another colour" in caplog.text
    assert "--vae-shape-balance" in caplog.text and "green comes back" not in caplog.text


def test_the_shipped_vae_round_trips_every_palette_colour():
    vae = train_micro.load_exported(train_micro.DEFAULT_OUT)[0]
    _scenes, images = train_micro.training_pictures(128, seed=0)
    errors = train_micro.colour_reconstruction_errors(vae, images)
    assert set(errors) == set(dataset.COLOURS)
    assert max(errors.values()) < train_micro.COLOUR_ERROR_WARNING
    # (Its worst is yellow: 4.8% of the yellow shapes in these 256 pictures read orange.)
    scenes, images = train_micro.training_pictures(256, seed=0)
    misreads = train_micro.shape_colour_misreads(vae, scenes, images)
    assert set(misreads) == set(dataset.COLOURS)
    assert max(misreads.values()) < train_micro.SHAPE_COLOUR_MISREAD_WARNING


def test_the_vae_shape_balance_weighs_each_pictures_shape_as_much_as_its_background(tmp_path):
    scenes, images = train_micro.training_pictures(32, seed=0)
    assert train_micro._vae_shape_weights(scenes, 0.0) is None  # the plain loss, as before the option
    indices = torch.tensor([3, 0, 7])
    weights = train_micro._vae_shape_weights(scenes, 1.0)(indices)
    assert weights.shape == (3, 1, dataset.IMAGE_SIZE, dataset.IMAGE_SIZE)
    assert torch.allclose(weights.mean(dim=(1, 2, 3)), torch.ones(3), atol=1e-5)
    inside = torch.from_numpy(np.stack([dataset.shape_coverage(scenes[i], dataset.IMAGE_SIZE) > 0.5 for i in indices]))
    share = (weights[:, 0] * inside).sum(dim=(1, 2)) / weights.sum(dim=(1, 2, 3))
    assert 0.4 < share.min() and share.max() <= 0.5

    # It reaches both VAE stages: two steps each end elsewhere with it than without.
    def trained(balance: float):
        args = train_micro.parse_args(["--vae-steps=2", "--decoder-steps=2", f"--vae-shape-balance={balance}"])
        work = tmp_path / str(balance)
        vae = train_micro.train_vae(images, scenes, args, work).eval()
        return vae, train_micro.finetune_decoder(vae, images, scenes, args, work)

    (plain_vae, plain_tuned), (balanced_vae, balanced_tuned) = trained(0.0), trained(0.5)
    for plain, balanced in ((plain_vae.encoder, balanced_vae.encoder), (plain_tuned.decoder, balanced_tuned.decoder)):
        assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), balanced.parameters(), strict=True))


def test_the_hold_loss_compares_with_the_starting_unet_in_its_timestep_range_only_and_pulls_back_towards_it():
    """--hold-weight's loss: zero for the starting weights themselves; drawn only at timesteps from
    --hold-from-timestep up to below --hold-to-timestep, by default half with the captions and half with
    the empty prompt; and descending it brings a moved UNet's predictions back towards the starting
    ones."""
    _vae, unet, text_encoder = train_micro.load_exported(train_micro.DEFAULT_OUT)
    held = architecture.build_unet().eval().requires_grad_(False)
    held.load_state_dict(unet.state_dict())
    tokenizer = architecture.build_tokenizer()
    ids = tokenizer(["a red circle on a blue background"] * 4 + [""], padding="max_length", max_length=77).input_ids
    with torch.no_grad():
        hidden = text_encoder(torch.tensor(ids)).last_hidden_state
    captioned, empty = hidden[:4], hidden[4:]
    latents = torch.randn((4, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    schedule = architecture.build_scheduler()

    def gap(model, seed: int = 1, empty_share: float = 0.5) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(latents.shape, generator=generator)
        return train_micro.held_prediction_gap(
            model, held, schedule, latents, noise, captioned, empty, (700, 900), generator, empty_share=empty_share
        )

    assert gap(unet).item() == 0.0
    seen = []
    original_forward = held.forward

    def spying_forward(sample, timestep, conditioning):
        seen.append((timestep, conditioning))
        return original_forward(sample, timestep, conditioning)

    held.forward = spying_forward
    gap(unet)
    # --hold-empty-share 0 holds the prompted predictions only.
    gap(unet, empty_share=0.0)
    del held.forward
    timesteps, conditioning = seen[0]
    assert timesteps.min() >= 700 and timesteps.max() < 900
    assert torch.equal(conditioning[:2], captioned[:2]) and torch.equal(conditioning[2:], empty.expand(2, -1, -1))
    assert torch.equal(seen[1][1], captioned)

    shift = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(1e-3 * torch.randn(parameter.shape, generator=shift))
    moved = gap(unet, seed=3).item()
    assert moved > 0
    optimizer = torch.optim.SGD(unet.parameters(), lr=0.01)
    for seed in range(10, 20):
        optimizer.zero_grad()
        gap(unet, seed).backward()
        optimizer.step()
    assert gap(unet, seed=3).item() < 0.5 * moved
    with pytest.raises(SystemExit):
        train_micro.parse_args(["--hold-weight=1"])
    for bad_range in (["--hold-from-timestep=500", "--hold-to-timestep=400"], ["--hold-to-timestep=1001"]):
        with pytest.raises(SystemExit):
            train_micro.parse_args([f"--init-from={train_micro.DEFAULT_OUT}", "--hold-weight=1", *bad_range])


def test_the_cfg_target_makes_guidance_at_its_scale_give_the_noise_on_the_named_rows_only():
    """--cfg-target-scale: on the rows it names (captioned, below --cfg-target-below) the prompted
    prediction's target is the one whose CFG at that scale, against the UNet's own empty-prompt
    prediction, is the picture's noise; every other row keeps the noise itself."""
    _vae, unet, text_encoder = train_micro.load_exported(train_micro.DEFAULT_OUT)
    tokenizer = architecture.build_tokenizer()
    with torch.no_grad():
        empty = text_encoder(torch.tensor([tokenizer("", padding="max_length", max_length=77).input_ids]))
    empty = empty.last_hidden_state
    generator = torch.Generator().manual_seed(0)
    noisy, noise = torch.randn((2, 4, 4, 16, 16), generator=generator)
    timesteps = torch.tensor([100, 300, 500, 900])
    rows = torch.tensor([True, False, True, False])
    target = train_micro.cfg_consistent_target(unet, noisy, timesteps, noise, empty, rows, 7.0)
    assert torch.equal(target[~rows], noise[~rows])
    with torch.no_grad():
        empty_prediction = unet(noisy, timesteps, empty.expand(4, -1, -1)).sample
    guided = empty_prediction + 7.0 * (target - empty_prediction)
    assert torch.allclose(guided[rows], noise[rows], atol=1e-4)
    assert (target[rows] - noise[rows]).abs().mean() > 0.1
    # At scale 1 (CFG off) the target is the noise; with no row named nothing is computed.
    assert torch.allclose(train_micro.cfg_consistent_target(unet, noisy, timesteps, noise, empty, rows, 1.0), noise)
    assert train_micro.cfg_consistent_target(unet, noisy, timesteps, noise, empty, rows & False, 7.0) is noise
    for bad in (["--cfg-target-scale=0.5"], ["--cfg-target-below=0"], ["--cfg-target-below=1001"]):
        with pytest.raises(SystemExit):
            train_micro.parse_args(bad)


def test_the_cfg_target_and_bf16_reach_the_training_and_bf16_runs_repeat(tmp_path):
    flags = [f"--vae-from={train_micro.DEFAULT_OUT}", "--images=16", "--batch=4", "--unet-steps=2"]
    flags += ["--low-noise-steps=0", "--eval-every=1000"]

    def trained(name: str, *extra: str) -> dict[str, torch.Tensor]:
        train_micro.main([*flags, *extra, f"--work={tmp_path / name}", f"--out={tmp_path / name / 'model'}"])
        return train_micro.load_exported(tmp_path / name / "model")[1].state_dict()

    plain, bf16 = trained("plain"), trained("bf16", "--bf16")
    for changed in (trained("cfg-target", "--cfg-target-scale=7", "--cfg-target-below=1000"), bf16):
        assert any(not torch.equal(changed[key], plain[key]) for key in plain)
    again = trained("bf16-again", "--bf16")
    assert all(torch.equal(again[key], bf16[key]) for key in bf16)


def test_a_fine_tune_can_leave_the_low_timesteps_out_and_hold_them_with_other_colours_captions():
    """--min-timestep keeps the first phase's pictures at that noise or more (recoloured captions, as
    ever, meet nearly finished pictures only); --hold-recolour-share gives that share of the hold's
    captions other colours than the picture's, which is what img2img at a low strength asks for."""
    generator = torch.Generator().manual_seed(0)
    recolour = [False] * 300 + [True] * 100
    timesteps = train_micro.training_timesteps(recolour, 250, 120, generator)
    assert timesteps[:300].min() >= 250 and timesteps[:300].max() < 1000
    assert timesteps[300:].max() < 120
    assert train_micro.training_timesteps([False] * 400, 0, 120, generator).min() < 250
    with pytest.raises(SystemExit):
        train_micro.parse_args(["--min-timestep=1000"])

    scenes = dataset.make_images(40, seed=0)[0]
    all_recoloured = train_micro.partly_recoloured(scenes, 1.0, random.Random(0))
    assert all(
        new.colour != old.colour and new.shape == old.shape for new, old in zip(all_recoloured, scenes, strict=True)
    )
    assert train_micro.partly_recoloured(scenes, 0.0, random.Random(0)) == scenes
    some = train_micro.partly_recoloured(scenes, 0.5, random.Random(0))
    assert 10 < sum(new.colour != old.colour for new, old in zip(some, scenes, strict=True)) < 30


def test_recoloured_captions_can_keep_the_background():
    """--recolour-background-share 0 changes only the shape's colour (all img2img at a low strength is
    measured on), 1 always the background's too; the default, 0.5, about half of them, as always."""
    scenes = dataset.make_images(40, seed=0)[0]
    for share, backgrounds_changed in ((0.0, 0), (1.0, 40)):
        new_scenes = train_micro.partly_recoloured(scenes, 1.0, random.Random(0), share)
        assert sum(new.background != old.background for new, old in zip(new_scenes, scenes, strict=True)) == (
            backgrounds_changed
        )
        assert all(new.colour not in (old.colour, new.background) for new, old in zip(new_scenes, scenes, strict=True))
    half = train_micro.partly_recoloured(scenes, 1.0, random.Random(0))
    assert 10 < sum(new.background != old.background for new, old in zip(half, scenes, strict=True)) < 30
    assert train_micro.parse_args([]).recolour_background_share == 0.5


def test_export_only_without_a_checkpoint_is_refused_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        train_micro.main(["--export-only", f"--work={tmp_path / 'empty'}", f"--out={out}"])
    assert f"--export-only writes the model from {tmp_path / 'empty' / 'checkpoint.pt'}, which is not there" in (
        capsys.readouterr().err
    )
    assert not out.exists()


@pytest.mark.parametrize("share", train_micro.SHARE_OPTIONS)
def test_every_share_option_outside_0_to_1_is_refused_by_name(share, capsys):
    option = "--" + share.replace("_", "-")
    for bad in ("-0.1", "1.5"):
        with pytest.raises(SystemExit):
            train_micro.parse_args([f"{option}={bad}"])
        assert f"{option} must be between 0 and 1, not {float(bad)}" in capsys.readouterr().err
    assert getattr(train_micro.parse_args([f"{option}=1"]), share) == 1.0


def test_the_auxiliary_loss_is_a_number_when_no_caption_in_the_batch_names_an_attribute():
    """With mostly empty captions a whole batch can name no shape (or size); that head then adds nothing,
    instead of turning the logged loss into nan, and a named attribute still counts as before."""
    torch.manual_seed(0)
    heads = train_micro.AuxiliaryHeads(architecture.TEXT_HIDDEN)
    captions = train_micro.CaptionBatcher(architecture.build_tokenizer(), random.Random(0), random.Random(1))
    ids = torch.tensor([captions.token_ids("red"), captions.token_ids("")])
    hidden = torch.randn(2, 77, architecture.TEXT_HIDDEN, requires_grad=True)
    nouns, background = captions.shape_nouns, captions.background_noun
    unnamed = {key: torch.tensor([-100, -100]) for key in heads.eos}

    nothing_named = heads.loss(hidden, ids, unnamed, nouns, background)
    nothing_named.backward()
    assert nothing_named.item() == 0.0
    assert torch.count_nonzero(hidden.grad) == 0

    red = {**unnamed, "colour": torch.tensor([0, -100])}
    eos = hidden[torch.arange(2), ids.argmax(-1)]
    expected = torch.nn.functional.cross_entropy(heads.eos["colour"](eos[:1]), torch.tensor([0]))
    assert torch.allclose(heads.loss(hidden, ids, red, nouns, background), expected)


def test_the_ideal_denoiser_is_the_posterior_mean_over_the_matching_pictures():
    from training import ideal

    scenes = [
        dataset.ShapeScene("circle", "red", "blue", "small", (0, 0, 0, 0)),
        dataset.ShapeScene("circle", "red", "blue", "large", (0, 0, 0, 0)),
        dataset.ShapeScene("square", "red", "blue", "large", (0, 0, 0, 0)),
    ]
    latents = torch.randn((3, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    denoiser = ideal.IdealDenoiser(latents, scenes)
    assert denoiser.matching(scenes[0], size_named=False).tolist() == [0, 1]
    assert denoiser.matching(scenes[1], size_named=True).tolist() == [1]
    with pytest.raises(ValueError, match="no picture of the 3 is a small red square on blue: use more pictures"):
        denoiser.matching(dataclasses.replace(scenes[2], size="small"), size_named=True)
    near_the_third = latents[2:] + 0.01 * torch.randn((1, 4, 16, 16))
    # At a small sigma the posterior is the nearest picture; at a huge one, every picture alike.
    assert torch.allclose(denoiser.mean(near_the_third, 0.05), latents[2:], atol=1e-4)
    assert torch.allclose(denoiser.mean(near_the_third, 1e4), latents.mean(0, keepdim=True), atol=1e-3)
    unconditional, conditional = denoiser.for_scene(scenes[0], size_named=False)(near_the_third, 0.05)
    assert torch.allclose(unconditional, latents[2:], atol=1e-4)
    assert (conditional - latents[:2]).flatten(1).norm(dim=1).min() < 1e-3  # only the red circles count


# One of each kind of schedule the loop reads sigma from: k-diffusion-style (Euler, LMS), variance-
# preserving with a sigma table (DPM++ 2M), and by timestep alone (DDIM).
@pytest.mark.parametrize("sampler", ["Euler", "LMS", "DPM++ 2M", "DDIM"])
def test_the_ideal_denoisers_sampling_loop_draws_the_pages_picture_with_the_models_unet(micro_engine, sampler):
    """tools/ideal_denoiser_samplers.py runs its denoisers through training/ideal.py's loop; with the
    model's own UNet that loop must draw what the page draws, or its readings would say nothing."""
    from engine.previews import DecoderPreviewer
    from training import ideal

    components = micro_engine.loaded.components
    config = dict(micro_engine.loaded.scheduler_config)
    prompt, seed = "a yellow triangle on a green background", 11
    denoise = quality.unet_denoiser(components, prompt, config)
    latent = ideal.sample(denoise, config, sampler, steps=20, cfg_scale=7.0, seed=seed)
    vae = components["vae"]
    looped = np.asarray(DecoderPreviewer(vae, vae.config.scaling_factor)(latent[0]), dtype=float)
    on_page = np.asarray(quality.generate(micro_engine, prompt=prompt, seed=seed, sampler_name=sampler), dtype=float)
    assert np.abs(looped - on_page).mean() < 2.0


def test_the_ideal_denoiser_of_the_training_data_breaks_up_under_lms_at_cfg_7_too(micro_engine):
    """The README's account of LMS: the exact minimiser of the training loss (2,000 of its pictures
    here; 15-17 of 24 with 10,000 to 30,000) misses backgrounds with LMS at CFG 7 where Euler a gets
    every one, so fitting the data more closely cannot lift LMS to the bar."""
    from training import ideal

    vae = micro_engine.loaded.components["vae"]
    config = dict(micro_engine.loaded.scheduler_config)
    training_set = ideal.training_set_denoiser(vae, 2000)

    def hits(sampler: str) -> int:
        return ideal.background_hits(
            lambda prompt, scene: training_set.for_scene(scene, size_named=scene.size in prompt),
            vae,
            config,
            sampler,
            cfg_scale=7.0,
            steps=20,
            prompts=24,
        )

    assert hits("Euler a") == 24
    assert hits("LMS") <= 20
