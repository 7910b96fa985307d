"""Shared helpers of the block tests (no tests here): one training step, dtype-aware comparison."""

from __future__ import annotations

import contextlib

import pytest
import torch

from expcuda import use_backend
from expcuda.nn import epilogue

KERNELS = [k for k in ("torch", "cpp", "triton") if epilogue.kernel_unavailable(k) is None]


def kernel_params(*names):
    """``names`` as parameters: one that cannot run here skips with the reason, never vanishes."""
    params = []
    for name in names:
        why = epilogue.kernel_unavailable(name)
        marks = [pytest.mark.skipif(why is not None, reason=f"{name} epilogue unavailable: {why}")]
        if name in ("triton", "cuda"):
            marks.append(getattr(pytest.mark, name))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def step(block, x, grad_seed=1, mode=None, kernel=None):
    """Output, input gradient, every parameter's gradient and the BN buffers after one step.

    mode "reference" forces the plain composition; kernel forces the fused epilogue's kernel.
    """
    block.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    ctx = use_backend("reference") if mode == "reference" else contextlib.nullcontext()
    kctx = epilogue.use_kernel(kernel) if kernel else contextlib.nullcontext()
    with ctx, kctx:
        y = block(x)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y.dtype).to(y.device)
        y.backward(g)
    result = {"out": y.detach(), "x.grad": x.grad}
    for name, p in block.named_parameters():
        result[f"{name}.grad"] = p.grad
    for name, b in block.named_buffers():
        if "running" in name:
            result[name] = b.detach().clone()
    block.load_state_dict(before)  # running statistics back, so runs start equal
    return result


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_close_to(candidate: dict, truth: dict, baseline: dict, factor=4.0, floor=None, what="",
                    pooled=False):
    """candidate's error vs truth within factor x plain PyTorch's (baseline's) error vs truth.

    ``baseline`` is the reference composition computed so that its rounding differs
    (another dtype, or another summation order): its distance to ``truth`` is the
    error plain PyTorch makes at this dtype.  ``pooled``: one allowance for every
    tensor, from the baseline's largest error (at bf16/fp16 a rounding flip of a
    quantizer lands in one gradient or another by chance).
    """
    assert candidate.keys() == truth.keys(), (candidate.keys(), truth.keys())
    pool = max((rel_err(baseline[k], t) for k, t in truth.items() if t is not None), default=0.0)
    for key, t in truth.items():
        c, b = candidate[key], baseline[key]
        if t is None:
            assert c is None, f"{what} {key}: gradient expected to be None"
            continue
        assert c is not None, f"{what} {key}: gradient missing"
        assert c.shape == t.shape and c.dtype == b.dtype, f"{what} {key}: {c.shape}/{c.dtype}"
        eps = torch.finfo(c.dtype).eps
        base_err = pool if pooled else rel_err(b, t)
        allowed = factor * base_err + (floor if floor is not None else 8 * eps)
        err = rel_err(c, t)
        assert err <= allowed, f"{what} {key}: relative error {err:.3g} > allowed {allowed:.3g}"
