"""Deployment of a collapsed low-precision model: bit-packed weights and integer convolution.

``reference`` holds the definition of correct for the packed convolution; ``packed_conv2d``
is the one entry point the deployed model calls: the compiled kernels of
``expcuda.deploy.kernels`` when that module is importable, else the reference.
"""

from __future__ import annotations

from .reference import pack_planes, packed_conv2d_reference, unpack_planes

__all__ = ["pack_planes", "unpack_planes", "packed_conv2d_reference", "packed_conv2d"]


def packed_conv2d(x_codes, w_planes, channels, a_bits, w_bits, stride, padding):
    """``(S, T)`` of :func:`packed_conv2d_reference`, by the fastest available implementation."""
    try:
        from . import kernels
    except ImportError:
        kernels = None
    if kernels is not None and hasattr(kernels, "packed_conv2d"):
        return kernels.packed_conv2d(x_codes, w_planes, channels, a_bits, w_bits, stride, padding)
    return packed_conv2d_reference(x_codes, w_planes, channels, stride, padding)
