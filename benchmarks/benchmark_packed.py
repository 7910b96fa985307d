"""The packed integer convolution (expcuda.deploy.packed_conv2d, C++ CPU kernel) against float32
``F.conv2d`` on the SVHN net's low-precision conv layers, side by side.

    PYTHONPATH=. OMP_NUM_THREADS=1 python -m pytest benchmarks/benchmark_packed.py \
        --benchmark-group-by=group --benchmark-columns=min,median,rounds

    python benchmarks/benchmark_packed.py [rounds] [--threads 1,2]

The script mode runs every candidate of a shape round-robin, round after round (the machine's
neighbours then slow all of them alike), and prints each one's best time, its ratio to the
faster float32 layout and its GOP/s (2 * MACs / time, the same count for every row).  The
packed time includes everything a call does: checking the codes, gathering and packing the
activations, re-laying the weight planes; the inputs are already codes (uint8 NHWC) and bit
planes, as the deployed model holds them.  Targets: 1/1 bit >= 4x and 2/2 bit >= 2x float32.

Rows: ``fp32`` (NCHW) and ``fp32-cl`` (channels_last) float32 convolutions; ``packed a/w`` the
default path for those bits; ``packed a/w bitserial|dot`` a path forced with
EXPCUDA_PACKED_ALGO, which is how the default's choice between the two was measured.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from expcuda import _ext
from expcuda.deploy import pack_planes, packed_conv2d, packed_path
from expcuda.models.layers import scaled

#: the SVHN net's low-precision convs at width 1 on its 40x40 input (conv0, full precision, and
#: its pool make 18x18): (name, in, out, kernel, padding, input side)
LAYERS = (("conv1", 48, 64, 3, 1, 18), ("conv2", 64, 64, 3, 1, 18), ("conv3", 64, 128, 3, 0, 9),
          ("conv4", 128, 128, 3, 1, 7), ("conv5", 128, 128, 3, 0, 7), ("conv6", 128, 512, 5, 0, 5))
WIDTHS = (0.25, 1.0)
BATCHES = (1, 64)
BITS = ((1, 1), (2, 2), (4, 4))
IMPLS = ("fp32", "fp32-cl") + tuple(f"packed {a}/{w}" for a, w in BITS) + (
    "packed 2/2 bitserial", "packed 2/2 dot", "packed 4/4 bitserial", "packed 4/4 dot")


def shape(layer: str, width: float):
    name, cin, cout, k, pad, hw = next(spec for spec in LAYERS if spec[0] == layer)
    return scaled(cin, width), scaled(cout, width), k, pad, hw


def macs(layer: str, width: float, batch: int) -> int:
    cin, cout, k, pad, hw = shape(layer, width)
    out = hw + 2 * pad - k + 1
    return batch * out * out * cout * cin * k * k


def make_call(layer: str, width: float, batch: int, impl: str):
    """A no-argument callable running ``impl`` once on the layer's shape."""
    cin, cout, k, pad, hw = shape(layer, width)
    g = torch.Generator().manual_seed(0)
    if impl.startswith("fp32"):
        x = torch.rand(batch, cin, hw, hw, generator=g)
        w = torch.randn(cout, cin, k, k, generator=g)
        if impl == "fp32-cl":
            x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
        return lambda: F.conv2d(x, w, padding=pad)
    bits, *algo = impl.split()[1:]
    a_bits, w_bits = map(int, bits.split("/"))
    x = torch.randint(0, 1 << a_bits, (batch, hw, hw, cin), generator=g).to(torch.uint8)
    planes = pack_planes(torch.randint(0, 1 << w_bits, (cout, k, k, cin), generator=g).to(torch.uint8), w_bits)
    algo = algo[0] if algo else "auto"

    def call():
        os.environ["EXPCUDA_PACKED_ALGO"] = algo  # read by the kernel on every call
        return packed_conv2d(x, planes, cin, a_bits, w_bits, 1, pad)
    return call


