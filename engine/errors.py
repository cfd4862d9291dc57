"""Errors the engine raises. Front ends turn them into messages (gr.Error, HTTP 422)."""

from __future__ import annotations

import os
from typing import Any


class EngineError(Exception):
    """Base class for every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """A request field holds a value the engine cannot use.

    The message names the field, the value given and what is allowed, so a person can fix
    the request without reading code.
    """

    def __init__(self, field: str, value: Any, allowed: str):
        self.field = field
        self.value = value
        self.allowed = allowed
        shown = _short_repr(value)
        super().__init__(f"{field}: got {shown}; allowed: {allowed}")


class TaskStopped(EngineError):
    """Work that is no generation (a merge, an upscale) was stopped before it finished; nothing of it was kept."""


class NansError(EngineError):
    """The model made NaN values while sampling (A1111's NansException): the picture would come out black. The
    message says what to try."""


class ModelLoadError(EngineError):
    """A model could not be found or loaded; the message says what to do instead."""


def _short_repr(value: Any, limit: int = 80) -> str:
    if isinstance(value, os.PathLike):
        return repr(os.fspath(value))  # a folder or file named in full: cut short it would say nothing
    text = repr(value)
    if hasattr(value, "size") and hasattr(value, "mode") and not isinstance(value, (str, bytes)):
        # PIL images: their repr includes a memory address, which helps nobody.
        text = f"<{value.mode} image {value.size[0]}x{value.size[1]}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
