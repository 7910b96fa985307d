"""The low-precision block and the expanded block of EXP-Net (the paper's Figure 2).

``LowPrecisionConv2d``: ``Qa(phi(BN(pool(conv(A, Qw(W1))))))``, the baseline.
``ExpandedConv2d`` adds the full-precision branch ``f * psi(BN(pool(conv(A, W2))))``
and combines per scheme 1 (quantize after the combine) or scheme 2 (before).

Two implementations compute the same function: the reference composition
(``reference.py``: plain PyTorch ops, the definition of correct) and the fused
path (one convolution on stacked weights and the ``expcuda::block_epilogue``
custom op, whose kernel is C++ on CPU, Triton on GPU, PyTorch otherwise).  The
fused path serves training mode (batch statistics) and the folded block; eval
mode, ``fused=False`` and a forced ``reference`` backend use the reference
composition.

The LP activation ``phi`` per ``a_quant`` (see ``quantizers.ACTIVATIONS``):
dorefa: clip to [0, 1], which is the DoReFa quantizer's own clip (no ReLU);
sign: identity before sign; lsq: ReLU then unsigned LSQ; none: ReLU and no
quantizer.  ``fp_activation`` (``psi``): None (the authors' BN-only FP
branch), ``"relu"`` or ``"clip"``.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from expcuda import _checks, backends, codes
from expcuda.nn import reference
from expcuda.nn.quantizers import A_QUANTS, BINARY, FP_ACTIVATIONS, ActivationQuantizer, WeightQuantizer

COMBINES = tuple(codes.COMBINES)  # ("add", "sub", "concat"), from the kernels' one table
SCHEMES = (1, 2)


def _check_geometry(kernel_size, stride, padding, dilation) -> None:
    """Refused here, not later inside the convolution kernel: sizes >= 1, padding >= 0."""
    for name, value, lo in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("dilation", dilation, 1),
                            ("padding", padding, 0)):
        if name == "padding" and isinstance(value, str):
            continue  # 'same' / 'valid': nn.Conv2d checks those
        parts = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        if len(parts) not in (1, 2) or any(isinstance(v, bool) or not isinstance(v, int) or v < lo for v in parts):
            raise ValueError(f"{name} must be an int >= {lo} or a pair of them, got {value!r}")


def _check_fixed_bits(w_quant: str, w_bits, a_quant: str, a_bits) -> None:
    """Binary quantizers have no bit-width: 1, or the blocks' shared default 2 (which they ignore)."""
    for name, kind, bits, side in (("w_bits", w_quant, w_bits, "w"), ("a_bits", a_quant, a_bits, "a")):
        if BINARY.get(kind) == side and bits not in (1, 2):
            raise ValueError(f"{name}={bits!r}: {kind} is binary, it takes no bit-width; pass {name}=1 "
                             "or leave it out")


def check_input(x, weight: Tensor) -> Tensor:
    """A block's input: a float32/float16/bfloat16 tensor (the quantizers' dtypes) on a real device."""
    if isinstance(x, Tensor) and (x.is_meta or weight.is_meta):
        raise NotImplementedError("expcuda blocks do not run on the meta device: the quantizers compute "
                                  "data-dependent scales (e.g. max|tanh(w)|); use a CPU or GPU tensor and module")
    return _checks.float_tensor("input", x)


def _check_pool(pool):
    if pool is not None and not callable(pool):
        raise ValueError(f"pool must be None or a module such as nn.MaxPool2d(2), got {pool!r}")
    return pool


