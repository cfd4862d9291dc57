"""A1111's composable diffusion: a prompt of parts joined by AND, each guiding the picture by its weight.

"a red circle AND a blue background :0.5" conditions the UNet on each part separately and adds up
their guidance, as A1111's CFG denoiser combines them:

    guided = uncond + cfg_scale * sum(weight_i * (cond_i - uncond))

(A1111 sums in the space of the predicted clean image; for a fixed step that is the same sum of the
noise predictions, since each is a linear function of the other.) One part of weight 1 is plain
classifier-free guidance.

diffusers' pipelines know one prompt, so `ComposedGuidance` stands in for their UNet: where the pipeline
asks for the negative and the prompt's predictions, it runs the negative and every part in one batch and
hands back a "prompt" prediction that the pipeline's own guidance step turns into the sum above.
"""

from __future__ import annotations

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from .negative_guidance import NegativeGuidanceSkip
from .pad_conds import stacked_parts
from .prompts import Conditioning, SDXLEmbeds
from .traced_unet import UNetStandIn


class ComposedGuidance(UNetStandIn):
    """The UNet of one job whose prompt has composable parts.

    `cfg_in_pipeline` says whether the pipeline does classifier-free guidance itself (a batch of negative
    rows then prompt rows); without it (CFG scale 1 or less, or a guidance-embedding model) this module
    computes the negative's prediction and applies `guidance_scale` itself. `step_index` is the sampling
    step whose prompt-editing entries apply; the job's step callback moves it on. `skip` (NGMS, with the
    pipeline guiding) leaves the negative out of some calls: the first part's prediction stands in for it
    then, as in A1111."""

    def __init__(
        self,
        unet: torch.nn.Module,
        conditioning: Conditioning,
        guidance_scale: float,
        cfg_in_pipeline: bool,
        skip: NegativeGuidanceSkip | None = None,
    ):
        super().__init__(unet)
        self.conditioning = conditioning
        self.guidance_scale = float(guidance_scale)
        self.cfg_in_pipeline = cfg_in_pipeline
        self.skip = skip if cfg_in_pipeline else None
        self.step_index = 0

    def forward(self, sample, timestep, encoder_hidden_states, *args, return_dict: bool = True, **kwargs):
        parts = self.conditioning.parts_at(self.step_index)
        skip_negative = self.skip is not None and self.skip.skips(timestep)
        count = len(parts) + (0 if skip_negative else 1)  # the negative (unless skipped), then each part
        images = sample.shape[0] // 2 if self.cfg_in_pipeline else sample.shape[0]
        added = dict(kwargs.pop("added_cond_kwargs", None) or {})

        if self.cfg_in_pipeline:
            negative_states = encoder_hidden_states[:images]
            negative_pooled = added["text_embeds"][:images] if "text_embeds" in added else None
        else:
            negative = self.conditioning.at(self.step_index)[1]
            negative_states, negative_pooled = _states_and_pooled(negative, images, encoder_hidden_states)
        states = [] if skip_negative else [negative_states]
        pooled = [] if skip_negative else [negative_pooled]
        parts_states = []
        for embeds, _weight in parts:
            part_states, part_pooled = _states_and_pooled(embeds, images, encoder_hidden_states)
            parts_states.append(part_states)
            pooled.append(part_pooled)
        if self.conditioning.padding is not None:  # A1111's syntax: the parts stacked to one length as A1111 does
            parts_states = stacked_parts(parts_states, self.conditioning.padding)
        states += parts_states

        # The prompt rows' inputs (the last `images` rows), once for the negative and once for each part.
        def repeated(value):
            if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != sample.shape[0]:
                return value
            rows = value[-images:]
            return rows.repeat(count, *([1] * (rows.dim() - 1)))

        if "text_embeds" in added:
            added["text_embeds"] = torch.cat(pooled)
        if "time_ids" in added:
            added["time_ids"] = repeated(added["time_ids"])
        if added:
            kwargs["added_cond_kwargs"] = added
        if "timestep_cond" in kwargs:
            kwargs["timestep_cond"] = repeated(kwargs["timestep_cond"])
        output = self.unet(
            repeated(sample),
            repeated(timestep),
            torch.cat(states),
            *args,
            return_dict=False,
            **kwargs,
        )[0]

        predictions = output.split(images)
        negative_prediction = predictions[0]  # the negative's, or where it was skipped the first part's
        guidance = torch.zeros_like(negative_prediction)
        for prediction, (_embeds, weight) in zip(predictions[0 if skip_negative else 1 :], parts, strict=True):
            guidance += weight * (prediction - negative_prediction)
        if self.cfg_in_pipeline:
            # The pipeline makes negative + scale * (this - negative): the sum above.
            result = torch.cat([negative_prediction, negative_prediction + guidance])
        else:
            result = negative_prediction + self.guidance_scale * guidance
        return UNet2DConditionOutput(sample=result) if return_dict else (result,)


def _states_and_pooled(embeds, images: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One conditioning's token states (and SDXL's pooled output) as rows for `images` images."""
    if isinstance(embeds, SDXLEmbeds):
        states, pooled = embeds.embeds, embeds.pooled.to(like.device, like.dtype).repeat(images, 1)
    else:
        states, pooled = embeds, None
    return states.to(like.device, like.dtype).repeat(images, 1, 1), pooled
