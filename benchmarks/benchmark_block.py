"""Training step (forward + backward) of one block on the SVHN-net layer shapes, side by side.

    PYTHONPATH=. python -m pytest benchmarks/benchmark_block.py --benchmark-group-by=group \
        --benchmark-columns=min,median,mean,rounds

    python benchmarks/benchmark_block.py 30 channels_last   # rounds, layouts

On a shared machine the tests' sequential timings drift with the neighbours'
load; ``python benchmarks/benchmark_block.py [rounds]`` runs the same steps
interleaved, round after round, and prints each one's best and median time
and the ratios the targets are stated in, so every candidate sees the same
conditions.

Per shape (batch 128, 3x3 convolution, padding 1): the expanded block's fused
path, the naive reference composition of the same block, the folded block,
the plain low-precision block, a full-precision Conv-BN-ReLU block, and the
bare convolutions (the LP and FP convolutions with their input and weight
gradients: the floor no block beats without skipping FLOPs), also as one
convolution on the stacked weights, which is what the fused path runs.
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
#: activations' memory format: the svhn net on Fashion-MNIST runs channels_last end to end
#: (its 1-channel input is both layouts at once, and mkldnn then picks channels_last)
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


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
         "bare-two-convs", "bare-stacked-conv", "bare-one-conv"]


def make_step(shape, kind, layout="nchw", device="cpu", batch=BATCH):
    """(the training step as a no-argument callable, the input whose gradient it fills), on ``device``."""
    c, hw = SHAPES[shape]
    fmt = LAYOUTS[layout]
    x = torch.rand(batch, c, hw, hw, device=device).to(memory_format=fmt).requires_grad_(True)
    grad = torch.randn(batch, c, hw, hw, device=device).to(memory_format=fmt)
    if kind == "bare-stacked-conv":  # the two convolutions as one, on stacked weights
        w = torch.randn(2 * c, c, 3, 3, device=device, requires_grad=True)
        grad2 = torch.randn(batch, 2 * c, hw, hw, device=device).to(memory_format=fmt)

        def run():
            F.conv2d(x, w, padding=1).backward(grad2)
    elif kind.startswith("bare"):
        n = 2 if kind == "bare-two-convs" else 1
        ws = [torch.randn(c, c, 3, 3, device=device, requires_grad=True) for _ in range(n)]

        def run():
            ys = [F.conv2d(x, w, padding=1) for w in ws]
            torch.autograd.backward(ys, [grad] * n)
    else:
        block = _block(kind, c).to(device)
        reference = kind == "expanded-reference"

        def run():
            with use_backend("reference") if reference else contextlib.nullcontext():
                y = block(x)
                y.backward(grad)
    return run, x


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_block_training_step(benchmark, layout, shape, kind):
    run, x = make_step(shape, kind, layout)
    benchmark.group = f"{shape} {layout}"
    run()  # warm up: allocator, kernel choices
    benchmark.pedantic(run, rounds=15 if SHAPES[shape][0] <= 16 else 8, warmup_rounds=2, iterations=1)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def interleaved(rounds: int = 10, layouts=tuple(LAYOUTS)) -> None:
    """Best and median wall time and best CPU time of every step, measured round-robin, and the
    target ratios of the best times (the median shows how much the neighbours' load moved them)."""
    import statistics
    import time
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {BATCH}")
    for shape, layout in ((s, l) for l in layouts for s in SHAPES):
        steps = {kind: make_step(shape, kind, layout)[0] for kind in KINDS}
        walls = {k: [] for k in KINDS}
        cpu = {k: float("inf") for k in KINDS}
        for fn in steps.values():
            fn()
        for _ in range(rounds):
            for kind, fn in steps.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                walls[kind].append(time.perf_counter() - t0)
                cpu[kind] = min(cpu[kind], time.process_time() - c0)
        wall = {k: min(v) for k, v in walls.items()}
        median = {k: statistics.median(v) for k, v in walls.items()}
        print(f"\n{shape} {layout}: {rounds} rounds (ms)  best wall  median wall  best cpu")
        for kind in KINDS:
            print(f"  {kind:22s} {wall[kind] * 1e3:9.2f} {median[kind] * 1e3:12.2f} {cpu[kind] * 1e3:9.2f}")
        for a, b in (("expanded-reference", "expanded-fused"), ("expanded-fused", "bare-two-convs"),
                     ("expanded-fused", "bare-stacked-conv"), ("lp-block", "fp-conv-bn-relu"),
                     ("expanded-fold", "lp-block")):
            print(f"  {a} / {b}: best {wall[a] / wall[b]:.2f}x, median {median[a] / median[b]:.2f}x, "
                  f"cpu {cpu[a] / cpu[b]:.2f}x")


if __name__ == "__main__":
    import sys
    interleaved(int(sys.argv[1]) if len(sys.argv) > 1 else 10, tuple(sys.argv[2:]) or tuple(LAYOUTS))
