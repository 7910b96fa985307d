"""Augmentation on whole batches of in-memory images: random shifts (pad + crop) and flips.

The random draws for an epoch are one table indexed by sample, not by batch
position, so a sample is augmented the same way however the epoch is split
into batches or ranks: that is what lets a resumed run and a DDP run repeat a
single-process run exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augment:
    """``shift``: pixels of zero padding to crop back from (0 = none); ``flip``: random h-flip."""

    shift: int = 0
    flip: bool = False

    @property
    def active(self) -> bool:
        return self.shift > 0 or self.flip


def draw(aug: Augment, n: int, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (offsets (n, 2) in 0..2*shift, flips (n,)) for one epoch."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    offsets = torch.randint(0, 2 * aug.shift + 1, (n, 2), generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5 if aug.flip else torch.zeros(n, dtype=torch.bool)
    return offsets, flips


def apply(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, shift: int) -> torch.Tensor:
    """x (B, C, H, W) shifted by ``offsets - shift`` (zero fill) and flipped where ``flips``."""
    if shift > 0:
        b, _, h, w = x.shape
        padded = F.pad(x, (shift, shift, shift, shift))
        rows = offsets[:, 0, None] + torch.arange(h)
        cols = offsets[:, 1, None] + torch.arange(w)
        batch = torch.arange(b)[:, None, None]
        x = padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flips.any():
        x = torch.where(flips[:, None, None, None], x.flip(3), x)
    return x.contiguous()
