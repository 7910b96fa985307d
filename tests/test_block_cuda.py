"""The CUDA block epilogue (``csrc/cuda/block_cuda.cu``) against the reference, on CUDA tensors.

Op level: ``torch.ops.expcuda_C.block_epilogue_fwd`` / ``_bwd`` on CUDA tensors against
:func:`epilogue_fwd_torch` / :func:`epilogue_bwd_torch` on the same tensors (and against the
C++ CPU kernel where it is built).  Block level: ``ExpandedConv2d`` / ``LowPrecisionConv2d``
on the GPU through the ``cuda`` epilogue kernel against the reference composition.
Skipped where no GPU is visible or ``expcuda._C`` was built without the CUDA kernel.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from expcuda import use_backend
from expcuda import registry
from expcuda.nn import LowPrecisionConv2d, epilogue
from tests.test_block import GEOMETRY, QUANT, inputs, make
from tests.test_block_support import assert_close_to, rel_err

REASON = epilogue.kernel_unavailable("cuda")
pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA epilogue needs a CUDA GPU"),
    pytest.mark.skipif(REASON is not None, reason=f"CUDA epilogue unavailable: {REASON}"),
]

DEV = "cuda"
EPS = 1e-5


@pytest.fixture(autouse=True)
def _no_tf32():
    """TF32 convolutions would round z differently in the stacked and the separate convolutions;
    deterministic cuDNN algorithms make two runs of one block comparable bit for bit."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    old = cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic
    cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic = False, False, True
    yield
    cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic = old


# --------------------------------------------------------------------------- op level

def op_args(scheme=2, combine="add", a_quant="dorefa", a_bits=2, phi="clip", psi="identity",
            fp=True, shape=(3, 6, 5, 7), dtype=torch.float32, seed=0):
    """Arguments of block_epilogue (names, not codes); shape[1] is c_lp."""
    n, c_lp, h, w = shape
    c = c_lp + (0 if not fp else (4 if combine == "concat" else c_lp))
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, c, h, w, generator=g) * 2 + 0.5).to(DEV, dtype)
    weight = (torch.rand(c, generator=g) + 0.5).to(DEV)
    bias = (torch.rand(c, generator=g) * 0.6 - 0.3).to(DEV)
    f = torch.tensor(0.6, device=DEV)
    step = torch.tensor(0.3, device=DEV) if a_quant == "lsq" else None
    return [z, weight, bias, f, step, c_lp, EPS, scheme, combine, a_quant, a_bits, phi, psi]


def codes(args):
    """The op's argument list with the names turned into the integer codes of the schema."""
    *head, combine, a_quant, a_bits, phi, psi = args
    return head + [epilogue.COMBINES[combine], epilogue.A_QUANT_CODES[a_quant], a_bits,
                   epilogue.PHI_CODES[phi], epilogue.PHI_CODES[psi]]


def cuda_fwd(args):
    return torch.ops.expcuda_C.block_epilogue_fwd(*codes(args))


def cuda_bwd(grad, args, mean, var):
    z, weight, bias, f, step, *rest = codes(args)
    return torch.ops.expcuda_C.block_epilogue_bwd(grad, z, weight, bias, f, step, mean, var, *rest)


def torch_bwd(grad, args, mean, var):
    z, weight, bias, f, step, *rest = args
    return epilogue.epilogue_bwd_torch(grad, z, weight, bias, f, step, mean, var, *rest)


def to_cpu(args):
    return [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]


def assert_mostly_equal(got, want, tol, what, max_frac=2e-3):
    """Equal within tol, except at a few elements where a last-bit difference in the batch
    statistics moves a value across a quantizer's rounding boundary."""
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, got.dtype, want.dtype)
    bad = ~torch.isclose(got.float(), want.float(), rtol=tol, atol=tol, equal_nan=True)
    allowed = max(1, int(max_frac * bad.numel()))
    assert int(bad.sum()) <= allowed, f"{what}: {int(bad.sum())} of {bad.numel()} elements differ"


