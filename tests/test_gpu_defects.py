"""The defects found by reading the GPU code (issue 8), each pinned by a test.

Where a defect shows only on a GPU the test runs the Triton code on the CPU under
``TRITON_INTERPRET=1`` and watches what a GPU would see (a host read of a device value, the grid,
the device a launch runs on); the GPU-only checks skip with the reason.
"""

from __future__ import annotations

import contextlib
import sys
from unittest import mock

import pytest
import torch

from expcuda import backends
from tests import triton_ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON = backends.why_not("triton", DEVICE, torch.float32)
needs_triton = pytest.mark.skipif(TRITON is not None, reason=f"triton backend: {TRITON}")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _modules():
    from expcuda.nn import triton_epilogue as E
    from expcuda.quant import triton_kernels as T
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
