"""The CUDA packed convolution (csrc/cuda/packed_cuda.cu) against the reference, bit for bit."""

from __future__ import annotations

import pytest
import torch

import expcuda
from expcuda import _ext
from expcuda.deploy import pack_planes, packed_conv2d, packed_conv2d_reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not _ext.has_kernel("packed_conv2d", "CUDA"),
                       reason="expcuda._C was built without csrc/cuda/packed_cuda.cu"),
]

CASES = [  # (a_bits, w_bits, channels, kernel, stride, padding, n, h, w, out)
    (1, 1, 64, 3, 1, 1, 2, 9, 7, 33), (1, 1, 7, 3, 2, 1, 1, 8, 8, 5), (2, 2, 65, 3, 1, 0, 3, 6, 5, 16),
    (4, 4, 130, 1, 1, 0, 1, 5, 5, 9), (2, 4, 32, 5, 2, 2, 2, 11, 9, 8), (8, 8, 3, 3, 1, 2, 1, 4, 6, 4),
    (4, 1, 96, 3, 1, 1, 1, 7, 7, 64),
]


@pytest.mark.parametrize("a_bits, w_bits, c, k, stride, padding, n, h, w, o", CASES)
def test_cuda_equals_the_reference(a_bits, w_bits, c, k, stride, padding, n, h, w, o):
    gen = torch.Generator().manual_seed(a_bits * 100 + c)
    x = torch.randint(0, 1 << a_bits, (n, h, w, c), generator=gen, dtype=torch.uint8)
    q = torch.randint(0, 1 << w_bits, (o, k, k, c), generator=gen, dtype=torch.uint8)
    planes = pack_planes(q, w_bits)
    want = packed_conv2d_reference(x, planes, c, stride, padding)
    with expcuda.use_backend("cuda"):
        got = packed_conv2d(x.cuda(), planes.cuda(), c, a_bits, w_bits, stride, padding)
    for g, r in zip(got, want):
        assert g.dtype == torch.int32 and g.is_cuda
        torch.testing.assert_close(g.cpu(), r, atol=0, rtol=0)


def test_codes_above_a_bits_are_refused():
    x = torch.full((1, 3, 3, 8), 4, dtype=torch.uint8, device="cuda")
    planes = pack_planes(torch.zeros(2, 1, 1, 8, dtype=torch.uint8), 1).cuda()
    with expcuda.use_backend("cuda"), pytest.raises(ValueError, match="x_codes must be < 2"):
        packed_conv2d(x, planes, 8, 2, 1, 1, 0)
