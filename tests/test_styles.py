"""A1111's prompt styles (styles.csv): read as A1111 writes the file, merged into a job's prompts."""

from __future__ import annotations

import httpx
import pytest

from engine import Engine, GenerationRequest, InvalidRequestError
from engine.presets import SHIPPED_MICRO_MODEL
from engine.styles import merge_style, read_styles
from training import dataset

# As A1111 saves it: a header, quoted fields where they hold commas, a style without a negative.
STYLES_CSV = (
    'name,prompt,negative_prompt\n"On blue","{prompt} on a blue background","red, green"\nSimple,simple,\nEmpty,,\n'
)


@pytest.fixture(scope="module")
def styles_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("webui") / "styles.csv"
    path.write_text("\ufeff" + STYLES_CSV, encoding="utf-8")  # with the BOM Excel adds
    return path


@pytest.fixture(scope="module")
def styled_engine(styles_file, models_dir):
    return Engine(model=str(SHIPPED_MICRO_MODEL), models_dir=models_dir, styles_file=styles_file)


def test_styles_are_read_and_merged_as_a1111_merges_them(styles_file, tmp_path):
    styles = read_styles(styles_file)
    assert list(styles) == ["On blue", "Simple", "Empty"]
    assert styles["On blue"].negative_prompt == "red, green"
    assert merge_style("a circle", "{prompt} on a blue background") == "a circle on a blue background"
    assert merge_style("a circle ", "simple") == "a circle, simple"
    assert merge_style("", "simple") == "simple" and merge_style("blurry", "") == "blurry"
    assert read_styles(tmp_path / "missing.csv") == {}


def test_a_style_changes_the_picture_and_the_infotext_holds_the_merged_prompts(styled_engine):
    request = GenerationRequest(
        prompt="a yellow circle", negative_prompt="blurry", styles=["On blue", "Simple"], seed=3
    )
    checked = styled_engine.validate(request)
    assert checked.prompt == "a yellow circle on a blue background, simple" and checked.styles is None
    assert checked.negative_prompt == "blurry, red, green"
    result = list(styled_engine.generate(request))[-1]
    reading = dataset.classify(result.images[0])
    assert (reading.colour, reading.background) == ("yellow", "blue")
    assert result.infotexts[0].startswith(
        "a yellow circle on a blue background, simple\nNegative prompt: blurry, red, green\n"
    )


def test_an_unknown_style_is_refused_naming_the_ones_there_are(styled_engine, styles_file):
    with pytest.raises(
        InvalidRequestError,
        match=r"styles: got 'On red'; allowed: the name of a style in .*\(there: On blue, Simple, Empty\)",
    ):
        styled_engine.validate(GenerationRequest(prompt="x", styles=["On red"]))
    with pytest.raises(InvalidRequestError, match="styles: got 5; allowed: a list of style names"):
        styled_engine.validate(GenerationRequest(prompt="x", styles=5))


def test_the_api_lists_styles_and_applies_them(styled_engine, tmp_path):
    from ui.server import ServerSettings, launch

    handle = launch(styled_engine, ServerSettings(host="127.0.0.1", port=0, api=True, outputs_dir=tmp_path, page=False))
    try:
        api = handle.url + "sdapi/v1/"
        listing = httpx.get(api + "prompt-styles", timeout=60).json()
        made = httpx.post(
            api + "txt2img", json={"prompt": "a white square", "styles": ["On blue"], "steps": 2}, timeout=60
        )
        refused = httpx.post(api + "txt2img", json={"prompt": "x", "styles": ["nope"], "steps": 2}, timeout=60)
    finally:
        handle.close()
    assert listing[0] == {"name": "On blue", "prompt": "{prompt} on a blue background", "negative_prompt": "red, green"}
    info = made.json()["info"]
    assert made.status_code == 200 and '"styles": ["On blue"]' in info
    assert "a white square on a blue background" in info and 'ignored_fields": []' in info
    assert refused.status_code == 422 and refused.json()["field"] == "styles"


