"""Reference (definition of correct) for bit-packed low-precision convolution.

Codes are unsigned integers ``0 .. 2**bits - 1`` stored as uint8. A packed weight tensor
holds them as bit planes: plane ``i`` carries bit ``i`` of every code, eight channels per
byte, channel ``c`` at byte ``c // 8``, bit ``c % 8`` (little-endian inside a byte), pad
bits 0. The packed kernels (``csrc/cpu/packed_cpu.cpp``) are tested against this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from expcuda import _checks

__all__ = ["pack_planes", "unpack_planes", "packed_conv2d_reference"]

_BIT_WEIGHTS = torch.tensor([1 << k for k in range(8)], dtype=torch.int32)


def _check_uint8(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.uint8:
        raise TypeError(f"{name} must be a uint8 tensor, got {t.dtype}")


def pack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[..., C]`` into bit planes ``[..., bits, ceil(C/8)]``."""
    _check_uint8(codes, "codes")
    bits = _checks.int_in("bits", bits, 1, 8)
    if codes.dim() < 1:
        raise ValueError("codes must have at least one dimension (the channels, last)")
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise ValueError(
            f"codes must be < 2**bits = {1 << bits} for bits={bits}, got a code {int(codes.max())}"
        )
    c = codes.shape[-1]
    nbytes = (c + 7) // 8
    padded = F.pad(codes.to(torch.int32), (0, nbytes * 8 - c))
    planes = torch.stack([(padded >> i) & 1 for i in range(bits)], dim=-2)  # [..., bits, 8*nbytes]
    planes = planes.reshape(*planes.shape[:-1], nbytes, 8)
    return (planes * _BIT_WEIGHTS.to(planes.device)).sum(-1).to(torch.uint8)


def unpack_planes(planes: torch.Tensor, bits: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`pack_planes`: ``[..., bits, ceil(C/8)]`` -> uint8 codes ``[..., C]``."""
    _check_uint8(planes, "planes")
    bits = _checks.int_in("bits", bits, 1, 8)
    _checks.positive_int("channels", channels)
    nbytes = (channels + 7) // 8
    if planes.dim() < 2 or planes.shape[-2] != bits or planes.shape[-1] != nbytes:
        raise ValueError(
            f"planes must have shape [..., bits={bits}, ceil(channels/8)={nbytes}], "
            f"got {list(planes.shape)}"
        )
    p = planes.to(torch.int32)
    bitvals = (p.unsqueeze(-1) >> torch.arange(8, device=p.device, dtype=torch.int32)) & 1
    bitvals = bitvals.reshape(*p.shape[:-1], nbytes * 8)[..., :channels]  # [..., bits, C]
    weights = torch.tensor([1 << i for i in range(bits)], dtype=torch.int32, device=p.device)
    codes = (bitvals * weights.view(bits, 1)).sum(-2)
    return codes.to(torch.uint8)


def packed_conv2d_reference(
    x_codes: torch.Tensor,
    w_planes: torch.Tensor,
    channels: int,
    stride: int,
    padding: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer conv of activation codes with packed weight codes (dilation 1, groups 1).

    Returns ``S`` int32 ``[N, Ho, Wo, O]`` (sum of p*q over in-bounds taps and channels) and
    ``T`` int32 ``[N, Ho, Wo]`` (sum of p over the same taps). Padded taps are zero codes and
    contribute nothing. Computed as a float64 ``F.conv2d``: exact, every partial sum is an
    integer far below 2**53.
    """
    _check_uint8(x_codes, "x_codes")
    _check_uint8(w_planes, "w_planes")
    if x_codes.dim() != 4:
        raise ValueError(f"x_codes must be [N, H, W, C] (NHWC), got shape {list(x_codes.shape)}")
    if w_planes.dim() != 5:
        raise ValueError(
            f"w_planes must be [O, KH, KW, w_bits, ceil(C/8)], got shape {list(w_planes.shape)}"
        )
    _checks.positive_int("channels", channels)
    if x_codes.shape[-1] != channels:
        raise ValueError(
            f"x_codes has {x_codes.shape[-1]} channels (last dim), channels={channels}"
        )
    _checks.int_in("stride", stride, 1)
    _checks.int_in("padding", padding, 0)
    w_bits = w_planes.shape[3]
    if not 1 <= w_bits <= 8:
        raise ValueError(f"w_planes dim 3 (w_bits) must be in 1..8, got {w_bits}")
    q = unpack_planes(w_planes, w_bits, channels)  # [O, KH, KW, C] (shape checked there)
    x = x_codes.permute(0, 3, 1, 2).to(torch.float64)
    w = q.permute(0, 3, 1, 2).to(torch.float64)
    s = F.conv2d(x, w, stride=stride, padding=padding)
    ones = torch.ones(1, channels, q.shape[1], q.shape[2], dtype=torch.float64, device=x.device)
    t = F.conv2d(x, ones, stride=stride, padding=padding)
    return (
        s.permute(0, 2, 3, 1).round().to(torch.int32).contiguous(),
        t[:, 0].round().to(torch.int32).contiguous(),
    )
