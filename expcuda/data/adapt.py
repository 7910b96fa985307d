"""Fit stored images to a model's input: channel count and spatial size, once, at load time."""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 4096  # images resized at a time: bounds the float copy's memory


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, C, H, W) with ``channels`` channels: gray is repeated, colour is averaged."""
    have = x.shape[1]
    if have == channels:
        return x
    if have == 1:
        return x.expand(-1, channels, -1, -1).contiguous()
    if channels == 1:
        return x.float().mean(dim=1, keepdim=True).round().to(torch.uint8)
    raise ValueError(f"cannot turn {have}-channel images into {channels} channels (only 1 <-> C)")


def pad_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad (N, C, H, W) to size x size, centred; odd leftovers go right and bottom."""
    h, w = x.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"cannot pad {h}x{w} images down to {size}x{size}; resize instead")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top))


def resize_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (antialiased) resize of uint8 images to size x size, in chunks."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    out = torch.empty(x.shape[0], x.shape[1], size, size, dtype=torch.uint8)
    for start in range(0, x.shape[0], CHUNK):
        part = x[start:start + CHUNK].float()
        part = F.interpolate(part, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start:start + CHUNK] = part.round().clamp_(0, 255).to(torch.uint8)
    return out


def fit(x: torch.Tensor, size: int, channels: int, how: str = "pad") -> torch.Tensor:
    """Images fitted to the model: ``how`` is "pad" (falls back to resize when too big) or "resize"."""
    if how not in ("pad", "resize"):
        raise ValueError(f"how must be 'pad' or 'resize', got {how!r}")
    x = to_channels(x, channels)
    if how == "pad" and max(x.shape[-2:]) <= size:
        return pad_to(x, size)
    return resize_to(x, size)
