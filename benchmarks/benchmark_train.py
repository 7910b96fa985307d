"""Training throughput of svhn_net(0.25) on Fashion-MNIST, W/A 2/2 DoReFa: full precision, LP baseline, EXP-Net.

    PYTHONPATH=. python benchmarks/benchmark_train.py              # one epoch (468 steps of 128) each
    PYTHONPATH=. python benchmarks/benchmark_train.py --steps 100  # a fixed number of steps each

The three networks train side by side in one process, one step each in
turn on the same batch, so load from other processes on a shared machine
hits all three alike and the ratios stay meaningful. A step is what the
training loop does: the in-memory loader's batch with augmentation (its
time is charged to every network), forward, cross-entropy, backward, Adam,
and for EXP-Net the per-step decay of f, a cosine over the whole run so the
FP branches are computed in all but the last step. Evaluation is not timed.
Peak RSS comes from a separate process per network (20 training steps on
the full data set), so each is that network's own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

VARIANTS = (("fp", "full precision"), ("lp", "LP baseline"), ("exp", "EXP-Net"))


def setup(mode: str, steps: int | None):
    """(model, optimizer, decay or None, loader) for one variant, as the training loop builds them."""
    from expcuda import models
    from expcuda.train import build
    from expcuda.train.config import TrainConfig

    torch.manual_seed(0)
    cfg = TrainConfig.from_preset("fmnist", mode=mode, width=0.25, w_bits=2, a_bits=2, epochs=1, batch_size=128,
                                  decay_steps="100%", progress=False)
    bundle, model_cfg = build.load_data(cfg)
    model = models.build(model_cfg).train()
    loader = bundle.loader("train", cfg.batch_size, seed=0)
    total = min(steps, len(loader)) if steps else len(loader)
    return model, build.make_optimizer(cfg, model), build.make_decay(cfg, model, total), loader, total


def step(model, optimizer, decay, x, y) -> None:
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if decay is not None:
        decay.step()


def interleaved(steps: int | None, warmup: int) -> dict:
    """Images/s of each variant, their steps taken in turn on the same batches."""
    runs = {mode: setup(mode, steps) for mode, _ in VARIANTS}
    loader, total = runs["fp"][3], runs["fp"][4]
    loader.set_epoch(0)
    spent = {mode: 0.0 for mode in runs}
    data_s, images, t = 0.0, 0, time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if i == total:
            break
        got = time.perf_counter()
        if i == warmup:
            spent, data_s, images = {mode: 0.0 for mode in runs}, 0.0, 0
        data_s += got - t
        for mode, (model, optimizer, decay, _, _) in runs.items():
            start = time.perf_counter()
            step(model, optimizer, decay, x, y)
            spent[mode] += time.perf_counter() - start
        images += y.numel()
        t = time.perf_counter()
    return {mode: {"images_per_s": images / (spent[mode] + data_s), "data_wait": data_s / (spent[mode] + data_s),
                   "steps": total - warmup} for mode in runs}


def peak_rss(mode: str) -> float:
    """MiB: peak resident memory of a process that loads the data and trains ``mode`` for 20 steps."""
    model, optimizer, decay, loader, _ = setup(mode, 20)
    loader.set_epoch(0)
    for i, (x, y) in enumerate(loader):
        if i == 20:
            break
        step(model, optimizer, decay, x, y)
    # VmHWM belongs to this program's memory; ru_maxrss can carry the parent's peak across exec
    try:
        with open("/proc/self/status") as fh:
            return int(next(line for line in fh if line.startswith("VmHWM:")).split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, help="steps per network, warm-up included (default: the whole epoch)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rss-of", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_of:
        print(json.dumps(peak_rss(args.rss_of)))
        return
    load = [os.getloadavg()[0]]
    results = interleaved(args.steps, args.warmup)
    load.append(os.getloadavg()[0])
    for mode, _ in VARIANTS:
        done = subprocess.run([sys.executable, __file__, "--rss-of", mode, "--threads", str(args.threads)],
                              capture_output=True, text=True)
        results[mode]["rss"] = json.loads(done.stdout.splitlines()[-1]) if done.returncode == 0 else None
    fp = results["fp"]["images_per_s"]
    n = results["fp"]["steps"]
    what = f"{n} timed steps of 128 after {args.warmup} warm-up steps" + ("" if args.steps else " (one epoch)")
    print(f"svhn_net(0.25), Fashion-MNIST 40x40, W/A 2/2 DoReFa, Adam, batch 128, {what}, the three networks "
          f"in turn; {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, torch {torch.__version__}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}; load average {min(load):.1f}-{max(load):.1f}\n")
    print("| network | images/s | vs full precision | data wait | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for mode, name in VARIANTS:
        r = results[mode]
        rss = f"{r['rss']:.0f}" if r["rss"] is not None else "failed"
        print(f"| {name} | {r['images_per_s']:.0f} | {r['images_per_s'] / fp:.2f}x | {100 * r['data_wait']:.1f}% | {rss} |")


if __name__ == "__main__":
    main()
