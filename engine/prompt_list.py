"""A1111's "Prompts from file or textbox" script: one job per line of a list, each line a prompt or a row of
`--option value` settings.

A line that starts with `--` sets fields of that line's job, as A1111 reads it (shell-style quoting; `--prompt`
and `--negative_prompt` take every word up to the next option). Any other line is a prompt. A line's prompt is
put before the page's prompt ("start") or after it ("end"), with a space; where either is empty the other stands
alone. The same goes for negative prompts. "Iterate seed every line" moves the seed on by batch size x batch
count after each line; "Use same random seed for all lines" draws a seed -1 once for the whole list.

Where A1111 makes a line it cannot read into a prompt of its own text (and logs the error), a line is refused
here, naming its number, the option, the value and what is allowed, before any job runs.
"""

from __future__ import annotations

import dataclasses
import secrets
import shlex
from dataclasses import dataclass

from .errors import InvalidRequestError
from .request import SEED_MAX, GenerationRequest

POSITIONS = ("start", "end")
SCRIPT_NAME = "prompts from file or textbox"


def _flag(value: str) -> bool:
    return value.lower() == "true"  # as A1111: anything else is false


# A1111's options, by the GenerationRequest field each sets (None: read and not acted on).
_OPTIONS = {
    "prompt": ("prompt", str),
    "negative_prompt": ("negative_prompt", str),
    "styles": ("styles", str),
    "seed": ("seed", int),
    "subseed": ("subseed", int),
    "subseed_strength": ("subseed_strength", float),
    "seed_resize_from_h": ("seed_resize_from_h", int),
    "seed_resize_from_w": ("seed_resize_from_w", int),
    "sampler_name": ("sampler_name", str),
    "batch_size": ("batch_size", int),
    "n_iter": ("n_iter", int),
    "steps": ("steps", int),
    "cfg_scale": ("cfg_scale", float),
    "width": ("width", int),
    "height": ("height", int),
    "tiling": ("tiling", _flag),
    "enable_hr": ("enable_hr", _flag),
    "denoising_strength": ("denoising_strength", float),
    "hr_upscaler": ("hr_upscaler", str),
    "hr_scale": ("hr_scale", float),
    "hr_second_pass_steps": ("hr_second_pass_steps", int),
    "hr_resize_x": ("hr_resize_x", int),
    "hr_resize_y": ("hr_resize_y", int),
    # Where files go and what is shown are this program's to decide (a list must not write anywhere it names).
    "outpath_samples": (None, str),
    "outpath_grids": (None, str),
    "prompt_for_display": (None, str),
    "do_not_save_samples": (None, _flag),
    "do_not_save_grid": (None, _flag),
    "restore_faces": ("restore_faces", _flag),
}
_REFUSED = {
    "sd_model": "not in a list here: pick the checkpoint in the checkpoint list (one model serves every user)",
    "sampler_index": "not a number here: use --sampler_name with the sampler's name",
}
_PARSER_WORDS = {int: "a whole number", float: "a number", _flag: "true or false", str: "text"}


@dataclass(frozen=True)
class PromptList:
    """The script's settings, named as A1111's script_args are (checkbox_iterate, checkbox_iterate_batch,
    prompt_position, prompt_txt)."""

    text: str
    iterate_seed: bool = False
    same_seed: bool = False
    position: str = "start"

    @classmethod
    def from_script_args(cls, args) -> PromptList:
        """A1111's script_args: [iterate, same seed, position, text], or the older [iterate, same seed, text]."""
        if not isinstance(args, (list, tuple)) or len(args) not in (3, 4):
            raise InvalidRequestError(
                "script_args",
                args,
                '[iterate seed every line, use same random seed for all lines, "start" or "end", the list]',
            )
        iterate, same, *rest = args
        position, text = rest if len(rest) == 2 else ("start", rest[0])
        return cls(text=str(text or ""), iterate_seed=bool(iterate), same_seed=bool(same), position=str(position))


def read_lines(text: str) -> list[tuple[int, dict]]:
    """(line number, fields) for each line that is not blank; InvalidRequestError for one that cannot be read."""
    read = []
    for number, line in enumerate(str(text).splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        read.append((number, _read_options(line, number) if line.startswith("--") else {"prompt": line}))
    return read


def _read_options(line: str, number: int) -> dict:
    where = f"prompt list line {number}"
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise InvalidRequestError(where, line, f"options in shell quoting ({exc})") from None
    fields: dict = {}
    position = 0
    while position < len(words):
        word = words[position]
        if not word.startswith("--"):
            raise InvalidRequestError(where, word, "an option starting with -- (such as --steps 20)")
        tag = word[2:]
        if tag in _REFUSED:
            raise InvalidRequestError(f"{where}: --{tag}", words[position + 1 : position + 2] or "", _REFUSED[tag])
        if tag not in _OPTIONS:
            raise InvalidRequestError(
                f"{where}: --{tag}", word, "one of " + ", ".join(f"--{name}" for name in _OPTIONS)
            )
        if position + 1 >= len(words):
            raise InvalidRequestError(f"{where}: --{tag}", "", "a value after the option")
        field_name, parse = _OPTIONS[tag]
        if tag in ("prompt", "negative_prompt"):
            end = position + 1
            while end < len(words) and (end == position + 1 or not words[end].startswith("--")):
                end += 1
            value, position = " ".join(words[position + 1 : end]), end
        else:
            value, position = words[position + 1], position + 2
        try:
            parsed = parse(value)
        except ValueError:
            raise InvalidRequestError(f"{where}: --{tag}", value, _PARSER_WORDS[parse]) from None
        if field_name == "restore_faces":
            if parsed:
                raise InvalidRequestError(f"{where}: --{tag}", value, "false (there are no face restoration models)")
            continue
        if field_name is not None:
            fields[field_name] = [parsed] if field_name == "styles" else parsed
    return fields


def expand(base: GenerationRequest, prompt_list: PromptList) -> list[tuple[int, GenerationRequest]]:
    """(line number, request) for each line of the list, as A1111's script makes them from the page's request."""
    if prompt_list.position not in POSITIONS:
        raise InvalidRequestError("prompt_position", prompt_list.position, " or ".join(POSITIONS))
    lines = read_lines(prompt_list.text)
    if not lines:
        raise InvalidRequestError("prompt list", prompt_list.text, "at least one line: a prompt, or --options")
    seed = base.seed
    if (prompt_list.iterate_seed or prompt_list.same_seed) and seed == -1:
        seed = secrets.randbelow(SEED_MAX + 1)
    jobs = []
    for number, fields in lines:
        fields = dict(fields)
        for name in ("prompt", "negative_prompt"):
            given, page = fields.get(name, ""), getattr(base, name)
            if given and page:
                fields[name] = f"{given} {page}" if prompt_list.position == "start" else f"{page} {given}"
        if seed != -1 and "seed" not in fields:
            fields["seed"] = seed
        jobs.append((number, dataclasses.replace(base, **fields)))
        if prompt_list.iterate_seed:
            seed = (seed + base.batch_size * base.n_iter) % (SEED_MAX + 1)
    return jobs
