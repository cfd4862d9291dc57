"""The generation engine: pure Python over diffusers, no web framework.

from engine import Engine, GenerationRequest
engine = Engine()
for event in engine.generate(GenerationRequest(prompt="a lighthouse at dusk")):
    ...  # Waiting while another job runs, Progress events, then one Result
"""

from .engine import Engine
from .errors import EngineError, InvalidRequestError, ModelLoadError, NansError, TaskStopped
from .events import JobControl, JobState, PreviewSettings, Progress, Result, Waiting
from .extras import ExtrasRequest
from .merge import MergeRequest, MergeResult
from .models import ModelInfo
from .prompt_list import PromptList
from .prompt_matrix import PromptMatrix
from .request import GenerationRequest, Limits

__all__ = [
    "Engine",
    "EngineError",
    "NansError",
    "ExtrasRequest",
    "GenerationRequest",
    "InvalidRequestError",
    "JobControl",
    "JobState",
    "Limits",
    "MergeRequest",
    "MergeResult",
    "ModelInfo",
    "ModelLoadError",
    "PreviewSettings",
    "PromptList",
    "PromptMatrix",
    "Progress",
    "Result",
    "TaskStopped",
    "Waiting",
]