def assert_rel(got, want, tol, what):
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, got.dtype, want.dtype)
    if want.abs().max() == 0:
        assert got.abs().max() == 0, what
        return
    err = rel_err(got.float(), want.float())
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


PAIRS = (("clip", "identity"), ("relu", "relu"), ("identity", "clip"))
CASES = [dict(scheme=s, combine=cb, a_quant=aq, phi=p, psi=q)
         for s, cb, aq, (p, q) in itertools.product((1, 2), ("add", "sub", "concat"),
                                                     ("none", "dorefa", "sign", "lsq"), PAIRS)]
CASES += [dict(fp=False, a_quant=aq, phi=p) for aq in ("none", "dorefa", "sign", "lsq")
          for p in ("identity", "relu", "clip")]
CASES += [dict(a_bits=32), dict(a_bits=1), dict(a_bits=4, combine="sub", scheme=1),
          dict(a_quant="lsq", a_bits=3, combine="concat", scheme=1)]


def case_id(case):
    return ",".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_matches_reference(case):
    args = op_args(**case)
    out, mean, var = cuda_fwd(args)
    ref_out, ref_mean, ref_var = epilogue.epilogue_fwd_torch(*args)
    assert out.device == args[0].device and out.is_contiguous()
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, ref_var, rtol=1e-5, atol=1e-6)
    assert_mostly_equal(out, ref_out, 1e-5, "out")
    if epilogue.kernel_unavailable("cpp") is None:  # the C++ CPU kernel on the same z
        cpu_out, cpu_mean, cpu_var = torch.ops.expcuda_C.block_epilogue_fwd(*codes(to_cpu(args)))
        torch.testing.assert_close(mean.cpu(), cpu_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var.cpu(), cpu_var, rtol=1e-5, atol=1e-6)
        assert_mostly_equal(out.cpu(), cpu_out, 1e-5, "out vs cpp")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_backward_matches_reference(case):
    args = op_args(**case)
    var, mean = torch.var_mean(args[0], dim=(0, 2, 3), correction=0)
    out = epilogue.epilogue_fwd_torch(*args)[0]
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEV)
    got = cuda_bwd(grad, args, mean, var)
    want = torch_bwd(grad, args, mean, var)
    for name, g, w in zip(("dz", "dweight", "dbias", "dstep"), got, want):
        assert g.device == args[0].device, name
        assert_rel(g, w, 1e-4, name)
    if epilogue.kernel_unavailable("cpp") is None:
        cz, cw, cb, cf, cstep, *rest = to_cpu(codes(args))
        cpu = torch.ops.expcuda_C.block_epilogue_bwd(grad.cpu(), cz, cw, cb, cf, cstep, mean.cpu(),
                                                     var.cpu(), *rest)
        for name, g, w in zip(("dz", "dweight", "dbias", "dstep"), got, cpu):
            assert_rel(g.cpu(), w, 1e-5, f"{name} vs cpp")


@pytest.mark.parametrize("grad_cl", [True, False], ids=["grad-channels_last", "grad-nchw"])
@pytest.mark.parametrize("case", CASES[::5] + [dict(fp=False, a_quant="lsq", phi="relu")], ids=case_id)
def test_channels_last_in_place(case, grad_cl):
    """A channels_last z is indexed as it is: the output and dz come back channels_last, equal to
    the reference on the same values (and to the NCHW run)."""
    args = op_args(shape=(3, 6, 5, 7), **case)
    cl = args[0].contiguous(memory_format=torch.channels_last)
    args_cl = [cl] + args[1:]
    out, mean, var = cuda_fwd(args_cl)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    ref_out, ref_mean, ref_var = epilogue.epilogue_fwd_torch(*args)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, ref_var, rtol=1e-5, atol=1e-6)
    assert_mostly_equal(out.contiguous(), ref_out, 1e-5, "out")
    nchw_out = cuda_fwd(args)[0]
    assert_mostly_equal(out.contiguous(), nchw_out, 1e-6, "out vs the NCHW run")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEV)
    if grad_cl:
        grad = grad.contiguous(memory_format=torch.channels_last)
    got = cuda_bwd(grad, args_cl, mean, var)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for name, g, w in zip(("dz", "dweight", "dbias", "dstep"), got, torch_bwd(grad.contiguous(), args, mean, var)):
        assert_rel(g.contiguous(), w, 1e-4, name)


