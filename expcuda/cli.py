"""The ``expcuda`` command: ``train``, ``compare``, ``export`` and ``bench-infer``."""

from __future__ import annotations

import argparse
import shlex
import sys
import time

USAGE = """expcuda <command> [flags]

commands:
  train     train one network (EXP-Net by default; --baseline, --full-precision)
  compare   train training methods (baseline, EXP-Net, Zhuang et al.'s) with the same seeds, print the table
  export    write a run's collapsed model bit-packed (and as ONNX with --onnx), print the sizes
  bench-infer  the packed model against the collapsed float model: images/s and GOP/s, batch 1 and 64

'expcuda <command> --help' lists the flags."""


def compare_parser() -> argparse.ArgumentParser:
    from expcuda.train.args import add_train_flags
    from expcuda.train.errors import EXIT_CODES_HELP
    p = argparse.ArgumentParser(prog="expcuda compare", description="Training methods side by side "
                                "with the same seeds: mean ± std of the final test accuracy, the paired "
                                "difference to the baseline with its 95%% interval, wall time and images/s; one "
                                "run folder each, comparison.md, comparison.csv and curves.png.",
                                epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_flags(p, modes=False)
    p.add_argument("--seeds", type=int, help="seeds per network, from --seed on (default 2; the fmnist preset 3)")
    p.add_argument("--methods", help="comma list of baseline, exp, fp, distill, two-stage, staircase, sp, or "
                                     "combinations such as exp+distill (default: baseline,exp; the fmnist "
                                     "preset: all but fp); --distill, --progressive bits:..., "
                                     "--stochastic-precision set their kind, staircase and P0")
    p.add_argument("--full-precision", action="store_true", help="also train the full-precision network")
    return p


def main_compare(argv) -> int:
    from expcuda.train import compare, errors, preflight
    from expcuda.train.args import overrides
    from expcuda.train.config import TrainConfig
    from expcuda.train.stop import Interrupted

    ns = compare_parser().parse_args(argv)
    values = overrides(ns)
    values.pop("resume", None)
    values["out"] = values.get("out") or f"runs/compare-{ns.preset}"
    defaults = compare.preset_defaults(ns.preset)  # the main job's settings, for the flags not given
    for key, value in defaults.items():
        if key not in ("methods", "seeds") and values.get(key) is None:
            values[key] = value
    ns.seeds = defaults["seeds"] if ns.seeds is None else ns.seeds
    from expcuda.train.compare import KNOBS
    knobs = {k: values.pop(k, None) for k in KNOBS}  # each method's own settings, not the baseline's
    start = time.time()
    try:
        base = TrainConfig.from_preset(ns.preset, **values)
        if ns.seeds <= 0:
            raise ValueError(f"--seeds must be positive, got {ns.seeds}")
        names = ns.methods or defaults["methods"]
        methods = compare.method_configs(base, names + (",fp" if ns.full_precision else ""), knobs)
        with preflight.open_run_folder(base.out, "expcuda compare"):  # one compare per folder at a time
            results = compare.run_all(base, methods, ns.seeds)
            text = compare.report(base, methods, results, ns.seeds, "expcuda compare " + shlex.join(argv),
                                  time.time() - start)
    except Interrupted as exc:
        print(f"\n{exc}; run the same compare command again to continue", file=sys.stderr)
        return errors.EXIT_INTERRUPTED
    except errors.foreseeable() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return errors.exit_code(exc)
    print("\n" + text)
    print(f"comparison: {base.out}/comparison.md, curves: {base.out}/curves.png")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from expcuda.train.cli import main_train
        return main_train(rest)
    if command == "compare":
        return main_compare(rest)
    if command in ("export", "bench-infer"):
        from expcuda.deploy import cli as deploy_cli
        return deploy_cli.main_export(rest) if command == "export" else deploy_cli.main_bench(rest)
    print(f"expcuda: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
