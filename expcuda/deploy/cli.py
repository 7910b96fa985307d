"""``expcuda export RUN_DIR`` and ``expcuda bench-infer RUN_DIR``: the deployment commands."""

from __future__ import annotations

import argparse
import os
import sys

import torch

EXIT_USAGE, EXIT_IO = 2, 5
PACKED_NAME, ONNX_NAME = "lp_model.packed.safetensors", "lp_model.onnx"


class RunError(ValueError):
    """The run folder cannot be exported (no collapsed model, unreadable files)."""


def load_collapsed(run_dir: str):
    """The run's collapsed low-precision model (``lp_model.safetensors`` + ``lp_model.json``), in eval mode."""
    from expcuda.train.export import load

    if not os.path.isdir(run_dir):
        raise RunError(f"{run_dir} is not a folder (give the --out folder of an expcuda train run)")
    weights, config = (os.path.join(run_dir, f"lp_model.{ext}") for ext in ("safetensors", "json"))
    missing = [os.path.basename(p) for p in (weights, config) if not os.path.isfile(p)]
    if missing:
        raise RunError(f"{run_dir} has no collapsed model ({' and '.join(missing)} missing): a run writes "
                       "lp_model.safetensors and lp_model.json when it finishes; train it to the end first")
    try:
        return load(weights, config)
    except Exception as exc:  # a corrupt or foreign file: the safetensors, json and state-dict errors
        raise RunError(f"{run_dir}: cannot load the collapsed model from {os.path.basename(weights)} and "
                       f"{os.path.basename(config)} ({type(exc).__name__}: {exc})") from None


def input_shape(model) -> tuple[int, int, int]:
    cfg = model.config
    return (cfg.in_channels, cfg.input_size, cfg.input_size)


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="expcuda export", description="Write the collapsed model of a finished "
                                "run bit-packed (expcuda-packed safetensors: weight codes as bit planes, BatchNorm "
                                "folded into thresholds) and print its size against the float32 weights.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a finished expcuda train run")
    p.add_argument("--out", metavar="F", help=f"the packed file (default RUN_DIR/{PACKED_NAME}); with --onnx "
                                              "the ONNX file goes beside it, F's stem + .onnx")
    p.add_argument("--fp16", action="store_true", help="store the full-precision first and last layers as float16")
    p.add_argument("--onnx", action="store_true", help=f"also write the collapsed float model as ONNX "
                                                       f"(RUN_DIR/{ONNX_NAME}), checked with onnxruntime")
    return p


def _error(exc: BaseException) -> int:
    from expcuda.train.errors import WriteError
    print(f"error: {exc}", file=sys.stderr)
    return EXIT_IO if isinstance(exc, (WriteError, OSError)) else EXIT_USAGE


def main_export(argv) -> int:
    from expcuda.deploy.export import export
    from expcuda.train.errors import WriteError

    ns = export_parser().parse_args(argv)
    out = ns.out or os.path.join(ns.run_dir, PACKED_NAME)
    try:
        model = load_collapsed(ns.run_dir)
        onnx_path = None
        if ns.onnx:
            onnx_path = (os.path.splitext(out)[0] + ".onnx") if ns.out else os.path.join(ns.run_dir, ONNX_NAME)
            _need_onnx()
        report = export(model, out, fp16=ns.fp16)
        print(f"packed: {out}: {report['bytes']} bytes; float32 weights: {report['float32_bytes']} bytes "
              f"({report['ratio']:.1f}x smaller)")
        if onnx_path:
            _export_onnx(model, onnx_path)
    except (ValueError, WriteError, OSError) as exc:
        return _error(exc)
    return 0


def _need_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise RunError(f"--onnx needs onnx and onnxruntime ({exc}): pip install onnx onnxruntime") from None


def _export_onnx(model, path: str) -> None:
    from expcuda.deploy.onnx import export_onnx, run_onnx

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, *input_shape(model), generator=gen)
    export_onnx(model, path, x[:1])
    with torch.no_grad():
        want = model(x)
    got = run_onnx(path, x)
    same = int((got.argmax(1) == want.argmax(1)).sum())
    print(f"onnx: {path}: {os.path.getsize(path)} bytes; onnxruntime vs torch on {len(x)} random images: "
          f"max |logit difference| {float((got - want).abs().max()):.3g}, {same}/{len(x)} same predictions")


def bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="expcuda bench-infer", description="Inference speed of the packed model "
                                "and the collapsed float model, side by side in one run: images/s and GOP/s "
                                "(2 ops per multiply-accumulate of the convolutions and the FC).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a finished expcuda train run")
    p.add_argument("--packed", metavar="F", help=f"the packed file (default RUN_DIR/{PACKED_NAME} if there, "
                                                 "else the model is packed in memory)")
    p.add_argument("--batches", default="1,64", help="comma list of batch sizes (default 1,64)")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement (default 1)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    return p


def main_bench(argv) -> int:
    from expcuda.deploy import bench
    from expcuda.deploy.export import pack
    from expcuda.deploy.packed_model import PackedModel, load_packed

    ns = bench_parser().parse_args(argv)
    try:
        batches = tuple(int(b) for b in ns.batches.split(","))
        if not batches or min(batches) < 1:
            raise ValueError
    except ValueError:
        return _error(ValueError(f"--batches must be a comma list of positive ints, got {ns.batches!r}"))
    if not ns.min_time > 0:
        return _error(ValueError(f"--min-time must be > 0, got {ns.min_time}"))
    if ns.threads is not None:
        if ns.threads < 1:
            return _error(ValueError(f"--threads must be positive, got {ns.threads}"))
        torch.set_num_threads(ns.threads)
    try:
        model = load_collapsed(ns.run_dir)
        path = ns.packed or os.path.join(ns.run_dir, PACKED_NAME)
        if ns.packed or os.path.isfile(path):
            packed, source = load_packed(path), path
        else:
            packed, source = PackedModel(*pack(model)), "packed in memory"
        rows = bench.bench({"collapsed float32": model, "packed": packed}, input_shape(model), batches,
                           ns.min_time)
    except (ValueError, OSError) as exc:
        return _error(exc)
    print(f"packed file: {source}; {torch.get_num_threads()} threads")
    print(bench.table(rows))
    return 0