def available(impl: str) -> bool:
    if not impl.startswith("packed"):
        return True
    if not _ext.has_kernel("packed_conv2d", "CPU"):
        return False
    if impl.endswith("dot"):
        os.environ["EXPCUDA_PACKED_ALGO"] = "dot"
        try:
            packed_path(4, 4)
        except ValueError:
            return False
        finally:
            os.environ.pop("EXPCUDA_PACKED_ALGO", None)
    return True


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("layer", [spec[0] for spec in LAYERS])
def test_packed_conv(benchmark, layer, width, batch, impl):
    if not available(impl):
        pytest.skip(f"{impl}: not available here")
    call = make_call(layer, width, batch, impl)
    benchmark.group = f"{layer} width {width} batch {batch}, {torch.get_num_threads()} thread(s)"
    call()
    try:
        benchmark.pedantic(call, rounds=20 if batch == 1 else 5, warmup_rounds=2, iterations=1)
    finally:
        os.environ.pop("EXPCUDA_PACKED_ALGO", None)


def interleaved(rounds: int, threads: int) -> list[dict]:
    """Best time of every implementation on every shape, measured round-robin; one dict a shape."""
    torch.set_num_threads(threads)
    impls = [impl for impl in IMPLS if available(impl)]
    out = []
    try:
        for batch in BATCHES:
            for width in WIDTHS:
                for layer, *_ in LAYERS:
                    calls = {impl: make_call(layer, width, batch, impl) for impl in impls}
                    for fn in calls.values():
                        fn()
                    times = {impl: [] for impl in impls}
                    n = rounds if batch == 64 else 5 * rounds  # a batch of one: short, noisier
                    for _ in range(n):
                        for impl, fn in calls.items():
                            t0 = time.perf_counter()
                            fn()
                            times[impl].append(time.perf_counter() - t0)
                    out.append(dict(layer=layer, width=width, batch=batch, threads=threads,
                                    macs=macs(layer, width, batch),
                                    best={k: min(v) for k, v in times.items()},
                                    median={k: statistics.median(v) for k, v in times.items()}))
    finally:
        os.environ.pop("EXPCUDA_PACKED_ALGO", None)
    return out


def table(results: list[dict]) -> str:
    """Markdown: per shape the best float32 time, each packed row's time, ratio and GOP/s."""
    packed = [impl for impl in IMPLS if impl in results[0]["best"] and impl.startswith("packed")]
    head = ["layer", "width", "batch", "threads", "fp32 ms"] + [f"{p[7:]} ms (x fp32)" for p in packed]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        fp = min(r["best"]["fp32"], r["best"]["fp32-cl"])
        cells = [r["layer"], f"{r['width']:g}", str(r["batch"]), str(r["threads"]),
                 f"{fp * 1e3:.3f} ({2 * r['macs'] / fp / 1e9:.0f} GOP/s)"]
        for p in packed:
            t = r["best"][p]
            cells.append(f"{t * 1e3:.3f} ({fp / t:.1f}x, {2 * r['macs'] / t / 1e9:.0f} GOP/s)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(results: list[dict]) -> str:
    """Whether 1/1 >= 4x and 2/2 >= 2x float32 held on every shape (default paths)."""
    out = []
    for impl, want in (("packed 1/1", 4.0), ("packed 2/2", 2.0)):
        ratios = [(min(r["best"]["fp32"], r["best"]["fp32-cl"]) / r["best"][impl], r) for r in results]
        missed = [f"{r['layer']} w{r['width']:g} b{r['batch']} t{r['threads']} ({x:.1f}x)"
                  for x, r in ratios if x < want]
        worst = min(x for x, _ in ratios)
        out.append(f"{impl}: target >= {want:g}x fp32: worst {worst:.1f}x; "
                   + ("met on every shape" if not missed else "missed on " + ", ".join(missed)))
    return "\n".join(out)


def main(argv=None) -> None:
    import argparse
    import platform
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rounds", nargs="?", type=int, default=10)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d')}")
    print("default paths: " + ", ".join(f"{a}/{w}: {' '.join(packed_path(a, w))}" for a, w in BITS))
    results = []
    for threads in (int(t) for t in args.threads.split(",")):
        results += interleaved(args.rounds, threads)
    print(table(results))
    print(targets(results))


if __name__ == "__main__":
    main()
