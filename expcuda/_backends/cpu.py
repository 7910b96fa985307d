"""The C++ CPU backend (``csrc/cpu``): vectorized, multithreaded with at::parallel_for."""

import torch

from expcuda import _ext
from expcuda._backends import compiled, kernel_attributes, per_tensor


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


if unavailable() is None:
    from expcuda import quant
    compiled.register("cpu", "CPU", quant.KERNELS, per_tensor(refuses))
    compiled.register("cpu", "CPU", compiled.EPILOGUE_KERNELS,
                      compiled.epilogue_refuses(refuses, "CPU", "csrc/cpu/block_cpu.cpp", "C++"),
                      layouts=(torch.contiguous_format, torch.channels_last))
    from expcuda.deploy import ops as deploy_ops
    compiled.register("cpu", "CPU", (deploy_ops.PACKED_CONV2D,), per_tensor(refuses))


__getattr__ = kernel_attributes("cpu")
