"""The compiled extension ``expcuda._C``, if it was built, and why not otherwise."""

from __future__ import annotations

import functools

import torch

try:
    from expcuda import _C  # noqa: F401  (importing registers torch.ops.expcuda_C)
    REASON = None
except ImportError as exc:  # pure-Python install, or not built yet
    _C = None
    REASON = (f"expcuda._C is not built ({exc}); build it with "
              "`pip install -e . --no-build-isolation`")


@functools.cache  # asked on every fused block step; the answer is fixed once _C is loaded
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``expcuda_C::<op>`` was compiled for ``dispatch_key`` (CPU or CUDA)."""
    if _C is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"expcuda_C::{op}", dispatch_key)
    except RuntimeError:  # an older build: the schema is not registered at all
        return False
