"""Kernels of ``expcuda._C`` (C++ on CPU tensors, CUDA on GPU tensors), as backend functions.

The schemas live in ``csrc/ops.cpp`` and ``csrc/cpu/block_cpu.cpp``; the CPU and CUDA
implementations are registered under the same names, and torch's dispatcher picks by device.
The block epilogue's kernels take float32 z on the CPU (float16 and bfloat16 through a
float32 copy: the PyTorch kernels compute in float32 too, so the results agree) and float32,
float16 and bfloat16 on CUDA; an empty batch runs the PyTorch kernels.
"""

import torch

from expcuda.nn import epilogue


def _ops():
    return torch.ops.expcuda_C


def kernel(name: str):
    """The function serving op ``name``: a quantizer's own wrapper (``expcuda.quant.spec.compiled``)
    or one below where the Python arguments need converting (codes for strings, float32 copies),
    else ``torch.ops.expcuda_C.<name>`` itself."""
    from expcuda.quant import spec
    if name in spec.COMPILED:
        wrapper = spec.COMPILED[name]
        return lambda *args: wrapper(_ops(), *args)
    fn = globals().get(name)
    return fn if callable(fn) else getattr(_ops(), name)


def register(backend: str, dispatch_key: str, names, refuses, layouts=None) -> None:
    """Register every op in ``names`` that ``expcuda._C`` has a ``dispatch_key`` kernel for."""
    from expcuda import _ext, registry
    for name in names:
        if _ext.has_kernel(name, dispatch_key):
            registry.register(name, backend, kernel(name), refuses, layouts)


# --------------------------------------------------------------------------- the block epilogue

EPILOGUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPILOGUE_KERNELS = ("block_epilogue_fwd", "block_epilogue_bwd", "block_epilogue_stats",
                    "block_epilogue_fwd_given", "block_epilogue_bwd_sums", "block_epilogue_bwd_given")


def epilogue_refuses(refuses, dispatch_key: str, source: str, what: str):
    """The compiled epilogue's per-tensor predicate: the backend's device check, then whether
    ``expcuda._C`` was built with ``source``, then the dtypes it serves."""
    from expcuda import _ext

    def check(z):
        reason = refuses(z.device, z.dtype)
        if reason is None and not _ext.has_kernel("block_epilogue_fwd", dispatch_key):
            reason = f"expcuda._C was not built with {source}"
        if reason is None and z.dtype not in EPILOGUE_DTYPES:
            reason = f"the {what} epilogue serves {', '.join(map(str, EPILOGUE_DTYPES))}, got {z.dtype}"
        return reason
    return check


def _f32(t):
    """The C++ CPU kernel computes on float32 arrays: a float16/bfloat16 CPU tensor is widened."""
    return t if t.is_cuda else t.float()


def _codes(combine, a_quant, phi, psi):
    return (epilogue.COMBINES[combine], epilogue.A_QUANT_CODES[a_quant], epilogue.PHI_CODES[phi],
            epilogue.PHI_CODES[psi])


def block_epilogue_fwd(z, weight, bias, f, step, c_lp, eps, scheme, combine, a_quant, a_bits, phi, psi):
    if z.numel() == 0:
        return epilogue.epilogue_fwd_torch(z, weight, bias, f, step, c_lp, eps, scheme, combine,
                                           a_quant, a_bits, phi, psi)
    cb, aq, ph, ps = _codes(combine, a_quant, phi, psi)
    out, mean, var = _ops().block_epilogue_fwd(_f32(z), weight, bias, f, step, c_lp, eps, scheme, cb, aq,
                                               a_bits, ph, ps)
    return out.to(z.dtype), mean, var


def block_epilogue_bwd(grad, z, weight, bias, f, step, mean, var, c_lp, eps, scheme, combine, a_quant,
                       a_bits, phi, psi):
    if z.numel() == 0:
        return epilogue.epilogue_bwd_torch(grad, z, weight, bias, f, step, mean, var, c_lp, eps,
                                           scheme, combine, a_quant, a_bits, phi, psi)
    cb, aq, ph, ps = _codes(combine, a_quant, phi, psi)
    dz, dw, db, ds = _ops().block_epilogue_bwd(_f32(grad), _f32(z), weight, bias, f, step, mean, var,
                                               c_lp, eps, scheme, cb, aq, a_bits, ph, ps)
    return dz.to(z.dtype), dw, db, ds


# The epilogue split in its passes, for statistics reduced across DDP ranks in between
# (``expcuda.nn.synced_epilogue``); the C++ CPU kernel serves them, on non-empty z.

def block_epilogue_stats(z):
    return _ops().block_epilogue_stats(z.float())


def block_epilogue_fwd_given(z, weight, bias, f, step, mean, var, c_lp, eps, scheme, combine, a_quant,
                             a_bits, phi, psi):
    cb, aq, ph, ps = _codes(combine, a_quant, phi, psi)
    return _ops().block_epilogue_fwd_given(z.float(), weight, bias, f, step, mean, var, c_lp, eps, scheme,
                                           cb, aq, a_bits, ph, ps).to(z.dtype)


def block_epilogue_bwd_sums(grad, z, weight, bias, f, step, mean, var, c_lp, eps, scheme, combine,
                            a_quant, a_bits, phi, psi):
    cb, aq, ph, ps = _codes(combine, a_quant, phi, psi)
    return _ops().block_epilogue_bwd_sums(grad.float(), z.float(), weight, bias, f, step, mean, var, c_lp,
                                          eps, scheme, cb, aq, a_bits, ph, ps)


def block_epilogue_bwd_given(grad, z, weight, bias, f, step, mean, var, sum_g, sum_gx, count, c_lp, eps,
                             scheme, combine, a_quant, a_bits, phi, psi):
    cb, aq, ph, ps = _codes(combine, a_quant, phi, psi)
    dz = _ops().block_epilogue_bwd_given(grad.float(), z.float(), weight, bias, f, step, mean, var, sum_g,
                                         sum_gx, float(count), c_lp, eps, scheme, cb, aq, a_bits, ph, ps)
    return dz.to(z.dtype)
