"""The compiled epilogue behind the epilogue kernel interface: ``torch.ops.expcuda_C``.

The dispatcher runs the C++ CPU kernel (``csrc/cpu/block_cpu.cpp``) on CPU tensors and
the CUDA kernel (``csrc/cuda/block_cuda.cu``) on CUDA tensors.  The CUDA kernel serves
float32, float16 and bfloat16; the CPU kernel float32, and float16 and bfloat16 through
a float32 copy of z (the PyTorch kernels compute in float32 too, so the results agree);
other dtypes (and CUDA tensors when the extension was built without CUDA) go to the
PyTorch kernels.
"""

from __future__ import annotations

import functools

import torch

from expcuda import _ext
from expcuda.nn import epilogue

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
        return z.dtype in _DTYPES and _has_cuda_kernel()
    return z.dtype in _DTYPES


def _cpu_f32(t):
    """The C++ CPU kernel computes on float32 arrays: a float16/bfloat16 CPU tensor is widened."""
    return t if t.is_cuda else t.float()


def _codes(combine, a_quant, phi, psi):
    return (epilogue.COMBINES[combine], epilogue.A_QUANT_CODES[a_quant], epilogue.PHI_CODES[phi],
            epilogue.PHI_CODES[psi])


def forward(z, weight, bias, f, step, c_lp, eps, scheme, combine, a_quant, a_bits, phi, psi):
    if not _compiled(z):
        return epilogue.epilogue_fwd_torch(z, weight, bias, f, step, c_lp, eps, scheme, combine,
                                           a_quant, a_bits, phi, psi)
    cb, aq, ph, ps = _codes(combine, a_quant, phi, psi)
    out, mean, var = torch.ops.expcuda_C.block_epilogue_fwd(_cpu_f32(z), weight, bias, f, step, c_lp,
                                                            eps, scheme, cb, aq, a_bits, ph, ps)
    return out.to(z.dtype), mean, var


def backward(grad, z, weight, bias, f, step, mean, var, c_lp, eps, scheme, combine, a_quant, a_bits,
             phi, psi):
    if not _compiled(z):
        return epilogue.epilogue_bwd_torch(grad, z, weight, bias, f, step, mean, var, c_lp, eps,
                                           scheme, combine, a_quant, a_bits, phi, psi)
    cb, aq, ph, ps = _codes(combine, a_quant, phi, psi)
    dz, dw, db, ds = torch.ops.expcuda_C.block_epilogue_bwd(_cpu_f32(grad), _cpu_f32(z), weight, bias,
                                                            f, step, mean, var, c_lp, eps, scheme, cb,
                                                            aq, a_bits, ph, ps)
    return dz.to(z.dtype), dw, db, ds


# The epilogue split in its passes, for statistics reduced across DDP ranks in between
# (``expcuda.nn.synced_epilogue``).  The C++ CPU kernel serves them; callers check
# ``_compiled(z) and not z.is_cuda`` first (the CUDA kernel has no split form).

def stats(z):
    return torch.ops.expcuda_C.block_epilogue_stats(z.float())


def fwd_given(z, weight, bias, f, step, mean, var, c_lp, eps, scheme, combine, a_quant, a_bits,
              phi, psi):
    cb, aq, ph, ps = _codes(combine, a_quant, phi, psi)
    return torch.ops.expcuda_C.block_epilogue_fwd_given(z.float(), weight, bias, f, step, mean, var,
                                                        c_lp, eps, scheme, cb, aq, a_bits, ph,
                                                        ps).to(z.dtype)


def bwd_sums(grad, z, weight, bias, f, step, mean, var, c_lp, eps, scheme, combine, a_quant, a_bits,
             phi, psi):
    cb, aq, ph, ps = _codes(combine, a_quant, phi, psi)
    return torch.ops.expcuda_C.block_epilogue_bwd_sums(grad.float(), z.float(), weight, bias, f, step,
                                                       mean, var, c_lp, eps, scheme, cb, aq, a_bits,
                                                       ph, ps)


def bwd_given(grad, z, weight, bias, f, step, mean, var, sum_g, sum_gx, count, c_lp, eps, scheme,
              combine, a_quant, a_bits, phi, psi):
    cb, aq, ph, ps = _codes(combine, a_quant, phi, psi)
    dz = torch.ops.expcuda_C.block_epilogue_bwd_given(grad.float(), z.float(), weight, bias, f, step,
                                                      mean, var, sum_g, sum_gx, float(count), c_lp,
                                                      eps, scheme, cb, aq, a_bits, ph, ps)
    return dz.to(z.dtype)
