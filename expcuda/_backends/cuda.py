"""The CUDA backend (``csrc/cuda``), built when torch has CUDA and nvcc is found."""

import torch

from expcuda import _ext
from expcuda._backends.compiled import *  # noqa: F401,F403  (the kernels; used only when built)


def unavailable():
    if _ext.REASON is not None:
        return _ext.REASON
    if not _ext.has_kernel("mask_bwd", "CUDA"):
        return ("expcuda._C was built without CUDA kernels (torch without CUDA, no nvcc, "
                "or EXPCUDA_NO_CUDA=1 at build time)")
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    return None


def refuses(device, dtype):
    if device.type != "cuda":
        return f"serves CUDA tensors only, got a {device.type} tensor"
    return None
