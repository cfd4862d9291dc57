"""Train a 2x upscaler for the micro model's pictures, saved as a Real-ESRGAN Compact model (what A1111 loads).

    .venv/bin/python -m training.train_upscaler                 # models/ESRGAN/micro-shapes-2x.safetensors

It learns from the training set's scenes: the input is a scene drawn at 64x64 and passed through the micro
model's VAE (encoded and decoded, so it is as soft as the model's own pictures), the target the same scene
drawn at 128x128. So in the hires fix (`hr_upscaler: micro-shapes-2x`) and in Extras it doubles the micro
model's pictures with sharp edges, where Lanczos doubles their blur. The network is Real-ESRGAN's
SRVGGNetCompact, small (32 features, 6 convolutions: 60 K parameters, 240 KB): the same file layout as
realesr-general-x4v3, so A1111 and ComfyUI load it too. At the end it prints its PSNR against Lanczos on
held-out scenes (shipped file: 30.27 dB against 27.42 dB on 200 scenes). Deterministic for a given seed and
step count on one host; about ten minutes on a 2-core CPU (24 features and 5 convolutions take seven and
reach 28.61 dB).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine.presets import DEFAULT_MODELS_DIR, SHIPPED_MICRO_MODEL
from engine.upscalers import CompactNet
from training import dataset

log = logging.getLogger("train_upscaler")

DEFAULT_OUT = DEFAULT_MODELS_DIR / "ESRGAN" / "micro-shapes-2x.safetensors"
SCALE = 2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHIPPED_MICRO_MODEL, help="the model whose VAE softens inputs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the upscaler file to write")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--convs", type=int, default=6)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--seed", type=int, default=11)
    return parser.parse_args(argv)


def draw_large(scene: dataset.ShapeScene, factor: int = SCALE) -> Image.Image:
    """`scene` drawn at `factor` times the dataset's size, with the same anti-aliasing."""
    side = dataset.IMAGE_SIZE * factor
    big = side * dataset.SUPERSAMPLE
    image = Image.new("RGB", (big, big), dataset.PALETTE[scene.background])
    scaled = dataclasses.replace(scene, box=tuple(v * factor for v in scene.box))
    dataset._draw_shape(image, scaled, dataset.PALETTE[scene.colour])
    return image.resize((side, side), Image.Resampling.LANCZOS)


def as_tensor(pictures) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(p) for p in pictures])).permute(0, 3, 1, 2).float() / 255.0


def scene_pairs(vae, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [N, 3, 64, 64], targets [N, 3, 128, 128]) in [0, 1]: the inputs through the VAE and back."""
    rng = random.Random(seed)
    scenes = [dataset.random_scene(rng) for _ in range(count)]
    small = as_tensor(dataset.draw_scene(scene) for scene in scenes)
    with torch.no_grad():
        softened = torch.cat(
            [
                vae.decode(vae.encode(small[i : i + 256] * 2 - 1).latent_dist.mean).sample
                for i in range(0, len(small), 256)
            ]
        )
    inputs = ((softened.clamp(-1, 1) + 1) * 127.5).round() / 255.0  # as the pictures are saved: 8-bit
    return inputs, as_tensor(draw_large(scene) for scene in scenes)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / F.mse_loss(a, b)))


def lanczos(inputs: torch.Tensor) -> torch.Tensor:
    pictures = [
        Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).resize(
            (x.shape[2] * SCALE, x.shape[1] * SCALE), Image.Resampling.LANCZOS
        )
        for x in inputs
    ]
    return as_tensor(pictures)


def main(argv=None) -> None:
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(args.seed)
    vae = AutoencoderKL.from_pretrained(args.model / "vae").eval().requires_grad_(False)
    inputs, targets = scene_pairs(vae, args.images, args.seed)
    held_inputs, held_targets = scene_pairs(vae, args.held_out, args.seed + 1)
    network = CompactNet(3, 3, features=args.features, convs=args.convs, scale=SCALE)
    optimizer = torch.optim.Adam(network.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        picks = torch.randint(0, len(inputs), (args.batch,), generator=generator)
        loss = F.l1_loss(network(inputs[picks]), targets[picks])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps:
            log.info("step %d/%d L1 %.4f (%.0f s)", step, args.steps, loss.item(), time.perf_counter() - started)

    network.eval()
    with torch.no_grad():
        upscaled = network(held_inputs).clamp(0, 1)
    learned, resized = psnr(upscaled, held_targets), psnr(lanczos(held_inputs), held_targets)
    log.info("Held-out %d scenes: PSNR %.2f dB against Lanczos %.2f dB", args.held_out, learned, resized)
    state = {key: tensor.contiguous() for key, tensor in network.state_dict().items()}
    metadata = {
        "architecture": "SRVGGNetCompact",
        "scale": str(SCALE),
        "comment": f"2x upscaler for the micro model's pictures (training/train_upscaler.py, {args.steps} steps)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata=metadata)
    log.info("Wrote %s (%d parameters)", args.out, sum(t.numel() for t in state.values()))


if __name__ == "__main__":
    main()
