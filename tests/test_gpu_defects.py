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
