"""The Triton backend: GPU kernels that also run on the CPU under TRITON_INTERPRET=1."""

import os

try:
    import triton  # noqa: F401
    _REASON = None
except ImportError as exc:
    _REASON = f"triton is not installed ({exc})"

if _REASON is None:
    from expcuda.quant.triton_kernels import *  # noqa: F401,F403  (the kernels)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable():
    if _REASON is not None:
        return _REASON
    import torch
    if not torch.cuda.is_available() and not interpreting():
        return "no CUDA GPU is visible, and TRITON_INTERPRET=1 is not set"
    return None


def refuses(device, dtype):
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return f"runs {device.type} tensors only under TRITON_INTERPRET=1" if device.type == "cpu" \
        else f"does not serve {device.type} tensors"
