"""A1111's refiner: another model of the same kind takes over the sampling for its last part.

As in A1111 (1.6 and later, switching by the noise level rather than by counting steps), the model changes before
the first model evaluation whose timestep is at or below 999 - 1000 × switch_at: at 0.8, the last fifth of the
schedule's noise levels, whatever the sampler, the step count or img2img's denoising strength. From there on the
refiner's UNet runs, with the prompts encoded by the refiner's own text encoder(s), and its VAE decodes the picture.
With hires fix on, the refiner takes part in the second pass only (A1111's default, "second pass").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .pad_conds import NaturalLengthUNet
from .prompts import guidance_rows
from .traced_unet import UNetStandIn

if TYPE_CHECKING:
    from .models import LoadedModel
    from .prompts import Conditioning


def switch_timestep(switch_at: float) -> float:
    """The timestep at or below which the refiner runs (A1111: completed ratio (999 - t) / 1000 >= switch_at)."""
    return 999 - 1000 * float(switch_at)


@dataclass
class Refiner:
    """A job's refiner: its model, the prompts it encoded for the pass it joins, its VAE and where it switches."""

    model: LoadedModel
    conditioning: Conditioning
    vae: Any
    switch_at: float
    lora_hashes: dict[str, str] = field(default_factory=dict)  # the LoRAs it runs, for the infotext

    def stand_in(
        self, unet: torch.nn.Module, *, traced: bool, cfg_in_pipeline: bool, pad_conds: bool = False
    ) -> RefinerSwitch:
        """The UNet one pass's pipeline calls: `unet` until the switch, the refiner's from there on.
        `cfg_in_pipeline` says whether the pipeline batches negative rows before the prompt rows. The refiner's UNet
        is asked at each conditioning's own length, or with `pad_conds` at one (engine/pad_conds.py)."""
        refiner_unet = self.model.job_unet(traced=traced)
        if self.conditioning.padding is not None:
            refiner_unet = NaturalLengthUNet(refiner_unet, self.conditioning.padding, pad=pad_conds)
        return RefinerSwitch(unet, refiner_unet, self.conditioning, switch_timestep(self.switch_at), cfg_in_pipeline)


class RefinerSwitch(UNetStandIn):
    """The job's UNet, then the refiner's. `step_index` is the sampling step whose prompt-editing entries apply (the
    job's step callback moves it on); `switched` says whether the refiner has run."""

    def __init__(
        self,
        unet: torch.nn.Module,
        refiner_unet: torch.nn.Module,
        conditioning: Conditioning,
        at: float,
        cfg_in_pipeline: bool,
    ):
        super().__init__(unet)
        self.refiner_unet = refiner_unet
        self.conditioning = conditioning
        self.at = at
        self.cfg_in_pipeline = cfg_in_pipeline
        self.step_index = 0
        self.switched = False

    def forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        current = float(timestep.max()) if isinstance(timestep, torch.Tensor) else float(timestep)
        if round(current) > self.at:
            return self.unet(sample, timestep, encoder_hidden_states, *args, **kwargs)
        self.switched = True
        states, pooled = self._refiner_rows(encoder_hidden_states)
        if pooled is not None:
            kwargs["added_cond_kwargs"] = {**(kwargs.get("added_cond_kwargs") or {}), "text_embeds": pooled}
        return self.refiner_unet(sample, timestep, states, *args, **kwargs)

    def _refiner_rows(self, main_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The refiner's prompt conditioning in the layout of the main one."""
        images = main_states.shape[0] // 2 if self.cfg_in_pipeline else main_states.shape[0]
        return guidance_rows(self.conditioning.at(self.step_index), images, self.cfg_in_pipeline)
