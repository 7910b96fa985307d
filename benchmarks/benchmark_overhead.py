"""Per-call overhead of the public ops, side by side in one run (issue 10's targets).

    OMP_NUM_THREADS=1 python benchmarks/benchmark_overhead.py [ROUNDS]

Interleaved rounds of: DoReFa activation (2 bits) forward + backward through
``expcuda.quant.dorefa_activation`` (``op``: on the CPU its C++ autograd op, called through
the ``expcuda._C`` binding) and through the custom op's Python autograd.Function
(``op_python``: the same kernels, the path before the C++ op), against the memory-traffic
floor (``x.clone(); g.clone()``) on 128x32x18x18 float32, and the same op on a 1,000-element
tensor against ``torch.relu`` forward + backward. Prints the median and best time of each,
the page faults per call, and the ratios (targets: 1.5x the floor, 2x relu).

Page faults matter on the large tensor: when glibc has handed the freed heap back to the
kernel, the next call's output pages fault in one by one (the kernel zeroes each), which
costs about one more pass over the tensor.  Each call starts with ``x.grad = None``, so
backward stores its gradient instead of adding it to the previous call's.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch

from expcuda import quant as Q
from expcuda._custom import apply
from expcuda.quant.kinds import dorefa


def cases(shape):
    x = torch.rand(shape, requires_grad=True)
    g = torch.rand(shape)

    # x.grad = None: the gradient is stored, not added to the last call's (an accumulation would
    # be one more pass over memory that belongs to autograd's leaf, not to the op)
    def op():
        x.grad = None
        Q.dorefa_activation(x, 2).backward(g)

    def op_python():  # the custom op's eager path: a Python autograd.Function around the same kernels
        x.grad = None
        apply(dorefa.dorefa_activation_op, x, 2)[0].backward(g)

    def relu():
        x.grad = None
        torch.relu(x).backward(g)

    def floor():
        x.detach().clone()
        g.clone()

    return {"op": op, "op_python": op_python, "relu": relu, "floor": floor}


def measure(rounds: int, calls: int = 20) -> dict:
    runs = {shape: cases(shape) for shape in ((128, 32, 18, 18), (1000,))}
    times = {(s, n): [] for s, c in runs.items() for n in c}
    faults = {key: 0 for key in times}
    for r in range(rounds):
        for shape, fns in runs.items():
            names = list(fns)
            names = names[r % len(names):] + names[:r % len(names)]  # each case leads in turn: the
            for name in names:                                       # allocator's state favours none
                fn = fns[name]
                fn()
                before = _minor_faults()
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                times[(shape, name)].append((time.perf_counter() - start) / calls * 1e6)
                faults[(shape, name)] += _minor_faults() - before
    return times, {key: n / (rounds * calls) for key, n in faults.items()}


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(rounds: int) -> None:
    times, faults = measure(rounds)
    print(f"{'case':<32}{'median us':>12}{'best us':>10}{'faults/call':>13}")
    for (shape, name), ts in times.items():
        print(f"{'x'.join(map(str, shape)) + ' ' + name:<32}{statistics.median(ts):>12.1f}{min(ts):>10.1f}"
              f"{faults[(shape, name)]:>13.1f}")
    for shape, base, target in (((128, 32, 18, 18), "floor", 1.5), ((1000,), "relu", 2.0)):
        for name in ("op", "op_python"):
            med = statistics.median(times[(shape, name)]) / statistics.median(times[(shape, base)])
            best = min(times[(shape, name)]) / min(times[(shape, base)])
            print(f"{name} / {base} on {'x'.join(map(str, shape))}: {med:.2f}x median, {best:.2f}x best "
                  f"(target <= {target}x)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
