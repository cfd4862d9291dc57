"""Textual inversion embeddings from the embeddings folder, as A1111 reads them.

The embeddings here are made from the micro model's own token table: `crimson` holds the vector of the
token "red", so a prompt naming it must draw exactly what the same prompt with "red" draws, and a
two-vector one stands for "red circle". That checks the whole path (file formats, tokenizer, chunking,
text encoder, both prompt syntaxes) against pictures whose meaning is known.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engine import Engine, GenerationRequest
from engine.embeddings import load_embeddings
from engine.presets import SHIPPED_MICRO_MODEL
from engine.prompts import SDXLPromptEncoder
from tests.test_prompts_sdxl import build_tiny_sdxl_pipeline
from training import dataset


def token_rows(tokenizer, text_encoder, *words: str) -> torch.Tensor:
    """The token-table rows of `words` (each one CLIP token), as an embedding's vectors."""
    table = text_encoder.get_input_embeddings().weight.detach().float()
    return torch.stack([table[tokenizer.convert_tokens_to_ids(f"{word}</w>")] for word in words])


def a1111_pt(rows: torch.Tensor, name: str) -> dict:
    """What A1111's textual inversion training saves in a .pt file."""
    return {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": rows},
        "name": name,
        "step": 1500,
        "sd_checkpoint": "e6fa0c32b3",
        "sd_checkpoint_name": "micro-shapes",
    }


@pytest.fixture(scope="module")
def embeddings_dir(tmp_path_factory):
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("embeddings")
    tokenizer = CLIPTokenizer.from_pretrained(SHIPPED_MICRO_MODEL, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(SHIPPED_MICRO_MODEL, subfolder="text_encoder")
    torch.save(a1111_pt(token_rows(tokenizer, text_encoder, "red"), "crimson"), folder / "Crimson.pt")
    (folder / "shapes").mkdir()  # A1111 reads subfolders too
    save_file(
        {"emb_params": token_rows(tokenizer, text_encoder, "red", "circle")}, folder / "shapes" / "redshape.safetensors"
    )
    save_file({"emb_params": torch.zeros(8, 768)}, folder / "sd15-negative.safetensors")
    (folder / "broken.pt").write_bytes(b"not a torch file")
    # A download cut short: a model must still load beside it.
    (folder / "half.safetensors").write_bytes((folder / "sd15-negative.safetensors").read_bytes()[:100])
    (folder / "notes.txt").write_text("not an embedding")
    return folder


@pytest.fixture(scope="module")
def ti_engine(embeddings_dir, models_dir):
    return Engine(model=str(SHIPPED_MICRO_MODEL), models_dir=models_dir, embeddings_dir=embeddings_dir)


def draw(engine: Engine, prompt: str, **fields):
    result = list(engine.generate(GenerationRequest(prompt=prompt, **{"steps": 12, **fields})))[-1]
    return np.asarray(result.images[0]), result.infotexts[0]


def test_embeddings_that_fit_the_model_are_loaded_and_the_rest_are_listed_with_why(ti_engine):
    report = ti_engine.loaded.embeddings
    assert sorted(report.loaded) == ["Crimson", "redshape"]
    assert (report.loaded["Crimson"].vectors, report.loaded["redshape"].vectors) == (1, 2)
    assert report.loaded["Crimson"].shape == 64 and report.loaded["Crimson"].step == 1500
    assert sorted(report.skipped) == ["sd15-negative"]
    assert report.reasons["sd15-negative"] == "vectors 768 wide; this model's text encoder takes 64"
    assert "broken.pt could not be read" in report.reasons["broken"]
    assert "half.safetensors could not be read" in report.reasons["half"]
    assert "download the checkpoint again" in report.reasons["half"]


def test_an_embedding_draws_what_its_vectors_mean(ti_engine):
    red, _ = draw(ti_engine, "a red circle on a blue background", seed=4)
    # Names are read in any case, as A1111 reads them (the prompt is lower-cased before tokenizing).
    for prompt in ("a crimson circle on a blue background", "a CRIMSON circle on a blue background"):
        assert np.array_equal(draw(ti_engine, prompt, seed=4)[0], red)
    # Two vectors stand for two words.
    assert np.array_equal(draw(ti_engine, "a redshape on a blue background", seed=4)[0], red)
    reading = dataset.classify(Image.fromarray(red))
    assert (reading.colour, reading.background) == ("red", "blue")
    # compel's syntax reads the same embeddings.
    compel_red, _ = draw(ti_engine, "a red circle on a blue background", seed=4, prompt_syntax="compel")
    compel_named, _ = draw(ti_engine, "a redshape on a blue background", seed=4, prompt_syntax="compel")
    assert np.array_equal(compel_named, compel_red)


def test_an_embedding_counts_one_token_per_vector_and_is_never_cut_between_chunks(ti_engine):
    assert ti_engine.token_counts("a crimson circle") == [3]
    assert ti_engine.token_counts("a redshape") == [3]
    # 74 words leave one place in the first chunk: the two-vector embedding starts the second.
    assert ti_engine.token_counts("tree " * 74 + "redshape") == [74, 2]
    assert ti_engine.token_counts("tree " * 74 + "crimson") == [75]


def test_infotext_names_the_embeddings_a_picture_used_by_hash(ti_engine):
    report = ti_engine.loaded.embeddings
    _, infotext = draw(ti_engine, "a crimson circle", negative_prompt="redshape", seed=1, steps=2)
    hashes = re.search(r'TI hashes: "([^"]*)"', infotext).group(1)
    assert hashes == f"Crimson: {report.loaded['Crimson'].short_hash}, redshape: {report.loaded['redshape'].short_hash}"
    assert len(report.loaded["Crimson"].short_hash) == 12
    _, plain = draw(ti_engine, "a red circle", seed=1, steps=2)
    assert "TI hashes" not in plain


def test_sdxl_embeddings_load_into_both_text_encoders(tmp_path):
    pipe = build_tiny_sdxl_pipeline()
    save_file(
        {
            "clip_l": token_rows(pipe.tokenizer, pipe.text_encoder, "red"),
            "clip_g": token_rows(pipe.tokenizer_2, pipe.text_encoder_2, "red"),
        },
        tmp_path / "crimson.safetensors",
    )
    save_file({"emb_params": torch.zeros(1, 32)}, tmp_path / "sd1-only.safetensors")
    report = load_embeddings(pipe, tmp_path)
    assert list(report.loaded) == ["crimson"] and report.loaded["crimson"].shape == 64
    assert report.reasons["sd1-only"].startswith("made for SD 1.x/2.x")
    encoder = SDXLPromptEncoder(pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2)
    named, red = encoder.encode("a crimson cat")[0], encoder.encode("a red cat")[0]
    assert torch.equal(named.embeds, red.embeds) and torch.equal(named.pooled, red.pooled)


def test_a_missing_embeddings_folder_is_no_embeddings(micro_engine):
    assert micro_engine.loaded.embeddings.loaded == {}
    assert micro_engine.token_counts("a crimson circle") == [3]


def test_the_api_lists_embeddings_as_a1111_does(ti_engine, embeddings_dir, tmp_path):
    import httpx

    from ui.server import ServerSettings, launch

    handle = launch(ti_engine, ServerSettings(host="127.0.0.1", port=0, api=True, outputs_dir=tmp_path, page=False))
    try:
        listing = httpx.get(handle.url + "sdapi/v1/embeddings", timeout=60).json()
        flags = httpx.get(handle.url + "sdapi/v1/cmd-flags", timeout=60).json()
        refreshed = httpx.post(handle.url + "sdapi/v1/refresh-embeddings", timeout=60)
    finally:
        handle.close()
    assert listing["loaded"]["Crimson"] == {
        "step": 1500,
        "sd_checkpoint": "e6fa0c32b3",
        "sd_checkpoint_name": "micro-shapes",
        "shape": 64,
        "vectors": 1,
    }
    assert listing["loaded"]["redshape"]["vectors"] == 2
    assert flags["embeddings_dir"] == str(embeddings_dir)
    assert refreshed.status_code == 200
    assert listing["skipped"] == {
        "sd15-negative": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 768, "vectors": 8}
    }


