"""The compiled epilogue behind the epilogue kernel interface: ``torch.ops.expcuda_C``.

The dispatcher runs the C++ CPU kernel (``csrc/cpu/block_cpu.cpp``) on CPU tensors and
the CUDA kernel (``csrc/cuda/block_cuda.cu``) on CUDA tensors.  The CPU kernel serves
float32, the CUDA kernel float32, float16 and bfloat16; other dtypes (and CUDA tensors
when the extension was built without CUDA) go to the PyTorch kernels.
"""

from __future__ import annotations

import functools

import torch

from expcuda import _ext
from expcuda.nn import epilogue

_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _has_cuda_kernel() -> bool:
    try:
        return _ext.has_kernel("block_epilogue_fwd", "CUDA")
    except RuntimeError:  # an older build: the schema is not registered at all
        return False


def _compiled(z) -> bool:
    """Whether torch.ops.expcuda_C serves z's device and dtype (an empty batch stays in PyTorch)."""
    if z.numel() == 0:
        return False
    if z.is_cuda:
        return z.dtype in _CUDA_DTYPES and _has_cuda_kernel()
    return z.dtype == torch.float32


def _codes(combine, a_quant, phi, psi):
    return (epilogue.COMBINES[combine], epilogue.A_QUANT_CODES[a_quant], epilogue.PHI_CODES[phi],
            epilogue.PHI_CODES[psi])


def forward(z, weight, bias, f, step, c_lp, eps, scheme, combine, a_quant, a_bits, phi, psi):
    if not _compiled(z):
        return epilogue.epilogue_fwd_torch(z, weight, bias, f, step, c_lp, eps, scheme, combine,
                                           a_quant, a_bits, phi, psi)
    cb, aq, ph, ps = _codes(combine, a_quant, phi, psi)
    return torch.ops.expcuda_C.block_epilogue_fwd(z, weight, bias, f, step, c_lp, eps, scheme, cb,
                                                  aq, a_bits, ph, ps)


def backward(grad, z, weight, bias, f, step, mean, var, c_lp, eps, scheme, combine, a_quant, a_bits,
             phi, psi):
    if not _compiled(z):
        return epilogue.epilogue_bwd_torch(grad, z, weight, bias, f, step, mean, var, c_lp, eps,
                                           scheme, combine, a_quant, a_bits, phi, psi)
    cb, aq, ph, ps = _codes(combine, a_quant, phi, psi)
    return torch.ops.expcuda_C.block_epilogue_bwd(grad, z, weight, bias, f, step, mean, var, c_lp,
                                                  eps, scheme, cb, aq, a_bits, ph, ps)
