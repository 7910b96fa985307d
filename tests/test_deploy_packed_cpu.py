"""The C++ packed convolution (csrc/cpu/packed_cpu.cpp) against the reference, bit for bit, on
every ISA path this CPU has (forced with EXPCUDA_PACKED_ISA / EXPCUDA_PACKED_ALGO), and its
errors on bad input."""

import pytest
import torch

from expcuda import _ext, registry
from expcuda.deploy import pack_planes, packed_conv2d, packed_conv2d_reference, packed_path

pytestmark = pytest.mark.skipif(not _ext.has_kernel("packed_conv2d", "CPU"),
                                reason="expcuda._C was built without csrc/cpu/packed_cpu.cpp")

ISAS = ("vpopcntdq", "avx512bw", "avx2", "scalar")
PATHS = [(isa, "bitserial") for isa in ISAS] + [(isa, "dot") for isa in ISAS[:2]]


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as fh:
            return set(fh.read().split("flags")[1].split("\n")[0].split())
    except (OSError, IndexError):
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")


def _cpu_has(isa: str) -> bool:
    need = {"vpopcntdq": {"avx512f", "avx512bw", "avx512_vpopcntdq"}, "avx512bw": {"avx512f", "avx512bw"},
            "avx2": {"avx2"}, "scalar": set()}[isa]
    return need <= _cpu_flags()


def _has_vnni() -> bool:
    return _cpu_has("avx512bw") and "avx512_vnni" in _cpu_flags()


@pytest.fixture(params=PATHS, ids=[f"{isa}-{algo}" for isa, algo in PATHS])
def path(request, monkeypatch):
    isa, algo = request.param
    monkeypatch.setenv("EXPCUDA_PACKED_ISA", isa)
    monkeypatch.setenv("EXPCUDA_PACKED_ALGO", algo)
    try:
        taken = packed_path(2, 2)
    except ValueError as exc:  # the kernel's own detection: this CPU lacks it
        pytest.skip(str(exc))
    assert taken == (isa, algo)
    return isa, algo


# (a_bits, w_bits, channels, filters, kernel, stride, padding, batch, H, W)
CASES = [
    (1, 1, 1, 3, 3, 1, 1, 1, 5, 7),
    (1, 1, 64, 9, 3, 2, 1, 3, 7, 5),
    (1, 1, 130, 70, 5, 2, 2, 3, 11, 9),
    (1, 2, 7, 17, 5, 1, 2, 1, 9, 9),
    (2, 2, 63, 16, 3, 1, 0, 3, 5, 7),
    (2, 2, 65, 20, 1, 2, 0, 1, 7, 9),
    (2, 2, 1, 33, 3, 1, 2, 3, 7, 7),
    (4, 4, 130, 33, 3, 2, 2, 1, 7, 7),
    (4, 4, 7, 1, 1, 1, 0, 3, 5, 3),
    (2, 4, 65, 8, 5, 2, 2, 3, 9, 7),
    (8, 8, 7, 5, 3, 1, 1, 3, 5, 5),
    (8, 8, 130, 3, 5, 1, 0, 1, 7, 9),
    (4, 1, 63, 70, 1, 1, 1, 1, 5, 9),
    (4, 2, 64, 130, 3, 1, 1, 1, 3, 3),
]


def _inputs(a_bits, w_bits, c, o, k, n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 1 << a_bits, (n, h, w, c), generator=g).to(torch.uint8)
    q = torch.randint(0, 1 << w_bits, (o, k, k, c), generator=g).to(torch.uint8)
    return x, pack_planes(q, w_bits)


def _check(x, planes, c, a_bits, w_bits, stride, padding):
    s, t = packed_conv2d(x, planes, c, a_bits, w_bits, stride, padding)
    s_ref, t_ref = packed_conv2d_reference(x, planes, c, stride, padding)
    assert s.dtype == torch.int32 and t.dtype == torch.int32
    assert s.shape == s_ref.shape and t.shape == t_ref.shape
    torch.testing.assert_close(s, s_ref, atol=0, rtol=0)
    torch.testing.assert_close(t, t_ref, atol=0, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "a{}w{}-c{}-o{}-k{}-s{}-p{}-n{}-{}x{}".format(*c))
