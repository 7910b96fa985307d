"""The one dispatcher (expcuda.registry): the automatic choice is remembered per op, device,
dtype and layout; forcing still wins on every call; every refusal says why."""

import pytest
import torch

import expcuda
from expcuda import registry
from expcuda.nn import epilogue


def test_forcing_overrides_a_remembered_automatic_choice(monkeypatch):
    x = torch.rand(8)
    automatic = registry.dispatch("dorefa_activation_fwd", x)
    assert registry._automatic[("dorefa_activation_fwd", x.device, x.dtype, False)] is automatic
    with expcuda.use_backend("reference"):
        assert registry.dispatch("dorefa_activation_fwd", x).backend == "reference"
    monkeypatch.setenv("EXPCUDA_BACKEND", "reference")
    assert registry.dispatch("dorefa_activation_fwd", x).backend == "reference"
    monkeypatch.delenv("EXPCUDA_BACKEND")
    assert registry.dispatch("dorefa_activation_fwd", x) is automatic


def test_forced_backend_runs_after_automatic_calls():
    """An op run automatically, then under a forced backend, takes the forced backend's kernel."""
    x = torch.rand(64)
    expcuda.quant.dorefa_activation(x, 2)
    calls = []
    original = registry.kernel("dorefa_activation_fwd", "reference").fn
    with registry.replaced("dorefa_activation_fwd", "reference",
                           lambda *args: calls.append(args) or original(*args)):
        with expcuda.use_backend("reference"):
            expcuda.quant.dorefa_activation(x, 2)
    assert len(calls) == 1


def test_every_op_is_served_by_the_reference_on_the_cpu():
    report = registry.op_report(torch.empty(0))
    assert set(registry.ops()) >= {"dorefa_activation_fwd", "lsq_bwd", "block_epilogue_fwd",
                                   "block_epilogue_bwd_given"}
    for op, backends in report.items():
        assert backends["reference"] is None, op
        assert backends["cuda"] is not None, op  # a CPU tensor: never the CUDA backend


def test_a_forced_backend_that_cannot_serve_says_which_op_and_why():
    with expcuda.use_backend("cuda"):
        with pytest.raises(expcuda.BackendError, match=r"'cuda' was forced but cannot serve "
                           r"dorefa_activation_fwd for torch.float32 tensors on cpu: "):
            expcuda.quant.dorefa_activation(torch.rand(4), 2)


def test_forcing_some_ops_leaves_the_others_automatic():
    x = torch.rand(2, 3, 4, 4)
    auto = registry.dispatch("dorefa_activation_fwd", x).backend
    with epilogue.use_kernel("torch"):
        assert registry.dispatch("block_epilogue_fwd", x).backend == "reference"
        assert registry.dispatch("dorefa_activation_fwd", x).backend == auto


def test_a_kernel_that_refuses_a_dtype_hands_over_to_the_next_backend():
    """The C++ epilogue serves float32/16/bf16: a float64 z goes to the reference, and forcing
    the C++ kernel on it names the dtype."""
    if epilogue.kernel_unavailable("cpp") is not None:
        pytest.skip("the C++ epilogue is not built")
    z = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    assert registry.dispatch("block_epilogue_fwd", z.float()).backend == "cpu"
    assert registry.dispatch("block_epilogue_fwd", z).backend == "reference"
    with epilogue.use_kernel("cpp"), pytest.raises(expcuda.BackendError, match="got torch.float64"):
        registry.dispatch("block_epilogue_fwd", z)


def test_an_unknown_op_or_backend_is_refused_by_name():
    with pytest.raises(KeyError, match="not declared"):
        registry.register("no_such_op", "cpu", lambda t: t)
    with pytest.raises(ValueError, match="backend must be one of reference, cpu, triton, cuda"):
        registry.use_backend("gpu").__enter__()
