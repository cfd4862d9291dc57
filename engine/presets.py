"""Reading the data in presets/: defaults per model family, preview tables, model configs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
PRESETS_DIR = PROJECT_DIR / "presets"
CONFIGS_DIR = PRESETS_DIR / "configs"
TOKENIZER_DIR = CONFIGS_DIR / "clip-tokenizer"
DEFAULT_MODELS_DIR = PROJECT_DIR / "models"
# The embedded default: a micro model trained on shapes (training/), shipped in the repository.
MICRO_MODEL_NAME = "micro-shapes"
SHIPPED_MICRO_MODEL = DEFAULT_MODELS_DIR / "Stable-diffusion" / MICRO_MODEL_NAME
# A LoRA for the micro model that draws the shape purple (training/train_lora.py; 53 of 60 prompts).
SHIPPED_MICRO_LORA = DEFAULT_MODELS_DIR / "Lora" / "micro-purple.safetensors"
SHIPPED_MICRO_HYPERNET = DEFAULT_MODELS_DIR / "hypernetworks" / "micro-squares.pt"


@dataclass(frozen=True)
class FamilyDefaults:
    family: str
    label: str
    width: int
    height: int
    sampler_name: str
    scheduler: str
    steps: int
    cfg_scale: float
    latent_rgb: str
    single_file_config: str
    # Folder name of this family's TAESD decoder under models/VAE-approx/.
    taesd: str
    # Intra-op threads for jobs on a CPU (None: torch's default, one per core), for images of at most
    # cpu_threads_max_pixels. On the embedded models' small images, splitting each operation across
    # threads costs more than it saves; on larger ones the threads win again (measured in the README).
    cpu_threads: int | None = None
    cpu_threads_max_pixels: int | None = None
    # Run the UNet as TorchScript traces on a CPU (engine/traced_unet.py): worth it where Python's cost
    # per module is a large share of each evaluation, as it is for the embedded models' tiny layers.
    cpu_traced_unet: bool = False

    @property
    def native_size(self) -> tuple[int, int]:
        return self.width, self.height


@lru_cache(maxsize=1)
def _families() -> dict[str, dict]:
    data = json.loads((PRESETS_DIR / "model_families.json").read_text())
    return {key: value for key, value in data.items() if not key.startswith("_")}


def family_names() -> list[str]:
    return list(_families())


def family_defaults(family: str) -> FamilyDefaults:
    try:
        entry = _families()[family]
    except KeyError:
        raise KeyError(f"no defaults for model family {family!r} in presets/model_families.json") from None
    return FamilyDefaults(family=family, **entry)


@lru_cache(maxsize=1)
def latent_rgb_tables() -> dict[str, dict]:
    data = json.loads((PRESETS_DIR / "latent_rgb.json").read_text())
    return {key: value for key, value in data.items() if not key.startswith("_")}