def test_matches_reference(path, case):
    a_bits, w_bits, c, o, k, stride, padding, n, h, w = case
    if path[1] == "dot" and w_bits > 7:
        pytest.skip("the VNNI path takes w_bits <= 7")
    x, planes = _inputs(a_bits, w_bits, c, o, k, n, h, w, seed=hash(case) % 1000)
    _check(x, planes, c, a_bits, w_bits, stride, padding)


@pytest.mark.parametrize("a_bits,w_bits", [(1, 1), (4, 4), (8, 7), (8, 8)])
def test_largest_codes_everywhere(path, a_bits, w_bits):
    # every code at its maximum: the largest sums, and padded taps next to full ones
    if path[1] == "dot" and w_bits > 7:
        pytest.skip("the VNNI path takes w_bits <= 7")
    c = 130
    x = torch.full((2, 6, 5, c), (1 << a_bits) - 1, dtype=torch.uint8)
    planes = pack_planes(torch.full((12, 5, 5, c), (1 << w_bits) - 1, dtype=torch.uint8), w_bits)
    _check(x, planes, c, a_bits, w_bits, 1, 2)


def test_garbage_in_the_pad_bits_is_ignored(path):
    # channels 10..15 of the last plane byte are not channels: whatever they hold adds nothing
    x, planes = _inputs(2, 2, 10, 4, 3, 1, 5, 5, seed=3)
    dirty = planes.clone()
    dirty[..., -1] |= 0xFC
    s, t = packed_conv2d(x, dirty, 10, 2, 2, 1, 1)
    s_ref, t_ref = packed_conv2d_reference(x, planes, 10, 1, 1)
    assert torch.equal(s, s_ref) and torch.equal(t, t_ref)


