"""Corners of the Triton kernels that the backend-parametrized tests do not reach.

Bit for bit against the reference (signed zeros included): round-half-even
beyond 2**22, bfloat16 rounding ties, tensors spanning several programs (the
partial sums and the packed mask across blocks), NaN/Inf in the reductions.
Runs where the triton backend can (a GPU, or TRITON_INTERPRET=1 on CPU).
"""

from __future__ import annotations

import pytest
import torch

from expcuda import backends
from expcuda.quant import reference as R

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_REASON = backends.why_not("triton", DEVICE, torch.float32)
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"triton backend: {_REASON}")

if _REASON is None:
    from expcuda._backends import triton_quant as T

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def bits_equal(actual, expected):
    """Same dtype, shape, strides, NaN positions, and every other value bit for bit."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.stride() == expected.stride()
    if not actual.is_floating_point():
        assert torch.equal(actual, expected)
        return
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan)
    as_int = {2: torch.int16, 4: torch.int32}[actual.element_size()]
    assert torch.equal(actual[~nan].view(as_int), expected[~nan].view(as_int))


def same(got, want):
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want):
        bits_equal(g, w)


def randn(shape, dtype, seed=0, scale=1.5):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype).to(DEVICE)


def with_specials(x):
    """x with NaN, +-Inf and signed zeros scattered through its first elements."""
    x = x.clone()
    flat = x.view(-1)
    vals = [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 0.5, -0.5, 1.0, -1.0]
    for i, v in enumerate(vals[: flat.numel()]):
        flat[(i * 7) % flat.numel()] = v
    return x


def test_lsq_rounds_half_even_far_from_zero():
    # fractions between 2**22 and 2**24, and ranges wide enough not to clip them
    x = torch.tensor([4194304.5, 4194305.5, -4194304.5, 5000000.25, 8388607.5, -8388607.5,
                      8388608.0, 16777215.0, 3e9, -3e9, 1e20, float("inf"), 0.49999997,
                      -0.49999997, 2.5, -2.5, -0.0, -0.3], device=DEVICE)
    step = torch.tensor(1.0, device=DEVICE)
    for bits, signed in [(24, False), (25, True), (32, False), (32, True)]:
        same(T.lsq_fwd(x, step, bits, signed), R.lsq_fwd(x, step, bits, signed))
        same(T.lsq_bwd(x.sign(), x, step, bits, signed), R.lsq_bwd(x.sign(), x, step, bits, signed))


@pytest.mark.parametrize("bits", (1, 2, 3, 8))
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_rounding_tie_of_the_levels(dtype, bits):
    n = 2**bits - 1
    x = (torch.arange(-2, 2 * n + 3, dtype=torch.float32) / (2 * n)).to(dtype).to(DEVICE)
    same(T.dorefa_activation_fwd(x, bits), R.dorefa_activation_fwd(x, bits))
    for signed in (False, True):
        h = (torch.arange(-300, 300, dtype=torch.float32) * 0.5).to(dtype).to(DEVICE)
        one = torch.tensor(1.0, dtype=dtype, device=DEVICE)
        same(T.lsq_fwd(h, one, bits, signed), R.lsq_fwd(h, one, bits, signed))


def test_bfloat16_results_round_to_nearest_even():
    # 1 + 2**-8 is halfway between two bfloat16 values; 3.39e38 rounds up to Inf
    w = torch.tensor([1.0, 1.0, 1.0, -1.0, 1.0], dtype=torch.bfloat16, device=DEVICE)
    for scale in (1.00390625, 1.01171875):
        s = torch.tensor(scale, device=DEVICE)
        for g in (torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), torch.full((5,), 3.3895e38)):
            g = g.to(torch.bfloat16).to(DEVICE)
            same(T.syq_weight_bwd(g, w, s, 0.0, "layer"), R.syq_weight_bwd(g, w, s, 0.0, "layer"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ((3001,), (64, 32, 3, 3), (5, 300, 1, 7)))
def test_many_programs(dtype, shape):
    x, g = randn(shape, dtype, 0), randn(shape, dtype, 1, 1.0)
    xs = with_specials(x)
    for bits in (2, 4):
        y, m = R.dorefa_activation_fwd(xs, bits)
        same(T.dorefa_activation_fwd(xs, bits), (y, m))
        same(T.mask_bwd(g, m), R.mask_bwd(g, m))
        same(T.dorefa_weight_fwd(x, bits), R.dorefa_weight_fwd(x, bits))
        same(T.dorefa_weight_bwd(g, x, bits), R.dorefa_weight_bwd(g, x, bits))
    same(T.dorefa_weight_fwd(x, 1), R.dorefa_weight_fwd(x, 1))
    same(T.xnor_weight_fwd(x), R.xnor_weight_fwd(x))
    same(T.xnor_weight_bwd(g, x), R.xnor_weight_bwd(g, x))
    same(T.xnor_weight_bwd(g, xs), R.xnor_weight_bwd(g, xs))
    step = torch.tensor([0.05], dtype=torch.bfloat16, device=DEVICE)
    same(T.lsq_bwd(g, xs, step, 3, True), R.lsq_bwd(g, xs, step, 3, True))
    if len(shape) == 4:
        for gran, ss in (("layer", ()), ("row", shape[2:3]), ("pixel", shape[2:])):
            sc = (torch.rand(ss) + 0.5).to(dtype).to(DEVICE)
            for eta in (0.0, 0.05):
                same(T.syq_weight_fwd(x, sc, eta, gran), R.syq_weight_fwd(x, sc, eta, gran))
                same(T.syq_weight_bwd(g, x, sc, eta, gran), R.syq_weight_bwd(g, x, sc, eta, gran))


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_reductions_with_nonfinite_values(dtype):
    w = with_specials(randn((4, 3, 3, 3), dtype))
    g = randn((4, 3, 3, 3), dtype, 1, 1.0)
    for bits in (1, 2, 4):
        same(T.dorefa_weight_fwd(w, bits), R.dorefa_weight_fwd(w, bits))
        same(T.dorefa_weight_bwd(g, w, bits), R.dorefa_weight_bwd(g, w, bits))
    sc = torch.rand(3, 3).to(dtype).to(DEVICE)
    same(T.syq_weight_bwd(g, w, sc, 0.05, "pixel"), R.syq_weight_bwd(g, w, sc, 0.05, "pixel"))


def test_dorefa_weight_ties_at_the_max():
    # several elements attain max|tanh(w)|: the argmax gradient is shared among them
    w = torch.tensor([3.0, -3.0, 1.0, 3.0, 0.0, -0.0, 2.0, -3.0, 0.1], device=DEVICE)
    g = randn((9,), torch.float32, 2)
    for bits in (2, 3, 8):
        same(T.dorefa_weight_fwd(w, bits), R.dorefa_weight_fwd(w, bits))
        same(T.dorefa_weight_bwd(g, w, bits), R.dorefa_weight_bwd(g, w, bits))


def test_lsq_degenerate_steps():
    x, g = with_specials(randn((37,), torch.float32)), randn((37,), torch.float32, 1)
    for s in (0.0, -0.3):
        step = torch.tensor(s, device=DEVICE)
        for bits, signed in ((1, True), (1, False), (3, True)):
            same(T.lsq_fwd(x, step, bits, signed), R.lsq_fwd(x, step, bits, signed))
            same(T.lsq_bwd(g, x, step, bits, signed), R.lsq_bwd(g, x, step, bits, signed))


def test_syq_rejects_scales_that_do_not_fit():
    w = randn((4, 3, 3, 3), torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        T.syq_weight_fwd(w, torch.ones(2, device=DEVICE), 0.05, "row")
