"""Saving finished images the way A1111 lays them out, so existing habits and tools keep working.

    outputs/txt2img-images/2024-05-01/00042-1234.png      (img2img and inpaint: img2img-images/)
    outputs/extras-images/2024-05-01/00007.png             (Extras: no seed)
    outputs/txt2img-grids/2024-05-01/00003-1234.png       (a prompt matrix's grid; img2img-grids/)

Numbers continue from the highest one already in the day's folder. Two saves racing for the same
number (two server threads, two processes) never overwrite each other: a number is claimed by
creating a marker file exclusively, and the image itself is created exclusively too.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import re
from pathlib import Path

from PIL import Image

from .images import encode_png

MODE_FOLDERS = {
    "txt2img": "txt2img-images",
    "img2img": "img2img-images",
    "inpaint": "img2img-images",
    "extras": "extras-images",
    # Grids (the prompt matrix's), as A1111 keeps them apart from the pictures.
    "txt2img-grids": "txt2img-grids",
    "img2img-grids": "img2img-grids",
    "inpaint-grids": "img2img-grids",
}
FORMATS = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp"}
_NUMBERED = re.compile(r"^(\d+)[-.]")
_CLAIM_PREFIX = ".claim-"
# EXIF tags: the Exif sub-IFD and its UserComment, where A1111 keeps JPEG/WebP infotexts.
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_MAX_ATTEMPTS = 10_000


def output_folder(outputs_dir: str | os.PathLike, mode: str, day: dt.date | None = None) -> Path:
    """The folder an image of `mode` saved on `day` (default today) goes to."""
    try:
        sub = MODE_FOLDERS[mode]
    except KeyError:
        raise ValueError(f"mode: got {mode!r}; allowed: {', '.join(MODE_FOLDERS)}") from None
    day = day or dt.date.today()
    return Path(outputs_dir) / sub / day.isoformat()


def save_image(
    image: Image.Image,
    infotext: str | None,
    *,
    outputs_dir: str | os.PathLike,
    mode: str,
    seed: int | None,
    fmt: str = "png",
    day: dt.date | None = None,
    postprocessing: str | None = None,
) -> Path:
    """Write `image` with its infotext embedded as NNNNN-<seed>.<ext> (NNNNN.<ext> without a seed); returns the
    new file's path. `postprocessing` is what Extras did, kept in a PNG's `postprocessing` chunk as A1111 does."""
    ext = FORMATS.get(str(fmt).lower())
    if ext is None:
        raise ValueError(f"fmt: got {fmt!r}; allowed: {', '.join(FORMATS)}")
    folder = output_folder(outputs_dir, mode, day)
    folder.mkdir(parents=True, exist_ok=True)
    data = encode_image(image, infotext, ext, postprocessing)

    number = next_number(folder)
    for _ in range(_MAX_ATTEMPTS):
        claim = folder / f"{_CLAIM_PREFIX}{number:05d}"
        if not _create_exclusive(claim, b""):
            number += 1  # another save holds this number right now
            continue
        try:
            # A file with this number may exist from before (a crash, another program): skip it.
            if _number_taken(folder, number):
                number += 1
                continue
            path = folder / (f"{number:05d}.{ext}" if seed is None else f"{number:05d}-{seed}.{ext}")
            if _create_exclusive(path, data):
                return path
            number += 1
        finally:
            claim.unlink(missing_ok=True)
    raise OSError(f"Could not find a free file name in {folder} after {_MAX_ATTEMPTS} tries")


def next_number(folder: Path) -> int:
    """One more than the highest NNNNN- prefix in `folder` (0 in an empty or missing one)."""
    highest = -1
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    for name in names:
        match = _NUMBERED.match(name)
        if match:
            highest = max(highest, int(match.group(1)))
    return highest + 1


def encode_image(image: Image.Image, infotext: str | None, ext: str, postprocessing: str | None = None) -> bytes:
    """PNG with a `parameters` text chunk (and `postprocessing`); JPEG/WebP with the infotext in EXIF UserComment."""
    if ext == "png":
        return encode_png(image, infotext, postprocessing=postprocessing)
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    exif = Image.Exif()
    if infotext:
        # The EXIF "UNICODE" encoding A1111 writes (through piexif): UTF-16 big-endian after the marker.
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\x00" + infotext.encode("utf-16-be")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if ext == "jpg" else "WEBP", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def _number_taken(folder: Path, number: int) -> bool:
    return any(
        (match := _NUMBERED.match(name)) is not None and int(match.group(1)) == number for name in os.listdir(folder)
    )


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Create `path` holding `data`; False when it already exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return True
