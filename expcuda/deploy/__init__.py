"""Deployment of a collapsed low-precision model: bit-packed weights and integer convolution.

``reference`` holds the definition of correct for the packed convolution; ``packed_conv2d``
is the one entry point the deployed model calls: an op of :mod:`expcuda.registry`
(``ops.py``), served by the C++ CPU kernels on CPU tensors when the extension is built, else
by the reference.
"""

from __future__ import annotations

from .ops import packed_conv2d, packed_path
from .reference import pack_planes, packed_conv2d_reference, unpack_planes

__all__ = ["pack_planes", "unpack_planes", "packed_conv2d_reference", "packed_conv2d", "packed_path"]