def test_styles_file_flag(tmp_path, styles_file):
    from ui.server import parse_args

    assert parse_args(["--styles-file", str(styles_file)], environ={}).styles_file == styles_file


# The style editor ---------------------------------------------------------------------------------


@pytest.fixture
def editable(models_dir, tmp_path):
    """A tiny-model engine on its own copy of the styles file, with a column A1111 does not write."""
    path = tmp_path / "styles.csv"
    path.write_text("\ufeff" + STYLES_CSV.replace("negative_prompt\n", "negative_prompt,note\n", 1), encoding="utf-8")
    return Engine(model="tiny-sd", models_dir=models_dir, styles_file=path), path


def test_the_editor_saves_new_and_changed_styles_in_place_and_deletes_them(editable):
    engine, path = editable
    engine.save_style("  Dusk ", "{prompt}, at dusk", 'noon, "bright"')
    engine.save_style("Simple", "simple, plain", "")
    styles = read_styles(path)
    assert list(styles) == ["On blue", "Simple", "Empty", "Dusk"]  # a changed style keeps its place
    assert styles["Dusk"].prompt == "{prompt}, at dusk" and styles["Dusk"].negative_prompt == 'noon, "bright"'
    assert styles["Simple"].prompt == "simple, plain" and styles["On blue"].negative_prompt == "red, green"
    assert path.read_text(encoding="utf-8").splitlines()[0] == "name,prompt,negative_prompt,note"
    assert (path.parent / "styles.csv.bak").is_file()  # the file before, as A1111 keeps it
    # A saved style runs at once: the file is read on each request.
    checked = engine.validate(GenerationRequest(prompt="a house", styles=["Dusk"]))
    assert checked.prompt == "a house, at dusk" and checked.negative_prompt == 'noon, "bright"'

    engine.delete_style("Simple")
    assert list(read_styles(path)) == ["On blue", "Empty", "Dusk"]
    with pytest.raises(InvalidRequestError, match="Simple") as missing:
        engine.delete_style("Simple")
    assert missing.value.field == "style name"


@pytest.mark.parametrize("name", ["", "   ", "two\nlines", "x" * 201, None, 3])
def test_a_style_without_a_usable_name_is_refused_and_the_file_is_left_alone(editable, name):
    engine, path = editable
    before = path.read_bytes()
    with pytest.raises(InvalidRequestError) as refused:
        engine.save_style(name, "p", "n")
    assert refused.value.field == "style name" and path.read_bytes() == before


def test_the_page_editor_picks_saves_applies_and_deletes(editable):
    import gradio as gr

    from ui.page import _apply_styles, _delete_style, _pick_style, _save_style

    engine, path = editable
    assert _pick_style(engine, "On blue") == ("{prompt} on a blue background", "red, green")
    assert all(isinstance(value, type(gr.skip())) for value in _pick_style(engine, "a new one"))

    name_list, tab_styles = _save_style(engine, "Night", "{prompt} at night", "day")
    assert name_list["value"] == "Night" and "Night" in tab_styles["choices"]
    with pytest.raises(gr.Error, match="style name"):
        _save_style(engine, " ", "p", "n")

    # Apply: the styles move into the prompts and leave the selection, so they are not added twice.
    assert _apply_styles(engine, "a house", "blurry", ["Night", "Simple"]) == (
        "a house at night, simple",
        "blurry, day",
        [],
    )
    with pytest.raises(gr.Error, match="styles"):
        _apply_styles(engine, "a house", "", [])

    name_list, prompt, negative, tab_styles = _delete_style(engine, "Night", ["Night", "Simple"])
    assert "Night" not in read_styles(path) and (prompt, negative) == ("", "")
    assert tab_styles["value"] == ["Simple"] and "Night" not in tab_styles["choices"]
