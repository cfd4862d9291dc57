"""A1111's "Tiling": pictures that tile seamlessly, made by padding every convolution circularly.

Each convolution of the UNet and the VAE then sees the picture's opposite edge past each edge, so the left
edge continues the right one and the top the bottom, as A1111 does it (it switches the same layers). The
modules are the loaded model's, shared by all jobs: jobs run one at a time under the engine's job lock,
and the padding is put back when the job ends, however it ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def circular_padding(*modules: torch.nn.Module) -> Iterator[None]:
    """Every Conv2d in `modules` pads circularly inside the block, as it did before after it."""
    convolutions = {
        id(layer): layer for module in modules for layer in module.modules() if isinstance(layer, torch.nn.Conv2d)
    }.values()
    before = [(layer, layer.padding_mode) for layer in convolutions]
    for layer, _mode in before:
        layer.padding_mode = "circular"
    try:
        yield
    finally:
        for layer, mode in before:
            layer.padding_mode = mode
