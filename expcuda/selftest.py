"""``python -m expcuda.info --selftest``: every op on every backend here, against the reference.

An install on a new machine (another GPU, torch or Triton) can build and import
and still compute wrong numbers.  This runs each quantizer of ``expcuda.quant``
the block epilogue ``expcuda::block_epilogue`` and the packed convolution on small inputs, forward and
gradients, on each backend that can run here, and compares with the reference
on the same device: the quantizers bit for bit (the numeric contract), the
epilogue within the tolerances its kernel tests use.  One line per op and
backend: ``ok``, ``mismatch`` (with the worst error), ``refused`` (and why) or
``error`` (an exception); the exit status is 1 on any mismatch or error.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

import expcuda
from expcuda import backends
from expcuda import quant as Q
from expcuda.quant import spec
from expcuda.nn import epilogue

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: the epilogue kernel that serves each backend name (``reference`` -> the PyTorch kernels)
EPILOGUE_KERNEL = {"reference": "torch", "cpu": "cpp", "triton": "triton", "cuda": "cuda"}
FAILED = ("mismatch", "error")


@dataclass
class Result:
    op: str
    backend: str
    status: str  # ok | mismatch | refused | error
    detail: str

    def line(self) -> str:
        return f"{self.op:<18} {self.backend:<9} {self.status}: {self.detail}"


def device_for(backend: str) -> torch.device:
    """The device a backend is checked on: Triton on the GPU when one is visible, else the CPU."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


sample = spec.sample  # the hard-case inputs every case starts from


# --------------------------------------------------------------------------- quantizers

@dataclass
class QuantCase:
    label: str
    fn: Callable
    make: Callable  # (dtype, device) -> input tensors


def quant_cases() -> dict[str, list[QuantCase]]:
    """Each public quantizer's cases, as its module in ``expcuda/quant/kinds`` declares them."""
    cases = {name: [QuantCase(*case) for case in spec.SELFTEST.get(name, [])] for name in Q.__all__}
    missing = [name for name, found in cases.items() if not found]
    assert not missing, f"the self-check has no cases for {missing}: declare them with spec.selftest"
    return cases


def run_quant(backend: str, fn: Callable, inputs) -> list[torch.Tensor]:
    """fn's output and the gradient of every input on ``backend``, with a fixed upstream gradient."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    with expcuda.use_backend(backend):
        out = fn(*leaves)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype).to(out.device)
        out.backward(upstream)
    return [out.detach()] + [t.grad for t in leaves]


def exact_diff(got: torch.Tensor, want: torch.Tensor) -> Optional[tuple[int, float]]:
    """None when bit for bit equal (NaN equal to NaN), else (elements that differ, worst |difference|)."""
    if got is None or want is None:
        return None if got is None and want is None else (1, math.inf)
    if got.shape != want.shape or got.dtype != want.dtype:
        return (max(got.numel(), want.numel()), math.inf)
    a, b = got.double(), want.double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    differ = ~((a == b) | both_nan)
    if not bool(differ.any()):
        return None
    diff = (a - b).abs().masked_fill(~differ, 0).nan_to_num(nan=math.inf)
    return int(differ.sum()), float(diff.max())


def check_quant(op: str, backend: str, cases: list[QuantCase], dtypes=DTYPES) -> Result:
    device = device_for(backend)
    reason = backends.why_not(backend, device, torch.float32)
    if reason is not None:
        return Result(op, backend, "refused", reason)
    worst, count = None, 0
    for case in cases:
        for dtype in dtypes:
            inputs = case.make(dtype, device)
            got, want = run_quant(backend, case.fn, inputs), run_quant("reference", case.fn, inputs)
            for name, g, w in zip(["forward"] + [f"grad {i}" for i in range(len(inputs))], got, want):
                count += 1
                bad = exact_diff(g, w)
                if bad is not None and (worst is None or bad[1] > worst[1]):
                    worst = (bad[0], bad[1], f"{case.label} {str(dtype).replace('torch.', '')} {name}".strip())
    if worst is not None:
        n, err, where = worst
        return Result(op, backend, "mismatch", f"not bit for bit: worst |difference| {err:.3g} "
                                               f"({n} elements differ) at {where}")
    what = "the definition of correct: ran" if backend == "reference" else "bit for bit with the reference:"
    return Result(op, backend, "ok", f"{what} {count} outputs and gradients on {device.type} "
                                     f"({len(cases)} cases x {len(dtypes)} dtypes)")


# --------------------------------------------------------------------------- block epilogue

#: (scheme, combine, a_quant, a_bits, phi, psi, with FP branch) as in tests/test_block_cuda.py
EPILOGUE_CASES = (
    (2, "add", "dorefa", 2, "clip", "identity", True),
    (1, "concat", "lsq", 2, "relu", "relu", True),
    (2, "sub", "sign", 2, "identity", "clip", True),
    (1, "add", "dorefa", 32, "clip", "identity", True),
    (2, "add", "lsq", 4, "relu", "identity", False),
)


def epilogue_args(case, dtype, device, channels_last=False, shape=(3, 6, 5, 7), eps=1e-5):
    """The op's arguments for one case: z of (n, c_lp [+ FP channels], h, w), BN affine, f, step."""
    scheme, combine, a_quant, a_bits, phi, psi, fp = case
    n, c_lp, h, w = shape
    c = c_lp + (0 if not fp else (4 if combine == "concat" else c_lp))
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(n, c, h, w, generator=g) * 2 + 0.5).to(device, dtype)
    if channels_last:
        z = z.to(memory_format=torch.channels_last)
    weight = (torch.rand(c, generator=g) + 0.5).to(device)
    bias = (torch.rand(c, generator=g) * 0.6 - 0.3).to(device)
    f = torch.tensor(0.6, device=device)
    step = torch.tensor(0.3, device=device) if a_quant == "lsq" else None
    return [z, weight, bias, f, step, c_lp, eps, scheme, combine, a_quant, a_bits, phi, psi]


