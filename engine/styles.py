"""A1111's prompt styles: named pieces of prompt and negative prompt in `styles.csv`, added to a job's own.

The file is A1111's (columns name, prompt, negative_prompt; beside the models folder, or `--styles-file`),
so an A1111 install's styles work as they are. A style's text holding `{prompt}` has the prompt put in
its place; otherwise it is appended after a comma, as A1111 merges them. Styles are applied when a
request is checked, so the job, its infotext and its PNG carry the prompts as they were run.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidRequestError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptStyle:
    name: str
    prompt: str
    negative_prompt: str


def read_styles(path: Path | None) -> dict[str, PromptStyle]:
    """The styles in an A1111 styles.csv, by name; a missing file is no styles. An unreadable one is
    logged and read as none, so that a bad file does not stop the app."""
    if path is None or not path.is_file():
        return {}
    styles: dict[str, PromptStyle] = {}
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            for row in csv.DictReader(handle, skipinitialspace=True):
                name = (row.get("name") or "").strip()
                if name:
                    styles[name] = PromptStyle(name, row.get("prompt") or "", row.get("negative_prompt") or "")
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        log.warning("Could not read the styles file %s: %s", path, exc)
        return {}
    return styles


def merge_style(text: str, style_text: str) -> str:
    """A1111's merge: the style's `{prompt}` replaced by the text, or the two joined with a comma."""
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", text)
    return ", ".join(part for part in (text.strip(), style_text.strip()) if part)


def apply_styles(prompt: str, negative_prompt: str, names, available: dict[str, PromptStyle], where: Path):
    """(prompt, negative prompt) with the named styles merged in, in order. Raises InvalidRequestError
    naming a style that is not in the file."""
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)):
        raise InvalidRequestError("styles", names, "a list of style names")
    for name in names:
        style = available.get(name) if isinstance(name, str) else None
        if style is None:
            there = ", ".join(available) or "none"
            raise InvalidRequestError("styles", name, f"the name of a style in {where} (there: {there})")
        prompt = merge_style(prompt, style.prompt)
        negative_prompt = merge_style(negative_prompt, style.negative_prompt)
    return prompt, negative_prompt


# A1111's columns, in its order.
STYLE_COLUMNS = ("name", "prompt", "negative_prompt")
MAX_STYLE_NAME = 200


def check_style_name(name) -> str:
    """A style's name, stripped; InvalidRequestError naming "style name" when it cannot be one."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequestError("style name", name, "a name (text, not empty)")
    name = name.strip()
    if len(name) > MAX_STYLE_NAME or any(char in name for char in "\r\n"):
        raise InvalidRequestError("style name", name, f"one line of at most {MAX_STYLE_NAME} characters")
    return name


def save_style(path: Path, style: PromptStyle) -> None:
    """Add `style` to the styles file, or replace the style of its name where it stands (as A1111's style editor
    saves). The file is written beside itself and renamed into place, the previous one kept as `.bak`, as A1111
    keeps it; columns other than A1111's three are kept on every row."""
    rows, columns = _read_rows(path)
    row = {"name": style.name, "prompt": style.prompt, "negative_prompt": style.negative_prompt}
    for index, existing in enumerate(rows):
        if (existing.get("name") or "").strip() == style.name:
            rows[index] = {**existing, **row}
            break
    else:
        rows.append(row)
    _write_rows(path, rows, columns)


def delete_style(path: Path, name: str) -> None:
    """Remove the style called `name` from the styles file; InvalidRequestError naming it when there is none."""
    rows, columns = _read_rows(path)
    kept = [row for row in rows if (row.get("name") or "").strip() != name]
    if len(kept) == len(rows):
        there = ", ".join((row.get("name") or "").strip() for row in rows) or "none"
        raise InvalidRequestError("style name", name, f"the name of a style in {path} (there: {there})")
    _write_rows(path, kept, columns)


def _read_rows(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    if not path.is_file():
        return [], list(STYLE_COLUMNS)
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, skipinitialspace=True)
        rows = [dict(row) for row in reader]
        found = [column for column in (reader.fieldnames or []) if column]
    columns = list(STYLE_COLUMNS) + [column for column in found if column not in STYLE_COLUMNS]
    return rows, columns


def _write_rows(path: Path, rows: list[dict[str, str]], columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        shutil.copy2(path, path.with_name(path.name + ".bak"))
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({column: row.get(column) or "" for column in columns} for row in rows)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
