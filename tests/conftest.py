"""Shared fixtures: the backends to test, each on the device it serves."""

from __future__ import annotations

import pytest
import torch

from expcuda import backends

COMPILED = ("cpu", "triton", "cuda")


def backend_device(name: str) -> torch.device:
    if name == "cuda" or (name == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(params=COMPILED)
def backend(request):
    """A non-reference backend name, skipped (with the reason) where it cannot run."""
    name = request.param
    reason = backends.why_not(name, backend_device(name), torch.float32)
    if reason is not None:
        pytest.skip(f"{name} backend unavailable: {reason}")
    return name
