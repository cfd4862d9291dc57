"""gradio's Slider, Number, Radio, Dropdown, CheckboxGroup and Checkbox, whose message for a value they refuse names
the field, as every other message here does.

gradio checks a slider's or a number box's range and a radio's or a dropdown's choices itself, before any handler
runs, and answers a gradio_client call outside them with "Value 150 is greater than maximum value 100." or "Value:
'x' is not in the list of choices: [...]", which does not say which of a handler's many inputs it was. These
subclasses say it the engine's way: "<label>: got 150; allowed: a number from 0 to 100". A slider sent no number at
all ("20", None) gets the same message where gradio gives "Could not preprocess input component at index 6", and a
checkbox sent a string ("false", which gradio would take as ticked) is refused. They are gradio templates
(`is_template`), so the page draws them as gradio's own.
"""

from __future__ import annotations

import logging

import gradio as gr

log = logging.getLogger(__name__)


class PageError(gr.Error):
    """A message for the person at the page (a bad value, a missing picture), shown in the page. The server's log
    gets it as one line: gradio would print a traceback for each, burying the log under people's typos. Failures
    inside a job are logged with their traceback where they happen (the engine's job thread)."""

    def __init__(self, message: str, **kwargs) -> None:
        kwargs.setdefault("print_exception", False)
        super().__init__(message, **kwargs)
        log.info("Refused on the page: %s", message)


def _allowed(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f"a number from {minimum:g} to {maximum:g}"
    if minimum is not None:
        return f"a number of at least {minimum:g}"
    return f"a number of at most {maximum:g}"


def _named(component, payload, check, allowed):
    try:
        return check(payload)
    except (gr.Error, TypeError, ValueError):  # a value out of range, or none a number can be compared with
        name = component.label or component.elem_id or "value"
        raise PageError(f"{name}: got {payload!r}; allowed: {allowed()}") from None


def _in_range(component, payload, check):
    return _named(component, payload, check, lambda: _allowed(component.minimum, component.maximum))


def _among_choices(component, payload, check):
    values = [str(value) for _, value in component.choices]
    several = (
        "any of " if getattr(component, "multiselect", False) or isinstance(component, gr.CheckboxGroup) else "one of "
    )
    return _named(component, payload, check, lambda: several + ", ".join(values) if values else "none yet")


class FieldSlider(gr.Slider):
    """gr.Slider naming itself when a value is out of its range."""

    is_template = True

    def preprocess(self, payload: float) -> float:
        return _in_range(self, payload, super().preprocess)


class FieldNumber(gr.Number):
    """gr.Number naming itself when a value is out of its range."""

    is_template = True

    def preprocess(self, payload: float | None) -> float | int | None:
        return _in_range(self, payload, super().preprocess)


class FieldRadio(gr.Radio):
    """gr.Radio naming itself when a value is not one of its choices."""

    is_template = True

    def preprocess(self, payload: str | int | float | None) -> str | int | float | None:
        return _among_choices(self, payload, super().preprocess)


class FieldDropdown(gr.Dropdown):
    """gr.Dropdown naming itself when a value is not one of its choices (and it takes no other)."""

    is_template = True

    def preprocess(self, payload):
        return _among_choices(self, payload, super().preprocess)


class FieldCheckboxGroup(gr.CheckboxGroup):
    """gr.CheckboxGroup naming itself when a value is not one of its choices."""

    is_template = True

    def preprocess(self, payload):
        return _among_choices(self, payload, super().preprocess)


class FieldCheckbox(gr.Checkbox):
    """gr.Checkbox refusing, with its name, a value that is not true or false (gradio would take "false" as ticked)."""

    is_template = True

    def preprocess(self, payload: bool | None) -> bool | None:
        def check(value):
            if value is not None and not isinstance(value, bool):
                raise TypeError(value)
            return super(FieldCheckbox, self).preprocess(value)

        return _named(self, payload, check, lambda: "true or false")
