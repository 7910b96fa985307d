"""Inference speed of the packed model against the collapsed float model, side by side in one run.

GOP/s counts 2 operations per multiply-accumulate of the convolutions and the FC (the same count
for both models, so the GOP/s ratio is the speed ratio); images are random, of the model's shape.
"""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def ops_per_image(model, shape: tuple[int, int, int]) -> int:
    """2 x the multiply-accumulates of one image through ``model``'s convolutions and linear
    layers, as torch's FlopCounterMode counts them (elementwise work, pooling and BN: none)."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, *shape))
    return counter.get_total_flops()


@torch.no_grad()
def seconds_per_call(fn, x, min_time: float, min_calls: int = 3) -> float:
    fn(x)  # warm-up: caches (the packed layers' border sums), allocator
    calls, start = 0, time.perf_counter()
    while True:
        fn(x)
        calls += 1
        elapsed = time.perf_counter() - start
        if calls >= min_calls and elapsed >= min_time:
            return elapsed / calls


def bench(models: dict, shape: tuple[int, int, int], batches=(1, 64), min_time: float = 1.0,
          seed: int = 0) -> list[dict]:
    """Rows of (model, batch, images/s, GOP/s), every model on the same images, batch by batch;
    the operations are counted on the first model (the float one: the packed layers' kernels
    are not convolutions to the counter)."""
    gen = torch.Generator().manual_seed(seed)
    ops = ops_per_image(next(iter(models.values())), shape)
    rows = []
    for b in batches:
        x = torch.randn(b, *shape, generator=gen)
        for name, model in models.items():
            s = seconds_per_call(model, x, min_time)
            rows.append({"model": name, "batch": b, "images_per_s": b / s, "gops": b * ops / s / 1e9})
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'model':<22} {'batch':>5} {'images/s':>10} {'GOP/s':>8}"]
    lines += [f"{r['model']:<22} {r['batch']:>5} {r['images_per_s']:>10.1f} {r['gops']:>8.3f}" for r in rows]
    return "\n".join(lines)
