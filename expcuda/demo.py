"""``python -m expcuda.demo``: quantize one tensor with every backend; print agreement and speed."""

from __future__ import annotations

import argparse
import time

import torch

import expcuda
from expcuda import backends
from expcuda import quant as Q

OPS = {
    "dorefa_activation(2)": lambda x: Q.dorefa_activation(x, 2),
    "sign_activation": Q.sign_activation,
    "lsq(4, signed)": lambda x: Q.lsq(x, torch.tensor(0.05, device=x.device), 4, True),
    "dorefa_weight(2)": lambda x: Q.dorefa_weight(x, 2),
    "xnor_weight": Q.xnor_weight,
}


def step(op, x, grad):
    """One forward + backward; returns the output and the input's gradient."""
    leaf = x.detach().requires_grad_(True)
    out = op(leaf)
    out.backward(grad)
    return out.detach(), leaf.grad


def timed(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="128,32,18,18", help="tensor shape, comma separated")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    x = torch.randn(shape)
    grad = torch.randn(shape)
    ready = [n for n, why in backends.report().items()
             if why is None and backends.why_not(n, x.device, x.dtype) is None]
    print(f"tensor {shape} float32 on CPU; backends that serve it: {', '.join(ready)}")
    print(f"{'op':<22}{'backend':<11}{'bit-equal to reference':<24}{'fwd+bwd ms':>10}")
    for name, op in OPS.items():
        with expcuda.use_backend("reference"):
            ref_out, ref_grad = step(op, x, grad)
        for backend in ready:
            with expcuda.use_backend(backend):
                out, g = step(op, x, grad)
                ms = 1e3 * timed(lambda: step(op, x, grad), args.repeats)
            same = torch.equal(out, ref_out) and torch.equal(g, ref_grad)
            print(f"{name:<22}{backend:<11}{'yes' if same else 'NO':<24}{ms:>10.3f}")


if __name__ == "__main__":
    main()
