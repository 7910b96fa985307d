"""``python -m expcuda.info``: versions, which backends can run here (and why not), and per op
which backends serve it.

``--selftest`` then checks every op on every available backend against the reference
(:mod:`expcuda.selftest`) and exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from expcuda import backends, registry


def lines() -> list[str]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    out = [
        f"python   {platform.python_version()}",
        f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'}; "
        f"GPU visible: {torch.cuda.is_available()}; CPU threads: {torch.get_num_threads()})",
        f"triton   {triton_version}",
        "backends:",
    ]
    for name, reason in backends.report().items():
        out.append(f"  {name:<9} {'available' if reason is None else 'unavailable: ' + reason}")
    forced = backends.forced_backend()
    out.append(f"forced   {forced or 'no (automatic choice)'}")
    out.append("ops (float32 CPU tensors; CUDA tensors where a GPU is visible): the backends that serve each")
    probes = [torch.empty(0)] + ([torch.empty(0, device="cuda")] if torch.cuda.is_available() else [])
    for probe in probes:
        for op, by_backend in registry.op_report(probe).items():
            serving = [name for name, why in by_backend.items() if why is None]
            out.append(f"  {op:<26} {probe.device.type:<4} {', '.join(serving) or 'none'}")
            for name, why in by_backend.items():
                if why is not None and registry.availability(name) is None:
                    out.append(f"  {'':<26} {'':<4} not {name}: {why}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m expcuda.info", description=__doc__.splitlines()[0])
    parser.add_argument("--selftest", action="store_true",
                        help="run every op on every backend here against the reference (seconds); "
                             "exit 1 on any mismatch")
    args = parser.parse_args(argv)
    print("\n".join(lines()), flush=True)
    if not args.selftest:
        return 0
    from expcuda import selftest
    print("selftest (small inputs, forward and gradients, against the reference on the same device):")
    return selftest.main(lambda line: print("  " + line, flush=True))


if __name__ == "__main__":
    sys.exit(main())
