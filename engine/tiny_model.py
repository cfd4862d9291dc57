"""The embedded default model: a tiny Stable-Diffusion-architecture pipeline with random weights.

It is built from the configs in presets/configs/tiny-sd with fixed seeds, so every machine
builds the same weights, and saved as a diffusers folder under the models folder. It makes
noise-like pictures, not art: it exists so that the whole product runs and is tested with no
download.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .presets import CONFIGS_DIR, TOKENIZER_DIR

log = logging.getLogger(__name__)

TINY_MODEL_NAME = "tiny-sd"
TINY_CONFIG_DIR = CONFIGS_DIR / TINY_MODEL_NAME
BUILD_SEED = 20240101


def tiny_model_path(models_dir: Path) -> Path:
    return Path(models_dir) / "Stable-diffusion" / TINY_MODEL_NAME


def ensure_tiny_model(models_dir: Path) -> Path:
    """Build the tiny model into `models_dir` unless it is already there; returns its folder."""
    target = tiny_model_path(models_dir)
    if (target / "model_index.json").is_file():
        return target
    log.info("Building the embedded tiny model at %s", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so an interrupted build never leaves half a model.
    staging = Path(tempfile.mkdtemp(prefix=".tiny-sd-", dir=target.parent))
    try:
        build_tiny_pipeline().save_pretrained(staging, safe_serialization=True)
        _write_fitted_preview_table(staging)
        os.replace(staging, target)
    except OSError:
        if (target / "model_index.json").is_file():  # another process finished first
            return target
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_tiny_pipeline():
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    def config(part: str) -> dict:
        return json.loads((TINY_CONFIG_DIR / part / "config.json").read_text())

    # Each component gets its own seed so that changing one config leaves the others' weights alone.
    torch.manual_seed(BUILD_SEED)
    unet = UNet2DConditionModel.from_config(config("unet"))
    torch.manual_seed(BUILD_SEED + 1)
    vae = AutoencoderKL.from_config(config("vae"))
    torch.manual_seed(BUILD_SEED + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**config("text_encoder")))
    scheduler = PNDMScheduler.from_pretrained(TINY_CONFIG_DIR, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _write_fitted_preview_table(folder: Path) -> None:
    from diffusers import AutoencoderKL

    from .previews import fit_latent_rgb, save_latent_rgb_table

    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    save_latent_rgb_table(folder / "latent_rgb.json", fit_latent_rgb(vae))
