"""The blocks refuse what they cannot compute, at the call, with the argument named (issue 11)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expcuda.nn import ExpandedConv2d, LowPrecisionConv2d

BLOCKS = {
    "lp": lambda: LowPrecisionConv2d(3, 4, 3, padding=1),
    "exp-scheme2": lambda: ExpandedConv2d(3, 4, 3, padding=1),
    "exp-scheme1-concat": lambda: ExpandedConv2d(3, 4, 3, padding=1, scheme=1, combine="concat"),
    "exp-fold": lambda: ExpandedConv2d(3, 4, 3, padding=1, scheme=1, fold=True),
}
NOT_FLOAT = (torch.int64, torch.int32, torch.uint8, torch.bool, torch.float64, torch.complex64)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("dtype", NOT_FLOAT, ids=str)
@pytest.mark.parametrize("kind", BLOCKS)
def test_non_float32_16_bf16_inputs_are_a_type_error_in_every_mode(kind, dtype, mode):
    block = BLOCKS[kind]().train(mode == "train")
    x = (torch.rand(2, 3, 6, 6) * 4).to(dtype)
    with pytest.raises(TypeError, match=f"input must be a float32, float16 or bfloat16 tensor, got {dtype}"):
        block(x)


@pytest.mark.parametrize("kind", BLOCKS)
def test_float64_behaves_the_same_in_training_and_eval(kind):
    """float64 is refused alike, also when the block itself is float64 (the quantizers have no float64 kernels)."""
    for block in (BLOCKS[kind](), BLOCKS[kind]().double()):
        messages = []
        for mode in (True, False):
            with pytest.raises(TypeError) as caught:
                block.train(mode)(torch.randn(2, 3, 6, 6, dtype=torch.float64))
            messages.append(str(caught.value))
        assert messages[0] == messages[1]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("where", ["input", "module", "both"])
@pytest.mark.parametrize("kind", BLOCKS)
def test_meta_tensors_are_refused_by_name(kind, where, mode):
    block = BLOCKS[kind]()
    if where != "input":
        block = block.to("meta")
    x = torch.randn(2, 3, 6, 6, device="meta" if where != "module" else "cpu")
    with pytest.raises(NotImplementedError, match="meta device"):
        block.train(mode == "train")(x)


BAD_ARGS = [dict(kernel_size=0), dict(kernel_size=(3, 0)), dict(kernel_size=-1), dict(stride=0),
            dict(stride=(1, -2)), dict(dilation=0), dict(padding=-1), dict(padding=(0, -1)),
            dict(kernel_size=2.5), dict(bn_eps=0.0), dict(bn_eps=float("nan")), dict(bn_momentum=1.5),
            dict(w_quant="xnor", w_bits=3), dict(w_quant="xnor", w_bits=8), dict(a_quant="sign", a_bits=4)]


@pytest.mark.parametrize("cls", [LowPrecisionConv2d, ExpandedConv2d])
@pytest.mark.parametrize("args", BAD_ARGS, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
def test_invalid_constructor_arguments_are_refused_at_the_call(cls, args):
    options = {"kernel_size": 3, **args}
    kernel = options.pop("kernel_size")
    name = next(iter(args)) if "quant" not in next(iter(args)) else list(args)[1]
    with pytest.raises(ValueError, match=name):
        cls(3, 4, kernel, **options)


@pytest.mark.parametrize("value", [True, False, "0.5", None, [0.5], torch.tensor([True]), 1j],
                         ids=lambda v: repr(v))
def test_set_f_refuses_what_is_not_a_number(value):
    block = ExpandedConv2d(3, 4, 3)
    with pytest.raises(TypeError, match="f must be a number in"):
        block.set_f(value)
    assert float(block.f) == 1.0 and not block.f_is_zero


@pytest.mark.parametrize("value, expected", [(0.5, 0.5), (0, 0.0), (1, 1.0), (np.float32(0.25), 0.25),
                                             (torch.tensor(0.75), 0.75)])
def test_set_f_takes_real_numbers(value, expected):
    block = ExpandedConv2d(3, 4, 3)
    block.set_f(value)
    assert float(block.f) == expected and block.f_is_zero == (expected == 0.0)