def test_non_contiguous_inputs(path):
    g = torch.Generator().manual_seed(5)
    nchw = torch.randint(0, 4, (2, 9, 6, 7), generator=g).to(torch.uint8)
    x = nchw.permute(0, 2, 3, 1)  # an NHWC view of NCHW storage
    planes = pack_planes(torch.randint(0, 4, (5, 3, 3, 9), generator=g).to(torch.uint8), 2)
    planes = torch.cat([planes, planes], dim=0)[::2]  # strided along O
    assert not x.is_contiguous() and not planes.is_contiguous()
    _check(x, planes, 9, 2, 2, 2, 1)


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_counts_agree(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for batch in (1, 5):  # few output pixels: the filters are split between tasks too
            x, planes = _inputs(2, 2, 48, 64, 3, batch, 9, 9, seed=batch)
            _check(x, planes, 48, 2, 2, 1, 1)
    finally:
        torch.set_num_threads(old)


def test_empty_batch_and_dispatch():
    x, planes = _inputs(1, 1, 8, 4, 3, 0, 5, 5, seed=0)
    s, t = packed_conv2d(x, planes, 8, 1, 1, 1, 1)
    assert s.shape == (0, 5, 5, 4) and t.shape == (0, 5, 5)
    assert registry.dispatch("packed_conv2d", x).backend == "cpu"
    with registry.use_backend("reference"):
        assert registry.dispatch("packed_conv2d", x).backend == "reference"


def test_the_default_path_is_the_best_isa(monkeypatch):
    monkeypatch.delenv("EXPCUDA_PACKED_ISA", raising=False)
    monkeypatch.delenv("EXPCUDA_PACKED_ALGO", raising=False)
    best = next(isa for isa in ISAS if _cpu_has(isa))
    assert packed_path(1, 1) == (best, "bitserial")
    assert packed_path(4, 8)[1] == "bitserial"  # 8-bit weight codes do not fit int8


# --------------------------------------------------------------------------- bad input

X = torch.zeros(1, 4, 4, 3, dtype=torch.uint8)
W = pack_planes(torch.zeros(2, 3, 3, 3, dtype=torch.uint8), 2)


def _raw(*args):
    return torch.ops.expcuda_C.packed_conv2d(*args)


BAD = [  # (args, error type, what the message names)
    ((X.float(), W, 3, 2, 2, 1, 1), TypeError, "x_codes"),
    ((X, W.int(), 3, 2, 2, 1, 1), TypeError, "w_planes"),
    ((X[0], W, 3, 2, 2, 1, 1), ValueError, "x_codes"),
    ((X, W[0], 3, 2, 2, 1, 1), ValueError, "w_planes"),
    ((X, W, 4, 2, 2, 1, 1), ValueError, "channels"),
    ((X, W, 0, 2, 2, 1, 1), ValueError, "channels"),
    ((X, torch.zeros(2, 3, 3, 2, 2, dtype=torch.uint8), 3, 2, 2, 1, 1), ValueError, "ceil\\(channels/8\\)"),
    ((X, W, 3, 0, 2, 1, 1), ValueError, "a_bits"),
    ((X, W, 3, 9, 2, 1, 1), ValueError, "a_bits"),
    ((X, W, 3, 2, 3, 1, 1), ValueError, "w_bits"),
    ((X, W, 3, 2, 2, 0, 1), ValueError, "stride"),
    ((X, W, 3, 2, 2, 1, -1), ValueError, "padding"),
    ((X + 4, W, 3, 2, 2, 1, 1), ValueError, "2\\*\\*a_bits"),
    ((X[:, :2], W, 3, 2, 2, 1, 0), ValueError, "kernel"),
]


@pytest.mark.parametrize("entry", ["public", "raw"])
@pytest.mark.parametrize("args,error,names", BAD, ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input_names_the_argument(entry, args, error, names):
    with pytest.raises(error, match=names):
        (packed_conv2d if entry == "public" else _raw)(*args)


def test_python_types_are_checked():
    with pytest.raises(TypeError, match="channels"):
        packed_conv2d(X, W, "3", 2, 2, 1, 1)
    with pytest.raises(TypeError, match="x_codes"):
        packed_conv2d(X.numpy(), W, 3, 2, 2, 1, 1)
    with pytest.raises(TypeError, match="stride"):
        packed_conv2d(X, W, 3, 2, 2, True, 1)


@pytest.mark.parametrize("env,value,names", [
    ("EXPCUDA_PACKED_ISA", "avx9000", "EXPCUDA_PACKED_ISA"),
    ("EXPCUDA_PACKED_ALGO", "fastest", "EXPCUDA_PACKED_ALGO"),
])
def test_bad_forcing_is_an_error(monkeypatch, env, value, names):
    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError, match=names):
        packed_conv2d(X, W, 3, 2, 2, 1, 1)


def test_forcing_vnni_for_8_bit_weights_is_an_error(monkeypatch):
    if not _has_vnni():
        pytest.skip("no AVX-512 VNNI here")
    monkeypatch.setenv("EXPCUDA_PACKED_ALGO", "dot")
    w8 = pack_planes(torch.zeros(2, 3, 3, 3, dtype=torch.uint8), 8)
    with pytest.raises(ValueError, match="w_bits"):
        packed_conv2d(X, w8, 3, 2, 8, 1, 1)


def test_forcing_vnni_under_avx2_is_an_error(monkeypatch):
    monkeypatch.setenv("EXPCUDA_PACKED_ISA", "avx2")
    monkeypatch.setenv("EXPCUDA_PACKED_ALGO", "dot")
    if not _cpu_has("avx2"):
        pytest.skip("no AVX2 here")
    with pytest.raises(ValueError, match="EXPCUDA_PACKED_ALGO=dot"):
        packed_conv2d(X, W, 3, 2, 2, 1, 1)
