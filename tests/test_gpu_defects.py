"""The defects found by reading the GPU code (issue 8), each pinned by a test.

Where a defect shows only on a GPU the test runs the Triton code on the CPU under
``TRITON_INTERPRET=1`` and watches what a GPU would see (a host read of a device value, the grid,
the device a launch runs on); the GPU-only checks skip with the reason.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from unittest import mock

import numpy
import pytest
import torch
import torch.utils._python_dispatch

from expcuda import backends
from tests import triton_ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON = backends.why_not("triton", DEVICE, torch.float32)
_NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
on_gpu = [pytest.mark.cuda, _NO_GPU]  # the marks of a test or case that needs a CUDA GPU


def needs_triton(test):
    """Marked triton (the GPU report's test step selects it), skipped where Triton cannot run."""
    return pytest.mark.triton(pytest.mark.skipif(TRITON is not None,
                                                 reason=f"triton backend: {TRITON}")(test))


def needs_gpu(test):
    return pytest.mark.cuda(_NO_GPU(test))


def _modules():
    from expcuda._backends import triton_epilogue as E
    from expcuda._backends import triton_quant as T
    return T, E


# --------------------------------------------------------------------------- 2: no host syncs

def _refuse(what):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{what} reads a device value on the host (a GPU sync)")
    return refuse


@contextlib.contextmanager
def _no_host_reads():
    """Make every way expcuda could read a device value on the host raise: float(t), int(t),
    bool(t), t.item(), t.tolist(), and torch.tensor(value, device=...) called from expcuda
    (a blocking host-to-device copy on a GPU)."""
    real_tensor = torch.tensor

    def tensor(*args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if kwargs.get("device") is not None and caller.startswith("expcuda"):
            raise AssertionError(f"{caller} copies a host value to the device with torch.tensor")
        return real_tensor(*args, **kwargs)

    with contextlib.ExitStack() as stack:
        for name in ("__float__", "__int__", "__bool__", "item", "tolist"):
            stack.enter_context(mock.patch.object(torch.Tensor, name, _refuse(f"Tensor.{name}")))
        stack.enter_context(mock.patch.object(torch, "tensor", tensor))
        yield


@needs_triton
def test_triton_ops_never_read_device_values_on_the_host():
    T, E = _modules()
    with _no_host_reads():
        triton_ops.run_quantizers(T, DEVICE)
        triton_ops.run_epilogue(E, DEVICE)


@needs_gpu
def test_training_step_on_the_gpu_never_syncs():
    """A fused EXP-Net block's forward and backward with the Triton kernels, and the quantizers
    with the Triton backend, under torch's sync debug mode."""
    if TRITON is not None:
        pytest.skip(f"triton backend: {TRITON}")
    from expcuda.nn import epilogue
    from expcuda.nn.block import ExpandedConv2d
    block = ExpandedConv2d(4, 8, 3, padding=1, a_quant="lsq", w_quant="xnor").cuda().train()
    x = torch.randn(2, 4, 8, 8, device="cuda", requires_grad=True)
    block(x).sum().backward()  # warm-up: compiles the kernels, initializes the step
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with backends.use_backend("triton"), epilogue.use_kernel("triton"):
            block(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------- 4: the tensor's GPU

class _DeviceRecorder:
    """Stands in for torch.cuda.device: remembers which device is entered, and when."""

    def __init__(self):
        self.current = None

    def __call__(self, device):
        @contextlib.contextmanager
        def enter():
            self.current, before = torch.device(device), self.current
            try:
                yield
            finally:
                self.current = before
        return enter()


@needs_triton
def test_launch_runs_on_the_gpu_of_its_tensors(monkeypatch):
    T, _ = _modules()
    recorder = _DeviceRecorder()
    monkeypatch.setattr(torch.cuda, "device", recorder)
    seen = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: seen.append((grid, recorder.current, meta))

    on_gpu1 = mock.MagicMock(spec=torch.Tensor)
    on_gpu1.device = torch.device("cuda", 1)
    T.launch(Kernel(), (3,), 7, on_gpu1, BLOCK=8)
    assert seen == [((3,), torch.device("cuda", 1), {"BLOCK": 8, "enable_fp_fusion": False})]
    T.launch(Kernel(), (1,), torch.zeros(2), BLOCK=8)  # a CPU tensor (the interpreter): no guard
    assert seen[-1][1] is None


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_triton_ops_on_the_second_gpu_match_the_reference():
    if TRITON is not None:
        pytest.skip(f"triton backend: {TRITON}")
    T, _ = _modules()
    from expcuda.quant import reference as R
    x = torch.randn(5000, device="cuda:1")
    step = torch.full((), 0.2, device="cuda:1")
    with torch.cuda.device(0):
        for got, want in [(T.lsq_fwd(x, step, 2, True), R.lsq_fwd(x, step, 2, True)),
                          (T.xnor_weight_fwd(x.view(50, 100)), R.xnor_weight_fwd(x.view(50, 100)))]:
            assert got.device == x.device and torch.equal(got, want)


# --------------------------------------------------------------------------- 5: grids CUDA takes

@needs_triton
def test_grids_fit_cuda_limits_for_a_large_linear_weight(monkeypatch):
    """A Linear XNOR weight with more than 65535 rows: every grid fits CUDA's limits (axis 0
    below 2**31, axes 1 and 2 at most 65535).  The kernels are recorded, not run."""
    T, _ = _modules()
    grids = []
    monkeypatch.setattr(T, "launch", lambda kernel, grid, *a, **k: grids.append((kernel, grid)))
    w = torch.randn(70000, 2).to(DEVICE)
    T.xnor_weight_fwd(w)
    T.xnor_weight_bwd(w, w)
    assert grids
    for kernel, grid in grids:
        assert grid[0] < 2**31 and all(n <= 65535 for n in grid[1:]), (kernel, grid)


@needs_triton
def test_group_sums_over_many_groups_and_chunks_match_the_reference():
    """The one-axis grid of the group sums: several groups of several chunks each."""
    T, _ = _modules()
    from expcuda.quant import reference as R
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(3, 2500, generator=gen).to(DEVICE)
    g = torch.randn(3, 2500, generator=gen).to(DEVICE)
    assert torch.equal(T.xnor_weight_fwd(w), R.xnor_weight_fwd(w))
    assert torch.equal(T.xnor_weight_bwd(g, w), R.xnor_weight_bwd(g, w))


# --------------------------------------------------------------------------- 11: empty weights

_EMPTY_XNOR = """
import torch, expcuda._C  # noqa: F401
w = torch.empty(0, 3, device={device!r})
assert torch.ops.expcuda_C.xnor_weight_fwd(w).shape == (0, 3)
assert torch.ops.expcuda_C.xnor_weight_bwd(w, w).shape == (0, 3)
"""


def _compiled_has(kernel_device: str) -> bool:
    from expcuda import _ext
    return _ext.REASON is None and _ext.has_kernel("xnor_weight_fwd", kernel_device)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=on_gpu)])
