"""``python -m expcuda.info --selftest``: passes on a sound install, reports and fails on a broken kernel."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from expcuda import _ext, backends, info, selftest
from expcuda import registry
from expcuda.nn import epilogue
from expcuda.quant import __all__ as QUANTIZERS

#: a compiled backend that runs here (the C++ one, or Triton under TRITON_INTERPRET=1)
HERE = next((b for b in ("cpu", "triton") if backends.why_not(b, selftest.device_for(b), torch.float32) is None),
            None)
needs_backend = pytest.mark.skipif(HERE is None, reason="neither the cpu nor the triton backend runs here")


def run_selftest():
    lines = []
    rc = selftest.main(lines.append)
    return rc, lines


def line_of(lines, op, backend):
    found = [ln for ln in lines if ln.split()[:2] == [op, backend]]
    assert len(found) == 1, (op, backend, lines)
    return found[0]


def test_passes_with_one_line_per_op_and_backend():
    rc, lines = run_selftest()
    assert rc == 0, "\n".join(lines)
    for op in list(QUANTIZERS) + ["block_epilogue"]:
        for backend in backends.NAMES:
            status = line_of(lines, op, backend).split()[2]
            expected = "refused:" if backends.availability(backend) is not None else "ok:"
            assert status == expected, line_of(lines, op, backend)
    assert lines[-1].startswith("selftest: ") and lines[-1].endswith("passed")


@needs_backend
def test_a_broken_forward_kernel_is_a_mismatch(monkeypatch):
    good = registry.kernel("dorefa_activation_fwd", HERE).fn

    def off_by_one_ulp(x, bits):  # one float32 element one ulp away: bit for bit must catch it
        y, mask = good(x, bits)
        if y.dtype == torch.float32:
            y = y.clone()
            first = (0,) * y.dim()
            y[first] = torch.nextafter(y[first], torch.tensor(2.0, device=y.device))
        return y, mask
    with registry.replaced("dorefa_activation_fwd", HERE, off_by_one_ulp):
        rc, lines = run_selftest()
    assert rc == 1
    bad = line_of(lines, "dorefa_activation", HERE)
    assert "mismatch: not bit for bit" in bad and "forward" in bad and "1 elements differ" in bad, bad
    assert line_of(lines, "dorefa_activation", "reference").split()[2] == "ok:"
    assert line_of(lines, "lsq", HERE).split()[2] == "ok:"
    assert lines[-1].endswith("FAILED")


@needs_backend
def test_a_broken_gradient_is_a_mismatch(monkeypatch):
    good = registry.kernel("lsq_bwd", HERE).fn
    with registry.replaced("lsq_bwd", HERE, lambda *a: (lambda dx, ds: (dx, ds * 1.5))(*good(*a))):
        rc, lines = run_selftest()
    assert rc == 1
    bad = line_of(lines, "lsq", HERE)
    assert "mismatch" in bad and "grad 1" in bad, bad  # grad 1: the step's gradient


@needs_backend
def test_a_crashing_kernel_is_an_error(monkeypatch):
    def broken(*args):
        raise RuntimeError("no kernel image is available for execution on the device")
    with registry.replaced("xnor_weight_fwd", HERE, broken):
        rc, lines = run_selftest()
        assert info.main(["--selftest"]) == 1  # the exit status of python -m expcuda.info --selftest
    assert rc == 1
    assert "error: RuntimeError: no kernel image" in line_of(lines, "xnor_weight", HERE)
    assert info.main([]) == 0  # without --selftest: the versions only


@pytest.mark.skipif(epilogue.kernel_unavailable("cpp") is not None, reason="the C++ epilogue is not built")
def test_a_broken_epilogue_kernel_is_a_mismatch(monkeypatch):
    good = registry.kernel("block_epilogue_bwd", "cpu").fn

    def wrong_dbias(*args):
        dz, dw, db, ds = good(*args)
        return dz, dw, db * 1.001, ds  # 1e-3 relative: ten times the tests' tolerance
    with registry.replaced("block_epilogue_bwd", "cpu", wrong_dbias):
        rc, lines = run_selftest()
    assert rc == 1
    bad = line_of(lines, "block_epilogue", "cpu")
    assert "mismatch" in bad and "dbias: relative error" in bad, bad


@pytest.mark.skipif(not _ext.has_kernel("packed_conv2d", "CPU"), reason="the C++ packed convolution is not built")
def test_a_broken_packed_kernel_is_a_mismatch():
    good = registry.kernel("packed_conv2d", "cpu").fn

    def one_off(*args):
        s, t = good(*args)
        return s, t + (t == t.max()).to(t.dtype)  # T one too large somewhere
    with registry.replaced("packed_conv2d", "cpu", one_off):
        rc, lines = run_selftest()
    assert rc == 1
    assert "mismatch: T differs" in line_of(lines, "packed_conv2d", "cpu")
    assert line_of(lines, "packed_conv2d", "reference").split()[2] == "ok:"


def test_command_line():
    done = subprocess.run([sys.executable, "-m", "expcuda.info", "--selftest"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "backends:" in done.stdout and "block_epilogue" in done.stdout
    assert done.stdout.rstrip().endswith("passed")
