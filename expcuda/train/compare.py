"""``expcuda compare``: training methods side by side, the same seeds and data order for each.

Each method (baseline, EXP-Net, Zhuang et al.'s distillation, two-stage,
staircase and stochastic precision, or a ``+`` combination such as
``exp+distill``) trains once per seed. The table gives the final test
accuracy of the network that ships as mean ± std over seeds, the **paired**
difference to the baseline (same seed) with its 95% confidence interval
(Student's t, scipy.stats), in words whether that interval excludes zero,
and the wall time and images/s of each method. It reports what it measures,
whichever way it goes. Finished runs (summary.json present) are reused and
interrupted ones resumed, so re-running the command continues it.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch
from scipy import stats

from expcuda.train import metrics, plots
from expcuda.train.atomic import write_text
from expcuda.train.config import TrainConfig

#: method name -> (label, folder stem)
PARTS = {"baseline": ("baseline", "baseline"), "exp": ("EXP-Net", "exp-net"),
         "fp": ("full precision", "full-precision"), "distill": ("distillation", "distill"), "two-stage": ("two-stage", "two-stage"),
         "staircase": ("staircase", "staircase"), "sp": ("stochastic precision", "sp")}
DEFAULT_METHODS = "baseline,exp"
ALL_METHODS = "baseline,exp,distill,exp+distill,two-stage,staircase,sp"
STAIRCASE_LEVELS = (32, 8, 4)
DEFAULT_P0 = 0.5
WALL = "compare_wall.json"
#: flags that set up a method: given to compare, they go to the methods that use them, never the baseline
KNOBS = ("distill", "teacher", "progressive", "stage_epochs", "stage_lr", "stage_scales", "stochastic_precision")
PLAIN = {"distill": None, "teacher": None, "progressive": None, "stochastic_precision": None,
         "stage_epochs": "split", "stage_lr": "restart", "stage_scales": "reinit"}


@dataclass
class Method:
    name: str
    label: str
    folder: str
    cfg: TrainConfig  # for the first seed


def default_staircase(cfg: TrainConfig) -> str:
    """bits:32,8,4,<W/A> with only the steps above the target (binary quantizers jump from 32)."""
    from expcuda.methods.progressive import BINARY

    def bits(level, side, kind, final):
        if level == 32:
            return 32
        return final if BINARY.get(kind) == side else max(level, final)

    stages = []
    for level in STAIRCASE_LEVELS:
        pair = (bits(level, "w", cfg.w_quant, cfg.w_bits), bits(level, "a", cfg.a_quant, cfg.a_bits))
        if pair != (cfg.w_bits, cfg.a_bits) and pair not in stages:
            stages.append(pair)
    stages.append((cfg.w_bits, cfg.a_bits))
    return "bits:" + ",".join(str(w) if w == a else f"{w}/{a}" for w, a in stages)


def method_configs(base: TrainConfig, names: str, knobs: dict | None = None) -> list[Method]:
    """Each listed method's config (the baseline first, always), checked now, before anything trains.

    ``knobs`` are the user's own choices for the methods: ``distill`` (kl or mse),
    ``progressive`` (a staircase ``bits:...`` for 'staircase'), ``stochastic_precision`` (P0)."""
    knobs = {k: v for k, v in (knobs or {}).items() if v is not None}
    for k in KNOBS:  # a preset's method settings (cifar100-zhuang: distill kl) count as the user's
        if k not in knobs and getattr(base, k) != PLAIN[k]:
            knobs[k] = getattr(base, k)
    base = base.replace(**PLAIN)
    listed = [n.strip() for n in str(names).split(",") if n.strip()]
    if not listed:
        raise ValueError(f"--methods needs a comma list of {', '.join(PARTS)} (or combinations such as "
                         f"exp+distill), got {names!r}")
    if "baseline" not in listed:
        listed.insert(0, "baseline")
    listed = list(dict.fromkeys(listed))
    staircase = knobs.get("progressive")
    if staircase == "two-stage":
        staircase = None
    elif staircase is not None and not str(staircase).startswith("bits:"):
        raise ValueError(f"compare: --progressive gives the staircase method's bits (bits:32,8,4,2); "
                         f"two-stage is its own method, got {staircase!r}")
    methods = []
    for name in listed:
        parts = name.split("+")
        unknown = [p for p in parts if p not in PARTS]
        if unknown:
            raise ValueError(f"--methods: unknown method {unknown[0]!r} in {name!r}; the methods are "
                             f"{', '.join(PARTS)}, joined with + to combine (exp+distill)")
        if "baseline" in parts and len(parts) > 1:
            raise ValueError(f"--methods: {name!r}: the baseline is the plain network; combine the others")
        if "fp" in parts and len(parts) > 1:
            raise ValueError(f"--methods: {name!r}: the full-precision network has no quantizers to combine "
                             f"a method with")
        if "two-stage" in parts and "staircase" in parts:
            raise ValueError(f"--methods: {name!r}: two-stage and staircase are two progressive schedules; "
                             f"pick one")
        changes = {"mode": "exp" if "exp" in parts else "fp" if "fp" in parts else "lp"}
        if "distill" in parts:
            changes["distill"] = knobs.get("distill") or "kl"
            changes["teacher"] = knobs.get("teacher")
        if "two-stage" in parts or "staircase" in parts:
            changes["progressive"] = "two-stage" if "two-stage" in parts else staircase or default_staircase(base)
            changes.update({k: knobs[k] for k in ("stage_epochs", "stage_lr", "stage_scales") if k in knobs})
        if "sp" in parts:
            changes["stochastic_precision"] = (knobs["stochastic_precision"] if knobs.get("stochastic_precision")
                                               is not None else DEFAULT_P0)
        try:
            cfg = base.replace(**changes)
        except ValueError as exc:
            raise ValueError(f"--methods {name}: {exc}") from None
        label = " + ".join(PARTS[p][0] for p in parts)
        methods.append(Method(name, label, "+".join(PARTS[p][1] for p in parts).replace("+", "_"), cfg))
    return methods


def run_all(base: TrainConfig, methods: list[Method], seeds: int, train_fn=None, log=print) -> dict:
    """Train every (method, seed) under ``base.out``; returns {method name: [summary per seed]}."""
    if train_fn is None:
        from expcuda.train.loop import train as train_fn
    if seeds <= 0:
        raise ValueError(f"--seeds must be positive, got {seeds}")
    results = {m.name: [] for m in methods}
    for seed in range(base.seed, base.seed + seeds):
        for m in methods:
            folder = os.path.join(base.out, f"{m.folder}-seed{seed}")
            done = os.path.join(folder, "summary.json")
            cfg = m.cfg.replace(seed=seed, out=folder)
            if os.path.isfile(done):
                summary = metrics.read_json(done)
                check_reusable(done, summary, cfg)
                log(f"reusing the finished run in {folder}")
            else:
                resume = os.path.isfile(os.path.join(folder, "checkpoint.pt"))
                start = time.time()
                summary = train_fn(cfg.replace(resume=resume))
                wall = time.time() - start
                if resume and os.path.isfile(os.path.join(folder, WALL)):
                    wall += metrics.read_json(os.path.join(folder, WALL))["wall_s"]
                metrics.write_json(os.path.join(folder, WALL), {"wall_s": wall, "resumed": resume})
            wall_file = os.path.join(folder, WALL)
            summary["wall_s"] = metrics.read_json(wall_file)["wall_s"] if os.path.isfile(wall_file) else None
            summary["folder"] = folder
            results[m.name].append(summary)
    return results


def check_reusable(path: str, summary: dict, cfg: TrainConfig) -> None:
    """Raise unless the finished run at ``path`` was trained with ``cfg``'s settings."""
    import dataclasses
    saved = {**dataclasses.asdict(TrainConfig()), **summary.get("config", {})}  # newer fields: their defaults
    want = cfg.identity()
    diffs = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in want.items()
             if (list(saved.get(k)) if isinstance(saved.get(k), tuple) else saved.get(k))
             != (list(v) if isinstance(v, tuple) else v)]
    if diffs:
        raise ValueError(f"{path} is a finished run with other settings ({'; '.join(diffs)}); nothing was "
                         f"overwritten: pick another --out, or the flags it was run with")


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(values: list[float], digits: int = 2) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if s is not None else f"{m:.{digits}f}"


