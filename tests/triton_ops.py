"""Every Triton op of expcuda, run once on tiny inputs: each quantizer (float32 and bfloat16) and
the epilogue in a spread of its configurations.  Shared by the tests that watch what the launches
do (tests/test_triton_ptx.py records them, tests/test_gpu_defects.py forbids host syncs)."""

from __future__ import annotations

import torch


def run_quantizers(T, device) -> None:
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(40, generator=gen).to(dtype).to(device)
        w = torch.randn(2, 3, 3, 2, generator=gen).to(dtype).to(device)
        g = torch.randn(w.shape, generator=gen).to(dtype).to(device)
        scales = torch.rand(3, generator=gen).to(device)
        step = torch.full((), 0.3, device=device)
        y, mask = T.dorefa_activation_fwd(x, 2)
        T.mask_bwd(y, mask)
        T.sign_activation_fwd(x)
        for bits in (1, 2):
            T.dorefa_weight_fwd(w, bits)
            T.dorefa_weight_bwd(g, w, bits)
        T.xnor_weight_fwd(w)
        T.xnor_weight_bwd(g, w)
        T.syq_weight_fwd(w, scales, 0.05, "row")
        T.syq_weight_bwd(g, w, scales, 0.05, "row")
        T.lsq_fwd(x, step, 2, True)
        T.lsq_bwd(x, x, step, 2, True)


# (c_lp, eps, scheme, combine, a_quant, a_bits, phi, psi, channels of z, channels_last)
EPILOGUES = [
    (3, 1e-5, 2, "add", "dorefa", 2, "clip", "relu", 6, False),
    (4, 1e-5, 1, "concat", "lsq", 2, "relu", "identity", 6, True),
    (3, 1e-5, 1, "sub", "sign", 1, "identity", "clip", 6, False),
    (3, 1e-5, 2, "sub", "none", 32, "relu", "relu", 6, True),
    (4, 1e-5, 1, "add", "dorefa", 32, "clip", "clip", 4, False),
    (4, 1e-5, 2, "add", "lsq", 3, "relu", "relu", 4, False),
]


def run_epilogue(E, device) -> None:
    gen = torch.Generator().manual_seed(1)
    for *args, channels, cl in EPILOGUES:
        fmt = torch.channels_last if cl else torch.contiguous_format
        z = torch.randn(2, channels, 3, 2, generator=gen).to(device).to(memory_format=fmt)
        w = (torch.rand(channels, generator=gen) + 0.5).to(device)
        b = torch.randn(channels, generator=gen).to(device)
        f = torch.full((), 0.4, device=device)
        step = torch.full((), 0.3, device=device) if args[4] == "lsq" else None
        grad = torch.randn(z.shape[0], channels if args[3] == "concat" or channels == args[0]
                           else args[0], *z.shape[2:], generator=gen)
        grad = grad.to(device).to(memory_format=fmt)
        out, mean, var = E.forward(z, w, b, f, step, *args)
        E.backward(grad, z, w, b, f, step, mean, var, *args)
