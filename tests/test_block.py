"""ExpandedConv2d and LowPrecisionConv2d: every fused kernel against the reference composition."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from tests.test_block_support import KERNELS, assert_close_to, kernel_params, step
from expcuda import use_backend
from expcuda.nn import ExpandedConv2d, LowPrecisionConv2d, epilogue

SHAPE = (4, 4, 6, 6)


def make(seed=0, **kw):
    torch.manual_seed(seed)
    opts = dict(in_channels=4, out_channels=6, kernel_size=3, padding=1)
    opts.update(kw)
    block = ExpandedConv2d(**opts)
    with torch.no_grad():  # BN affine parameters away from their 1/0 defaults
        for bn in (block.lp_bn, block.fp_bn):
            if bn is not None:
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.3, 0.3)
    block.set_f(0.6)
    return block


def inputs(seed=0, dtype=torch.float32, shape=SHAPE):
    g = torch.Generator().manual_seed(seed + 100)
    return torch.rand(shape, generator=g).to(dtype)


def permuted_reference(block, x):
    """The reference with the batch reversed and the results put back: its rounding differs."""
    perm = torch.arange(x.shape[0] - 1, -1, -1)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    res = {}
    block.zero_grad(set_to_none=True)
    xp = x[perm].detach().clone().requires_grad_(True)
    with use_backend("reference"):
        y = block(xp)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype).to(y.device)
        y.backward(g[perm])
    res["out"] = y.detach()[perm]
    res["x.grad"] = xp.grad[perm]
    for name, p in block.named_parameters():
        res[f"{name}.grad"] = p.grad
    block.load_state_dict(before)
    return res


def check_block(block, x, kernel, factor=4.0):
    truth = step(block, x, mode="reference")
    noise = permuted_reference(block, x)
    noise.update({k: v for k, v in truth.items() if "running" in k})
    got = step(block, x, kernel=kernel)
    assert_close_to(got, truth, noise, factor=factor, floor=64 * torch.finfo(x.dtype).eps, what=kernel)


QUANT = list(itertools.product((1, 2), ("add", "sub", "concat"), ("dorefa", "sign", "lsq", "none"),
                               ("dorefa", "xnor", "syq", "lsq")))


@pytest.mark.parametrize("kernel", kernel_params("torch", "cpp"))
@pytest.mark.parametrize("scheme,combine,a_quant,w_quant", QUANT)
def test_fused_matches_reference(kernel, scheme, combine, a_quant, w_quant):
    block = make(scheme=scheme, combine=combine, a_quant=a_quant, w_quant=w_quant,
                 fp_ratio=0.5 if combine == "concat" else 1.0).train()
    check_block(block, inputs(), kernel)


@pytest.mark.parametrize("kernel", kernel_params("torch", "cpp"))
@pytest.mark.parametrize("a_quant,w_quant,extra", [
    ("dorefa", "dorefa", {}), ("sign", "xnor", {}), ("lsq", "syq", {}), ("none", "lsq", {}),
    ("none", "dorefa", {"activation": False}), ("dorefa", "dorefa", {"a_bits": 32}),
    ("dorefa", "dorefa", {"pool": nn.MaxPool2d(2), "stride": 2}),
])
def test_plain_block_fused_matches_reference(kernel, a_quant, w_quant, extra):
    """The plain LP block (and the expanded block at f == 0) through the fused LP epilogue."""
    torch.manual_seed(0)
    block = LowPrecisionConv2d(4, 6, 3, padding=1, a_quant=a_quant, w_quant=w_quant, **extra).train()
    with torch.no_grad():
        block.lp_bn.weight.uniform_(0.5, 1.5)
        block.lp_bn.bias.uniform_(-0.3, 0.3)
    check_block(block, inputs(), kernel)


GEOMETRY = [
    dict(stride=2),
    dict(padding=0),
    dict(dilation=2, padding=2),
    dict(groups=2),
    dict(groups=2, combine="concat", fp_ratio=1 / 3),
    dict(pool=nn.MaxPool2d(2)),
    dict(pool=nn.AvgPool2d(2), scheme=1, combine="concat", fp_ratio=1.5),
    dict(fp_activation="relu"),
    dict(fp_activation="clip", scheme=1),
    dict(a_bits=32),
    dict(a_bits=1, w_bits=1),
    dict(a_bits=4, w_bits=4, combine="sub"),
    dict(kernel_size=1, padding=0, combine="concat", fp_ratio=0.25),
    dict(w_quant="syq", w_bits=2, w_granularity="row"),
    dict(activation=False, a_quant="none"),
]


@pytest.mark.parametrize("kernel", kernel_params("torch", "cpp"))
@pytest.mark.parametrize("opts", GEOMETRY, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_fused_geometry(kernel, opts):
    check_block(make(**opts).train(), inputs(), kernel)


CHANNELS_LAST = [
    dict(), dict(combine="sub", fp_activation="relu"), dict(out_channels=11), dict(expand=False),
    dict(a_quant="sign", w_quant="xnor"), dict(pool=nn.MaxPool2d(2)),
    dict(combine="concat", fp_ratio=0.5), dict(a_quant="lsq", scheme=1),
]


@pytest.mark.parametrize("kernel", kernel_params("torch", "cpp"))
@pytest.mark.parametrize("opts", CHANNELS_LAST, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_channels_last_input(kernel, opts):
    """A channels_last activation stays channels_last, output and input gradient, and is right."""
    block = make(**opts).train()
    x = inputs(shape=(3, 4, 7, 9)).to(memory_format=torch.channels_last)
    check_block(block, x, kernel)
    got = step(block, x, kernel=kernel)
    assert got["out"].is_contiguous(memory_format=torch.channels_last)
    assert got["x.grad"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif("cpp" not in KERNELS, reason="expcuda._C was not built with the C++ epilogue")
@pytest.mark.parametrize("args", [(24, 1e-5, 2, "add", "none", 2, "relu", "identity"),
                                  (24, 1e-5, 2, "sub", "none", 2, "identity", "relu"),
                                  (13, 1e-5, 2, "add", "none", 2, "identity", "clip"),
                                  (26, 1e-5, 2, "add", "none", 2, "relu", "identity")])
def test_cpp_channels_last_many_blocks(args):
    """Larger shapes than the block tests: many pixel blocks (and threads) in the channels_last
    kernel, channel tails, the LP-only case; continuous outputs, so the NCHW kernel on the
    same z must agree to rounding, forward and backward."""
    from expcuda._backends import compiled as cpp_epilogue
    g = torch.Generator().manual_seed(4)
    c_tot = 26 if args[0] in (13, 26) else 48
    z = (torch.randn(16, c_tot, 9, 11, generator=g) * 2 + 1)
    w, b = torch.rand(c_tot, generator=g) + 0.5, torch.randn(c_tot, generator=g)
    f = torch.tensor(0.7)
    zc = z.to(memory_format=torch.channels_last)
    got = cpp_epilogue.block_epilogue_fwd(zc, w, b, f, None, *args)
    want = cpp_epilogue.block_epilogue_fwd(z, w, b, f, None, *args)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    grad = torch.randn(want[0].shape, generator=g)
    got_b = cpp_epilogue.block_epilogue_bwd(grad.to(memory_format=torch.channels_last), zc, w, b, f, None,
                                  want[1], want[2], *args)
    want_b = cpp_epilogue.block_epilogue_bwd(grad, z, w, b, f, None, want[1], want[2], *args)
    assert got_b[0].is_contiguous(memory_format=torch.channels_last)
    for a, e in zip(got_b, want_b):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opts", [dict(), dict(scheme=1, combine="concat", fp_ratio=0.5),
                                  dict(a_quant="lsq", w_quant="xnor", combine="sub")])
@pytest.mark.parametrize("kernel", kernel_params("torch", "cpp"))
def test_fused_low_precision_dtypes(kernel, dtype, opts):
    """At bf16/fp16 the fused path's error vs the fp32 reference stays within the reference's own
    (the C++ CPU kernel computes on a float32 copy of z)."""
    block = make(**opts).train()
    x = inputs(shape=(8, 4, 8, 8))  # more elements: quantization flips average out
    truth = step(block, x, mode="reference")
    block_lp = make(**opts).train().to(dtype)
    base = step(block_lp, x.to(dtype), mode="reference")
    got = step(block_lp, x.to(dtype), kernel=kernel)
    assert got["out"].dtype == dtype and got["x.grad"].dtype == dtype
    cast = lambda d: {k: (v.float() if v is not None else None) for k, v in d.items()}  # noqa: E731
    assert_close_to(cast(got), cast(truth), cast(base), factor=2.0, floor=0.01, what=str(dtype),
                    pooled=True)


@pytest.mark.triton
@pytest.mark.skipif("triton" not in KERNELS, reason="triton epilogue needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("opts", [dict(), dict(scheme=1, combine="concat", fp_ratio=0.5, a_quant="lsq"),
                                  dict(combine="sub", a_quant="sign", fp_activation="relu")])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_triton_epilogue(opts, fmt):
    block = make(**opts).train()
    x = inputs(shape=(2, 4, 4, 3)).to(memory_format=fmt)
    check_block(block, x, "triton")
    if fmt == torch.channels_last:  # the kernels index channels_last in place: the layout stays
        got = step(block, x, kernel="triton")
        assert got["out"].is_contiguous(memory_format=fmt)
        assert got["x.grad"].is_contiguous(memory_format=fmt)


@pytest.mark.triton
@pytest.mark.skipif("triton" not in KERNELS, reason="triton epilogue needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("args", [(3, 1e-5, 2, "add", "dorefa", 2, "clip", "relu"),
                                  (4, 1e-5, 1, "concat", "lsq", 2, "relu", "identity")])
def test_triton_kernels_on_channels_last_z(args):
    """The Triton kernels on a channels_last z, called directly, against the PyTorch kernels."""
    from expcuda._backends import triton_epilogue
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 6, 3, 5, generator=g).to(memory_format=torch.channels_last)
    assert epilogue.layout(z) == torch.channels_last
    w, b = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    f, step_ = torch.tensor(0.4), torch.tensor(0.3) if args[4] == "lsq" else None
    out, mean, var = triton_epilogue.forward(z, w, b, f, step_, *args)
    ref = epilogue.epilogue_fwd_torch(z, w, b, f, step_, *args)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref[0])
    grad = torch.randn(out.shape, generator=g).to(memory_format=torch.channels_last)
    got = triton_epilogue.backward(grad, z, w, b, f, step_, mean, var, *args)
    want = epilogue.epilogue_bwd_torch(grad, z, w, b, f, step_, mean, var, *args)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


@pytest.mark.triton
@pytest.mark.skipif("triton" not in KERNELS, reason="triton epilogue needs a GPU or TRITON_INTERPRET=1")
def test_triton_epilogue_plain_block():
    torch.manual_seed(0)
    check_block(LowPrecisionConv2d(4, 6, 3, padding=1, a_quant="lsq").train(),
                inputs(shape=(2, 4, 4, 4)), "triton")


def test_f_zero_skips_fp_branch():
    block = make().train()
    block.set_f(0.0)
    res = step(block, inputs())
    assert res["fp_conv.weight.grad"] is None and res["fp_bn.weight.grad"] is None
    plain = LowPrecisionConv2d(4, 6, 3, padding=1)
    plain.load_state_dict({k: v for k, v in block.state_dict().items()
                           if not k.startswith(("fp_", "f"))})
    ref = step(plain, inputs())
    assert torch.equal(res["out"], ref["out"]) and torch.equal(res["x.grad"], ref["x.grad"])


def test_f_zero_concat_pads_zeros():
    block = make(combine="concat", fp_ratio=0.5).eval()
    block.set_f(0.0)
    y = block(inputs())
    assert y.shape[1] == 6 + 3 and torch.count_nonzero(y[:, 6:]) == 0


def test_expand_false_is_plain_block():
    block = make(expand=False).train()
    assert block.fp_conv is None
    plain = LowPrecisionConv2d(4, 6, 3, padding=1)
    plain.load_state_dict({k: v for k, v in block.state_dict().items() if k != "f"})
    a, b = step(block, inputs()), step(plain, inputs())
    for key in b:
        assert torch.equal(a[key], b[key]), key


def test_state_dict_round_trip():
    block = make(w_quant="lsq", a_quant="lsq", combine="concat", fp_ratio=0.5).train()
    block.set_f(0.25)
    step(block, inputs())
    state = block.state_dict()
    assert float(state["f"]) == 0.25
    other = make(seed=5, w_quant="lsq", a_quant="lsq", combine="concat", fp_ratio=0.5)
    other.load_state_dict(state)
    assert float(other.f) == 0.25 and not other.f_is_zero
    block.eval(), other.eval()
    assert torch.equal(block(inputs()), other(inputs()))
    block.set_f(0.0)
    other.load_state_dict(block.state_dict())
    assert other.f_is_zero


def test_learned_quantizer_parameters_train():
    block = make(w_quant="syq", a_quant="lsq").train()
    res = step(block, inputs())
    assert res["wq.scales.grad"].abs().sum() > 0 and res["aq.step.grad"].abs().sum() > 0


@pytest.mark.parametrize("kwargs,name", [
    (dict(w_quant="ternary"), "w_quant"), (dict(a_quant="relu"), "a_quant"),
    (dict(combine="mul"), "combine"), (dict(scheme=3), "scheme"),
    (dict(fp_ratio=0.0), "fp_ratio"), (dict(fp_ratio=-1.0, combine="concat"), "fp_ratio"),
    (dict(fp_ratio=0.5), "fp_ratio"), (dict(groups=4, out_channels=6), "groups"),
    (dict(groups=3), "groups"), (dict(fp_activation="tanh"), "fp_activation"),
    (dict(fold=True), "fold"), (dict(w_bits=9), "w_bits"), (dict(a_bits=0), "a_bits"),
    (dict(combine="concat", fp_ratio=0.25, groups=2, out_channels=4), "groups"),
])
def test_bad_arguments(kwargs, name):
    opts = dict(in_channels=4, out_channels=6, kernel_size=3)
    opts.update(kwargs)
    with pytest.raises(ValueError, match=name):
        ExpandedConv2d(**opts)


def test_bad_f_and_input():
    block = make()
    with pytest.raises(ValueError, match="f must be in"):
        block.set_f(1.5)
    with pytest.raises(ValueError, match="f must be in"):
        block.set_f(-0.1)
    with pytest.raises(ValueError, match=r"input must have shape \(N, 4, H, W\)"):
        block(torch.rand(2, 5, 6, 6))
    with pytest.raises(ValueError, match="input"):
        block(torch.rand(5, 6, 6))


def test_opcheck_epilogue():
    torch.manual_seed(0)
    z = torch.randn(2, 6, 3, 3, requires_grad=True)
    w = torch.rand(6, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    step_ = torch.tensor(0.3, requires_grad=True)
    z_cl = z.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    for args in ((3, 1e-5, 2, "add", "dorefa", 2, "clip", "identity"),
                 (4, 1e-5, 1, "concat", "lsq", 2, "relu", "relu")):
        for zz in (z, z_cl):
            torch.library.opcheck(epilogue.block_epilogue_op,
                                  (zz, w, b, torch.tensor(0.5), step_ if args[4] == "lsq" else None) + args)


def test_torch_compile_matches_eager():
    block = make(combine="concat", fp_ratio=0.5, a_quant="lsq").train()
    eager = step(block, inputs())
    compiled = torch.compile(block, backend="aot_eager")
    x = inputs().requires_grad_(True)
    y = compiled(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(y, eager["out"])
    torch.testing.assert_close(x.grad, eager["x.grad"])
    torch.testing.assert_close(block.aq.step.grad, eager["aq.step.grad"])


NO_EXTENSION = r"""
import sys
sys.modules["expcuda._C"] = None  # as if expcuda._C was never built
import torch
import expcuda
from expcuda.nn import epilogue
assert epilogue.kernel_unavailable("cpp") is not None
torch.manual_seed(0)
block = expcuda.ExpandedConv2d(4, 6, 3, padding=1, combine="concat", fp_ratio=0.5).train()
block.set_f(0.5)
x = torch.rand(2, 4, 5, 5, requires_grad=True)
y = block(x)
y.sum().backward()
with expcuda.use_backend("reference"):
    ref = block(x)