class LowPrecisionConv2d(nn.Module):
    """The plain low-precision block: conv with ``Qw(W1)``, optional pool, BN, ``phi``, ``Qa``.

    ``activation=False`` ends the block at its BatchNorm (a conv whose output
    meets a residual sum before any activation, as in a ResNet BasicBlock).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, *, w_quant: str = "dorefa", w_bits: int = 2,
                 a_quant: str = "dorefa", a_bits: int = 2, pool: Optional[nn.Module] = None,
                 activation: bool = True, w_eta: Optional[float] = None,
                 w_granularity: str = "pixel", bn_eps: float = 1e-5, bn_momentum: float = 0.1):
        super().__init__()
        _checks.positive_int("in_channels", in_channels)
        _checks.positive_int("out_channels", out_channels)
        _checks.positive_int("groups", groups)
        if in_channels % groups:
            raise ValueError(f"groups must divide in_channels: in_channels={in_channels}, groups={groups}")
        if out_channels % groups:
            raise ValueError(f"groups must divide out_channels: out_channels={out_channels}, groups={groups}")
        _checks.choice("a_quant", a_quant, A_QUANTS)
        _check_geometry(kernel_size, stride, padding, dilation)
        _check_fixed_bits(w_quant, w_bits, a_quant, a_bits)
        for name, value, ok in (("bn_eps", bn_eps, lambda v: v > 0),
                                ("bn_momentum", bn_momentum, lambda v: 0 <= v <= 1)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not ok(value):
                raise ValueError(f"{name} must be a finite number {'> 0' if name == 'bn_eps' else 'in [0, 1]'}, "
                                 f"got {value!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.lp_conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                                 groups, bias=False)
        self.pool = _check_pool(pool)
        self.lp_bn = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum)
        self.wq = WeightQuantizer(w_quant, w_bits, self.lp_conv.kernel_size, eta=w_eta,
                                  granularity=w_granularity)
        self.wq.init_from(self.lp_conv.weight)
        self.aq = ActivationQuantizer(a_quant, a_bits, activation)
        self.in_extra = 0
        self.lp_extra: Optional[nn.Parameter] = None
        self.__dict__["_producer"] = None
        self.fused: Optional[bool] = None

    # ------------------------------------------------------------------ concat inputs
    def widen_input(self, extra: int, producer: Optional[nn.Module] = None) -> None:
        """Accept ``extra`` more input channels: the FP channels of a concat block before this one.

        Their weights are a separate parameter, quantized on their own, so the
        original weights quantize exactly as in the collapsed network.  With
        ``producer`` linked, they are skipped while the producer's f is 0.
        """
        if self.lp_conv.groups != 1:
            raise ValueError("groups must be 1 in a block that takes a concat block's output")
        self.in_extra = _checks.positive_int("extra", extra)
        shape = (self.lp_conv.out_channels, extra, *self.lp_conv.kernel_size)
        self.lp_extra = nn.Parameter(_init_like_conv(shape, self.lp_conv.weight))
        self.__dict__["_producer"] = producer

    def _extra_live(self) -> bool:
        if self.in_extra == 0:
            return False
        p = self.__dict__["_producer"]
        return p is None or not p.f_is_zero

    def _split_input(self, x: Tensor) -> tuple[Tensor, bool]:
        check_input(x, self.lp_conv.weight)
        expected = self.in_channels + self.in_extra
        if x.dim() != 4 or x.shape[1] != expected:
            raise ValueError(f"input must have shape (N, {expected}, H, W) for this block, "
                             f"got {tuple(x.shape)}")
        if self.in_extra and not self._extra_live():
            return x[:, : self.in_channels].contiguous(), False
        return x, self.in_extra > 0

    def lp_weight(self, extra: bool) -> Tensor:
        w = self.wq(self.lp_conv.weight)
        if extra:
            w = torch.cat([w, self.wq(self.lp_extra)], dim=1)
        return w

    # ------------------------------------------------------------------ forward
    def conv(self, x: Tensor, w: Tensor, pool: bool = True) -> Tensor:
        """conv with this block's geometry (both branches share it), then the pool."""
        c = self.lp_conv
        z = F.conv2d(x, w.to(x.dtype), None, c.stride, c.padding, c.dilation, c.groups)
        return self.pool(z) if pool and self.pool is not None else z

    def lp_pre(self, x: Tensor, extra: bool) -> Tensor:
        """BN(pool(conv(A, Qw(W1)))): the LP branch up to its nonlinearity."""
        return self.lp_bn(self.conv(x, self.lp_weight(extra)))

    def use_fused(self) -> bool:
        """Fused kernels unless ``fused=False``, the reference backend is forced or the activation's
        current form has no epilogue kernel (sign activations while not quantizing).  A BN synced
        across DDP ranks runs fused too, with statistics reduced across them (``synced_epilogue``)."""
        if self.fused is False or self.aq.epilogue_args() is None:
            return False
        return backends.forced_backend() != "reference"

    def lp_forward(self, x: Tensor, extra: bool) -> Tensor:
        """The LP branch alone: fused epilogue in training, the reference composition in eval."""
        if self.training and self.use_fused():
            from expcuda.nn import fused
            return fused.lp_epilogue(self, self.conv(x, self.lp_weight(extra)))
        return self.aq(self.lp_pre(x, extra))

    def forward(self, x: Tensor) -> Tensor:
        x, extra = self._split_input(x)
        return self.lp_forward(x, extra)

    def extra_repr(self) -> str:
        return f"in_extra={self.in_extra}" if self.in_extra else ""


def _init_like_conv(shape, like: Tensor) -> Tensor:
    w = torch.empty(shape, dtype=like.dtype, device=like.device)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    return w


