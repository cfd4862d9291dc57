"""A1111's prompt styles: named pieces of prompt and negative prompt in `styles.csv`, added to a job's own.

The file is A1111's (columns name, prompt, negative_prompt; beside the models folder, or `--styles-file`),
so an A1111 install's styles work as they are. A style's text holding `{prompt}` has the prompt put in
its place; otherwise it is appended after a comma, as A1111 merges them. Styles are applied when a
request is checked, so the job, its infotext and its PNG carry the prompts as they were run.
"""

from __future__ import annotations

import csv
import logging
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
