"""The latency of one small gloo all-reduce between ranks on this machine.

    torchrun --standalone --nproc_per_node=2 benchmarks/gloo_latency.py [N]

Synced BatchNorm makes two blocking all-reduces per BatchNorm layer and step (the forward's
statistics, the backward's sums), so this latency times their number bounds what DDP with
synced BatchNorm loses against ``--no-sync-bn``.  Prints, per rank, the mean time of N
all-reduces of 65 float64 values (a 32-channel layer's statistics).
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist


def main(n: int) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    t = torch.zeros(65, dtype=torch.float64)
    for _ in range(50):
        dist.all_reduce(t)
    start = time.perf_counter()
    for _ in range(n):
        dist.all_reduce(t)
    mean_us = (time.perf_counter() - start) / n * 1e6
    print(f"rank {dist.get_rank()} of {dist.get_world_size()}: all_reduce of 65 float64 values: "
          f"{mean_us:.0f} us (mean of {n})", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
