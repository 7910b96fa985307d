"""Argument checks shared by the public ops: clear errors that name the argument."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def float_tensor(name: str, t) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32, float16 or bfloat16 tensor, got {t.dtype}")
    return t


def integer(name: str, value, lo: int, hi: int, extra: Iterable[int] = ()) -> int:
    # every op call passes through here: the message is built only for an error
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {_allowed(lo, hi, extra)}, got {value!r}")
    if not (lo <= value <= hi or value in extra):
        raise ValueError(f"{name} must be {_allowed(lo, hi, extra)}, got {value}")
    return value


def _allowed(lo: int, hi: int, extra: Iterable[int]) -> str:
    return f"an int in {lo}..{hi}" + "".join(f" or {e}" for e in extra)


def choice(name: str, value, options: Iterable[str]) -> str:
    options = tuple(options)
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value


def same_device(**tensors: Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"tensors must be on one device, got {listing}")


def rank(name: str, t: Tensor, ranks: Iterable[int], what: str) -> None:
    ranks = tuple(ranks)
    if t.dim() not in ranks:
        wanted = " or ".join(str(r) for r in ranks)
        raise ValueError(f"{name} must have rank {wanted} ({what}), got shape {tuple(t.shape)}")
