"""Shared fixtures: the backends to test, each on the device it serves."""

from __future__ import annotations

import pytest
import torch

from expcuda import backends

COMPILED = ("cpu", "triton", "cuda")
# test files whose every test runs a GPU kernel (Triton also runs on the CPU under TRITON_INTERPRET=1)
GPU_FILES = {"test_block_cuda.py": "cuda", "test_triton_kernels_extra.py": "triton"}
_gpu_tests: set[str] = set()
_gpu_skips: list[str] = []


def backend_device(name: str) -> torch.device:
    if name == "cuda" or (name == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(params=[pytest.param(n, marks=getattr(pytest.mark, n)) if n in ("triton", "cuda") else n
                        for n in COMPILED])
def backend(request):
    """A non-reference backend name, skipped (with the reason) where it cannot run."""
    name = request.param
    reason = backends.why_not(name, backend_device(name), torch.float32)
    if reason is not None:
        pytest.skip(f"{name} backend unavailable: {reason}")
    return name


def pytest_collection_modifyitems(config, items):
    """Mark the GPU-only files, and remember every test marked cuda or triton."""
    for item in items:
        marker = GPU_FILES.get(item.path.name)
        if marker:
            item.add_marker(getattr(pytest.mark, marker))
        if item.get_closest_marker("cuda") or item.get_closest_marker("triton"):
            _gpu_tests.add(item.nodeid)


def pytest_runtest_logreport(report):
    if report.skipped and report.nodeid in _gpu_tests and report.when in ("setup", "call"):
        _gpu_skips.append(report.nodeid)


def pytest_terminal_summary(terminalreporter):
    if torch.cuda.is_available():
        line = f"{len(_gpu_skips)} GPU tests (markers cuda, triton) skipped although a GPU is visible: see -rs"
    else:
        line = (f"{len(_gpu_skips)} tests skipped for want of a GPU (markers cuda, triton; "
                f"Triton tests run on the CPU with TRITON_INTERPRET=1)")
    terminalreporter.write_line(line)
