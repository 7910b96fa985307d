"""Kernels of ``expcuda._C`` (C++ on CPU tensors, CUDA on GPU tensors), as backend functions.

The schemas live in ``csrc/ops.cpp``; the CPU and CUDA implementations are
registered under the same names, and torch's dispatcher picks by device.
"""

import torch

GRANULARITY_CODE = {"layer": 0, "row": 1, "pixel": 2}


def _ops():
    return torch.ops.expcuda_C


def dorefa_activation_fwd(x, bits):
    return _ops().dorefa_activation_fwd(x, bits)


def mask_bwd(grad, mask):
    return _ops().mask_bwd(grad, mask)


def sign_activation_fwd(x):
    return _ops().sign_activation_fwd(x)


def dorefa_weight_fwd(w, bits):
    return _ops().dorefa_weight_fwd(w, bits)


def dorefa_weight_bwd(grad, w, bits):
    return _ops().dorefa_weight_bwd(grad, w, bits)


def xnor_weight_fwd(w):
    return _ops().xnor_weight_fwd(w)


def xnor_weight_bwd(grad, w):
    return _ops().xnor_weight_bwd(grad, w)


def syq_weight_fwd(w, scales, eta, granularity):
    return _ops().syq_weight_fwd(w, scales, eta, GRANULARITY_CODE[granularity])


def syq_weight_bwd(grad, w, scales, eta, granularity):
    return _ops().syq_weight_bwd(grad, w, scales, eta, GRANULARITY_CODE[granularity])


def lsq_fwd(x, step, bits, signed):
    return _ops().lsq_fwd(x, step, bits, signed)


def lsq_bwd(grad, x, step, bits, signed):
    return _ops().lsq_bwd(grad, x, step, bits, signed)