def _tolerances(dtype) -> tuple[float, float]:
    """(elementwise tolerance of the output, relative tolerance of the gradients), as the tests use."""
    if dtype == torch.float32:
        return 1e-5, 1e-4
    eps = torch.finfo(dtype).eps
    return eps, 4 * eps


def _epilogue_errors(kernel: str, args, dtype) -> list[tuple[float, str]]:
    """(error / allowed, what) for each result of the kernel against the PyTorch kernels."""
    out_tol, grad_tol = _tolerances(dtype)
    with epilogue.use_kernel("torch"):
        ref_out, ref_mean, ref_var = epilogue.block_epilogue_op(*args)
    with epilogue.use_kernel(kernel):
        out, mean, var = epilogue.block_epilogue_op(*args)
    errors = []
    for name, a, b in (("mean", mean, ref_mean), ("var", var, ref_var)):
        excess = ((a.double() - b.double()).abs() / (1e-6 + 1e-5 * b.double().abs())).max()
        errors.append((float(excess), f"{name}: worst |difference| / (1e-6 + 1e-5|ref|) = {float(excess):.3g}"))
    # the output: equal within out_tol except at a few elements where a last-bit difference in the
    # statistics moves a value across a quantizer's rounding boundary (as tests/test_block_cuda.py)
    if out.shape != ref_out.shape or out.dtype != ref_out.dtype:
        errors.append((math.inf, f"out: {tuple(out.shape)} {out.dtype}, expected {tuple(ref_out.shape)} {ref_out.dtype}"))
    else:
        bad = ~torch.isclose(out.float(), ref_out.float(), rtol=out_tol, atol=out_tol, equal_nan=True)
        allowed = max(1, int(2e-3 * bad.numel()))
        worst = float((out.float() - ref_out.float()).abs().max())
        errors.append((int(bad.sum()) / allowed, f"out: {int(bad.sum())} of {bad.numel()} elements beyond "
                                                 f"{out_tol:.2g} (allowed {allowed}), worst |difference| {worst:.3g}"))
    grad = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(7)).to(ref_out.device, dtype)
    rest = args[5:]
    z, weight, bias, f, step = args[:5]
    with epilogue.use_kernel("torch"):
        want = epilogue.block_epilogue_backward(grad, z, weight, bias, f, step, ref_mean, ref_var, *rest)
    with epilogue.use_kernel(kernel):
        got = epilogue.block_epilogue_backward(grad, z, weight, bias, f, step, ref_mean, ref_var, *rest)
    for name, a, b in zip(("dz", "dweight", "dbias", "dstep"), got, want):
        if a.shape != b.shape or a.dtype != b.dtype:
            errors.append((math.inf, f"{name}: {tuple(a.shape)} {a.dtype}, expected {tuple(b.shape)} {b.dtype}"))
            continue
        a64, b64 = a.double(), b.double()
        if float(b64.abs().max()) == 0:
            err = 0.0 if float(a64.abs().max()) == 0 else math.inf
        else:
            err = float((a64 - b64).norm() / b64.norm())
        errors.append((err / grad_tol, f"{name}: relative error {err:.3g} (tolerance {grad_tol:.2g})"))
    return errors