class ExpandedConv2d(LowPrecisionConv2d):
    """EXP-Net's expanded block: an LP branch plus a full-precision branch scaled by ``f``.

    ``fold=True`` is the folded variant of scheme 1 with add/sub: the branches
    are combined before BatchNorm (one BN after the combine, ``psi`` the
    identity), so ``conv(A, Qw(W1)) +- f*conv(A, W2) = conv(A, Qw(W1) +- f*W2)``
    runs as one convolution; its reference is the two-convolution form.
    ``fused=False`` always runs the reference composition.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, *, w_quant: str = "dorefa", w_bits: int = 2,
                 a_quant: str = "dorefa", a_bits: int = 2, scheme: int = 2, combine: str = "add",
                 fp_ratio: float = 1.0, fp_activation: Optional[str] = None, expand: bool = True,
                 pool: Optional[nn.Module] = None, fold: bool = False, activation: bool = True,
                 w_eta: Optional[float] = None, w_granularity: str = "pixel",
                 fused: Optional[bool] = None, bn_eps: float = 1e-5, bn_momentum: float = 0.1):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         w_quant=w_quant, w_bits=w_bits, a_quant=a_quant, a_bits=a_bits, pool=pool,
                         activation=activation, w_eta=w_eta, w_granularity=w_granularity,
                         bn_eps=bn_eps, bn_momentum=bn_momentum)
        _checks.choice("scheme", scheme, SCHEMES)
        _checks.choice("combine", combine, COMBINES)
        _checks.choice("fp_activation", fp_activation, FP_ACTIVATIONS)
        if isinstance(fp_ratio, bool) or not isinstance(fp_ratio, (int, float)) or not fp_ratio > 0 \
                or not math.isfinite(fp_ratio):
            raise ValueError(f"fp_ratio must be a number > 0, got {fp_ratio!r}")
        if combine != "concat" and fp_ratio != 1.0:
            raise ValueError(f"fp_ratio must be 1.0 with combine={combine!r} (only concat lets the "
                             f"FP branch be narrower or wider), got {fp_ratio}")
        if fold and not (scheme == 1 and combine in ("add", "sub") and fp_activation in (None, "none")):
            raise ValueError("fold=True needs scheme=1, combine 'add' or 'sub' and no fp_activation "
                             f"(got scheme={scheme}, combine={combine!r}, fp_activation={fp_activation!r})")
        self.scheme, self.combine, self.fp_ratio, self.fold = scheme, combine, float(fp_ratio), fold
        self.fp_activation = "identity" if fp_activation in (None, "none") else fp_activation
        self.expanded, self.fused = bool(expand), fused
        self.fp_channels = math.ceil(out_channels * fp_ratio) if combine == "concat" else out_channels
        if self.fp_channels % groups:
            raise ValueError(f"groups must divide the FP branch's ceil(out_channels * fp_ratio) = "
                             f"{self.fp_channels} channels, got groups={groups}")
        self.register_buffer("f", torch.ones(()))
        self._f_zero = False
        self.fp_conv = self.fp_bn = None
        self.fp_extra: Optional[nn.Parameter] = None
        if self.expanded:
            c = self.lp_conv
            self.fp_conv = nn.Conv2d(in_channels, self.fp_channels, c.kernel_size, c.stride, c.padding,
                                     c.dilation, groups, bias=False)
            if not fold:  # the folded form has one BN, after the combine
                self.fp_bn = nn.BatchNorm2d(self.fp_channels, eps=bn_eps, momentum=bn_momentum)

    # ------------------------------------------------------------------ f
    @property
    def f_is_zero(self) -> bool:
        return self._f_zero

    @property
    def block_out_channels(self) -> int:
        """Channels this block outputs: ``out_channels``, plus the FP ones with concat."""
        return self.out_channels + (self.fp_channels if self.expanded and self.combine == "concat" else 0)

    def set_f(self, value: float) -> None:
        """Set the decay factor (a number in [0, 1]); at exactly 0 the FP branch is not computed."""
        if isinstance(value, Tensor) and value.numel() == 1 and value.dtype.is_floating_point:
            v = float(value)
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            v = float(value)
        else:
            raise TypeError(f"f must be a number in [0, 1], got {value!r}")
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"f must be in [0, 1], got {value!r}")
        self.f.fill_(v)
        self._f_zero = v == 0.0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        value = float(self.f)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"f must be in [0, 1], got {value} in the state_dict")
        self._f_zero = value == 0.0

    # ------------------------------------------------------------------ concat inputs
    def widen_input(self, extra: int, producer: Optional[nn.Module] = None) -> None:
        super().widen_input(extra, producer)
        if self.fp_conv is not None:
            shape = (self.fp_channels, extra, *self.fp_conv.kernel_size)
            self.fp_extra = nn.Parameter(_init_like_conv(shape, self.fp_conv.weight))

    def fp_weight(self, extra: bool) -> Tensor:
        w = self.fp_conv.weight
        return torch.cat([w, self.fp_extra], dim=1) if extra else w

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        x, extra = self._split_input(x)
        if not self.expanded:
            return self.lp_forward(x, extra)
        if self._f_zero:
            return reference.lp_only(self, x, extra)
        if self.use_fused() and (self.training or self.fold):
            return reference_or_fused(self, x, extra)
        return reference.expanded(self, x, extra)

    def extra_repr(self) -> str:
        parts = [f"scheme={self.scheme}", f"combine={self.combine!r}"]
        if self.combine == "concat":
            parts.append(f"fp_channels={self.fp_channels}")
        if self.fold:
            parts.append("fold=True")
        if not self.expanded:
            parts = ["expand=False"]
        if self.in_extra:
            parts.append(f"in_extra={self.in_extra}")
        return ", ".join(parts)


def reference_or_fused(block: ExpandedConv2d, x: Tensor, extra: bool) -> Tensor:
    from expcuda.nn import fused
    return fused.forward(block, x, extra)
