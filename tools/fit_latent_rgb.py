"""Fit the linear latent->RGB preview factors for any VAE, so previews are calibrated for it.

    .venv/bin/python tools/fit_latent_rgb.py models/Stable-diffusion/my-model        # a diffusers model folder
    .venv/bin/python tools/fit_latent_rgb.py path/to/vae --out latent_rgb.json        # a bare VAE folder

Writes latent_rgb.json (factors and bias) into the model folder by default; the engine reads it
from there when no published table fits the model's VAE. The fit is least squares of what the
decoder makes of latents (encoded pictures and pure noise) against latent @ factors + bias.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.previews import fit_latent_rgb, save_latent_rgb_table  # noqa: E402

log = logging.getLogger("fit_latent_rgb")


def load_vae(folder: Path):
    from diffusers import AutoencoderKL

    vae_folder = folder / "vae" if (folder / "vae" / "config.json").is_file() else folder
    if not (vae_folder / "config.json").is_file():
        raise SystemExit(f"{folder}: no VAE here (expected config.json in it or in its vae/ subfolder)")
    return AutoencoderKL.from_pretrained(vae_folder).float().eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a diffusers model folder or a VAE folder")
    parser.add_argument("--out", type=Path, help="where to write the table (default: <folder>/latent_rgb.json)")
    parser.add_argument("--samples", type=int, default=48, help="synthetic pictures to encode")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    vae = load_vae(args.folder)
    table = fit_latent_rgb(vae, samples=args.samples)
    out = args.out or args.folder / "latent_rgb.json"
    save_latent_rgb_table(out, table)
    log.info("Wrote %s (%d latent channels)", out, len(table["factors"]))


if __name__ == "__main__":
    main()
