"""The packed convolution as an op of :mod:`expcuda.registry`, so the dispatcher picks its kernel.

The reference backend serves it with :func:`reference_kernel` (the definition of correct), the
C++ CPU backend with ``expcuda_C::packed_conv2d`` (``csrc/cpu/packed_cpu.cpp``).  Every kernel
takes ``(x_codes, w_planes, channels, a_bits, w_bits, stride, padding)``; the first tensor
argument, ``x_codes``, is what the backends' predicates look at.
"""

from __future__ import annotations

import torch

from expcuda import _checks, registry

from .reference import packed_conv2d_reference

PACKED_CONV2D = registry.declare(
    "packed_conv2d",
    "packed integer conv: (x_codes NHWC uint8, w_planes, channels, a_bits, w_bits, stride, padding) "
    "-> (S, T)")


def check_bits(x_codes, w_planes, a_bits, w_bits) -> None:
    """The bit widths: ints in 1..8, w_planes holding w_bits planes, codes below 2**a_bits."""
    _checks.integer("a_bits", a_bits, 1, 8)
    _checks.integer("w_bits", w_bits, 1, 8)
    if w_planes.dim() == 5 and w_planes.shape[3] != w_bits:
        raise ValueError(f"w_planes dim 3 must be w_bits={w_bits}, got {w_planes.shape[3]}")
    if x_codes.dtype == torch.uint8 and x_codes.numel() and a_bits < 8:
        top = int(x_codes.max())
        if top >= 1 << a_bits:
            raise ValueError(f"x_codes must be < 2**a_bits = {1 << a_bits} for a_bits={a_bits}, "
                             f"got a code {top}")


def reference_kernel(x_codes, w_planes, channels, a_bits, w_bits, stride, padding):
    """The reference backend's kernel: the bit widths checked, then the reference itself."""
    check_bits(x_codes, w_planes, a_bits, w_bits)
    return packed_conv2d_reference(x_codes, w_planes, channels, stride, padding)


def packed_conv2d(x_codes, w_planes, channels, a_bits, w_bits, stride, padding):
    """``(S, T)`` of :func:`packed_conv2d_reference` by the kernel the dispatcher picks."""
    for name, t in (("x_codes", x_codes), ("w_planes", w_planes)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _checks.integer("channels", channels, 1)
    _checks.integer("a_bits", a_bits, 1, 8)
    _checks.integer("w_bits", w_bits, 1, 8)
    _checks.integer("stride", stride, 1)
    _checks.integer("padding", padding, 0)
    return registry.dispatch(PACKED_CONV2D, x_codes).fn(x_codes, w_planes, channels, a_bits, w_bits,
                                                        stride, padding)


def packed_path(a_bits: int, w_bits: int) -> tuple[str, str]:
    """``(isa, algo)`` the C++ kernel takes for these bit widths now (``EXPCUDA_PACKED_ISA`` and
    ``EXPCUDA_PACKED_ALGO`` included); an error when the extension lacks it."""
    from expcuda import _ext
    if not _ext.has_kernel("packed_conv2d", "CPU"):
        raise RuntimeError(_ext.REASON or "expcuda._C was built without csrc/cpu/packed_cpu.cpp")
    isa, algo = torch.ops.expcuda_C.packed_conv2d_path(_checks.integer("a_bits", a_bits, 1, 8),
                                                      _checks.integer("w_bits", w_bits, 1, 8)).split()
    return isa, algo