SHAPES = [(1, 1, 1, 1), (2, 3, 1, 9), (16, 32, 18, 18), (128, 16, 18, 18), (4, 8, 33, 31)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", [dict(), dict(scheme=1, combine="concat", a_quant="lsq", psi="relu"),
                                  dict(combine="sub", a_quant="sign", phi="identity")], ids=case_id)
def test_shapes(shape, case):
    """One element per channel, rows shorter than a warp, several partial-sum slices per channel."""
    args = op_args(shape=shape, **case)
    out, mean, var = cuda_fwd(args)
    ref_out, ref_mean, ref_var = epilogue.epilogue_fwd_torch(*args)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, ref_var, rtol=1e-4, atol=1e-5)
    assert_mostly_equal(out, ref_out, 1e-4, "out")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEV)
    for name, g, w in zip(("dz", "dweight", "dbias", "dstep"), cuda_bwd(grad, args, mean, var),
                          torch_bwd(grad, args, mean, var)):
        assert_rel(g, w, 1e-4, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [dict(), dict(scheme=1, combine="concat", a_quant="lsq"),
                                  dict(combine="sub", a_quant="sign", psi="relu")], ids=case_id)
def test_half_precision_storage(dtype, case):
    """float16/bfloat16 z: float32 inside, like the reference (which also casts to float32)."""
    args = op_args(dtype=dtype, shape=(4, 6, 8, 8), **case)
    out, mean, var = cuda_fwd(args)
    ref_out, ref_mean, ref_var = epilogue.epilogue_fwd_torch(*args)
    assert out.dtype == dtype and mean.dtype == torch.float32 and var.dtype == torch.float32
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, ref_var, rtol=1e-5, atol=1e-6)
    assert_mostly_equal(out, ref_out, torch.finfo(dtype).eps, "out")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(DEV, dtype)
    got = cuda_bwd(grad, args, ref_mean, ref_var)
    want = torch_bwd(grad, args, ref_mean, ref_var)
    assert got[0].dtype == dtype
    for name, g, w in zip(("dz", "dweight", "dbias", "dstep"), got, want):
        assert_rel(g, w, 4 * torch.finfo(dtype).eps, name)


def test_deterministic():
    args = op_args(shape=(64, 16, 12, 12), scheme=1, combine="add", a_quant="lsq")
    a, b = cuda_fwd(args), cuda_fwd(args)
    grad = torch.randn(a[0].shape, device=DEV)
    da, db = cuda_bwd(grad, args, a[1], a[2]), cuda_bwd(grad, args, a[1], a[2])
    for x, y in zip(a + da, b + db):
        assert torch.equal(x, y)


def test_runs_on_the_current_stream():
    """z is written on a side stream behind a long sleep: the op must queue behind it there."""
    args = op_args(shape=(32, 16, 16, 16), combine="concat", a_quant="lsq")
    want = cuda_fwd(args)
    grad = torch.randn(want[0].shape, device=DEV)
    want_bwd = cuda_bwd(grad, args, want[1], want[2])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        z = args[0] * 1.0  # written only after the sleep
        got = cuda_fwd([z] + args[1:])
        got_bwd = cuda_bwd(grad, [z] + args[1:], got[1], got[2])
    side.synchronize()
    for x, y in zip(got + got_bwd, want + want_bwd):
        assert torch.equal(x, y)


