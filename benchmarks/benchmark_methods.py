"""Step cost of Zhuang et al.'s methods against the plain steps they replace, side by side in one run.

    PYTHONPATH=. python benchmarks/benchmark_methods.py               # 60 timed steps each
    PYTHONPATH=. python benchmarks/benchmark_methods.py --steps 100 --p0 0.5

svhn_net(0.25), W/A 2/2 DoReFa, batch 128 of Fashion-MNIST (the training
loop's loader and augmentation), Adam. Every variant takes one step in turn
on the same batch, so load from other processes hits all alike; the figures
are medians of per-step times. The targets (issue 9): a stochastic-precision
step (P0 held all run long, so about that fraction of units is quantized)
at most 1.1x the baseline low-precision step; a distillation step (student +
full-precision twin, ``distill_step``) at most 1.1x one low-precision plus one
full-precision step; the staircase's last stage (a model converted in place
through 32, 8, 4 to 2 bits) at the baseline's speed.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F


def build(mode: str):
    from expcuda import models
    from expcuda.train import build as tbuild
    from expcuda.train.config import TrainConfig

    cfg = TrainConfig.from_preset("fmnist", mode=mode, width=0.25, w_bits=2, a_bits=2, epochs=1, batch_size=128,
                                  progress=False)
    torch.manual_seed(0)
    bundle, model_cfg = tbuild.load_data(cfg)
    model = models.build(model_cfg).train()
    return cfg, bundle, model, tbuild.make_optimizer(cfg, model)


def plain_step(model, optimizer, x, y):
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def variants(p0: float):
    from expcuda.methods import DistillLoss, ProgressiveSchedule, StochasticPrecision, distill_step

    cfg, bundle, lp, lp_opt = build("lp")
    _, _, fp, fp_opt = build("fp")
    _, _, sp_model, sp_opt = build("lp")
    sp = StochasticPrecision(sp_model, p0, 10**9)  # the fraction stays at p0 for the whole benchmark
    _, _, student, s_opt = build("lp")
    _, _, twin, t_opt = build("fp")
    loss = DistillLoss()
    _, _, stair, stair_opt = build("lp")
    schedule = ProgressiveSchedule("bits:32,8,4,2", w_quant="dorefa", w_bits=2, a_quant="dorefa", a_bits=2,
                                   epochs=4)
    for stage in schedule.stages:
        schedule.apply(stair, stage)

    def sp_step(x, y):
        plain_step(sp_model, sp_opt, x, y)
        sp.step()

    steps = {"LP baseline": lambda x, y: plain_step(lp, lp_opt, x, y),
             "full precision": lambda x, y: plain_step(fp, fp_opt, x, y),
             f"stochastic precision, P0 {p0}": sp_step,
             "distillation (LP + FP twin)": lambda x, y: distill_step(student, twin, x, y, loss, s_opt, t_opt),
             "staircase, last stage (2 bits)": lambda x, y: plain_step(stair, stair_opt, x, y)}
    return bundle.loader("train", cfg.batch_size, seed=0), steps


def measure(steps: int, warmup: int, p0: float) -> dict:
    loader, fns = variants(p0)
    loader.set_epoch(0)
    times = {name: [] for name in fns}
    for i, (x, y) in enumerate(loader):
        if i == steps + warmup:
            break
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(x, y)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--p0", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    med = measure(args.steps, args.warmup, args.p0)
    lp, fp = med["LP baseline"], med["full precision"]
    reference = {"LP baseline": ("LP baseline", lp), "full precision": ("LP baseline", lp),
                 "distillation (LP + FP twin)": ("LP + FP steps", lp + fp)}
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; {args.steps} timed steps of 128 after {args.warmup}, median ms per step")
    print("| step | median ms | vs | ratio | target |\n|---|---:|---|---:|---|")
    targets = {"stochastic": "<= 1.1x", "distillation": "<= 1.1x", "staircase": "1.0x"}
    for name, t in med.items():
        ref_name, ref = reference.get(name, ("LP baseline", lp))
        target = next((v for k, v in targets.items() if name.startswith(k)), "")
        print(f"| {name} | {1e3 * t:.1f} | {ref_name} ({1e3 * ref:.1f} ms) | {t / ref:.2f}x | {target} |")


if __name__ == "__main__":
    main()