def paired(diffs: list[float]) -> tuple[float, float | None, float | None]:
    """Mean paired difference and its 95% confidence interval (t distribution, n - 1 dof)."""
    m, sd = mean_std(diffs)
    if sd is None:
        return m, None, None
    half = stats.t.ppf(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return m, m - half, m + half


def in_words(diffs: list[float]) -> str:
    m, lo, hi = paired(diffs)
    if lo is None:
        return "one seed: no interval, no conclusion"
    if lo > 0:
        return "better than the baseline: the 95% interval excludes 0"
    if hi < 0:
        return "worse than the baseline: the 95% interval excludes 0"
    return "no difference shown: the 95% interval includes 0"


def table(results: dict, labels: dict) -> str:
    """Markdown: accuracy, the paired difference to the baseline with its 95% CI in numbers and words,
    the best epoch, wall time per run and images/s."""
    base = [r["final_test_acc"] for r in results["baseline"]]
    lines = ["| method | final test acc (%) | vs baseline, paired (points) | 95% CI | in words | best epoch acc (%) "
             "| wall time per run (s) | images/s |", "|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        acc = [r["final_test_acc"] for r in runs]
        if name == "baseline":
            diff = ci = words = "—"
        else:
            diffs = [a - b for a, b in zip(acc, base)]
            m, lo, hi = paired(diffs)
            diff, words = fmt(diffs), in_words(diffs)
            ci = f"[{lo:+.2f}, {hi:+.2f}]" if lo is not None else "—"
        walls = [r["wall_s"] for r in runs if r.get("wall_s") is not None]
        lines.append(f"| {labels[name]} | {fmt(acc)} | {diff} | {ci} | {words} | "
                     f"{fmt([r['best_test_acc'] for r in runs])} | {fmt(walls, 0) if walls else '—'} | "
                     f"{fmt([r['mean_images_per_s'] for r in runs], 0)} |")
    return "\n".join(lines)


def write_csv(path: str, results: dict, labels: dict) -> None:
    """comparison.csv: one row per (method, seed), with the paired difference to the same seed's baseline."""
    import csv
    import io
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "label", "seed", "final_test_acc", "diff_vs_baseline", "best_test_acc", "wall_s",
                "images_per_s", "folder"])
    base = {r["seed"]: r["final_test_acc"] for r in results["baseline"]}
    for name, runs in results.items():
        for r in runs:
            w.writerow([name, labels[name], r["seed"], repr(r["final_test_acc"]),
                        repr(r["final_test_acc"] - base[r["seed"]]), repr(r["best_test_acc"]),
                        "" if r.get("wall_s") is None else f"{r['wall_s']:.1f}", f"{r['mean_images_per_s']:.1f}",
                        r["folder"]])
    write_text(path, buf.getvalue())