def test_cpu_scalars_and_empty_batch():
    args = op_args()
    args[3] = torch.tensor(0.6)  # f as a CPU scalar
    want = cuda_fwd(op_args())
    got = cuda_fwd(args)
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    empty = op_args(shape=(0, 6, 5, 7))
    out, mean, var = cuda_fwd(empty)
    assert out.shape == (0, 6, 5, 7) and torch.isnan(mean).all() and torch.isnan(var).all()
    dz, dw, db, ds = cuda_bwd(torch.empty_like(out), empty, torch.zeros_like(mean), torch.ones_like(var))
    assert dz.shape == empty[0].shape and torch.count_nonzero(dw) == 0 and torch.count_nonzero(db) == 0


@pytest.mark.parametrize("change,match", [
    (dict(c_lp=0), "c_lp"), (dict(c_lp=13), "c_lp"), (dict(scheme=3), "scheme"),
    (dict(combine=5), "combine"), (dict(a_quant=9), "a_quant"), (dict(phi=3), "phi"),
    (dict(psi=-1), "psi"), (dict(a_bits=0), "a_bits"), (dict(c_lp=5), "add/sub"),
    (dict(weight="short"), ": weight must have"), (dict(bias="cpu"), ": bias must be a CUDA"),
    (dict(step=None, a_quant=3), "needs its step"),
    (dict(z="double"), "z must be float32"), (dict(z="3d"), "z must be"), (dict(f="two"), ": f must have one element"),
])
def test_bad_arguments(change, match):
    z, weight, bias, f, step, c_lp, eps, scheme, combine, a_quant, a_bits, phi, psi = codes(op_args())
    kw = dict(z=z, weight=weight, bias=bias, f=f, step=step, c_lp=c_lp, eps=eps, scheme=scheme,
              combine=combine, a_quant=a_quant, a_bits=a_bits, phi=phi, psi=psi)
    kw.update(change)
    special = {("weight", "short"): weight[:-1], ("bias", "cpu"): bias.cpu(),
               ("z", "double"): z.double(), ("z", "3d"): z[0], ("f", "two"): torch.ones(2, device=DEV)}
    for key, value in change.items():
        if isinstance(value, str):
            kw[key] = special[(key, value)]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.expcuda_C.block_epilogue_fwd(*kw.values())


def test_bad_backward_arguments():
    args = op_args()
    out, mean, var = cuda_fwd(args)
    with pytest.raises(RuntimeError, match="grad"):
        cuda_bwd(out[:, :3], args, mean, var)
    with pytest.raises(RuntimeError, match="grad"):
        cuda_bwd(out.half(), args, mean, var)
    with pytest.raises(RuntimeError, match="mean"):
        cuda_bwd(out, args, mean[:3], var)
    with pytest.raises(RuntimeError, match="var"):
        cuda_bwd(out, args, mean, var.cpu())


# --------------------------------------------------------------------------- block level

def run_step(block, x, mode=None, kernel=None, reverse=False):
    """Output, input gradient, parameter gradients and BN buffers after one step on x's device.

    reverse: the batch reversed and the results put back, so that the rounding differs.
    """
    block.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    perm = torch.arange(x.shape[0] - 1, -1, -1, device=x.device) if reverse else None
    xx = (x[perm] if reverse else x).detach().clone().requires_grad_(True)
    ctx = use_backend("reference") if mode == "reference" else contextlib.nullcontext()
    kctx = epilogue.use_kernel(kernel) if kernel else contextlib.nullcontext()
    with ctx, kctx:
        y = block(xx)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, y.dtype)
        y.backward(g[perm] if reverse else g)
    result = {"out": y.detach()[perm] if reverse else y.detach(),
              "x.grad": xx.grad[perm] if reverse else xx.grad}
    for name, p in block.named_parameters():
        result[f"{name}.grad"] = p.grad
    if not reverse:
        for name, b in block.named_buffers():
            if "running" in name:
                result[name] = b.detach().clone()
    block.load_state_dict(before)
    return result


def check_block_cuda(block, x, factor=4.0):
    block, x = block.to(DEV), x.to(DEV)
    truth = run_step(block, x, mode="reference")
    noise = run_step(block, x, mode="reference", reverse=True)
    noise.update({k: v for k, v in truth.items() if "running" in k})
    got = run_step(block, x, kernel="cuda")
    assert_close_to(got, truth, noise, factor=factor, floor=64 * torch.finfo(x.dtype).eps, what="cuda")


