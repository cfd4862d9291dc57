"""What "Unload checkpoint" frees: this program's resident memory with an SD 1.5-sized model loaded, after one
job, after the unload, and after the next job has loaded it back.

No real weights can be downloaded here, so the model is SD 1.5's architecture (presets/configs/sd1: an
860 M-parameter UNet, CLIP ViT-L text encoder, the SD VAE) with random weights, written once as a
half-precision diffusers folder under --workdir. Memory is the process's resident set (psutil), read
after a garbage collection.

    .venv/bin/python tools/measure_unload.py [--workdir /tmp/lantern-unload] [--size 64]
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import Engine, GenerationRequest  # noqa: E402
from engine.presets import CONFIGS_DIR, TOKENIZER_DIR  # noqa: E402
from tools.benchmark_timing import log_to_console  # noqa: E402

log = logging.getLogger("measure_unload")


def build_sd15_shaped(folder: Path) -> Path:
    """SD 1.5's components from the shipped configs, random weights, saved in half precision."""
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    configs = CONFIGS_DIR / "sd1"
    torch.manual_seed(0)
    log.info("Building an SD 1.5-shaped model with random weights at %s (a minute or two)", folder)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet")),
        scheduler=PNDMScheduler.from_pretrained(configs / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/lantern-unload", help="where the SD 1.5-shaped model is kept")
    parser.add_argument(
        "--size", type=int, default=64, help="width and height of the one job (the UNet is all that matters)"
    )
    args = parser.parse_args()
    log_to_console()

    folder = build_sd15_shaped(Path(args.workdir) / "Stable-diffusion" / "sd15-shaped")
    engine = Engine(model=str(folder), models_dir=args.workdir)
    request = GenerationRequest(prompt="a lighthouse", seed=1, steps=1, width=args.size, height=args.size)

    def resident() -> int:
        gc.collect()
        return engine.memory()["ram"]["used"]

    rows = []
    list(engine.generate(request))
    rows.append(("loaded, after one job", resident()))
    engine.unload_model()
    rows.append(("after Unload checkpoint", resident()))
    list(engine.generate(request))
    rows.append(("after the next job loaded it back", resident()))

    loaded = rows[0][1]
    log.info("Model %s on %s (%s)", engine.model.title, engine.device, engine.dtype)
    log.info("| State | Resident memory | Change from loaded |")
    log.info("|---|---|---|")
    for label, used in rows:
        log.info("| %s | %.2f GB | %+.2f GB |", label, used / 1024**3, (used - loaded) / 1024**3)


if __name__ == "__main__":
    main()
