"""The C++ CPU backend (``csrc/cpu``): vectorized, multithreaded with at::parallel_for."""

from expcuda import _ext
from expcuda._backends.compiled import *  # noqa: F401,F403  (the kernels; used only when built)


def unavailable():
    if _ext.REASON is not None:
        return _ext.REASON
    if not _ext.has_kernel("mask_bwd", "CPU"):
        return "expcuda._C was built without its CPU kernels"
    return None


def refuses(device, dtype):
    if device.type != "cpu":
        return f"serves CPU tensors only, got a {device.type} tensor"
    return None