def check_epilogue(backend: str, dtypes=(torch.float32, torch.bfloat16)) -> Result:
    op = "block_epilogue"
    kernel = EPILOGUE_KERNEL[backend]
    device = device_for(backend)
    reason = epilogue.kernel_unavailable(kernel) or backends.why_not(backend, device, torch.float32)
    if reason is not None:
        return Result(op, backend, "refused", reason)
    worst, count = (-1.0, ""), 0
    for case in EPILOGUE_CASES:
        for dtype in dtypes:
            for channels_last in ((False, True) if kernel in ("cpp", "triton") else (False,)):
                # the shapes of the kernel tests: float16/bfloat16 allow a few more rounding flips on a larger z
                shape = (3, 6, 5, 7) if dtype == torch.float32 else (4, 6, 8, 8)
                args = epilogue_args(case, dtype, device, channels_last, shape)
                label = (f"scheme={case[0]} {case[1]} {case[2]}{case[3]} {str(dtype).replace('torch.', '')}"
                         + (" channels_last" if channels_last else ""))
                for ratio, what in _epilogue_errors(kernel, args, dtype):
                    count += 1
                    if not math.isnan(worst[0]) and not ratio <= worst[0]:  # a NaN error is the worst
                        worst = (ratio, f"{label}: {what}")
    if not worst[0] <= 1:
        return Result(op, backend, "mismatch", f"beyond the kernel tests' tolerance at {worst[1]}")
    if backend == "reference":
        return Result(op, backend, "ok", f"the PyTorch kernels (the reference the others are held to): ran "
                                         f"{count} results on {device.type}")
    return Result(op, backend, "ok", f"within the kernel tests' tolerances: {count} results on {device.type} "
                                     f"(worst at {worst[0]:.2g} of the tolerance)")


# --------------------------------------------------------------------------- the packed convolution

#: (a_bits, w_bits, channels, kernel, stride, padding): the 1-bit tile, bit-serial, VNNI, odd channels
PACKED_CASES = ((1, 1, 64, 3, 1, 1), (2, 2, 7, 3, 2, 1), (4, 4, 65, 3, 1, 0), (8, 8, 3, 1, 1, 0))


def check_packed(backend: str) -> Result:
    """packed_conv2d on ``backend`` against the reference kernel, bit for bit (integers)."""
    from expcuda import registry
    from expcuda.deploy import ops as deploy_ops
    from expcuda.deploy import pack_planes, packed_conv2d
    op = deploy_ops.PACKED_CONV2D
    device = torch.device("cuda") if backend == "cuda" else torch.device("cpu")
    reason = registry.availability(backend)
    if reason is None and backend != "reference":
        reason = registry.why_not(op, backend, torch.zeros(1, dtype=torch.uint8, device=device))
    if reason is not None:
        return Result(op, backend, "refused", reason)
    gen = torch.Generator().manual_seed(0)
    for a_bits, w_bits, c, k, stride, padding in PACKED_CASES:
        x = torch.randint(0, 1 << a_bits, (2, 6, 5, c), generator=gen, dtype=torch.uint8).to(device)
        planes = pack_planes(torch.randint(0, 1 << w_bits, (5, k, k, c), generator=gen, dtype=torch.uint8),
                             w_bits).to(device)
        args = (x, planes, c, a_bits, w_bits, stride, padding)
        with registry.use_backend("reference"):
            want = packed_conv2d(*args)
        with registry.use_backend(backend):
            got = packed_conv2d(*args)
        for name, g, w in zip(("S", "T"), got, want):
            if exact_diff(g, w) is not None:
                return Result(op, backend, "mismatch", f"{name} differs at bits {a_bits}/{w_bits}, {c} channels, "
                                                       f"{k}x{k} stride {stride} padding {padding}")
    what = "the definition of correct: ran" if backend == "reference" else "bit for bit with the reference:"
    return Result(op, backend, "ok", f"{what} {len(PACKED_CASES)} cases on {device.type}")


# --------------------------------------------------------------------------- driver

def _guarded(op: str, backend: str, check: Callable[[], Result]) -> Result:
    try:
        return check()
    except Exception as exc:  # noqa: BLE001 - a crashing kernel is a result to report, not to hide
        return Result(op, backend, "error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def results() -> Iterator[Result]:
    """Each op on each backend, in order; refused ones say why."""
    for op, cases in quant_cases().items():
        for backend in backends.NAMES:
            yield _guarded(op, backend, lambda: check_quant(op, backend, cases))
    for backend in backends.NAMES:
        yield _guarded("block_epilogue", backend, lambda: check_epilogue(backend))
    for backend in backends.NAMES:
        yield _guarded("packed_conv2d", backend, lambda: check_packed(backend))


def main(echo=print) -> int:
    """Print one line per op and backend; 0 when nothing mismatched or failed, else 1."""
    t0 = time.perf_counter()
    counts: dict[str, int] = {}
    for result in results():
        echo(result.line())
        counts[result.status] = counts.get(result.status, 0) + 1
    summary = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("ok", "mismatch", "error", "refused"))
    bad = sum(counts.get(s, 0) for s in FAILED)
    echo(f"selftest: {summary} in {time.perf_counter() - t0:.1f} s -> {'FAILED' if bad else 'passed'}")
    return 1 if bad else 0
