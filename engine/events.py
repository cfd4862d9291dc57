"""What a job reports while it runs (Progress) and when it ends (Result), and how it is steered."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    from .models import ModelInfo
    from .request import GenerationRequest

PREVIEW_MODES = ("approx", "vae", "taesd", "none")

_job_ids = itertools.count(1)


@dataclass(frozen=True)
class PreviewSettings:
    """How live previews are made: `mode` is one of PREVIEW_MODES, one preview every `every` steps,
    and none sooner than `min_interval_s` seconds after the last (the last step always has one)."""

    mode: str = "approx"
    every: int = 1
    min_interval_s: float = 0.0


class Pacer:
    """Lets something through at most once per `interval_s` seconds; a forced one always passes.

    Live previews and page updates use it: a fast model makes dozens of steps a second, more than a
    person can watch or a browser and a shared link should carry.
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last = -float("inf")

    def ready(self, *, force: bool = False) -> bool:
        now = time.monotonic()
        if force or now - self._last >= self.interval_s:
            self._last = now
            return True
        return False


class JobControl:
    """A handle on one job: the caller that started it can stop it, and nobody else needs to."""

    def __init__(self) -> None:
        self.job_id = next(_job_ids)
        self._interrupted = threading.Event()
        self._skip_requested = threading.Event()

    def interrupt(self) -> None:
        """Stop at the next step; the job still ends with a Result holding what exists."""
        self._interrupted.set()

    def skip(self) -> None:
        """Cut the current batch short and go on with the next one (A1111's Skip)."""
        self._skip_requested.set()

    @property
    def interrupted(self) -> bool:
        return self._interrupted.is_set()

    def take_skip(self) -> bool:
        """True once per skip request; the batch loop consumes it."""
        if self._skip_requested.is_set():
            self._skip_requested.clear()
            return True
        return False

    @property
    def skip_requested(self) -> bool:
        return self._skip_requested.is_set()


@dataclass
class Progress:
    """One sampling step done. `step` counts from 1 to `total` within batch `batch_no` of `batch_count`."""

    step: int
    total: int
    preview: Image.Image | None
    batch_no: int = 0
    batch_count: int = 1
    elapsed: float = 0.0
    job_id: int = 0

    @property
    def fraction(self) -> float:
        """Progress of the whole job, 0..1, over all batches."""
        return job_fraction(self.step, self.total, self.batch_no, self.batch_count)

    @property
    def eta(self) -> float:
        """Seconds left, estimated from the pace so far."""
        return seconds_left(self.elapsed, self.fraction)

    @property
    def it_per_s(self) -> float:
        steps_done = self.batch_no * self.total + self.step
        return steps_done / self.elapsed if self.elapsed > 0 else 0.0


@dataclass
class Result:
    """The end of a job: one image per seed, each with its A1111 infotext (also in image.info)."""

    images: list[Image.Image]
    seeds: list[int]
    infotexts: list[str]
    request: GenerationRequest
    model: ModelInfo | None = None
    interrupted: bool = False
    elapsed: float = 0.0
    job_id: int = 0
    skipped_batches: list[int] = field(default_factory=list)
    preview_seconds: float = 0.0  # part of `elapsed` spent making live previews
    # Each image's variation seed (A1111's all_subseeds; they only matter where subseed_strength > 0).
    subseeds: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Waiting:
    """The job has not started: another job holds the device (another user's, a Compare cell, one sent
    to the REST API) or a model is loading. Sent again every WAIT_REPORT_INTERVAL_S while it waits."""

    ahead: JobState  # what the engine is doing meanwhile (running=False while a model loads)
    job_id: int = 0


@dataclass
class JobState:
    """A snapshot of what the engine is doing now, for progress endpoints polled from elsewhere."""

    running: bool = False
    job_id: int = 0
    mode: str = ""  # txt2img, img2img or inpaint
    step: int = 0
    total: int = 0
    batch_no: int = 0
    batch_count: int = 0
    elapsed: float = 0.0
    preview: Image.Image | None = None
    interrupted: bool = False
    skipped: bool = False
    started_at: float = 0.0

    @property
    def fraction(self) -> float:
        return job_fraction(self.step, self.total, self.batch_no, self.batch_count) if self.running else 0.0

    @property
    def eta(self) -> float:
        return seconds_left(self.elapsed, self.fraction)


def job_fraction(step: int, total: int, batch_no: int, batch_count: int) -> float:
    if total <= 0 or batch_count <= 0:
        return 0.0
    return min(1.0, (batch_no + step / total) / batch_count)


def seconds_left(elapsed: float, fraction: float) -> float:
    return elapsed * (1 - fraction) / fraction if fraction > 0 else 0.0
