"""NVIDIA's GPU noise, drawn on any machine: A1111's "NV" random source.

A1111 draws its noise on the GPU by default, and on an NVIDIA card torch.randn there comes from cuRAND's Philox
4x32-10 counter-based generator turned normal by Box-Muller. A1111's NV source computes the same numbers on the CPU,
so that a picture made on an NVIDIA card can be made again anywhere; its infotexts say "RNG: NV". This is that
generator, to the same numbers as A1111's NV source, bit for bit:

- Philox 4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC'11), keyed by
  the 64-bit seed (low 32 bits first);
- the i-th number of a generator's k-th draw comes from the counter (k, 0, i, 0): each draw, whatever its size,
  moves the generator on by one;
- of the four words out, the first two make one normal number by cuRAND's Box-Muller (its float32 constants for
  2^-32 and 2 pi, the uniforms centred in their 2^-32 bins), the sine branch, rounded to float32 at the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

# Philox 4x32's round multipliers and its key schedule's Weyl increments (the golden ratio and sqrt(3) - 1, in 32 bits).
_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)
_ROUNDS = 10
_WORD = 0xFFFFFFFF
# cuRAND's float32 constants: 2^-32, and 2^-32 x 2 pi (their product rounded to float32).
_TWO_POW_MINUS_32 = float(np.float32(2.3283064e-10))
_TWO_POW_MINUS_32_TWO_PI = float(np.float32(2.3283064e-10 * 6.2831855))


def philox_4x32(counter: Sequence[np.ndarray], key: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """The four 32-bit output words (uint64 arrays) of Philox 4x32-10 for each counter (four arrays of 32-bit words)
    under one 64-bit key given as (low, high) words."""
    words = [np.asarray(part, dtype=np.uint64) for part in counter]
    low, high = key
    shift, mask = np.uint64(32), np.uint64(_WORD)
    for round_no in range(_ROUNDS):
        if round_no:  # the key moves on between rounds
            low, high = (low + _KEY_STEPS[0]) & _WORD, (high + _KEY_STEPS[1]) & _WORD
        # 32 x 32-bit products, exact in 64 bits: their high words mix with the other half of the counter.
        first = words[0] * np.uint64(_MULTIPLIERS[0])
        third = words[2] * np.uint64(_MULTIPLIERS[1])
        words = [
            (third >> shift) ^ words[1] ^ np.uint64(low),
            third & mask,
            (first >> shift) ^ words[3] ^ np.uint64(high),
            first & mask,
        ]
    return tuple(words)


def normal_from_words(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """cuRAND's Box-Muller over two words of 32 random bits: sqrt(-2 log u) sin(2 pi v), float32. Computed in float64
    from cuRAND's float32 constants, as A1111's NV source computes it."""
    uniform = first.astype(np.float64) * _TWO_POW_MINUS_32 + _TWO_POW_MINUS_32 / 2
    angle = second.astype(np.float64) * _TWO_POW_MINUS_32_TWO_PI + _TWO_POW_MINUS_32_TWO_PI / 2
    return (np.sqrt(-2.0 * np.log(uniform)) * np.sin(angle)).astype(np.float32)


class PhiloxNoise:
    """One seed's NVIDIA noise: `randn(shape)` is what torch.randn(shape, device="cuda") gives after
    torch.manual_seed(seed), then its next draw, and so on (A1111's rng_philox.Generator)."""

    def __init__(self, seed: int):
        self.seed = int(seed) & (2**64 - 1)
        self.draws = 0

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        count = math.prod(shape)
        if count >= 2**32:
            raise ValueError(f"NV noise: {count} numbers in one draw; at most 2^32 - 1")
        index = np.arange(count, dtype=np.uint64)
        zeros = np.zeros(count, dtype=np.uint64)
        counter = (np.full(count, self.draws & _WORD, dtype=np.uint64), zeros, index, zeros)
        self.draws += 1
        words = philox_4x32(counter, (self.seed & _WORD, self.seed >> 32))
        return torch.from_numpy(normal_from_words(words[0], words[1]).reshape(tuple(shape)))