def test_compiled_xnor_kernels_take_an_empty_weight(device):
    """Through torch.ops.expcuda_C (the public API returns before): no division by zero rows,
    which kills the process (SIGFPE), hence the subprocess."""
    if not _compiled_has(device.upper()):
        pytest.skip(f"expcuda._C has no {device} XNOR kernel")
    proc = subprocess.run([sys.executable, "-c", _EMPTY_XNOR.format(device=device)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])


@needs_triton
@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 2, 3, 3)])
def test_triton_xnor_takes_an_empty_weight(shape):
    T, _ = _modules()
    w = torch.empty(shape, device=DEVICE)
    assert T.xnor_weight_fwd(w).shape == shape
    assert T.xnor_weight_bwd(w, w).shape == shape


# --------------------------------------------------------------------------- 6: fused epilogue

def _epilogue_inputs(channels, c_lp, combine, shape, dtype, cl, seed=0):
    gen = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if cl else torch.contiguous_format
    z = torch.randn(shape[0], channels, *shape[1:], generator=gen).to(dtype)
    c_out = channels if combine == "concat" or channels == c_lp else c_lp
    grad = torch.randn(shape[0], c_out, *shape[1:], generator=gen).to(dtype)
    w = torch.rand(channels, generator=gen) + 0.5
    b = torch.randn(channels, generator=gen)
    z, grad = z.to(DEVICE).to(memory_format=fmt), grad.to(DEVICE).to(memory_format=fmt)
    return z, grad, w.to(DEVICE), b.to(DEVICE), torch.full((), 0.4, device=DEVICE)


@needs_triton
@pytest.mark.parametrize("config", triton_ops.EPILOGUES, ids=lambda c: "-".join(map(str, c)))
def test_fused_triton_epilogue_matches_the_pytorch_kernels(config):
    """Statistics, forward and the fused backward against epilogue_{fwd,bwd}_torch, over more
    than one chunk per channel (27 * 48 = 1296 elements, chunks of 1024)."""
    from expcuda.nn import epilogue
    _, E = _modules()
    *args, channels, cl = config
    z, grad, w, b, f = _epilogue_inputs(channels, args[0], args[3], (1, 27, 48), torch.float32, cl)
    step = torch.full((), 0.3, device=DEVICE) if args[4] == "lsq" else None
    got = E.forward(z, w, b, f, step, *args)
    want = epilogue.epilogue_fwd_torch(z, w, b, f, step, *args)
    assert got[0].stride() == want[0].contiguous(memory_format=epilogue.layout(z)).stride()
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
    got = E.backward(grad, z, w, b, f, step, want[1], want[2], *args)
    want = epilogue.epilogue_bwd_torch(grad, z, w, b, f, step, want[1], want[2], *args)
    assert got[0].is_contiguous(memory_format=epilogue.layout(z))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


class _Float32Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that produce a float32/float64 tensor of at least ``numel`` elements."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and o.dtype in (torch.float32, torch.float64) \
                    and o.numel() >= self.numel:
                self.ops.append(str(func))
        return out


