"""A1111 prompt editing and alternation: which prompt text applies at which sampling step.

    [from:to:when]   "from" until step `when`, then "to"
    [to:when]        nothing until `when`, then "to"
    [from::when]     "from" until `when`, then nothing
    [a|b|c]          a, b, c, a, ... one per step

`when` is a step number, or a fraction of the steps when written with a decimal point (0.5, 1.0),
as in A1111's default (non-legacy) scheduling. Brackets nest, and attention syntax inside is kept
for the attention parser: `[(red:1.3):blue:5]`.

A prompt schedule is a list of (end_step, text): text applies to 0-based sampling steps up to and
including end_step, exactly as A1111's get_learned_conditioning_prompt_schedules and
reconstruct_cond_batch pair them (so a switch "at step 10" takes effect from step index 11).
Text that does not parse as this syntax is used as it is, like A1111 does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*$")


@dataclass(frozen=True)
class _Scheduled:
    before: list
    after: list
    when: str  # the number as written: a "." makes it a fraction of the steps


@dataclass(frozen=True)
class _Alternate:
    options: list[list]


class _Unbalanced(Exception):
    """A bracket this syntax cannot close: it is kept as a literal character."""


class _Parser:
    """Recursive descent over the prompt. A bracket that cannot be read as this syntax becomes
    literal text and parsing goes on after it, as A1111's grammar falls back to raw brackets.
    Results are memoised by position, so failed brackets are tried once each (no blow-up on
    prompts like "[[[[[[[[")."""

    def __init__(self, text: str):
        self.text = text
        self._memo: dict[tuple[int, str], tuple[object, int] | None] = {}

    def parse(self) -> list:
        nodes, _end = self.sequence(0, stops="")
        return nodes

    def sequence(self, pos: int, stops: str) -> tuple[list, int]:
        text = self.text
        nodes: list = []
        literal: list[str] = []

        def flush() -> None:
            if literal:
                nodes.append("".join(literal))
                literal.clear()

        while pos < len(text):
            char = text[pos]
            if char == "\\" and pos + 1 < len(text):
                literal.append(text[pos : pos + 2])
                pos += 2
                continue
            if char in stops:
                break
            parsed = self.bracket(pos) if char in "[(" else None
            if parsed is None:
                literal.append(char)
                pos += 1
                continue
            flush()
            node, pos = parsed
            nodes.extend(node if isinstance(node, list) else [node])
        flush()
        return nodes, pos

    def bracket(self, pos: int) -> tuple[object, int] | None:
        key = (pos, self.text[pos])
        if key not in self._memo:
            try:
                self._memo[key] = self._square(pos) if self.text[pos] == "[" else self._round(pos)
            except _Unbalanced:
                self._memo[key] = None
        return self._memo[key]

    def _round(self, pos: int) -> tuple[list, int]:
        inner, close = self.sequence(pos + 1, stops=")")
        if close >= len(self.text):
            raise _Unbalanced
        return ["(", *inner, ")"], close + 1

    def _square(self, pos: int) -> tuple[object, int]:
        """ "[...]": a schedule, an alternation, or attention brackets kept as text."""
        parts: list[list] = []
        separators: list[str] = []
        cursor = pos + 1
        while True:
            part, cursor = self.sequence(cursor, stops=":|]")
            parts.append(part)
            if cursor >= len(self.text):
                raise _Unbalanced
            separator = self.text[cursor]
            cursor += 1
            if separator == "]":
                break
            separators.append(separator)
        if not separators:
            return ["[", *parts[0], "]"], cursor
        if set(separators) == {"|"}:
            return _Alternate(parts), cursor
        if set(separators) == {":"} and len(parts) in (2, 3):
            when = _plain_number(parts[-1])
            if when is not None:
                before = parts[0] if len(parts) == 3 else []
                after = parts[1] if len(parts) == 3 else parts[0]
                return _Scheduled(before, after, when), cursor
        # "[a:b]" and other shapes this syntax does not know stay literal text (insides still parsed).
        pieces: list = ["["]
        for index, part in enumerate(parts):
            pieces.extend(part)
            pieces.append(separators[index] if index < len(separators) else "]")
        return pieces, cursor


def _plain_number(nodes: list) -> str | None:
    if len(nodes) != 1 or not isinstance(nodes[0], str):
        return None
    match = _NUMBER.match(nodes[0])
    return match.group(1) if match else None


def _step_of(when: str, steps: int) -> int:
    value = float(when)
    # A1111's default scheduling: a number with a decimal point is a fraction of the steps.
    step = value * steps if "." in when else value
    return min(steps, int(step))


def _switch_steps(nodes: list, steps: int, found: set[int]) -> None:
    for node in nodes:
        if isinstance(node, _Scheduled):
            step = _step_of(node.when, steps)
            if step >= 1:
                found.add(step)
            _switch_steps(node.before, steps, found)
            _switch_steps(node.after, steps, found)
        elif isinstance(node, _Alternate):
            found.update(range(1, steps + 1))
            for option in node.options:
                _switch_steps(option, steps, found)


def _text_at(nodes: list, step: int, steps: int) -> str:
    pieces = []
    for node in nodes:
        if isinstance(node, str):
            pieces.append(node)
        elif isinstance(node, _Scheduled):
            branch = node.before if step <= _step_of(node.when, steps) else node.after
            pieces.append(_text_at(branch, step, steps))
        else:
            pieces.append(_text_at(node.options[(step - 1) % len(node.options)], step, steps))
    return "".join(pieces)


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """[(end_step, text), ...] for `steps` sampling steps; one entry when nothing is scheduled.

    >>> prompt_schedule("a [cat:dog:0.5] on a mat", 10)
    [(5, 'a cat on a mat'), (10, 'a dog on a mat')]
    >>> prompt_schedule("[fox|wolf]", 3)
    [(1, 'fox'), (2, 'wolf'), (3, 'fox')]
    """
    steps = max(1, int(steps))
    try:
        nodes = _Parser(prompt).parse()
    except RecursionError:  # thousands of nested brackets: use the text as it is
        return [(steps, prompt)]
    found = {steps}
    _switch_steps(nodes, steps, found)
    schedule: list[tuple[int, str]] = []
    for step in sorted(found):
        text = _text_at(nodes, step, steps)
        if schedule and schedule[-1][1] == text:
            schedule[-1] = (step, text)  # same text as the entry before: one longer entry
        else:
            schedule.append((step, text))
    return schedule


def text_for_step(schedule: list[tuple[int, str]], step_index: int) -> str:
    """The text that applies at 0-based sampling step `step_index` (A1111's reconstruct_cond_batch)."""
    for end_step, text in schedule:
        if step_index <= end_step:
            return text
    return schedule[-1][1]


# A1111's composable diffusion: "AND" as an upper-case word splits a prompt into parts, and a part may
# end in ":weight" (a number, nothing after it).
_AND = re.compile(r"\bAND\b")
_PART_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def composable_parts(prompt: str) -> list[tuple[str, float]]:
    """The parts of a prompt with their weights, as A1111's get_multicond_prompt_list reads them: split at
    each "AND", a trailing ":w" is the part's weight (1 when none). A part named twice is one part with
    the weights added, which guides the same as the two.

    >>> composable_parts("a red circle AND a blue background :0.5")
    [('a red circle', 1.0), ('a blue background', 0.5)]
    >>> composable_parts("a cat")
    [('a cat', 1.0)]
    """
    weights: dict[str, float] = {}
    for part in _AND.split(prompt):
        match = _PART_WEIGHT.search(part)
        text, weight = (match[1], match[2]) if match is not None else (part, None)
        text = text.strip()
        weights[text] = weights.get(text, 0.0) + (float(weight) if weight is not None else 1.0)
    return list(weights.items())


def is_composed(parts: list[tuple[str, float]]) -> bool:
    """Whether the parts need composable guidance: more than one, or one with a weight other than 1."""
    return len(parts) > 1 or parts[0][1] != 1.0
