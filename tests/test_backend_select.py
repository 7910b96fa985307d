"""The automatic backend choice is remembered per (device, dtype); forcing still wins on every call."""

import torch

import expcuda
from expcuda import backends


def test_forcing_overrides_a_remembered_automatic_choice(monkeypatch):
    cpu, f32 = torch.device("cpu"), torch.float32
    automatic = backends.select(cpu, f32)
    assert backends._automatic[(cpu, f32)] is automatic
    with expcuda.use_backend("reference"):
        assert backends.select(cpu, f32) is backends.load("reference")
    monkeypatch.setenv("EXPCUDA_BACKEND", "reference")
    assert backends.select(cpu, f32) is backends.load("reference")
    monkeypatch.delenv("EXPCUDA_BACKEND")
    assert backends.select(cpu, f32) is automatic


def test_forced_backend_runs_after_automatic_calls(monkeypatch):
    """An op run automatically, then under a forced backend, takes the forced backend's kernel."""
    x = torch.rand(64)
    expcuda.quant.dorefa_activation(x, 2)
    calls = []
    ref = backends.load("reference")
    original = ref.dorefa_activation_fwd
    monkeypatch.setattr(ref, "dorefa_activation_fwd", lambda *args: calls.append(args) or original(*args))
    with expcuda.use_backend("reference"):
        expcuda.quant.dorefa_activation(x, 2)
    assert len(calls) == 1
