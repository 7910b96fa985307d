"""curves.png: test accuracy and f per epoch, for one run or for baseline vs EXP-Net (Figures 4, 6)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from expcuda.train.atomic import atomic_path  # noqa: E402


def run_curves(path: str, rows: list[dict], steps: list[tuple], steps_per_epoch: int, title: str) -> None:
    """One run: expanded (current f) and LP (f = 0) test accuracy per epoch, f per step."""
    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(epochs, [r["test_acc"] for r in rows], "o-", label="expanded, current f")
    ax.plot(epochs, [r["test_acc_lp"] for r in rows], "s--", label="low precision alone (f = 0)")
    _f_axis(ax, f_per_epoch(steps, steps_per_epoch))
    _finish(fig, ax, title, path)


def f_per_epoch(steps: list[tuple], steps_per_epoch: int) -> tuple[list[float], list[float]]:
    """(x in epochs, f) from each step's (loss, f), starting at (0, 1)."""
    return [0.0] + [(i + 1) / steps_per_epoch for i in range(len(steps))], [1.0] + [f for _, f in steps]


def compare_curves(path: str, groups: dict[str, list[list[dict]]], f_curve, title: str) -> None:
    """Several variants: mean LP test accuracy over seeds (band: min..max), and EXP-Net's f."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, runs in groups.items():
        n = min(len(r) for r in runs)
        epochs = [row["epoch"] for row in runs[0][:n]]
        acc = np.array([[row["test_acc_lp"] for row in r[:n]] for r in runs])
        line, = ax.plot(epochs, acc.mean(0), "o-", label=f"{label} (mean of {len(runs)})")
        if len(runs) > 1:
            ax.fill_between(epochs, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.2)
        now = np.array([[row["test_acc"] for row in r[:n]] for r in runs])
        if not np.array_equal(now, acc):  # EXP-Net: also the expanded model at the current f
            ax.plot(epochs, now.mean(0), "--", color=line.get_color(), label=f"{label} expanded, current f")
    if f_curve is not None:
        _f_axis(ax, f_curve)
    _finish(fig, ax, title, path)


def _f_axis(ax, curve):
    twin = ax.twinx()
    twin.plot(*curve, ":", color="gray")
    twin.set_ylim(-0.05, 1.05)
    twin.set_ylabel("f (dotted)")


def _finish(fig, ax, title, path):
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
