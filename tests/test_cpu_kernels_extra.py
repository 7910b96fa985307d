"""The C++ CPU kernels against the reference where tests/test_quant.py does not reach.

Pinned here: tensors spanning several parallel tasks (the kernels split work into 32768-element
chunks, masks on byte boundaries) with sizes that are not multiples of 8, the sign of zero
(torch.equal ignores it, these tests do not), the bits=32 and recompute paths, gradients whose
layout differs from the input's, and large-weight reductions.
"""

from __future__ import annotations

import pytest
import torch

from expcuda._backends import reference as ref
from expcuda.backends import why_not

pytestmark = pytest.mark.skipif(why_not("cpu", torch.device("cpu"), torch.float32) is not None,
                                reason="the C++ CPU backend is not built")

BIG = 3 * 32768 + 13  # four parallel tasks, the last one ragged and not a multiple of 8


def cpu():
    from expcuda._backends import cpu as kernels
    return kernels


def same(actual, expected):
    """Equal values, NaN where NaN, and the same sign on every zero."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.stride() == expected.stride()
    torch.testing.assert_close(actual, expected, atol=0, rtol=0, equal_nan=True)
    zeros = (expected == 0)
    assert torch.equal(torch.signbit(actual[zeros]), torch.signbit(expected[zeros]))


def values(n, dtype, seed=0, lo=-1.5, hi=1.5):
    """Random values with exact boundaries, ties, signed zeros, NaN and +-Inf sprinkled in."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=gen) * (hi - lo) + lo
    specials = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, 1 / 6, 2.5 / 3, float("nan"), float("inf"),
                             -float("inf"), -1e-30, 1e-30])
    where = torch.randint(0, n, (64,), generator=gen)
    x[where] = specials[torch.arange(64) % len(specials)]
    return x.to(dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("bits", (1, 2, 4, 8, 32))
def test_dorefa_activation_multichunk(dtype, bits):
    x, g = values(BIG, dtype), values(BIG, dtype, seed=1)
    y, mask = cpu().dorefa_activation_fwd(x, bits)
    ry, rmask = ref.dorefa_activation_fwd(x, bits)
    same(y, ry)
    assert torch.equal(mask, rmask)
    same(cpu().mask_bwd(g, mask), ref.mask_bwd(g, rmask))
    same(torch.ops.expcuda_C.dorefa_activation_bwd_recompute(g, x, bits), ref.mask_bwd(g, rmask))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_sign_activation_multichunk(dtype):
    x = values(BIG, dtype)
    y, mask = cpu().sign_activation_fwd(x)
    ry, rmask = ref.sign_activation_fwd(x)
    same(y, ry)
    assert torch.equal(mask, rmask)


@pytest.mark.parametrize("n", (1, 7, 8, 9, 32768, 32769))
def test_mask_padding_bits_are_zero(n):
    """Bits past numel are 0, whatever the values and on the bits=32 path too."""
    x = torch.full((n,), 0.5)
    for bits in (2, 32):
        _, mask = cpu().dorefa_activation_fwd(x, bits)
        assert torch.equal(mask, ref.pack_mask(torch.ones(n, dtype=torch.bool)))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("bits,signed", ((2, False), (4, False), (4, True), (8, True)))
def test_lsq_multichunk(dtype, bits, signed):
    x, g = values(BIG, dtype, lo=-3, hi=3), values(BIG, dtype, seed=1)
    step = torch.tensor(0.37, dtype=dtype)
    same(cpu().lsq_fwd(x, step, bits, signed), ref.lsq_fwd(x, step, bits, signed))
    for got, want in zip(cpu().lsq_bwd(g, x, step, bits, signed), ref.lsq_bwd(g, x, step, bits, signed)):
        same(got, want)


def test_lsq_grad_in_another_layout():
    """A contiguous grad for a channels_last x is walked in x's storage order."""
    x = values(4 * 6 * 9 * 9, torch.float32).view(4, 6, 9, 9).to(memory_format=torch.channels_last)
    g = values(x.numel(), torch.float32, seed=2).view(x.shape)
    step = torch.tensor(0.2)
    dx, ds = cpu().lsq_bwd(g, x, step, 3, True)
    rdx, rds = ref.lsq_bwd(g.contiguous(memory_format=torch.channels_last), x, step, 3, True)
    same(dx, rdx)
    same(ds, rds)


@pytest.mark.parametrize("shape", ((512, 128, 5, 5), (300, 257)))
@pytest.mark.parametrize("bits", (1, 2, 4))
def test_dorefa_weight_large(shape, bits):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    g = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    same(cpu().dorefa_weight_fwd(w, bits), ref.dorefa_weight_fwd(w, bits))
    same(cpu().dorefa_weight_bwd(g, w, bits), ref.dorefa_weight_bwd(g, w, bits))


def test_dorefa_weight_many_ties():
    """Saturated tanh: every element at max|t| shares the max's gradient."""
    w = torch.tensor([30.0, -30.0, 25.0, 0.1, -0.2, 40.0] * 7).view(7, 6)
    g = torch.linspace(-1, 1, 42).view(7, 6)
    same(cpu().dorefa_weight_bwd(g, w, 2), ref.dorefa_weight_bwd(g, w, 2))


@pytest.mark.parametrize("granularity,scale_shape", (("layer", ()), ("row", (5,)), ("pixel", (5, 5))))
@pytest.mark.parametrize("eta", (0.0, 0.05))
def test_syq_weight_large(granularity, scale_shape, eta):
    w = torch.randn(512, 128, 5, 5, generator=torch.Generator().manual_seed(5))
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(6))
    scales = torch.rand(scale_shape, generator=torch.Generator().manual_seed(7)) + 0.5
    same(cpu().syq_weight_fwd(w, scales, eta, granularity), ref.syq_weight_fwd(w, scales, eta, granularity))
    for got, want in zip(cpu().syq_weight_bwd(g, w, scales, eta, granularity),
                         ref.syq_weight_bwd(g, w, scales, eta, granularity)):
        same(got, want)


def test_xnor_weight_large():
    w = torch.randn(512, 128, 5, 5, generator=torch.Generator().manual_seed(8)) * 0.8
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(9))
    same(cpu().xnor_weight_fwd(w), ref.xnor_weight_fwd(w))
    same(cpu().xnor_weight_bwd(g, w), ref.xnor_weight_bwd(g, w))


def test_thread_count_does_not_change_bits():
    """Chunked sums are added in chunk order: one thread and two give the same step gradient."""
    gen = torch.Generator().manual_seed(10)
    x, g = torch.randn(BIG, generator=gen) * 2, torch.randn(BIG, generator=gen)
    step = torch.tensor(0.37)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu().lsq_bwd(g, x, step, 4, False)[1]
        torch.set_num_threads(2)
        two = cpu().lsq_bwd(g, x, step, 4, False)[1]
    finally:
        torch.set_num_threads(before)
    assert torch.isfinite(one) and torch.equal(one, two)
