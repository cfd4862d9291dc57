"""Live previews: the predicted clean latent (x0) of a running job turned into a picture.

Three strategies, cheapest first: a linear latent -> RGB map (one tiny matrix product per latent
pixel), TAESD (a tiny decoder, when its weights are present locally), and the model's full VAE.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from PIL import Image

from .errors import InvalidRequestError
from .events import PREVIEW_MODES

log = logging.getLogger(__name__)


class LatentRGBPreviewer:
    """rgb = latent @ factors + bias, in [-1, 1]; the preview has the latent's size."""

    def __init__(self, factors, bias=None):
        self.factors = torch.tensor(factors, dtype=torch.float32)
        self.bias = torch.tensor(bias if bias is not None else [0.0, 0.0, 0.0], dtype=torch.float32)

    def __call__(self, latent: torch.Tensor) -> Image.Image:
        # latent: (channels, h, w) in the UNet's (scaled) latent space.
        latent = latent.detach().to("cpu", torch.float32)
        rgb = torch.einsum("chw,cr->hwr", latent, self.factors) + self.bias
        pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        return Image.fromarray(pixels, "RGB")


class DecoderPreviewer:
    """Decodes with a VAE-like module (the full VAE or TAESD) at full size."""

    def __init__(self, decoder, latent_scale: float):
        self.decoder = decoder
        # The full VAE expects unscaled latents; TAESD takes the UNet's scaled latents as they are.
        self.latent_scale = latent_scale

    @torch.inference_mode()
    def __call__(self, latent: torch.Tensor) -> Image.Image:
        param = next(self.decoder.parameters())
        sample = (latent[None] / self.latent_scale).to(param.device, param.dtype)
        decoded = self.decoder.decode(sample, return_dict=False)[0][0]
        pixels = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(pixels, "RGB")


def make_previewer(mode: str, *, vae, latent_rgb: dict | None, taesd=None):
    """The previewer for `mode`, or None for "none"."""
    if mode not in PREVIEW_MODES:
        raise InvalidRequestError("preview mode", mode, "one of " + ", ".join(PREVIEW_MODES))
    if mode == "none":
        return None
    if mode == "approx":
        if latent_rgb is None:
            raise InvalidRequestError("preview mode", mode, "vae or none: this model has no latent->RGB table")
        return LatentRGBPreviewer(latent_rgb["factors"], latent_rgb.get("bias"))
    if mode == "taesd":
        if taesd is None:
            raise InvalidRequestError(
                "preview mode",
                mode,
                "approx, vae or none: no TAESD weights for this model family in models/VAE-approx/",
            )
        return DecoderPreviewer(taesd, latent_scale=1.0)
    return DecoderPreviewer(vae, latent_scale=vae.config.scaling_factor)


@torch.inference_mode()
def fit_latent_rgb(vae, *, size: int = 64, samples: int = 48, seed: int = 0) -> dict:
    """Least-squares fit of decode(latent), shrunk to latent size, against latent @ factors + bias.

    Fitting against what the decoder makes of a latent (not what the encoder saw) is what a
    preview must imitate. Latents come from encoding varied synthetic pictures and from pure
    noise, so the fit covers both early (noisy) and late (clean) steps.
    """
    generator = torch.Generator().manual_seed(seed)
    scale = vae.config.scaling_factor
    images = _synthetic_images(samples, size, generator)
    param = next(vae.parameters())
    encoded = vae.encode(images.to(param.device, param.dtype)).latent_dist.mean * scale
    noise = torch.randn(encoded.shape, generator=generator).to(encoded)
    latents = torch.cat([encoded, noise])
    decoded = vae.decode(latents / scale, return_dict=False)[0].float().clamp(-1, 1).cpu()
    factor = decoded.shape[-1] // latents.shape[-1]
    shrunk = torch.nn.functional.avg_pool2d(decoded, factor)
    x = latents.float().cpu().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
    y = shrunk.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(x.double(), y.double()).solution.float()
    return {"factors": solution[:-1].tolist(), "bias": solution[-1].tolist()}


def _synthetic_images(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth colour fields and blocks in [-1, 1]: enough variety for a linear fit."""
    coarse = torch.rand(count, 3, 4, 4, generator=generator) * 2 - 1
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    blocks = torch.nn.functional.interpolate(
        torch.rand(count, 3, 8, 8, generator=generator) * 2 - 1, size=(size, size), mode="nearest"
    )
    mix = torch.rand(count, 1, 1, 1, generator=generator)
    return (smooth * mix + blocks * (1 - mix)).clamp(-1, 1)


def save_latent_rgb_table(path: Path, table: dict) -> None:
    Path(path).write_text(json.dumps(table, indent=1))


def load_latent_rgb_table(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


def preview_to_display(image: Image.Image, width: int, height: int, max_side: int = 512) -> Image.Image:
    """Upscale a latent-size preview for display, keeping the requested aspect and at most `max_side`."""
    scale = min(1.0, max_side / max(width, height))
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    if image.size == target:
        return image
    return image.resize(target, Image.Resampling.BILINEAR)
