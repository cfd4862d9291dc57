"""What the micro model's add-ons (training/train_lora.py, training/train_hypernet.py) share: pictures of altered
scenes under their unaltered captions, and the noise-prediction loss over them, the base model frozen."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from training import dataset

log = logging.getLogger(__name__)


def altered_scenes(
    count: int, seed: int, alter: Callable[[dataset.ShapeScene], dataset.ShapeScene | None]
) -> list[tuple[dataset.ShapeScene, dataset.ShapeScene]]:
    """`count` (scene as captioned, scene as drawn) pairs: the drawn one is `alter(scene)`, scenes it gives None for
    left out."""
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < count:
        scene = dataset.random_scene(rng)
        drawn = alter(scene)
        if drawn is not None:
            pairs.append((scene, drawn))
    return pairs


def fit(pipe, pairs, trainable: list[torch.nn.Parameter], *, steps: int, batch: int, lr: float, seed: int) -> None:
    """Train `trainable` (the rest of `pipe` frozen) to draw each pair's second scene from a caption of its first:
    AdamW on the noise-prediction loss, at random timesteps. Deterministic for a seed on one host."""
    vae, unet, text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    pictures = torch.from_numpy(np.stack([np.asarray(dataset.draw_scene(drawn)) for _caption, drawn in pairs]))
    with torch.no_grad():
        images = pictures.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        latents = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
        latents = latents * vae.config.scaling_factor
    alphas_cumprod = pipe.scheduler.alphas_cumprod
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    unet.train()
    text_encoder.train()
    started = time.perf_counter()
    for step in range(1, steps + 1):
        picks = [rng.randrange(len(pairs)) for _ in range(batch)]
        captions = [dataset.random_caption(pairs[i][0], rng)[0] for i in picks]
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        clean = latents[picks]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, len(alphas_cumprod), (batch,), generator=generator)
        scale = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = scale.sqrt() * clean + (1 - scale).sqrt() * noise
        predicted = unet(noisy, timesteps, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(predicted, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps:
            log.info("step %d/%d loss %.4f (%.0f s)", step, steps, loss.item(), time.perf_counter() - started)
