"""The expanded block's training step with each CPU epilogue kernel, per dtype, side by side.

    OMP_NUM_THREADS=1 python benchmarks/benchmark_epilogue_kernels.py [rounds]

The SVHN-net 0.25x block (16 channels, 18x18, batch 128, channels_last) with
the C++ kernel and with the PyTorch kernels (the fallback), in float32,
bfloat16 and float16, interleaved round by round; prints the best time of
each and the C++ kernel's speed-up.
"""

from __future__ import annotations

import sys
import time

import torch

from expcuda.nn import ExpandedConv2d, epilogue

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KERNELS = ("cpp", "torch")


def make_step(dtype, kernel):
    torch.manual_seed(0)
    block = ExpandedConv2d(16, 16, 3, padding=1).train().to(dtype)
    block.set_f(0.5)
    x = torch.rand(128, 16, 18, 18, dtype=dtype).to(memory_format=torch.channels_last).requires_grad_(True)
    grad = torch.randn(128, 16, 18, 18, dtype=dtype).to(memory_format=torch.channels_last)

    def run():
        with epilogue.use_kernel(kernel):
            block(x).backward(grad)
    return run


def main(rounds: int) -> None:
    reason = epilogue.kernel_unavailable("cpp")
    if reason is not None:
        raise SystemExit(f"the C++ epilogue is not available: {reason}")
    steps = {(d, k): make_step(d, k) for d in DTYPES for k in KERNELS}
    best = {key: float("inf") for key in steps}
    for fn in steps.values():
        fn()
    for _ in range(rounds):
        for key, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); best of {rounds} (ms)")
    print("| dtype | C++ kernel | PyTorch kernels | speed-up |\n|---|---:|---:|---:|")
    for d in DTYPES:
        cpp, ref = best[(d, "cpp")], best[(d, "torch")]
        print(f"| {str(d).replace('torch.', '')} | {cpp * 1e3:.2f} | {ref * 1e3:.2f} | {ref / cpp:.1f}x |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