assert (y - ref).abs().max() < 1e-4, (y - ref).abs().max()
print("ok")
"""


def test_block_without_extension():
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", NO_EXTENSION], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize("kernel", kernel_params("torch", "cpp"))
def test_widened_input_fused_matches_reference(kernel):
    """A block fed by a concat block: extra input weights, quantized on their own."""
    block = make(combine="sub", w_quant="xnor")
    block.widen_input(3)
    assert block.lp_extra.shape == (6, 3, 3, 3) and block.fp_extra.shape == (6, 3, 3, 3)
    check_block(block.train(), inputs(shape=(4, 7, 6, 6)), kernel)


def test_widened_input_skipped_while_producer_f_is_zero():
    producer = make(combine="concat", fp_ratio=0.5)
    consumer = make(seed=1, in_channels=6)
    consumer.widen_input(producer.fp_channels, producer)
    x = inputs(shape=(2, 6 + 3, 6, 6))
    x[:, 6:] = 0  # what the producer outputs at f == 0
    producer.set_f(0.0)
    consumer.eval()
    plain = make(seed=1, in_channels=6).eval()
    plain.load_state_dict({k: v for k, v in consumer.state_dict().items() if "extra" not in k})
    assert torch.equal(consumer(x), plain(x[:, :6].contiguous()))
