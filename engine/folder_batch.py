"""A1111's batches from folders on the server (img2img's Batch tab, Extras' Batch from Directory): every picture
under an input folder, one job each, each result written to an output folder under the picture's own name.

    plan = plan_folder_batch("frames/", "styled/", mask_dir="masks/")
    for item in plan.items:               # naturally sorted: frame2 before frame10
        picture, mask = item.open()       # EXIF-rotated RGB picture, its mask (or None)
        ...                               # generate, then:
        write_outputs(item, plan.output_dir, images, infotexts)

Subfolders of the input folder are walked too, and kept in the output folder (A1111 flattens them, so two
`0001.png` in different subfolders would write one name twice). Outputs are never overwritten: a plan whose
output names are taken is refused before anything runs, naming the first one, and each file is created
exclusively, so a picture that appeared meanwhile is not replaced either.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import EngineError, InvalidRequestError
from .infotext import parse_infotext, parse_infotext_params, read_infotext
from .outputs import encode_image
from .request import GenerationRequest

# The extensions A1111's batch reads.
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff")
_DIGITS = re.compile(r"(\d+)")
# What A1111's batch can take from each picture's PNG info. Its "Model hash" is not offered: a checkpoint of each
# picture's own would reload the model between pictures.
PNG_INFO_PARAMETERS = ("Prompt", "Negative prompt", "Seed", "CFG scale", "Sampler", "Steps")


class FolderBatchError(EngineError):
    """A picture of a folder batch that cannot be read, or an output that cannot be written."""


@dataclass(frozen=True)
class FolderItem:
    """One picture of the batch: its path, its path relative to the input folder, and its mask file (or None)."""

    path: Path
    relative: Path
    mask: Path | None = None
    # The picture whose PNG info (infotext) goes with this one: itself, or its namesake in a PNG info folder.
    info: Path | None = None

    def open(self) -> tuple[Image.Image, Image.Image | None]:
        """The picture (RGB, turned upright by its EXIF orientation as A1111 does) and its mask (L)."""
        return _open_picture(self.path, "RGB"), (_open_picture(self.mask, "L") if self.mask else None)

    def infotext(self, picture: Image.Image) -> str | None:
        """The infotext of its PNG info picture: `picture` (its own, as open() gave it, info kept) or its namesake in
        the PNG info folder; None where there is none (or no such picture)."""
        try:
            if self.info is None:
                return read_infotext(picture)
            with Image.open(self.info) as opened:
                return read_infotext(opened)
        except (OSError, UnidentifiedImageError, ValueError, EngineError):
            return None

    def output_names(self, count: int) -> list[Path]:
        """Where its `count` results go, relative to the output folder: `<name>.png`, or `<name>-1.png`,
        `<name>-2.png`, ... for several (batch count x batch size), as A1111 numbers them."""
        stem = self.relative.with_suffix("")
        if count == 1:
            return [stem.with_name(stem.name + ".png")]
        return [stem.with_name(f"{stem.name}-{number}.png") for number in range(1, count + 1)]


@dataclass(frozen=True)
class FolderPlan:
    items: tuple[FolderItem, ...]
    # Pictures left out because the mask folder holds no mask for them (A1111 skips them too).
    without_mask: tuple[Path, ...]
    # None: the results go where generated pictures are saved normally.
    output_dir: Path | None
    # Pictures left out because every result of theirs is in the output folder already (skip_done).
    done_before: tuple[Path, ...] = ()


def natural_key(path: Path) -> list:
    """Sort key that puts frame2 before frame10, as A1111's batch orders its pictures."""
    return [int(part) if part.isdigit() else part.lower() for part in _DIGITS.split(path.as_posix())]


