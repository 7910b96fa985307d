"""The packed-conv reference: bit-plane layout round trip and S/T against a direct loop."""

import pytest
import torch

from expcuda.deploy.reference import pack_planes, packed_conv2d_reference, unpack_planes


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("channels", [1, 7, 8, 13, 70])
def test_pack_unpack_round_trip(bits, channels):
    g = torch.Generator().manual_seed(bits * 100 + channels)
    codes = torch.randint(0, 1 << bits, (3, 2, channels), generator=g).to(torch.uint8)
    planes = pack_planes(codes, bits)
    assert planes.shape == (3, 2, bits, (channels + 7) // 8) and planes.dtype == torch.uint8
    assert torch.equal(unpack_planes(planes, bits, channels), codes)


def test_pack_layout_and_zero_pad_bits():
    # channel 0 code 0b01, channel 9 code 0b10 (2-bit), 10 channels -> 2 bytes per plane
    codes = torch.zeros(10, dtype=torch.uint8)
    codes[0], codes[9] = 1, 2
    planes = pack_planes(codes, 2)
    assert planes.tolist() == [[1, 0], [0, 2]]
    full = pack_planes(torch.full((10,), 3, dtype=torch.uint8), 2)
    assert full.tolist() == [[255, 3], [255, 3]]  # bits of channels 10..15 stay 0


def test_pack_refuses_out_of_range_codes():
    with pytest.raises(ValueError, match="2\\*\\*bits"):
        pack_planes(torch.tensor([0, 4], dtype=torch.uint8), 2)
    with pytest.raises(TypeError, match="codes"):
        pack_planes(torch.tensor([0, 1]), 1)


def _direct(x, q, stride, padding):
    n, h, w, c = x.shape
    o, kh, kw, _ = q.shape
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    s = torch.zeros(n, ho, wo, o, dtype=torch.int64)
    t = torch.zeros(n, ho, wo, dtype=torch.int64)
    for b in range(n):
        for y in range(ho):
            for xx in range(wo):
                for i in range(kh):
                    for j in range(kw):
                        r, cc = y * stride - padding + i, xx * stride - padding + j
                        if 0 <= r < h and 0 <= cc < w:
                            p = x[b, r, cc].long()
                            t[b, y, xx] += p.sum()
                            s[b, y, xx] += (q[:, i, j].long() * p).sum(-1)
    return s, t


@pytest.mark.parametrize("a_bits,w_bits", [(1, 1), (2, 4), (4, 2), (8, 8)])
def test_conv_matches_direct_loop(a_bits, w_bits):
    g = torch.Generator().manual_seed(a_bits * 10 + w_bits)
    x = torch.randint(0, 1 << a_bits, (2, 5, 6, 11), generator=g).to(torch.uint8)
    q = torch.randint(0, 1 << w_bits, (3, 3, 3, 11), generator=g).to(torch.uint8)
    s, t = packed_conv2d_reference(x, pack_planes(q, w_bits), 11, stride=2, padding=1)
    s_ref, t_ref = _direct(x, q, 2, 1)
    assert s.dtype == torch.int32 and t.dtype == torch.int32
    assert torch.equal(s.long(), s_ref) and torch.equal(t.long(), t_ref)


def test_conv_errors_name_the_argument():
    x = torch.zeros(1, 4, 4, 3, dtype=torch.uint8)
    w = pack_planes(torch.zeros(2, 3, 3, 3, dtype=torch.uint8), 1)
    with pytest.raises(TypeError, match="x_codes"):
        packed_conv2d_reference(x.float(), w, 3, 1, 1)
    with pytest.raises(ValueError, match="channels"):
        packed_conv2d_reference(x, w, 4, 1, 1)
    with pytest.raises(ValueError, match="w_planes"):
        packed_conv2d_reference(x, w[0], 3, 1, 1)
    with pytest.raises(ValueError, match="stride"):
        packed_conv2d_reference(x, w, 3, 0, 1)


def test_packed_conv2d_dispatches_through_the_registry():
    import expcuda.deploy as deploy
    from expcuda import registry

    x = torch.randint(0, 2, (1, 4, 4, 5), dtype=torch.uint8)
    w = pack_planes(torch.randint(0, 2, (2, 3, 3, 5), dtype=torch.uint8), 1)
    ref = packed_conv2d_reference(x, w, 5, 1, 1)
    with registry.use_backend("reference"):
        s, t = deploy.packed_conv2d(x, w, 5, 1, 1, 1, 1)
    assert torch.equal(s, ref[0]) and torch.equal(t, ref[1])
    calls = []
    with registry.replaced("packed_conv2d", "reference", lambda *a: calls.append(a) or ref):
        with registry.use_backend("reference"):
            deploy.packed_conv2d(x, w, 5, 1, 1, 1, 1)
    assert calls and calls[0][2:] == (5, 1, 1, 1, 1)
