"""The epilogue in its passes (expcuda.nn.synced_epilogue) against the one-call op.

Given the local op's own statistics and sums, the split kernels must reproduce it bit for
bit: the synced path differs only in what it is given (the sums of every rank).  Two gloo
ranks against one process: tests/test_train_ddp.py.
"""

from __future__ import annotations

import pytest
import torch

from expcuda import registry
from expcuda.nn import epilogue, synced_epilogue
from tests.test_block_support import kernel_params

# (c_lp, eps, scheme, combine, a_quant, a_bits, phi, psi) and the stacked channels
CASES = [
    ((6, 1e-5, 2, "add", "dorefa", 2, "clip", "identity"), 12),  # the fast kernel
    ((6, 1e-5, 2, "sub", "none", 2, "relu", "relu"), 12),
    ((6, 1e-5, 1, "add", "dorefa", 2, "clip", "relu"), 12),  # the general rows
    ((6, 1e-5, 2, "concat", "lsq", 3, "relu", "clip"), 10),
    ((6, 1e-5, 1, "concat", "lsq", 2, "relu", "identity"), 9),
    ((7, 1e-5, 2, "add", "sign", 1, "identity", "identity"), 7),  # LP only
]


def split_kernels(name):
    return synced_epilogue.Passes(epilogue.KERNELS[name])


def local_kernels(name):
    backend = epilogue.KERNELS[name]
    return (registry.kernel("block_epilogue_fwd", backend).fn,
            registry.kernel("block_epilogue_bwd", backend).fn)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[0][2:5])))
@pytest.mark.parametrize("kernel", kernel_params("torch", "cpp"))
def test_split_passes_equal_one_call(kernel, case, channels_last):
    args, c_tot = case
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, c_tot, 7, 9, generator=g) * 1.5 + 0.5
    if channels_last:
        z = z.to(memory_format=torch.channels_last)
    w, b = torch.rand(c_tot, generator=g) + 0.5, torch.randn(c_tot, generator=g) * 0.3
    f = torch.tensor(0.6)
    step = torch.tensor(0.3) if args[4] == "lsq" else None
    fwd, bwd = local_kernels(kernel)
    split = split_kernels(kernel)
    out, mean, var = fwd(z, w, b, f, step, *args)
    assert torch.equal(split.fwd_given(z, w, b, f, step, mean, var, *args), out)
    s_mean, s_var = split.stats(z)
    torch.testing.assert_close(s_mean, mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s_var, var, rtol=1e-5, atol=1e-6)

    grad = torch.randn(out.shape, generator=g).contiguous(memory_format=epilogue.layout(out))
    dz, dw, db, ds = bwd(grad, z, w, b, f, step, mean, var, *args)
    sum_g, sum_gx, ds2 = split.bwd_sums(grad, z, w, b, f, step, mean, var, *args)
    assert sum_g.dtype == sum_gx.dtype == torch.float64
    assert torch.equal(sum_gx.float(), dw) and torch.equal(sum_g.float(), db)
    assert torch.equal(ds2, ds)
    count = z.numel() // c_tot
    got = split.bwd_given(grad, z, w, b, f, step, mean, var, sum_g, sum_gx, count, *args)
    assert torch.equal(got, dz)
    # the sums it is given are what it uses: doubling them over twice the count moves nothing
    # (a power of two), scaling dy's sum alone does
    assert torch.equal(split.bwd_given(grad, z, w, b, f, step, mean, var, 2 * sum_g, 2 * sum_gx,
                                       2 * count, *args), dz)
    assert not torch.equal(split.bwd_given(grad, z, w, b, f, step, mean, var, sum_g + 1, sum_gx,
                                           count, *args), dz)


def test_unsynced_batchnorm_has_no_group():
    bn = torch.nn.BatchNorm2d(3).train()
    assert synced_epilogue.reduce_group(bn) is None