@pytest.mark.parametrize("scheme,combine,a_quant,w_quant", QUANT)
def test_block_matches_reference(scheme, combine, a_quant, w_quant):
    block = make(scheme=scheme, combine=combine, a_quant=a_quant, w_quant=w_quant,
                 fp_ratio=0.5 if combine == "concat" else 1.0).train()
    check_block_cuda(block, inputs())


@pytest.mark.parametrize("opts", GEOMETRY, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_block_geometry(opts):
    check_block_cuda(make(**opts).train(), inputs())


@pytest.mark.parametrize("a_quant,extra", [("dorefa", {}), ("lsq", {}), ("sign", {}),
                                           ("none", {"activation": False})])
def test_plain_block_matches_reference(a_quant, extra):
    torch.manual_seed(0)
    block = LowPrecisionConv2d(4, 6, 3, padding=1, a_quant=a_quant, **extra).train()
    with torch.no_grad():
        block.lp_bn.weight.uniform_(0.5, 1.5)
        block.lp_bn.bias.uniform_(-0.3, 0.3)
    check_block_cuda(block, inputs())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opts", [dict(), dict(scheme=1, combine="concat", fp_ratio=0.5),
                                  dict(a_quant="lsq", w_quant="xnor", combine="sub")])
def test_block_low_precision_dtypes(dtype, opts):
    """At bf16/fp16 the cuda kernel's error vs the fp32 reference stays within the reference's own."""
    x = inputs(shape=(8, 4, 8, 8)).to(DEV)
    truth = run_step(make(**opts).train().to(DEV), x, mode="reference")
    block_lp = make(**opts).train().to(DEV, dtype)
    base = run_step(block_lp, x.to(dtype), mode="reference")
    got = run_step(block_lp, x.to(dtype), kernel="cuda")
    cast = lambda d: {k: (v.float() if v is not None else None) for k, v in d.items()}  # noqa: E731
    assert_close_to(cast(got), cast(truth), cast(base), factor=2.0, floor=0.01, what=str(dtype),
                    pooled=True)


def test_cuda_backend_picks_the_cuda_kernel():
    z = torch.randn(2, 6, 3, 3, device=DEV)
    with use_backend("cuda"):
        assert registry.dispatch("block_epilogue_fwd", z).backend == "cuda"
        assert registry.dispatch("block_epilogue_bwd", z).backend == "cuda"
    with use_backend("reference"):
        assert registry.dispatch("block_epilogue_fwd", z).fn is epilogue.epilogue_fwd_torch
        assert registry.dispatch("block_epilogue_bwd", z).fn is epilogue.epilogue_bwd_torch
    # the default choice on the GPU is the cuda backend, so the same numbers as the forced kernel
    block = make(combine="concat", fp_ratio=0.5, a_quant="lsq").train().to(DEV)
    x = inputs().to(DEV)
    forced, default = run_step(block, x, kernel="cuda"), run_step(block, x)
    for key, value in forced.items():
        assert torch.equal(value, default[key]), key


def test_opcheck_cuda():
    torch.manual_seed(0)
    z = torch.randn(2, 6, 3, 3, device=DEV, requires_grad=True)
    w = torch.rand(6, device=DEV, requires_grad=True)
    b = torch.randn(6, device=DEV, requires_grad=True)
    step_ = torch.tensor(0.3, device=DEV, requires_grad=True)
    with epilogue.use_kernel("cuda"):
        for args in ((3, 1e-5, 2, "add", "dorefa", 2, "clip", "identity"),
                     (4, 1e-5, 1, "concat", "lsq", 2, "relu", "relu")):
            torch.library.opcheck(epilogue.block_epilogue_op,
                                  (z, w, b, torch.tensor(0.5, device=DEV),
                                   step_ if args[4] == "lsq" else None) + args)