def test_the_page_names_the_embeddings_under_the_model(ti_engine):
    from ui.page import _first_names, _model_note

    note = _model_note(ti_engine)
    assert "Embeddings: Crimson, redshape" in note
    assert "Embeddings skipped: broken, half, sd15-negative" in note
    assert "sd15-negative: vectors 768 wide; this model&#x27;s text encoder takes 64" in note
    assert _first_names([f"e{index}" for index in range(10)]) == "e0, e1, e2, e3, e4, e5, e6, e7 and 2 more"


def test_a_refresh_reads_the_folder_again_only_when_it_changed(tmp_path, models_dir, embeddings_dir):
    import shutil

    folder = tmp_path / "embeddings"
    folder.mkdir()
    shutil.copy(embeddings_dir / "Crimson.pt", folder / "Crimson.pt")
    engine = Engine(model=str(SHIPPED_MICRO_MODEL), models_dir=models_dir, embeddings_dir=folder)
    report = engine.loaded.embeddings
    assert engine.refresh_embeddings() is report  # nothing changed: nothing reread

    # One file added, one taken away.
    shutil.copy(embeddings_dir / "shapes" / "redshape.safetensors", folder / "redshape.safetensors")
    (folder / "Crimson.pt").unlink()
    assert list(engine.refresh_embeddings().loaded) == ["redshape"]
    assert engine.token_counts("a redshape") == [3]
    red, _ = draw(engine, "a red circle on a blue background", seed=4)
    assert np.array_equal(draw(engine, "a redshape on a blue background", seed=4)[0], red)
    # "crimson" is an ordinary word again, and its token is the tokenizer's own.
    tokenizer = engine.loaded.components["tokenizer"]
    assert "Crimson" not in tokenizer.get_vocab()
    assert engine.token_counts("a crimson circle") == [len(tokenizer("a crimson circle")["input_ids"]) - 2]
