"""The C++ CPU epilogue (``csrc/cpu/block_cpu.cpp``) behind the epilogue kernel interface.

It serves float32; other dtypes go to the PyTorch kernels.
"""

from __future__ import annotations

import torch

from expcuda.nn import epilogue


def _codes(combine, a_quant, phi, psi):
    return (epilogue.COMBINES[combine], epilogue.A_QUANT_CODES[a_quant], epilogue.PHI_CODES[phi],
            epilogue.PHI_CODES[psi])


def forward(z, weight, bias, f, step, c_lp, eps, scheme, combine, a_quant, a_bits, phi, psi):
    if z.dtype != torch.float32:
        return epilogue.epilogue_fwd_torch(z, weight, bias, f, step, c_lp, eps, scheme, combine,
                                           a_quant, a_bits, phi, psi)
    cb, aq, ph, ps = _codes(combine, a_quant, phi, psi)
    return torch.ops.expcuda_C.block_epilogue_fwd(z, weight, bias, f, step, c_lp, eps, scheme, cb,
                                                  aq, a_bits, ph, ps)


def backward(grad, z, weight, bias, f, step, mean, var, c_lp, eps, scheme, combine, a_quant, a_bits,
             phi, psi):
    if z.dtype != torch.float32:
        return epilogue.epilogue_bwd_torch(grad, z, weight, bias, f, step, mean, var, c_lp, eps,
                                           scheme, combine, a_quant, a_bits, phi, psi)
    cb, aq, ph, ps = _codes(combine, a_quant, phi, psi)
    return torch.ops.expcuda_C.block_epilogue_bwd(grad, z, weight, bias, f, step, mean, var, c_lp,
                                                  eps, scheme, cb, aq, a_bits, ph, ps)
