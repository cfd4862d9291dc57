"""A1111's DDIM CFG++ (CFG++: Manifold-constrained Classifier Free Guidance, Chung et al. 2024), as A1111 runs it.

A1111 guides a CFG++ step at its CFG scale divided by 12.5 (mapping the usual 0 to 12.5 onto CFG++'s 0 to 1), and
hands the sampler the negative prompt's own noise prediction as well: the step (A1111DDIMCFGppScheduler) takes its
picture estimate from the guided prediction and heads on along the negative one.

diffusers' pipelines guide themselves, negative rows first, and only where their guidance scale is above 1, so
`CFGppUNet` stands in for the UNet as the outermost of a pass's stand-ins: it hands the scheduler the negative rows'
prediction and moves the prompt rows towards the negative ones so that the pipeline's own mixing, at the scale it is
called with (`pipeline_guidance_scale`), comes out at A1111's scale. Where A1111 skips the negative (NGMS, Skip Early
CFG) the stand-ins below hand both halves the prompt's prediction, which A1111 also takes as the negative one then.
"""

from __future__ import annotations

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from .samplers import get_sampler
from .traced_unet import UNetStandIn

# A1111's cond_scale_miltiplier for CFG++ is 1 / 12.5.
CFGPP_DIVISOR = 12.5


def pipeline_guidance_scale(sampler_name: str, cfg_scale: float) -> float:
    """The guidance_scale a pipeline pass runs with: the job's CFG scale, but for CFG++ at a CFG scale of 1 or less
    (which A1111 still guides, at CFG scale / 12.5) one above 1, so that the pipeline asks for the negative rows
    (CFGppUNet scales its mixing back)."""
    if get_sampler(sampler_name).cfgpp and cfg_scale <= 1:
        return CFGPP_DIVISOR
    return float(cfg_scale)


class CFGppUNet(UNetStandIn):
    """The UNet of a CFG++ pass: hands `scheduler` (an A1111DDIMCFGppScheduler) each call's negative prediction, and
    makes the pipeline's guidance at `pipeline_scale` come out as A1111's at cfg_scale / CFGPP_DIVISOR."""

    def __init__(self, unet: torch.nn.Module, scheduler, cfg_scale: float, pipeline_scale: float):
        super().__init__(unet)
        self.scheduler = scheduler
        self.factor = float(cfg_scale) / CFGPP_DIVISOR / float(pipeline_scale)

    def forward(self, sample, timestep, encoder_hidden_states, *args, return_dict: bool = True, **kwargs):
        output = self.unet(sample, timestep, encoder_hidden_states, *args, return_dict=False, **kwargs)[0]
        negative, prompt = output.chunk(2)  # the pipeline's layout: negative rows, then prompt rows
        self.scheduler.negative_prediction = negative
        # The pipeline then makes negative + pipeline_scale * (this - negative).
        result = torch.cat([negative, negative + (prompt - negative) * self.factor])
        return UNet2DConditionOutput(sample=result) if return_dict else (result,)
