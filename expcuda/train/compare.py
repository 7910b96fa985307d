"""``expcuda compare``: the baseline and EXP-Net (and full precision) trained with the same seeds.

The paper's Tables 4 and 5 in one command: final test accuracy of the
network that ships (the LP one, at f = 0) as mean +- std over seeds, EXP-Net
minus baseline paired by seed, and epoch time. It reports what it measures,
whichever way it goes. Finished runs (summary.json present) are reused and
interrupted ones resumed, so re-running the command continues it.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics

import torch

from expcuda.train import metrics, plots
from expcuda.train.atomic import write_text
from expcuda.train.config import TrainConfig

VARIANTS = {"lp": "baseline", "exp": "EXP-Net", "fp": "full precision"}


def run_all(base: TrainConfig, seeds: int, with_fp: bool, train_fn=None, log=print) -> dict:
    """Train every (variant, seed) under ``base.out``; returns {variant: [summary per seed]}."""
    if train_fn is None:
        from expcuda.train.loop import train as train_fn
    if seeds <= 0:
        raise ValueError(f"--seeds must be positive, got {seeds}")
    modes = ["lp", "exp"] + (["fp"] if with_fp else [])
    results = {m: [] for m in modes}
    for seed in range(base.seed, base.seed + seeds):
        for mode in modes:
            folder = os.path.join(base.out, f"{VARIANTS[mode].replace(' ', '-').lower()}-seed{seed}")
            done = os.path.join(folder, "summary.json")
            if os.path.isfile(done):
                log(f"reusing the finished run in {folder}")
                summary = metrics.read_json(done)
            else:
                resume = os.path.isfile(os.path.join(folder, "checkpoint.pt"))
                summary = train_fn(base.replace(mode=mode, seed=seed, out=folder, resume=resume))
            summary["folder"] = folder
            results[mode].append(summary)
    return results


def read_steps(path: str) -> list[tuple]:
    """Each step's (loss, f) from a run's steps.csv."""
    return [(r["loss"], r["f"]) for r in metrics.read_csv(path)]


def steps_per_epoch(folder: str) -> int:
    n_steps = len(read_steps(os.path.join(folder, "steps.csv")))
    return max(1, n_steps // len(metrics.read_csv(os.path.join(folder, "metrics.csv"))))


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(values: list[float], digits: int = 2) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if s is not None else f"{m:.{digits}f}"


def verdict(diffs: list[float]) -> str:
    """" (win)" or " (loss)", and whether the seeds' spread is as large as the difference."""
    m, sd = mean_std(diffs)
    word = "win" if m > 0 else "loss" if m < 0 else "tie"
    return f" ({word}, within seed noise)" if sd is not None and abs(m) <= sd else f" ({word})"


def table(results: dict) -> str:
    """Markdown: accuracy mean ± std, the difference to the baseline (paired by seed), epoch time."""
    base = [r["final_test_acc"] for r in results["lp"]]
    lines = ["| network | final test acc (%) | vs baseline (points) | best epoch acc (%) | epoch time (s) | images/s |",
             "|---|---|---|---|---|---|"]
    for mode, runs in results.items():
        acc = [r["final_test_acc"] for r in runs]
        diff = "—" if mode == "lp" else fmt([a - b for a, b in zip(acc, base)]) + verdict(
            [a - b for a, b in zip(acc, base)])
        lines.append(f"| {VARIANTS[mode]} | {fmt(acc)} | {diff} | {fmt([r['best_test_acc'] for r in runs])} | "
                     f"{fmt([r['mean_epoch_time'] for r in runs], 1)} | {fmt([r['mean_images_per_s'] for r in runs], 0)} |")
    return "\n".join(lines)


def report(base: TrainConfig, results: dict, seeds: int, command: str, wall: float) -> str:
    """comparison.md and curves.png in ``base.out``; returns the markdown."""
    groups = {}
    for mode, runs in results.items():
        groups[VARIANTS[mode]] = [metrics.read_csv(os.path.join(r["folder"], "metrics.csv")) for r in runs]
    curves = os.path.join(base.out, "curves.png")
    exp_run = results["exp"][0]["folder"]
    f_curve = plots.f_per_epoch(read_steps(os.path.join(exp_run, "steps.csv")), steps_per_epoch(exp_run))
    plots.compare_curves(curves, groups, f_curve, f"{base.model} x{base.width} W/A {base.w_bits}/{base.a_bits} "
                                         f"{base.w_quant} on {base.dataset}")
    exp_model = os.path.join(results["exp"][0]["folder"], "lp_model.safetensors")
    text = "\n".join([
        f"# Baseline vs EXP-Net: {base.model} x{base.width} on {base.dataset}", "",
        f"`{command}`", "",
        f"{seeds} seed(s) from {base.seed}; {base.epochs} epochs, batch {base.batch_size}, {base.optimizer} lr "
        f"{base.lr}; W/A {base.w_bits}/{base.a_bits} ({base.w_quant}/{base.a_quant}); EXP-Net scheme "
        f"{base.scheme}, combine {base.combine}, {base.decay} decay over {base.decay_steps} "
        f"(of training when a fraction); train/test images limited to {base.limit_train or 'all'}/"
        f"{base.limit_test or 'all'}.", "",
        "Accuracy is the final epoch's test accuracy of the network that ships: the low-precision one "
        "(EXP-Net collapsed, f = 0). The difference is EXP-Net minus baseline, paired by seed; "
        "± is the sample standard deviation over seeds. Epoch time counts training steps only "
        "(data loading included, evaluation excluded).", "",
        table(results), "",
        f"Measured {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on {platform.machine()} with "
        f"{os.cpu_count()} CPU(s), torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"wall time {wall / 60:.1f} min.", "",
        f"Curves: `{curves}`. Exported EXP-Net (collapsed): `{exp_model}` + `lp_model.json`.", ""])
    write_text(os.path.join(base.out, "comparison.md"), text)
    return text