def read_steps(path: str) -> list[tuple]:
    """Each step's (loss, f) from a run's steps.csv."""
    return [(r["loss"], r["f"]) for r in metrics.read_csv(path)]


def steps_per_epoch(folder: str) -> int:
    n_steps = len(read_steps(os.path.join(folder, "steps.csv")))
    return max(1, n_steps // len(metrics.read_csv(os.path.join(folder, "metrics.csv"))))


def report(base: TrainConfig, methods: list[Method], results: dict, seeds: int, command: str, wall: float) -> str:
    """comparison.md, comparison.csv and curves.png in ``base.out``; returns the markdown."""
    labels = {m.name: m.label for m in methods}
    groups = {labels[name]: [metrics.read_csv(os.path.join(r["folder"], "metrics.csv")) for r in runs]
              for name, runs in results.items()}
    curves = os.path.join(base.out, "curves.png")
    f_curve = None
    if "exp" in results:
        exp_run = results["exp"][0]["folder"]
        f_curve = plots.f_per_epoch(read_steps(os.path.join(exp_run, "steps.csv")), steps_per_epoch(exp_run))
    plots.compare_curves(curves, groups, f_curve, f"{base.model} x{base.width} W/A {base.w_bits}/{base.a_bits} "
                                                  f"{base.w_quant} on {base.dataset}")
    write_csv(os.path.join(base.out, "comparison.csv"), results, labels)
    described = "; ".join(f"{m.label}: " + describe(m.cfg) for m in methods if m.name != "baseline")
    text = "\n".join([
        f"# Training methods side by side: {base.model} x{base.width} on {base.dataset}", "",
        f"`{command}`", "",
        f"{seeds} seed(s) from {base.seed}, the same seeds and data order for every method; {base.epochs} epochs, "
        f"batch {base.batch_size}, {base.optimizer} lr {base.lr}; W/A {base.w_bits}/{base.a_bits} "
        f"({base.w_quant}/{base.a_quant}); train/test images limited to {base.limit_train or 'all'}/"
        f"{base.limit_test or 'all'}. {described}.", "",
        "Accuracy is the final epoch's test accuracy of the network that ships: the low-precision one "
        "(EXP-Net collapsed at f = 0; fully quantized after stochastic precision or the last stage). The "
        "difference is the method minus the baseline of the same seed; ± is the sample standard deviation "
        "over seeds, the interval the 95% confidence interval of the mean paired difference (t distribution). "
        "Wall time is one run's, training and evaluation included; images/s counts training steps only.", "",
        table(results, labels), "",
        f"Measured {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on {platform.machine()} with "
        f"{os.cpu_count()} CPU(s), torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"wall time {wall / 60:.1f} min.", "",
        f"Curves: `{curves}`; per run: `comparison.csv`.", ""])
    write_text(os.path.join(base.out, "comparison.md"), text)
    return text


def describe(cfg: TrainConfig) -> str:
    """A method's settings in a few words, for the report."""
    parts = []
    if cfg.mode == "exp":
        parts.append(f"scheme {cfg.scheme}, {cfg.combine}, {cfg.decay} decay over {cfg.decay_steps}")
    if cfg.distill:
        parts.append(f"{cfg.distill} T={cfg.distill_t} lt={cfg.distill_lt} ls={cfg.distill_ls} "
                     f"ltl={cfg.distill_ltl} lsl={cfg.distill_lsl}, {cfg.twin} twin")
    if cfg.progressive:
        parts.append(f"{cfg.progressive}, stages {cfg.stage_epochs}, LR {cfg.stage_lr}")
    if cfg.stochastic_precision is not None:
        parts.append(f"P0 {cfg.stochastic_precision} -> 1 at {cfg.sp_reach:.0%} of training, "
                     f"{cfg.sp_unit} units, {cfg.sp_weighting}")
    return ", ".join(parts) or ("the full-precision network" if cfg.mode == "fp" else "the plain network")


def preset_defaults(preset: str) -> dict:
    """What ``expcuda compare --preset P`` uses for the flags not given: methods, seeds, run settings."""
    from expcuda.train.presets import COMPARE_DEFAULTS
    return {"methods": DEFAULT_METHODS, "seeds": 2, **COMPARE_DEFAULTS.get(preset, {})}
