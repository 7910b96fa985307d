"""The one set of argument checks: clear errors that name the argument and what was expected.

Every layer (the public ops, the modules, the decay schedules, the training config) checks
through these, so a rule and its message are written once.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def float_tensor(name: str, t) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32, float16 or bfloat16 tensor, got {t.dtype}")
    return t


def integer(name: str, value, lo: int, hi: Optional[int] = None, extra: Iterable[int] = ()) -> int:
    """``value`` if it is an int (not a bool) in ``lo..hi`` (no upper bound when ``hi`` is None)
    or one of ``extra``; a TypeError for a non-int, a ValueError out of range."""
    # every op call passes through here: the message is built only for an error
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {_allowed(lo, hi, extra)}, got {value!r}")
    if not ((lo <= value and (hi is None or value <= hi)) or value in extra):
        raise ValueError(f"{name} must be {_allowed(lo, hi, extra)}, got {value}")
    return value


def _allowed(lo: int, hi: Optional[int], extra: Iterable[int]) -> str:
    if hi is None:
        text = "a positive int" if lo == 1 else f"an int >= {lo}"
    else:
        text = f"an int in {lo}..{hi}"
    return text + "".join(f" or {e}" for e in extra)


def positive_int(name: str, value) -> int:
    """``value`` if it is an int >= 1; a ValueError naming ``name`` otherwise (any type)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def int_in(name: str, value, lo: int, hi: Optional[int] = None, extra: Iterable[int] = ()) -> int:
    """As :func:`integer`, but a ValueError for any bad value (the modules' and configs' rule:
    their callers catch ValueError to report a bad option)."""
    try:
        return integer(name, value, lo, hi, extra)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def number(name: str, value, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` if it is a finite int or float (not a bool) in the interval; a ValueError otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return value


def choice(name: str, value, options: Iterable) -> object:
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
