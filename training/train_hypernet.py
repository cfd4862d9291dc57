"""Train a hypernetwork for the micro model and save it as A1111's Train tab saves one.

    .venv/bin/python -m training.train_hypernet                  # models/hypernetworks/micro-squares.pt

The hypernetwork teaches one thing the model does not do: it draws every shape as a square, in the colour and on
the background the prompt names, so `<hypernet:micro-squares:1>` turns "a red circle on a white background" into a
red square on white (README). Its pictures are the training set's scenes with the shape made a square and their
captions unchanged. It is A1111's kind: for each width of attention context in the UNet (64 and 128 here), a
residual MLP of layer structure 1, 2, 1 with ReLU for the keys and another for the values, trained with the model
frozen. Deterministic for a given seed and step count on one host; a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import torch

from engine.hypernet import HypernetworkModule, attention_projections, dropout_structure
from engine.presets import SHIPPED_MICRO_HYPERNET, SHIPPED_MICRO_MODEL
from training import dataset
from training.finetune import altered_scenes, fit

log = logging.getLogger("train_hypernet")

LAYER_STRUCTURE = [1, 2, 1]
ACTIVATION = "relu"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHIPPED_MICRO_MODEL, help="the model folder to train for")
    parser.add_argument("--out", type=Path, default=SHIPPED_MICRO_HYPERNET, help="the hypernetwork file to write")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=7)
    return parser.parse_args(argv)


def new_modules(width: int) -> HypernetworkModule:
    """A1111's "Normal" initialisation: weights N(0, 0.01), biases 0, so training starts from no change."""
    module = HypernetworkModule(
        width, LAYER_STRUCTURE, ACTIVATION, False, False, dropout_structure(LAYER_STRUCTURE, False, False)
    )
    for layer in module.linear:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, mean=0.0, std=0.01)
            torch.nn.init.zeros_(layer.bias)
    return module


def main(argv=None) -> None:
    from diffusers import StableDiffusionPipeline

    from engine.hypernet import Hypernetwork, apply_hypernetworks

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(args.seed)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, dtype=torch.float32, safety_checker=None)
    for module in (pipe.vae, pipe.unet, pipe.text_encoder):
        module.requires_grad_(False)
    widths = sorted({int(key.in_features) for key, _value in attention_projections(pipe.unet)})
    network = Hypernetwork(args.out.stem, {width: (new_modules(width), new_modules(width)) for width in widths})
    apply_hypernetworks(pipe.unet, [(network, 1.0)])
    trainable = [p for module in network.modules() for p in module.parameters()]

    def squared(scene: dataset.ShapeScene) -> dataset.ShapeScene:
        return dataclasses.replace(scene, shape="square")

    pairs = altered_scenes(args.images, args.seed, squared)
    fit(pipe, pairs, trainable, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)

    state: dict = {width: (k.state_dict(), v.state_dict()) for width, (k, v) in network.layers.items()}
    state.update(
        step=args.steps,
        name=args.out.stem,
        layer_structure=LAYER_STRUCTURE,
        activation_func=ACTIVATION,
        is_layer_norm=False,
        weight_initialization="Normal",
        use_dropout=False,
        activate_output=False,
        last_layer_dropout=False,
        sd_checkpoint=None,
        sd_checkpoint_name="micro-shapes",
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    log.info("Wrote %s (widths %s)", args.out, widths)


if __name__ == "__main__":
    main()
