"""Weight and activation quantizers as modules, so learned scales live in the block's state.

The activation module is ``phi`` then ``Qa`` of the paper (Figure 2); which
``phi`` goes with which quantizer is a choice documented in ``ACTIVATIONS``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from expcuda import _checks, quant

#: the weight quantizers by name, in the order of their declarations (``expcuda.quant.WEIGHT_KINDS``)
W_QUANTS = tuple(sorted(quant.WEIGHT_KINDS, key=lambda name: quant.WEIGHT_KINDS[name].order))
A_QUANTS = ("dorefa", "sign", "lsq", "none")
#: the quantizers with one bit-width only, and the side they quantize ("w" weights, "a" activations)
BINARY = {**{name: "w" for name, kind in quant.WEIGHT_KINDS.items() if kind.bits is None}, "sign": "a"}
FP_ACTIVATIONS = (None, "none", "relu", "clip")

#: ``phi`` (the LP branch's nonlinearity before ``Qa``) per ``a_quant``:
#: dorefa: clip to [0, 1] (DoReFa-Net's own activation: BN, then the quantizer's
#:         clip; there is no separate ReLU). In scheme 2 clip-then-quantize is the
#:         DoReFa quantizer itself, forward and STE backward.
#: sign:   identity (BNN / XNOR-Net: BN, then sign with the hardtanh STE).
#: lsq:    ReLU, then unsigned LSQ (which clips to [0, Qp*s] anyway).
#: none:   ReLU, no quantizer (full-precision activations).
ACTIVATIONS = {"dorefa": "clip", "sign": "identity", "lsq": "relu", "none": "relu"}


def check_w_bits(kind: str, bits) -> None:
    """The weight bit-widths each quantizer implements (a binary one, bits=None, ignores ``bits``)."""
    allowed = quant.WEIGHT_KINDS[kind].bits
    if allowed is not None:
        _checks.int_in("w_bits", bits, *allowed)


def check_a_bits(kind: str, bits) -> None:
    """The activation bit-widths each quantizer implements (32: DoReFa's clip alone; sign is binary)."""
    if kind == "dorefa":
        _checks.int_in("a_bits", bits, 1, 8, extra=(32,))
    elif kind == "lsq":
        _checks.int_in("a_bits", bits, 1, 8)


def apply_phi(kind: str, y: Tensor) -> Tensor:
    """The elementwise nonlinearity ``phi`` / ``psi`` by name, with torch's own autograd."""
    if kind == "clip":
        return torch.clamp(y, 0.0, 1.0)
    if kind == "relu":
        return torch.relu(y)
    return y


class WeightQuantizer(nn.Module):
    """``Qw`` by name: each kind's parameters and call are its ``expcuda.quant.WEIGHT_KINDS`` entry
    (dorefa: k bits; xnor: binary, per-filter scale; syq: learned scales; lsq: learned step)."""

    def __init__(self, kind: str, bits: int, kernel_size: tuple[int, int], *,
                 eta: float | None = None, granularity: str = "pixel"):
        super().__init__()
        _checks.choice("w_quant", kind, W_QUANTS)
        check_w_bits(kind, bits)
        self.kind, self.bits = kind, bits
        #: False: weights pass unquantized (a progressive stage in full precision);
        #: ``skip_in_training``: unquantized in training mode only (stochastic precision).
        self.enabled, self.skip_in_training = True, False
        self._eta_given = eta is not None
        self._spec.setup(self, kernel_size, eta, granularity)

    @property
    def _spec(self):
        return quant.WEIGHT_KINDS[self.kind]

    @property
    def quantizing(self) -> bool:
        return self.enabled and not (self.training and self.skip_in_training)

    def set_bits(self, bits: int, reinit_from: Tensor | None = None) -> None:
        """Change the bit-width in place (a staircase stage); ``reinit_from`` re-initialises the
        learned scales from those weights (else they carry over). SYQ's default threshold follows."""
        check_w_bits(self.kind, bits)
        self.bits = bits
        self._spec.on_bits(self, bits)
        if reinit_from is not None:
            self.init_from(reinit_from)

    @torch.no_grad()
    def init_from(self, w: Tensor) -> None:
        """Data-dependent initial scales (SYQ: mean|w|; LSQ: 2*mean|w|/sqrt(Qp), as in the LSQ paper)."""
        self._spec.init_from(self, w.detach().abs().mean().clamp_min(1e-8).float())

    def forward(self, w: Tensor) -> Tensor:
        if not self.quantizing:
            return w
        return self._spec.forward(self, w)

    def extra_repr(self) -> str:
        return f"{self.kind}, bits={self.bits}"


class ActivationQuantizer(nn.Module):
    """``Qa`` (and its ``phi``, see ``ACTIVATIONS``); ``activation=False`` makes it the identity."""

    def __init__(self, kind: str, bits: int, activation: bool = True):
        super().__init__()
        _checks.choice("a_quant", kind, A_QUANTS)
        if not activation and kind != "none":
            raise ValueError(f"a_quant must be 'none' when activation=False (the block ends at its "
                             f"BatchNorm), got {kind!r}")
        self.kind, self.bits, self.activation = kind, bits, activation
        check_a_bits(kind, bits)
        #: as in WeightQuantizer: off (progressive stage) or off in training (stochastic precision)
        self.enabled, self.skip_in_training = True, False
        if kind == "lsq":
            self.step = nn.Parameter(torch.ones(()))
            self.init_step()
        self.phi = ACTIVATIONS[kind] if activation else "identity"

    @torch.no_grad()
    def init_step(self) -> None:
        """LSQ's initial step: covers [0, 2] (post-BN activations rarely go further)."""
        self.step.fill_(2.0 / (2**self.bits - 1))

    @property
    def quantizing(self) -> bool:
        return self.enabled and not (self.training and self.skip_in_training)

    def set_bits(self, bits: int, reinit: bool = True) -> None:
        """Change the bit-width in place (a staircase stage); ``reinit`` resets LSQ's step."""
        check_a_bits(self.kind, bits)
        self.bits = bits
        if reinit and self.kind == "lsq":
            self.init_step()

    def full_precision(self, u: Tensor) -> Tensor:
        """What stands for ``Qa`` while this unit is not quantizing: DoReFa's [0, 1] clip, sign's
        hardtanh (its STE's range), nothing for LSQ and none (u went through ReLU already)."""
        if self.kind == "dorefa":
            return torch.clamp(u, 0.0, 1.0)
        if self.kind == "sign":
            return torch.clamp(u, -1.0, 1.0)
        return u

    def epilogue_args(self):
        """(a_quant, a_bits, phi) for the fused block epilogue, None when it cannot express the
        current form (sign's hardtanh while not quantizing)."""
        if self.quantizing:
            return self.kind, self.bits, self.phi
        if self.kind == "sign":
            return None
        return "none", self.bits, {"dorefa": "clip"}.get(self.kind, self.phi)

    def quantize(self, u: Tensor) -> Tensor:
        """``Qa`` alone (u already went through ``phi``)."""
        if not self.quantizing:
            return self.full_precision(u)
        if self.kind == "dorefa":
            return torch.clamp(u, 0.0, 1.0) if self.bits == 32 else quant.dorefa_activation(u, self.bits)
        if self.kind == "sign":
            return quant.sign_activation(u)
        if self.kind == "lsq":
            return quant.lsq(u, self.step.to(u.dtype), self.bits, signed=False)
        return u

    def forward(self, y: Tensor) -> Tensor:
        if self.kind == "dorefa" and self.bits != 32 and self.quantizing:
            # clip-then-DoReFa is the DoReFa quantizer itself, forward and STE mask alike
            return quant.dorefa_activation(y, self.bits)
        return self.quantize(apply_phi(self.phi, y))

    def extra_repr(self) -> str:
        return f"{self.kind}, bits={self.bits}, phi={self.phi}"
