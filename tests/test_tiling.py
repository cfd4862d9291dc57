"""A1111's "Tiling": every convolution of the UNet and VAE pads circularly during the job, so the picture's
edges continue each other; afterwards the model is as it was."""

from __future__ import annotations

import torch

from engine import GenerationRequest, Result
from engine.infotext import parse_infotext
from engine.tiling import circular_padding


def test_with_circular_padding_the_unet_and_vae_wrap_around(micro_engine):
    """Shifting the latent by 4 pixels (the UNet's two downsamplings) across the edge shifts the UNet's
    prediction and the decoded picture the same way: nothing in the model is tied to where the edge is,
    so the picture continues past it. With zero padding it does not."""
    unet, vae = micro_engine.loaded.components["unet"], micro_engine.loaded.vae
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn((1, 4, 16, 16), generator=generator)
    states = torch.randn((1, 77, unet.config.cross_attention_dim), generator=generator)

    def shift_error() -> tuple[float, float]:
        with torch.no_grad():
            rolled = torch.roll(latent, 4, dims=3)
            unet_error = unet(rolled, 500, states).sample - torch.roll(unet(latent, 500, states).sample, 4, dims=3)
            decoded = vae.decode(rolled).sample - torch.roll(vae.decode(latent).sample, 16, dims=3)
        return float(unet_error.abs().max()), float(decoded.abs().max())

    with circular_padding(unet, vae):
        assert max(shift_error()) < 1e-4
    assert min(shift_error()) > 1e-2  # zero padding again: the edges show
    assert all(layer.padding_mode == "zeros" for layer in unet.modules() if isinstance(layer, torch.nn.Conv2d))


def test_a_tiling_job_says_so_and_leaves_the_model_as_it_was(micro_engine):
    fields = {"prompt": "a red circle on a blue background", "seed": 2, "steps": 8}
    before = list(micro_engine.generate(GenerationRequest(**fields)))[-1]
    tiled = list(micro_engine.generate(GenerationRequest(tiling=True, **fields)))[-1]
    after = list(micro_engine.generate(GenerationRequest(**fields)))[-1]
    assert isinstance(tiled, Result) and "Tiling: True" in tiled.infotexts[0]
    assert parse_infotext(tiled.infotexts[0]).tiling
    assert tiled.images[0].tobytes() != before.images[0].tobytes()
    assert after.images[0].tobytes() == before.images[0].tobytes()  # traced UNet and padding as before
    assert "Tiling" not in before.infotexts[0]
