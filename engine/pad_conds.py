"""The UNet asked at each conditioning's own length, as A1111 asks it, and A1111's "Pad conds".

A prompt is encoded in chunks of 77 tokens, so a long prompt and a short negative prompt have token states of
different lengths. A diffusers pipeline batches them, so the engine pads the shorter with copies of the empty
prompt's encoding (PromptEncoder.encode_many). A1111 by default does not pad: where the prompt's and the negative
prompt's states differ in length it asks the UNet for each separately, at its own length; only with its "Pad
prompt/negative prompt to be same length" option (`pad_cond_uncond`, infotext "Pad conds: True") does it pad the
shorter with empty-prompt chunks and batch them. The two differ: cross-attention spreads over the padding's tokens
too. `NaturalLengthUNet` stands in for the UNet and does what A1111 does, so long prompts make A1111's pictures.

Each row's own length is found from its states: the padding chunks are exact copies of the padding chunk, at the
end; no chunk a prompt encodes to is, since A1111's chunking never ends a prompt on an empty chunk (an empty prompt
is one empty chunk, and a row keeps at least one). With composable parts (AND), A1111 stacks the parts' states to
one length by repeating each one's last token state (its stack_conds): `stacked_parts` does the same.
"""

from __future__ import annotations

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from .traced_unet import UNetStandIn, unet_rows

CHUNK_TOKENS = 77


def own_chunks(states: torch.Tensor, padding: torch.Tensor) -> int:
    """How many 77-token chunks of one row's token states (tokens, hidden) are its own: all but the trailing copies
    of `padding` (77, hidden), and at least one."""
    chunks = states.shape[0] // CHUNK_TOKENS
    while chunks > 1 and torch.equal(states[(chunks - 1) * CHUNK_TOKENS : chunks * CHUNK_TOKENS], padding):
        chunks -= 1
    return chunks


def lengths_differ(conditioning) -> bool:
    """Whether at some step of a job the prompt's states (its longest AND part's, as A1111 stacks them) and the
    negative prompt's differ in length: where A1111's Pad conds pads, and writes so."""
    if conditioning.padding is None:
        return False
    padding = conditioning.padding.reshape(CHUNK_TOKENS, -1)

    def own(embeds) -> int:
        return own_chunks(getattr(embeds, "embeds", embeds)[0], padding)

    for step in range(conditioning.steps):
        positive, negative = conditioning.at(step)
        positives = [embeds for embeds, _weight in conditioning.parts_at(step)] or [positive]
        if max(own(embeds) for embeds in positives) != own(negative):
            return True
    return False


def stacked_parts(parts: list[torch.Tensor], padding: torch.Tensor) -> list[torch.Tensor]:
    """Composable parts' token states (rows, tokens, hidden), padded to one length, as A1111 stacks them: each
    trimmed to its own chunks and lengthened to the longest part's by repeating its last token state, then to the
    batch's length with `padding` chunks again (which the UNet's stand-in takes off)."""
    padding = padding.reshape(CHUNK_TOKENS, -1).to(parts[0])
    own = [own_chunks(part[0], padding) for part in parts]
    longest = max(own) * CHUNK_TOKENS
    stacked = []
    for part, chunks in zip(parts, own, strict=True):
        trimmed = part[:, : chunks * CHUNK_TOKENS]
        last = trimmed[:, -1:].expand(-1, longest - trimmed.shape[1], -1)
        tail = padding.repeat((part.shape[1] - longest) // CHUNK_TOKENS, 1).expand(part.shape[0], -1, -1)
        stacked.append(torch.cat([trimmed, last, tail], dim=1))
    return stacked


class NaturalLengthUNet(UNetStandIn):
    """The UNet asked at each row's own length (A1111's default): rows of one length in one call, each length in a
    call of its own; with `pad` (A1111's Pad conds) every row at the longest row's length, in one call. A batch
    whose rows are all their full length goes to the UNet as it is."""

    def __init__(self, unet: torch.nn.Module, padding: torch.Tensor, *, pad: bool = False):
        super().__init__(unet)
        self.padding = padding.reshape(CHUNK_TOKENS, -1)
        self.pad = bool(pad)

    def forward(self, sample, timestep, encoder_hidden_states, return_dict: bool = True, **kwargs):
        # The states go on by name, as a pipeline hands them to its UNet (hooks on it read them there).
        tokens = encoder_hidden_states.shape[1]
        if tokens % CHUNK_TOKENS or tokens == CHUNK_TOKENS:
            return self.unet(
                sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=return_dict, **kwargs
            )
        padding = self.padding.to(encoder_hidden_states)
        own = [own_chunks(row, padding) for row in encoder_hidden_states]
        groups: dict[int, list[int]] = {}
        if self.pad:
            groups[max(own)] = list(range(len(own)))
        else:
            for row, chunks in enumerate(own):
                groups.setdefault(chunks, []).append(row)
        if list(groups) == [tokens // CHUNK_TOKENS]:
            return self.unet(
                sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=return_dict, **kwargs
            )
        total, outputs, order = sample.shape[0], [], []
        for chunks, rows in groups.items():
            index = torch.tensor(rows)
            outputs.append(
                self.unet(
                    unet_rows(sample, index, total),
                    unet_rows(timestep, index, total),
                    encoder_hidden_states=encoder_hidden_states[
                        index.to(encoder_hidden_states.device), : chunks * CHUNK_TOKENS
                    ],
                    return_dict=False,
                    **{key: unet_rows(value, index, total) for key, value in kwargs.items()},
                )[0]
            )
            order.extend(rows)
        result = torch.cat(outputs)[torch.argsort(torch.tensor(order)).to(sample.device)]
        return UNet2DConditionOutput(sample=result) if return_dict else (result,)
