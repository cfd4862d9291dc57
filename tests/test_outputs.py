"""engine.outputs: A1111's folder layout and numbering, infotexts in the files, racing saves."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from PIL import Image

from engine.infotext import read_infotext
from engine.outputs import next_number, output_folder, save_image

DAY = dt.date(2024, 5, 1)
INFOTEXT = (
    "a lighthouse, at dusk\nNegative prompt: fog\nSteps: 4, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 64x64"
)


def picture(color=(200, 40, 40)) -> Image.Image:
    return Image.new("RGB", (64, 64), color)


def test_txt2img_goes_to_dated_txt2img_folder_numbered_with_seed(tmp_path):
    path = save_image(picture(), INFOTEXT, outputs_dir=tmp_path, mode="txt2img", seed=1234, day=DAY)
    assert path == tmp_path / "txt2img-images" / "2024-05-01" / "00000-1234.png"
    assert path.is_file()


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_img2img_and_inpaint_share_the_img2img_folder(tmp_path, mode):
    path = save_image(picture(), INFOTEXT, outputs_dir=tmp_path, mode=mode, seed=5, day=DAY)
    assert path.parent == tmp_path / "img2img-images" / "2024-05-01"


def test_today_is_the_default_day(tmp_path):
    path = save_image(picture(), None, outputs_dir=tmp_path, mode="txt2img", seed=1)
    assert path.parent.name == dt.date.today().isoformat()
    assert output_folder(tmp_path, "txt2img") == path.parent


def test_numbers_continue_from_the_highest_existing_file(tmp_path):
    folder = output_folder(tmp_path, "txt2img", DAY)
    folder.mkdir(parents=True)
    (folder / "00041-99.png").write_bytes(b"")
    (folder / "00007-3.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not numbered")
    first = save_image(picture(), INFOTEXT, outputs_dir=tmp_path, mode="txt2img", seed=10, day=DAY)
    second = save_image(picture(), INFOTEXT, outputs_dir=tmp_path, mode="txt2img", seed=10, day=DAY)
    assert first.name == "00042-10.png"
    assert second.name == "00043-10.png"
    assert next_number(folder) == 44


def test_png_keeps_the_infotext_in_its_parameters_chunk(tmp_path):
    path = save_image(picture(), INFOTEXT, outputs_dir=tmp_path, mode="txt2img", seed=1234, day=DAY)
    with Image.open(path) as image:
        assert image.text["parameters"] == INFOTEXT
        assert image.size == (64, 64)
    assert read_infotext(path.read_bytes()) == INFOTEXT


@pytest.mark.parametrize("fmt, suffix", [("jpg", ".jpg"), ("jpeg", ".jpg"), ("webp", ".webp")])
def test_jpeg_and_webp_keep_the_infotext_in_exif_like_a1111(tmp_path, fmt, suffix):
    path = save_image(picture(), INFOTEXT, outputs_dir=tmp_path, mode="txt2img", seed=8, fmt=fmt, day=DAY)
    assert path.suffix == suffix
    assert read_infotext(path.read_bytes()) == INFOTEXT


def test_rgba_images_are_saved_as_jpeg(tmp_path):
    image = Image.new("RGBA", (32, 32), (1, 2, 3, 128))
    path = save_image(image, INFOTEXT, outputs_dir=tmp_path, mode="txt2img", seed=8, fmt="jpg", day=DAY)
    with Image.open(path) as saved:
        assert saved.mode == "RGB"


def test_extras_results_are_numbered_without_a_seed_among_the_same_counter(tmp_path):
    first = save_image(picture(), None, outputs_dir=tmp_path, mode="extras", seed=None, day=DAY, postprocessing="x: 1")
    second = save_image(picture(), None, outputs_dir=tmp_path, mode="extras", seed=None, day=DAY)
    assert (first.name, second.name) == ("00000.png", "00001.png")
    assert first.parent == tmp_path / "extras-images" / DAY.isoformat()
    with Image.open(first) as saved:
        assert saved.info["postprocessing"] == "x: 1"
    # A seeded file in the same folder counts too.
    (first.parent / "00007-5.png").write_bytes(b"")
    assert save_image(picture(), None, outputs_dir=tmp_path, mode="extras", seed=None, day=DAY).name == "00008.png"


def test_bad_mode_and_format_are_refused_with_the_choices(tmp_path):
    with pytest.raises(ValueError, match="mode: got 'grids'; allowed: txt2img, img2img, inpaint, extras"):
        save_image(picture(), None, outputs_dir=tmp_path, mode="grids", seed=1)
    with pytest.raises(ValueError, match="fmt: got 'gif'"):
        save_image(picture(), None, outputs_dir=tmp_path, mode="txt2img", seed=1, fmt="gif")


def test_racing_saves_never_share_a_number_or_overwrite(tmp_path):
    """Eight threads saving at once, same seed and different seeds: every file keeps its own number."""
    saved: list = []
    errors: list = []
    start = threading.Barrier(8)

    def worker(index: int) -> None:
        try:
            start.wait()
            for _ in range(6):
                seed = 77 if index % 2 else index  # half collide on the whole name, half only on the number
                saved.append(save_image(picture(), f"job {index}", outputs_dir=tmp_path, mode="txt2img", seed=seed))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert not errors
    assert len(saved) == 48 and len(set(saved)) == 48
    numbers = sorted(int(path.name.split("-")[0]) for path in saved)
    assert numbers == list(range(48))
    folder = saved[0].parent
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in saved)  # no claim files left