def list_pictures(folder: Path) -> list[Path]:
    """Every picture under `folder`, subfolders included, relative to it, in natural order (hidden ones left out)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        for name in files:
            if not name.startswith(".") and name.lower().endswith(PICTURE_SUFFIXES):
                found.append((Path(root) / name).relative_to(folder))
    return sorted(found, key=natural_key)


def plan_folder_batch(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    mask_dir: str | os.PathLike | None = None,
    info_dir: str | os.PathLike | None = None,
    outputs_per_picture: int = 1,
    skip_done: bool = False,
) -> FolderPlan:
    """The batch's pictures, masks and output names, checked before anything runs. InvalidRequestError naming
    input_dir, output_dir or mask_dir for a folder that is missing, empty or in the way. With skip_done, a
    picture whose results are all in the output folder already is left out (to go on with a stopped batch), and
    one with only some of them is refused as any taken name is.

    With a mask folder of one picture, that mask is every picture's; otherwise each picture takes the mask with
    its own name (any picture extension, in the same subfolder), and pictures without one are left out. With an
    info_dir, each picture's PNG info is read from the picture of its name there (A1111's PNG info directory)."""
    source = _folder(input_dir, "input_dir")
    relatives = list_pictures(source)
    if not relatives:
        raise InvalidRequestError(
            "input_dir", Path(input_dir), f"a folder holding pictures ({', '.join(PICTURE_SUFFIXES)}); it has none"
        )
    info_folder = _folder(info_dir, "png_info_dir") if info_dir not in (None, "") else None
    if info_folder is not None:
        _outside(source, info_folder, "png_info_dir", "its pictures would be read as pictures to make")
    items = [
        FolderItem(source / relative, relative, info=info_folder / relative if info_folder else None)
        for relative in relatives
    ]
    without_mask: list[Path] = []
    if mask_dir not in (None, ""):
        masks_folder = _folder(mask_dir, "mask_dir")
        _outside(source, masks_folder, "mask_dir", "its masks would be read as pictures to make")
        items, without_mask = _with_masks(items, masks_folder, str(mask_dir))
        if not items:
            raise InvalidRequestError(
                "mask_dir",
                Path(mask_dir),
                "one mask for every picture, or masks named as the pictures are; none of the "
                f"{len(without_mask)} pictures has one",
            )
    target, done_before = None, []
    if output_dir not in (None, ""):
        target = Path(output_dir).expanduser()
        if target.exists() and not target.is_dir():
            raise InvalidRequestError("output_dir", Path(output_dir), "a folder (this is a file)")
        _outside(source, target, "output_dir", "its results would be read as pictures next time")
        if skip_done:
            done = [
                item
                for item in items
                if all((target / name).exists() for name in item.output_names(outputs_per_picture))
            ]
            done_before = [item.relative for item in done]
            items = [item for item in items if item not in done]
        taken = [name for item in items for name in item.output_names(outputs_per_picture) if (target / name).exists()]
        if taken:
            more = f" and {len(taken) - 1} more" if len(taken) > 1 else ""
            raise InvalidRequestError(
                "output_dir",
                Path(output_dir),
                f"a folder where the results' names are free; {taken[0].as_posix()!r}{more} already there would "
                "be overwritten (pick another folder, or move them)",
            )
    return FolderPlan(tuple(items), tuple(without_mask), target, tuple(done_before))


def write_outputs(
    item: FolderItem,
    output_dir: Path,
    images: list[Image.Image],
    infotexts: list[str | None],
    postprocessing: str | None = None,
) -> list[Path]:
    """Write `item`'s results as PNGs with their infotexts (and what Extras did, `postprocessing`) under
    output_dir; never replaces a file."""
    written = []
    for name, image, infotext in zip(item.output_names(len(images)), images, infotexts, strict=True):
        path = output_dir / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "xb") as handle:
                handle.write(encode_image(image, infotext, "png", postprocessing))
        except FileExistsError:
            raise FolderBatchError(f"{path}: a file of that name appeared while the batch ran; it was kept") from None
        except OSError as exc:
            raise FolderBatchError(f"{path}: could not write it ({exc.strerror or exc})") from exc
        written.append(path)
    return written


def with_png_info(request: GenerationRequest, text: str, parameters: Sequence[str]) -> GenerationRequest:
    """`request` with the `parameters` (of PNG_INFO_PARAMETERS) that infotext `text` holds, as A1111's batch takes
    them: its prompts appended to the request's, its seed, CFG scale, sampler (and schedule type) and steps in place
    of the request's. What the text does not hold stays the request's. InvalidRequestError naming the infotext key
    of a value that cannot be read."""
    unknown = [name for name in parameters if name not in PNG_INFO_PARAMETERS]
    if unknown:
        raise InvalidRequestError("png_info", unknown[0], f"any of {', '.join(PNG_INFO_PARAMETERS)}")
    held = parse_infotext_params(text)
    parsed = parse_infotext(text, unsupported_schedule="automatic")
    changes = {}
    if "Prompt" in parameters and parsed.prompt:
        changes["prompt"] = " ".join(part for part in (request.prompt, parsed.prompt) if part)
    if "Negative prompt" in parameters and parsed.negative_prompt:
        changes["negative_prompt"] = " ".join(
            part for part in (request.negative_prompt, parsed.negative_prompt) if part
        )
    for name, field in (("Seed", "seed"), ("CFG scale", "cfg_scale"), ("Steps", "steps")):
        if name in parameters and name in held:
            changes[field] = getattr(parsed, field)
    if "Sampler" in parameters and "Sampler" in held:
        changes.update(sampler_name=parsed.sampler_name, scheduler=parsed.scheduler)
    return dataclasses.replace(request, **changes)


def _folder(value: str | os.PathLike, field: str) -> Path:
    if value in (None, "") or not str(value).strip():
        raise InvalidRequestError(field, value, "the path of a folder on the server")
    folder = Path(str(value).strip()).expanduser()
    if not folder.is_dir():
        raise InvalidRequestError(field, Path(value), "an existing folder on the server (there is none at that path)")
    return folder


def _outside(source: Path, folder: Path, field: str, why: str) -> None:
    """InvalidRequestError naming `field` where `folder` is the input folder or inside it: the walk through the
    input folder would take its pictures too."""
    resolved, inside = folder.resolve(), source.resolve()
    if resolved == inside or inside in resolved.parents:
        raise InvalidRequestError(field, folder, f"a folder outside input_dir {str(source)!r} ({why})")


def _with_masks(items: list[FolderItem], masks_folder: Path, shown: str) -> tuple[list[FolderItem], list[Path]]:
    masks = list_pictures(masks_folder)
    if not masks:
        raise InvalidRequestError("mask_dir", Path(shown), "a folder holding masks (white = repaint); it has none")
    if len(masks) == 1:
        return [dataclasses.replace(item, mask=masks_folder / masks[0]) for item in items], []
    by_name = {}
    for mask in masks:
        by_name.setdefault(mask.with_suffix(""), mask)  # the first in natural order when names differ in extension
    kept, missing = [], []
    for item in items:
        mask = by_name.get(item.relative.with_suffix(""))
        if mask is None:
            missing.append(item.relative)
        else:
            kept.append(dataclasses.replace(item, mask=masks_folder / mask))
    return kept, missing


def _open_picture(path: Path, mode: str) -> Image.Image:
    try:
        with Image.open(path) as opened:
            picture = ImageOps.exif_transpose(opened).convert(mode)
            picture.info = dict(opened.info)  # its infotext goes with it (Extras keeps it in the result)
            return picture
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise FolderBatchError(f"{path}: not a picture that can be read ({exc})") from exc
