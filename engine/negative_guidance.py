"""A1111's "Negative Guidance minimum sigma" (NGMS, `s_min_uncond`): a speed-up that skips the negative prompt's
UNet evaluation late in sampling; and its "Ignore negative prompt during early sampling" (Skip Early CFG,
`skip_early_cond`), which skips it on the first share of the calls.

Late steps, at small noise levels, change fine detail only, and classifier-free guidance matters least there. A1111
leaves out the negative prompt's half of the batch on every other UNet call (the odd ones, counting from 0 in each
sampling pass) whose noise level sigma is below `s_min_uncond`, or on every such call with "NGMS all steps"; the
prompt's prediction then stands in for the negative one, so the guided prediction is the prompt's alone. Each
skipped call costs half as much.

diffusers' pipelines batch the negative rows before the prompt rows and guide themselves, so `SkipNegativeUNet`
stands in for their UNet: on a skipped call it runs the prompt rows only and hands both halves the prompt's
prediction, which the pipeline's guidance turns into that prediction exactly. Skip Early CFG leaves the negative out
of every call whose index over the pass's total (A1111's count: two a step for its second-order samplers) is at
most the given share; the first call always, when it is above 0. Prompts with AND and the refiner
have stand-ins of their own, which ask the same `NegativeGuidanceSkip`.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from .samplers import get_sampler
from .traced_unet import UNetStandIn, unet_rows

# A1111's slider goes to 15: above SD's largest sigma (14.6), every call qualifies.
MAX_NGMS = 15.0


class NegativeGuidanceSkip:
    """Which UNet calls of one sampling pass leave the negative prompt out. `alphas_cumprod` is the model's noise
    schedule, which turns the timestep a pipeline passes into the sigma A1111 compares."""

    def __init__(
        self,
        min_sigma: float,
        all_steps: bool,
        alphas_cumprod: torch.Tensor,
        *,
        early: float = 0.0,
        total_calls: int = 1,
    ):
        self.min_sigma = float(min_sigma)
        self.all_steps = bool(all_steps)
        self.early = float(early)
        self.total_calls = max(1, int(total_calls))
        alphas = alphas_cumprod.double()
        self._log_sigmas = (((1 - alphas) / alphas) ** 0.5).log()
        self.calls = 0  # UNet calls so far in this pass
        self.skipped = 0

    def sigma(self, timestep) -> float:
        """The sigma of a (possibly fractional) timestep: k-diffusion's t_to_sigma, log-sigma interpolated."""
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        t = min(max(t, 0.0), len(self._log_sigmas) - 1.0)
        low = math.floor(t)
        high = min(low + 1, len(self._log_sigmas) - 1)
        weight = t - low
        return math.exp((1 - weight) * float(self._log_sigmas[low]) + weight * float(self._log_sigmas[high]))

    def skips(self, timestep) -> bool:
        """Whether this call (the next one of the pass) leaves the negative prompt out; counts it."""
        call = self.calls
        self.calls += 1
        early = self.early > 0 and call / self.total_calls <= self.early
        skip = early or ((call % 2 == 1 or self.all_steps) and self.sigma(timestep) < self.min_sigma)
        self.skipped += skip
        return skip


def model_calls(sampler_name: str, sampling_steps: int) -> int:
    """The UNet calls A1111 counts for a pass (its total_steps): two a step for its second-order samplers."""
    return sampling_steps * (2 if get_sampler(sampler_name).second_order else 1)


def prompt_rows(value, rows: int):
    """The prompt's rows of a batched UNet input (the last `rows`), or the value as it is when it is not batched."""
    return unet_rows(value, slice(rows, None), 2 * rows)


class SkipNegativeUNet(UNetStandIn):
    """The UNet of a pipeline that guides itself (negative rows, then prompt rows), skipping the negative rows
    where `skip` says so."""

    def __init__(self, unet: torch.nn.Module, skip: NegativeGuidanceSkip):
        super().__init__(unet)
        self.skip = skip

    def forward(self, sample, timestep, encoder_hidden_states, *args, return_dict: bool = True, **kwargs):
        if not self.skip.skips(timestep):
            return self.unet(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        rows = sample.shape[0] // 2
        kwargs = {key: prompt_rows(value, rows) for key, value in kwargs.items()}
        prompt = self.unet(
            sample[rows:],
            prompt_rows(timestep, rows),
            encoder_hidden_states[rows:],
            *args,
            return_dict=False,
            **kwargs,
        )[0]
        both = torch.cat([prompt, prompt])
        return UNet2DConditionOutput(sample=both) if return_dict else (both,)
