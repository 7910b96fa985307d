"""Training throughput of svhn_net(0.25) on Fashion-MNIST, W/A 2/2 DoReFa: full precision, LP baseline, EXP-Net.

    PYTHONPATH=. python benchmarks/benchmark_train.py              # one epoch (468 steps of 128) each
    PYTHONPATH=. python benchmarks/benchmark_train.py --steps 100  # a fixed number of steps each

Each variant runs in its own process (so its peak RSS is its own) through
the training loop's parts: the in-memory loader with augmentation, forward,
cross-entropy, backward, Adam, and for EXP-Net the per-step decay of f (a
cosine over the whole run, so the FP branches are computed throughout all
but the last step). Evaluation is not timed. Rounds interleave the variants
so that load from other processes hits them alike; the table shows each
variant's best round (its median in brackets) and its ratio to full precision.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = (("fp", "full precision"), ("lp", "LP baseline"), ("exp", "EXP-Net"))


def measure(mode: str, steps: int | None, warmup: int, threads: int) -> dict:
    """Train one variant for an epoch (or ``steps``); images/s over the timed steps, peak RSS."""
    import torch.nn.functional as F

    from expcuda import models
    from expcuda.train import build
    from expcuda.train.config import TrainConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = TrainConfig.from_preset("fmnist", mode=mode, width=0.25, w_bits=2, a_bits=2, epochs=1, batch_size=128,
                                  decay_steps="100%", progress=False)
    bundle, model_cfg = build.load_data(cfg)
    model = models.build(model_cfg)
    loader = bundle.loader("train", cfg.batch_size, seed=0)
    loader.set_epoch(0)
    total = min(steps + warmup, len(loader)) if steps else len(loader)
    optimizer = build.make_optimizer(cfg, model)
    decay = build.make_decay(cfg, model, total)
    model.train()
    images, waited, start, t = 0, 0.0, None, time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if i == total:
            break
        got = time.perf_counter()
        if i == warmup:
            start, images, waited = got, 0, 0.0
        waited += got - t
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if decay is not None:
            decay.step()
        images += y.numel()
        t = time.perf_counter()
    elapsed = t - start
    return {"mode": mode, "images_per_s": images / elapsed, "steps": total - warmup, "seconds": elapsed,
            "data_wait": waited / elapsed, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--warmup", str(args.warmup), "--threads", str(args.threads)]
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:  # say why, keep the other variants' numbers
        print(f"{mode} failed (exit {done.returncode}):\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, help="timed steps per variant (default: the whole epoch)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.warmup, args.threads)))
        return
    results = {mode: [] for mode, _ in VARIANTS}
    load = []
    for r in range(args.rounds):
        for mode, name in VARIANTS:
            res = child(mode, args)
            load.append(os.getloadavg()[0])
            if res is None:
                continue
            results[mode].append(res)
            print(f"round {r + 1}: {name}: {res['images_per_s']:.0f} img/s over {res['steps']} steps "
                  f"({res['seconds']:.1f} s), data wait {100 * res['data_wait']:.1f}%, "
                  f"peak RSS {res['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    if not all(results.values()):
        raise SystemExit("some variant failed in every round; see above")
    fp_best = max(x["images_per_s"] for x in results["fp"])
    what = f"{results['fp'][0]['steps']} steps of 128 after {args.warmup} warm-up steps" if args.steps else \
        f"one epoch ({results['fp'][0]['steps']} timed steps of 128 after {args.warmup} warm-up steps)"
    print(f"svhn_net(0.25), Fashion-MNIST 40x40, W/A 2/2 DoReFa, Adam, batch 128, {what}; "
          f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, torch {torch.__version__}; "
          f"{time.strftime('%Y-%m-%d')}; load average during runs {min(load):.1f}-{max(load):.1f}\n")
    print("| network | images/s best (median) | vs full precision | data wait | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for mode, name in VARIANTS:
        ips = [x["images_per_s"] for x in results[mode]]
        best = max(ips)
        print(f"| {name} | {best:.0f} ({statistics.median(ips):.0f}) | {best / fp_best:.2f}x | "
              f"{100 * min(x['data_wait'] for x in results[mode]):.1f}% | "
              f"{max(x['peak_rss_mib'] for x in results[mode]):.0f} |")


if __name__ == "__main__":
    main()
