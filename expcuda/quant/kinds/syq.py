"""SYQ weights: binary (``eta=0``) or ternary, with scales learned per pixel, row or layer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from expcuda import _checks
from expcuda._custom import apply, autograd, call, define
from expcuda.codes import GRANULARITY_CODE
from expcuda.quant import spec
from expcuda.quant.ops import LIB, empty_weight_like, kernel, weight_forward
from expcuda.quant.reference import F32, _sum64, sign

GRANULARITY_RANK = {"pixel": 2, "row": 1, "layer": 0}

spec.kernels(
    syq_weight_fwd="SYQ weights: (w, scales, eta, granularity) -> Qw(w)",
    syq_weight_bwd="SYQ weights' gradient: (grad, w, scales, eta, granularity) -> (dw, dscales)",
)


# --------------------------------------------------------------------------- the reference

def _syq_view(scales: Tensor, granularity: str) -> Tensor:
    """scales broadcast against a (out, in, kh, kw) weight (or any weight for 'layer')."""
    s = scales.to(F32)
    if granularity == "row":
        return s.view(-1, 1)
    return s


@spec.reference
def syq_weight_fwd(w: Tensor, scales: Tensor, eta: float, granularity: str) -> Tensor:
    wf = w.to(F32)
    thr = torch.tensor(eta, dtype=F32) * wf.abs().amax()
    keep = (wf.abs() > thr).to(F32)
    return ((sign(wf) * keep) * _syq_view(scales, granularity)).to(w.dtype)


@spec.reference
def syq_weight_bwd(grad: Tensor, w: Tensor, scales: Tensor, eta: float,
                   granularity: str) -> tuple[Tensor, Tensor]:
    wf, g = w.to(F32), grad.to(F32)
    thr = torch.tensor(eta, dtype=F32) * wf.abs().amax()
    keep = wf.abs() > thr
    dw = (_syq_view(scales, granularity) * g).to(w.dtype)
    contrib = torch.where(keep, sign(wf) * g, torch.zeros((), dtype=F32))
    if granularity == "layer":
        ds = _sum64(contrib)
    elif granularity == "row":
        ds = _sum64(contrib, (0, 1, 3))
    else:
        ds = _sum64(contrib, (0, 1))
    return dw, ds.to(F32).to(scales.dtype).view_as(scales)


# --------------------------------------------------------------------------- the compiled kernels take codes

@spec.compiled("syq_weight_fwd")
def _fwd_compiled(C, w, scales, eta, granularity):
    return C.syq_weight_fwd(w, scales, eta, GRANULARITY_CODE[granularity])


@spec.compiled("syq_weight_bwd")
def _bwd_compiled(C, grad, w, scales, eta, granularity):
    return C.syq_weight_bwd(grad, w, scales, eta, GRANULARITY_CODE[granularity])


# --------------------------------------------------------------------------- the ops

def _syq_weight_op_impl(w: Tensor, scales: Tensor, eta: float, granularity: str) -> Tensor:
    return weight_forward("syq_weight_fwd", w, scales.contiguous(), eta, granularity)


syq_weight_op = define(f"{LIB}::syq_weight", _syq_weight_op_impl)


@syq_weight_op.register_fake
def _(w, scales, eta, granularity):
    return empty_weight_like(w)


def _syq_weight_backward_impl(grad: Tensor, w: Tensor, scales: Tensor, eta: float,
                              granularity: str) -> tuple[Tensor, Tensor]:
    grad, w, scales = grad.contiguous(), w.contiguous(), scales.contiguous()
    if w.numel() == 0:
        return torch.empty_like(w), torch.zeros_like(scales)
    return kernel("syq_weight_bwd", w)(grad, w, scales, eta, granularity)


syq_weight_backward = define(f"{LIB}::syq_weight_backward", _syq_weight_backward_impl)


@syq_weight_backward.register_fake
def _(grad, w, scales, eta, granularity):
    return empty_weight_like(w), empty_weight_like(scales)


def _syq_setup(ctx, inputs, output):
    w, scales, eta, granularity = inputs
    ctx.save_for_backward(w, scales)
    ctx.eta, ctx.granularity = eta, granularity


def _syq_grad(ctx, grad):
    w, scales = ctx.saved_tensors
    dw, ds = call(ctx, syq_weight_backward, grad, w, scales, ctx.eta, ctx.granularity)
    return dw, ds, None, None


autograd(syq_weight_op, _syq_grad, _syq_setup)


@spec.public
def syq_weight(w: Tensor, scales: Tensor, eta: float = 0.0, granularity: str = "pixel") -> Tensor:
    """SYQ weights: binary (``eta=0``) or ternary, with learned scales per pixel, row or layer."""
    _checks.float_tensor("w", w)
    _checks.float_tensor("scales", scales)
    _checks.choice("granularity", granularity, GRANULARITY_RANK)
    _checks.same_device(w=w, scales=scales)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta < 1.0:
        raise ValueError(f"eta must be a float in [0, 1), got {eta!r}")
    if granularity == "layer":
        expected = ()
    else:
        _checks.rank("w", w, (4,), f"(out, in, kh, kw) for granularity {granularity!r}")
        expected = tuple(w.shape[2:]) if granularity == "pixel" else (w.shape[2],)
    if tuple(scales.shape) != expected:
        raise ValueError(f"scales must have shape {expected} for granularity {granularity!r} "
                         f"and w of shape {tuple(w.shape)}, got {tuple(scales.shape)}")
    return apply(syq_weight_op, w, scales, float(eta), granularity)


# --------------------------------------------------------------------------- nn and the self-check

def _default_eta(bits: int) -> float:
    return 0.0 if bits == 1 else 0.05  # binary, or ternary with the paper's threshold


def _setup(m, kernel_size, eta, granularity) -> None:
    _checks.choice("w_granularity", granularity, tuple(GRANULARITY_RANK))
    m.eta = float(eta if eta is not None else _default_eta(m.bits))
    if not 0.0 <= m.eta < 1.0:
        raise ValueError(f"w_eta must be in [0, 1), got {eta!r}")
    m.granularity = granularity
    shape = {"pixel": tuple(kernel_size), "row": (kernel_size[0],), "layer": ()}[granularity]
    m.scales = nn.Parameter(torch.ones(shape))


def _on_bits(m, bits: int) -> None:
    if not m._eta_given:
        m.eta = _default_eta(bits)


spec.weight_kind(name="syq", order=2, bits=(1, 2),  # SYQ is binary (1) or ternary (2)
                 forward=lambda m, w: syq_weight(w, m.scales.to(w.dtype), m.eta, m.granularity),
                 setup=_setup, init_from=lambda m, mean_abs: m.scales.fill_(mean_abs), on_bits=_on_bits)


def _syq_inputs(granularity):
    def make(dtype, device):
        w = spec.sample((6, 3, 3, 3), dtype, device)
        shape = {"pixel": (3, 3), "row": (3,), "layer": ()}[granularity]
        scales = (torch.rand(shape, generator=torch.Generator().manual_seed(5)) + 0.5).to(dtype=dtype, device=device)
        return w, scales
    return make


spec.selftest("syq_weight", [
    (f"{g} eta={eta}", (lambda g, eta: lambda w, s: syq_weight(w, s, eta, g))(g, eta), _syq_inputs(g))
    for g in ("pixel", "row", "layer") for eta in (0.0, 0.05)])
