"""Training throughput of svhn_net(0.25) on Fashion-MNIST, W/A 2/2 DoReFa: full precision, LP baseline, EXP-Net.

    PYTHONPATH=. python benchmarks/benchmark_train.py              # one epoch (468 steps of 128) each
    PYTHONPATH=. python benchmarks/benchmark_train.py --steps 100  # a fixed number of steps each
    PYTHONPATH=. python benchmarks/benchmark_train.py --device cuda --steps 60 --synthetic --no-rss --json t.json

The three networks train side by side in one process, one step each in
turn on the same batch, so load from other processes on a shared machine
hits all three alike and the ratios stay meaningful. A step is what the
training loop does: the in-memory loader's batch with augmentation (its
time is charged to every network), forward, cross-entropy, backward, Adam,
and for EXP-Net the per-step decay of f, a cosine over the whole run so the
FP branches are computed in all but the last step. Evaluation is not timed.
Peak RSS comes from a separate process per network (20 training steps on
the full data set), so each is that network's own. ``--device cuda`` trains
on the GPU (each step is synchronized, so its time is its own);
``--synthetic`` replaces the images by random ones of the same shape, for a
machine without the data set (a GPU box with no network): the same loader,
augmentation and networks, so the same throughput.
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


def synthetic_data(cfg, n: int = 60_000):
    """Random Fashion-MNIST-shaped images and labels, fitted to the model as the real ones are."""
    from expcuda import data, models
    from expcuda.data import adapt
    from expcuda.data.memory import TensorData, channel_stats

    channels, classes, how, augment = data.registry.spec(cfg.dataset)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    size = models.ModelConfig(arch=cfg.model).input_size
    mean, std = channel_stats(images)
    train = TensorData(adapt.fit(images, size, channels, how), labels, mean, std, augment)
    return data.Bundle(cfg.dataset, train, train, classes), cfg.model_config(classes, channels)


def setup(mode: str, steps: int | None, device: str = "cpu", synthetic: bool = False):
    """(model, optimizer, decay or None, loader) for one variant, as the training loop builds them."""
    from expcuda import models
    from expcuda.train import build
    from expcuda.train.config import TrainConfig

    torch.manual_seed(0)
    cfg = TrainConfig.from_preset("fmnist", mode=mode, width=0.25, w_bits=2, a_bits=2, epochs=1, batch_size=128,
                                  decay_steps="100%", progress=False)
    if synthetic:  # as many images as the steps take (the whole set's 60000 for an epoch)
        bundle, model_cfg = synthetic_data(cfg, 60_000 if steps is None else cfg.batch_size * max(steps, 20))
    else:
        bundle, model_cfg = build.load_data(cfg)
    model = models.build(model_cfg).train().to(device)
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
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def interleaved(steps: int | None, warmup: int, device: str = "cpu", synthetic: bool = False) -> dict:
    """Images/s of each variant, their steps taken in turn on the same batches."""
    runs = {mode: setup(mode, steps, device, synthetic) for mode, _ in VARIANTS}
    loader, total = runs["fp"][3], runs["fp"][4]
    loader.set_epoch(0)
    spent = {mode: 0.0 for mode in runs}
    data_s, images, t = 0.0, 0, time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if i == total:
            break
        if i == warmup:
            spent, data_s, images = {mode: 0.0 for mode in runs}, 0.0, 0
        x, y = x.to(device), y.to(device)
        data_s += time.perf_counter() - t
        for mode, (model, optimizer, decay, _, _) in runs.items():
            start = time.perf_counter()
            step(model, optimizer, decay, x, y)
            spent[mode] += time.perf_counter() - start
        images += y.numel()
        t = time.perf_counter()
    return {mode: {"images_per_s": images / (spent[mode] + data_s), "data_wait": data_s / (spent[mode] + data_s),
                   "steps": total - warmup} for mode in runs}


def peak_rss(mode: str, synthetic: bool = False) -> float:
    """MiB: peak resident memory of a process that loads the data and trains ``mode`` for 20 steps."""
    model, optimizer, decay, loader, _ = setup(mode, 20, synthetic=synthetic)
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
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--synthetic", action="store_true", help="random images of the data set's shape")
    p.add_argument("--no-rss", action="store_true", help="skip the three peak-RSS processes")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--rss-of", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_of:
        print(json.dumps(peak_rss(args.rss_of, args.synthetic)))
        return
    load = [os.getloadavg()[0]]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA GPU is visible to torch")
    results = interleaved(args.steps, args.warmup, args.device, args.synthetic)
    load.append(os.getloadavg()[0])
    for mode, _ in VARIANTS:
        if args.no_rss:
            results[mode]["rss"] = None
            continue
        done = subprocess.run([sys.executable, __file__, "--rss-of", mode, "--threads", str(args.threads)]
                              + (["--synthetic"] if args.synthetic else []), capture_output=True, text=True)
        results[mode]["rss"] = json.loads(done.stdout.splitlines()[-1]) if done.returncode == 0 else None
    fp = results["fp"]["images_per_s"]
    n = results["fp"]["steps"]
    what = f"{n} timed steps of 128 after {args.warmup} warm-up steps" + ("" if args.steps else " (one epoch)")
    data_name = "random images of Fashion-MNIST's shape" if args.synthetic else "Fashion-MNIST"
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.machine()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"results": results, "device": device, "data": data_name, "warmup": args.warmup}, fh, indent=1)
    print(f"svhn_net(0.25), {data_name} 40x40, W/A 2/2 DoReFa, Adam, batch 128, {what}, the three networks "
          f"in turn; {device}, {os.cpu_count()} CPUs, {args.threads} threads, torch {torch.__version__}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}; load average {min(load):.1f}-{max(load):.1f}\n")
    print("| network | images/s | vs full precision | data wait | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for mode, name in VARIANTS:
        r = results[mode]
        rss = f"{r['rss']:.0f}" if r["rss"] is not None else ("-" if args.no_rss else "failed")
        print(f"| {name} | {r['images_per_s']:.0f} | {r['images_per_s'] / fp:.2f}x | {100 * r['data_wait']:.1f}% | {rss} |")


if __name__ == "__main__":
    main()
