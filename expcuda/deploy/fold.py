"""The integer forms of a collapsed layer: weight codes, activation codes, BatchNorm folded into thresholds.

Every quantized value is written ``gain * (mult * code + add)`` with integer ``mult`` and ``add``, so
that a convolution of activation codes ``p`` (``a = ga * (ma*p + ca)``) with weight codes ``q``
(``w = gw * (mw*q + cw)``) over the in-bounds taps is ``ga * gw * acc`` with the integer

    acc = ma*mw*S + ma*cw*T + ca*mw*U + ca*cw*N

where ``S = sum p*q`` and ``T = sum p`` come from ``packed_conv2d``, and ``U = sum q``, ``N`` (the
in-bounds taps times C) depend only on the weights and the output position (the borders). BatchNorm
followed by the activation quantizer is a step function of ``acc``: its steps are the thresholds.
They are always exact; an affine map ``floor(a*acc + b)`` would be exact only when the rounded
thresholds happen to be evenly spaced, so it is not used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

F64 = torch.float64
INT32_MAX = 2**31 - 1


@dataclass
class Coding:
    """value = gain * (mult * code + add); ``bits`` is the code width."""

    bits: int
    mult: int
    add: int


def accumulator_bound(a: Coding, w: Coding, taps: int) -> int:
    """The largest |mult_a*mult_w*S + ...| (the layer's integer accumulator) any codes can give over
    ``taps`` products (kernel taps x input channels): what the thresholds are clamped to, plus one."""
    return ((abs(a.mult) * (2**a.bits - 1) + abs(a.add)) * (abs(w.mult) * (2**w.bits - 1) + abs(w.add)) * taps)


# --------------------------------------------------------------------------- activations

def activation_coding(kind: str, bits: int, step: float | None = None) -> tuple[Coding, float]:
    """(coding, gain) of an activation quantizer's output; ValueError for one with no integer code."""
    if kind == "dorefa" and 1 <= bits <= 8:
        return Coding(bits, 1, 0), 1.0 / (2**bits - 1)
    if kind == "sign":
        return Coding(1, 2, -1), 1.0
    if kind == "lsq" and 1 <= bits <= 8:
        if step is None or not step > 0:
            raise ValueError(f"an LSQ activation needs a step > 0 to be coded, got {step!r}")
        return Coding(bits, 1, 0), float(step)
    raise ValueError(f"activation quantizer {kind!r} with {bits} bits has no integer code "
                     "(dorefa 1-8 bits, sign and lsq can be deployed packed)")


def activation_levels(kind: str, bits: int, step: float | None) -> list[float]:
    """The BatchNorm outputs ``y`` at which the code steps up: code >= j iff y >= levels[j-1]
    (sign: y > levels[0], the one strict step)."""
    if kind == "sign":
        return [0.0]
    n = 2**bits - 1
    if kind == "dorefa":
        return [(j - 0.5) / n for j in range(1, n + 1)]
    return [(j - 0.5) * float(step) for j in range(1, n + 1)]  # lsq: round(y / s) on [0, n]


def codes_from_values(kind: str, bits: int, a: Tensor, step: float | None = None) -> Tensor:
    """The uint8 codes of an activation quantizer's float output (a = gain * (mult*code + add))."""
    if kind == "sign":
        return (a > 0).to(torch.uint8)
    if kind == "dorefa":
        return torch.round(a.to(torch.float32) * (2**bits - 1)).to(torch.uint8)
    return torch.round(a.to(torch.float32) / float(step)).to(torch.uint8)


def values_from_codes(kind: str, bits: int, p: Tensor, step: float | None = None) -> Tensor:
    """float32 activations from codes, computed as the quantizer computes them (so bit-identical)."""
    from expcuda.quant.reference import div
    pf = p.to(torch.float32)
    if kind == "sign":
        return 2 * pf - 1
    if kind == "dorefa":
        return div(pf, float(2**bits - 1))
    return pf * torch.tensor(float(step), dtype=torch.float32)


# --------------------------------------------------------------------------- weights

def weight_codes(kind: str, bits: int, wq: Tensor, scales: Tensor | None = None,
                 granularity: str = "layer", step: float | None = None):
    """(codes uint8 like wq, coding, gain [G, O] float64, groups) for the quantized weight ``wq``.

    ``groups`` lists the kernel blocks ``(row0, row1, col0, col1)`` that share one gain: the whole
    kernel, except for SYQ's per-row and per-position scales. Binary quantizers whose output holds
    an exact zero (sign(0) = 0, SYQ's threshold) are coded ternary, at 2 bits.
    """
    w = wq.detach().to(F64)
    o, _, kh, kw = w.shape
    whole = [(0, kh, 0, kw)]
    if kind == "dorefa" and bits >= 2:
        n = 2**bits - 1
        q = torch.round((w + 1) * (n / 2))
        return q.to(torch.uint8), Coding(bits, 2, -n), torch.full((1, o), 1.0 / n, dtype=F64), whole
    if kind == "lsq":
        if step is None or not step > 0:
            raise ValueError(f"LSQ weights need a step > 0 to be coded, got {step!r}")
        half = 2 ** (bits - 1)
        q = torch.round(w / float(step)) + half
        return q.to(torch.uint8), Coding(bits, 1, -half), torch.full((1, o), float(step), dtype=F64), whole
    if kind not in ("dorefa", "xnor", "syq"):
        raise ValueError(f"weight quantizer {kind!r} has no integer code")
    ternary = bool((w == 0).any())
    sgn = torch.sign(w)
    if kind == "syq":
        s = scales.detach().to(F64)
        if granularity == "pixel":
            groups = [(i, i + 1, j, j + 1) for i in range(kh) for j in range(kw)]
        elif granularity == "row":
            groups = [(i, i + 1, 0, kw) for i in range(kh)]
        else:
            groups = whole
        # |wq| is |scale| wherever wq != 0, so wq = |scale| * sign(wq): the codes carry the sign
        gains, unit = s.reshape(-1, 1).expand(-1, o), sgn
        gains = gains.abs().clone()
    else:
        # dorefa 1 bit: one |w| for the tensor; xnor: one per output filter
        mag = w.abs().amax(dim=(1, 2, 3))
        if kind == "dorefa":
            mag = mag.amax().expand(o)
        groups, gains, unit = whole, mag.reshape(1, o).clone(), sgn
    if ternary:
        return (unit + 1).to(torch.uint8), Coding(2, 1, -1), gains, groups
    return (unit > 0).to(torch.uint8), Coding(1, 2, -1), gains, groups


def decoded_weight(codes: Tensor, coding: Coding, gains: Tensor, groups) -> Tensor:
    """float64 weight values ``gain * (mult*q + add)`` (the inverse of :func:`weight_codes`)."""
    integer = coding.mult * codes.to(F64) + coding.add
    out = torch.empty_like(integer)
    for g, (r0, r1, c0, c1) in enumerate(groups):
        out[:, :, r0:r1, c0:c1] = integer[:, :, r0:r1, c0:c1] * gains[g].view(-1, 1, 1, 1)
    return out


# --------------------------------------------------------------------------- BatchNorm + quantizer fold

def fold_thresholds(bn: torch.nn.BatchNorm2d, kind: str, bits: int, step: float | None, unit: Tensor,
                    integer: bool, big: int = INT32_MAX) -> tuple[Tensor, Tensor]:
    """(thresholds [O, n] ascending, direction [O] int8) with code = #{j : direction*v >= thr[j]}.

    ``v`` is the layer's accumulator, ``z = unit * v`` the conv output (``unit`` [O] > 0: the gains).
    BatchNorm is ``y = (z - mean) * k + beta``, ``k = gamma / sqrt(var + eps)``; the code steps up
    where y crosses a level, i.e. at ``z = mean + (level - beta) / k``. For k < 0 the comparison
    flips (direction -1); for k == 0 the code is the constant code of y = beta. With an integer
    accumulator the thresholds are rounded to the integers that give the same comparisons and
    clipped to +-``big`` (beyond every reachable accumulator: always on, never on).
    """
    levels = torch.tensor(activation_levels(kind, bits, step), dtype=F64)
    strict = kind == "sign"
    mean, var = bn.running_mean.detach().to(F64), bn.running_var.detach().to(F64)
    gamma = bn.weight.detach().to(F64) if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().to(F64) if bn.bias is not None else torch.zeros_like(mean)
    k = gamma / torch.sqrt(var + bn.eps)
    unit = unit.to(F64)
    o, n = mean.numel(), levels.numel()
    big = float(big) if integer else math.inf
    thr = torch.empty(o, n, dtype=F64)
    direction = torch.ones(o, dtype=torch.int8)
    for c in range(o):
        kc, u = float(k[c]), float(unit[c])
        if kc == 0.0 or u == 0.0:  # y does not depend on v: one constant code
            y0 = float(beta[c]) - float(mean[c]) * kc if u == 0.0 else float(beta[c])
            on = (y0 > levels) if strict else (y0 >= levels)
            thr[c] = torch.where(on, torch.tensor(-big, dtype=F64), torch.tensor(big, dtype=F64))
            continue
        t = (float(mean[c]) + (levels - float(beta[c])) / kc) / u  # y crosses level j at v = t[j]
        if kc > 0:
            # code >= j iff v >= t (sign: v > t)
            edge = torch.floor(t) + 1 if (integer and strict) else (torch.ceil(t) if integer else t)
            thr[c] = edge
        else:
            # code >= j iff v <= t (sign: v < t), i.e. -v >= -t
            direction[c] = -1
            edge = -(torch.ceil(t) - 1) if (integer and strict) else (-torch.floor(t) if integer else -t)
            thr[c] = edge
        if strict and not integer and kc != 0:
            thr[c] = torch.nextafter(thr[c], torch.tensor(math.inf, dtype=F64))
    if integer:
        thr = thr.clamp(-big, big)
    return thr, direction