@needs_triton
@pytest.mark.parametrize("args", [(3, 1e-5, 2, "add", "dorefa", 2, "clip", "relu"),
                                  (3, 1e-5, 1, "concat", "lsq", 2, "relu", "identity")])
def test_half_epilogue_makes_no_float32_copy_of_z(args):
    """No z-sized float32 buffer (a copy of z for var_mean, dy, LSQ's terms, xhat, ...) in the
    forward or backward of a float16 z: per element only z, the gradient and the results."""
    _, E = _modules()
    z, grad, w, b, f = _epilogue_inputs(6, args[0], args[3], (2, 4, 4), torch.float16, False)
    step = torch.full((), 0.3, device=DEVICE) if args[4] == "lsq" else None
    with _Float32Allocations(z.numel() // 2) as fwd:
        _, mean, var = E.forward(z, w, b, f, step, *args)
    with _Float32Allocations(z.numel() // 2) as bwd:
        E.backward(grad, z, w, b, f, step, mean, var, *args)
    assert fwd.ops == [] and bwd.ops == [], (fwd.ops, bwd.ops)


# --------------------------------------------------------------------------- 7: one invstd

def _ieee_invstd(var, eps):
    """float32 1 / sqrt(var + eps), every step IEEE-rounded (numpy's float32 sqrt and division)."""
    v = var.cpu().numpy().astype(numpy.float32) + numpy.float32(eps)
    return torch.from_numpy(numpy.float32(1.0) / numpy.sqrt(v))


def _hard_variances(device, n=64, eps=1e-5):
    """n variances where one of ATen's two spellings of invstd on ``device``, rsqrt(var + eps)
    or sqrt(var + eps).reciprocal(), is not the IEEE 1 / sqrt(var + eps)."""
    var = (torch.rand(200_000, generator=torch.Generator().manual_seed(7)) * 4).to(device)
    want = _ieee_invstd(var, eps).to(device)
    off = (torch.rsqrt(var + eps) != want) | (torch.sqrt(var + eps).reciprocal() != want)
    assert off.sum() >= n
    return var[off][:n]


@pytest.mark.parametrize("kernel", ["torch", "cpp", pytest.param("triton", marks=pytest.mark.triton),
                                    pytest.param("cuda", marks=pytest.mark.cuda)])
def test_every_epilogue_kernel_has_the_ieee_invstd(kernel):
    """One element per channel at z = 1, mean 0, weight 1, identity phi, no Qa: the weight's
    gradient is invstd itself, which every kernel must compute as IEEE 1 / sqrt(var + eps)."""
    from expcuda.nn import epilogue
    reason = epilogue.kernel_unavailable(kernel)
    if reason is not None:
        pytest.skip(reason)
    device = "cuda" if kernel == "cuda" or (kernel == "triton" and DEVICE.type == "cuda") else "cpu"
    var = _hard_variances(device)
    c = var.numel()
    z, grad = torch.ones(1, c, 1, 1, device=device), torch.ones(1, c, 1, 1, device=device)
    ones, zeros = torch.ones(c, device=device), torch.zeros(c, device=device)
    from expcuda import registry
    bwd = registry.kernel("block_epilogue_bwd", epilogue.KERNELS[kernel]).fn
    _, dweight, _, _ = bwd(grad, z, ones, zeros, torch.zeros((), device=device), None, zeros, var,
                           c, 1e-5, 2, "add", "none", 32, "identity", "identity")
    want = _ieee_invstd(var, 1e-5)
    assert torch.equal(dweight.cpu().view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=on_gpu)])
def test_invstd_is_ieee_on_every_device(device):
    """epilogue.invstd picks ATen's IEEE spelling per device (rsqrt on the CPU, sqrt then
    reciprocal on CUDA): checked over many variances, those that trip either spelling first."""
    from expcuda.nn import epilogue
    gen = torch.Generator().manual_seed(11)
    var = torch.cat([_hard_variances(device).cpu(), torch.rand(100_000, generator=gen) * 10,
                     torch.rand(10_000, generator=gen) * 1e-4]).to(device)
    got = epilogue.invstd(var, 1e-5).cpu()
    assert torch.equal(got.view(torch.int32), _ieee_invstd(var, 1e-5).view(torch.int32))


# --------------------------------------------------------------------------- 8: full reduction grid

@needs_gpu
def test_cuda_reductions_over_more_blocks_than_256_match_the_reference():
    """4M elements: the CUDA partial sums now take the device's resident blocks (an H200: 1056),
    more than the old cap of 256, and still reproduce the reference."""
    from expcuda import _ext
    from expcuda.quant import reference as R
    if not _ext.has_kernel("lsq_bwd", "CUDA"):
        pytest.skip("expcuda._C has no CUDA kernels")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4 << 20, generator=gen).cuda()
    g = torch.randn(4 << 20, generator=gen).cuda()
    step = torch.full((), 0.2, device="cuda")
    got = torch.ops.expcuda_C.lsq_bwd(g, x, step, 3, True)
    want = R.lsq_bwd(g, x, step, 3, True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(torch.ops.expcuda_C.dorefa_weight_fwd(x, 1), R.dorefa_weight_fwd(x, 1))
