"""gradio's Slider and Number, whose out-of-range message names the field, as every other message here does.

gradio checks a slider's or a number box's range itself, before any handler runs, and answers a gradio_client call
that is out of range with "Value 150 is greater than maximum value 100.", which does not say which of a handler's
many inputs it was. These subclasses say it the engine's way: "<label>: got 150; allowed: a number from 0 to 100".
They are gradio templates (`is_template`), so the page draws them as gradio's own Slider and Number.
"""

from __future__ import annotations

import gradio as gr


def _allowed(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f"a number from {minimum:g} to {maximum:g}"
    if minimum is not None:
        return f"a number of at least {minimum:g}"
    return f"a number of at most {maximum:g}"


def _named(component, payload, check):
    try:
        return check(payload)
    except gr.Error:
        name = component.label or component.elem_id or "value"
        raise gr.Error(f"{name}: got {payload!r}; allowed: {_allowed(component.minimum, component.maximum)}") from None

from gradio.events import Dependency

class FieldSlider(gr.Slider):
    """gr.Slider naming itself when a value is out of its range."""

    is_template = True

    def preprocess(self, payload: float) -> float:
        return _in_range(self, payload, super().preprocess)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class FieldNumber(gr.Number):
    """gr.Number naming itself when a value is out of its range."""

    is_template = True

    def preprocess(self, payload: float | None) -> float | int | None:
        return _in_range(self, payload, super().preprocess)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component
class FieldRadio(gr.Radio):
    """gr.Radio naming itself when a value is not one of its choices."""

    is_template = True

    def preprocess(self, payload: str | int | float | None) -> str | int | float | None:
        return _among_choices(self, payload, super().preprocess)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component

    
class FieldDropdown(gr.Dropdown):
    """gr.Dropdown naming itself when a value is not one of its choices (and it takes no other)."""

    is_template = True

    def preprocess(self, payload):
        return _among_choices(self, payload, super().preprocess)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component

    
class FieldCheckboxGroup(gr.CheckboxGroup):
    """gr.CheckboxGroup naming itself when a value is not one of its choices."""

    is_template = True

    def preprocess(self, payload):
        return _among_choices(self, payload, super().preprocess)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component

    