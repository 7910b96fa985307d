"""Inference speed of the packed model against the collapsed float model, side by side in one run.

GOP/s counts 2 operations per multiply-accumulate of the convolutions and the FC (the same count
for both models, so the GOP/s ratio is the speed ratio); images are random, of the model's shape.
"""

from __future__ import annotations

import time

import torch


def _out(size: int, k: int, s: int, p: int, d: int = 1, ceil: bool = False) -> int:
    span = size + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return out


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def macs_per_image(config: dict, h: int, w: int) -> int:
    """Multiply-accumulates of one image through the convolutions and the FC of a packed config."""
    st = config["stem"]
    (kh, kw), (sh, sw), (ph, pw) = st["kernel_size"], st["stride"], st["padding"]
    h, w = _out(h, kh, sh, ph), _out(w, kw, sw, pw)
    total = h * w * st["out_channels"] * st["in_channels"] // st["groups"] * kh * kw

    def pooled(h, w, pool):
        if pool is None:
            return h, w
        k, s, p, d = (_pair(pool[key]) for key in ("kernel_size", "stride", "padding", "dilation"))
        return (_out(h, k[0], s[0], p[0], d[0], pool["ceil_mode"]),
                _out(w, k[1], s[1], p[1], d[1], pool["ceil_mode"]))

    h, w = pooled(h, w, st["pool"])
    for layer in config["layers"]:
        (kh, kw), s, p = layer["kernel_size"], layer["stride"], layer["padding"]
        h, w = _out(h, kh, s, p), _out(w, kw, s, p)
        total += h * w * layer["out_channels"] * layer["in_channels"] * kh * kw
        h, w = pooled(h, w, layer["pool"])
    return total + config["fc"]["in_features"] * config["fc"]["out_features"]


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


def bench(models: dict, config: dict, shape: tuple[int, int, int], batches=(1, 64),
          min_time: float = 1.0, seed: int = 0) -> list[dict]:
    """Rows of (model, batch, images/s, GOP/s), every model on the same images, batch by batch."""
    gen = torch.Generator().manual_seed(seed)
    ops = 2 * macs_per_image(config, shape[1], shape[2])
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
