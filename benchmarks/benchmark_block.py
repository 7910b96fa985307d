"""Training step (forward + backward) of one block on the SVHN-net layer shapes, side by side.

    PYTHONPATH=. python -m pytest benchmarks/benchmark_block.py --benchmark-group-by=group \
        --benchmark-columns=min,median,mean,rounds

Per shape (batch 128, 3x3 convolution, padding 1): the expanded block's fused
path, the naive reference composition of the same block, the folded block,
the plain low-precision block, a full-precision Conv-BN-ReLU block, and the
bare convolutions (the LP and FP convolutions with their input and weight
gradients: the floor no block beats without skipping FLOPs).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from expcuda import use_backend
from expcuda.nn import ExpandedConv2d, LowPrecisionConv2d

SHAPES = {"svhn-0.25x": (16, 18), "svhn-1x": (64, 18)}
BATCH = 128


def _block(kind, c):
    torch.manual_seed(0)
    if kind in ("expanded-fused", "expanded-reference"):
        b = ExpandedConv2d(c, c, 3, padding=1)
    elif kind == "expanded-fold":
        b = ExpandedConv2d(c, c, 3, padding=1, scheme=1, fold=True)
    elif kind == "lp-block":
        return LowPrecisionConv2d(c, c, 3, padding=1).train()
    else:
        return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                             nn.ReLU()).train()
    b.set_f(0.5)
    return b.train()


KINDS = ["expanded-fused", "expanded-reference", "expanded-fold", "lp-block", "fp-conv-bn-relu",
         "bare-two-convs", "bare-one-conv"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_block_training_step(benchmark, shape, kind):
    c, hw = SHAPES[shape]
    x = torch.rand(BATCH, c, hw, hw, requires_grad=True)
    grad = torch.randn(BATCH, c, hw, hw)
    benchmark.group = shape
    if kind.startswith("bare"):
        n = 2 if kind == "bare-two-convs" else 1
        ws = [torch.randn(c, c, 3, 3, requires_grad=True) for _ in range(n)]

        def run():
            ys = [F.conv2d(x, w, padding=1) for w in ws]
            torch.autograd.backward(ys, [grad] * n)
    else:
        block = _block(kind, c)
        reference = kind == "expanded-reference"

        def run():
            with use_backend("reference") if reference else contextlib.nullcontext():
                y = block(x)
                y.backward(grad)
    run()  # warm up: allocator, kernel choices
    benchmark.pedantic(run, rounds=15 if c <= 16 else 8, warmup_rounds=2, iterations=1)
    assert x.grad is not None and torch.isfinite(x.grad).all()
