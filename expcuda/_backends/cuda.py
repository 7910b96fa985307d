"""The CUDA backend (``csrc/cuda``), built when torch has CUDA and nvcc is found."""

import torch

from expcuda import _ext
from expcuda._backends import compiled, kernel_attributes, per_tensor


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


if unavailable() is None:
    from expcuda import quant
    compiled.register("cuda", "CUDA", quant.KERNELS, per_tensor(refuses))
    # the local epilogue only (the split passes for synced BatchNorm are the C++ CPU kernel's);
    # it indexes NCHW-contiguous and channels_last z in place
    compiled.register("cuda", "CUDA", ("block_epilogue_fwd", "block_epilogue_bwd"),
                      compiled.epilogue_refuses(refuses, "CUDA", "csrc/cuda/block_cuda.cu", "CUDA"),
                      layouts=(torch.contiguous_format, torch.channels_last))
    from expcuda.deploy import ops as deploy_ops
    compiled.register("cuda", "CUDA", (deploy_ops.PACKED_CONV2D,), per_tensor(refuses))


__getattr__ = kernel_attributes("cuda")
